//! Triggers end to end over real gRPC: conditions, timers across restarts, suppression
//! audit, rule reloads, experiments, SubscribeTriggers resume and webhook delivery to a
//! receiver the test owns.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::transport::Channel;
use tonic::Code;

use nudge::config::{Config, WebhookConfig};
use nudge::pb;
use nudge::pb::nudge_service_client::NudgeServiceClient;
use nudge::pb::EventType;
use nudge::time::{HOUR_MS, MINUTE_MS};

use crate::support::*;

/// A config running `rules` (written to a file in `dir`).
fn config_with_rules(dir: &std::path::Path, rules: &str) -> Config {
    let path = dir.join("rules.toml");
    std::fs::write(&path, rules).unwrap();
    let mut config = test_config();
    config.triggers.rules = path;
    config
}

/// Reads SubscribeTriggers from `cursor` (only `rules`, if any) until `n` triggers
/// arrived. Callers ask for what is committed already, or for what a real process commits
/// by itself; `within` only bounds a hang, and running out of it fails the test.
async fn read(
    client: &mut NudgeServiceClient<Channel>,
    cursor: u64,
    rules: &[&str],
    n: usize,
    within: Duration,
) -> Vec<pb::SubscribeTriggersResponse> {
    let mut stream = client
        .subscribe_triggers(pb::SubscribeTriggersRequest {
            cursor,
            rules: rules.iter().map(|r| (*r).to_owned()).collect(),
        })
        .await
        .expect("subscribes")
        .into_inner();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(m))) => got.push(m),
            Ok(other) => panic!("the stream ended: {other:?}"),
            Err(_) => panic!(
                "{} of {n} triggers after cursor {cursor} arrived within {within:?}: {got:?}",
                got.len()
            ),
        }
    }
    got
}

/// Asserts that nothing was committed after `cursor`: the server refuses a stream that
/// starts after it, as ahead of the newest trigger. A statement about the outbox as it
/// is, not about how long a test waited.
async fn assert_newest(client: &mut NudgeServiceClient<Channel>, cursor: u64) {
    match client
        .subscribe_triggers(pb::SubscribeTriggersRequest {
            cursor: cursor + 1,
            rules: vec![],
        })
        .await
    {
        Err(status) => {
            assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
            assert!(
                status.message().contains("ahead of the newest trigger"),
                "{}",
                status.message()
            );
        }
        Ok(stream) => {
            let mut stream = stream.into_inner();
            let next = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
            panic!("a trigger was committed after cursor {cursor}: {next:?}");
        }
    }
}

/// Everything committed after `cursor`, which must be exactly `n` triggers.
async fn exactly(
    client: &mut NudgeServiceClient<Channel>,
    cursor: u64,
    n: usize,
) -> Vec<pb::SubscribeTriggersResponse> {
    let got = read(client, cursor, &[], n, Duration::from_secs(10)).await;
    assert_newest(client, got.last().map_or(cursor, |m| m.cursor)).await;
    got
}

/// A metric's value, 0 for a series never written.
fn metric_or_zero(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or(0.0)
}

fn add_to_cart(id: &str, user: &str, at: nudge::time::Time) -> pb::Event {
    let mut e = event(id, user, EventType::AddToCart, at);
    let p = props(&mut e);
    p.product_id = Some("p1".into());
    p.price = Some(40.0);
    p.quantity = Some(1);
    e
}

/// A predicate that fires on every page view after another kind of event.
const VIEWS: &str = r#"
    [[rules]]
    name = "views"
    when = "event.kind == 'page_view'"
    action = { type = "v" }
"#;

const CART_RULES: &str = r#"
    [[rules]]
    name = "cart_abandoned"
    absence = { after = ["add_to_cart"], missing = ["checkout_started", "purchase"], within = "30m", follow_ups = ["24h"] }
    action = { type = "cart_reminder", channel = "email", template = "cart-1" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absence_fires_from_its_timer_once_and_a_checkout_cancels_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(config_with_rules(dir.path(), CART_RULES)).await;
    let mut client = server.client().await;
    track(&mut client, vec![add_to_cart("a1", "abandoner", T0)]).await;
    track(&mut client, vec![add_to_cart("b1", "buyer", T0)]).await;
    let mut checkout = event(
        "b2",
        "buyer",
        EventType::CheckoutStarted,
        T0.plus_ms(5 * MINUTE_MS),
    );
    props(&mut checkout).order_value = Some(40.0);
    track(&mut client, vec![checkout]).await;

    let explained = client
        .explain_triggers(pb::ExplainTriggersRequest {
            person: person("abandoner"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(explained.timers.len(), 1);
    assert_eq!(
        explained.timers[0].due,
        Some(nudge::api::convert::timestamp(T0.plus_ms(30 * MINUTE_MS)))
    );

    // A tick just before the deadline fires nothing; one at it, the abandoner's reminder.
    server.tick_at(T0.plus_ms(30 * MINUTE_MS - 1)).await;
    assert_newest(&mut client, 0).await;
    let waiting = client
        .explain_triggers(pb::ExplainTriggersRequest {
            person: person("abandoner"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((waiting.timers.len(), waiting.decisions.len()), (1, 0));
    server.tick_at(T0.plus_ms(30 * MINUTE_MS)).await;
    let got = exactly(&mut client, 0, 1).await;
    let t = got[0].trigger.as_ref().unwrap();
    assert_eq!(
        (t.rule.as_str(), t.user_id.as_str()),
        ("cart_abandoned", "abandoner")
    );
    assert_eq!(t.cause, "timer:a1:0");
    assert_eq!(t.action.as_ref().unwrap().template, "cart-1");
    assert_eq!(
        t.journey_stage, "decision",
        "a full cart is the decision stage"
    );
    assert!(t.scores.contains_key("purchase") && t.scores.contains_key("churn"));
    let contributions = &t.contributions;
    assert!(
        contributions
            .iter()
            .any(|c| c.model == "purchase" && !c.features.is_empty()),
        "LightGBM contributions: {contributions:?}"
    );

    // The follow-up comes 24 hours after the first reminder, not before, and once.
    server
        .tick_at(T0.plus_ms(30 * MINUTE_MS + 24 * HOUR_MS - 1))
        .await;
    assert_newest(&mut client, got[0].cursor).await;
    server
        .tick_at(T0.plus_ms(30 * MINUTE_MS + 24 * HOUR_MS))
        .await;
    let got = exactly(&mut client, got[0].cursor, 1).await;
    assert_eq!(got[0].trigger.as_ref().unwrap().cause, "timer:a1:1");
    server
        .tick_at(T0.plus_ms(30 * MINUTE_MS + 72 * HOUR_MS))
        .await;
    assert_newest(&mut client, got[0].cursor).await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "nudge_triggers_total{outcome=\"delivered\",rule=\"cart_abandoned\"}"
        ),
        Some(2.0)
    );
    assert_eq!(metric_value(&metrics, "nudge_timers_pending"), Some(0.0));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_timers_survive_a_restart_and_overdue_ones_fire_once_after_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = config_with_rules(dir.path(), CART_RULES);
    config.store.dir = data.path().to_owned();

    let server = TestServer::start_with(config.clone()).await;
    let mut client = server.client().await;
    let users: Vec<String> = (0..20).map(|i| format!("restart-{i}")).collect();
    for u in &users {
        track(&mut client, vec![add_to_cart(&format!("{u}-add"), u, T0)]).await;
    }
    server.stop().await.unwrap();

    // Two hours later (the deadline passed while the server was down), twice: the second
    // recovery finds the timers fired and fires nothing.
    let mut fired = BTreeSet::new();
    for round in 0..2 {
        let server = TestServer::start_with(config.clone()).await;
        server.tick_at(T0.plus_ms(2 * HOUR_MS)).await;
        let mut client = server.client().await;
        let got = exactly(&mut client, 0, 20).await;
        let ids: BTreeSet<String> = got
            .iter()
            .map(|m| m.trigger.as_ref().unwrap().trigger_id.clone())
            .collect();
        assert_eq!(ids.len(), 20, "every overdue timer fired, once");
        let fired_now = metric_or_zero(
            &server.metrics().await,
            "nudge_triggers_total{outcome=\"delivered\",rule=\"cart_abandoned\"}",
        );
        if round == 0 {
            assert_eq!(fired_now, 20.0);
            fired = ids;
        } else {
            assert_eq!(
                fired_now, 0.0,
                "nothing fired again after the second restart"
            );
            assert_eq!(ids, fired);
        }
        server.stop().await.unwrap();
    }
}

/// An absence two days long: far past the minutes of timers a shard keeps in memory.
const LONG_WAIT: &str = r#"
    [[rules]]
    name = "long_wait"
    absence = { after = ["add_to_cart"], missing = ["purchase"], within = "2d" }
    action = { type = "cart_reminder" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_due_days_ahead_are_counted_after_a_restart_and_fire_at_their_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = config_with_rules(dir.path(), LONG_WAIT);
    config.store.dir = data.path().to_owned();
    let pending = "nudge_timers_pending";
    let due = |user: &str| -> Vec<String> { vec![format!("timer:{user}-add:0")] };
    let ids = |got: &[pb::SubscribeTriggersResponse]| -> Vec<String> {
        got.iter()
            .map(|m| m.trigger.as_ref().unwrap().cause.clone())
            .collect()
    };

    let server = TestServer::start_with(config.clone()).await;
    let mut client = server.client().await;
    // One timer set before the first tick, one after it (past what that tick loaded).
    track(&mut client, vec![add_to_cart("early-add", "early", T0)]).await;
    server.tick_at(T0).await;
    let later = T0.plus_ms(MINUTE_MS);
    server.clock.set(later);
    track(&mut client, vec![add_to_cart("later-add", "later", later)]).await;
    assert_eq!(metric_value(&server.metrics().await, pending), Some(2.0));
    server.stop().await.unwrap();

    // After the restart both are counted before any tick has loaded a timer.
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    assert_eq!(metric_value(&server.metrics().await, pending), Some(2.0));
    let two_days = 2 * 24 * HOUR_MS;
    server.tick_at(T0.plus_ms(two_days - 1)).await;
    assert_newest(&mut client, 0).await;
    server.tick_at(T0.plus_ms(two_days)).await;
    let got = exactly(&mut client, 0, 1).await;
    assert_eq!(ids(&got), due("early"));
    server.tick_at(later.plus_ms(two_days)).await;
    let got = exactly(&mut client, got[0].cursor, 1).await;
    assert_eq!(ids(&got), due("later"));
    assert_eq!(metric_value(&server.metrics().await, pending), Some(0.0));

    // One set while this server runs, two days past its ticks: it fires at its time too.
    let now = later.plus_ms(two_days);
    track(&mut client, vec![add_to_cart("late-add", "late", now)]).await;
    assert_eq!(metric_value(&server.metrics().await, pending), Some(1.0));
    server.tick_at(now.plus_ms(two_days - 1)).await;
    assert_newest(&mut client, got[0].cursor).await;
    server.tick_at(now.plus_ms(two_days)).await;
    let got = exactly(&mut client, got[0].cursor, 1).await;
    assert_eq!(ids(&got), due("late"));
    assert_eq!(metric_value(&server.metrics().await, pending), Some(0.0));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predicates_fire_once_per_crossing_and_suppressions_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let rules = r#"
        [[rules]]
        name = "engaged"
        priority = 2
        when = "session_product_time_s > 300.0 && session_distinct_products >= 3.0"
        cooldown = "1h"
        action = { type = "recommend" }

        [[rules]]
        name = "any_intent"
        priority = 1
        threshold = { score = "purchase", above = 0.000001 }
        when = "segment != '' && size(segments) > 0"
        action = { type = "hello" }
    "#;
    let server = TestServer::start_with(config_with_rules(dir.path(), rules)).await;
    let mut client = server.client().await;
    let mut t = T0;
    let mut views = Vec::new();
    for (i, product) in ["p1", "p2", "p3", "p4"].iter().enumerate() {
        t = t.plus_ms(MINUTE_MS);
        views.push(product_view(
            &format!("v{i}"),
            "shopper",
            t,
            product,
            "shoes",
            Some(110.0),
        ));
    }
    track(&mut client, views).await;
    let got = exactly(&mut client, 0, 2).await;
    let rules_fired: Vec<&str> = got
        .iter()
        .map(|m| m.trigger.as_ref().unwrap().rule.as_str())
        .collect();
    // The threshold fires on the first event (segment conditions hold: the shipped
    // segments file is loaded); "engaged" once its predicate became true (third view),
    // not again on the fourth.
    assert_eq!(rules_fired, ["any_intent", "engaged"], "{got:?}");

    // A new session (35 minutes later) makes the predicate true again, within the cooldown.
    t = t.plus_ms(35 * MINUTE_MS);
    let again: Vec<pb::Event> = ["p5", "p6", "p7"]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            product_view(
                &format!("w{i}"),
                "shopper",
                t.plus_ms(i as i64 * MINUTE_MS),
                p,
                "shoes",
                Some(110.0),
            )
        })
        .collect();
    track(&mut client, again).await;
    let explained = client
        .explain_triggers(pb::ExplainTriggersRequest {
            person: person("shopper"),
        })
        .await
        .unwrap()
        .into_inner();
    let outcomes: Vec<(String, String)> = explained
        .decisions
        .iter()
        .map(|d| (d.rule.clone(), d.outcome.clone()))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("any_intent".to_owned(), "delivered".to_owned()),
            ("engaged".to_owned(), "delivered".to_owned()),
            ("engaged".to_owned(), "cooldown".to_owned()),
        ]
    );
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "nudge_triggers_total{outcome=\"cooldown\",rule=\"engaged\"}"
        ),
        Some(1.0)
    );

    // Erasure takes the person's delivered triggers out of the outbox too.
    track(
        &mut client,
        vec![product_view("o1", "other", t, "p1", "shoes", None)],
    )
    .await;
    client
        .delete_user(pb::DeleteUserRequest {
            person: person("shopper"),
        })
        .await
        .unwrap();
    let left = exactly(&mut client, 0, 1).await;
    let users: Vec<&str> = left
        .iter()
        .map(|m| m.trigger.as_ref().unwrap().user_id.as_str())
        .collect();
    assert_eq!(users, ["other"]);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rules_file_is_refused_with_every_problem_and_the_old_rules_keep_running() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_rules(dir.path(), CART_RULES);
    let path = config.triggers.rules.clone();
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let before = client
        .reload_rules(pb::ReloadRulesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.rules, ["cart_abandoned"]);

    std::fs::write(
        &path,
        r#"
        [[rules]]
        name = "broken"
        when = "cart_items >"
        action = { type = "x" }

        [[rules]]
        name = "typo"
        absence = { after = ["add_to_kart"], missing = ["purchase"], within = "30m" }
        action = { type = "x" }
        "#,
    )
    .unwrap();
    let err = client
        .reload_rules(pb::ReloadRulesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("rule \"broken\": when"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("add_to_kart"), "{}", err.message());

    // The old rules still run: an abandoned cart still fires.
    track(&mut client, vec![add_to_cart("a1", "still", T0)]).await;
    server.tick_at(T0.plus_ms(HOUR_MS)).await;
    let fired = exactly(&mut client, 0, 1).await;
    assert_eq!(fired[0].trigger.as_ref().unwrap().rule, "cart_abandoned");

    // A good file is picked up by the file watcher, without a call.
    std::fs::write(
        &path,
        format!("{CART_RULES}\n[[rules]]\nname = \"second\"\nwhen = \"cart_items > 0\"\naction = {{ type = \"y\" }}\n"),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = server.metrics().await;
        if metric_value(&metrics, "nudge_rules_loaded") == Some(2.0) {
            assert_eq!(
                metric_value(&metrics, "nudge_rules_reloads_total{outcome=\"refused\"}"),
                Some(1.0)
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new rules were not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holdouts_are_recorded_not_delivered_and_outcomes_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let rules = r#"
        [[rules]]
        name = "welcome"
        when = "event.kind == 'page_view'"
        action = { type = "welcome" }
        experiment = { name = "welcome_copy", holdout = 0.3, conversion_window = "1d", variants = [
            { name = "a", template = "A" },
            { name = "b", template = "B" },
        ] }
    "#;
    let server = TestServer::start_with(config_with_rules(dir.path(), rules)).await;
    let mut client = server.client().await;
    let n = 300;
    for i in 0..n {
        let user = format!("person-{i}");
        let mut events = vec![event(&format!("{user}-pv"), &user, EventType::PageView, T0)];
        if i % 2 == 0 {
            let mut buy = event(
                &format!("{user}-buy"),
                &user,
                EventType::Purchase,
                T0.plus_ms(HOUR_MS),
            );
            props(&mut buy).order_value = Some(20.0);
            events.push(buy);
        }
        track(&mut client, events).await;
    }
    let report = client
        .get_experiment_report(pb::GetExperimentReportRequest {
            rule: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let by_variant: BTreeMap<String, (u64, u64)> = report
        .variants
        .iter()
        .map(|v| (v.variant.clone(), (v.exposures, v.conversions)))
        .collect();
    assert_eq!(by_variant.keys().collect::<Vec<_>>(), ["a", "b", "holdout"]);
    assert!(report
        .variants
        .iter()
        .all(|v| v.experiment == "welcome_copy"));
    let exposures: u64 = by_variant.values().map(|v| v.0).sum();
    let conversions: u64 = by_variant.values().map(|v| v.1).sum();
    assert_eq!((exposures, conversions), (n, n / 2));
    // 30% holdout of 300: five standard deviations is about 40 people.
    let holdout = by_variant["holdout"].0 as f64;
    assert!((holdout - 90.0).abs() < 40.0, "holdout {holdout}");

    // Only the non-holdout triggers are delivered, each with its variant's template.
    let delivered = exactly(
        &mut client,
        0,
        (exposures - by_variant["holdout"].0) as usize,
    )
    .await;
    for m in &delivered {
        let t = m.trigger.as_ref().unwrap();
        let expected = if t.variant == "a" { "A" } else { "B" };
        assert_eq!(t.action.as_ref().unwrap().template, expected);
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_resume_from_their_cursor_and_filter_by_rule() {
    let dir = tempfile::tempdir().unwrap();
    let searches = r#"
        [[rules]]
        name = "searches"
        when = "event.kind == 'search'"
        action = { type = "s" }
    "#;
    let rules = &[VIEWS, searches].concat();
    let mut config = config_with_rules(dir.path(), rules);
    config.server.shutdown_grace_seconds = 60;
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    for i in 0..10 {
        let kind = if i % 2 == 0 {
            EventType::PageView
        } else {
            EventType::Search
        };
        track(
            &mut client,
            vec![event(&format!("e{i}"), &format!("u{i}"), kind, T0)],
        )
        .await;
    }
    let all = exactly(&mut client, 0, 10).await;
    let cursors: Vec<u64> = all.iter().map(|m| m.cursor).collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "{cursors:?}");
    // Reconnecting after the fourth resumes with the fifth: nothing missed, nothing again.
    let resumed = exactly(&mut client, all[3].cursor, 6).await;
    assert_eq!(
        resumed.iter().map(|m| m.cursor).collect::<Vec<_>>(),
        cursors[4..].to_vec()
    );
    // The filter passes the five searches and only them; the last of them is the newest
    // trigger, so there is nothing after it to pass.
    let searches = read(&mut client, 0, &["searches"], 5, Duration::from_secs(10)).await;
    let expected: Vec<u64> = all
        .iter()
        .filter(|m| m.trigger.as_ref().unwrap().rule == "searches")
        .map(|m| m.cursor)
        .collect();
    assert_eq!(
        searches.iter().map(|m| m.cursor).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(expected.len(), 5);
    assert!(searches
        .iter()
        .all(|m| m.trigger.as_ref().unwrap().rule == "searches"));
    // A live subscriber gets new triggers as they commit. The stream opens at the newest
    // trigger, so there is nothing to catch up on: what arrives was committed after it
    // opened, and a second one after the first had arrived.
    let last = *cursors.last().unwrap();
    assert_newest(&mut client, last).await;
    let mut live = client
        .subscribe_triggers(pb::SubscribeTriggersRequest {
            cursor: last,
            rules: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let (mut before_latest, mut latest) = (last, last);
    for user in ["u-late", "u-later"] {
        track(
            &mut client,
            vec![event(&format!("{user}-pv"), user, EventType::PageView, T0)],
        )
        .await;
        let m = tokio::time::timeout(Duration::from_secs(10), live.message())
            .await
            .expect("the live stream delivers within 10 s")
            .unwrap()
            .expect("the stream stays open");
        assert_eq!(m.trigger.as_ref().unwrap().user_id, user);
        assert!(m.cursor > latest);
        assert_newest(&mut client, m.cursor).await;
        (before_latest, latest) = (latest, m.cursor);
    }

    let err = client
        .subscribe_triggers(pb::SubscribeTriggersRequest {
            cursor: 1_000_000,
            rules: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(err.message().starts_with("cursor:"), "{}", err.message());

    // Shutting down ends open streams at once with UNAVAILABLE and the cursor to resume
    // from, rather than holding the shutdown for its grace period.
    // The stream reads the newest trigger, so it is open and at the head.
    let mut open = client
        .subscribe_triggers(pb::SubscribeTriggersRequest {
            cursor: before_latest,
            rules: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(open.message().await.unwrap().unwrap().cursor, latest);
    // The grace period is a minute (see the config above): a stop that waited for the
    // stream would take that long, one that does not takes a small part of it even on a
    // loaded machine.
    let stopped = std::time::Instant::now();
    server.stop().await.unwrap();
    assert!(
        stopped.elapsed() < Duration::from_secs(30),
        "{:?}",
        stopped.elapsed()
    );
    let end = open.message().await.unwrap_err();
    assert_eq!(end.code(), Code::Unavailable);
    assert!(
        end.message().contains("resume from cursor"),
        "{}",
        end.message()
    );
}

/// What the test's webhook receiver saw.
#[derive(Default)]
struct Received {
    requests: usize,
    /// webhook-id of each request answered 2xx.
    delivered: Vec<String>,
    /// webhook-id of every request.
    all: Vec<String>,
    bad_signatures: usize,
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A Standard Webhooks receiver: slow for the first 3 requests, then 503 and 429 with
/// Retry-After for the next 3 each, then 200. Verifies every signature.
async fn receiver(listener: tokio::net::TcpListener, seen: Arc<Mutex<Received>>) {
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                let header = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned()
                };
                let (id, ts, sig) = (
                    header("webhook-id"),
                    header("webhook-timestamp"),
                    header("webhook-signature"),
                );
                let key = base64::engine::general_purpose::STANDARD
                    .decode(SECRET.trim_start_matches("whsec_"))
                    .unwrap();
                let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
                mac.update(format!("{id}.{ts}.").as_bytes());
                mac.update(&body);
                let expected = format!(
                    "v1,{}",
                    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
                );
                let n = {
                    let mut s = seen.lock().unwrap();
                    s.requests += 1;
                    s.all.push(id.clone());
                    if sig != expected {
                        s.bad_signatures += 1;
                    }
                    s.requests
                };
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(json["data"]["trigger_id"], id.as_str());
                let answer = match n {
                    1..=3 => {
                        tokio::time::sleep(Duration::from_millis(800)).await;
                        (StatusCode::OK, [("retry-after", "0")])
                    }
                    4..=6 => (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")]),
                    7..=9 => (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]),
                    _ => (StatusCode::OK, [("retry-after", "0")]),
                };
                // The slow answers come after the sender gave up: not deliveries.
                if n > 9 {
                    seen.lock().unwrap().delivered.push(id);
                }
                answer
            }
        }),
    );
    axum::serve(listener, app).await.unwrap();
}

fn webhook(name: &str, port: u16) -> WebhookConfig {
    WebhookConfig {
        name: name.into(),
        url: format!("http://127.0.0.1:{port}/hook"),
        secret: SECRET.into(),
        secret_file: None,
        rules: vec![],
        concurrency: 2,
        rate_per_second: 200.0,
        max_attempts: 30,
        initial_backoff_ms: 50,
        max_backoff_ms: 1000,
        timeout_ms: 300,
        // The test's receiver listens on loopback.
        allow_internal_addresses: true,
        format: Default::default(),
        cloudevents_source: "/nudge".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_arrive_signed_through_a_receiver_that_is_down_slow_and_refusing() {
    let dir = tempfile::tempdir().unwrap();
    let rules = VIEWS;
    // The receiver's port, bound but not listening: connections to it are refused, and no
    // other test can take it before the receiver listens.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    let mut config = config_with_rules(dir.path(), rules);
    config.triggers.webhooks = vec![webhook("crm", port)];
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let n = 12;
    for i in 0..n {
        track(
            &mut client,
            vec![event(
                &format!("e{i}"),
                &format!("hook-{i}"),
                EventType::PageView,
                T0,
            )],
        )
        .await;
    }
    let expected: BTreeSet<String> = exactly(&mut client, 0, n)
        .await
        .into_iter()
        .map(|m| m.trigger.unwrap().trigger_id)
        .collect();
    assert_eq!(expected.len(), n);

    // Down: nothing listens, so connections are refused, until the sender has seen that
    // and scheduled retries (the receiver has served nobody yet, so every retry so far is
    // a refused connection).
    let retried = "nudge_webhook_deliveries_total{endpoint=\"crm\",result=\"retried\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let refused = metric_or_zero(&server.metrics().await, retried);
        if refused >= 2.0 {
            break refused;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refused delivery was retried"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seen = Arc::new(Mutex::new(Received::default()));
    let listener = socket.listen(1024).unwrap();
    let receiver = tokio::spawn(receiver(listener, seen.clone()));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let delivered: BTreeSet<String> = seen.lock().unwrap().delivered.iter().cloned().collect();
        if delivered == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivered {} of {n}",
            delivered.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.bad_signatures, 0);
    assert!(
        seen.all.iter().all(|id| expected.contains(id)),
        "only known ids"
    );
    assert!(
        seen.requests > n,
        "the slow, 503 and 429 answers were retried"
    );
    let metrics = server.metrics().await;
    let retried = metric_or_zero(&metrics, retried);
    assert!(
        retried >= 9.0 + refused,
        "retried {retried}: {refused} refused connections, then 3 slow, 3 503 and 3 429 answers"
    );
    // The cursor catches up: nothing is left for the endpoint.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metric_value(
        &server.metrics().await,
        "nudge_outbox_depth{endpoint=\"crm\"}",
    ) != Some(0.0)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cursor did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await.unwrap();
    receiver.abort();
}

/// A request the CloudEvents receiver took: its headers (lowercase names) and body.
type Request = (BTreeMap<String, String>, Vec<u8>);

/// What the CloudEvents Python SDK reads from `requests` (tests/fixtures/cloudevents_parse.py):
/// per request, the event's attributes and data.
fn cloudevents_sdk_reads(requests: &[Request]) -> Vec<serde_json::Value> {
    use std::io::Write as _;
    let input: Vec<serde_json::Value> = requests
        .iter()
        .map(|(headers, body)| {
            serde_json::json!({
                "headers": headers,
                "body": base64::engine::general_purpose::STANDARD.encode(body),
            })
        })
        .collect();
    let mut child = std::process::Command::new(python())
        .arg(repo_path("tests/fixtures/cloudevents_parse.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the test command installs .tools/pyenv with cloudevents");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(&input).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the SDK refused what Nudge sent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_webhooks_in_both_modes_are_read_by_the_sdk_and_stay_signed() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let taken: Arc<Mutex<BTreeMap<String, Vec<Request>>>> = Arc::default();
    let app = {
        let taken = taken.clone();
        axum::Router::new().route(
            "/{mode}",
            axum::routing::post(
                move |axum::extract::Path(mode): axum::extract::Path<String>,
                      headers: axum::http::HeaderMap,
                      body: axum::body::Bytes| {
                    let taken = taken.clone();
                    async move {
                        let headers = headers
                            .iter()
                            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
                            .collect();
                        let mut taken = taken.lock().unwrap();
                        taken
                            .entry(mode)
                            .or_default()
                            .push((headers, body.to_vec()));
                        axum::http::StatusCode::NO_CONTENT
                    }
                },
            ),
        )
    };
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut config = config_with_rules(dir.path(), VIEWS);
    let mut binary = webhook("binary", port);
    binary.url = format!("http://127.0.0.1:{port}/binary");
    binary.format = nudge::delivery::webhook::Format::CloudeventsBinary;
    binary.cloudevents_source = "/nudge/test".into();
    let mut structured = webhook("structured", port);
    structured.url = format!("http://127.0.0.1:{port}/structured");
    structured.format = nudge::delivery::webhook::Format::CloudeventsStructured;
    structured.cloudevents_source = "/nudge/test".into();
    config.triggers.webhooks = vec![binary, structured];
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    // A space and a non-ASCII letter in one id: percent-encoded in a binary-mode header.
    for (i, user) in ["ce-a", "ann é"].into_iter().enumerate() {
        track(
            &mut client,
            vec![event(&format!("ce-{i}"), user, EventType::PageView, T0)],
        )
        .await;
    }
    let triggers: BTreeMap<String, pb::Trigger> = exactly(&mut client, 0, 2)
        .await
        .into_iter()
        .map(|m| {
            let t = m.trigger.unwrap();
            (t.trigger_id.clone(), t)
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = server.metrics().await;
        let delivered = |endpoint: &str| {
            metric_or_zero(
                &metrics,
                &format!("nudge_webhook_deliveries_total{{endpoint=\"{endpoint}\",result=\"delivered\"}}"),
            )
        };
        if delivered("binary") == 2.0 && delivered("structured") == 2.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken = std::mem::take(&mut *taken.lock().unwrap());
    for (mode, content_type) in [
        ("binary", "application/json"),
        ("structured", "application/cloudevents+json"),
    ] {
        let requests = &taken[mode];
        assert_eq!(requests.len(), 2, "{mode}: one request per trigger");
        let key = base64::engine::general_purpose::STANDARD
            .decode(SECRET.trim_start_matches("whsec_"))
            .unwrap();
        for (headers, body) in requests {
            assert_eq!(headers["content-type"], content_type);
            // The Standard Webhooks signature covers the body in every format.
            let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
            mac.update(
                format!(
                    "{}.{}.",
                    headers["webhook-id"], headers["webhook-timestamp"]
                )
                .as_bytes(),
            );
            mac.update(body);
            let expected = format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
            );
            assert_eq!(headers["webhook-signature"], expected, "{mode}");
        }
        let events = cloudevents_sdk_reads(requests);
        let mut seen = BTreeSet::new();
        for (event, (headers, _)) in events.iter().zip(requests) {
            let a = &event["attributes"];
            let id = a["id"].as_str().unwrap();
            let trigger = &triggers[id];
            assert_eq!(headers["webhook-id"], id, "{mode}: ce-id is the webhook id");
            assert_eq!(a["specversion"], "1.0");
            assert_eq!(a["source"], "/nudge/test");
            assert_eq!(
                a["type"], "dev.nudge.trigger.v",
                "{mode}: the action's type"
            );
            assert_eq!(a["nudgerule"], "views");
            assert_eq!(a["subject"], trigger.user_id.as_str());
            let time = trigger.time.as_ref().unwrap();
            let time = jiff::Timestamp::new(time.seconds, time.nanos).unwrap();
            let read: jiff::Timestamp = a["time"].as_str().unwrap().parse().unwrap();
            assert_eq!(read, time, "{mode}: ce-time is the trigger's time");
            assert_eq!(event["data"]["trigger_id"], id);
            assert_eq!(event["data"]["rule"], "views");
            assert_eq!(event["data"]["user_id"], trigger.user_id.as_str());
            seen.insert(id.to_owned());
        }
        assert_eq!(seen.len(), 2, "{mode}: both triggers, once each");
    }
    server.stop().await.unwrap();
    receiver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_that_keeps_failing_becomes_a_dead_letter_and_does_not_block_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let rules = VIEWS;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut config = config_with_rules(dir.path(), rules);
    let mut hook = webhook("flaky", port);
    hook.max_attempts = 3;
    config.triggers.webhooks = vec![hook];
    let data = tempfile::tempdir().unwrap();
    config.store.dir = data.path().to_owned();
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    // The receiver refuses the "poison" person's trigger forever and takes the others.
    let delivered = Arc::new(Mutex::new(BTreeSet::new()));
    let app = {
        let delivered = delivered.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let delivered = delivered.clone();
                async move {
                    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let user = json["data"]["user_id"].as_str().unwrap().to_owned();
                    if user == "poison" {
                        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    delivered.lock().unwrap().insert(user);
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        )
    };
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    for user in ["first", "poison", "third", "fourth"] {
        track(
            &mut client,
            vec![event(&format!("{user}-e"), user, EventType::PageView, T0)],
        )
        .await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = server.metrics().await;
        let dead = metric_value(
            &metrics,
            "nudge_webhook_deliveries_total{endpoint=\"flaky\",result=\"dead_letter\"}",
        );
        if dead == Some(1.0)
            && metric_value(&metrics, "nudge_outbox_depth{endpoint=\"flaky\"}") == Some(0.0)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        delivered
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect::<Vec<_>>(),
        ["first", "fourth", "third"]
    );
    let dead = client
        .list_dead_letters(pb::ListDeadLettersRequest {
            endpoint: "flaky".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 3);
    assert!(dead[0].last_error.contains("500"), "{}", dead[0].last_error);
    assert_eq!(dead[0].trigger.as_ref().unwrap().user_id, "poison");
    server.stop().await.unwrap();
    receiver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_survive_sigkill_of_the_binary_and_fire_once() {
    use nudge::time::{Clock, SystemClock};
    let rules_dir = tempfile::tempdir().unwrap();
    let rules = rules_dir.path().join("rules.toml");
    // The real binary runs on the system clock: the timers must come due in real time,
    // late enough that they are still pending when the first process is killed.
    std::fs::write(
        &rules,
        CART_RULES.replace("within = \"30m\"", "within = \"4s\""),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let env = [
        ("NUDGE__TRIGGERS__RULES", rules.display().to_string()),
        ("NUDGE__TRIGGERS__TICK_MS", "50".to_owned()),
    ];
    let pending = "nudge_timers_pending";
    let delivered = "nudge_triggers_total{outcome=\"delivered\",rule=\"cart_abandoned\"}";
    let mut child = spawn_nudge(data.path(), &env).await;
    let mut client = NudgeServiceClient::new(crate::crash::until_serving(&child).await);
    let now = SystemClock.now();
    let people: Vec<String> = (0..10).map(|i| format!("killed-{i}")).collect();
    for p in &people {
        track(&mut client, vec![add_to_cart(&format!("{p}-add"), p, now)]).await;
    }
    // Killed with every timer pending and none fired.
    let metrics = child.metrics().await;
    assert_eq!(
        (
            metric_value(&metrics, pending),
            metric_or_zero(&metrics, delivered)
        ),
        (Some(10.0), 0.0),
        "the timers are pending at the kill"
    );
    child.kill();

    // The restarted binary fires each once when it comes due (a real wait, for a real
    // clock: read until all ten arrived). The firing schedules each person's 24-hour
    // follow-up, so the ten pending afterwards are those, and nothing else can fire in
    // this test. A second kill and restart then fires nothing.
    let mut fired = BTreeSet::new();
    for round in 0..2 {
        let mut child = spawn_nudge(data.path(), &env).await;
        let mut client = NudgeServiceClient::new(crate::crash::until_serving(&child).await);
        let got = read(&mut client, 0, &[], 10, Duration::from_secs(30)).await;
        let ids: BTreeSet<String> = got
            .iter()
            .map(|m| m.trigger.as_ref().unwrap().trigger_id.clone())
            .collect();
        assert_eq!(ids.len(), 10, "round {round}: {got:?}");
        let metrics = child.metrics().await;
        assert_eq!(
            metric_value(&metrics, pending),
            Some(10.0),
            "round {round}: only the follow-ups are pending"
        );
        assert_eq!(
            metric_or_zero(&metrics, delivered),
            if round == 0 { 10.0 } else { 0.0 },
            "round {round}: triggers this process delivered"
        );
        assert_newest(&mut client, got.last().unwrap().cursor).await;
        if round == 0 {
            fired = ids;
        } else {
            assert_eq!(
                ids, fired,
                "the same triggers, none new after a second kill"
            );
        }
        child.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_follow_a_visitor_who_logs_in_and_leave_with_an_erased_person() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(config_with_rules(dir.path(), CART_RULES)).await;
    let mut client = server.client().await;
    let mut visit = add_to_cart("v1", "", T0);
    visit.anonymous_id = "device-9".into();
    track(&mut client, vec![visit]).await;
    client
        .identify(pb::IdentifyRequest {
            anonymous_id: "device-9".into(),
            user_id: "known-9".into(),
        })
        .await
        .unwrap();
    track(&mut client, vec![add_to_cart("e1", "erased", T0)]).await;
    client
        .delete_user(pb::DeleteUserRequest {
            person: person("erased"),
        })
        .await
        .unwrap();
    let erased = client
        .explain_triggers(pb::ExplainTriggersRequest {
            person: person("erased"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(erased.timers.is_empty() && erased.decisions.is_empty());
    let known = client
        .explain_triggers(pb::ExplainTriggersRequest {
            person: person("known-9"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        known.timers.len(),
        1,
        "the visitor's timer is the user's now"
    );

    server.tick_at(T0.plus_ms(HOUR_MS)).await;
    let got = exactly(&mut client, 0, 1).await;
    let t = got[0].trigger.as_ref().unwrap();
    assert_eq!(
        (t.user_id.as_str(), t.cause.as_str()),
        ("known-9", "timer:v1:0")
    );
    server.stop().await.unwrap();
}
