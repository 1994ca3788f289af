//! LightGBM training through `lightgbm3`, holdout evaluation, and atomic publishing of a
//! model file with its manifest.

use std::path::Path;

use anyhow::Context as _;
use lightgbm3::{Booster, Dataset};
use serde_json::json;

use nudge::features::{FeatureSpec, FEATURE_COUNT};
use nudge::model::manifest::{Manifest, ModelFormat};
use nudge::model::publish;

use crate::dataset::{Examples, Target};

/// LightGBM settings. Fixed seeds and thread count make training reproducible.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub rounds: u32,
    pub learning_rate: f64,
    pub num_leaves: u32,
    pub min_data_in_leaf: u32,
    pub seed: u64,
    pub threads: u32,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            rounds: 200,
            learning_rate: 0.05,
            num_leaves: 31,
            min_data_in_leaf: 50,
            seed: 42,
            threads: 2,
        }
    }
}

/// A trained model and how it did on the holdout people.
pub struct Trained {
    pub target: Target,
    /// The model in LightGBM's text format.
    pub model: String,
    pub train_rows: usize,
    pub holdout_rows: usize,
    pub positive_rate: f64,
    pub holdout_auc: f64,
}

/// Trains `target` on the examples of people for whom `is_holdout` is false, and evaluates
/// on the others. Censored examples (label horizon past the end of history) are left out.
pub fn train_target(
    examples: &Examples,
    target: Target,
    is_holdout: impl Fn(usize) -> bool,
    options: &TrainOptions,
) -> anyhow::Result<Trained> {
    let k = Target::ALL
        .iter()
        .position(|t| *t == target)
        .expect("every target is in ALL");
    let (mut train_x, mut train_y, mut hold_x, mut hold_y) = (vec![], vec![], vec![], vec![]);
    for (i, row) in examples.rows.iter().enumerate() {
        let Some(label) = examples.labels[k][i] else {
            continue;
        };
        if target.at_session_ends_only() && !examples.session_end[i] {
            continue;
        }
        let person = examples.person[i];
        let (x, y) = if is_holdout(person) {
            (&mut hold_x, &mut hold_y)
        } else {
            (&mut train_x, &mut train_y)
        };
        x.extend_from_slice(row.values());
        y.push(f32::from(u8::from(label)));
    }
    anyhow::ensure!(
        !train_y.is_empty() && !hold_y.is_empty(),
        "no labeled examples for {target:?}"
    );
    let positive_rate = train_y.iter().map(|&y| f64::from(y)).sum::<f64>() / train_y.len() as f64;

    let mut dataset = Dataset::from_slice(&train_x, &train_y, FEATURE_COUNT as i32, true)?;
    let names: Vec<String> = FeatureSpec::current().names().map(str::to_owned).collect();
    dataset.set_feature_names(&names)?;
    let params = json!({
        "objective": "binary",
        "num_iterations": options.rounds,
        "learning_rate": options.learning_rate,
        "num_leaves": options.num_leaves,
        "min_data_in_leaf": options.min_data_in_leaf,
        "seed": options.seed,
        "deterministic": true,
        "force_col_wise": true,
        "num_threads": options.threads,
        "verbosity": -1,
    });
    let booster = Booster::train(dataset, &params)?;
    let predictions = booster.predict(&hold_x, FEATURE_COUNT as i32, true)?;
    let labels: Vec<bool> = hold_y.iter().map(|&y| y > 0.5).collect();
    Ok(Trained {
        target,
        model: booster.save_string()?,
        train_rows: train_y.len(),
        holdout_rows: hold_y.len(),
        positive_rate,
        holdout_auc: auc(&predictions, &labels),
    })
}

/// The area under the ROC curve: the chance that a random positive scores above a random
/// negative, ties counting half.
pub fn auc(scores: &[f64], labels: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return f64::NAN;
    }
    // Sum of positive ranks, with tied scores sharing their average rank.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let average_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += order[i..=j].iter().filter(|&&o| labels[o]).count() as f64 * average_rank;
        i = j + 1;
    }
    (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
}

/// Publishes the model into `dir` (versioned model file, manifest last, previous version
/// kept for rollback), through the same code operators use.
pub fn publish(dir: &Path, trained: &Trained, version: &str) -> anyhow::Result<Manifest> {
    let spec = FeatureSpec::current();
    let mut training = toml::Table::new();
    training.insert("train_rows".into(), (trained.train_rows as i64).into());
    training.insert("holdout_rows".into(), (trained.holdout_rows as i64).into());
    training.insert(
        "holdout_auc".into(),
        ((trained.holdout_auc * 1e4).round() / 1e4).into(),
    );
    training.insert("feature_spec_hash".into(), spec.hash.clone().into());
    let manifest = Manifest {
        name: trained.target.model_name().to_owned(),
        version: version.to_owned(),
        format: ModelFormat::Lightgbm,
        file: String::new(),
        sha256: String::new(),
        predicts: trained.target.description().to_owned(),
        features: spec.names().map(str::to_owned).collect(),
        feature_spec_version: Some(spec.version.to_owned()),
        training,
    };
    publish::publish(dir, manifest, trained.model.as_bytes(), "txt")
        .with_context(|| format!("publishing into {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_matches_hand_computed_values() {
        let labels = [false, false, true, true];
        assert_eq!(auc(&[0.1, 0.2, 0.3, 0.4], &labels), 1.0);
        assert_eq!(auc(&[0.4, 0.3, 0.2, 0.1], &labels), 0.0);
        assert_eq!(auc(&[0.5, 0.5, 0.5, 0.5], &labels), 0.5);
        // One of four positive/negative pairs is out of order.
        assert_eq!(auc(&[0.1, 0.35, 0.3, 0.4], &labels), 0.75);
    }
}
