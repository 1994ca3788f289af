//! A small end-to-end training run: simulate, replay, train, publish — and the server's own
//! loader accepts what was published, with every check, and it scores.

use nudge::features::FeatureRow;
use nudge::model::{LoadOptions, ModelSet};
use nudge::time::{Time, DAY_MS};
use nudge_training::dataset::{self, Target};
use nudge_training::simulate::{self, SimConfig};
use nudge_training::train::{self, TrainOptions};

#[test]
fn published_models_load_in_the_server_and_beat_chance() {
    let config = SimConfig {
        people: 600,
        days: 75,
        start: Time(1_767_571_200_000),
        seed: 3,
    };
    let histories = simulate::simulate(&config);
    let examples = dataset::examples(&histories, config.start.plus_ms(config.days * DAY_MS));
    let options = TrainOptions {
        rounds: 40,
        ..TrainOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    for target in Target::ALL {
        let trained = train::train_target(&examples, target, |p| p % 5 == 0, &options).unwrap();
        assert!(
            trained.holdout_auc > 0.7,
            "{target:?}: AUC {}",
            trained.holdout_auc
        );
        train::publish(dir.path(), &trained, "test-1").unwrap();
    }
    let load = LoadOptions {
        max_file_bytes: 1 << 30,
        onnxruntime_library: "unused".into(),
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
    // No temporary files are left behind by the atomic publish.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "tmp"))
        .collect();
    assert!(leftovers.is_empty());
}
