//! The outbox: every delivered trigger, in the store, numbered by a sequence that consumers
//! use as their cursor.
//!
//! Shards commit concurrently, so a sequence number is reserved before its batch commits
//! and the batches may land out of order. Readers see only up to the *watermark*: the
//! highest number below which every reserved number has committed (or failed, leaving a
//! gap). A consumer that has read up to the watermark has therefore missed nothing, and
//! one that reconnects with its cursor continues exactly after it.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::webhook;
use crate::store::{Store, StoreError};
use crate::time::Time;
use crate::trigger::Trigger;

pub struct Outbox {
    store: Arc<Store>,
    sequencer: Mutex<Sequencer>,
    watermark: watch::Sender<u64>,
}

struct Sequencer {
    next: u64,
    /// The first number of each reserved range that has not completed yet.
    in_flight: BTreeSet<u64>,
}

/// Reserved sequence numbers; give them back with [`Outbox::complete`].
#[derive(Debug)]
pub struct Reservation(Range<u64>);

impl Reservation {
    pub fn numbers(&self) -> Range<u64> {
        self.0.clone()
    }
}

impl Outbox {
    /// Continues the sequence after what the store holds.
    pub fn open(store: Arc<Store>) -> Result<Outbox, StoreError> {
        let last = store.outbox_last()?;
        Ok(Outbox {
            store,
            sequencer: Mutex::new(Sequencer {
                next: last + 1,
                in_flight: BTreeSet::new(),
            }),
            watermark: watch::channel(last).0,
        })
    }

    /// Reserves `n` consecutive numbers for a batch about to commit.
    pub fn reserve(&self, n: usize) -> Reservation {
        let mut s = self
            .sequencer
            .lock()
            .expect("the sequencer lock is never poisoned");
        let start = s.next;
        s.next += n as u64;
        if n > 0 {
            s.in_flight.insert(start);
        }
        Reservation(start..s.next)
    }

    /// Marks a reservation's batch as done (committed or failed) and moves the watermark.
    pub fn complete(&self, reservation: Reservation) {
        // An empty reservation holds no number; its start may be another's.
        if reservation.0.is_empty() {
            return;
        }
        let watermark = {
            let mut s = self
                .sequencer
                .lock()
                .expect("the sequencer lock is never poisoned");
            s.in_flight.remove(&reservation.0.start);
            match s.in_flight.first() {
                Some(first) => first - 1,
                None => s.next - 1,
            }
        };
        self.watermark.send_if_modified(|w| {
            let moved = watermark > *w;
            *w = (*w).max(watermark);
            moved
        });
    }

    /// The highest number below which everything is readable.
    pub fn watermark(&self) -> u64 {
        *self.watermark.borrow()
    }

    /// Tells when the watermark moves.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.watermark.subscribe()
    }

    /// The oldest number still stored (older ones were trimmed), if any.
    pub fn first(&self) -> Result<Option<u64>, StoreError> {
        self.store.outbox_first()
    }

    /// Readable triggers after `cursor`, at most `limit`. An entry that does not decode is
    /// skipped with an error log: one bad record must not stop every consumer.
    pub fn read(&self, cursor: u64, limit: usize) -> Result<Vec<(u64, Trigger)>, StoreError> {
        let entries = self.store.outbox_range(cursor, self.watermark(), limit)?;
        Ok(entries
            .into_iter()
            .filter_map(|(seq, bytes)| match serde_json::from_slice(&bytes) {
                Ok(t) => Some((seq, t)),
                Err(e) => {
                    tracing::error!(seq, error = %e, "an outbox entry does not decode; skipped");
                    None
                }
            })
            .collect())
    }

    /// A webhook endpoint's dead letters, oldest first, at most `limit`.
    pub fn dead_letters(
        &self,
        endpoint: &str,
        limit: usize,
    ) -> Result<Vec<webhook::DeadLetter>, StoreError> {
        webhook::dead_letters(&self.store, endpoint, limit)
    }

    /// Deletes entries older than `retention_ms` that every webhook endpoint (`endpoints`)
    /// has taken care of; returns how many.
    pub fn trim(
        &self,
        now: Time,
        retention_ms: i64,
        endpoints: &[String],
    ) -> Result<usize, StoreError> {
        let mut up_to = self.watermark();
        for name in endpoints {
            up_to = up_to.min(self.store.cursor(&webhook::consumer(name))?);
        }
        // Entries are in time order: find the last one that is old enough.
        let mut cut = 0;
        let mut cursor = self.first()?.map_or(0, |f| f.saturating_sub(1));
        'scan: loop {
            let batch = self.read(cursor, 1024)?;
            if batch.is_empty() {
                break;
            }
            for (seq, t) in batch {
                if seq > up_to || now.since(Time(t.time_ms)) < retention_ms {
                    break 'scan;
                }
                cut = seq;
                cursor = seq;
            }
        }
        if cut == 0 {
            return Ok(0);
        }
        self.store.trim_outbox(cut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SyncMode, Write};
    use crate::time::{DAY_MS, HOUR_MS};
    use crate::trigger::Trigger;

    /// 2026-03-02T10:00:00Z.
    const T0: Time = Time(1_772_445_600_000);

    #[test]
    fn readers_see_only_what_every_earlier_batch_has_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), SyncMode::Always).unwrap());
        let outbox = Outbox::open(store.clone()).unwrap();
        let first = outbox.reserve(2);
        let second = outbox.reserve(1);
        assert_eq!((first.numbers(), second.numbers()), (1..3, 3..4));
        store
            .commit(vec![Write::Outbox(3, b"{}".to_vec())])
            .unwrap();
        outbox.complete(second);
        assert_eq!(outbox.watermark(), 0, "1 and 2 are not committed yet");
        outbox.complete(first); // say the batch failed: a gap
        assert_eq!(outbox.watermark(), 3);

        // A batch with nothing to deliver reserves nothing, and completing it must not
        // release the next batch's numbers.
        let empty = outbox.reserve(0);
        let next = outbox.reserve(1);
        assert_eq!(empty.numbers().start, next.numbers().start);
        outbox.complete(empty);
        assert_eq!(outbox.watermark(), 3, "4 is still being committed");
        outbox.complete(next);
        assert_eq!(outbox.watermark(), 4);
        drop(outbox);
        let reopened = Outbox::open(store).unwrap();
        assert_eq!(reopened.reserve(1).numbers(), 4..5, "4 never committed");
    }

    #[test]
    fn the_outbox_keeps_what_is_young_or_not_yet_delivered_by_every_endpoint() {
        use std::collections::BTreeMap;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), SyncMode::Always).unwrap());
        let trigger = |seq: u64, at: Time| {
            let t = Trigger {
                trigger_id: format!("t{seq}"),
                rule: "r".into(),
                user_id: Some("u".into()),
                anonymous_id: None,
                time_ms: at.millis(),
                cause: String::new(),
                scores: BTreeMap::new(),
                journey_stage: "awareness".into(),
                contributions: BTreeMap::new(),
                context: None,
                action: Default::default(),
                experiment: None,
                variant: None,
            };
            Write::Outbox(seq, serde_json::to_vec(&t).unwrap())
        };
        // Four triggers a day apart: 3, 2 and 1 days old, and one from now.
        store
            .commit(
                (1..=4)
                    .map(|i| trigger(i, T0.plus_ms(i as i64 * DAY_MS)))
                    .collect(),
            )
            .unwrap();
        let now = T0.plus_ms(4 * DAY_MS);
        let outbox = Outbox::open(store.clone()).unwrap();
        // An endpoint that has delivered up to 1 holds the rest back.
        store
            .advance_cursor(&webhook::consumer("crm"), 1, &[])
            .unwrap();
        let endpoints = ["crm".to_owned()];
        assert_eq!(outbox.trim(now, 36 * HOUR_MS, &endpoints).unwrap(), 1);
        assert_eq!(outbox.first().unwrap(), Some(2));
        // Once it caught up, what is older than the retention goes; the young one stays.
        store
            .advance_cursor(&webhook::consumer("crm"), 4, &[])
            .unwrap();
        assert_eq!(outbox.trim(now, 36 * HOUR_MS, &endpoints).unwrap(), 1);
        assert_eq!(outbox.first().unwrap(), Some(3));
    }
}
