//! LightGBM training through `lightgbm3` on a split by time — early stopping on the
//! validation part, evaluation on the test part — then a comparison with the model
//! currently published, a report, and publishing.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use lightgbm3::{Booster, Dataset, ImportanceType};
use serde_json::json;

use nudge::features::{FeatureRow, FeatureSpec, FEATURE_COUNT};
use nudge::model::manifest::{Manifest, ModelFormat};
use nudge::model::{publish, LoadOptions, Model};

use crate::dataset::{Example, Split};
use crate::evaluate::{evaluate, Evaluation, THRESHOLDS};

/// LightGBM settings. Fixed seeds and a fixed thread count make training reproducible.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub rounds: u32,
    pub early_stopping_rounds: u32,
    pub learning_rate: f64,
    pub num_leaves: u32,
    pub min_data_in_leaf: u32,
    pub seed: u64,
    pub threads: u32,
    /// Weight positives by negatives/positives. It helps ranking on rare outcomes but
    /// inflates probabilities, which triggers read as probabilities: off by default, and the
    /// calibration table shows the effect when on.
    pub balance_classes: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            rounds: 400,
            early_stopping_rounds: 30,
            learning_rate: 0.05,
            num_leaves: 31,
            min_data_in_leaf: 50,
            seed: 42,
            threads: 2,
            balance_classes: false,
        }
    }
}

/// A trained model, not yet published, with its evaluation.
pub struct Candidate {
    pub name: String,
    pub predicts: String,
    /// The model in LightGBM's text format.
    pub model: String,
    pub rounds: i32,
    pub train_rows: usize,
    pub valid_rows: usize,
    /// Evaluated on the test part (the latest examples).
    pub test: Evaluation,
    /// Total gain per feature, largest first.
    pub importance: Vec<(String, f64)>,
    /// The ROC curve on the test part.
    pub roc: Vec<(f64, f64)>,
}

fn matrix(examples: &[&Example]) -> (Vec<f64>, Vec<f32>) {
    let mut x = Vec::with_capacity(examples.len() * FEATURE_COUNT);
    let mut y = Vec::with_capacity(examples.len());
    for e in examples {
        x.extend_from_slice(e.row.values());
        y.push(f32::from(u8::from(e.label)));
    }
    (x, y)
}

/// Trains on `split.train`, stops early on `split.valid`, evaluates on `split.test`.
pub fn train(
    split: &Split,
    name: &str,
    predicts: &str,
    options: &TrainOptions,
) -> anyhow::Result<Candidate> {
    anyhow::ensure!(
        !split.train.is_empty() && !split.valid.is_empty() && !split.test.is_empty(),
        "{name}: too few examples to split by time ({} / {} / {})",
        split.train.len(),
        split.valid.len(),
        split.test.len()
    );
    let names: Vec<String> = FeatureSpec::current().names().map(str::to_owned).collect();
    let (train_x, train_y) = matrix(&split.train);
    let (valid_x, valid_y) = matrix(&split.valid);
    let positives = train_y.iter().filter(|&&y| y > 0.5).count().max(1);
    let mut train_set = Dataset::from_slice(&train_x, &train_y, FEATURE_COUNT as i32, true)?;
    train_set.set_feature_names(&names)?;
    let valid_set = Dataset::from_slice_with_reference(
        &valid_x,
        &valid_y,
        FEATURE_COUNT as i32,
        true,
        Some(&train_set),
    )?;
    let mut params = json!({
        "objective": "binary",
        "metric": "binary_logloss",
        "num_iterations": options.rounds,
        "early_stopping_rounds": options.early_stopping_rounds,
        "learning_rate": options.learning_rate,
        "num_leaves": options.num_leaves,
        "min_data_in_leaf": options.min_data_in_leaf,
        "seed": options.seed,
        "deterministic": true,
        "force_col_wise": true,
        "num_threads": options.threads,
        "verbosity": -1,
    });
    if options.balance_classes {
        params["scale_pos_weight"] = json!((train_y.len() - positives) as f64 / positives as f64);
    }
    let booster = Booster::train_with_valid(train_set, Some(valid_set), &params)?;
    let (test_x, test_y) = matrix(&split.test);
    let p = booster.predict(&test_x, FEATURE_COUNT as i32, true)?;
    let labels: Vec<bool> = test_y.iter().map(|&y| y > 0.5).collect();
    let mut importance: Vec<(String, f64)> = names
        .into_iter()
        .zip(booster.feature_importance(ImportanceType::Gain)?)
        .collect();
    importance.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(Candidate {
        name: name.to_owned(),
        predicts: predicts.to_owned(),
        model: booster.save_string()?,
        rounds: booster.num_iterations(),
        train_rows: split.train.len(),
        valid_rows: split.valid.len(),
        test: evaluate(&p, &labels, THRESHOLDS),
        importance,
        roc: crate::plots::roc_points(&p, &labels),
    })
}

/// How the trainer loads models to evaluate them: as the server does, with no size limit,
/// and ONNX Runtime from `ORT_DYLIB_PATH` when it is set.
pub fn load_options() -> LoadOptions {
    LoadOptions {
        max_file_bytes: u64::MAX,
        onnxruntime_library: std::env::var_os("ORT_DYLIB_PATH")
            .map_or_else(|| PathBuf::from("libonnxruntime.so"), PathBuf::from),
        engine: nudge::model::Engine::default(),
    }
}

/// The currently published model of `name` in `dir`, evaluated on the same test rows; `None`
/// when nothing (loadable) is published.
pub fn evaluate_published(
    dir: &Path,
    name: &str,
    test: &[&Example],
) -> Option<(String, Evaluation)> {
    let model = Model::load_from_manifest(
        &Manifest::path_in(dir, name),
        &load_options(),
        nudge::time::Time(0),
    )
    .ok()?;
    let rows: Vec<FeatureRow> = test.iter().map(|e| e.row).collect();
    let p = model.score(&rows).ok()?;
    let y: Vec<bool> = test.iter().map(|e| e.label).collect();
    Some((model.manifest.version.clone(), evaluate(&p, &y, THRESHOLDS)))
}

/// Whether a candidate may replace the published model: not when the published one does
/// better (test ROC AUC) on the same test rows, unless forced.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Publish,
    Worse {
        published_version: String,
        published_auc: f64,
        candidate_auc: f64,
    },
}

/// Compares a candidate with the published model's evaluation on the same test rows.
pub fn judge(
    candidate: &Candidate,
    published: Option<&(String, Evaluation)>,
    force: bool,
) -> Verdict {
    match published {
        Some((version, p)) if p.auc > candidate.test.auc && !force => Verdict::Worse {
            published_version: version.clone(),
            published_auc: p.auc,
            candidate_auc: candidate.test.auc,
        },
        _ => Verdict::Publish,
    }
}

/// Publishes the candidate into `dir` through the same code operators use (versioned
/// model file, manifest last, previous version kept for rollback).
pub fn publish(dir: &Path, candidate: &Candidate, version: &str) -> anyhow::Result<Manifest> {
    let spec = FeatureSpec::current();
    let mut training = toml::Table::new();
    training.insert("train_rows".into(), (candidate.train_rows as i64).into());
    training.insert("valid_rows".into(), (candidate.valid_rows as i64).into());
    training.insert("test_rows".into(), (candidate.test.rows as i64).into());
    training.insert("rounds".into(), i64::from(candidate.rounds).into());
    training.insert(
        "test_auc".into(),
        ((candidate.test.auc * 1e4).round() / 1e4).into(),
    );
    training.insert("feature_spec_hash".into(), spec.hash.clone().into());
    let manifest = Manifest {
        name: candidate.name.clone(),
        version: version.to_owned(),
        format: ModelFormat::Lightgbm,
        file: String::new(),
        sha256: String::new(),
        predicts: candidate.predicts.clone(),
        features: spec.names().map(str::to_owned).collect(),
        feature_spec_version: Some(spec.version.to_owned()),
        training,
    };
    publish::publish(dir, manifest, candidate.model.as_bytes(), "txt")
        .with_context(|| format!("publishing into {}", dir.display()))
}

/// Writes the report's plots beside it (`<stem>.roc.svg`, `.calibration.svg`,
/// `.importance.svg`) and returns their file names.
pub fn plots(dir: &Path, stem: &str, candidate: &Candidate) -> anyhow::Result<Vec<String>> {
    let title = |what: &str| format!("{} {what}", candidate.name);
    let files = [
        format!("{stem}.roc.svg"),
        format!("{stem}.calibration.svg"),
        format!("{stem}.importance.svg"),
    ];
    let err = |e: Box<dyn std::error::Error>| anyhow::anyhow!("drawing a plot: {e}");
    crate::plots::roc(&dir.join(&files[0]), &title("ROC (test)"), &candidate.roc).map_err(err)?;
    crate::plots::calibration(
        &dir.join(&files[1]),
        &title("calibration (test)"),
        &candidate.test,
    )
    .map_err(err)?;
    crate::plots::importance(
        &dir.join(&files[2]),
        &title("feature importance"),
        &candidate.importance,
    )
    .map_err(err)?;
    Ok(files.to_vec())
}

/// The evaluation as Markdown, beside the published model's on the same test rows.
pub fn report(
    candidate: &Candidate,
    version: &str,
    published: Option<&(String, Evaluation)>,
) -> String {
    let c = &candidate.test;
    let mut out = format!(
        "# {} {version}: {}\n\nTrained on {} examples, early-stopped on {} later ones at {} rounds; \
         tested on the {} latest (positive rate {:.3}).\n\n",
        candidate.name, candidate.predicts, candidate.train_rows, candidate.valid_rows, candidate.rounds, c.rows, c.positive_rate
    );
    out += "| test set | ROC AUC | PR AUC | log loss |\n|---|---|---|---|\n";
    out += &format!(
        "| candidate {version} | {:.4} | {:.4} | {:.4} |\n",
        c.auc, c.pr_auc, c.log_loss
    );
    if let Some((v, p)) = published {
        out += &format!(
            "| published {v} | {:.4} | {:.4} | {:.4} |\n",
            p.auc, p.pr_auc, p.log_loss
        );
    }
    out += "\n## At trigger thresholds\n\n| threshold | precision | recall | flagged |\n|---|---|---|---|\n";
    for t in &c.at_thresholds {
        out += &format!(
            "| {:.2} | {:.3} | {:.3} | {:.3} |\n",
            t.threshold, t.precision, t.recall, t.flagged
        );
    }
    out += "\n## Calibration\n\n| predicted | rows | mean predicted | observed rate |\n|---|---|---|---|\n";
    for b in c.calibration.iter().filter(|b| b.count > 0) {
        out += &format!(
            "| {:.1}–{:.1} | {} | {:.3} | {:.3} |\n",
            b.from, b.to, b.count, b.mean_predicted, b.observed_rate
        );
    }
    out += "\n## Feature importance (total gain)\n\n| feature | gain |\n|---|---|\n";
    let total: f64 = candidate
        .importance
        .iter()
        .map(|(_, g)| g)
        .sum::<f64>()
        .max(f64::MIN_POSITIVE);
    for (name, gain) in candidate.importance.iter().take(15) {
        out += &format!("| `{name}` | {:.1}% |\n", 100.0 * gain / total);
    }
    out
}
