//! Each shard's people in memory — their profiles and trigger states — within a budget in
//! bytes.
//!
//! The store is the truth; the cache only saves reads. An entry is changed in memory by a
//! group and written by the group's commit, so once a commit succeeded everything cached
//! is clean, and that is when the cache shrinks back under its budget (`shrink`): during a
//! group nothing is evicted, so a change is never only in memory and never lost. A failed
//! commit drops the people it changed (the shard evicts them), a panicked group drops
//! everything. The budget is therefore exceeded at most by one group's new people.
//!
//! Eviction is CLOCK (second chance): a hand sweeps the entries in insertion order,
//! sparing once each one used since it last passed. People who come back often stay; a
//! crowd seen once (a crawler, a campaign's landing page) passes through.
//!
//! Bytes are counted, not entries: an entry's weight is its key, its slot in the map and
//! what its profile and trigger state hold on the heap (`HeapSize`), re-weighed when a
//! group changed it.

use std::mem::size_of;
use std::sync::Arc;

use indexmap::IndexMap;

use crate::event::PersonKey;
use crate::heap::HeapSize;
use crate::metrics::Metrics;
use crate::profile::Profile;
use crate::trigger::TriggerState;

/// foldhash (hashbrown's default) instead of SipHash: hashing the key was a tenth of a
/// commit. It is seeded at random, so a caller cannot precompute colliding ids, and with
/// `identity.pseudonymize_key_file` set the keys are keyed hashes callers cannot choose.
type People<V> = IndexMap<PersonKey, V, foldhash::fast::RandomState>;

pub(super) struct Cache {
    entries: People<Entry>,
    /// The sum of the entries' weights.
    bytes: usize,
    budget: usize,
    /// The CLOCK hand: the index of the next entry to look at.
    hand: usize,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Entry {
    /// `None`: not loaded (which says nothing about the store).
    profile: Option<Profile>,
    state: StateSlot,
    /// The weight counted for this entry when it was last weighed.
    bytes: usize,
    /// Used since the hand last passed: spared once.
    referenced: bool,
}

/// A cached trigger state. Most people have nothing to remember: held inline, an empty
/// state would cost its four vectors (96 bytes) in every entry, a tenth of a person's
/// budget; boxed, only those who remember something pay for it.
#[derive(Default)]
enum StateSlot {
    /// Not loaded (which says nothing about the store).
    #[default]
    NotLoaded,
    /// Loaded, and empty.
    Empty,
    Held(Box<TriggerState>),
}

/// What [`StateSlot::Empty`] reads as.
static EMPTY: TriggerState = TriggerState {
    rules: Vec::new(),
    delivered: Vec::new(),
    timers: Vec::new(),
    exposures: Vec::new(),
};

impl StateSlot {
    fn of(state: TriggerState) -> StateSlot {
        if state.is_empty() {
            StateSlot::Empty
        } else {
            StateSlot::Held(Box::new(state))
        }
    }

    fn is_loaded(&self) -> bool {
        !matches!(self, StateSlot::NotLoaded)
    }

    fn get(&self) -> Option<&TriggerState> {
        match self {
            StateSlot::NotLoaded => None,
            StateSlot::Empty => Some(&EMPTY),
            StateSlot::Held(state) => Some(state),
        }
    }

    fn held_mut(&mut self) -> Option<&mut TriggerState> {
        match self {
            StateSlot::Held(state) => Some(state),
            _ => None,
        }
    }

    fn take(&mut self) -> Option<TriggerState> {
        match std::mem::take(self) {
            StateSlot::NotLoaded => None,
            StateSlot::Empty => Some(TriggerState::default()),
            StateSlot::Held(state) => Some(*state),
        }
    }

    /// After a change: back to `Empty` if nothing is left, else without spare capacity.
    fn settle(&mut self) {
        if let StateSlot::Held(state) = self {
            if state.is_empty() {
                *self = StateSlot::Empty;
            } else {
                state.shrink_to_fit();
            }
        }
    }
}

impl HeapSize for StateSlot {
    fn heap_bytes(&self) -> usize {
        match self {
            StateSlot::Held(state) => crate::heap::buffer::<TriggerState>(1) + state.heap_bytes(),
            _ => 0,
        }
    }
}

/// What an entry costs besides what its parts hold on the heap: its slot in the map's
/// entries (the hash, the key and the entry inline) and in its index table.
const SLOT_BYTES: usize = size_of::<(u64, PersonKey, Entry)>() + size_of::<usize>() + 1;

/// Which part of a person a lookup was for, as the metrics name it.
#[derive(Clone, Copy)]
pub(super) enum Part {
    Profile,
    State,
}

impl Part {
    fn as_str(self) -> &'static str {
        match self {
            Part::Profile => "profile",
            Part::State => "trigger_state",
        }
    }
}

impl Cache {
    pub(super) fn new(budget: usize, metrics: Arc<Metrics>) -> Cache {
        Cache {
            entries: People::default(),
            bytes: 0,
            budget,
            hand: 0,
            metrics,
        }
    }

    /// The person's profile if it is cached, counted as a hit or a miss.
    pub(super) fn profile(&mut self, person: &PersonKey) -> Option<&mut Profile> {
        let found = self.entries.get_mut(person).and_then(|e| {
            e.referenced = true;
            e.profile.as_mut()
        });
        count(&self.metrics, Part::Profile, found.is_some());
        found
    }

    /// The person's trigger state if it is cached, counted as a hit or a miss.
    pub(super) fn state(&mut self, person: &PersonKey) -> Option<&mut TriggerState> {
        let found = self.entries.get_mut(person).and_then(|e| {
            e.referenced = true;
            open_state(person, e, &mut self.bytes, &self.metrics)
        });
        count(&self.metrics, Part::State, found.is_some());
        found
    }

    /// The person's profile if it is cached, for the shard's own bookkeeping (a commit, the
    /// second look after a counted lookup): not counted, not marked.
    pub(super) fn profile_cached(&mut self, person: &PersonKey) -> Option<&mut Profile> {
        self.entries
            .get_mut(person)
            .and_then(|e| e.profile.as_mut())
    }

    /// The person's trigger state if it is cached, for the shard's own bookkeeping: not
    /// counted, not marked.
    pub(super) fn state_cached(&mut self, person: &PersonKey) -> Option<&mut TriggerState> {
        self.entries
            .get_mut(person)
            .and_then(|e| open_state(person, e, &mut self.bytes, &self.metrics))
    }

    /// The person's trigger state if it is cached, for reading: not counted, not marked.
    pub(super) fn peek_state(&self, person: &PersonKey) -> Option<&TriggerState> {
        self.entries.get(person).and_then(|e| e.state.get())
    }

    /// Caches a profile loaded from the store (or a new one).
    pub(super) fn insert_profile(&mut self, person: &PersonKey, profile: Profile) -> &mut Profile {
        let entry = self.entries.entry(person.clone()).or_default();
        if entry.profile.is_none() {
            self.metrics.profiles.inc();
        }
        entry.referenced = true;
        entry.profile = Some(profile);
        reweigh(person, entry, &mut self.bytes, &self.metrics);
        entry.profile.as_mut().expect("just inserted")
    }

    /// Caches a trigger state loaded from the store (or a new one).
    pub(super) fn insert_state(
        &mut self,
        person: &PersonKey,
        state: TriggerState,
    ) -> &mut TriggerState {
        let entry = self.entries.entry(person.clone()).or_default();
        entry.referenced = true;
        entry.state = StateSlot::of(state);
        reweigh(person, entry, &mut self.bytes, &self.metrics);
        open_state(person, entry, &mut self.bytes, &self.metrics).expect("just inserted")
    }

    /// A person a group changed: their entry's weight counted again, and its parts for
    /// the commit's writes.
    pub(super) fn changed(
        &mut self,
        person: &PersonKey,
    ) -> (Option<&Profile>, Option<&TriggerState>) {
        match self.entries.get_mut(person) {
            Some(entry) => {
                // Growth's spare room would otherwise be most of a new person's weight.
                if let Some(profile) = &mut entry.profile {
                    profile.shrink_to_fit();
                }
                entry.state.settle();
                reweigh(person, entry, &mut self.bytes, &self.metrics);
                (entry.profile.as_ref(), entry.state.get())
            }
            None => (None, None),
        }
    }

    /// Takes the person's profile out of memory, if it was there.
    pub(super) fn take_profile(&mut self, person: &PersonKey) -> Option<Profile> {
        let entry = self.entries.get_mut(person)?;
        let profile = entry.profile.take()?;
        self.metrics.profiles.dec();
        self.settle(person);
        Some(profile)
    }

    /// Takes the person's trigger state out of memory, if it was there.
    pub(super) fn take_state(&mut self, person: &PersonKey) -> Option<TriggerState> {
        let state = self.entries.get_mut(person)?.state.take()?;
        self.settle(person);
        Some(state)
    }

    /// Drops a person from memory.
    pub(super) fn evict(&mut self, person: &PersonKey) {
        if let Some(entry) = self.entries.swap_remove(person) {
            self.forget(&entry);
        }
    }

    /// Drops everyone from memory.
    pub(super) fn clear(&mut self) {
        for (_, entry) in self.entries.drain(..) {
            forget(&entry, &mut self.bytes, &self.metrics);
        }
        self.hand = 0;
    }

    /// Evicts until the cache is within its budget. Only when everything cached is clean:
    /// right after a commit succeeded.
    pub(super) fn shrink(&mut self) {
        while self.bytes > self.budget && !self.entries.is_empty() {
            if self.hand >= self.entries.len() {
                self.hand = 0;
            }
            let (_, entry) = self
                .entries
                .get_index_mut(self.hand)
                .expect("the hand is in range");
            if entry.referenced {
                entry.referenced = false;
                self.hand += 1;
            } else {
                // The last entry moves into this slot; the hand looks at it next.
                let (_, entry) = self
                    .entries
                    .swap_remove_index(self.hand)
                    .expect("the hand is in range");
                self.forget(&entry);
                self.metrics.cache_evictions.inc();
            }
        }
    }

    /// The bytes counted for the cached people.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Re-weighs the person's entry after a part left it, removing it if it is empty.
    fn settle(&mut self, person: &PersonKey) {
        let Some(entry) = self.entries.get_mut(person) else {
            return;
        };
        if entry.profile.is_none() && !entry.state.is_loaded() {
            if let Some(entry) = self.entries.swap_remove(person) {
                self.forget(&entry);
            }
        } else {
            reweigh(person, entry, &mut self.bytes, &self.metrics);
        }
    }

    fn forget(&mut self, entry: &Entry) {
        forget(entry, &mut self.bytes, &self.metrics);
    }
}

/// Counts an entry's weight again, moving the cache's total by the difference.
fn reweigh(person: &PersonKey, entry: &mut Entry, total: &mut usize, metrics: &Metrics) {
    let key = match person {
        PersonKey::User(id) | PersonKey::Anonymous(id) => id.heap_bytes(),
    };
    let bytes = SLOT_BYTES + key + entry.profile.heap_bytes() + entry.state.heap_bytes();
    *total = *total - entry.bytes + bytes;
    metrics.cache_bytes.add(bytes as i64 - entry.bytes as i64);
    entry.bytes = bytes;
}

/// The entry's trigger state for a change, if it is loaded: an empty one is boxed (and
/// weighed so) until the change is settled (`Cache::changed`).
fn open_state<'a>(
    person: &PersonKey,
    entry: &'a mut Entry,
    total: &mut usize,
    metrics: &Metrics,
) -> Option<&'a mut TriggerState> {
    if let StateSlot::Empty = entry.state {
        entry.state = StateSlot::Held(Box::default());
        reweigh(person, entry, total, metrics);
    }
    entry.state.held_mut()
}

/// Takes a removed entry's weight (and profile, if any) off the totals.
fn forget(entry: &Entry, total: &mut usize, metrics: &Metrics) {
    *total -= entry.bytes;
    metrics.cache_bytes.sub(entry.bytes as i64);
    if entry.profile.is_some() {
        metrics.profiles.dec();
    }
}

fn count(metrics: &Metrics, part: Part, hit: bool) {
    metrics
        .cache_lookups
        .with_label_values(&[part.as_str(), if hit { "hit" } else { "miss" }])
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind, Properties};
    use crate::time::Time;

    fn person(i: usize) -> PersonKey {
        PersonKey::User(format!("person-{i}"))
    }

    /// A profile that holds something on the heap.
    fn profile(i: usize) -> Profile {
        let mut profile = Profile::default();
        profile.apply(&Event {
            id: format!("e{i}"),
            person: person(i),
            linked: None,
            kind: EventKind::ProductView,
            time: Time(1_700_000_000_000),
            properties: Properties {
                product_id: Some(format!("p{i}")),
                category: Some("shoes".into()),
                ..Properties::default()
            },
            attributes: Default::default(),
        });
        profile
    }

    fn cache(budget: usize) -> (Cache, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        (Cache::new(budget, metrics.clone()), metrics)
    }

    #[test]
    fn shrinks_to_its_budget_in_bytes_and_counts_every_byte_it_frees() {
        let (mut cache, metrics) = cache(usize::MAX);
        for i in 0..100 {
            cache.insert_profile(&person(i), profile(i));
        }
        let all = cache.bytes();
        assert!(all > 100 * SLOT_BYTES, "the heap parts count too: {all}");
        assert_eq!(metrics.cache_bytes.get() as usize, all);
        assert_eq!(metrics.profiles.get(), 100);

        cache.budget = all / 4;
        cache.shrink();
        assert!(cache.bytes() <= all / 4, "{} > {}", cache.bytes(), all / 4);
        assert!(cache.len() >= 20 && cache.len() <= 25, "{}", cache.len());
        assert_eq!(metrics.cache_bytes.get() as usize, cache.bytes());
        assert_eq!(metrics.profiles.get() as usize, cache.len());
        assert_eq!(metrics.cache_evictions.get() as usize, 100 - cache.len());

        cache.clear();
        assert_eq!((cache.bytes(), cache.len()), (0, 0));
        assert_eq!((metrics.cache_bytes.get(), metrics.profiles.get()), (0, 0));
    }

    #[test]
    fn spares_the_people_used_since_the_hand_last_passed() {
        let (mut cache, _) = cache(usize::MAX);
        for i in 0..10 {
            cache.insert_profile(&person(i), profile(i));
        }
        // Every entry was just inserted, so marked: a first sweep clears every mark,
        // then takes the first one it finds again.
        let one = cache.bytes() / 10;
        cache.budget = cache.bytes() - one / 2;
        cache.shrink();
        assert_eq!(cache.len(), 9);
        assert!(cache.profile_cached(&person(0)).is_none());
        // Persons 5 and 9 are used again: shrinking to half keeps them.
        for i in [5, 9] {
            assert!(cache.profile(&person(i)).is_some());
        }
        cache.budget = cache.bytes() / 2;
        cache.shrink();
        assert!(cache.len() <= 5, "{}", cache.len());
        for i in [5, 9] {
            assert!(
                cache.profile_cached(&person(i)).is_some(),
                "{i} was used and evicted"
            );
        }
    }

    #[test]
    fn a_person_leaves_when_both_parts_are_taken() {
        let (mut cache, metrics) = cache(usize::MAX);
        let p = person(1);
        cache.insert_profile(&p, profile(1));
        cache.insert_state(&p, TriggerState::default());
        assert!(cache.take_profile(&p).is_some());
        assert_eq!((cache.len(), metrics.profiles.get()), (1, 0));
        assert!(cache.take_state(&p).is_some());
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
        assert_eq!(metrics.cache_bytes.get(), 0);
    }

    #[test]
    fn lookups_count_hits_and_misses_by_part() {
        let (mut cache, metrics) = cache(usize::MAX);
        let p = person(1);
        assert!(cache.profile(&p).is_none());
        cache.insert_profile(&p, profile(1));
        assert!(cache.profile(&p).is_some());
        assert!(cache.state(&p).is_none());
        let get = |part, result| {
            metrics
                .cache_lookups
                .with_label_values(&[part, result])
                .get()
        };
        assert_eq!(get("profile", "miss"), 1);
        assert_eq!(get("profile", "hit"), 1);
        assert_eq!(get("trigger_state", "miss"), 1);
    }
}
