//! Score by person and by features, batches, and agreement between every path.

use std::collections::HashMap;

use nudge::features::{FeatureRow, FeatureSpec};
use nudge::model::{LoadOptions, ModelSet};
use nudge::pb::{self, score_request::Subject, EventType};
use tonic::Code;

use crate::support::*;

fn by_person(user: &str, models: &[&str]) -> pb::ScoreRequest {
    pb::ScoreRequest {
        subject: Some(Subject::Person(pb::PersonRef {
            user_id: user.into(),
            anonymous_id: String::new(),
        })),
        models: models.iter().map(|m| m.to_string()).collect(),
    }
}

fn by_rows(rows: Vec<HashMap<String, f64>>) -> pb::ScoreRequest {
    pb::ScoreRequest {
        subject: Some(Subject::FeatureRows(pb::FeatureRows {
            rows: rows
                .into_iter()
                .map(|values| pb::FeatureRow { values })
                .collect(),
            ..Default::default()
        })),
        models: vec![],
    }
}

fn default_models() -> ModelSet {
    let options = LoadOptions {
        max_file_bytes: 1 << 30,
        onnxruntime_library: "unused".into(),
        engine: nudge::model::Engine::Native,
    };
    let (set, failures) = ModelSet::load_dir(&repo_path("models"), &options, T0).unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    set
}

#[tokio::test]
async fn track_score_and_feature_rows_agree() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let u = "scorer";
    let mut add = event("a2", u, EventType::AddToCart, T0.plus_ms(90_000));
    props(&mut add).product_id = Some("p1".into());
    props(&mut add).price = Some(42.0);
    server.clock.set(T0.plus_ms(120_000));
    let tracked = track(
        &mut client,
        vec![product_view("a1", u, T0, "p1", "shoes", Some(30.0)), add],
    )
    .await;
    let after_track = &tracked.results[1].scores;
    let names: Vec<&str> = after_track.iter().map(|s| s.model.as_str()).collect();
    assert_eq!(names, ["churn", "purchase"]);
    assert!(after_track.iter().all(|s| s.version == "sim-3"));
    assert!(after_track
        .iter()
        .all(|s| (0.0..=1.0).contains(&s.probability)));
    // A cart changes the purchase outlook: the score after the add differs from before.
    assert_ne!(
        tracked.results[0].scores[1].probability,
        after_track[1].probability
    );

    // Score by person, same clock: the same numbers as Track answered.
    let scored = client.score(by_person(u, &[])).await.unwrap().into_inner();
    assert_eq!(scored.rows.len(), 1);
    assert_eq!(&scored.rows[0].scores, after_track);
    assert_eq!(scored.feature_spec_version, FeatureSpec::current().version);

    // Only the named model.
    let only = client
        .score(by_person(u, &["purchase"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only.rows[0].scores, vec![after_track[1].clone()]);

    // The profile's features sent back as explicit rows (NaN = left out) score the same.
    let values: HashMap<String, f64> = features(&mut client, u)
        .await
        .into_iter()
        .filter(|(_, v)| !v.is_nan())
        .collect();
    let explicit = client
        .score(by_rows(vec![values]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&explicit.rows[0].scores, after_track);

    // An unknown person is NOT_FOUND, not a made-up score.
    let missing = client.score(by_person("nobody", &[])).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn batch_scoring_matches_in_process_models_row_for_row() {
    let mut config = test_config();
    config.server.max_score_rows = 1000;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let spec = FeatureSpec::current();

    // 1000 varied rows, some features missing.
    let rows: Vec<FeatureRow> = (0..1000)
        .map(|i| {
            let mut row = FeatureRow::missing();
            for (j, v) in row.0.iter_mut().enumerate() {
                if (i + j) % 7 != 0 {
                    *v = ((i * 31 + j * 17) % 97) as f64 / 4.0;
                }
            }
            row
        })
        .collect();
    let maps: Vec<HashMap<String, f64>> = rows
        .iter()
        .map(|r| {
            spec.names()
                .zip(r.values())
                .filter(|(_, v)| !v.is_nan())
                .map(|(n, v)| (n.to_owned(), *v))
                .collect()
        })
        .collect();
    let answer = client
        .score(by_rows(maps.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.rows.len(), 1000);

    let set = default_models();
    for model in set.iter() {
        let expected = model.score(&rows).unwrap();
        let k = answer.rows[0]
            .scores
            .iter()
            .position(|s| s.model == model.name())
            .unwrap();
        for (row, want) in answer.rows.iter().zip(expected) {
            assert_eq!(row.scores[k].probability, want);
        }
    }

    // One row over the limit is refused, naming the field and the limit.
    let mut too_many = maps;
    too_many.push(HashMap::new());
    let err = client.score(by_rows(too_many)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("feature_rows.rows"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("1000"), "{}", err.message());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn list_models_describes_what_serves() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let list = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    let spec = FeatureSpec::current();
    assert_eq!(list.feature_spec_hash, spec.hash);
    let purchase = list.models.iter().find(|m| m.name == "purchase").unwrap();
    assert_eq!(purchase.format, "lightgbm");
    assert_eq!(purchase.predicts, "purchase within the next 24 hours");
    assert_eq!(purchase.features.len(), spec.features.len());
    assert_eq!(purchase.sha256.len(), 64);
    let best = nudge::model::native::Kernel::best();
    assert_eq!(purchase.engine, format!("native/{}", best.name()));
    assert_eq!(purchase.engine_note, "");
    server.stop().await.unwrap();
}

/// `models.engine` picks the engine, and over gRPC both engines answer the same
/// probabilities, to the bit, for rows that sit on and beside every threshold.
#[tokio::test]
async fn both_engines_answer_the_same_scores_over_grpc() {
    let rows: Vec<HashMap<String, f64>> = {
        let set = default_models();
        let model = set.get("purchase").unwrap();
        let text = std::fs::read_to_string(repo_path("models").join(&model.manifest.file)).unwrap();
        let forest = nudge::model::native::Forest::from_lightgbm(&text).unwrap();
        let n = forest.n_features();
        forest
            .probe_rows(200)
            .chunks_exact(n)
            // gRPC rows name their features; a missing value is an absent name, and the
            // API refuses infinities (the in-process tests cover those).
            .map(|row| {
                model
                    .manifest
                    .features
                    .iter()
                    .zip(row)
                    .filter(|(_, v)| v.is_finite())
                    .map(|(name, v)| (name.clone(), *v))
                    .collect()
            })
            .collect()
    };
    assert!(rows.len() >= 200);
    let mut answers = Vec::new();
    for engine in [nudge::model::Engine::Native, nudge::model::Engine::Lightgbm] {
        let mut config = nudge::config::Config::default();
        config.models.engine = engine;
        let server = TestServer::start_with(config).await;
        let mut client = server.client().await;
        let list = client
            .list_models(pb::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner();
        for m in &list.models {
            match engine {
                nudge::model::Engine::Native => assert!(m.engine.starts_with("native/"), "{m:?}"),
                nudge::model::Engine::Lightgbm => assert_eq!(m.engine, "lightgbm", "{m:?}"),
            }
        }
        let mut scores = Vec::new();
        for chunk in rows.chunks(100) {
            let response = client
                .score(by_rows(chunk.to_vec()))
                .await
                .unwrap()
                .into_inner();
            for row in response.rows {
                scores.extend(
                    row.scores
                        .iter()
                        .map(|s| (s.model.clone(), s.probability.to_bits())),
                );
            }
        }
        server.stop().await.unwrap();
        answers.push(scores);
    }
    // Every row scored by both shipped models.
    assert_eq!(answers[0].len(), rows.len() * 2);
    assert_eq!(answers[0], answers[1]);
}

/// The packed form: the columns named once, then `values` row after row.
fn by_columns(columns: &[&str], values: Vec<f64>) -> pb::ScoreRequest {
    pb::ScoreRequest {
        subject: Some(Subject::FeatureRows(pb::FeatureRows {
            rows: vec![],
            columns: columns.iter().map(|c| c.to_string()).collect(),
            values,
        })),
        models: vec![],
    }
}

/// The same rows sent in the packed form and in the map form get the same answer, whether
/// the server scores them inline (few rows) or on the blocking pool (many), and that answer
/// is the in-process models' for those rows.
#[tokio::test]
async fn packed_and_map_rows_score_identically() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let spec = FeatureSpec::current();
    let set = default_models();
    // Columns in an order of their own, and two features not named at all: those are
    // missing in every row, as they are when a map leaves them out.
    let mut columns: Vec<&str> = spec
        .names()
        .filter(|n| !["cart_value", "sessions_7d"].contains(n))
        .collect();
    columns.reverse();
    let inline = nudge::api::INLINE_SCORE_ROWS;
    for n in [1, inline, inline + 1, 300] {
        // Varied values, signed zeros, and gaps: NaN in the packed form, a key left out of
        // the map.
        let rows: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..columns.len())
                    .map(|j| match (i + j) % 11 {
                        0 | 5 => f64::NAN,
                        3 => -0.0,
                        _ => ((i * 13 + j * 7) % 89) as f64 / 3.0 - 5.0,
                    })
                    .collect()
            })
            .collect();
        let maps: Vec<HashMap<String, f64>> = rows
            .iter()
            .map(|r| {
                columns
                    .iter()
                    .zip(r)
                    .filter(|(_, v)| !v.is_nan())
                    .map(|(c, v)| (c.to_string(), *v))
                    .collect()
            })
            .collect();
        let packed = client
            .score(by_columns(&columns, rows.concat()))
            .await
            .unwrap()
            .into_inner();
        let mapped = client.score(by_rows(maps)).await.unwrap().into_inner();
        assert_eq!(packed.rows.len(), n);
        assert_eq!(packed, mapped, "{n} rows");

        let features: Vec<FeatureRow> = rows
            .iter()
            .map(|r| {
                let mut row = FeatureRow::missing();
                for (c, v) in columns.iter().zip(r) {
                    row.0[spec.index_of(c).unwrap()] = *v;
                }
                row
            })
            .collect();
        for (k, model) in set.iter().enumerate() {
            let expected = model.score(&features).unwrap();
            let got: Vec<f64> = packed
                .rows
                .iter()
                .map(|r| r.scores[k].probability)
                .collect();
            assert_eq!(packed.rows[0].scores[k].model, model.name());
            assert_eq!(got, expected, "{} over {n} rows", model.name());
            // Rows that differ score differently: the values reached the model.
            if n > 1 {
                assert!(got.iter().any(|p| *p != got[0]), "{}", model.name());
            }
        }
    }
    server.stop().await.unwrap();
}
