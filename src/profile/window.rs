//! Bounded-memory time windows: per-day values over a fixed horizon, stored sparsely.
//!
//! A person who visits on 5 days of the last 90 costs 5 entries, and no person ever costs
//! more than `DAYS` entries, however many events they send. Windows are whole calendar days
//! (UTC): "the last 7 days" are today and the 6 days before it.

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::heap::{self, HeapSize};

/// A value that can be summed over days.
pub trait DayValue: Default + Copy {
    fn accumulate(&mut self, other: &Self);
}

impl DayValue for u32 {
    fn accumulate(&mut self, other: &Self) {
        *self = self.saturating_add(*other);
    }
}

/// Per-day values for the `DAYS` most recent days that had any, oldest first.
///
/// One day is held inline: most people in memory on a day were seen on that day only, and
/// for them a series costs no allocation (a product's or a category's is then the size of
/// an empty `Vec`). Stored exactly as a `Vec` is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DailySeries<V, const DAYS: i32> {
    days: SmallVec<[(i32, V); 1]>,
}

impl<V, const DAYS: i32> HeapSize for DailySeries<V, DAYS> {
    fn heap_bytes(&self) -> usize {
        if self.days.spilled() {
            heap::buffer::<(i32, V)>(self.days.capacity())
        } else {
            0
        }
    }
}

impl<V: DayValue, const DAYS: i32> DailySeries<V, DAYS> {
    /// Gives back the spare capacity growth left (see [`super::Profile::shrink_to_fit`]).
    pub fn shrink_to_fit(&mut self) {
        self.days.shrink_to_fit();
    }

    /// Updates the value of `day`. A day more than `DAYS` before the newest day held is
    /// outside every window this series answers, so it is dropped and `false` returned.
    pub fn update(&mut self, day: i32, f: impl FnOnce(&mut V)) -> bool {
        let newest = self.days.last().map_or(day, |&(d, _)| d.max(day));
        if day <= newest - DAYS {
            return false;
        }
        let at = match self.days.binary_search_by_key(&day, |&(d, _)| d) {
            Ok(at) => at,
            Err(at) => {
                self.days.insert(at, (day, V::default()));
                at
            }
        };
        f(&mut self.days[at].1);
        let expired = self.days.partition_point(|&(d, _)| d <= newest - DAYS);
        self.days.drain(..expired);
        true
    }

    /// Adds every day of `other` into this series (days outside the horizon are dropped).
    pub fn merge(&mut self, other: &DailySeries<V, DAYS>) {
        for (day, value) in &other.days {
            self.update(*day, |v| v.accumulate(value));
        }
    }

    /// The sum over the days `first..=last`.
    pub fn sum(&self, first: i32, last: i32) -> V {
        let mut total = V::default();
        let start = self.days.partition_point(|&(d, _)| d < first);
        for (_, v) in self.days[start..].iter().take_while(|&&(d, _)| d <= last) {
            total.accumulate(v);
        }
        total
    }

    /// The sum over the `n` days ending with `today`, today included.
    pub fn last_days(&self, today: i32, n: i32) -> V {
        self.sum(today - n + 1, today)
    }

    /// The days held and their values, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (i32, V)> + '_ {
        self.days.iter().copied()
    }

    /// The newest day held, if any.
    pub fn newest_day(&self) -> Option<i32> {
        self.days.last().map(|&(d, _)| d)
    }

    pub fn len(&self) -> usize {
        self.days.len()
    }

    pub fn is_empty(&self) -> bool {
        self.days.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_whole_days_and_stays_bounded() {
        let mut s: DailySeries<u32, 30> = DailySeries::default();
        for day in 0..100 {
            assert!(s.update(day, |v| *v += 1));
        }
        assert_eq!(s.len(), 30, "only the horizon is kept");
        assert_eq!(s.last_days(99, 7), 7);
        assert_eq!(s.last_days(99, 30), 30);
        assert_eq!(
            s.last_days(105, 7),
            1,
            "windows follow `today`, not the data"
        );
        // A late day inside the horizon lands in its own bucket …
        assert!(s.update(80, |v| *v += 10));
        assert_eq!(s.sum(80, 80), 11);
        // … and one outside it is refused.
        assert!(!s.update(69, |v| *v += 10));
        assert_eq!(s.sum(0, 200), 40);
    }

    #[test]
    fn sparse_days_cost_one_entry_each() {
        let mut s: DailySeries<u32, 90> = DailySeries::default();
        s.update(10, |v| *v += 2);
        s.update(50, |v| *v += 3);
        s.update(10, |v| *v += 1);
        assert_eq!(s.len(), 2);
        assert_eq!(s.sum(0, 49), 3);
        // Day 99 pushes day 10 out of the 90-day horizon.
        s.update(100, |v| *v += 1);
        assert_eq!(s.len(), 2);
        assert_eq!(s.newest_day(), Some(100));
    }

    #[test]
    fn one_day_is_held_inline_and_the_encoding_is_a_vecs() {
        let mut s: DailySeries<u32, 30> = DailySeries::default();
        s.update(7, |v| *v += 3);
        assert_eq!(s.heap_bytes(), 0, "one day costs no allocation");
        let as_vec = |s: &DailySeries<u32, 30>| {
            postcard::to_allocvec(&s.iter().collect::<Vec<_>>()).unwrap()
        };
        assert_eq!(postcard::to_allocvec(&s).unwrap(), as_vec(&s));
        s.update(8, |v| *v += 1);
        assert!(s.heap_bytes() > 0, "two days spill to the heap");
        let bytes = postcard::to_allocvec(&s).unwrap();
        assert_eq!(bytes, as_vec(&s), "stored exactly as the Vec it replaced");
        assert_eq!(
            postcard::from_bytes::<DailySeries<u32, 30>>(&bytes).unwrap(),
            s
        );
        // Back to one day (the older expired): shrinking brings it back inline.
        s.update(40, |v| *v += 1);
        assert_eq!(s.len(), 1);
        s.shrink_to_fit();
        assert_eq!(s.heap_bytes(), 0);
    }
}
