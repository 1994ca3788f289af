//! The `SubscribeTriggers` reader: the outbox from a cursor, then new triggers as they
//! commit, into a bounded channel. A slow subscriber holds back only its own reader (which
//! reads from the store as it catches up); it never grows memory or slows ingest.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::outbox::Outbox;
use crate::metrics::Metrics;
use crate::store::StoreError;
use crate::trigger::Trigger;

/// Triggers a subscriber's stream buffers.
const BUFFER: usize = 64;
/// Outbox entries read from the store at a time.
const READ_BATCH: usize = 256;

/// Why a subscription cannot start at the cursor asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("cursor: {cursor} is ahead of the newest trigger ({newest}); was it issued by another Nudge deployment?")]
    Ahead { cursor: u64, newest: u64 },
    #[error("cursor: triggers after {cursor} up to {trimmed_to} were trimmed (older than the outbox retention); resume from cursor 0 or {trimmed_to}")]
    Trimmed { cursor: u64, trimmed_to: u64 },
}

/// How a subscription ended, other than by the subscriber going away.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    #[error("the server is shutting down; resume from cursor {cursor} on another instance or after the restart")]
    ShuttingDown { cursor: u64 },
    #[error("reading the outbox failed: {0}")]
    Store(#[from] StoreError),
}

/// What a subscription yields: each trigger with its sequence number, or how it ended.
pub type Triggers = mpsc::Receiver<Result<(u64, Trigger), Ended>>;

/// Checks `cursor`, then streams the outbox after it — only `rules`' triggers when not
/// empty — with each trigger's sequence number, until the subscriber goes away or
/// `stopping` turns true.
pub fn subscribe(
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    cursor: u64,
    rules: Vec<String>,
    stopping: watch::Receiver<bool>,
) -> Result<Triggers, Subscribe> {
    let newest = outbox.watermark();
    if cursor > newest {
        return Err(CursorError::Ahead { cursor, newest }.into());
    }
    if let Some(first) = outbox.first()? {
        if cursor > 0 && cursor + 1 < first {
            return Err(CursorError::Trimmed {
                cursor,
                trimmed_to: first - 1,
            }
            .into());
        }
    }
    let (tx, rx) = mpsc::channel(BUFFER);
    metrics.subscribers.inc();
    let subscribed = Subscribed(metrics);
    tokio::spawn(async move {
        let _subscribed = subscribed;
        follow(outbox, cursor, rules, tx, stopping).await;
    });
    Ok(rx)
}

/// Why [`subscribe`] refused.
#[derive(Debug, thiserror::Error)]
pub enum Subscribe {
    #[error(transparent)]
    Cursor(#[from] CursorError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

async fn follow(
    outbox: Arc<Outbox>,
    mut cursor: u64,
    rules: Vec<String>,
    tx: mpsc::Sender<Result<(u64, Trigger), Ended>>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut changes = outbox.changes();
    loop {
        if *stopping.borrow() {
            let _ = tx.send(Err(Ended::ShuttingDown { cursor })).await;
            return;
        }
        let batch = {
            let outbox = outbox.clone();
            tokio::task::spawn_blocking(move || outbox.read(cursor, READ_BATCH)).await
        };
        let batch = match batch {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
            Err(_) => return,
        };
        if batch.is_empty() {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = stopping.changed() => {}
                _ = tx.closed() => return,
            }
            continue;
        }
        for (seq, trigger) in batch {
            cursor = seq;
            if !rules.is_empty() && !rules.contains(&trigger.rule) {
                continue;
            }
            if tx.send(Ok((seq, trigger))).await.is_err() {
                return;
            }
        }
    }
}

/// Counts a subscriber while its stream lives.
struct Subscribed(Arc<Metrics>);

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.0.subscribers.dec();
    }
}
