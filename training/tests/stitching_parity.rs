//! Training and serving compute the same features for the same history, logins included:
//! one simulated history — anonymous browsing, then a login carrying both ids, then user-id
//! events, some people on several devices — goes through the trainer's replay
//! (`dataset::Builder`) and through a live server over real gRPC, and at several
//! checkpoints every feature of every id (each user id and each device's anonymous id) must
//! be the same in both, compared exactly (IEEE equality, NaN equal to NaN; no tolerance).
//! Whether an id is known at all must agree too.

use std::sync::Arc;

use tonic::transport::Channel;

use nudge::api::convert::timestamp;
use nudge::app::Server;
use nudge::config::{Config, SyncPolicy};
use nudge::event::{Event, PersonKey};
use nudge::pb;
use nudge::pb::nudge_service_client::NudgeServiceClient;
use nudge::time::{ManualClock, Time, DAY_MS, HOUR_MS};
use nudge_training::dataset::Builder;
use nudge_training::simulate::{self, SimConfig};

const DAYS: i64 = 14;

/// The simulation's start, its ids, and its events in one time order.
fn history() -> (Time, Vec<PersonKey>, Vec<Event>, usize) {
    let config = SimConfig {
        people: 400,
        days: DAYS,
        start: Time(1_767_571_200_000), // 2026-01-05, a Monday
        seed: 11,
    };
    let histories = simulate::simulate(&config);
    let keys: Vec<PersonKey> = histories.iter().flat_map(|h| h.keys().cloned()).collect();
    let logins = histories.iter().flat_map(|h| h.logins()).count();
    let multi = histories.iter().filter(|h| h.logins().count() > 1).count();
    eprintln!(
        "{} people, {logins} logins, {multi} people logged in on several devices",
        histories.len()
    );
    assert!(logins >= 100, "only {logins} logins");
    assert!(
        multi >= 5,
        "only {multi} people logged in on several devices"
    );
    let mut events: Vec<Event> = histories.into_iter().flat_map(|h| h.events).collect();
    eprintln!("{} events", events.len());
    // One order for both paths: by time; a stable sort keeps each person's own order.
    events.sort_by_key(|e| e.time);
    (config.start, keys, events, logins)
}

/// The wire form of a simulated event: both ids when the event is a login.
fn wire(e: &Event) -> pb::Event {
    let (user_id, anonymous_id) = match (&e.person, &e.linked) {
        (PersonKey::User(u), Some(PersonKey::Anonymous(a))) => (u.clone(), a.clone()),
        (PersonKey::User(u), _) => (u.clone(), String::new()),
        (PersonKey::Anonymous(a), _) => (String::new(), a.clone()),
    };
    let kind = pb::EventType::from_str_name(&format!(
        "EVENT_TYPE_{}",
        e.kind.as_str().to_ascii_uppercase()
    ))
    .expect("every event kind has a wire type");
    let p = e.properties.clone();
    pb::Event {
        event_id: e.id.clone(),
        user_id,
        anonymous_id,
        r#type: kind.into(),
        event_time: Some(timestamp(e.time)),
        properties: Some(pb::EventProperties {
            product_id: p.product_id,
            category: p.category,
            price: p.price,
            quantity: p.quantity,
            order_value: p.order_value,
            page: p.page,
            search_query: p.search_query,
            dwell_seconds: p.dwell_seconds,
            order_id: p.order_id,
            campaign_id: p.campaign_id,
        }),
        attributes: e.attributes.clone().into_iter().collect(),
    }
}

fn person_ref(key: &PersonKey) -> Option<pb::PersonRef> {
    let (user_id, anonymous_id) = match key {
        PersonKey::User(u) => (u.clone(), String::new()),
        PersonKey::Anonymous(a) => (String::new(), a.clone()),
    };
    Some(pb::PersonRef {
        user_id,
        anonymous_id,
    })
}

/// The server's features for `key` as of `at`; `None` when it does not know the id.
async fn served(
    client: &mut NudgeServiceClient<Channel>,
    key: &PersonKey,
    at: Time,
) -> Option<Vec<f64>> {
    let request = pb::GetProfileRequest {
        person: person_ref(key),
        as_of: Some(timestamp(at)),
    };
    match client.get_profile(request).await {
        Ok(r) => Some(r.into_inner().features.iter().map(|f| f.value).collect()),
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(s) => panic!("GetProfile {key:?}: {s}"),
    }
}

/// Exact IEEE equality, NaN equal to NaN. (So -0 equals 0: proto3 does not send a field
/// equal to its default, and -0.0 compares equal to 0.0, so an empty cart's -0 arrives as 0.)
fn same(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainer_and_server_stitch_identities_into_the_same_features() {
    let (start, keys, events, logins) = history();

    let data = tempfile::tempdir().unwrap();
    let models = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.store.dir = data.path().to_owned();
    // Fsync is not what this test is about; sync in the background.
    config.store.sync = SyncPolicy::Interval;
    config.models.dir = models.path().to_owned();
    config.models.watch = false;
    config.triggers.rules = Default::default();
    config.engine.shards = 2;
    let clock = Arc::new(ManualClock::new(events[0].time));
    let mut server = Server::bind(config, clock.clone()).await.expect("binds");
    let _ticker = server.manual_ticks();
    let addr = server.grpc_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = NudgeServiceClient::new(channel);

    // Checkpoints in the evenings of days 3, 6, 10 and 14, and after the last event, at hours when many sessions are open.
    let checkpoints: Vec<Time> = [2, 5, 9, DAYS - 1]
        .iter()
        .map(|d| start.plus_ms(d * DAY_MS + 20 * HOUR_MS))
        .chain([events.last().unwrap().time.plus_ms(1)])
        .collect();
    let mut builder = Builder::default();
    let mut next = 0;
    let (mut compared, mut mismatches, mut first) = (0usize, 0usize, Vec::new());
    for &checkpoint in &checkpoints {
        let upto = next + events[next..].partition_point(|e| e.time <= checkpoint);
        // Both paths see the same events in the same order. The server merges a batch's
        // logins before applying any of its events, so a login starts a new batch: its
        // merge then happens after every earlier event, as in the trainer.
        while next < upto {
            let mut end = next + 1;
            while end < upto && end - next < 500 && events[end].linked.is_none() {
                end += 1;
            }
            let batch = &events[next..end];
            clock.set(batch.last().unwrap().time);
            let answer = client
                .track(pb::TrackRequest {
                    events: batch.iter().map(wire).collect(),
                })
                .await
                .expect("Track answers")
                .into_inner();
            for r in &answer.results {
                assert_eq!(
                    r.status,
                    pb::EventStatus::Accepted as i32,
                    "{}: {:?}",
                    r.event_id,
                    r.error
                );
            }
            for e in batch {
                builder.push(e).unwrap();
            }
            next = end;
        }
        clock.set(checkpoint);
        for key in &keys {
            let trained = builder.features(key, checkpoint).map(|r| r.0.to_vec());
            let serving = served(&mut client, key, checkpoint).await;
            match (&trained, &serving) {
                (Some(t), Some(s)) => {
                    for (i, (a, b)) in t.iter().zip(s).enumerate() {
                        compared += 1;
                        if !same(*a, *b) {
                            mismatches += 1;
                            if first.len() < 5 {
                                let name = nudge::features::FEATURES[i].name;
                                first.push(format!(
                                    "{key:?} at {checkpoint:?}: {name} trained {a} served {b}"
                                ));
                            }
                        }
                    }
                }
                (None, None) => {}
                _ => {
                    mismatches += 1;
                    if first.len() < 5 {
                        first.push(format!(
                            "{key:?} at {checkpoint:?}: known to the trainer {}, to the server {}",
                            trained.is_some(),
                            serving.is_some()
                        ));
                    }
                }
            }
        }
    }
    eprintln!(
        "{compared} feature values compared at {} checkpoints, {mismatches} differ",
        checkpoints.len()
    );
    // Every login linked a visitor in the trainer (none refused: each device is one person's).
    assert_eq!(builder.links(), (logins, 0));
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    assert!(compared > 10_000, "only {compared} values compared");
    assert_eq!(
        mismatches,
        0,
        "{mismatches} of {compared} feature values differ between training and serving over {} events; first: {first:#?}",
        events.len()
    );
}
