//! The real binary, killed with SIGKILL at random moments while events stream in, ten times
//! over: after every restart the client resends what was not acknowledged, and at the end
//! every person's state equals what the pure core computes from all events, each applied
//! exactly once. Acknowledged events are never lost and never counted twice.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nudge::features::{self, FEATURES};
use nudge::pb::{self, EventStatus, EventType};
use nudge::profile::Profile;
use nudge::time::{Clock, SystemClock, Time, DAY_MS, MINUTE_MS};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::support::*;

const PEOPLE: u64 = 25;
const BATCHES: usize = 300;
const BATCH: usize = 10;
const CYCLES: usize = 10;

/// A small deterministic generator (splitmix64), so a failure can be replayed by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Waits (up to 30 s) until the binary's health reports SERVING; returns a connected channel.
pub(crate) async fn until_serving(nudge: &Nudge) -> Channel {
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not SERVING within 30 s; log:\n{}",
            nudge.log()
        );
        if let Ok(channel) = Channel::from_shared(format!("http://{}", nudge.grpc_addr))
            .unwrap()
            .connect()
            .await
        {
            let status = HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: "nudge.v1.NudgeService".into(),
                })
                .await;
            if status.is_ok_and(|s| s.into_inner().status == 1) {
                return channel;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The events, in sending order: every person's events in time order.
fn events(rng: &mut Rng, start: Time) -> Vec<pb::Event> {
    let kinds = [
        EventType::PageView,
        EventType::ProductView,
        EventType::ProductView,
        EventType::Search,
        EventType::AddToCart,
        EventType::RemoveFromCart,
        EventType::CheckoutStarted,
        EventType::Purchase,
        EventType::EmailOpen,
    ];
    let mut clock: Vec<Time> = vec![start; PEOPLE as usize];
    (0..BATCHES * BATCH)
        .map(|i| {
            let p = rng.below(PEOPLE) as usize;
            // Mostly seconds apart, sometimes a new session.
            let gap = if rng.below(20) == 0 {
                40 * MINUTE_MS
            } else {
                1000 + rng.below(60_000) as i64
            };
            clock[p] = clock[p].plus_ms(gap);
            let kind = kinds[rng.below(kinds.len() as u64) as usize];
            let mut e = event(
                &format!("crash-{i}"),
                &format!("person-{p}"),
                kind,
                clock[p],
            );
            let props = props(&mut e);
            props.product_id = Some(format!("sku-{}", rng.below(30)));
            props.category = Some(format!("cat-{}", rng.below(4)));
            props.price = Some(5.0 + rng.below(100) as f64);
            props.order_value = Some(20.0 + rng.below(200) as f64);
            if rng.below(2) == 0 {
                props.dwell_seconds = Some(rng.below(120) as f64);
            }
            e
        })
        .collect()
}

#[tokio::test]
async fn sigkill_loses_nothing_acknowledged_and_counts_nothing_twice() {
    let seed = std::env::var("NUDGE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_u64);
    let mut rng = Rng(seed);
    let data = tempfile::tempdir().unwrap();
    // Event times end a little before now, so none is in the future or too old.
    let start = SystemClock.now().plus_ms(-2 * DAY_MS);
    let all = events(&mut rng, start);
    let batches: Vec<Vec<pb::Event>> = all.chunks(BATCH).map(|c| c.to_vec()).collect();

    let mut next = 0; // the first batch without an acknowledgement
    let mut acknowledged = 0;
    let mut worst_recovery = Duration::ZERO;
    for cycle in 0..=CYCLES {
        let starting = Instant::now();
        let mut child = spawn_nudge(data.path(), &[]).await;
        let channel = until_serving(&child).await;
        worst_recovery = worst_recovery.max(starting.elapsed());
        let mut client = pb::nudge_service_client::NudgeServiceClient::new(channel);
        if cycle == CYCLES {
            // Last round: send the rest without a kill, then check.
            while next < batches.len() {
                let r = client
                    .track(pb::TrackRequest {
                        events: batches[next].clone(),
                    })
                    .await
                    .unwrap();
                assert!(r
                    .into_inner()
                    .results
                    .iter()
                    .all(|r| r.status != EventStatus::Rejected as i32));
                next += 1;
            }
            check(&mut client, &all).await;
            child.kill();
            break;
        }
        let kill_after = Duration::from_millis(50 + rng.below(400));
        // Acknowledgements so far in this cycle.
        let (acks, mut acked_so_far) = tokio::sync::watch::channel(0usize);
        // Send until the kill; the batch in flight when it lands may or may not apply.
        let sender = {
            let batches = batches.clone();
            tokio::spawn(async move {
                let mut acked = next;
                while acked < batches.len() {
                    match client
                        .track(pb::TrackRequest {
                            events: batches[acked].clone(),
                        })
                        .await
                    {
                        Ok(r) => {
                            assert!(r
                                .into_inner()
                                .results
                                .iter()
                                .all(|r| r.status != EventStatus::Rejected as i32));
                            acked += 1;
                            acks.send_modify(|n| *n += 1);
                        }
                        Err(_) => break,
                    }
                }
                acked
            })
        };
        // The first kill's moment counts from the first acknowledgement, so that something
        // acknowledged is at stake however slow the machine is; the others fall anywhere,
        // the middle of a cycle's first batch included.
        if cycle == 0 {
            tokio::time::timeout(Duration::from_secs(30), acked_so_far.wait_for(|n| *n > 0))
                .await
                .expect("a batch is acknowledged within 30 s")
                .expect("the sender reports");
        }
        tokio::time::sleep(kill_after).await;
        child.kill(); // SIGKILL
        let acked = sender.await.unwrap();
        acknowledged += acked - next;
        next = acked;
    }
    assert!(
        acknowledged > 0,
        "the first kill waits for an acknowledgement"
    );
    eprintln!("seed {seed:#x}: {CYCLES} kills, {acknowledged} batches acknowledged before kills, slowest recovery {worst_recovery:?}");
}

/// Every person's features, as of a fixed time, equal the pure core's over all events.
async fn check(
    client: &mut pb::nudge_service_client::NudgeServiceClient<Channel>,
    all: &[pb::Event],
) {
    let as_of = all
        .iter()
        .filter_map(|e| e.event_time.as_ref())
        .map(|t| Time(t.seconds * 1000))
        .max()
        .unwrap()
        .plus_ms(MINUTE_MS);
    let mut reference: BTreeMap<String, Profile> = BTreeMap::new();
    for e in all {
        let event = nudge::api::convert::event(e.clone(), as_of, 365 * DAY_MS).unwrap();
        reference
            .entry(e.user_id.clone())
            .or_default()
            .apply(&event);
    }
    for (user, profile) in &reference {
        let expected = features::extract(profile, as_of);
        let got = client
            .get_profile(pb::GetProfileRequest {
                person: person(user),
                as_of: Some(nudge::api::convert::timestamp(as_of)),
            })
            .await
            .unwrap()
            .into_inner();
        for (def, (want, have)) in FEATURES
            .iter()
            .zip(expected.values().iter().zip(&got.features))
        {
            assert_eq!(def.name, have.name);
            let same = (want.is_nan() && have.value.is_nan()) || *want == have.value;
            assert!(
                same,
                "{user} {}: expected {want}, stored state gives {}",
                def.name, have.value
            );
        }
    }
}
