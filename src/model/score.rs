//! Scoring, defined once: every call to a model goes through [`score_rows`], which times it
//! and counts failures, whether it scores one person after an event or a batch of rows.

use std::sync::Arc;
use std::time::Instant;

use super::{Model, ScoreError};
use crate::features::FeatureRow;
use crate::metrics::Metrics;

/// One model's probability for one row.
#[derive(Debug, Clone)]
pub struct Score {
    pub model: Arc<Model>,
    pub probability: f64,
}

/// A model that failed to score, and why.
pub type Failed = (Arc<Model>, ScoreError);

/// One row's scores: per model, its probability or its error.
pub type Scores = Vec<Result<Score, Failed>>;

/// Scores `rows` with `model` in one backend call, timed and counted.
fn timed(
    model: &Arc<Model>,
    rows: &[FeatureRow],
    metrics: &Metrics,
) -> Result<Vec<f64>, ScoreError> {
    observed(model, metrics, || model.score(rows))
}

/// Scores rows given in `model`'s own column order ([`Model::score_matrix`]) in one
/// backend call, timed and counted like every other call to a model.
pub fn score_matrix(
    model: &Arc<Model>,
    matrix: &[f64],
    metrics: &Metrics,
) -> Result<Vec<f64>, ScoreError> {
    observed(model, metrics, || model.score_matrix(matrix))
}

/// Runs one backend call of `model`, timing it, counting a failure and recording each
/// probability in the model's score histogram.
fn observed(
    model: &Arc<Model>,
    metrics: &Metrics,
    score: impl FnOnce() -> Result<Vec<f64>, ScoreError>,
) -> Result<Vec<f64>, ScoreError> {
    let started = Instant::now();
    let result = score();
    metrics.observe_model(model.name(), started.elapsed(), result.is_ok());
    if let Ok(probabilities) = &result {
        let histogram = metrics.score_probability.with_label_values(&[model.name()]);
        for &p in probabilities {
            histogram.observe(p);
        }
    }
    result
}

/// Scores one row with each model; a model that fails does not stop the others.
pub fn score_row(models: &[Arc<Model>], row: &FeatureRow, metrics: &Metrics) -> Scores {
    score_each(models, std::slice::from_ref(row), metrics)
        .pop()
        .expect("one row in, one out")
}

/// Scores every row with each model, one backend call per model (a batch walks the trees
/// several times faster than its rows one by one): per row, each model's probability or
/// its error. A model that fails does not stop the others.
pub fn score_each(models: &[Arc<Model>], rows: &[FeatureRow], metrics: &Metrics) -> Vec<Scores> {
    let mut out: Vec<Scores> = (0..rows.len())
        .map(|_| Vec::with_capacity(models.len()))
        .collect();
    if rows.is_empty() {
        return out;
    }
    for model in models {
        match timed(model, rows, metrics) {
            Ok(probabilities) => {
                for (row, probability) in out.iter_mut().zip(probabilities) {
                    row.push(Ok(Score {
                        model: model.clone(),
                        probability,
                    }));
                }
            }
            Err(e) => {
                for row in out.iter_mut() {
                    row.push(Err((model.clone(), e.clone())));
                }
            }
        }
    }
    out
}

/// Scores every row with every model, one backend call per model: per row, each model's
/// score in `models`' order. The first model that fails fails the batch.
pub fn score_rows(
    models: &[Arc<Model>],
    rows: &[FeatureRow],
    metrics: &Metrics,
) -> Result<Vec<Vec<Score>>, Failed> {
    let mut out: Vec<Vec<Score>> = (0..rows.len())
        .map(|_| Vec::with_capacity(models.len()))
        .collect();
    for model in models {
        let probabilities = timed(model, rows, metrics).map_err(|e| (model.clone(), e))?;
        for (row, probability) in out.iter_mut().zip(probabilities) {
            row.push(Score {
                model: model.clone(),
                probability,
            });
        }
    }
    Ok(out)
}
