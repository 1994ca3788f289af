//! The FeatureSpec — the one definition of the features the models see — and
//! `extract(&Profile, now)`, which computes them.
//!
//! The server, the trainer and every model manifest use this list. A model may use any
//! subset in any order (its manifest maps names to columns), but a name that is not here is
//! refused at load. Changing a definition changes what models were trained on: bump
//! [`SPEC_VERSION`] and retrain.
//!
//! Undefined values (an average over nothing, days since something that never happened)
//! are NaN, which LightGBM and ONNX GBDT models treat as missing.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::profile::{DayStats, Profile};
use crate::time::{Time, DAY_MS};

/// The version of the definitions below.
pub const SPEC_VERSION: &str = "1";

/// A feature's name and one-line definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureDef {
    pub name: &'static str,
    pub description: &'static str,
}

macro_rules! feature_spec {
    ($($variant:ident = $name:literal : $description:literal;)*) => {
        /// A feature, by its position in the FeatureSpec.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Feature { $($variant,)* }

        /// Every feature, in FeatureSpec order.
        pub const FEATURES: &[FeatureDef] = &[
            $(FeatureDef { name: $name, description: $description },)*
        ];
    };
}

feature_spec! {
    SessionDurationS = "session_duration_s":
        "Seconds from the open session's first event to its latest (0 without an open session).";
    SessionPageViews = "session_page_views":
        "Page and product views in the open session.";
    SessionProductViews = "session_product_views":
        "Product views in the open session.";
    SessionDistinctProducts = "session_distinct_products":
        "Distinct products viewed in the open session.";
    SessionProductTimeS = "session_product_time_s":
        "Seconds on product pages in the open session: dwell time when sent, else the gap to the next event, capped at 10 minutes.";
    SessionSearches = "session_searches":
        "Searches in the open session.";
    SessionCartAdds = "session_cart_adds":
        "Add-to-cart events in the open session.";
    CartItems = "cart_items":
        "Units in the cart.";
    CartValue = "cart_value":
        "Value of the cart (units times unit price).";
    MinutesSinceCartAdd = "minutes_since_cart_add":
        "Minutes since the latest add-to-cart (NaN if never).";
    CheckoutSinceCartAdd = "checkout_since_cart_add":
        "1 if checkout started after the latest add-to-cart, else 0.";
    Sessions1d = "sessions_1d":
        "Sessions started today (UTC).";
    Sessions7d = "sessions_7d":
        "Sessions started in the last 7 days (today and the 6 before).";
    Sessions30d = "sessions_30d":
        "Sessions started in the last 30 days.";
    SessionsPrev7d = "sessions_prev_7d":
        "Sessions started in the 7 days before the last 7.";
    VisitTrend = "visit_trend":
        "(sessions_7d + 1) / (sessions_prev_7d + 1): below 1 when visits decline.";
    BounceRate30d = "bounce_rate_30d":
        "Share of ended sessions of the last 30 days with at most one page (NaN if none).";
    PagesPerSession30d = "pages_per_session_30d":
        "Pages per ended session of the last 30 days (NaN if none).";
    PageViews30d = "page_views_30d":
        "Page and product views in the last 30 days.";
    ProductViews30d = "product_views_30d":
        "Product views in the last 30 days.";
    CartAdds30d = "cart_adds_30d":
        "Add-to-cart events in the last 30 days.";
    Searches30d = "searches_30d":
        "Searches in the last 30 days.";
    DaysSinceLastVisit = "days_since_last_visit":
        "Days since the latest browsing event (NaN if none).";
    DaysBetweenSessions = "days_between_sessions":
        "Days from the end of the previous session to the start of the latest (NaN with one session).";
    DaysSinceFirstSeen = "days_since_first_seen":
        "Days since the person's first event.";
    Purchases30d = "purchases_30d":
        "Purchases in the last 30 days.";
    Purchases90d = "purchases_90d":
        "Purchases in the last 90 days.";
    Revenue90d = "revenue_90d":
        "Order value of purchases in the last 90 days.";
    AvgOrderValue = "avg_order_value":
        "Average order value over all purchases (NaN if none).";
    DaysSinceLastPurchase = "days_since_last_purchase":
        "Days since the latest purchase (NaN if never).";
    LifetimePurchases = "lifetime_purchases":
        "Purchases ever.";
    EmailOpens30d = "email_opens_30d":
        "Marketing emails opened in the last 30 days.";
    EmailClicks30d = "email_clicks_30d":
        "Marketing email clicks in the last 30 days.";
    TopCategoryShare30d = "top_category_share_30d":
        "Share of the last 30 days' categorized product views in the most viewed category (NaN if none).";
    DistinctCategories30d = "distinct_categories_30d":
        "Distinct categories viewed in the last 30 days (at most 16 are tracked).";
    HourOfDay = "hour_of_day":
        "Hour of the day of `now`, 0 to 23, UTC.";
    DayOfWeek = "day_of_week":
        "Day of the week of `now`, 0 = Monday to 6 = Sunday, UTC.";
}

/// How many features the spec has.
pub const FEATURE_COUNT: usize = FEATURES.len();

/// One row of feature values in FeatureSpec order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FeatureRow(pub [f64; FEATURE_COUNT]);

impl FeatureRow {
    /// A row with every feature missing.
    pub const fn missing() -> FeatureRow {
        FeatureRow([f64::NAN; FEATURE_COUNT])
    }

    pub fn get(&self, f: Feature) -> f64 {
        self.0[f as usize]
    }

    fn set(&mut self, f: Feature, value: f64) {
        self.0[f as usize] = value;
    }

    pub fn values(&self) -> &[f64; FEATURE_COUNT] {
        &self.0
    }
}

/// The ordered feature list with its version and a hash of the names, as manifests and
/// exported tables carry it.
#[derive(Debug)]
pub struct FeatureSpec {
    pub version: &'static str,
    /// The first 16 hex digits of sha256 over the names joined by newlines.
    pub hash: String,
    pub features: &'static [FeatureDef],
}

impl FeatureSpec {
    pub fn current() -> &'static FeatureSpec {
        static SPEC: OnceLock<FeatureSpec> = OnceLock::new();
        SPEC.get_or_init(|| {
            let names: Vec<&str> = FEATURES.iter().map(|f| f.name).collect();
            let digest = Sha256::digest(names.join("\n").as_bytes());
            FeatureSpec {
                version: SPEC_VERSION,
                hash: hex::encode(&digest[..8]),
                features: FEATURES,
            }
        })
    }

    /// The position of a feature name, if the spec has it.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.features.iter().position(|f| f.name == name)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.features.iter().map(|f| f.name)
    }
}

fn days_between(later: Time, earlier: Time) -> f64 {
    later.since(earlier) as f64 / DAY_MS as f64
}

fn ratio(numerator: u32, denominator: u32) -> f64 {
    if denominator == 0 {
        f64::NAN
    } else {
        f64::from(numerator) / f64::from(denominator)
    }
}

/// Computes every feature of `profile` as of `now`. Pure: the same profile and `now` give
/// the same row.
pub fn extract(profile: &Profile, now: Time) -> FeatureRow {
    use Feature::*;
    let mut row = FeatureRow::missing();
    let today = now.day();

    let open = profile.open_session(now);
    let session = |f: &dyn Fn(&crate::profile::Session) -> f64| open.map_or(0.0, f);
    row.set(
        SessionDurationS,
        session(&|s| s.last.since(s.start) as f64 / 1000.0),
    );
    row.set(SessionPageViews, session(&|s| f64::from(s.page_views)));
    row.set(
        SessionProductViews,
        session(&|s| f64::from(s.product_views)),
    );
    row.set(
        SessionDistinctProducts,
        session(&|s| f64::from(s.distinct_products)),
    );
    row.set(
        SessionProductTimeS,
        session(&|s| s.product_time_ms(now) as f64 / 1000.0),
    );
    row.set(SessionSearches, session(&|s| f64::from(s.searches)));
    row.set(SessionCartAdds, session(&|s| f64::from(s.cart_adds)));

    let cart = profile.cart();
    row.set(CartItems, f64::from(cart.items()));
    row.set(CartValue, cart.value());
    row.set(
        MinutesSinceCartAdd,
        cart.last_add
            .map_or(f64::NAN, |t| now.since(t) as f64 / 60_000.0),
    );
    row.set(
        CheckoutSinceCartAdd,
        f64::from(u8::from(cart.last_add.is_some() && cart.checkout_started())),
    );

    let days = &profile.days;
    let last30: DayStats = days.last_days(today, 30);
    // Sessions by the day they started; the ended ones of the last 30 days give the bounce
    // rate and depth. A session has ended once `now` is past its timeout, even if no event
    // has closed it yet.
    let (mut s1, mut s7, mut s30, mut prev7) = (0u32, 0u32, 0u32, 0u32);
    let (mut ended, mut ended_pages, mut bounced) = (0u32, 0u32, 0u32);
    for s in profile.sessions().iter() {
        let age = today - s.start.day();
        if !(0..30).contains(&age) {
            continue;
        }
        s1 += u32::from(age == 0);
        s7 += u32::from(age < 7);
        prev7 += u32::from((7..14).contains(&age));
        s30 += 1;
        if !s.is_open(now) {
            ended += 1;
            ended_pages = ended_pages.saturating_add(s.page_views);
            bounced += u32::from(s.page_views <= 1);
        }
    }
    row.set(Sessions1d, f64::from(s1));
    row.set(Sessions7d, f64::from(s7));
    row.set(Sessions30d, f64::from(s30));
    row.set(SessionsPrev7d, f64::from(prev7));
    row.set(VisitTrend, (f64::from(s7) + 1.0) / (f64::from(prev7) + 1.0));
    row.set(BounceRate30d, ratio(bounced, ended));
    row.set(PagesPerSession30d, ratio(ended_pages, ended));
    row.set(PageViews30d, f64::from(last30.page_views));
    row.set(ProductViews30d, f64::from(last30.product_views));
    row.set(CartAdds30d, f64::from(last30.cart_adds));
    row.set(Searches30d, f64::from(last30.searches));

    row.set(
        DaysSinceLastVisit,
        profile
            .last_visit
            .map_or(f64::NAN, |t| days_between(now, t)),
    );
    row.set(
        DaysBetweenSessions,
        match (profile.sessions().latest(), profile.sessions().previous()) {
            (Some(latest), Some(previous)) => days_between(latest.start, previous.last),
            _ => f64::NAN,
        },
    );
    row.set(
        DaysSinceFirstSeen,
        profile
            .first_seen
            .map_or(f64::NAN, |t| days_between(now, t)),
    );

    let last90: DayStats = days.last_days(today, 90);
    row.set(Purchases30d, f64::from(last30.purchases));
    row.set(Purchases90d, f64::from(last90.purchases));
    row.set(Revenue90d, last90.revenue);
    row.set(
        AvgOrderValue,
        if profile.lifetime_purchases == 0 {
            f64::NAN
        } else {
            profile.lifetime_revenue / f64::from(profile.lifetime_purchases)
        },
    );
    row.set(
        DaysSinceLastPurchase,
        profile
            .last_purchase
            .map_or(f64::NAN, |t| days_between(now, t)),
    );
    row.set(LifetimePurchases, f64::from(profile.lifetime_purchases));
    row.set(EmailOpens30d, f64::from(last30.email_opens));
    row.set(EmailClicks30d, f64::from(last30.email_clicks));

    let mut categorized = 0u32;
    let mut distinct = 0u32;
    for c in &profile.categories {
        let views = c.views(today);
        categorized = categorized.saturating_add(views);
        distinct += u32::from(views > 0);
    }
    let top = profile.top_category(now).map_or(0, |(_, views)| views);
    row.set(TopCategoryShare30d, ratio(top, categorized));
    row.set(DistinctCategories30d, f64::from(distinct));

    row.set(HourOfDay, f64::from(now.hour_of_day()));
    row.set(DayOfWeek, f64::from(now.day_of_week()));
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind, PersonKey, Properties};
    use crate::profile::MAX_CART_LINES;
    use crate::time::MINUTE_MS;

    // The largest values validation accepts.
    use crate::event::{
        MAX_DWELL_SECONDS as DWELL_SECONDS, MAX_ORDER_VALUE as ORDER_VALUE, MAX_PRICE as PRICE,
        MAX_QUANTITY as QUANTITY,
    };

    fn event(kind: EventKind, at: Time, product: &str) -> Event {
        Event {
            id: "e".into(),
            person: PersonKey::User("u".into()),
            linked: None,
            kind,
            time: at,
            properties: Properties {
                product_id: Some(product.into()),
                category: Some(format!("c{}", product.len() % 3)),
                price: Some(PRICE),
                quantity: Some(QUANTITY),
                order_value: Some(ORDER_VALUE),
                dwell_seconds: Some(DWELL_SECONDS),
                ..Properties::default()
            },
            attributes: Default::default(),
        }
    }

    /// Every feature of the row is a finite number that is not negative.
    fn assert_bounded(row: &FeatureRow, when: &str) {
        for (def, value) in FEATURES.iter().zip(row.values()) {
            assert!(
                value.is_finite() && *value >= 0.0,
                "{when}: {} = {value}",
                def.name
            );
        }
    }

    /// The largest accepted amounts, sent as often as a day and the retention allow, and
    /// merged into the same person again and again, never make a feature infinite: the
    /// per-field limits bound each event and the sums saturate.
    #[test]
    fn the_largest_accepted_values_keep_every_feature_finite() {
        let now = Time(1_772_445_600_000);
        let retention = 90 * DAY_MS;
        let mut p = Profile::default();
        let push = |p: &mut Profile, e: Event| {
            e.validate(now, retention).expect("the event is valid");
            p.apply(&e);
        };
        // Purchases of the largest order value, 1,100 a day over the whole retention.
        for day in 0..90 {
            let start = now.plus_ms(-retention + day * DAY_MS);
            for i in 0..1_100 {
                push(
                    &mut p,
                    event(EventKind::Purchase, start.plus_ms(i * 1000), ""),
                );
            }
        }
        // Then, in the open session: a full cart at the largest price and quantity, every
        // line added many times, and product views of the longest dwell time.
        let session = now.plus_ms(-10 * MINUTE_MS);
        for round in 0..20 {
            for line in 0..MAX_CART_LINES + 5 {
                let at = session.plus_ms(round * 1000 + line as i64);
                push(&mut p, event(EventKind::AddToCart, at, &format!("p{line}")));
                push(
                    &mut p,
                    event(EventKind::ProductView, at, &format!("p{line}")),
                );
            }
        }
        push(&mut p, event(EventKind::CheckoutStarted, now, ""));
        assert_bounded(&extract(&p, now), "after the events");

        // The most a cart can hold: every line at the most units a line can count.
        for line in &mut p.cart.lines {
            line.quantity = u32::MAX;
        }
        assert_bounded(&extract(&p, now), "with a full cart");

        // Many identities of the same person merged into one: every counter adds up.
        for _ in 0..1_100 {
            let copy = p.clone();
            p.merge(copy);
        }
        assert_bounded(&extract(&p, now), "after merges");
        assert_bounded(&extract(&p, now.plus_ms(DAY_MS)), "a day later");
    }

    #[test]
    fn the_spec_is_well_formed() {
        let spec = FeatureSpec::current();
        let mut names: Vec<&str> = spec.names().collect();
        assert_eq!(names.len(), FEATURE_COUNT);
        assert!(names.iter().all(|n| n
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FEATURE_COUNT, "feature names are unique");
        assert_eq!(spec.hash.len(), 16);
        assert_eq!(
            spec.index_of("cart_value"),
            Some(Feature::CartValue as usize)
        );
        assert!(FEATURES.iter().all(|f| f.description.ends_with('.')));
    }

    #[test]
    fn a_new_profile_has_zeros_and_missing_values_where_defined() {
        let now = Time(1_772_445_600_000);
        let row = extract(&Profile::default(), now);
        assert_eq!(row.get(Feature::Sessions30d), 0.0);
        assert_eq!(row.get(Feature::CartValue), 0.0);
        assert!(row.get(Feature::DaysSinceLastVisit).is_nan());
        assert!(row.get(Feature::AvgOrderValue).is_nan());
        assert!(row.get(Feature::BounceRate30d).is_nan());
        assert_eq!(row.get(Feature::VisitTrend), 1.0);
        assert_eq!(row.get(Feature::HourOfDay), 10.0);
        // Pure: the same input gives the same bits.
        let again = extract(&Profile::default(), now);
        assert!(row
            .0
            .iter()
            .zip(again.0)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
