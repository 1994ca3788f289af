//! Hot swap: reloads of the models directory, from file changes, SIGHUP or the
//! `ReloadModels` RPC, one at a time, with metrics, logs and readiness kept up to date.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{LoadError, LoadFailure, ModelRegistry, ModelSet, ReloadReport};
use crate::metrics::Metrics;
use crate::time::Clock;

/// How long file changes settle before a reload: a publish writes a model and then its
/// manifest, and each write raises events.
const SETTLE: Duration = Duration::from_millis(200);

/// Publishes which models serve (`nudge_model_info`) and counts the ones that were refused.
pub fn record_models(metrics: &Metrics, set: &ModelSet, failures: &[LoadFailure]) {
    // Zero series for every refusal reason, so alerts see them before the first failure.
    for reason in LoadError::REASONS {
        metrics.model_load_failures.with_label_values(&[reason]);
    }
    metrics.model_info.reset();
    for model in set.iter() {
        let m = &model.manifest;
        metrics.model_errors.with_label_values(&[m.name.as_str()]);
        metrics
            .model_info
            .with_label_values(&[m.name.as_str(), m.version.as_str(), m.format.as_str()])
            .set(1);
    }
    for failure in failures {
        metrics
            .model_load_failures
            .with_label_values(&[failure.error.reason()])
            .inc();
    }
}

/// Runs reloads and reports them.
pub struct Reloader {
    registry: Arc<ModelRegistry>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    /// Told whether at least one model serves after each reload (readiness).
    on_ready: Box<dyn Fn(bool) + Send + Sync>,
}

impl Reloader {
    pub fn new(
        registry: Arc<ModelRegistry>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        on_ready: impl Fn(bool) + Send + Sync + 'static,
    ) -> Reloader {
        Reloader {
            registry,
            metrics,
            clock,
            on_ready: Box::new(on_ready),
        }
    }

    /// Reloads now, off the async workers. `trigger` names the cause, for the logs.
    pub async fn reload(&self, trigger: &'static str) -> Result<ReloadReport, LoadError> {
        let registry = self.registry.clone();
        let now = self.clock.now();
        let result = tokio::task::spawn_blocking(move || registry.reload(now))
            .await
            .unwrap_or_else(|e| Err(LoadError::Runtime(format!("the reload panicked: {e}"))));
        match &result {
            Ok(report) => {
                record_models(&self.metrics, &report.set, &report.new_failures);
                for failure in &report.new_failures {
                    tracing::error!(
                        trigger,
                        manifest = %failure.manifest.display(),
                        reason = failure.error.reason(),
                        error = %failure.error,
                        "model refused; the version it would replace keeps serving"
                    );
                }
                for name in &report.changed {
                    match report.set.get(name) {
                        Some(m) => {
                            tracing::info!(trigger, name = %name, version = %m.manifest.version, engine = %m.engine(), "model now serving");
                            if let Some(note) = m.engine_note() {
                                tracing::warn!(name = %name, reason = note, "the native scorer does not serve this model; LightGBM does");
                            }
                        }
                        None => {
                            tracing::warn!(trigger, name = %name, "model no longer served (its manifest is gone)")
                        }
                    }
                }
                let outcome = if report.new_failures.is_empty() {
                    "ok"
                } else {
                    "refused"
                };
                self.metrics
                    .model_reloads
                    .with_label_values(&[outcome])
                    .inc();
                (self.on_ready)(!report.set.is_empty());
            }
            Err(e) => {
                self.metrics
                    .model_reloads
                    .with_label_values(&["failed"])
                    .inc();
                tracing::error!(trigger, error = %e, "model reload failed; the current models keep serving");
            }
        }
        result
    }

    /// Reloads whenever `triggers` fires, letting bursts settle first, until the channel
    /// closes.
    pub async fn run(self: Arc<Self>, mut triggers: mpsc::Receiver<&'static str>) {
        while let Some(trigger) = triggers.recv().await {
            settle(&mut triggers).await;
            let _ = self.reload(trigger).await;
        }
    }
}

/// Lets a burst of change notifications settle, then drops the ones that arrived meanwhile:
/// one reload answers them all.
pub async fn settle(triggers: &mut mpsc::Receiver<&'static str>) {
    tokio::time::sleep(SETTLE).await;
    while triggers.try_recv().is_ok() {}
}

/// Watches `dir` and sends a trigger on every change. The watcher stops when dropped.
pub fn watch(
    dir: &std::path::Path,
    triggers: mpsc::Sender<&'static str>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // A full queue already holds a pending reload.
            let _ = triggers.try_send("file change");
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
