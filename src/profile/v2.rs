//! The second stored layout of a profile (store format 2), read so that profiles written
//! before the profile remembered products and weighed categories still load.
//!
//! Format 2 kept product views per category and nothing per product. A converted profile
//! has the same categories with their views (no cart additions or purchases, which format 2
//! did not count per category) and no products: its features are those of the stored one,
//! and its product memory starts with the next event.

use serde::Deserialize;

use super::interest::{CategoryDay, Products};
use super::window::DailySeries;
use super::{Cart, CategoryActivity, DayStats, Sessions, CATEGORY_DAYS, HISTORY_DAYS};
use crate::time::Time;

/// A profile as format 2 stored it; the fields and their order are that format.
#[derive(Deserialize)]
pub struct Profile {
    pub(super) first_seen: Option<Time>,
    pub(super) last_seen: Option<Time>,
    pub(super) last_visit: Option<Time>,
    pub(super) sessions: Sessions,
    pub(super) cart: Cart,
    pub(super) days: DailySeries<DayStats, HISTORY_DAYS>,
    pub(super) categories: Vec<CategoryViews>,
    pub(super) lifetime_purchases: u32,
    pub(super) lifetime_revenue: f64,
    pub(super) last_purchase: Option<Time>,
}

/// Product views in one category, per day, as formats 1 and 2 stored them.
#[derive(Deserialize)]
pub struct CategoryViews {
    name: String,
    views: DailySeries<u32, CATEGORY_DAYS>,
}

impl From<CategoryViews> for CategoryActivity {
    fn from(c: CategoryViews) -> CategoryActivity {
        let mut days = DailySeries::default();
        for (day, views) in c.views.iter() {
            days.update(day, |d: &mut CategoryDay| d.views = views);
        }
        CategoryActivity {
            name: super::names::Category::new(&c.name),
            days,
        }
    }
}

impl From<Profile> for super::Profile {
    fn from(p: Profile) -> super::Profile {
        super::Profile {
            first_seen: p.first_seen,
            last_seen: p.last_seen,
            last_visit: p.last_visit,
            sessions: p.sessions,
            cart: p.cart,
            days: p.days,
            categories: p.categories.into_iter().map(Into::into).collect(),
            lifetime_purchases: p.lifetime_purchases,
            lifetime_revenue: p.lifetime_revenue,
            last_purchase: p.last_purchase,
            products: Products::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::event::{Event, EventKind, PersonKey, Properties};
    use crate::features::extract;
    use crate::time::{Time, MINUTE_MS};

    const T: Time = Time(1_772_445_600_000);

    #[test]
    fn a_format_2_profile_loads_with_the_same_features() {
        // Format 2 is format 3 without the category weights and the products: the bytes
        // the previous code wrote for these events.
        let e = |kind: EventKind, at: Time, product: &str, category: &str| Event {
            id: "e".into(),
            person: PersonKey::User("u".into()),
            linked: None,
            kind,
            time: at,
            properties: Properties {
                product_id: Some(product.into()),
                category: Some(category.into()),
                price: Some(40.0),
                dwell_seconds: Some(30.0),
                ..Properties::default()
            },
            attributes: Default::default(),
        };
        let events = [
            e(EventKind::ProductView, T, "p1", "shoes"),
            e(EventKind::ProductView, T.plus_ms(MINUTE_MS), "p2", "shoes"),
            e(
                EventKind::ProductView,
                T.plus_ms(2 * MINUTE_MS),
                "p3",
                "hats",
            ),
        ];
        let bytes = hex::decode(FORMAT_2_FIXTURE).unwrap();
        let old: super::Profile = postcard::from_bytes(&bytes).expect("format 2 decodes");
        let old = crate::profile::Profile::from(old);
        let mut fresh = crate::profile::Profile::default();
        events.iter().for_each(|e| fresh.apply(e));
        let now = T.plus_ms(10 * MINUTE_MS);
        let (a, b) = (extract(&old, now), extract(&fresh, now));
        assert!(
            a.0.iter().zip(b.0).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{a:?} != {b:?}"
        );
        assert_eq!(old.top_category(now), Some(("shoes", 2)));
        assert!(old.products.is_empty());
    }

    /// `postcard` bytes of the profile of the events above, written by the code of commit
    /// deb02ca (store format 2).
    const FORMAT_2_FIXTURE: &str = "0180a4ecdf95670180f7fadf95670180f7fadf95670180a4ecdf956780f7fadf956703030303d4ced7abfba0e5ea0887d2d7abfbc0e5ea08bad5d7abfbe0e5ea08a0fe0a000000000000000001c4c002030300000000000000000000000000020573686f657301c4c00202046861747301c4c0020100000000000000000000";
}
