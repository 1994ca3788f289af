//! A small end-to-end training run: simulate, replay, train, publish — and the server's own
//! loader accepts what was published, with every check, and it scores. A worse candidate
//! is refused by the comparison (`train::judge`) unless forced.

use nudge::features::FeatureRow;
use nudge::model::{LoadOptions, ModelSet};
use nudge::time::{Time, DAY_MS};
use nudge_training::dataset::{Builder, Split, Target};
use nudge_training::simulate::{self, SimConfig};
use nudge_training::train::{self, TrainOptions};

#[test]
fn published_models_load_in_the_server_and_beat_chance() {
    let config = SimConfig {
        people: 1500,
        days: 120,
        start: Time(1_767_571_200_000),
        seed: 3,
    };
    let mut builder = Builder::default();
    for h in simulate::simulate(&config) {
        for e in &h.events {
            builder.push(e).unwrap();
        }
    }
    let (purchase, churn) = builder.finish(Some(config.start.plus_ms(config.days * DAY_MS)));
    let options = TrainOptions {
        rounds: 60,
        ..TrainOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    for (target, examples) in [(Target::Purchase24h, &purchase), (Target::Churn30d, &churn)] {
        let split = Split::by_time(examples);
        assert!(split.train.last().unwrap().time <= split.valid[0].time);
        assert!(split.valid.last().unwrap().time <= split.test[0].time);
        let candidate =
            train::train(&split, target.model_name(), target.description(), &options).unwrap();
        assert!(
            candidate.test.auc > 0.7,
            "{target:?}: AUC {}",
            candidate.test.auc
        );
        assert!(candidate.rounds <= 60);
        train::publish(dir.path(), &candidate, "test-1").unwrap();
        // The published model, scored by the server's code on the same test rows, gives
        // the same AUC the trainer measured.
        let (version, published) =
            train::evaluate_published(dir.path(), target.model_name(), &split.test).unwrap();
        assert_eq!(version, "test-1");
        assert!((published.auc - candidate.test.auc).abs() < 1e-12);
        let report = train::report(&candidate, "test-1", Some(&(version, published)));
        assert!(
            report.contains("| 0.75 |") && report.contains("## Calibration"),
            "{report}"
        );
    }
    // A candidate trained on noise — real test labels, random training labels — is worse
    // than the published purchase model on the same test rows: refused unless forced.
    let mut noisy = purchase.clone();
    let cut = Split::by_time(&purchase).valid.last().unwrap().time;
    for (i, e) in noisy.iter_mut().enumerate() {
        if e.time <= cut {
            e.label = (i * 7919) % 10 < 3;
        }
    }
    let split = Split::by_time(&noisy);
    let target = Target::Purchase24h;
    let worse = train::train(&split, target.model_name(), target.description(), &options).unwrap();
    let published = train::evaluate_published(dir.path(), target.model_name(), &split.test);
    let Some((_, best)) = &published else {
        panic!("the purchase model is published")
    };
    assert!(
        worse.test.auc < best.auc,
        "{} vs {}",
        worse.test.auc,
        best.auc
    );
    assert_eq!(
        train::judge(&worse, published.as_ref(), false),
        train::Verdict::Worse {
            published_version: "test-1".into(),
            published_auc: best.auc,
            candidate_auc: worse.test.auc,
        }
    );
    assert_eq!(
        train::judge(&worse, published.as_ref(), true),
        train::Verdict::Publish
    );
    // With nothing published, any candidate is published.
    assert_eq!(train::judge(&worse, None, false), train::Verdict::Publish);

    let load = LoadOptions {
        max_file_bytes: 1 << 30,
        onnxruntime_library: "unused".into(),
        engine: nudge::model::Engine::Native,
    };
    let (set, failures) = ModelSet::load_dir(dir.path(), &load, Time(0)).unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    let names: Vec<&str> = set.iter().map(|m| m.name()).collect();
    assert_eq!(names, ["churn", "purchase"]);
    let p = set
        .get("purchase")
        .unwrap()
        .score(&[FeatureRow::missing()])
        .unwrap();
    assert!((0.0..=1.0).contains(&p[0]));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "tmp"))
        .collect();
    assert!(leftovers.is_empty(), "no temporary files are left behind");
}
