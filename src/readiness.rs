//! Whether the server can do its work now, and when not, why.
//!
//! Several parts can make the server not ready: no model is loaded, the store refuses
//! writes after a fault, a shard thread is gone, shutdown has begun. Each sets or clears
//! its own [`Reason`]; the server is ready when none holds. The gRPC health service
//! (`nudge.v1.NudgeService`) follows [`Readiness::watch`], `nudge_ready` and
//! `nudge_not_ready{reason}` say the same to Prometheus, and every change is logged with
//! its detail.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::metrics::Metrics;

/// One reason the server is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// No model is loaded: nothing can be scored.
    NoModels,
    /// The store refuses writes (a full disk, a read-only or failing filesystem) until
    /// it reopens.
    Store,
    /// A shard thread stopped; the people it owned cannot be served.
    Shard,
    /// The server is draining.
    ShuttingDown,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::NoModels,
        Reason::Store,
        Reason::Shard,
        Reason::ShuttingDown,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoModels => "no_models",
            Reason::Store => "store",
            Reason::Shard => "shard",
            Reason::ShuttingDown => "shutting_down",
        }
    }
}

/// The reasons that hold now, each with its detail.
pub struct Readiness {
    reasons: Mutex<BTreeMap<Reason, String>>,
    ready: watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

impl Readiness {
    /// Ready, until a part says otherwise.
    pub fn new(metrics: Arc<Metrics>) -> Readiness {
        for reason in Reason::ALL {
            metrics
                .not_ready
                .with_label_values(&[reason.as_str()])
                .set(0);
        }
        metrics.ready.set(1);
        Readiness {
            reasons: Mutex::new(BTreeMap::new()),
            ready: watch::channel(true).0,
            metrics,
        }
    }

    /// `reason` holds now, because of `detail`.
    pub fn set(&self, reason: Reason, detail: impl Into<String>) {
        let detail = detail.into();
        let mut reasons = self.lock();
        if reasons.get(&reason) != Some(&detail) {
            tracing::warn!(reason = reason.as_str(), %detail, "not ready");
        }
        reasons.insert(reason, detail);
        self.publish(&reasons);
    }

    /// `reason` no longer holds.
    pub fn clear(&self, reason: Reason) {
        let mut reasons = self.lock();
        if reasons.remove(&reason).is_some() {
            tracing::info!(reason = reason.as_str(), "cleared");
        }
        self.publish(&reasons);
    }

    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    /// The reasons that hold, with their details.
    pub fn reasons(&self) -> Vec<(Reason, String)> {
        self.lock().iter().map(|(r, d)| (*r, d.clone())).collect()
    }

    /// Whether the server is ready, as it changes.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Reason, String>> {
        self.reasons.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, reasons: &BTreeMap<Reason, String>) {
        for reason in Reason::ALL {
            self.metrics
                .not_ready
                .with_label_values(&[reason.as_str()])
                .set(i64::from(reasons.contains_key(&reason)));
        }
        let ready = reasons.is_empty();
        self.metrics.ready.set(i64::from(ready));
        self.ready
            .send_if_modified(|now| std::mem::replace(now, ready) != ready);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_no_reason_holds() {
        let metrics = Arc::new(Metrics::new());
        let readiness = Readiness::new(metrics.clone());
        let mut changes = readiness.watch();
        assert!(readiness.is_ready());
        readiness.set(Reason::Store, "no space left on device");
        readiness.set(Reason::NoModels, "no model loaded");
        assert!(!readiness.is_ready());
        assert!(changes.has_changed().unwrap());
        assert!(!*changes.borrow_and_update());
        readiness.clear(Reason::Store);
        assert_eq!(
            readiness.reasons(),
            vec![(Reason::NoModels, "no model loaded".to_owned())]
        );
        assert!(!changes.has_changed().unwrap(), "still not ready");
        assert_eq!(metrics.ready.get(), 0);
        assert_eq!(metrics.not_ready.with_label_values(&["store"]).get(), 0);
        assert_eq!(metrics.not_ready.with_label_values(&["no_models"]).get(), 1);
        readiness.clear(Reason::NoModels);
        assert!(readiness.is_ready());
        assert!(*changes.borrow_and_update());
        assert_eq!(metrics.ready.get(), 1);
    }
}
