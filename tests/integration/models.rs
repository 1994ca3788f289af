//! A model whose file, hash or feature list disagrees with its manifest is refused at load,
//! with a message that says what differs, counted by reason; the good ones still serve.

use std::path::{Path, PathBuf};

use nudge::model::{LoadOptions, Manifest, ModelSet};

use crate::support::*;

fn options() -> LoadOptions {
    LoadOptions {
        max_file_bytes: 1 << 30,
        onnxruntime_library: "unused".into(),
        engine: nudge::model::Engine::Native,
    }
}

/// A models directory holding the shipped purchase model as `good`, plus one variant per
/// case, each made by `edit` from the good manifest and model text.
/// Turns the good manifest and model bytes into one bad case.
type Edit<'a> = &'a dyn Fn(&mut Manifest, &mut Vec<u8>);

fn directory(cases: &[(&str, Edit)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let models = repo_path("models");
    let manifest =
        Manifest::parse(&std::fs::read_to_string(models.join("purchase.manifest.toml")).unwrap())
            .unwrap();
    let text = std::fs::read(models.join(&manifest.file)).unwrap();
    let write = |name: &str, manifest: &Manifest, bytes: &[u8]| {
        std::fs::write(dir.path().join(&manifest.file), bytes).unwrap();
        std::fs::write(
            dir.path().join(format!("{name}.manifest.toml")),
            manifest.to_toml(),
        )
        .unwrap();
    };
    let mut good = manifest.clone();
    good.name = "good".into();
    good.file = "good.txt".into();
    write("good", &good, &text);
    for (name, edit) in cases {
        let mut m = manifest.clone();
        m.name = name.to_string();
        m.file = format!("{name}.txt");
        let mut bytes = text.clone();
        edit(&mut m, &mut bytes);
        write(name, &m, &bytes);
    }
    dir
}

fn rehash(m: &mut Manifest, bytes: &[u8]) {
    m.sha256 = nudge::model::manifest::sha256_hex(bytes);
}

fn failures(dir: &Path) -> Vec<(String, &'static str, String)> {
    let (set, failures) = ModelSet::load_dir(dir, &options(), T0).unwrap();
    assert!(
        set.get("good").is_some(),
        "the good model serves beside bad ones"
    );
    let mut out: Vec<_> = failures
        .into_iter()
        .map(|f| {
            let file = PathBuf::from(f.manifest.file_name().unwrap());
            let name = file
                .to_str()
                .unwrap()
                .trim_end_matches(".manifest.toml")
                .to_owned();
            (name, f.error.reason(), f.error.to_string())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn each_disagreement_is_refused_with_its_reason() {
    let dir = directory(&[
        ("hash", &|m, _| m.sha256 = "ab".repeat(32)),
        ("count", &|m, _| {
            m.features.pop();
        }),
        ("renamed", &|m, _| m.features.swap(0, 1)),
        ("unknown", &|m, _| m.features[3] = "not_a_feature".into()),
        ("truncated", &|m, b| {
            b.truncate(b.len() / 2);
            rehash(m, b);
        }),
        ("empty", &|m, b| {
            b.clear();
            rehash(m, b);
        }),
        ("random", &|m, b| {
            *b = (0..4096u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            rehash(m, b);
        }),
        ("traversal", &|m, _| m.file = "../purchase-sim-3.txt".into()),
    ]);
    let got = failures(dir.path());
    let reasons: Vec<(&str, &str)> = got.iter().map(|(n, r, _)| (n.as_str(), *r)).collect();
    assert_eq!(
        reasons,
        [
            ("count", "feature_count"),
            ("empty", "parse"),
            ("hash", "hash_mismatch"),
            ("random", "parse"),
            ("renamed", "feature_names"),
            ("traversal", "manifest"),
            ("truncated", "parse"),
            ("unknown", "unknown_feature"),
        ]
    );
    let message = |name: &str| got.iter().find(|(n, _, _)| n == name).unwrap().2.clone();
    assert!(
        message("hash").contains(&"ab".repeat(32)),
        "{}",
        message("hash")
    );
    assert!(
        message("count").contains("36") && message("count").contains("37"),
        "{}",
        message("count")
    );
    assert!(
        message("renamed").contains("column 0 is \"session_duration_s\" in the model file but \"session_page_views\" in the manifest"),
        "{}",
        message("renamed")
    );
    assert!(
        message("unknown").contains("not_a_feature"),
        "{}",
        message("unknown")
    );
}

#[tokio::test]
async fn refused_models_are_counted_and_the_rest_serve() {
    let dir = directory(&[("hash", &|m, _| m.sha256 = "cd".repeat(32))]);
    let mut config = test_config();
    config.models.dir = dir.path().to_owned();
    let server = TestServer::start_with(config).await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "nudge_model_load_failures_total{reason=\"hash_mismatch\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "nudge_model_info{format=\"lightgbm\",name=\"good\",version=\"sim-3\"}"
        ),
        Some(1.0)
    );
    let mut client = server.client().await;
    let list = client
        .list_models(nudge::pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = list.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["good"]);
    server.stop().await.unwrap();
}
