//! A person's live behavioral state, updated by one event at a time.
//!
//! `Profile::apply` is pure and deterministic: the same events give the same profile, in the
//! server and in the trainer's replay. Memory per person is bounded: windows are sparse
//! per-day buckets ([`window`]), sessions are kept for 31 days ([`session`]), and the lists
//! a profile holds (session products, cart lines, categories) have fixed caps.
//!
//! Order: per-day counters and sessions do not depend on the order events arrive in — a
//! late event lands in its own day and its own session. The cart describes the person's
//! latest state, so a cart event older than the cart's latest change of its lines is
//! counted but does not change the lines. The times of the latest addition, checkout and
//! purchase are maxima, so "minutes since the latest addition" and "checkout since the
//! latest addition" do not depend on the order either. Time on product pages measured
//! from gaps needs events in order; a late product view without a dwell time adds no time.
//!
//! Bounds: counters saturate instead of wrapping, and revenue sums saturate at
//! [`MAX_REVENUE`], so with the limits `crate::event` puts on each number no feature can
//! become infinite however many events a person sends.
//!
//! `Profile::merge` combines two people into one (identity stitching): counters add up,
//! sessions that are parts of the same visit become one, carts combine.

pub mod interest;
pub mod names;
pub mod session;
pub mod v1;
pub mod v2;
pub mod window;

use serde::{Deserialize, Serialize};

use crate::event::{fnv1a, Event, EventKind};
use crate::heap::{self, HeapSize};
use crate::time::Time;
use interest::{CategoryDay, ProductDay, ProductTouch, Products};
use names::Category;
pub use session::{Session, Sessions, SESSION_TIMEOUT_MS};
use window::{DailySeries, DayValue};

/// Cart lines kept; additions of further products are ignored.
pub const MAX_CART_LINES: usize = 100;
/// Categories remembered; the one with the least recent activity makes room for a new one.
pub const MAX_CATEGORIES: usize = 16;
/// Days of per-day history kept (the longest window any feature uses).
pub const HISTORY_DAYS: i32 = 90;
/// Days of per-category history kept.
pub const CATEGORY_DAYS: i32 = 30;
/// Where revenue sums (a day's, a window's, a lifetime's) stop growing. Orders are at most
/// `event::MAX_ORDER_VALUE` (1e15), so a thousand of the largest orders reach it; f64
/// holds it with room to spare, so no sum of revenue can become infinite.
pub const MAX_REVENUE: f64 = 1e18;

/// Adds revenue, saturating at [`MAX_REVENUE`].
fn add_revenue(total: f64, more: f64) -> f64 {
    (total + more).min(MAX_REVENUE)
}

/// Counts one more, saturating instead of wrapping.
fn bump(count: &mut u32) {
    *count = count.saturating_add(1);
}

/// Everything Nudge knows about one person.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Time of the earliest and latest event of any kind.
    pub(crate) first_seen: Option<Time>,
    pub(crate) last_seen: Option<Time>,
    /// Time of the latest browsing event (anything but email).
    pub(crate) last_visit: Option<Time>,
    pub(crate) sessions: Sessions,
    pub(crate) cart: Cart,
    pub(crate) days: DailySeries<DayStats, HISTORY_DAYS>,
    pub(crate) categories: Vec<CategoryActivity>,
    pub(crate) lifetime_purchases: u32,
    pub(crate) lifetime_revenue: f64,
    pub(crate) last_purchase: Option<Time>,
    /// The products the person showed interest in ([`interest`]).
    pub(crate) products: Products,
}

/// Counters for one calendar day.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DayStats {
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
        add(&mut self.page_views, o.page_views);
        add(&mut self.product_views, o.product_views);
        add(&mut self.searches, o.searches);
        add(&mut self.cart_adds, o.cart_adds);
        add(&mut self.purchases, o.purchases);
        self.revenue = add_revenue(self.revenue, o.revenue);
        add(&mut self.email_opens, o.email_opens);
        add(&mut self.email_clicks, o.email_clicks);
    }
}

/// The person's cart, as of their latest cart event.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cart {
    pub lines: Vec<CartLine>,
    /// Time of the latest add-to-cart, late ones included.
    pub last_add: Option<Time>,
    /// Time of the latest checkout start, late ones included.
    pub last_checkout: Option<Time>,
    /// Time of the latest purchase, late ones included: a purchase ends the checkout
    /// before it.
    pub last_purchase: Option<Time>,
    /// Time of the latest event that changed the lines; older cart events are late. A
    /// checkout leaves the lines as they are, so it does not make an addition late.
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

    /// Whether checkout started after the latest addition (at the same millisecond counts
    /// as after) and no purchase has followed it. Computed from the three latest times, so
    /// the answer does not depend on the order the events arrived in.
    pub fn checkout_started(&self) -> bool {
        self.last_checkout.is_some()
            && self.last_checkout >= self.last_add
            && self.last_checkout > self.last_purchase
    }

    /// Whether an event at `t` is at least as new as the cart's lines.
    fn is_current(&self, t: Time) -> bool {
        self.last_change.is_none_or(|last| t >= last)
    }

    fn add(&mut self, t: Time, product_id: &str, quantity: u32, price: Option<f64>) {
        self.last_add = self.last_add.max(Some(t));
        if self.is_current(t) {
            self.add_line(CartLine {
                product_id: product_id.to_owned(),
                quantity,
                price: price.unwrap_or(f64::NAN),
            });
            self.last_change = Some(t);
        }
    }

    fn checkout(&mut self, t: Time) {
        self.last_checkout = self.last_checkout.max(Some(t));
    }

    /// A purchase ends the checkout and, unless it is late, empties the cart.
    fn purchase(&mut self, t: Time) {
        self.last_purchase = self.last_purchase.max(Some(t));
        if self.is_current(t) {
            self.lines.clear();
            self.last_change = Some(t);
        }
    }

    /// Adds units of a product; a NaN price keeps the line's known price.
    fn add_line(&mut self, line: CartLine) {
        if let Some(existing) = self
            .lines
            .iter_mut()
            .find(|l| l.product_id == line.product_id)
        {
            existing.quantity = existing.quantity.saturating_add(line.quantity);
            if !line.price.is_nan() {
                existing.price = line.price;
            }
        } else if self.lines.len() < MAX_CART_LINES {
            let price = if line.price.is_nan() { 0.0 } else { line.price };
            self.lines.push(CartLine { price, ..line });
        }
    }

    /// Removes `quantity` units of a product, or the whole line when `quantity` is `None`.
    fn remove(&mut self, t: Time, product_id: &str, quantity: Option<u32>) {
        if !self.is_current(t) {
            return;
        }
        if let Some(at) = self.lines.iter().position(|l| l.product_id == product_id) {
            let line = &mut self.lines[at];
            line.quantity = quantity.map_or(0, |q| line.quantity.saturating_sub(q));
            if line.quantity == 0 {
                self.lines.remove(at);
            }
        }
        self.last_change = Some(t);
    }

    /// Combines another cart of the same person (identity stitching): lines add up, and
    /// the latest addition, checkout and purchase of either decide whether checkout has
    /// started since, as if one profile had seen all the events.
    fn merge(&mut self, other: Cart) {
        for line in other.lines {
            self.add_line(line);
        }
        self.last_add = self.last_add.max(other.last_add);
        self.last_checkout = self.last_checkout.max(other.last_checkout);
        self.last_purchase = self.last_purchase.max(other.last_purchase);
        self.last_change = self.last_change.max(other.last_change);
    }
}

/// What the person did in one category, per day: product views (what features read),
/// cart additions and purchases (which weigh into the affinity rules read).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CategoryActivity {
    pub name: Category,
    pub days: DailySeries<CategoryDay, CATEGORY_DAYS>,
}

impl CategoryActivity {
    /// Product views in the 30 days ending `today`.
    pub fn views(&self, today: i32) -> u32 {
        self.days.last_days(today, CATEGORY_DAYS).views
    }

    /// Affinity in the 30 days ending `today` ([`CategoryDay::affinity`]).
    pub fn affinity(&self, today: i32) -> u64 {
        self.days.last_days(today, CATEGORY_DAYS).affinity()
    }
}

impl HeapSize for Profile {
    fn heap_bytes(&self) -> usize {
        let cart = heap::buffer::<CartLine>(self.cart.lines.capacity())
            + self
                .cart
                .lines
                .iter()
                .map(|l| l.product_id.heap_bytes())
                .sum::<usize>();
        let categories = heap::buffer::<CategoryActivity>(self.categories.capacity())
            + self
                .categories
                .iter()
                .map(|c| c.name.heap_bytes() + c.days.heap_bytes())
                .sum::<usize>();
        self.sessions.heap_bytes()
            + cart
            + self.days.heap_bytes()
            + categories
            + self.products.heap_bytes()
    }
}

impl Profile {
    /// Gives back the spare capacity its buffers' growth left. A `Vec` grows to 4 elements
    /// at its first push and doubles after, so a person with one session, one cart line and
    /// two categories holds room for twelve more: about 900 bytes of a first visit's 1.6 KiB
    /// on the heap. The engine calls this when a group changed the person, before it weighs
    /// them against the cache's budget; the next push reallocates (the sizes are bounded, so
    /// that is a small copy).
    pub fn shrink_to_fit(&mut self) {
        self.sessions.shrink_to_fit();
        self.cart.lines.shrink_to_fit();
        for line in &mut self.cart.lines {
            line.product_id.shrink_to_fit();
        }
        self.days.shrink_to_fit();
        self.categories.shrink_to_fit();
        for c in &mut self.categories {
            c.days.shrink_to_fit();
        }
        self.products.shrink_to_fit();
    }

    /// Applies one validated event.
    pub fn apply(&mut self, event: &Event) {
        let t = event.time;
        self.first_seen = Some(self.first_seen.map_or(t, |f| f.min(t)));
        self.last_seen = Some(self.last_seen.map_or(t, |l| l.max(t)));
        let day = t.day();
        let props = &event.properties;
        let session = if event.kind.is_visit() {
            self.last_visit = Some(self.last_visit.map_or(t, |l| l.max(t)));
            Some(self.sessions.visit(t))
        } else {
            None
        };

        match event.kind {
            EventKind::PageView => {
                self.days.update(day, |d| bump(&mut d.page_views));
                if let Some(s) = session {
                    bump(&mut s.page_views);
                }
            }
            EventKind::ProductView => {
                self.days.update(day, |d| {
                    bump(&mut d.page_views);
                    bump(&mut d.product_views);
                });
                if let Some(s) = session {
                    bump(&mut s.page_views);
                    let product = props.product_id.as_deref().unwrap_or_default();
                    s.view_product(fnv1a(product.bytes()));
                    match props.dwell_seconds {
                        Some(dwell) => {
                            let ms = (dwell * 1000.0) as i64;
                            s.product_time_ms = s.product_time_ms.saturating_add(ms);
                        }
                        None if t >= s.last => s.open_product_view = Some(t),
                        None => {}
                    }
                }
                let category = props.category.as_deref().filter(|c| !c.is_empty());
                if let Some(category) = category {
                    self.category_activity(category, day, |d| bump(&mut d.views));
                }
                let dwell = props
                    .dwell_seconds
                    .map_or(0, |s| s.min(f64::from(u16::MAX)) as u16);
                self.touch_product(event, |d| {
                    d.views = 1;
                    d.dwell_seconds = dwell;
                });
            }
            EventKind::Search => {
                self.days.update(day, |d| bump(&mut d.searches));
                if let Some(s) = session {
                    bump(&mut s.searches);
                }
            }
            EventKind::AddToCart => {
                self.days.update(day, |d| bump(&mut d.cart_adds));
                if let Some(s) = session {
                    bump(&mut s.cart_adds);
                }
                let product = props.product_id.as_deref().unwrap_or_default();
                self.cart
                    .add(t, product, props.quantity.unwrap_or(1), props.price);
                if let Some(category) = props.category.as_deref().filter(|c| !c.is_empty()) {
                    self.category_activity(category, day, |d| {
                        d.cart_adds = d.cart_adds.saturating_add(1)
                    });
                }
                self.touch_product(event, |d| d.cart_adds = 1);
            }
            EventKind::RemoveFromCart => {
                let product = props.product_id.as_deref().unwrap_or_default();
                self.cart.remove(t, product, props.quantity);
            }
            EventKind::CheckoutStarted => self.cart.checkout(t),
            EventKind::Purchase => {
                let value = props.order_value.unwrap_or(0.0);
                self.days.update(day, |d| {
                    bump(&mut d.purchases);
                    d.revenue = add_revenue(d.revenue, value);
                });
                self.lifetime_purchases = self.lifetime_purchases.saturating_add(1);
                self.lifetime_revenue = add_revenue(self.lifetime_revenue, value);
                self.last_purchase = Some(self.last_purchase.map_or(t, |l| l.max(t)));
                self.cart.purchase(t);
                if let Some(category) = props.category.as_deref().filter(|c| !c.is_empty()) {
                    self.category_activity(category, day, |d| {
                        d.purchases = d.purchases.saturating_add(1)
                    });
                }
                self.touch_product(event, |d| d.purchases = 1);
            }
            EventKind::EmailOpen => {
                self.days.update(day, |d| bump(&mut d.email_opens));
            }
            EventKind::EmailClick => {
                self.days.update(day, |d| bump(&mut d.email_clicks));
            }
        }
    }

    /// Folds another person's profile into this one: the same person seen under another
    /// identifier. Every counter adds up; parts of the same visit become one session.
    pub fn merge(&mut self, other: Profile) {
        self.first_seen = match (self.first_seen, other.first_seen) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_seen = self.last_seen.max(other.last_seen);
        self.last_visit = self.last_visit.max(other.last_visit);
        self.sessions.merge(other.sessions);
        self.cart.merge(other.cart);
        self.days.merge(&other.days);
        for c in other.categories {
            match self.categories.iter_mut().find(|mine| mine.name == c.name) {
                Some(mine) => mine.days.merge(&c.days),
                None => {
                    self.make_room_for_category();
                    self.categories.push(c);
                }
            }
        }
        self.lifetime_purchases = self
            .lifetime_purchases
            .saturating_add(other.lifetime_purchases);
        self.lifetime_revenue = add_revenue(self.lifetime_revenue, other.lifetime_revenue);
        self.last_purchase = self.last_purchase.max(other.last_purchase);
        self.products.merge(other.products);
    }

    /// Records in the product memory what an event that names a product did with it.
    fn touch_product(&mut self, event: &Event, day: impl FnOnce(&mut ProductDay)) {
        let props = &event.properties;
        let Some(id) = props.product_id.as_deref() else {
            return;
        };
        let mut counts = ProductDay::default();
        day(&mut counts);
        self.products.touch(ProductTouch {
            id,
            category: props.category.as_deref(),
            price: props.price,
            at: event.time,
            day: counts,
        });
    }

    fn make_room_for_category(&mut self) {
        if self.categories.len() >= MAX_CATEGORIES {
            let stalest = self
                .categories
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| c.days.newest_day())
                .map(|(i, _)| i)
                .unwrap_or(0);
            self.categories.swap_remove(stalest);
        }
    }

    fn category_activity(&mut self, name: &str, day: i32, f: impl FnOnce(&mut CategoryDay)) {
        let at = match self.categories.iter().position(|c| *c.name == *name) {
            Some(at) => at,
            None => {
                self.make_room_for_category();
                self.categories.push(CategoryActivity {
                    name: Category::new(name),
                    days: DailySeries::default(),
                });
                self.categories.len() - 1
            }
        };
        self.categories[at].days.update(day, f);
    }

    pub fn first_seen(&self) -> Option<Time> {
        self.first_seen
    }

    pub fn last_seen(&self) -> Option<Time> {
        self.last_seen
    }

    pub fn last_purchase(&self) -> Option<Time> {
        self.last_purchase
    }

    /// The latest session if it is still open at `now`.
    pub fn open_session(&self, now: Time) -> Option<&Session> {
        self.sessions.latest().filter(|s| s.is_open(now))
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    pub fn cart(&self) -> &Cart {
        &self.cart
    }

    /// The category with the most product views in the 30 days ending `now`, and its views
    /// (what the features read).
    pub fn top_category(&self, now: Time) -> Option<(&str, u32)> {
        self.categories
            .iter()
            .map(|c| (c.name.as_str(), c.views(now.day())))
            .filter(|&(_, views)| views > 0)
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(a.0)))
    }

    /// The categories with any affinity in the 30 days ending `now` and each one's share of
    /// the person's affinity over all of them, highest first (then by name). What rules
    /// read as `top_category` and `category_share(name)`.
    pub fn category_affinities(&self, now: Time) -> Vec<(&str, f64)> {
        let today = now.day();
        let mut all: Vec<(&str, u64)> = self
            .categories
            .iter()
            .map(|c| (c.name.as_str(), c.affinity(today)))
            .filter(|&(_, a)| a > 0)
            .collect();
        let total: u64 = all.iter().map(|(_, a)| a).sum();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        all.into_iter()
            .map(|(name, a)| (name, a as f64 / total as f64))
            .collect()
    }

    pub fn products(&self) -> &Products {
        &self.products
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
            linked: None,
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
        assert!(p.cart.checkout_started());
        p.apply(&event(EventKind::Purchase, T.plus_ms(6 * MINUTE_MS), ""));
        assert_eq!(p.cart.items(), 0);
        assert!(!p.cart.checkout_started());
        assert_eq!((p.lifetime_purchases, p.lifetime_revenue), (1, 25.0));
    }

    #[test]
    fn a_late_event_counts_in_its_day_and_session_but_leaves_the_cart_alone() {
        let mut p = apply(&[
            event(EventKind::PageView, T, ""),
            event(EventKind::AddToCart, T.plus_ms(MINUTE_MS), "a"),
        ]);
        let cart = p.cart.clone();
        let yesterday = T.plus_ms(-DAY_MS);
        p.apply(&event(EventKind::ProductView, yesterday, "old"));
        p.apply(&event(EventKind::RemoveFromCart, yesterday, "a"));
        assert_eq!(p.cart, cart);
        assert_eq!(
            p.days.sum(yesterday.day(), yesterday.day()).product_views,
            1
        );
        assert_eq!(
            p.sessions.len(),
            2,
            "yesterday's visit is a session of its own"
        );
        assert_eq!(p.sessions.latest().unwrap().start, T);
        assert_eq!(p.first_seen, Some(yesterday));
        assert_eq!(p.last_seen, Some(T.plus_ms(MINUTE_MS)));
    }

    #[test]
    fn the_order_of_events_does_not_change_counters_or_sessions() {
        let events: Vec<Event> = (0..40)
            .map(|i| {
                let kind = [
                    EventKind::PageView,
                    EventKind::ProductView,
                    EventKind::Search,
                ][i % 3];
                let mut e = event(kind, T.plus_ms((i as i64 * 7919 % 300) * MINUTE_MS), "p");
                e.properties.dwell_seconds = Some(5.0);
                e.properties.category = Some("c".into());
                e
            })
            .collect();
        let mut sorted = events.clone();
        sorted.sort_by_key(|e| e.time);
        let a = apply(&events);
        let b = apply(&sorted);
        assert_eq!(a.days, b.days);
        assert_eq!(a.sessions.len(), b.sessions.len());
        let summary = |p: &Profile| {
            p.sessions
                .iter()
                .map(|s| (s.start, s.last, s.page_views, s.searches, s.product_time_ms))
                .collect::<Vec<_>>()
        };
        assert_eq!(summary(&a), summary(&b));
    }

    #[test]
    fn merging_two_identities_adds_up_without_double_counting() {
        let anonymous = apply(&[
            event(EventKind::ProductView, T, "a"),
            event(EventKind::AddToCart, T.plus_ms(MINUTE_MS), "a"),
            event(EventKind::Purchase, T.plus_ms(-3 * DAY_MS), ""),
        ]);
        let known = apply(&[
            event(EventKind::PageView, T.plus_ms(5 * MINUTE_MS), ""),
            event(EventKind::AddToCart, T.plus_ms(6 * MINUTE_MS), "b"),
        ]);
        let mut merged = known.clone();
        merged.merge(anonymous.clone());
        // The login visit was one visit under two ids: one session, not two.
        assert_eq!(merged.sessions.len(), 2);
        assert_eq!(merged.sessions.latest().unwrap().page_views, 2);
        assert_eq!((merged.cart.items(), merged.cart.value()), (2, 20.0));
        assert_eq!(merged.cart.last_add, Some(T.plus_ms(6 * MINUTE_MS)));
        assert_eq!(merged.lifetime_purchases, 1);
        assert_eq!(merged.first_seen, Some(T.plus_ms(-3 * DAY_MS)));
        let today = merged.days.sum(T.day(), T.day());
        assert_eq!((today.page_views, today.cart_adds), (2, 2));

        // Applying all the events to one profile gives the same counters.
        let mut direct = apply(&[
            event(EventKind::ProductView, T, "a"),
            event(EventKind::AddToCart, T.plus_ms(MINUTE_MS), "a"),
            event(EventKind::Purchase, T.plus_ms(-3 * DAY_MS), ""),
        ]);
        direct.apply(&event(EventKind::PageView, T.plus_ms(5 * MINUTE_MS), ""));
        direct.apply(&event(EventKind::AddToCart, T.plus_ms(6 * MINUTE_MS), "b"));
        assert_eq!(direct.days, merged.days);
        assert_eq!(direct.sessions.len(), merged.sessions.len());
        assert_eq!(direct.cart.items(), merged.cart.items());
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
        let session = p.sessions.latest().unwrap();
        assert_eq!(session.products.len(), session::MAX_SESSION_PRODUCTS);
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
        assert!(p.sessions.is_empty());
        assert_eq!(p.last_visit, None);
        assert_eq!(p.days.sum(T.day(), T.day()).email_opens, 1);
    }

    #[test]
    fn shrinking_gives_back_growths_room_and_changes_nothing_read() {
        let mut view = event(EventKind::ProductView, T, "camera");
        view.properties.category = Some("photo".into());
        let mut lens = event(EventKind::AddToCart, T.plus_ms(MINUTE_MS), "lens");
        lens.properties.category = Some("optics".into());
        let mut p = apply(&[
            view,
            lens,
            event(EventKind::PageView, T.plus_ms(DAY_MS), ""),
        ]);
        let before = p.clone();
        let grown = p.heap_bytes();
        p.shrink_to_fit();
        assert_eq!(p, before);
        let bits = |p: &Profile| {
            crate::features::extract(p, T.plus_ms(DAY_MS))
                .0
                .map(f64::to_bits)
        };
        assert_eq!(bits(&p), bits(&before));
        // Two sessions, two categories, two products, one cart line: every buffer had room
        // for at least 4, so well over a third of the heap was spare.
        assert!(
            p.heap_bytes() * 3 < grown * 2,
            "{} bytes after shrinking, {grown} before",
            p.heap_bytes()
        );
        // Growing again after a shrink works as before.
        p.apply(&event(
            EventKind::AddToCart,
            T.plus_ms(DAY_MS + MINUTE_MS),
            "tripod",
        ));
        assert_eq!(p.cart.lines.len(), 2);
    }
}
