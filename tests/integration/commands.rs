//! The offline subcommands run as the real binary: `nudge manifest` refuses a model the
//! server would refuse, with the server's own reason, and `nudge compact` reports bytes on
//! disk.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use nudge::config::Config;
use nudge::model::{LoadOptions, Manifest, Model, ModelFormat};

use crate::support::*;

fn nudge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(args)
        .output()
        .unwrap()
}

/// The options the server loads models with by default.
fn server_options() -> LoadOptions {
    LoadOptions::from(&Config::default())
}

/// The shipped purchase model's manifest and file bytes.
fn purchase() -> (Manifest, Vec<u8>) {
    let models = repo_path("models");
    let manifest =
        Manifest::parse(&std::fs::read_to_string(models.join("purchase.manifest.toml")).unwrap())
            .unwrap();
    let bytes = std::fs::read(models.join(&manifest.file)).unwrap();
    (manifest, bytes)
}

/// The parity fixture's ONNX model: its manifest and file bytes.
fn parity_onnx() -> (Manifest, Vec<u8>) {
    let dir = repo_path("tests/fixtures/parity");
    let manifest =
        Manifest::parse(&std::fs::read_to_string(dir.join("parity_onnx.manifest.toml")).unwrap())
            .unwrap();
    let bytes = std::fs::read(dir.join(&manifest.file)).unwrap();
    (manifest, bytes)
}

/// One `nudge manifest` call: a model file, and the manifest the server would then be
/// given (the features the command is told, or those the file names).
struct Case {
    label: &'static str,
    name: &'static str,
    file: &'static str,
    bytes: Vec<u8>,
    format: ModelFormat,
    /// `--features`, when given.
    flag: Option<Vec<String>>,
    /// The features the resulting manifest names.
    features: Vec<String>,
}

impl Case {
    /// What the server says when it loads this case's manifest and file: a manifest
    /// written by hand, read through the server's load path.
    fn server_verdict(&self) -> Result<(), (&'static str, String)> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(self.file), &self.bytes).unwrap();
        let manifest = Manifest {
            name: self.name.into(),
            version: "t-1".into(),
            format: self.format,
            file: self.file.into(),
            sha256: nudge::model::manifest::sha256_hex(&self.bytes),
            predicts: "a test".into(),
            features: self.features.clone(),
            feature_spec_version: Some(nudge::features::SPEC_VERSION.into()),
            training: Default::default(),
        };
        // The server finds manifests by their model's name; an invalid name still gets a
        // file, so the load reaches the check that refuses it.
        let path = Manifest::path_in(dir.path(), self.name);
        std::fs::write(&path, manifest.to_toml()).unwrap();
        Model::load_from_manifest(&path, &server_options(), T0)
            .map(|_| ())
            .map_err(|e| (e.reason(), e.to_string()))
    }

    /// Runs `nudge manifest` on this case's file in a fresh directory.
    fn run(&self) -> (Output, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join(self.file);
        std::fs::write(&model, &self.bytes).unwrap();
        let mut args = vec![
            "manifest".to_owned(),
            "--model".into(),
            model.display().to_string(),
            "--name".into(),
            self.name.into(),
            "--version".into(),
            "t-1".into(),
            "--predicts".into(),
            "a test".into(),
        ];
        if let Some(features) = &self.flag {
            args.push("--features".into());
            args.push(features.join(","));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (nudge(&args), dir)
    }
}

#[test]
fn the_manifest_command_refuses_what_the_server_refuses_with_its_reason() {
    let (manifest, good) = purchase();
    let names = manifest.features.clone();
    let text = String::from_utf8(good.clone()).unwrap();
    let with = |i: usize, name: &str| {
        let mut n = names.clone();
        n[i] = name.into();
        n
    };
    let lightgbm = |label, bytes: Vec<u8>, flag: Option<Vec<String>>, features| Case {
        label,
        name: "purchase",
        file: "purchase-t-1.txt",
        bytes,
        format: ModelFormat::Lightgbm,
        flag,
        features,
    };
    let trees_end = text.find("\nend of trees").unwrap();
    let mut not_utf8 = good.clone();
    not_utf8.insert(trees_end / 2, 0xff);
    let mut swapped = names.clone();
    swapped.swap(0, 1);
    let (onnx_manifest, onnx) = parity_onnx();
    let cases = vec![
        // The file's own column names, not in the FeatureSpec.
        lightgbm(
            "renamed in the file",
            text.replacen(
                "feature_names=session_duration_s ",
                "feature_names=session_length_s ",
                1,
            )
            .into_bytes(),
            None,
            with(0, "session_length_s"),
        ),
        lightgbm(
            "unknown in --features",
            good.clone(),
            Some(with(8, "basket_value")),
            with(8, "basket_value"),
        ),
        lightgbm(
            "truncated",
            good[..trees_end - 10].to_vec(),
            None,
            names.clone(),
        ),
        lightgbm("not UTF-8", not_utf8, None, names.clone()),
        lightgbm(
            "too few --features",
            good.clone(),
            Some(names[..2].to_vec()),
            names[..2].to_vec(),
        ),
        lightgbm(
            "--features in another order",
            good.clone(),
            Some(swapped.clone()),
            swapped,
        ),
        Case {
            name: "Purchase",
            ..lightgbm("an invalid name", good.clone(), None, names.clone())
        },
        Case {
            label: "ONNX with too few --features",
            name: "parity",
            file: "parity.onnx",
            bytes: onnx.clone(),
            format: ModelFormat::Onnx,
            flag: Some(onnx_manifest.features[..1].to_vec()),
            features: onnx_manifest.features[..1].to_vec(),
        },
    ];
    let mut wrong = Vec::new();
    for case in &cases {
        let (reason, message) = case
            .server_verdict()
            .expect_err("every case here is one the server refuses");
        let (output, dir) = case.run();
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            wrong.push(format!(
                "{}: exited 0 for a model the server refuses with [{reason}] {message}",
                case.label
            ));
        } else if !(stderr.contains(&message) && stderr.contains(&format!("[{reason}]"))) {
            wrong.push(format!(
                "{}: the server says [{reason}] {message:?}; the command said: {stderr}",
                case.label
            ));
        }
        if Manifest::path_in(dir.path(), case.name).exists() {
            wrong.push(format!("{}: a refused manifest was written", case.label));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // What the server accepts, the command writes, and the server loads what it wrote.
    let accepted = [
        lightgbm("the shipped model", good.clone(), None, names.clone()),
        Case {
            label: "the ONNX fixture",
            name: "parity",
            file: "parity.onnx",
            bytes: onnx,
            format: ModelFormat::Onnx,
            flag: Some(onnx_manifest.features.clone()),
            features: onnx_manifest.features.clone(),
        },
    ];
    for case in &accepted {
        case.server_verdict()
            .unwrap_or_else(|e| panic!("{}: the server refuses {e:?}", case.label));
        let (output, dir) = case.run();
        assert!(
            output.status.success(),
            "{}: {}",
            case.label,
            String::from_utf8_lossy(&output.stderr)
        );
        let path = Manifest::path_in(dir.path(), case.name);
        let model = Model::load_from_manifest(&path, &server_options(), T0)
            .unwrap_or_else(|e| panic!("{}: the written manifest is refused: {e}", case.label));
        assert_eq!(model.manifest.features, case.features, "{}", case.label);
        assert_eq!(model.manifest.format, case.format, "{}", case.label);
    }
}

/// Bytes allocated on disk under `dir` (blocks, not apparent lengths), and the apparent
/// lengths, for comparison.
fn disk_usage(dir: &Path) -> (u64, u64) {
    let mut allocated = 0;
    let mut apparent = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            let (a, b) = disk_usage(&entry.path());
            allocated += a;
            apparent += b;
        } else {
            allocated += meta.blocks() * 512;
            apparent += meta.len();
        }
    }
    (allocated, apparent)
}

#[tokio::test]
async fn compact_reports_bytes_on_disk() {
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.store.dir = data.path().to_owned();
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let events = (0..200)
        .map(|i| {
            product_view(
                &format!("e{i}"),
                &format!("u{}", i % 20),
                T0,
                &format!("p{i}"),
                "shoes",
                Some(5.0),
            )
        })
        .collect();
    track(&mut client, events).await;
    server.stop().await.unwrap();

    let (before, apparent_before) = disk_usage(data.path());
    // Journals are preallocated sparse files: their lengths overstate what they hold.
    assert!(
        apparent_before > before,
        "the store holds no sparse file ({apparent_before} apparent, {before} allocated), so this test shows nothing"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["compact", "--config", "/nonexistent/nudge.toml"])
        .env("NUDGE__STORE__DIR", data.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (after, _) = disk_usage(data.path());
    // "compacted DIR: A -> B bytes on disk ..."
    let numbers: Vec<u64> = stdout
        .split_once(": ")
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .take(2)
        .collect();
    assert_eq!(numbers, [before, after], "the report: {stdout}");
    assert!(stdout.contains("on disk"), "the report: {stdout}");
}
