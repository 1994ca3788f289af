//! A person's live behavioral state, updated by one event at a time.
//!
//! `Profile::apply` is pure and deterministic: the same events in the same order give the
//! same profile, in the server and in the trainer's replay. Memory per person is bounded:
//! windows are sparse per-day buckets ([`window`]), and the lists a profile holds (session
//! products, cart lines, categories) have fixed caps.
//!
//! Order: events are expected roughly in time order. An event older than the open session
//! (a late event) still updates the per-day counters of its own day, but not the session or
//! the cart, which describe the person's latest state.

pub mod window;

use serde::{Deserialize, Serialize};

use crate::event::{fnv1a, Event, EventKind};
use crate::time::{Time, MINUTE_MS};
use window::{DailySeries, DayValue};

/// Inactivity that ends a session.
pub const SESSION_TIMEOUT_MS: i64 = 30 * MINUTE_MS;
/// The longest gap between a product view and the next event that counts as time on the
/// product page, when the client sent no dwell time.
pub const PRODUCT_GAP_CAP_MS: i64 = 10 * MINUTE_MS;
/// Distinct products remembered per session; the count saturates here.
pub const MAX_SESSION_PRODUCTS: usize = 256;
/// Cart lines kept; additions of further products are ignored.
pub const MAX_CART_LINES: usize = 100;
/// Categories remembered; the least recently viewed one makes room for a new one.
pub const MAX_CATEGORIES: usize = 16;
/// Days of per-day history kept (the longest window any feature uses).
pub const HISTORY_DAYS: i32 = 90;
/// Days of per-category history kept.
pub const CATEGORY_DAYS: i32 = 30;

/// Everything Nudge knows about one person.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Time of the earliest and latest event of any kind.
    pub(crate) first_seen: Option<Time>,
    pub(crate) last_seen: Option<Time>,
    /// Time of the latest browsing event (anything but email).
    pub(crate) last_visit: Option<Time>,
    /// The latest session; it is open while `now` is within the timeout of its last event.
    pub(crate) session: Option<Session>,
    /// End of the session before `session`.
    pub(crate) previous_session_end: Option<Time>,
    pub(crate) cart: Cart,
    pub(crate) days: DailySeries<DayStats, HISTORY_DAYS>,
    pub(crate) categories: Vec<CategoryViews>,
    pub(crate) lifetime_purchases: u32,
    pub(crate) lifetime_revenue: f64,
    pub(crate) last_purchase: Option<Time>,
}

/// Counters for one calendar day.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DayStats {
    /// Sessions that started this day.
    pub sessions: u32,
    /// Of those, the ones that have ended, their pages, and how many had at most one page.
    pub ended_sessions: u32,
    pub ended_session_pages: u32,
    pub bounced_sessions: u32,
    pub page_views: u32,
    pub product_views: u32,
    pub searches: u32,
    pub cart_adds: u32,
    pub purchases: u32,
    pub revenue: f64,
    pub email_opens: u32,
    pub email_clicks: u32,
}

impl DayValue for DayStats {
    fn accumulate(&mut self, o: &Self) {
        let add = |a: &mut u32, b: u32| *a = a.saturating_add(b);
        add(&mut self.sessions, o.sessions);
        add(&mut self.ended_sessions, o.ended_sessions);
        add(&mut self.ended_session_pages, o.ended_session_pages);
        add(&mut self.bounced_sessions, o.bounced_sessions);
        add(&mut self.page_views, o.page_views);
        add(&mut self.product_views, o.product_views);
        add(&mut self.searches, o.searches);
        add(&mut self.cart_adds, o.cart_adds);
        add(&mut self.purchases, o.purchases);
        self.revenue += o.revenue;
        add(&mut self.email_opens, o.email_opens);
        add(&mut self.email_clicks, o.email_clicks);
    }
}

/// A run of browsing events with no gap of [`SESSION_TIMEOUT_MS`] or more.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub start: Time,
    pub last: Time,
    pub page_views: u32,
    pub product_views: u32,
    /// Hashes of the distinct products viewed, sorted; at most [`MAX_SESSION_PRODUCTS`].
    pub products: Vec<u64>,
    /// Time on product pages counted so far.
    pub product_time_ms: i64,
    /// A product view without a dwell time, waiting for the next event to measure it.
    pub open_product_view: Option<Time>,
    pub searches: u32,
    pub cart_adds: u32,
}

impl Session {
    fn new(start: Time) -> Session {
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
        self.product_time_ms + open
    }

    /// Closes the open product view at `t`, counting the gap up to the cap.
    fn close_product_view(&mut self, t: Time) {
        if let Some(viewed) = self.open_product_view.take() {
            self.product_time_ms += t.since(viewed).clamp(0, PRODUCT_GAP_CAP_MS);
        }
    }
}

/// The person's cart, as of their latest cart event.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cart {
    pub lines: Vec<CartLine>,
    pub last_add: Option<Time>,
    /// Whether checkout started after the latest addition.
    pub checkout_started: bool,
    /// Time of the latest event that changed the cart; older cart events are late.
    pub last_change: Option<Time>,
}

/// One product in the cart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CartLine {
    pub product_id: String,
    pub quantity: u32,
    pub price: f64,
}

impl Cart {
    pub fn items(&self) -> u32 {
        self.lines
            .iter()
            .map(|l| l.quantity)
            .fold(0, u32::saturating_add)
    }

    pub fn value(&self) -> f64 {
        self.lines
            .iter()
            .map(|l| f64::from(l.quantity) * l.price)
            .sum()
    }

    /// Whether an event at `t` is at least as new as the cart's state.
    fn is_current(&self, t: Time) -> bool {
        self.last_change.is_none_or(|last| t >= last)
    }

    fn add(&mut self, t: Time, product_id: &str, quantity: u32, price: Option<f64>) {
        if let Some(line) = self.lines.iter_mut().find(|l| l.product_id == product_id) {
            line.quantity = line.quantity.saturating_add(quantity);
            if let Some(price) = price {
                line.price = price;
            }
        } else if self.lines.len() < MAX_CART_LINES {
            self.lines.push(CartLine {
                product_id: product_id.to_owned(),
                quantity,
                price: price.unwrap_or(0.0),
            });
        }
        self.last_add = Some(t);
        self.checkout_started = false;
        self.last_change = Some(t);
    }

    /// Removes `quantity` units of a product, or the whole line when `quantity` is `None`.
    fn remove(&mut self, t: Time, product_id: &str, quantity: Option<u32>) {
        if let Some(at) = self.lines.iter().position(|l| l.product_id == product_id) {
            let line = &mut self.lines[at];
            line.quantity = quantity.map_or(0, |q| line.quantity.saturating_sub(q));
            if line.quantity == 0 {
                self.lines.remove(at);
            }
        }
        self.last_change = Some(t);
    }

    fn clear(&mut self, t: Time) {
        self.lines.clear();
        self.checkout_started = false;
        self.last_change = Some(t);
    }
}

/// Product views in one category, per day.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CategoryViews {
    pub name: String,
    pub views: DailySeries<u32, CATEGORY_DAYS>,
}

impl Profile {
    /// Applies one validated event.
    pub fn apply(&mut self, event: &Event) {
        let t = event.time;
        self.first_seen = Some(self.first_seen.map_or(t, |f| f.min(t)));
        self.last_seen = Some(self.last_seen.map_or(t, |l| l.max(t)));
        let in_session = event.kind.is_visit() && self.visit(t);
        let day = t.day();
        let props = &event.properties;
        let session = self.session.as_mut().filter(|_| in_session);

        match event.kind {
            EventKind::PageView => {
                self.days.update(day, |d| d.page_views += 1);
                if let Some(s) = session {
                    s.page_views += 1;
                }
            }
            EventKind::ProductView => {
                self.days.update(day, |d| {
                    d.page_views += 1;
                    d.product_views += 1;
                });
                if let Some(s) = session {
                    s.page_views += 1;
                    s.product_views += 1;
                    let product = props.product_id.as_deref().unwrap_or_default();
                    let hash = fnv1a(product.bytes());
                    if let Err(at) = s.products.binary_search(&hash) {
                        if s.products.len() < MAX_SESSION_PRODUCTS {
                            s.products.insert(at, hash);
                        }
                    }
                    match props.dwell_seconds {
                        Some(dwell) => s.product_time_ms += (dwell * 1000.0) as i64,
                        None => s.open_product_view = Some(t),
                    }
                }
                if let Some(category) = props.category.as_deref().filter(|c| !c.is_empty()) {
                    self.view_category(category, day);
                }
            }
            EventKind::Search => {
                self.days.update(day, |d| d.searches += 1);
                if let Some(s) = session {
                    s.searches += 1;
                }
            }
            EventKind::AddToCart => {
                self.days.update(day, |d| d.cart_adds += 1);
                if let Some(s) = session {
                    s.cart_adds += 1;
                }
                if self.cart.is_current(t) {
                    let product = props.product_id.as_deref().unwrap_or_default();
                    self.cart
                        .add(t, product, props.quantity.unwrap_or(1), props.price);
                }
            }
            EventKind::RemoveFromCart => {
                if self.cart.is_current(t) {
                    let product = props.product_id.as_deref().unwrap_or_default();
                    self.cart.remove(t, product, props.quantity);
                }
            }
            EventKind::CheckoutStarted => {
                if self.cart.is_current(t) {
                    self.cart.checkout_started = true;
                    self.cart.last_change = Some(t);
                }
            }
            EventKind::Purchase => {
                let value = props.order_value.unwrap_or(0.0);
                self.days.update(day, |d| {
                    d.purchases += 1;
                    d.revenue += value;
                });
                self.lifetime_purchases = self.lifetime_purchases.saturating_add(1);
                self.lifetime_revenue += value;
                self.last_purchase = Some(self.last_purchase.map_or(t, |l| l.max(t)));
                if self.cart.is_current(t) {
                    self.cart.clear(t);
                }
            }
            EventKind::EmailOpen => {
                self.days.update(day, |d| d.email_opens += 1);
            }
            EventKind::EmailClick => {
                self.days.update(day, |d| d.email_clicks += 1);
            }
        }
    }

    /// Places a browsing event at `t` in a session, opening a new one after the timeout.
    /// Returns whether the event belongs to the latest session (false for a late event).
    fn visit(&mut self, t: Time) -> bool {
        self.last_visit = Some(self.last_visit.map_or(t, |l| l.max(t)));
        match &mut self.session {
            Some(s) if t.since(s.last) >= SESSION_TIMEOUT_MS => {
                let ended = std::mem::replace(s, Session::new(t));
                self.end_session(&ended);
                self.previous_session_end = Some(ended.last);
                self.days.update(t.day(), |d| d.sessions += 1);
                true
            }
            Some(s) if s.start.since(t) >= SESSION_TIMEOUT_MS => false,
            Some(s) => {
                if t >= s.last {
                    s.close_product_view(t);
                    s.last = t;
                }
                true
            }
            None => {
                self.session = Some(Session::new(t));
                self.days.update(t.day(), |d| d.sessions += 1);
                true
            }
        }
    }

    /// Records an ended session in the day it started.
    fn end_session(&mut self, s: &Session) {
        self.days.update(s.start.day(), |d| {
            d.ended_sessions += 1;
            d.ended_session_pages += s.page_views;
            d.bounced_sessions += u32::from(s.page_views <= 1);
        });
    }

    fn view_category(&mut self, name: &str, day: i32) {
        let at = match self.categories.iter().position(|c| c.name == name) {
            Some(at) => at,
            None => {
                if self.categories.len() >= MAX_CATEGORIES {
                    let stalest = self
                        .categories
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, c)| c.views.newest_day())
                        .map(|(i, _)| i)
                        .unwrap_or(0);
                    self.categories.swap_remove(stalest);
                }
                self.categories.push(CategoryViews {
                    name: name.to_owned(),
                    views: DailySeries::default(),
                });
                self.categories.len() - 1
            }
        };
        self.categories[at].views.update(day, |v| *v += 1);
    }

    pub fn first_seen(&self) -> Option<Time> {
        self.first_seen
    }

    pub fn last_seen(&self) -> Option<Time> {
        self.last_seen
    }

    /// The latest session if it is still open at `now`.
    pub fn open_session(&self, now: Time) -> Option<&Session> {
        self.session.as_ref().filter(|s| s.is_open(now))
    }

    pub fn cart(&self) -> &Cart {
        &self.cart
    }

    /// The category with the most product views in the 30 days ending `now`, and its views.
    pub fn top_category(&self, now: Time) -> Option<(&str, u32)> {
        self.categories
            .iter()
            .map(|c| (c.name.as_str(), c.views.last_days(now.day(), CATEGORY_DAYS)))
            .filter(|&(_, views)| views > 0)
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(a.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{PersonKey, Properties};
    use crate::time::{DAY_MS, MINUTE_MS};

    const T: Time = Time(1_772_445_600_000);

    fn event(kind: EventKind, at: Time, product: &str) -> Event {
        Event {
            id: "e".into(),
            person: PersonKey::User("u".into()),
            kind,
            time: at,
            properties: Properties {
                product_id: Some(product.into()),
                price: Some(10.0),
                order_value: Some(25.0),
                ..Properties::default()
            },
            attributes: Default::default(),
        }
    }

    fn apply(events: &[Event]) -> Profile {
        let mut p = Profile::default();
        events.iter().for_each(|e| p.apply(e));
        p
    }

    #[test]
    fn cart_adds_removes_and_empties_on_purchase() {
        let mut remove_one = event(EventKind::RemoveFromCart, T.plus_ms(3 * MINUTE_MS), "a");
        remove_one.properties.quantity = Some(1);
        let mut add_two = event(EventKind::AddToCart, T.plus_ms(MINUTE_MS), "a");
        add_two.properties.quantity = Some(2);
        let p = apply(&[
            event(EventKind::AddToCart, T, "b"),
            add_two,
            remove_one,
            event(EventKind::RemoveFromCart, T.plus_ms(4 * MINUTE_MS), "b"),
        ]);
        assert_eq!((p.cart.items(), p.cart.value()), (1, 10.0));
        assert_eq!(p.cart.last_add, Some(T.plus_ms(MINUTE_MS)));

        let mut p = p;
        p.apply(&event(
            EventKind::CheckoutStarted,
            T.plus_ms(5 * MINUTE_MS),
            "",
        ));
        assert!(p.cart.checkout_started);
        p.apply(&event(EventKind::Purchase, T.plus_ms(6 * MINUTE_MS), ""));
        assert_eq!(p.cart.items(), 0);
        assert!(!p.cart.checkout_started);
        assert_eq!((p.lifetime_purchases, p.lifetime_revenue), (1, 25.0));
    }

    #[test]
    fn a_late_event_counts_in_its_day_but_leaves_session_and_cart_alone() {
        let mut p = apply(&[
            event(EventKind::PageView, T, ""),
            event(EventKind::AddToCart, T.plus_ms(MINUTE_MS), "a"),
        ]);
        let session = p.session.clone();
        let cart = p.cart.clone();
        let yesterday = T.plus_ms(-DAY_MS);
        p.apply(&event(EventKind::ProductView, yesterday, "old"));
        p.apply(&event(EventKind::RemoveFromCart, yesterday, "a"));
        assert_eq!(p.session, session);
        assert_eq!(p.cart, cart);
        assert_eq!(
            p.days.sum(yesterday.day(), yesterday.day()).product_views,
            1
        );
        assert_eq!(p.first_seen, Some(yesterday));
        assert_eq!(p.last_seen, Some(T.plus_ms(MINUTE_MS)));
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_distinct_things() {
        let mut p = Profile::default();
        for i in 0..5_000 {
            let at = T.plus_ms(i * 1000);
            let mut view = event(EventKind::ProductView, at, &format!("p{i}"));
            view.properties.category = Some(format!("c{i}"));
            p.apply(&view);
            p.apply(&event(EventKind::AddToCart, at, &format!("p{i}")));
        }
        let session = p.session.as_ref().unwrap();
        assert_eq!(session.products.len(), MAX_SESSION_PRODUCTS);
        assert_eq!(session.product_views, 5_000);
        assert_eq!(p.cart.lines.len(), MAX_CART_LINES);
        assert_eq!(p.categories.len(), MAX_CATEGORIES);
        // A year of daily visits keeps 90 days of buckets.
        let mut p = Profile::default();
        for d in 0..365 {
            p.apply(&event(EventKind::PageView, T.plus_ms(d * DAY_MS), ""));
        }
        assert_eq!(p.days.len(), HISTORY_DAYS as usize);
    }

    #[test]
    fn email_events_do_not_open_sessions() {
        let p = apply(&[event(EventKind::EmailOpen, T, "")]);
        assert!(p.session.is_none());
        assert_eq!(p.last_visit, None);
        assert_eq!(p.days.sum(T.day(), T.day()).email_opens, 1);
    }
}
