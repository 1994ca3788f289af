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

use super::Trigger;
use crate::store::{Store, StoreError};

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SyncMode, Write};

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
}
