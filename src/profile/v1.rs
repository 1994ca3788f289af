//! The first stored layout of a profile (store format 1), read so that profiles written
//! before the cart kept its checkout and purchase times still load.
//!
//! Format 1 kept whether checkout had started as a flag. The flag was only set by a
//! checkout at or after the latest addition and cleared by a later addition or purchase,
//! and every one of those moved `last_change`; so when it is set, `last_change` is at or
//! after that checkout and after any purchase that could have ended it, and it stands in
//! for the checkout's time. The features of a converted profile are those of the stored
//! one.

use serde::Deserialize;

use super::v2::CategoryViews;
use super::window::DailySeries;
use super::{Cart, CartLine, DayStats, Sessions, HISTORY_DAYS};
use crate::time::Time;

/// A profile as format 1 stored it; the fields and their order are that format.
#[derive(Deserialize)]
pub struct Profile {
    first_seen: Option<Time>,
    last_seen: Option<Time>,
    last_visit: Option<Time>,
    sessions: Sessions,
    cart: Cart1,
    days: DailySeries<DayStats, HISTORY_DAYS>,
    categories: Vec<CategoryViews>,
    lifetime_purchases: u32,
    lifetime_revenue: f64,
    last_purchase: Option<Time>,
}

/// A cart as format 1 stored it.
#[derive(Deserialize)]
struct Cart1 {
    lines: Vec<CartLine>,
    last_add: Option<Time>,
    checkout_started: bool,
    last_change: Option<Time>,
}

impl From<Profile> for super::Profile {
    fn from(p: Profile) -> super::Profile {
        super::v2::Profile::from(p).into()
    }
}

impl From<Profile> for super::v2::Profile {
    fn from(p: Profile) -> super::v2::Profile {
        let cart = Cart {
            lines: p.cart.lines,
            last_add: p.cart.last_add,
            last_checkout: if p.cart.checkout_started {
                p.cart.last_change
            } else {
                None
            },
            last_purchase: p.last_purchase,
            last_change: p.cart.last_change,
        };
        super::v2::Profile {
            first_seen: p.first_seen,
            last_seen: p.last_seen,
            last_visit: p.last_visit,
            sessions: p.sessions,
            cart,
            days: p.days,
            categories: p.categories,
            lifetime_purchases: p.lifetime_purchases,
            lifetime_revenue: p.lifetime_revenue,
            last_purchase: p.last_purchase,
        }
    }
}

/// `postcard` bytes of a profile (an old purchase, a visit, a cart addition and a checkout)
/// written by the code of commit 0efda82, before the cart kept its times.
#[cfg(test)]
pub(crate) const FORMAT_1_FIXTURE: &str = "0180d4d3e8936701c0f390e0956701c0f390e095670280d4d3e8936780d4d3e89367000000000000000080a4ecdf9567c0f390e0956702010101bad5d7abfbe0e5ea08e0d403000001010270310200000000000044400180f7fadf95670101c0f390e0956702bec00200000000010000000000804b400000c4c002020100010000000000000000000000010573686f657301c4c00201010000000000804b400180d4d3e89367";

#[cfg(test)]
mod tests {
    use super::FORMAT_1_FIXTURE;
    use crate::event::{Event, EventKind, PersonKey, Properties};
    use crate::features::extract;
    use crate::time::{Time, MINUTE_MS};

    const T: Time = Time(1_772_445_600_000);

    fn events() -> Vec<Event> {
        let e = |kind: EventKind, at: Time, product: &str| Event {
            id: "e".into(),
            person: PersonKey::User("u".into()),
            linked: None,
            kind,
            time: at,
            properties: Properties {
                product_id: Some(product.into()),
                category: Some("shoes".into()),
                price: Some(40.0),
                quantity: Some(2),
                order_value: Some(55.0),
                dwell_seconds: Some(30.0),
                ..Properties::default()
            },
            attributes: Default::default(),
        };
        vec![
            e(EventKind::Purchase, T.plus_ms(-3 * 24 * 60 * MINUTE_MS), ""),
            e(EventKind::PageView, T, ""),
            e(EventKind::ProductView, T.plus_ms(MINUTE_MS), "p1"),
            e(EventKind::AddToCart, T.plus_ms(2 * MINUTE_MS), "p1"),
            e(EventKind::CheckoutStarted, T.plus_ms(5 * MINUTE_MS), ""),
        ]
    }

    #[test]
    fn a_format_1_profile_loads_with_the_same_features() {
        let bytes = hex::decode(FORMAT_1_FIXTURE).unwrap();
        let old: super::Profile = postcard::from_bytes(&bytes).expect("format 1 decodes");
        let old = crate::profile::Profile::from(old);
        let mut fresh = crate::profile::Profile::default();
        events().iter().for_each(|e| fresh.apply(e));
        assert!(old.cart.checkout_started());
        for now in [
            T.plus_ms(10 * MINUTE_MS),
            T.plus_ms(3 * 24 * 60 * MINUTE_MS),
        ] {
            let (a, b) = (extract(&old, now), extract(&fresh, now));
            assert!(
                a.0.iter().zip(b.0).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{a:?} != {b:?}"
            );
        }
    }
}
