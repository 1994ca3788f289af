//! A scripted browsing session, sent over gRPC, moves the features to exact values; the
//! order in which the same events arrive does not change them.

use std::collections::BTreeMap;

use nudge::event::{Event, EventKind, PersonKey, Properties};
use nudge::features::{extract, FeatureRow, FEATURES};
use nudge::pb::{self, EventStatus, EventType};
use nudge::profile::Profile;
use nudge::time::{Time, DAY_MS, MINUTE_MS};

use crate::support::*;

const S: i64 = 1000;

#[tokio::test]
async fn scripted_session_moves_features_to_exact_values() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let u = "shopper-1";

    let mut add = event("e6", u, EventType::AddToCart, T0.plus_ms(500 * S));
    let p = props(&mut add);
    p.product_id = Some("p2".into());
    p.price = Some(80.0);
    p.quantity = Some(2);
    let mut search = event("e5", u, EventType::Search, T0.plus_ms(400 * S));
    props(&mut search).search_query = Some("boots".into());
    let events = vec![
        event("e1", u, EventType::PageView, T0),
        product_view("e2", u, T0.plus_ms(60 * S), "p1", "shoes", Some(40.0)),
        // No dwell: measured by the gap to the next event (180 s).
        product_view("e3", u, T0.plus_ms(120 * S), "p2", "shoes", None),
        // No dwell: closed by the search 100 s later.
        product_view("e4", u, T0.plus_ms(300 * S), "p1", "shoes", None),
        search,
        add,
        product_view("e7", u, T0.plus_ms(600 * S), "p3", "bags", Some(30.0)),
        event("e8", u, EventType::CheckoutStarted, T0.plus_ms(700 * S)),
    ];
    server.clock.set(T0.plus_ms(800 * S));
    let response = track(&mut client, events).await;
    assert!(response
        .results
        .iter()
        .all(|r| r.status == EventStatus::Accepted as i32 && r.scores.len() == 2));

    let f = features(&mut client, u).await;
    for (name, expected) in [
        ("session_duration_s", 700.0),
        ("session_page_views", 5.0),
        ("session_product_views", 4.0),
        ("session_distinct_products", 3.0),
        ("session_product_time_s", 40.0 + 180.0 + 100.0 + 30.0),
        ("session_searches", 1.0),
        ("session_cart_adds", 1.0),
        ("cart_items", 2.0),
        ("cart_value", 160.0),
        ("minutes_since_cart_add", 5.0),
        ("checkout_since_cart_add", 1.0),
        ("sessions_1d", 1.0),
        ("sessions_7d", 1.0),
        ("sessions_30d", 1.0),
        ("sessions_prev_7d", 0.0),
        ("visit_trend", 2.0),
        ("bounce_rate_30d", f64::NAN),
        ("pages_per_session_30d", f64::NAN),
        ("page_views_30d", 5.0),
        ("product_views_30d", 4.0),
        ("cart_adds_30d", 1.0),
        ("searches_30d", 1.0),
        ("days_since_last_visit", 100.0 / 86_400.0),
        ("days_between_sessions", f64::NAN),
        ("days_since_first_seen", 800.0 / 86_400.0),
        ("purchases_30d", 0.0),
        ("purchases_90d", 0.0),
        ("revenue_90d", 0.0),
        ("avg_order_value", f64::NAN),
        ("days_since_last_purchase", f64::NAN),
        ("lifetime_purchases", 0.0),
        ("email_opens_30d", 0.0),
        ("email_clicks_30d", 0.0),
        ("top_category_share_30d", 0.75),
        ("distinct_categories_30d", 2.0),
        ("hour_of_day", 10.0),
        ("day_of_week", 0.0),
    ] {
        assert_feature(&f, name, expected);
    }
    assert_eq!(
        f.len(),
        nudge::features::FEATURE_COUNT,
        "every feature is shown"
    );

    // The open product view (no dwell, no next event) counts its time so far.
    let mut tail = product_view("e8b", u, T0.plus_ms(750 * S), "p4", "bags", None);
    props(&mut tail).price = Some(5.0);
    track(&mut client, vec![tail]).await;
    let f = features(&mut client, u).await;
    assert_feature(&f, "session_product_time_s", 350.0 + 50.0);
    assert_feature(&f, "top_category_share_30d", 0.6);

    // A purchase empties the cart and moves the purchase figures.
    let mut purchase = event("e9", u, EventType::Purchase, T0.plus_ms(900 * S));
    props(&mut purchase).order_value = Some(160.0);
    server.clock.set(T0.plus_ms(1000 * S));
    track(&mut client, vec![purchase]).await;
    let f = features(&mut client, u).await;
    assert_feature(&f, "cart_items", 0.0);
    assert_feature(&f, "cart_value", 0.0);
    assert_feature(&f, "checkout_since_cart_add", 0.0);
    assert_feature(&f, "purchases_30d", 1.0);
    assert_feature(&f, "revenue_90d", 160.0);
    assert_feature(&f, "avg_order_value", 160.0);
    assert_feature(&f, "days_since_last_purchase", 100.0 / 86_400.0);

    // Two days later, a one-page visit opens a second session and ends the first.
    let second = T0.plus_ms(2 * DAY_MS);
    server.clock.set(second.plus_ms(MINUTE_MS));
    track(
        &mut client,
        vec![event("e10", u, EventType::PageView, second)],
    )
    .await;
    let f = features(&mut client, u).await;
    assert_feature(&f, "session_page_views", 1.0);
    assert_feature(&f, "sessions_7d", 2.0);
    assert_feature(&f, "sessions_1d", 1.0);
    assert_feature(&f, "bounce_rate_30d", 0.0);
    assert_feature(&f, "pages_per_session_30d", 6.0);
    assert_feature(
        &f,
        "days_between_sessions",
        (2 * DAY_MS - 900 * S) as f64 / DAY_MS as f64,
    );
    assert_feature(&f, "hour_of_day", 10.0);
    assert_feature(&f, "day_of_week", 2.0);

    // Half an hour of silence ends the second session too: a bounce.
    server.clock.set(second.plus_ms(31 * MINUTE_MS));
    let f = features(&mut client, u).await;
    assert_feature(&f, "session_page_views", 0.0);
    assert_feature(&f, "session_duration_s", 0.0);
    assert_feature(&f, "bounce_rate_30d", 0.5);
    assert_feature(&f, "pages_per_session_30d", 3.5);

    // Eight days on, last week's sessions have moved to the previous week.
    server.clock.set(second.plus_ms(8 * DAY_MS));
    let f = features(&mut client, u).await;
    assert_feature(&f, "sessions_7d", 0.0);
    assert_feature(&f, "sessions_prev_7d", 2.0);
    assert_feature(&f, "visit_trend", 1.0 / 3.0);

    let profile = client
        .get_profile(pb::GetProfileRequest {
            person: person(u),
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(profile.top_category, "shoes");
    // A past buyer whose visits fell to a third week on week is at risk; the shipped
    // segments place everyone somewhere.
    assert_eq!(profile.rule_segments, ["at_risk"]);
    assert!(!profile.segment.is_empty());
    assert!(profile.session.is_none());
    assert_eq!(profile.first_seen, Some(nudge::api::convert::timestamp(T0)));
    assert!(profile.features.iter().all(|f| !f.description.is_empty()));
    server.stop().await.unwrap();
}

#[test]
fn readme_lists_every_feature_with_its_definition() {
    let readme = std::fs::read_to_string(repo_path("README.md")).unwrap();
    for (i, f) in nudge::features::FEATURES.iter().enumerate() {
        let line = format!("| {i} | `{}` | {} |", f.name, f.description);
        assert!(
            readme.contains(&line),
            "README is missing or has a stale line: {line}"
        );
    }
}

/// An `add_to_cart` that arrives after the later `checkout_started` (event time earlier,
/// received later) gives the same features as the two in time order: the minutes since
/// the addition are counted and the checkout is after it.
#[tokio::test]
async fn a_late_cart_addition_gives_the_features_of_the_events_in_order() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let events = |user: &str| {
        let mut add = event("add", user, EventType::AddToCart, T0.plus_ms(2 * MINUTE_MS));
        let p = props(&mut add);
        p.product_id = Some("p1".into());
        p.price = Some(40.0);
        p.quantity = Some(2);
        let checkout = event(
            "checkout",
            user,
            EventType::CheckoutStarted,
            T0.plus_ms(5 * MINUTE_MS),
        );
        let view = product_view("view", user, T0, "p1", "shoes", Some(30.0));
        (view, add, checkout)
    };
    server.clock.set(T0.plus_ms(10 * MINUTE_MS));
    let (view, add, checkout) = events("in-order");
    track(&mut client, vec![view, add, checkout]).await;
    let (view, add, checkout) = events("late-add");
    track(&mut client, vec![view, checkout]).await;
    track(&mut client, vec![add]).await;

    let in_order = features(&mut client, "in-order").await;
    let late = features(&mut client, "late-add").await;
    assert_feature(&late, "minutes_since_cart_add", 8.0);
    assert_feature(&late, "checkout_since_cart_add", 1.0);
    assert_feature(&late, "cart_items", 2.0);
    assert_feature(&late, "cart_value", 80.0);
    for (name, value) in &in_order {
        assert_feature(&late, name, *value);
    }
    server.stop().await.unwrap();
}

/// A browsing history with a cart, built so that every feature is defined by the README's
/// order rules: product views carry their dwell time, and each cart event is one no other
/// cart event makes late (the purchase is days before the addition and the checkout).
fn history(start: Time) -> Vec<Event> {
    let e = |i: usize, kind: EventKind, minute: i64, product: &str| Event {
        id: format!("e{i}"),
        person: PersonKey::User("u".into()),
        linked: None,
        kind,
        time: start.plus_ms(minute * MINUTE_MS),
        properties: Properties {
            product_id: Some(product.to_owned()),
            category: Some(format!("c{}", product.len() % 2)),
            price: Some(40.0),
            quantity: Some(2),
            order_value: Some(55.0),
            dwell_seconds: Some(30.0),
            ..Properties::default()
        },
        attributes: BTreeMap::new(),
    };
    vec![
        e(0, EventKind::Purchase, -3 * 24 * 60, ""),
        e(1, EventKind::PageView, -3 * 24 * 60 - 5, ""),
        e(2, EventKind::PageView, 0, ""),
        e(3, EventKind::ProductView, 1, "p1"),
        e(4, EventKind::AddToCart, 2, "p1"),
        e(5, EventKind::Search, 3, ""),
        e(6, EventKind::EmailOpen, 4, ""),
        e(7, EventKind::CheckoutStarted, 5, ""),
        e(8, EventKind::ProductView, 6, "p22"),
    ]
}

fn row_of(events: &[&Event], now: Time) -> FeatureRow {
    let mut profile = Profile::default();
    for e in events {
        profile.apply(e);
    }
    extract(&profile, now)
}

/// The first feature whose bits differ between two rows.
fn first_difference(a: &FeatureRow, b: &FeatureRow) -> Option<String> {
    FEATURES
        .iter()
        .zip(a.values().iter().zip(b.values()))
        .find(|(_, (x, y))| x.to_bits() != y.to_bits())
        .map(|(f, (x, y))| format!("{}: {x} vs {y}", f.name))
}

/// Every order of arrival of the same events gives the same feature row, bit for bit.
#[test]
fn every_order_of_the_same_events_gives_the_same_features() {
    let now = T0.plus_ms(10 * MINUTE_MS);
    let events = history(T0);
    let in_time_order = {
        let mut sorted: Vec<&Event> = events.iter().collect();
        sorted.sort_by_key(|e| e.time);
        row_of(&sorted, now)
    };
    assert_eq!(
        in_time_order.get(nudge::features::Feature::CheckoutSinceCartAdd),
        1.0
    );
    assert_eq!(
        in_time_order.get(nudge::features::Feature::MinutesSinceCartAdd),
        8.0
    );

    // All 9! = 362,880 orders, by Heap's algorithm.
    let mut order: Vec<&Event> = events.iter().collect();
    let n = order.len();
    let mut c = vec![0; n];
    let mut checked = 1;
    let check = |order: &[&Event]| {
        let row = row_of(order, now);
        if let Some(diff) = first_difference(&in_time_order, &row) {
            let ids: Vec<&str> = order.iter().map(|e| e.id.as_str()).collect();
            panic!("order {ids:?} changes {diff}");
        }
    };
    check(&order);
    let mut i = 0;
    while i < n {
        if c[i] < i {
            order.swap(if i % 2 == 0 { 0 } else { c[i] }, i);
            check(&order);
            checked += 1;
            c[i] += 1;
            i = 0;
        } else {
            c[i] = 0;
            i += 1;
        }
    }
    assert_eq!(checked, (1..=n).product::<usize>());

    // A longer history (several days of visits around the cart) in many shuffled orders.
    let mut long = history(T0);
    for day in 1..7 {
        for (i, mut e) in history(T0.plus_ms(-day * DAY_MS - 7 * MINUTE_MS))
            .into_iter()
            .enumerate()
        {
            let cart = matches!(
                e.kind,
                EventKind::AddToCart | EventKind::CheckoutStarted | EventKind::Purchase
            );
            if !cart {
                e.id = format!("d{day}-{i}");
                long.push(e);
            }
        }
    }
    let mut sorted: Vec<&Event> = long.iter().collect();
    sorted.sort_by_key(|e| e.time);
    let expected = row_of(&sorted, now);
    let mut order: Vec<&Event> = long.iter().collect();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..2_000 {
        // Fisher-Yates with a fixed xorshift sequence, so a failure repeats.
        for i in (1..order.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            order.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let row = row_of(&order, now);
        if let Some(diff) = first_difference(&expected, &row) {
            let ids: Vec<&str> = order.iter().map(|e| e.id.as_str()).collect();
            panic!("order {ids:?} changes {diff}");
        }
    }
}
