//! The LightGBM backend: text model files scored through LightGBM's C API (`lightgbm3`).

use lightgbm3::Booster;

use super::{LoadError, ScoreError, Scorer};

/// A LightGBM booster.
pub struct LightgbmScorer {
    booster: SyncBooster,
    num_features: usize,
    feature_names: Vec<String>,
}

/// `lightgbm3::Booster` holds a raw handle and so is neither `Send` nor `Sync`.
struct SyncBooster(Booster);

// SAFETY: the handle points to a LightGBM `Booster` object on the C++ heap that is not tied
// to the thread that created it, so moving it between threads is sound. Sharing it is sound
// because Nudge only calls prediction and read-only accessors through `&self`, and
// LightGBM 4.7 takes a shared lock around prediction (`Booster::Predict*` in c_api.cpp
// lock `mutex_` for reading, and only mutating calls take it for writing). Nothing here calls
// `single_row_fast_init` or other `&mut self` methods after construction.
unsafe impl Send for SyncBooster {}
// SAFETY: see above.
unsafe impl Sync for SyncBooster {}

impl LightgbmScorer {
    /// Parses a model from its text.
    pub fn from_text(text: &str) -> Result<LightgbmScorer, LoadError> {
        let booster = Booster::from_string(text).map_err(|e| LoadError::Parse(e.to_string()))?;
        if booster.num_classes() != 1 {
            return Err(LoadError::Parse(format!(
                "the model has {} outputs per row; Nudge serves binary classifiers (1 output)",
                booster.num_classes()
            )));
        }
        let num_features = usize::try_from(booster.num_features()).unwrap_or(0);
        let feature_names = booster
            .feature_name()
            .map_err(|e| LoadError::Parse(e.to_string()))?;
        Ok(LightgbmScorer {
            booster: SyncBooster(booster),
            num_features,
            feature_names,
        })
    }
}

impl Scorer for LightgbmScorer {
    fn predict(&self, rows: &[f64], n_columns: usize) -> Result<Vec<f64>, ScoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // One row runs in the calling thread; batches use LightGBM's own OpenMP threads.
        self.booster
            .0
            .predict(rows, n_columns as i32, true)
            .map_err(|e| ScoreError::Backend(e.to_string()))
    }

    fn num_features(&self) -> usize {
        self.num_features
    }

    /// LightGBM files carry column names. A model trained on unnamed columns has names
    /// `Column_0`, `Column_1` …; those say nothing, so they are not reported.
    fn feature_names(&self) -> Option<Vec<String>> {
        let unnamed = self
            .feature_names
            .iter()
            .enumerate()
            .all(|(i, n)| *n == format!("Column_{i}"));
        (!unnamed).then(|| self.feature_names.clone())
    }
}
