//! Nudge's trainer: labeled history in, LightGBM models, reports and manifests out —
//! through the same `Profile::apply` and `features::extract` the server runs, with each
//! event's own time as `now`.
//!
//! - [`input`]: events as JSON Lines (the `Track` shape) or CSV; labels as CSV.
//! - [`simulate`]: the clickstream simulator behind the shipped default models.
//! - [`replay`]: identity stitching during the replay, by the server's own rule.
//! - [`dataset`]: point-in-time examples and labels, streamed; the split by time.
//! - [`train`]: LightGBM with early stopping, comparison with the published model,
//!   reports, publishing.
//! - [`segments`]: k-means behavioral segments (linfa) for the server to assign people to.
//! - [`plots`]: the report's SVG plots (ROC, calibration, importance).
//! - [`evaluate`]: AUC, PR AUC, log loss, calibration, precision and recall at thresholds.

pub mod dataset;
pub mod evaluate;
pub mod input;
pub mod plots;
pub mod replay;
pub mod segments;
pub mod simulate;
pub mod train;
