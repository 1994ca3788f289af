//! A scripted browsing session, sent over gRPC, moves the features to exact values.

use nudge::pb::{self, EventStatus, EventType};
use nudge::time::{DAY_MS, MINUTE_MS};

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
