//! Models trained in Python score the same in Nudge as in Python: LightGBM to 1e-6 and
//! ONNX to 1e-5, over 1200 rows with missing values, all-missing and all-zero rows — both
//! in process and through the gRPC API. The fixtures are made by
//! tests/fixtures/make_fixtures.py with pinned versions.

use std::collections::HashMap;

use nudge::features::{FeatureRow, FeatureSpec};
use nudge::model::{LoadOptions, Model, ModelSet};
use nudge::pb::{self, score_request::Subject};

use crate::support::*;

const LIGHTGBM_TOLERANCE: f64 = 1e-6;
const ONNX_TOLERANCE: f64 = 1e-5;

fn load_options() -> LoadOptions {
    let mut config = nudge::config::Config::default();
    config.models.max_file_bytes = 1 << 30;
    LoadOptions::from(&config)
}

fn read_csv(name: &str) -> (Vec<String>, Vec<Vec<f64>>) {
    let text = std::fs::read_to_string(repo_path("tests/fixtures/parity").join(name)).unwrap();
    let mut lines = text.lines();
    let header = lines
        .next()
        .unwrap()
        .split(',')
        .map(str::to_owned)
        .collect();
    let rows = lines
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    (header, rows)
}

/// The fixture rows as FeatureSpec rows, and Python's expected probabilities per model.
/// A model's name, its tolerance, and Python's probability for each fixture row.
type Expected = (&'static str, f64, Vec<f64>);

fn fixtures() -> (Vec<FeatureRow>, Vec<Expected>) {
    let spec = FeatureSpec::current();
    let (names, rows) = read_csv("rows.csv");
    let spec_names: Vec<&str> = spec.names().collect();
    assert_eq!(
        names, spec_names,
        "fixtures are stale: rerun tests/fixtures/make_fixtures.py"
    );
    let rows: Vec<FeatureRow> = rows
        .into_iter()
        .map(|r| FeatureRow(r.try_into().unwrap()))
        .collect();
    assert!(rows.len() >= 1000);
    assert!(rows.iter().any(|r| r.0.iter().all(|v| v.is_nan())));
    let (_, expected) = read_csv("expected.csv");
    let column = |k: usize| expected.iter().map(|r| r[k]).collect::<Vec<f64>>();
    (
        rows,
        vec![
            ("parity_lgbm", LIGHTGBM_TOLERANCE, column(0)),
            ("parity_onnx", ONNX_TOLERANCE, column(1)),
        ],
    )
}

fn assert_close(model: &str, got: &[f64], want: &[f64], tolerance: f64) {
    assert_eq!(got.len(), want.len());
    let (worst, at) = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (g, w))| ((g - w).abs(), i))
        .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
    assert!(
        worst <= tolerance,
        "{model}: row {at} differs by {worst:e} (got {}, Python {})",
        got[at],
        want[at]
    );
}

#[test]
fn python_models_score_the_same_in_process() {
    let (rows, expected) = fixtures();
    for (name, tolerance, want) in expected {
        let manifest = repo_path("tests/fixtures/parity").join(format!("{name}.manifest.toml"));
        let model = Model::load_from_manifest(&manifest, &load_options(), T0)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // Both are tree ensembles the native scorer serves (the ONNX one imported).
        assert!(
            model.engine().starts_with("native/"),
            "{name}: served by {} ({:?})",
            model.engine(),
            model.engine_note()
        );
        let got = model.score(&rows).unwrap();
        assert_close(name, &got, &want, tolerance);
        // One row at a time takes LightGBM's single-row path; it must agree too.
        let single: Vec<f64> = rows[..200]
            .iter()
            .map(|r| model.score(std::slice::from_ref(r)).unwrap()[0])
            .collect();
        assert_close(name, &single, &want[..200], tolerance);
    }
}

#[tokio::test]
async fn python_models_score_the_same_over_grpc() {
    let mut config = test_config();
    config.models.dir = repo_path("tests/fixtures/parity");
    config.models.onnxruntime_library = load_options().onnxruntime_library.display().to_string();
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let (rows, expected) = fixtures();
    let spec = FeatureSpec::current();

    let mut got: HashMap<String, Vec<f64>> = HashMap::new();
    for chunk in rows.chunks(1000) {
        let request = pb::ScoreRequest {
            subject: Some(Subject::FeatureRows(pb::FeatureRows {
                rows: chunk
                    .iter()
                    .map(|r| pb::FeatureRow {
                        values: spec
                            .names()
                            .zip(r.values())
                            .filter(|(_, v)| !v.is_nan())
                            .map(|(n, v)| (n.to_owned(), *v))
                            .collect(),
                    })
                    .collect(),
                ..Default::default()
            })),
            models: vec![],
        };
        let answer = client.score(request).await.unwrap().into_inner();
        for row in answer.rows {
            for s in row.scores {
                got.entry(s.model).or_default().push(s.probability);
            }
        }
    }
    for (name, tolerance, want) in expected {
        assert_close(name, &got[name], &want, tolerance);
    }
    server.stop().await.unwrap();
}

#[test]
fn the_whole_fixture_directory_loads() {
    let (set, failures) =
        ModelSet::load_dir(&repo_path("tests/fixtures/parity"), &load_options(), T0).unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(set.len(), 2);
}
