//! Acknowledged means durable; retries change nothing; late and too-old events; erasure;
//! overload; the streaming API.

use std::path::Path;
use std::sync::Arc;

use nudge::pb::{self, EventStatus, EventType};
use nudge::store::{Store, SyncMode};
use nudge::time::{DAY_MS, HOUR_MS, MINUTE_MS};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::support::*;

fn profile_request(user: &str) -> pb::GetProfileRequest {
    pb::GetProfileRequest {
        person: person(user),
        as_of: Some(nudge::api::convert::timestamp(T0.plus_ms(HOUR_MS))),
    }
}

/// Whether any file under `dir` contains `needle`.
fn files_contain(dir: &Path, needle: &[u8]) -> bool {
    file_containing(dir, needle).is_some()
}

/// A file under `dir` that contains `needle`, if any.
fn file_containing(dir: &Path, needle: &[u8]) -> Option<std::path::PathBuf> {
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    return Some(path);
                }
            }
        }
    }
    None
}

#[tokio::test]
async fn acknowledged_events_survive_a_restart() {
    survive_a_restart(nudge::config::SyncPolicy::Always).await;
}

#[tokio::test]
async fn acknowledged_events_survive_a_restart_in_interval_mode() {
    survive_a_restart(nudge::config::SyncPolicy::Interval).await;
}

async fn survive_a_restart(sync: nudge::config::SyncPolicy) {
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.store.dir = data.path().to_owned();
    config.store.sync = sync;
    config.store.sync_interval_ms = 20;

    let server = TestServer::start_with(config.clone()).await;
    let mut client = server.client().await;
    let events: Vec<pb::Event> = (0..20)
        .map(|i| {
            product_view(
                &format!("d{i}"),
                "durable",
                T0.plus_ms(i * MINUTE_MS),
                &format!("p{}", i % 5),
                "shoes",
                Some(12.0),
            )
        })
        .collect();
    track(&mut client, events).await;
    let before = client
        .get_profile(profile_request("durable"))
        .await
        .unwrap()
        .into_inner();
    server.stop().await.unwrap();

    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let after = client
        .get_profile(profile_request("durable"))
        .await
        .unwrap()
        .into_inner();
    // Debug text, so that NaN (a missing value) compares equal to itself.
    assert_eq!(format!("{before:?}"), format!("{after:?}"));
    let f = features(&mut client, "durable").await;
    assert_feature(&f, "product_views_30d", 20.0);
    // A retry after the restart is still a duplicate.
    let retry = track(
        &mut client,
        vec![product_view(
            "d3",
            "durable",
            T0.plus_ms(3 * MINUTE_MS),
            "p3",
            "shoes",
            Some(12.0),
        )],
    )
    .await;
    assert_eq!(retry.results[0].status, EventStatus::Duplicate as i32);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_retried_event_changes_nothing_within_the_horizon() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut purchase = event("order-1", "buyer", EventType::Purchase, T0);
    props(&mut purchase).order_value = Some(99.0);

    let first = track(&mut client, vec![purchase.clone()]).await;
    assert_eq!(first.results[0].status, EventStatus::Accepted as i32);
    // Twice in one batch, and again later: one purchase.
    let again = track(&mut client, vec![purchase.clone(), purchase.clone()]).await;
    assert!(again
        .results
        .iter()
        .all(|r| r.status == EventStatus::Duplicate as i32));
    assert_eq!(
        again.results[0].scores.len(),
        2,
        "a duplicate still answers scores"
    );
    let f = features(&mut client, "buyer").await;
    assert_feature(&f, "lifetime_purchases", 1.0);
    assert_feature(&f, "revenue_90d", 99.0);

    // Past the 24-hour horizon the id is forgotten: the same id is a new event.
    server.clock.set(T0.plus_ms(25 * HOUR_MS));
    let later = track(&mut client, vec![purchase]).await;
    assert_eq!(later.results[0].status, EventStatus::Accepted as i32);
    assert_feature(
        &features(&mut client, "buyer").await,
        "lifetime_purchases",
        2.0,
    );

    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "nudge_events_total{outcome=\"duplicate\",source=\"grpc\",type=\"purchase\"}"
        ),
        Some(2.0)
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn late_events_land_in_their_own_day_and_old_ones_are_refused() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    server.clock.set(T0.plus_ms(HOUR_MS));
    track(
        &mut client,
        vec![event("now", "late", EventType::PageView, T0)],
    )
    .await;
    // Three days late, then 91 days late.
    let r = track(
        &mut client,
        vec![
            event("late", "late", EventType::PageView, T0.plus_ms(-3 * DAY_MS)),
            event(
                "ancient",
                "late",
                EventType::PageView,
                T0.plus_ms(-91 * DAY_MS),
            ),
        ],
    )
    .await;
    assert_eq!(r.results[0].status, EventStatus::Accepted as i32);
    let error = r.results[1].error.as_ref().unwrap();
    assert_eq!(
        (error.field.as_str(), error.reason.as_str()),
        ("events[1].event_time", "too_old")
    );
    let f = features(&mut client, "late").await;
    assert_feature(&f, "sessions_7d", 2.0);
    assert_feature(&f, "sessions_1d", 1.0);
    assert_feature(&f, "page_views_30d", 2.0);
    assert_feature(&f, "days_between_sessions", 3.0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn delete_user_erases_everything_durably() {
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.store.dir = data.path().to_owned();
    let server = TestServer::start_with(config.clone()).await;
    let mut client = server.client().await;
    let canary = "canary-erase-5be1c0de";
    let mut linked = product_view("c2", canary, T0, "p1", "shoes", None);
    linked.anonymous_id = "device-5be1c0de".into();
    track(
        &mut client,
        vec![event("c1", canary, EventType::PageView, T0), linked],
    )
    .await;

    let erased = client
        .delete_user(pb::DeleteUserRequest {
            person: person(canary),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(erased.existed);
    for who in [
        person(canary),
        Some(pb::PersonRef {
            user_id: String::new(),
            anonymous_id: "device-5be1c0de".into(),
        }),
    ] {
        let err = client
            .get_profile(pb::GetProfileRequest {
                person: who,
                as_of: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    let again = client
        .delete_user(pb::DeleteUserRequest {
            person: person(canary),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.existed, "erasing twice is harmless");
    // The retried event is not a duplicate any more: its record went with the person.
    let retry = track(
        &mut client,
        vec![event("c1", "someone-else", EventType::PageView, T0)],
    )
    .await;
    assert_eq!(retry.results[0].status, EventStatus::Accepted as i32);
    server.stop().await.unwrap();

    // After compaction (`nudge compact`) nothing of the person is left in the files.
    Store::vacuum(data.path()).unwrap();
    if let Some(file) = file_containing(data.path(), canary.as_bytes()) {
        panic!("the erased id is still on disk in {}", file.display());
    }
    assert!(!files_contain(data.path(), b"5be1c0de"));
    assert!(
        files_contain(data.path(), b"someone-else"),
        "the check can see live data"
    );
    let store = Store::open(data.path(), SyncMode::Always).unwrap();
    assert!(store
        .load_profile(&nudge::event::PersonKey::User("someone-else".into()))
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn pseudonymized_ids_never_reach_the_store() {
    let data = tempfile::tempdir().unwrap();
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), b"a-secret-key-of-32-bytes-or-so!!").unwrap();
    let mut config = test_config();
    config.store.dir = data.path().to_owned();
    config.identity.pseudonymize_key_file = Some(key.path().to_owned());
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let email = "jane.doe+canary@example.com";
    let mut e = product_view("ev-1", email, T0, "p1", "shoes", Some(3.0));
    e.anonymous_id = "cookie-canary-77".into();
    track(&mut client, vec![e]).await;
    // The raw id still finds the person.
    assert_feature(
        &features(&mut client, email).await,
        "product_views_30d",
        1.0,
    );
    server.stop().await.unwrap();
    // Not even the journal holds them.
    assert!(!files_contain(data.path(), b"jane.doe"));
    assert!(!files_contain(data.path(), b"cookie-canary"));
    assert!(
        files_contain(data.path(), b"shoes"),
        "the check can see live data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_answered_at_once_and_loses_nothing_acknowledged() {
    const CALLS: usize = 64;
    const EVENTS: usize = 50;
    const WAVES: usize = 20;
    let data = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.store.dir = data.path().to_owned();
    config.engine.shards = 1;
    config.engine.queue_capacity = 1;
    let server = TestServer::start_with(config.clone()).await;
    // Waves of concurrent batches, each for a person of its own, until one was refused and
    // one accepted. The first batch of a wave finds the queue empty (timers tick only when
    // the test asks, so nothing else queues) and is accepted by construction; a refusal
    // needs two batches waiting while the shard works, which a loaded machine makes more
    // likely, not less. The bound keeps a server that never refuses from looping forever.
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    for wave in 0..WAVES {
        if !accepted.is_empty() && !refused.is_empty() {
            break;
        }
        // Every caller connects first; then all send at once.
        let start = Arc::new(tokio::sync::Barrier::new(CALLS));
        let calls: Vec<_> = (0..CALLS)
            .map(|i| {
                let server_addr = server.grpc_addr;
                let start = start.clone();
                tokio::spawn(async move {
                    let mut client = pb::nudge_service_client::NudgeServiceClient::connect(
                        format!("http://{server_addr}"),
                    )
                    .await
                    .unwrap();
                    let user = format!("crowd-{wave}-{i}");
                    let events = (0..EVENTS)
                        .map(|j| {
                            event(
                                &format!("{user}-{j}"),
                                &user,
                                EventType::PageView,
                                T0.plus_ms(j as i64),
                            )
                        })
                        .collect();
                    start.wait().await;
                    (user, client.track(pb::TrackRequest { events }).await)
                })
            })
            .collect();
        for call in calls {
            match call.await.unwrap() {
                (user, Ok(_)) => accepted.push(user),
                (user, Err(status)) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    refused.push(user);
                }
            }
        }
    }
    assert!(
        !refused.is_empty(),
        "{WAVES} waves of {CALLS} concurrent batches into a queue of one: none was refused"
    );
    assert!(!accepted.is_empty(), "the first batch finds an empty queue");
    // A refused batch applied nothing; an accepted one applied all, and it survives a
    // restart.
    let check = |server: &TestServer| {
        let (accepted, refused) = (accepted.clone(), refused.clone());
        let addr = server.grpc_addr;
        async move {
            let mut client =
                pb::nudge_service_client::NudgeServiceClient::connect(format!("http://{addr}"))
                    .await
                    .unwrap();
            for user in &accepted {
                assert_feature(
                    &features(&mut client, user).await,
                    "page_views_30d",
                    EVENTS as f64,
                );
            }
            for user in &refused {
                let err = client
                    .get_profile(pb::GetProfileRequest {
                        person: person(user),
                        as_of: None,
                    })
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), Code::NotFound, "{user} was refused");
            }
        }
    };
    check(&server).await;
    server.stop().await.unwrap();
    let server = TestServer::start_with(config).await;
    check(&server).await;
    eprintln!(
        "overload: {} accepted, {} refused",
        accepted.len(),
        refused.len()
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn track_stream_acknowledges_every_batch_in_order() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let requests: Vec<pb::TrackStreamRequest> = (0..50u64)
        .map(|seq| pb::TrackStreamRequest {
            sequence: seq,
            events: (0..10)
                .map(|j| {
                    event(
                        &format!("s{seq}-{j}"),
                        &format!("streamer-{}", j % 3),
                        EventType::PageView,
                        T0.plus_ms(j),
                    )
                })
                .collect(),
        })
        .collect();
    let mut acks = client
        .track_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut sequences = Vec::new();
    while let Some(ack) = acks.next().await {
        let ack = ack.unwrap();
        assert!(ack
            .results
            .iter()
            .all(|r| r.status == EventStatus::Accepted as i32));
        sequences.push(ack.sequence);
    }
    assert_eq!(sequences, (0..50).collect::<Vec<_>>());
    let mut sum = 0.0;
    for i in 0..3 {
        sum += features(&mut client, &format!("streamer-{i}")).await["page_views_30d"];
    }
    assert_eq!(sum, 500.0);
    server.stop().await.unwrap();
}
