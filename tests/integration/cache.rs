//! The shards' cache within its budget: people are evicted, and nothing of theirs is lost —
//! their profiles, their duplicates and their pending timers come back from the store.

use nudge::pb::{self, EventType};
use nudge::time::MINUTE_MS;

use crate::support::*;

const PEOPLE: usize = 3000;

fn user(i: usize) -> String {
    format!("cached-{i}")
}

#[tokio::test]
async fn people_evicted_to_stay_within_the_budget_keep_their_profiles_duplicates_and_timers() {
    let mut config = test_config();
    // 1 MiB for two shards: a few hundred people each, of the thousands below.
    config.engine.cache_mb = 1;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;

    // Two product views and a cart addition each: the cart starts the shipped rules'
    // cart_abandoned wait (30 minutes, or an hour for one variant).
    for chunk in (0..PEOPLE).collect::<Vec<_>>().chunks(100) {
        let mut events = Vec::new();
        for &i in chunk {
            let u = user(i);
            events.push(product_view(
                &format!("{i}-v1"),
                &u,
                T0,
                "p1",
                "shoes",
                None,
            ));
            events.push(product_view(
                &format!("{i}-v2"),
                &u,
                T0,
                "p2",
                "shoes",
                None,
            ));
            let mut add = event(&format!("{i}-a"), &u, EventType::AddToCart, T0);
            props(&mut add).product_id = Some("p1".into());
            props(&mut add).price = Some(10.0);
            events.push(add);
        }
        let response = track(&mut client, events).await;
        assert!(response.results.iter().all(|r| r.error.is_none()));
    }

    let text = server.metrics().await;
    let evicted = metric_value(&text, "nudge_cache_evictions_total").unwrap();
    let bytes = metric_value(&text, "nudge_cache_bytes").unwrap();
    let held = metric_value(&text, "nudge_profiles").unwrap();
    assert!(evicted > 0.0, "nobody was evicted\n{text}");
    assert!(
        bytes <= (1 << 20) as f64,
        "{bytes} bytes held over a 1 MiB budget"
    );
    assert!(held < PEOPLE as f64, "{held} people held");

    // Early people were evicted long ago: their profiles come from the store, and one more
    // event adds to them instead of starting over.
    for i in (0..PEOPLE).step_by(97) {
        let u = user(i);
        let f = features(&mut client, &u).await;
        assert_feature(&f, "product_views_30d", 2.0);
        assert_feature(&f, "cart_items", 1.0);
        let view = product_view(&format!("{i}-v3"), &u, T0, "p3", "shoes", None);
        // The same id again: a duplicate, whether or not the person is in memory.
        let again = product_view(&format!("{i}-v1"), &u, T0, "p1", "shoes", None);
        let response = track(&mut client, vec![view, again]).await;
        let status = |k: usize| response.results[k].status();
        assert_eq!(status(0), pb::EventStatus::Accepted, "{u}");
        assert_eq!(
            status(1),
            pb::EventStatus::Duplicate,
            "{u}: a repeat was applied again"
        );
        assert_feature(&features(&mut client, &u).await, "product_views_30d", 3.0);
    }

    // Every person's wait comes due and is decided once, evicted or not.
    server.tick_at(T0.plus_ms(61 * MINUTE_MS)).await;
    server.tick().await;
    let text = server.metrics().await;
    let decided: f64 = text
        .lines()
        .filter(|l| l.starts_with("nudge_triggers_total{") && l.contains("rule=\"cart_abandoned\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(decided, PEOPLE as f64, "cart_abandoned decisions\n{text}");

    let explained = client
        .explain_triggers(pb::ExplainTriggersRequest {
            person: person(&user(0)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        explained
            .decisions
            .iter()
            .any(|d| d.rule == "cart_abandoned"),
        "{explained:?}"
    );
    server.stop().await.unwrap();
}
