//! Nudge's trainer: simulated (and later real) histories in, LightGBM models and manifests
//! out — through the same `Profile::apply` and `features::extract` the server runs, with
//! each event's own time as `now`.
//!
//! - [`simulate`]: the clickstream simulator.
//! - [`dataset`]: point-in-time examples and labels from histories.
//! - [`train`]: LightGBM training, evaluation and publishing.

pub mod dataset;
pub mod simulate;
pub mod train;
