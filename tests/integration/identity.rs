//! Identity stitching: an anonymous visitor who logs in becomes one person with the user;
//! chains, conflicts, retries after a merge, and events racing a merge.

use nudge::pb::{self, EventStatus, EventType};
use nudge::time::{DAY_MS, MINUTE_MS};
use tonic::Code;

use crate::support::*;

fn anonymous(id: &str) -> Option<pb::PersonRef> {
    Some(pb::PersonRef {
        user_id: String::new(),
        anonymous_id: id.to_owned(),
    })
}

fn anon_event(id: &str, device: &str, kind: EventType, at: nudge::time::Time) -> pb::Event {
    let mut e = event(id, "", kind, at);
    e.anonymous_id = device.to_owned();
    e
}

async fn page_views(
    client: &mut nudge::pb::nudge_service_client::NudgeServiceClient<tonic::transport::Channel>,
    who: Option<pb::PersonRef>,
) -> f64 {
    client
        .get_profile(pb::GetProfileRequest {
            person: who,
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner()
        .features
        .into_iter()
        .find(|f| f.name == "page_views_30d")
        .unwrap()
        .value
}

#[tokio::test]
async fn login_merges_the_visitor_into_the_user() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    server.clock.set(T0.plus_ms(20 * MINUTE_MS));
    // The known user visited two days ago; today a visitor browses and adds to the cart.
    let mut add = anon_event("a2", "phone-1", EventType::AddToCart, T0.plus_ms(MINUTE_MS));
    props(&mut add).product_id = Some("sku-9".into());
    props(&mut add).price = Some(30.0);
    track(
        &mut client,
        vec![
            event("u1", "alice", EventType::PageView, T0.plus_ms(-2 * DAY_MS)),
            anon_event("a1", "phone-1", EventType::PageView, T0),
            add,
        ],
    )
    .await;
    // Logging in: an event with both ids.
    let mut login = event(
        "u2",
        "alice",
        EventType::PageView,
        T0.plus_ms(2 * MINUTE_MS),
    );
    login.anonymous_id = "phone-1".into();
    track(&mut client, vec![login]).await;

    let f = features(&mut client, "alice").await;
    assert_feature(&f, "page_views_30d", 3.0);
    assert_feature(&f, "cart_value", 30.0);
    assert_feature(&f, "sessions_30d", 2.0); // the login visit is one session, not two
    assert_feature(&f, "session_page_views", 2.0);
    // The visitor's id now reaches the same person.
    assert_eq!(page_views(&mut client, anonymous("phone-1")).await, 3.0);
    track(
        &mut client,
        vec![anon_event(
            "a3",
            "phone-1",
            EventType::PageView,
            T0.plus_ms(3 * MINUTE_MS),
        )],
    )
    .await;
    assert_feature(&features(&mut client, "alice").await, "page_views_30d", 4.0);
    // A retry of an event sent before the merge is still a duplicate.
    let retry = track(
        &mut client,
        vec![anon_event("a1", "phone-1", EventType::PageView, T0)],
    )
    .await;
    assert_eq!(retry.results[0].status, EventStatus::Duplicate as i32);
    assert_feature(&features(&mut client, "alice").await, "page_views_30d", 4.0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn identify_chains_devices_and_refuses_two_users() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    track(
        &mut client,
        vec![
            anon_event("l1", "laptop", EventType::PageView, T0),
            anon_event("p1", "phone", EventType::PageView, T0.plus_ms(DAY_MS / 2)),
            event("b1", "bob", EventType::PageView, T0.plus_ms(DAY_MS)),
        ],
    )
    .await;
    server.clock.set(T0.plus_ms(DAY_MS));
    let identify = |anonymous_id: &str, user_id: &str| pb::IdentifyRequest {
        anonymous_id: anonymous_id.into(),
        user_id: user_id.into(),
    };
    assert!(
        client
            .identify(identify("laptop", "bob"))
            .await
            .unwrap()
            .into_inner()
            .merged
    );
    assert!(
        client
            .identify(identify("phone", "bob"))
            .await
            .unwrap()
            .into_inner()
            .merged
    );
    assert!(
        !client
            .identify(identify("phone", "bob"))
            .await
            .unwrap()
            .into_inner()
            .merged
    );
    for who in [person("bob"), anonymous("laptop"), anonymous("phone")] {
        assert_eq!(page_views(&mut client, who).await, 3.0);
    }
    let conflict = client
        .identify(identify("phone", "carol"))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::FailedPrecondition);
    assert!(
        conflict.message().contains("another user"),
        "{}",
        conflict.message()
    );
    let missing = client.identify(identify("", "carol")).await.unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    // Carol got nothing of Bob's.
    let carol = client
        .get_profile(pb::GetProfileRequest {
            person: person("carol"),
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(carol.code(), Code::NotFound);
    server.stop().await.unwrap();
}

/// The shard a person lives in, among `shards`, as the engine picks it.
fn shard_of(person: &nudge::event::PersonKey, shards: u64) -> u64 {
    person.stable_hash() % shards
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_racing_a_merge_are_each_counted_once() {
    const SHARDS: u64 = 4;
    const SENDERS: usize = 4;
    const BATCHES: usize = 25;
    let mut config = test_config();
    config.engine.shards = SHARDS as usize;
    let server = TestServer::start_with(config).await;
    let addr = server.grpc_addr;
    // Three races, the merge let go when the senders have had none, a third and two
    // thirds of their batches answered. Each race has its own user and device, in
    // different shards, so the merge crosses shards.
    for (round, release_after) in [0, BATCHES * SENDERS / 3, 2 * BATCHES * SENDERS / 3]
        .into_iter()
        .enumerate()
    {
        let user = format!("racer-{round}");
        let device = (0..)
            .map(|k| format!("racer-{round}-device-{k}"))
            .find(|d| {
                shard_of(&nudge::event::PersonKey::Anonymous(d.clone()), SHARDS)
                    != shard_of(&nudge::event::PersonKey::User(user.clone()), SHARDS)
            })
            .unwrap();
        assert_ne!(
            shard_of(&nudge::event::PersonKey::Anonymous(device.clone()), SHARDS),
            shard_of(&nudge::event::PersonKey::User(user.clone()), SHARDS),
        );
        // Everyone connects first, then all start at once.
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(SENDERS + 1));
        let (answered, mut answers) = tokio::sync::watch::channel(0usize);
        let answered = std::sync::Arc::new(answered);
        let senders: Vec<_> = (0..SENDERS)
            .map(|w| {
                let (start, answered) = (start.clone(), answered.clone());
                let (user, device) = (user.clone(), device.clone());
                tokio::spawn(async move {
                    let mut client = nudge::pb::nudge_service_client::NudgeServiceClient::connect(
                        format!("http://{addr}"),
                    )
                    .await
                    .unwrap();
                    start.wait().await;
                    for batch in 0..BATCHES {
                        let events = (0..4)
                            .map(|j| {
                                let id = format!("r{round}-{w}-{batch}-{j}");
                                let at = T0.plus_ms(j as i64);
                                if (batch + j) % 2 == 0 {
                                    anon_event(&id, &device, EventType::PageView, at)
                                } else {
                                    event(&id, &user, EventType::PageView, at)
                                }
                            })
                            .collect();
                        let r = client.track(pb::TrackRequest { events }).await.unwrap();
                        assert!(r
                            .into_inner()
                            .results
                            .iter()
                            .all(|r| r.status == EventStatus::Accepted as i32));
                        answered.send_modify(|n| *n += 1);
                    }
                })
            })
            .collect();
        let mut client = server.client().await;
        start.wait().await;
        answers
            .wait_for(|n| *n >= release_after)
            .await
            .expect("the senders report");
        let merged = client
            .identify(pb::IdentifyRequest {
                anonymous_id: device.clone(),
                user_id: user.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(merged.merged);
        let when_merged = *answers.borrow();
        for s in senders {
            s.await.unwrap();
        }
        // Whichever batches ran before, during or after the merge, each event counts once,
        // and both ids name the one person.
        let total = (SENDERS * BATCHES * 4) as f64;
        assert_eq!(page_views(&mut client, person(&user)).await, total);
        assert_eq!(page_views(&mut client, anonymous(&device)).await, total);
        eprintln!(
            "race {round}: the merge answered after {when_merged} of {} batches",
            SENDERS * BATCHES
        );
    }
    server.stop().await.unwrap();
}
