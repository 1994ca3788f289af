//! Publishing model versions into a models directory, and rolling back — the one
//! definition the trainer, the CLI and operators' scripts share.
//!
//! A publish writes the model file under a versioned name, then keeps the current manifest
//! as `<name>.manifest.toml.previous`, then writes the new manifest: each file through a
//! temporary file, fsync and rename, manifest last. A server watching the directory never
//! sees a manifest whose model file is missing or half written. Afterwards the file that
//! only the dropped previous manifest named is removed: a publish removes nothing but its
//! own model's old files, found through what its manifests name. (Names may contain `-`,
//! so a prefix such as `purchase-` would also match model `purchase-eu`'s files.)

use std::io::Write;
use std::path::{Path, PathBuf};

use super::manifest::{sha256_hex, Manifest, MANIFEST_SUFFIX};

/// The suffix of the kept previous manifest (not a manifest the server loads).
pub const PREVIOUS_SUFFIX: &str = ".previous";

fn previous_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{MANIFEST_SUFFIX}{PREVIOUS_SUFFIX}"))
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the
/// directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Publishes a model version: `manifest.file` is set to a versioned file name and
/// `manifest.sha256` to the bytes' hash. Returns the manifest as written.
pub fn publish(
    dir: &Path,
    mut manifest: Manifest,
    model_bytes: &[u8],
    extension: &str,
) -> std::io::Result<Manifest> {
    std::fs::create_dir_all(dir)?;
    let version: String = manifest
        .version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    manifest.file = format!("{}-{version}.{extension}", manifest.name);
    manifest.sha256 = sha256_hex(model_bytes);
    // The files this model's manifests name before the publish: one of them is dropped.
    let before = named_files(&[
        Manifest::path_in(dir, &manifest.name),
        previous_path(dir, &manifest.name),
    ]);
    write_atomically(&dir.join(&manifest.file), model_bytes)?;
    let current = Manifest::path_in(dir, &manifest.name);
    if let Ok(previous) = std::fs::read(&current) {
        write_atomically(&previous_path(dir, &manifest.name), &previous)?;
    }
    write_atomically(&current, manifest.to_toml().as_bytes())?;
    remove_dropped(dir, before)?;
    Ok(manifest)
}

/// Swaps a model's manifest with the kept previous one. Returns (from, to) versions.
pub fn rollback(dir: &Path, name: &str) -> std::io::Result<(String, String)> {
    let current_path = Manifest::path_in(dir, name);
    let previous_path = previous_path(dir, name);
    let current = std::fs::read_to_string(&current_path)?;
    let previous = std::fs::read_to_string(&previous_path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("no previous version of {name:?} is kept: {e}"),
        )
    })?;
    let version = |text: &str| {
        Manifest::parse(text)
            .map(|m| m.version)
            .unwrap_or_else(|_| "(unreadable)".into())
    };
    write_atomically(&previous_path, current.as_bytes())?;
    write_atomically(&current_path, previous.as_bytes())?;
    Ok((version(&current), version(&previous)))
}

/// The `file` each readable manifest among `paths` names.
fn named_files(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|t| Manifest::parse(&t).ok())
        .map(|m| m.file)
        .collect()
}

/// Removes those of `candidates` (files a model's manifests named before a publish) that no
/// manifest in `dir` names any more, current or previous, of any model. Only plain file
/// names are candidates: a hand-written manifest naming `../x` must not make a publish
/// delete outside the directory.
///
/// A model file whose publish failed before its manifest was written is named by no
/// manifest, so it stays for an operator to remove; deleting by name pattern instead is
/// what removed other models' files.
fn remove_dropped(dir: &Path, candidates: Vec<String>) -> std::io::Result<()> {
    let manifests: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|f| f.to_str()).is_some_and(|f| {
                f.ends_with(MANIFEST_SUFFIX)
                    || f.ends_with(&format!("{MANIFEST_SUFFIX}{PREVIOUS_SUFFIX}"))
            })
        })
        .collect();
    let referenced = named_files(&manifests);
    for file in candidates {
        let plain = Path::new(&file)
            .file_name()
            .is_some_and(|f| f == file.as_str());
        if plain && !referenced.contains(&file) {
            match std::fs::remove_file(dir.join(&file)) {
                Ok(()) => {}
                // Already gone (removed by hand, or named by both old manifests).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifest::ModelFormat;

    fn manifest(version: &str) -> Manifest {
        manifest_of("purchase", version)
    }

    fn manifest_of(name: &str, version: &str) -> Manifest {
        Manifest {
            name: name.into(),
            version: version.into(),
            format: ModelFormat::Lightgbm,
            file: String::new(),
            sha256: String::new(),
            predicts: "test".into(),
            features: vec!["cart_value".into()],
            feature_spec_version: None,
            training: Default::default(),
        }
    }

    #[test]
    fn publishing_keeps_one_previous_version_and_rollback_swaps() {
        let dir = tempfile::tempdir().unwrap();
        for v in ["v1", "v2", "v3"] {
            publish(dir.path(), manifest(v), v.as_bytes(), "txt").unwrap();
        }
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "purchase-v2.txt",
                "purchase-v3.txt",
                "purchase.manifest.toml",
                "purchase.manifest.toml.previous"
            ]
        );
        assert_eq!(
            rollback(dir.path(), "purchase").unwrap(),
            ("v3".into(), "v2".into())
        );
        let now = Manifest::parse(
            &std::fs::read_to_string(Manifest::path_in(dir.path(), "purchase")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (now.version.as_str(), now.file.as_str()),
            ("v2", "purchase-v2.txt")
        );
        assert_eq!(now.sha256, sha256_hex(b"v2"));
        // Rolling back again returns to the newer version.
        assert_eq!(
            rollback(dir.path(), "purchase").unwrap(),
            ("v2".into(), "v3".into())
        );
        assert!(rollback(dir.path(), "churn").is_err());
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        files
    }

    /// Names may contain '-', so `purchase-eu`'s files start with `purchase-`: publishing
    /// `purchase` must leave them alone, and the other way round.
    #[test]
    fn publishing_removes_only_the_models_own_old_files() {
        let dir = tempfile::tempdir().unwrap();
        for v in ["v1", "v2"] {
            publish(
                dir.path(),
                manifest_of("purchase-eu", v),
                v.as_bytes(),
                "txt",
            )
            .unwrap();
        }
        // A file no manifest names, such as an operator's copy, is not a publish's to remove.
        std::fs::write(dir.path().join("purchase-backup.txt"), b"kept").unwrap();
        for v in ["v1", "v2", "v3"] {
            publish(dir.path(), manifest_of("purchase", v), v.as_bytes(), "txt").unwrap();
        }
        assert_eq!(
            files_in(dir.path()),
            [
                "purchase-backup.txt",
                "purchase-eu-v1.txt",
                "purchase-eu-v2.txt",
                "purchase-eu.manifest.toml",
                "purchase-eu.manifest.toml.previous",
                "purchase-v2.txt",
                "purchase-v3.txt",
                "purchase.manifest.toml",
                "purchase.manifest.toml.previous",
            ]
        );
        publish(dir.path(), manifest_of("purchase-eu", "v3"), b"v3", "txt").unwrap();
        assert_eq!(
            files_in(dir.path()),
            [
                "purchase-backup.txt",
                "purchase-eu-v2.txt",
                "purchase-eu-v3.txt",
                "purchase-eu.manifest.toml",
                "purchase-eu.manifest.toml.previous",
                "purchase-v2.txt",
                "purchase-v3.txt",
                "purchase.manifest.toml",
                "purchase.manifest.toml.previous",
            ]
        );
    }
}
