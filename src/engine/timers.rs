//! A shard's index of pending timers: (due time, person) for the timers its people hold,
//! earliest first, counted in `nudge_timers_pending`.
//!
//! The store's timer keyspace holds every entry, sorted by due time, and is written by the
//! same group commit that changes a person's timers. Memory holds only the entries due up
//! to a horizon a few minutes ahead of the clock: the tick path loads the next range from
//! the store as time moves, a bounded number of keys per tick, so a restart reads no timer
//! before serving and memory does not grow with the number of timers pending. An entry
//! added during a group with a due time past what is loaded goes to the store only; the
//! load that reaches its time brings it in.
//!
//! - `loaded` is a position in the store's order: every entry of this shard's people at or
//!   before it is in memory, unless the group in progress took it out; memory holds
//!   nothing after it.
//! - The index is a hint: the person's trigger state is the truth. An entry whose timer is
//!   gone when it comes due finds nothing to fire and is dropped.
//! - Entries taken out during a group are kept aside until the commit, and put back if it
//!   fails (the store still has them); the shard says which ([`TimerIndex::committed`],
//!   [`TimerIndex::restore`]). A load during a group sees the group's own changes
//!   to the store's entries (not committed yet) on top of the store's; one that the group
//!   added and a load brought into memory stays there if the commit fails, as an entry
//!   added in memory does: a hint that finds no timer when it comes due.
//! - The pending count is the entries in memory plus those in the store past `loaded`: the
//!   store's count when the engine started (or resynced), then every change — an entry
//!   added, removed, fired or put back, wherever it is. Loading moves entries into memory
//!   and changes no count. It assumes, as the shard does, that an entry is added only when
//!   the person's state gains that timer.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::event::PersonKey;
use crate::metrics::Metrics;
use crate::store::{Store, TimerPosition, Write};
use crate::time::{Time, MINUTE_MS};

/// Memory holds the entries due up to this far ahead of the clock, and loads the next
/// range once it holds less: timers come due in memory, never while a load is pending.
const HORIZON_MS: i64 = 5 * MINUTE_MS;
/// A load reaches this far ahead, so it happens once per horizon rather than every tick.
const LOAD_AHEAD_MS: i64 = 2 * HORIZON_MS;
/// The most store entries one load looks at (every shard's, kept or not): a tick's share,
/// a few milliseconds; the next tick goes on from there.
const SCAN_PER_TICK: usize = 16_384;
/// The most entries memory holds; past it, loading waits until timers have fired (after
/// a long stop, every timer may be overdue at once).
const MAX_IN_MEMORY: usize = 65_536;

pub struct TimerIndex {
    due: BTreeSet<(Time, PersonKey)>,
    /// Everything of this shard's at or before this position is in `due` (or taken out by
    /// the group in progress).
    loaded: TimerPosition,
    /// Every shard's `loaded`, this one's included: whether an entry of another shard's
    /// person is in that shard's memory (a merge takes it out of the store).
    positions: Arc<[Mutex<TimerPosition>]>,
    shard: usize,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// The group's changes to this shard's store entries past `loaded` when made (`true`:
    /// added), in order, until its commit.
    pending: Vec<(Time, PersonKey, bool)>,
    /// The count the group changed for entries it added to the store only, or that its
    /// merges took out of another shard's store range: undone if its commit fails.
    uncommitted: i64,
    /// Entries of this shard's people that the group's merges took out, put back if its
    /// commit fails.
    forgotten: Vec<(Time, PersonKey)>,
    /// What this index added to the pending count since the engine counted the store.
    counted: i64,
}

impl TimerIndex {
    /// One index per shard, sharing where each has loaded to; nothing loaded yet.
    pub fn for_shards(count: usize, store: &Arc<Store>, metrics: &Arc<Metrics>) -> Vec<TimerIndex> {
        let positions: Arc<[Mutex<TimerPosition>]> = (0..count)
            .map(|_| Mutex::new(TimerPosition::Start))
            .collect();
        (0..count)
            .map(|shard| TimerIndex {
                due: BTreeSet::new(),
                loaded: TimerPosition::Start,
                positions: positions.clone(),
                shard,
                store: store.clone(),
                metrics: metrics.clone(),
                pending: Vec::new(),
                uncommitted: 0,
                forgotten: Vec::new(),
                counted: 0,
            })
            .collect()
    }

    fn count(&mut self, delta: i64) {
        self.metrics.timers_pending.add(delta);
        self.counted += delta;
    }

    fn position_of(&self, shard: usize) -> std::sync::MutexGuard<'_, TimerPosition> {
        self.positions[shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Counts an entry that is in the store (a rollback puts it back): into memory if it
    /// is in the range loaded, else the load that reaches it brings it. False if memory
    /// already had it.
    pub fn insert(&mut self, due: Time, person: PersonKey) -> bool {
        if self.loaded.covers(due, &person) && !self.due.insert((due, person)) {
            return false;
        }
        self.count(1);
        true
    }

    /// Indexes `person`'s timers due at `dues`, in the group's writes, and in memory if
    /// they fall in the range loaded.
    pub fn add(&mut self, person: &PersonKey, dues: &[Time], writes: &mut Vec<Write>) {
        for due in dues {
            writes.push(Write::TimerIndex(*due, person.clone(), true));
            if self.loaded.covers(*due, person) {
                if self.due.insert((*due, person.clone())) {
                    self.count(1);
                }
            } else {
                self.pending.push((*due, person.clone(), true));
                self.count(1);
                self.uncommitted += 1;
            }
        }
    }

    /// Removes `person`'s entries at `dues`; the ones removed are kept in `taken` to be
    /// put back if the commit fails.
    pub fn remove(
        &mut self,
        person: &PersonKey,
        dues: &[Time],
        writes: &mut Vec<Write>,
        taken: &mut Vec<(Time, PersonKey)>,
    ) {
        for due in dues {
            writes.push(Write::TimerIndex(*due, person.clone(), false));
            let entry = (*due, person.clone());
            if self.due.remove(&entry) {
                self.count(-1);
                taken.push(entry);
            } else if !self.loaded.covers(*due, person) {
                self.pending.push((*due, person.clone(), false));
                self.count(-1);
                taken.push(entry);
            }
            // Else it is in the range loaded but not in memory: this group fired it.
        }
    }

    /// Takes out the entries due at `now`, earliest first, at most `limit`, after loading
    /// the next range from the store if memory holds less than the horizon.
    pub fn pop_due(&mut self, now: Time, limit: usize) -> Vec<(Time, PersonKey)> {
        self.load(now);
        let mut due = Vec::new();
        while let Some(first) = self.due.first() {
            if first.0 > now || due.len() >= limit {
                break;
            }
            due.push(self.due.pop_first().expect("just seen"));
            self.count(-1);
        }
        due
    }

    /// The time through which every entry is loaded.
    fn loaded_through(&self) -> Option<Time> {
        match &self.loaded {
            TimerPosition::Start => None,
            TimerPosition::Due(t) => Some(*t),
            TimerPosition::Entry(t, _) => Some(t.plus_ms(-1)),
        }
    }

    /// Loads this shard's next entries from the store, up to `LOAD_AHEAD_MS` ahead of
    /// `now` and at most `SCAN_PER_TICK` looked at, when memory holds less than the
    /// horizon and has room. A failed read is retried at the next tick.
    fn load(&mut self, now: Time) {
        let horizon = now.plus_ms(HORIZON_MS);
        if self.loaded_through().is_some_and(|t| t >= horizon) || self.due.len() >= MAX_IN_MEMORY {
            return;
        }
        let (shard, shards) = (self.shard, self.positions.len());
        let scan = self.store.timers_after(
            &self.loaded,
            now.plus_ms(LOAD_AHEAD_MS),
            SCAN_PER_TICK,
            |person| super::shard_index(person, shards) == shard,
        );
        let scan = match scan {
            Ok(scan) => scan,
            Err(e) => {
                tracing::warn!(error = %e, shard, "loading timers from the store failed; retried at the next tick");
                return;
            }
        };
        self.due.extend(scan.entries);
        // The group's own changes in the range just loaded, which the store does not
        // have yet. An entry it added is in memory from now on, and counted there.
        for (due, person, added) in &self.pending {
            if !self.loaded.covers(*due, person) && scan.reached.covers(*due, person) {
                let entry = (*due, person.clone());
                if *added {
                    self.due.insert(entry);
                    self.uncommitted -= 1;
                } else {
                    self.due.remove(&entry);
                }
            }
        }
        self.loaded = scan.reached;
        *self.position_of(shard) = self.loaded.clone();
    }

    /// Drops `person`'s entry at `due`, which the same group removes from the store (a
    /// merge moves the visitor's timers to the user). `person` may be another shard's,
    /// paused while this one merges: its entry stays in that shard's memory if loaded
    /// there (to be dropped when it comes due) and is uncounted here if not.
    pub fn forget(&mut self, due: Time, person: &PersonKey) {
        let owner = super::shard_index(person, self.positions.len());
        if owner == self.shard {
            let entry = (due, person.clone());
            if self.due.remove(&entry) {
                self.count(-1);
                self.forgotten.push(entry);
            } else if !self.loaded.covers(due, person) {
                self.pending.push((due, person.clone(), false));
                self.count(-1);
                self.forgotten.push(entry);
            }
        } else if !self.position_of(owner).covers(due, person) {
            self.count(-1);
            self.uncommitted -= 1;
        }
    }

    /// The group's writes are in the store: what it changed stays.
    pub fn committed(&mut self) {
        self.pending.clear();
        self.forgotten.clear();
        self.uncommitted = 0;
    }

    /// Forgets memory after the store reopened: the index loads again from the start, and
    /// its share of the count goes (the engine counts the store again).
    pub fn reset(&mut self) {
        self.metrics.timers_pending.sub(self.counted);
        self.counted = 0;
        self.due.clear();
        self.loaded = TimerPosition::Start;
        *self.position_of(self.shard) = TimerPosition::Start;
        self.committed();
    }

    /// Puts back entries taken during a group whose commit failed, and uncounts what the
    /// group added to the store only: the store has the index as it was before the group.
    pub fn restore(&mut self, taken: Vec<(Time, PersonKey)>) {
        self.pending.clear();
        let uncommitted = std::mem::take(&mut self.uncommitted);
        self.count(-uncommitted);
        let forgotten = std::mem::take(&mut self.forgotten);
        for (due, person) in taken.into_iter().chain(forgotten) {
            self.insert(due, person);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SyncMode;

    fn person(id: &str) -> PersonKey {
        PersonKey::User(id.into())
    }

    /// A store with one shard's index over it, and the metrics it counts in.
    fn setup() -> (tempfile::TempDir, Arc<Store>, Arc<Metrics>, TimerIndex) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), SyncMode::Always).unwrap());
        let metrics = Arc::new(Metrics::new());
        let index = TimerIndex::for_shards(1, &store, &metrics).pop().unwrap();
        (dir, store, metrics, index)
    }

    /// Commits a group's writes and tells the index.
    fn commit(store: &Store, index: &mut TimerIndex, writes: Vec<Write>) {
        store.commit(writes).unwrap();
        index.committed();
    }

    #[test]
    fn due_entries_come_out_in_time_order_and_a_failed_commit_puts_them_back() {
        let (_dir, store, metrics, mut index) = setup();
        let mut writes = Vec::new();
        index.add(&person("b"), &[Time(30), Time(10)], &mut writes);
        index.add(&person("a"), &[Time(20)], &mut writes);
        assert_eq!(writes.len(), 3);
        assert_eq!(metrics.timers_pending.get(), 3);
        commit(&store, &mut index, writes);

        let due = index.pop_due(Time(20), 10);
        assert_eq!(due, vec![(Time(10), person("b")), (Time(20), person("a"))]);
        assert_eq!(metrics.timers_pending.get(), 1);
        assert_eq!(index.pop_due(Time(25), 10), vec![], "30 is not due at 25");

        index.restore(due);
        assert_eq!(metrics.timers_pending.get(), 3);
        assert_eq!(index.pop_due(Time(100), 2).len(), 2, "at most the limit");

        let mut taken = Vec::new();
        index.remove(&person("b"), &[Time(30)], &mut Vec::new(), &mut taken);
        assert_eq!(taken, vec![(Time(30), person("b"))]);
        assert_eq!(metrics.timers_pending.get(), 0);
    }

    #[test]
    fn only_entries_within_the_horizon_are_in_memory_and_later_ones_load_as_time_moves() {
        let (_dir, store, metrics, mut index) = setup();
        let now = Time(1_000_000_000);
        let soon = now.plus_ms(MINUTE_MS);
        let tomorrow = now.plus_ms(24 * 60 * MINUTE_MS);
        // Nothing is loaded before the first tick: both go to the store only.
        let mut writes = Vec::new();
        index.add(&person("a"), &[soon], &mut writes);
        index.add(&person("b"), &[tomorrow], &mut writes);
        commit(&store, &mut index, writes);
        assert!(index.due.is_empty());
        assert_eq!(metrics.timers_pending.get(), 2);

        assert_eq!(index.pop_due(now, 10), vec![]);
        assert_eq!(index.due.len(), 1, "only the entry within the horizon");
        assert_eq!(index.pop_due(soon, 10), vec![(soon, person("a"))]);

        // An entry added beyond the range loaded stays out of memory.
        let later = now.plus_ms(60 * MINUTE_MS);
        let mut writes = Vec::new();
        index.add(&person("c"), &[later], &mut writes);
        commit(&store, &mut index, writes);
        assert!(index.due.is_empty());
        assert_eq!(metrics.timers_pending.get(), 2);

        assert_eq!(index.pop_due(later, 10), vec![(later, person("c"))]);
        assert_eq!(index.pop_due(tomorrow, 10), vec![(tomorrow, person("b"))]);
        assert_eq!(metrics.timers_pending.get(), 0);
    }

    #[test]
    fn a_load_during_a_group_sees_the_groups_own_changes_and_a_failed_commit_undoes_them() {
        let (_dir, store, metrics, mut index) = setup();
        let now = Time(1_000_000_000);
        let later = now.plus_ms(30 * MINUTE_MS);
        let mut writes = Vec::new();
        index.add(&person("gone"), &[later], &mut writes);
        commit(&store, &mut index, writes);
        assert_eq!(index.pop_due(now, 10), vec![]);

        // One group: an entry added and one removed past the range loaded, then a tick
        // whose load reaches both, before the group commits.
        let mut writes = Vec::new();
        let mut taken = Vec::new();
        index.add(&person("new"), &[later], &mut writes);
        index.remove(&person("gone"), &[later], &mut writes, &mut taken);
        assert_eq!(metrics.timers_pending.get(), 1);
        let due = index.pop_due(later, 10);
        assert_eq!(
            due,
            vec![(later, person("new"))],
            "the group's view, not the store's"
        );
        assert_eq!(metrics.timers_pending.get(), 0);

        // The commit fails: the store still has "gone" (it must fire), never had "new"
        // (back in memory as a hint, as a fired entry is put back, counted while there).
        taken.extend(due);
        index.restore(taken);
        assert_eq!(metrics.timers_pending.get(), index.due.len() as i64);
        let again = index.pop_due(later, 10);
        assert!(again.contains(&(later, person("gone"))), "{again:?}");
        assert_eq!(metrics.timers_pending.get(), 0);
        // Nothing else comes from the store later.
        assert_eq!(index.pop_due(later.plus_ms(LOAD_AHEAD_MS), 10), vec![]);
        assert_eq!(metrics.timers_pending.get(), 0);
    }

    #[test]
    fn a_removal_past_the_range_loaded_is_put_back_when_the_commit_fails() {
        let (_dir, store, metrics, mut index) = setup();
        let now = Time(1_000_000_000);
        let later = now.plus_ms(60 * MINUTE_MS);
        let mut writes = Vec::new();
        index.add(&person("a"), &[later], &mut writes);
        commit(&store, &mut index, writes);
        assert_eq!(index.pop_due(now, 10), vec![]);

        let mut taken = Vec::new();
        index.remove(&person("a"), &[later], &mut Vec::new(), &mut taken);
        assert_eq!(metrics.timers_pending.get(), 0);
        index.restore(taken);
        assert_eq!(metrics.timers_pending.get(), 1);
        assert_eq!(index.pop_due(later, 10), vec![(later, person("a"))]);
    }

    #[test]
    fn a_backlog_loads_a_bounded_range_per_tick_and_fires_in_time_order() {
        let (_dir, store, metrics, mut index) = setup();
        let now = Time(1_000_000_000);
        let n = SCAN_PER_TICK + 100;
        let mut writes = Vec::new();
        for i in 0..n {
            // Overdue, all of them: the store was stopped for a while.
            let due = now.plus_ms(-(n as i64) + i as i64);
            index.add(&person(&format!("p{i:06}")), &[due], &mut writes);
        }
        commit(&store, &mut index, writes);
        assert_eq!(metrics.timers_pending.get(), n as i64);
        let first = index.pop_due(now, n);
        assert_eq!(first.len(), SCAN_PER_TICK, "one tick's share");
        assert!(first.windows(2).all(|w| w[0] < w[1]));
        let rest = index.pop_due(now, n);
        assert_eq!(rest.len(), 100);
        assert!(first.last() < rest.first());
        assert_eq!(metrics.timers_pending.get(), 0);
    }

    #[test]
    fn a_merge_uncounts_another_shards_entry_only_when_that_shard_has_not_loaded_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), SyncMode::Always).unwrap());
        let metrics = Arc::new(Metrics::new());
        let mut indexes = TimerIndex::for_shards(2, &store, &metrics);
        let visitor = (0..)
            .map(|i| PersonKey::Anonymous(format!("v{i}")))
            .find(|p| super::super::shard_index(p, 2) == 1)
            .unwrap();
        let now = Time(1_000_000_000);
        let soon = [now.plus_ms(MINUTE_MS), now.plus_ms(2 * MINUTE_MS)];
        let later = now.plus_ms(60 * MINUTE_MS);
        let dues = [soon[0], soon[1], later];
        let mut writes = Vec::new();
        indexes[1].add(&visitor, &dues, &mut writes);
        commit(&store, &mut indexes[1], writes);
        assert_eq!(indexes[1].pop_due(now, 10), vec![]);
        assert_eq!(
            indexes[1].due.len(),
            2,
            "the two soon are loaded, later is not"
        );

        // Shard 0 merges the visitor away (shard 1 is paused meanwhile), removing all
        // three from the store.
        let mut writes = Vec::new();
        for due in dues {
            indexes[0].forget(due, &visitor);
            writes.push(Write::TimerIndex(due, visitor.clone(), false));
        }
        assert_eq!(
            metrics.timers_pending.get(),
            2,
            "the two soon, still in shard 1's memory"
        );
        commit(&store, &mut indexes[0], writes);
        // Shard 1 drops them when they come due (the shard finds no timer for them), and
        // never loads the other.
        assert_eq!(indexes[1].pop_due(soon[1], 10).len(), 2);
        assert_eq!(indexes[1].pop_due(later, 10), vec![]);
        assert_eq!(metrics.timers_pending.get(), 0);
    }
}
