//! Sessions: runs of browsing events with no gap of [`SESSION_TIMEOUT_MS`] or more. A
//! profile keeps the sessions of its last 31 days, ordered and never overlapping, so a late
//! event lands in the session it belongs to and two profiles merge without counting a
//! visit twice.

use serde::{Deserialize, Serialize};

use crate::heap::{self, HeapSize};
use crate::time::{Time, DAY_MS, MINUTE_MS};

/// Inactivity that ends a session.
pub const SESSION_TIMEOUT_MS: i64 = 30 * MINUTE_MS;
/// The longest gap between a product view and the next event that counts as time on the
/// product page, when the client sent no dwell time.
pub const PRODUCT_GAP_CAP_MS: i64 = 10 * MINUTE_MS;
/// Distinct products remembered for the latest session; its count saturates here.
pub const MAX_SESSION_PRODUCTS: usize = 256;
/// Sessions kept: those that ended in the last 31 days, at most this many.
pub const MAX_SESSIONS: usize = 200;
/// How long sessions are kept, from the newest one.
pub const SESSION_HISTORY_MS: i64 = 31 * DAY_MS;

/// One session's counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub start: Time,
    pub last: Time,
    pub page_views: u32,
    pub product_views: u32,
    pub distinct_products: u32,
    /// Hashes of the distinct products, sorted; kept for the latest session only.
    pub products: Vec<u64>,
    /// Time on product pages counted so far.
    pub product_time_ms: i64,
    /// A product view without a dwell time, waiting for the next event to measure it.
    pub open_product_view: Option<Time>,
    pub searches: u32,
    pub cart_adds: u32,
}

impl Session {
    pub fn new(start: Time) -> Session {
        Session {
            start,
            last: start,
            ..Session::default()
        }
    }

    /// Whether the session is still open at `now`.
    pub fn is_open(&self, now: Time) -> bool {
        now.since(self.last) < SESSION_TIMEOUT_MS
    }

    /// Time on product pages as of `now`: what was measured, plus the open product view's
    /// time so far (capped like any gap).
    pub fn product_time_ms(&self, now: Time) -> i64 {
        let open = self
            .open_product_view
            .map_or(0, |t| now.since(t).clamp(0, PRODUCT_GAP_CAP_MS));
        self.product_time_ms.saturating_add(open)
    }

    /// Whether an event at `t` belongs to this session.
    fn reaches(&self, t: Time) -> bool {
        t.since(self.last) < SESSION_TIMEOUT_MS && self.start.since(t) < SESSION_TIMEOUT_MS
    }

    /// Whether two sessions are one visit (they overlap or the gap is under the timeout).
    fn touches(&self, other: &Session) -> bool {
        other.start.since(self.last) < SESSION_TIMEOUT_MS
            && self.start.since(other.last) < SESSION_TIMEOUT_MS
    }

    /// Takes in a browsing event at `t`: moves the session's bounds, and closes the open
    /// product view when the event is the newest.
    pub(crate) fn extend(&mut self, t: Time) {
        if t >= self.last {
            if let Some(viewed) = self.open_product_view.take() {
                let gap = t.since(viewed).clamp(0, PRODUCT_GAP_CAP_MS);
                self.product_time_ms = self.product_time_ms.saturating_add(gap);
            }
            self.last = t;
        }
        self.start = self.start.min(t);
    }

    pub(crate) fn view_product(&mut self, hash: u64) {
        self.product_views = self.product_views.saturating_add(1);
        match self.products.binary_search(&hash) {
            Ok(_) => {}
            Err(at) if self.products.len() < MAX_SESSION_PRODUCTS => {
                self.products.insert(at, hash);
                self.distinct_products = self.products.len() as u32;
            }
            // Over the cap, or an older session whose list was dropped: the count can only
            // be estimated, so it stays.
            Err(_) => {}
        }
    }

    /// Folds another part of the same visit into this one.
    fn absorb(&mut self, other: Session) {
        let other_is_later = other.last > self.last;
        self.start = self.start.min(other.start);
        // Saturating: merging many identities of one person must not wrap a counter.
        self.page_views = self.page_views.saturating_add(other.page_views);
        self.product_views = self.product_views.saturating_add(other.product_views);
        self.product_time_ms = self.product_time_ms.saturating_add(other.product_time_ms);
        self.searches = self.searches.saturating_add(other.searches);
        self.cart_adds = self.cart_adds.saturating_add(other.cart_adds);
        let complete = |s: &Session| s.products.len() as u32 == s.distinct_products;
        if !complete(self) || !complete(&other) {
            // An older part whose list was dropped: the count can only be estimated.
            self.distinct_products = self
                .distinct_products
                .saturating_add(other.distinct_products);
            self.products.clear();
        } else {
            for hash in other.products {
                if let Err(at) = self.products.binary_search(&hash) {
                    if self.products.len() < MAX_SESSION_PRODUCTS {
                        self.products.insert(at, hash);
                    }
                }
            }
            self.distinct_products = self.products.len() as u32;
        }
        if other_is_later {
            self.last = other.last;
            self.open_product_view = other.open_product_view;
        }
    }
}

/// A person's sessions of the last 31 days, by start time, none touching another.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sessions {
    list: Vec<Session>,
}

impl HeapSize for Sessions {
    fn heap_bytes(&self) -> usize {
        heap::buffer::<Session>(self.list.capacity())
            + self
                .list
                .iter()
                .map(|s| heap::buffer::<u64>(s.products.capacity()))
                .sum::<usize>()
    }
}

impl Sessions {
    /// Gives back the spare capacity growth left (see [`super::Profile::shrink_to_fit`]).
    pub(crate) fn shrink_to_fit(&mut self) {
        self.list.shrink_to_fit();
        for s in &mut self.list {
            s.products.shrink_to_fit();
        }
    }

    /// The session a browsing event at `t` belongs to, opening one if none reaches it; two
    /// sessions the event bridges become one.
    pub(crate) fn visit(&mut self, t: Time) -> &mut Session {
        // The sessions an event reaches are contiguous in time order.
        let first = self
            .list
            .partition_point(|s| t.since(s.last) >= SESSION_TIMEOUT_MS);
        let reached = self.list[first..]
            .iter()
            .take_while(|s| s.reaches(t))
            .count();
        let at = match reached {
            0 => {
                self.list.insert(first, Session::new(t));
                self.prune(first)
            }
            _ => {
                let later: Vec<Session> = self.list.drain(first + 1..first + reached).collect();
                for s in later {
                    self.list[first].absorb(s);
                }
                first
            }
        };
        self.list[at].extend(t);
        self.drop_old_product_lists();
        &mut self.list[at]
    }

    /// Only the latest session needs its list of products.
    fn drop_old_product_lists(&mut self) {
        let latest = self.list.len().saturating_sub(1);
        for s in &mut self.list[..latest] {
            if !s.products.is_empty() {
                s.products = Vec::new();
            }
        }
    }

    /// Inserts a session, folding in every session it touches. Returns its position.
    pub(crate) fn insert(&mut self, mut session: Session) -> usize {
        // The sessions touching it are contiguous in start order.
        let first = self
            .list
            .partition_point(|s| !s.touches(&session) && s.start < session.start);
        let mut end = first;
        while end < self.list.len() && self.list[end].touches(&session) {
            end += 1;
        }
        let touching: Vec<Session> = self.list.drain(first..end).collect();
        for s in touching {
            session.absorb(s);
        }
        self.list.insert(first, session);
        let at = self.prune(first);
        self.drop_old_product_lists();
        at
    }

    /// Drops sessions beyond the history; returns where the session at `at` went.
    fn prune(&mut self, at: usize) -> usize {
        let newest = self.list.last().map_or(Time(0), |s| s.last);
        let expired = self
            .list
            .partition_point(|s| newest.since(s.last) > SESSION_HISTORY_MS)
            .max(self.list.len().saturating_sub(MAX_SESSIONS));
        // Never drop the session being written to: a late event for a day past the history
        // is still kept until the next event.
        let expired = expired.min(at);
        self.list.drain(..expired);
        at - expired
    }

    pub fn latest(&self) -> Option<&Session> {
        self.list.last()
    }

    /// The session before the latest.
    pub fn previous(&self) -> Option<&Session> {
        self.list.len().checked_sub(2).map(|i| &self.list[i])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Session> {
        self.list.iter()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Merges another person's sessions in (identity stitching): parts of the same visit
    /// become one session.
    pub(crate) fn merge(&mut self, other: Sessions) {
        for s in other.list {
            self.insert(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Time = Time(1_772_445_600_000);

    fn at(minutes: i64) -> Time {
        T.plus_ms(minutes * MINUTE_MS)
    }

    fn starts(s: &Sessions) -> Vec<(i64, i64)> {
        s.iter()
            .map(|s| (s.start.since(T) / MINUTE_MS, s.last.since(T) / MINUTE_MS))
            .collect()
    }

    #[test]
    fn events_in_any_order_give_the_same_sessions() {
        let times = [0, 10, 20, 100, 110, 300];
        let mut forward = Sessions::default();
        times.iter().for_each(|&m| {
            forward.visit(at(m)).page_views += 1;
        });
        let mut backward = Sessions::default();
        times.iter().rev().for_each(|&m| {
            backward.visit(at(m)).page_views += 1;
        });
        assert_eq!(starts(&forward), [(0, 20), (100, 110), (300, 300)]);
        assert_eq!(starts(&forward), starts(&backward));
        let pages = |s: &Sessions| s.iter().map(|s| s.page_views).collect::<Vec<_>>();
        assert_eq!(pages(&forward), [3, 2, 1]);
        assert_eq!(pages(&backward), [3, 2, 1]);
    }

    #[test]
    fn a_late_event_bridging_two_sessions_joins_them() {
        let mut s = Sessions::default();
        s.visit(at(0)).page_views += 1;
        s.visit(at(50)).page_views += 1;
        assert_eq!(s.len(), 2);
        s.visit(at(25)).page_views += 1;
        assert_eq!(starts(&s), [(0, 50)]);
        assert_eq!(s.latest().unwrap().page_views, 3);
    }

    #[test]
    fn merging_overlapping_visits_counts_them_once() {
        let mut anonymous = Sessions::default();
        anonymous.visit(at(0)).page_views += 2;
        anonymous.visit(at(500)).page_views += 1;
        let mut known = Sessions::default();
        known.visit(at(10)).page_views += 1;
        known.visit(at(1000)).page_views += 1;
        known.merge(anonymous);
        assert_eq!(starts(&known), [(0, 10), (500, 500), (1000, 1000)]);
        assert_eq!(known.iter().map(|s| s.page_views).sum::<u32>(), 5);
    }

    #[test]
    fn history_is_bounded() {
        let mut s = Sessions::default();
        for day in 0..100 {
            s.visit(T.plus_ms(day * DAY_MS));
        }
        assert_eq!(s.len(), 32);
        for i in 0..500 {
            s.visit(T.plus_ms(100 * DAY_MS + i * 31 * MINUTE_MS));
        }
        assert_eq!(s.len(), MAX_SESSIONS);
    }
}
