//! What a person is interested in: the products they keep coming back to and the
//! categories they lean to, over the last 30 days. Rules read it (`product.views_7d`,
//! `top_category`, `category_share('outdoor')`) and triggers carry it, so a message can
//! name the camera a person looked at five times instead of being generic.
//!
//! Bounded: at most [`MAX_PRODUCTS`] products per person, each with at most
//! [`PRODUCT_DAYS`] per-day buckets. When a product not yet remembered arrives and the
//! memory is full, the remembered product with the lowest [`interest`](ProductInterest::interest)
//! over the last 30 days makes room (on a tie, the one seen least recently): a product
//! that was looked at once a month ago gives way, the one looked at every day stays, and a
//! flood of one-off views only ever replaces other one-off views.
//!
//! Category affinity weighs what the person did in a category ([`CategoryDay::affinity`]):
//! a product view counts 1, an addition to the cart 3, a purchase 5.

use serde::{Deserialize, Serialize};

use super::names::Category;
use super::window::{DailySeries, DayValue};
use crate::heap::{self, HeapSize};
use crate::time::Time;

/// Products remembered per person.
pub const MAX_PRODUCTS: usize = 8;
/// Days of per-product history kept (the longest window rules read).
pub const PRODUCT_DAYS: i32 = 30;
/// How much an addition to the cart weighs against a view, in interest and affinity.
pub const CART_ADD_WEIGHT: u32 = 3;
/// How much a purchase weighs against a view, in category affinity.
pub const PURCHASE_WEIGHT: u32 = 5;

/// One product's activity on one day. Counters saturate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductDay {
    pub views: u16,
    pub cart_adds: u16,
    pub purchases: u16,
    /// Time on the product's pages as the events reported it (`dwell_seconds`).
    pub dwell_seconds: u16,
}

impl DayValue for ProductDay {
    fn accumulate(&mut self, o: &Self) {
        self.views = self.views.saturating_add(o.views);
        self.cart_adds = self.cart_adds.saturating_add(o.cart_adds);
        self.purchases = self.purchases.saturating_add(o.purchases);
        self.dwell_seconds = self.dwell_seconds.saturating_add(o.dwell_seconds);
    }
}

/// What the person did with one product.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProductInterest {
    pub id: Box<str>,
    /// The category the latest event naming one gave.
    pub category: Option<Category>,
    /// The unit price the latest event naming one gave (NaN: none yet).
    pub price: f64,
    /// The latest event about the product.
    pub last_seen: Time,
    pub days: DailySeries<ProductDay, PRODUCT_DAYS>,
}

impl ProductInterest {
    /// Activity over the `n` days ending with `today`.
    pub fn last_days(&self, today: i32, n: i32) -> ProductDay {
        self.days.last_days(today, n)
    }

    /// Interest over the last 30 days: views plus [`CART_ADD_WEIGHT`] per addition.
    pub fn interest(&self, today: i32) -> u32 {
        let d = self.last_days(today, PRODUCT_DAYS);
        u32::from(d.views) + CART_ADD_WEIGHT * u32::from(d.cart_adds)
    }
}

/// What one event tells about a product.
#[derive(Clone, Copy, Debug)]
pub struct ProductTouch<'a> {
    pub id: &'a str,
    pub category: Option<&'a str>,
    pub price: Option<f64>,
    pub at: Time,
    pub day: ProductDay,
}

/// The products a person showed interest in, at most [`MAX_PRODUCTS`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Products {
    products: Vec<ProductInterest>,
}

impl Products {
    /// Gives back the spare capacity growth left (see [`super::Profile::shrink_to_fit`]).
    pub fn shrink_to_fit(&mut self) {
        self.products.shrink_to_fit();
        for p in &mut self.products {
            p.days.shrink_to_fit();
        }
    }

    /// Records what an event did with a product.
    pub fn touch(&mut self, touch: ProductTouch<'_>) {
        if touch.id.is_empty() {
            return;
        }
        let at = match self.products.iter().position(|p| &*p.id == touch.id) {
            Some(at) => at,
            None => {
                self.make_room(touch.at.day());
                self.products.push(ProductInterest {
                    id: touch.id.into(),
                    category: None,
                    price: f64::NAN,
                    last_seen: touch.at,
                    days: DailySeries::default(),
                });
                self.products.len() - 1
            }
        };
        let p = &mut self.products[at];
        // The latest event's category and price describe the product; a late one does not.
        if touch.at >= p.last_seen {
            if let Some(c) = touch.category.filter(|c| !c.is_empty()) {
                if p.category.as_deref() != Some(c) {
                    p.category = Some(Category::new(c));
                }
            }
            if let Some(price) = touch.price {
                p.price = price;
            }
        }
        p.last_seen = p.last_seen.max(touch.at);
        p.days.update(touch.at.day(), |d| d.accumulate(&touch.day));
    }

    /// Folds another identity's products into these (identity stitching): the days of a
    /// product both know add up, so nothing is counted twice or lost.
    pub fn merge(&mut self, other: Products) {
        for theirs in other.products {
            match self.products.iter_mut().find(|p| p.id == theirs.id) {
                Some(mine) => {
                    if theirs.last_seen > mine.last_seen {
                        if theirs.category.is_some() {
                            mine.category = theirs.category;
                        }
                        if !theirs.price.is_nan() {
                            mine.price = theirs.price;
                        }
                    }
                    mine.last_seen = mine.last_seen.max(theirs.last_seen);
                    mine.days.merge(&theirs.days);
                }
                None => {
                    self.make_room(theirs.last_seen.day());
                    self.products.push(theirs);
                }
            }
        }
    }

    fn make_room(&mut self, today: i32) {
        if self.products.len() < MAX_PRODUCTS {
            return;
        }
        let weakest = self
            .products
            .iter()
            .enumerate()
            .min_by_key(|(_, p)| (p.interest(today), p.last_seen))
            .map_or(0, |(i, _)| i);
        self.products.swap_remove(weakest);
    }

    pub fn get(&self, id: &str) -> Option<&ProductInterest> {
        self.products.iter().find(|p| &*p.id == id)
    }

    /// The products with any interest in the 30 days ending `today`, most interesting
    /// first (then most recently seen).
    pub fn top(&self, today: i32) -> Vec<&ProductInterest> {
        let mut top: Vec<(u32, &ProductInterest)> = self
            .products
            .iter()
            .map(|p| (p.interest(today), p))
            .filter(|&(interest, p)| interest > 0 || p.last_days(today, PRODUCT_DAYS).purchases > 0)
            .collect();
        top.sort_by(|(ia, a), (ib, b)| ib.cmp(ia).then(b.last_seen.cmp(&a.last_seen)));
        top.into_iter().map(|(_, p)| p).collect()
    }

    pub fn len(&self) -> usize {
        self.products.len()
    }

    pub fn is_empty(&self) -> bool {
        self.products.is_empty()
    }
}

impl HeapSize for Products {
    fn heap_bytes(&self) -> usize {
        heap::buffer::<ProductInterest>(self.products.capacity())
            + self
                .products
                .iter()
                .map(|p| {
                    heap::buffer::<u8>(p.id.len()) + p.category.heap_bytes() + p.days.heap_bytes()
                })
                .sum::<usize>()
    }
}

/// Activity in one category on one day. Counters saturate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CategoryDay {
    pub views: u32,
    pub cart_adds: u16,
    pub purchases: u16,
}

impl CategoryDay {
    /// How much the day says the person likes the category: views, plus
    /// [`CART_ADD_WEIGHT`] per addition and [`PURCHASE_WEIGHT`] per purchase.
    pub fn affinity(&self) -> u64 {
        u64::from(self.views)
            + u64::from(CART_ADD_WEIGHT) * u64::from(self.cart_adds)
            + u64::from(PURCHASE_WEIGHT) * u64::from(self.purchases)
    }
}

impl DayValue for CategoryDay {
    fn accumulate(&mut self, o: &Self) {
        self.views = self.views.saturating_add(o.views);
        self.cart_adds = self.cart_adds.saturating_add(o.cart_adds);
        self.purchases = self.purchases.saturating_add(o.purchases);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::DAY_MS;

    const T: Time = Time(1_772_445_600_000);

    fn view(id: &str, at: Time) -> ProductTouch<'_> {
        ProductTouch {
            id,
            category: Some("cameras"),
            price: Some(899.0),
            at,
            day: ProductDay {
                views: 1,
                ..ProductDay::default()
            },
        }
    }

    #[test]
    fn a_full_memory_gives_up_its_least_interesting_product() {
        let mut products = Products::default();
        // Product "keep" is viewed daily; then a flood of one-off views.
        for d in 0..5 {
            products.touch(view("keep", T.plus_ms(d * DAY_MS)));
        }
        for i in 0..100 {
            products.touch(view(&format!("once{i}"), T.plus_ms(5 * DAY_MS + i)));
        }
        assert_eq!(products.len(), MAX_PRODUCTS);
        let today = T.plus_ms(5 * DAY_MS).day();
        let top = products.top(today);
        assert_eq!(&*top[0].id, "keep");
        assert_eq!(top[0].last_days(today, 7).views, 5);
        // The newest one-off views are the ones remembered beside it.
        assert!(products.get("once99").is_some());
        assert!(products.get("once0").is_none());
    }

    #[test]
    fn the_latest_event_gives_category_and_price_and_a_late_one_only_counts() {
        let mut products = Products::default();
        products.touch(view("p", T));
        let mut late = view("p", T.plus_ms(-DAY_MS));
        late.price = Some(1.0);
        late.category = Some("old");
        products.touch(late);
        let p = products.get("p").unwrap();
        assert_eq!((p.price, p.category.as_deref()), (899.0, Some("cameras")));
        assert_eq!(p.last_seen, T);
        assert_eq!(p.last_days(T.day(), 7).views, 2);
    }

    #[test]
    fn merging_two_identities_adds_days_without_double_counting() {
        let mut a = Products::default();
        let mut b = Products::default();
        let mut direct = Products::default();
        a.touch(view("p", T));
        b.touch(view("p", T.plus_ms(1000)));
        a.touch(view("p", T.plus_ms(2000)));
        b.touch(view("q", T));
        for (i, id) in ["p", "p", "p", "q"].into_iter().enumerate() {
            direct.touch(view(id, T.plus_ms(i.min(2) as i64 * 1000)));
        }
        a.merge(b);
        assert_eq!(a.get("p").unwrap().last_days(T.day(), 7).views, 3);
        assert_eq!(a.get("q").unwrap().last_days(T.day(), 7).views, 1);
        assert_eq!(a.get("p").unwrap().days, direct.get("p").unwrap().days);
        assert_eq!(a.get("p").unwrap().last_seen, T.plus_ms(2000));
    }

    #[test]
    fn affinity_weighs_purchases_over_views() {
        let viewed = CategoryDay {
            views: 4,
            ..CategoryDay::default()
        };
        let bought = CategoryDay {
            purchases: 1,
            ..CategoryDay::default()
        };
        assert!(bought.affinity() > viewed.affinity());
    }
}
