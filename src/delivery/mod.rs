//! Delivery: what happens to a trigger after the engine decided it. Delivered triggers are
//! written to the [`outbox`] in the same store batch as the decision; from there
//! [`stream`] serves `SubscribeTriggers` readers, [`webhook`] posts them to endpoints and
//! [`kafka`] publishes them to a topic, each reader from its own cursor, at least once.
//!
//! The store-facing half of triggers lives here; the decisions themselves are
//! [`crate::trigger`]'s, which knows nothing of this module.

pub mod kafka;
pub mod outbox;
pub mod stream;
pub mod webhook;

use crate::event::PersonKey;
use crate::store::{Store, StoreError};
use crate::trigger::Trigger;

/// Erases the delivered triggers of `people` (a person and their linked ids) from the
/// outbox and every endpoint's dead letters; returns how many went. A scan: erasure is
/// rare and the outbox bounded by its retention.
pub fn forget(store: &Store, people: &[PersonKey]) -> Result<usize, StoreError> {
    let concerns = |t: &Trigger| {
        people.iter().any(|p| match p {
            PersonKey::User(id) => t.user_id.as_ref() == Some(id),
            PersonKey::Anonymous(id) => t.anonymous_id.as_ref() == Some(id),
        })
    };
    let mut outbox = Vec::new();
    let mut cursor = 0;
    loop {
        let batch = store.outbox_range(cursor, u64::MAX, 4096)?;
        let Some(&(last, _)) = batch.last() else {
            break;
        };
        cursor = last;
        for (seq, bytes) in batch {
            if serde_json::from_slice::<Trigger>(&bytes).is_ok_and(|t| concerns(&t)) {
                outbox.push(seq);
            }
        }
    }
    let dead: Vec<(String, u64)> = store
        .all_dead_letters()?
        .into_iter()
        .filter(|(_, _, bytes)| {
            serde_json::from_slice::<webhook::DeadLetter>(bytes).is_ok_and(|d| concerns(&d.trigger))
        })
        .map(|(consumer, seq, _)| (consumer, seq))
        .collect();
    store.remove_delivered(&outbox, &dead)?;
    Ok(outbox.len() + dead.len())
}
