//! A shard's index of pending timers: (due time, person) for every timer its people hold,
//! earliest first, mirrored in the store's timer keyspace by the same group commit and
//! counted in `nudge_timers_pending`.
//!
//! The index is a hint: the person's trigger state is the truth. An entry whose timer is
//! gone when it comes due finds nothing to fire and is dropped. Entries taken out during a
//! group are kept aside until the commit, and put back if it fails (the store still has
//! them).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::event::PersonKey;
use crate::metrics::Metrics;
use crate::store::Write;
use crate::time::Time;

pub struct TimerIndex {
    due: BTreeSet<(Time, PersonKey)>,
    metrics: Arc<Metrics>,
}

impl TimerIndex {
    pub fn new(metrics: Arc<Metrics>) -> TimerIndex {
        TimerIndex {
            due: BTreeSet::new(),
            metrics,
        }
    }

    /// Adds an entry (recovery, or a rollback); true if it was not there.
    pub fn insert(&mut self, due: Time, person: PersonKey) -> bool {
        let added = self.due.insert((due, person));
        if added {
            self.metrics.timers_pending.inc();
        }
        added
    }

    /// Indexes `person`'s timers due at `dues`, in memory and in the group's writes.
    pub fn add(&mut self, person: &PersonKey, dues: &[Time], writes: &mut Vec<Write>) {
        for due in dues {
            self.insert(*due, person.clone());
            writes.push(Write::TimerIndex(*due, person.clone(), true));
        }
    }

    /// Removes `person`'s entries at `dues`; the ones removed from memory are kept in
    /// `taken` to be put back if the commit fails.
    pub fn remove(
        &mut self,
        person: &PersonKey,
        dues: &[Time],
        writes: &mut Vec<Write>,
        taken: &mut Vec<(Time, PersonKey)>,
    ) {
        for due in dues {
            let entry = (*due, person.clone());
            if self.due.remove(&entry) {
                self.metrics.timers_pending.dec();
                taken.push(entry);
            }
            writes.push(Write::TimerIndex(*due, person.clone(), false));
        }
    }

    /// Takes out the entries due at `now`, earliest first, at most `limit`.
    pub fn pop_due(&mut self, now: Time, limit: usize) -> Vec<(Time, PersonKey)> {
        let mut due = Vec::new();
        while let Some(first) = self.due.first() {
            if first.0 > now || due.len() >= limit {
                break;
            }
            due.push(self.due.pop_first().expect("just seen"));
            self.metrics.timers_pending.dec();
        }
        due
    }

    /// Drops `person`'s entry at `due` from memory only (its store entry goes in the same
    /// group by other means).
    pub fn forget(&mut self, due: Time, person: &PersonKey) {
        if self.due.remove(&(due, person.clone())) {
            self.metrics.timers_pending.dec();
        }
    }

    /// Replaces the whole index with `entries` (the store's, after it reopened).
    pub fn replace(&mut self, entries: Vec<(Time, PersonKey)>) {
        self.metrics.timers_pending.sub(self.due.len() as i64);
        self.due.clear();
        for (due, person) in entries {
            self.insert(due, person);
        }
    }

    /// Puts back entries taken during a group whose commit failed.
    pub fn restore(&mut self, taken: Vec<(Time, PersonKey)>) {
        for (due, person) in taken {
            self.insert(due, person);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(id: &str) -> PersonKey {
        PersonKey::User(id.into())
    }

    #[test]
    fn due_entries_come_out_in_time_order_and_a_failed_commit_puts_them_back() {
        let metrics = Arc::new(Metrics::new());
        let mut index = TimerIndex::new(metrics.clone());
        let mut writes = Vec::new();
        index.add(&person("b"), &[Time(30), Time(10)], &mut writes);
        index.add(&person("a"), &[Time(20)], &mut writes);
        assert_eq!(writes.len(), 3);
        assert_eq!(metrics.timers_pending.get(), 3);

        let due = index.pop_due(Time(20), 10);
        assert_eq!(due, vec![(Time(10), person("b")), (Time(20), person("a"))]);
        assert_eq!(metrics.timers_pending.get(), 1);
        assert_eq!(index.pop_due(Time(25), 10), vec![], "30 is not due at 25");

        index.restore(due);
        assert_eq!(metrics.timers_pending.get(), 3);
        assert_eq!(index.pop_due(Time(100), 2).len(), 2, "at most the limit");

        let mut taken = Vec::new();
        index.remove(&person("b"), &[Time(30)], &mut writes, &mut taken);
        assert_eq!(taken, vec![(Time(30), person("b"))]);
        assert_eq!(metrics.timers_pending.get(), 0);
    }
}
