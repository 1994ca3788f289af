//! Trigger benchmark:
//!
//! 1. rule evaluation cost per event in the pure core (`evaluate_event`), with no rules,
//!    the 5 shipped rules and 50 rules of every kind;
//! 2. event-to-trigger latency under sustained ingest through the real gRPC server (default
//!    durable mode, both models, 50 rules): from sending a Track batch to a subscriber
//!    receiving the trigger an event in it caused;
//! 3. timers: memory with many pending, and how many fire per second when they all come due.
//!
//! `cargo bench --bench triggers`. NUDGE_BENCH_TIMERS sets the timer count (default 200,000).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{percentile, rss_bytes, Running};
use nudge::config::Config;
use nudge::event::{Event, EventKind, PersonKey, Properties};
use nudge::features::{self, FeatureRow};
use nudge::heap::HeapSize;
use nudge::pb::{self, nudge_service_client::NudgeServiceClient};
use nudge::profile::Profile;
use nudge::time::{Clock, ManualClock, SystemClock, Time, MINUTE_MS};
use nudge::trigger::rules::RuleSet;
use nudge::trigger::{self, Contribution, Facts, TriggerState};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

const KINDS: [pb::EventType; 8] = [
    pb::EventType::PageView,
    pb::EventType::ProductView,
    pb::EventType::ProductView,
    pb::EventType::Search,
    pb::EventType::ProductView,
    pb::EventType::AddToCart,
    pb::EventType::CheckoutStarted,
    pb::EventType::Purchase,
];

/// Fifty rules: 10 thresholds, 30 predicates over features, the event and segments, and
/// 10 absences, with cooldowns, exclusions, a frequency cap of `cap`, quiet hours and an
/// experiment.
fn fifty_rules(cap: u32) -> String {
    let mut text = format!(
        "[limits]\nmax_per_person = {cap}\nper = \"24h\"\n\n[quiet_hours]\nfrom = \"23:00\"\nto = \"06:00\"\n\n",
    );
    for i in 0..10 {
        let model = if i % 2 == 0 { "purchase" } else { "churn" };
        let above = 0.5 + 0.04 * i as f64;
        text += &format!(
            "[[rules]]\nname = \"threshold_{i}\"\npriority = {i}\nthreshold = {{ score = \"{model}\", above = {above:.2}, rearm_below = {:.2} }}\ncooldown = \"12h\"\nexclude = {{ purchased_within = \"24h\" }}\naction = {{ type = \"t{i}\" }}\n\n",
            above - 0.05
        );
    }
    for i in 0..30 {
        let when = match i % 5 {
            0 => format!(
                "session_product_time_s > {}.0 && session_distinct_products >= {}.0",
                60 + i * 10,
                2 + i % 3
            ),
            1 => format!("event.kind == 'search' && searches_30d > {}.0", i % 7),
            2 => format!(
                "'at_risk' in segments && days_since_last_visit > {}.0",
                i % 10
            ),
            3 => format!(
                "cart_value > {}.0 && stage == 'decision' && scores.purchase > 0.{}",
                20 + i,
                i % 9
            ),
            _ => format!(
                "event.kind == 'product_view' && event.category == 'c{}' && segment != ''",
                i % 7
            ),
        };
        text += &format!(
            "[[rules]]\nname = \"predicate_{i}\"\npriority = {}\nwhen = \"{when}\"\ncooldown = \"1h\"\naction = {{ type = \"p{i}\", params = {{ k = \"{i}\" }} }}\n\n",
            i % 7
        );
    }
    for i in 0..10 {
        let experiment = if i == 0 {
            "experiment = { name = \"timing\", holdout = 0.1, variants = [{ name = \"a\" }, { name = \"b\", within = \"2h\" }] }\n"
        } else {
            ""
        };
        text += &format!(
            "[[rules]]\nname = \"absence_{i}\"\nabsence = {{ after = [\"add_to_cart\"], missing = [\"checkout_started\", \"purchase\"], within = \"{}m\", follow_ups = [\"24h\"] }}\n{experiment}action = {{ type = \"a{i}\" }}\n\n",
            30 + i
        );
    }
    text
}

fn core_events(people: usize, count: usize) -> Vec<Event> {
    let kinds = [
        EventKind::PageView,
        EventKind::ProductView,
        EventKind::ProductView,
        EventKind::Search,
        EventKind::ProductView,
        EventKind::AddToCart,
        EventKind::CheckoutStarted,
        EventKind::Purchase,
    ];
    let start = Time(1_772_445_600_000);
    (0..count)
        .map(|i| Event {
            id: format!("e{i}"),
            person: PersonKey::User(format!("u{}", i % people)),
            linked: None,
            kind: kinds[(i / people) % kinds.len()],
            time: start.plus_ms((i as i64) * MINUTE_MS / 20),
            properties: Properties {
                product_id: Some(format!("p{}", i % 97)),
                category: Some(format!("c{}", i % 7)),
                price: Some(20.0 + (i % 13) as f64),
                order_value: Some(55.0),
                dwell_seconds: (i % 3 == 0).then_some(45.0),
                ..Properties::default()
            },
            attributes: Default::default(),
        })
        .collect()
}

/// Rule evaluation per event, in the core: rows are precomputed so only rules are timed.
fn evaluation_cost() {
    println!(
        "\n1. rule evaluation per event (pure core, 1 thread; features and scores precomputed)"
    );
    println!(
        "{:<40} {:>10} {:>10} {:>14}",
        "rules", "p50 µs", "p99 µs", "events/s"
    );
    let people = 1000;
    let events = core_events(people, 100_000);
    let mut profiles: HashMap<PersonKey, Profile> = HashMap::new();
    let rows: Vec<FeatureRow> = events
        .iter()
        .map(|e| {
            let p = profiles.entry(e.person.clone()).or_default();
            p.apply(e);
            features::extract(p, e.time)
        })
        .collect();
    // The memory a rules file reads is taken per event as the engine takes it (only the
    // parts it reads); its cost is added to that file's evaluations.
    let memories = |needs: trigger::MemoryNeeds| -> Vec<(trigger::Memory, Duration)> {
        let mut profiles: HashMap<PersonKey, Profile> = HashMap::new();
        events
            .iter()
            .map(|e| {
                let p = profiles.entry(e.person.clone()).or_default();
                p.apply(e);
                let started = Instant::now();
                let memory = trigger::Memory::of(p, Some(e), e.time, needs);
                (memory, started.elapsed())
            })
            .collect()
    };
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules.toml"),
    )
    .unwrap();
    // The shipped file without its two context rules (the product-level camera rule and
    // the category one): what the context rules cost, beside the rest in the same run.
    let without_context: String = shipped
        .split("\n[[rules]]\n")
        .filter(|block| {
            !block.contains("considering_high_end_product")
                && !block.contains("category_new_arrivals")
        })
        .collect::<Vec<_>>()
        .join("\n[[rules]]\n");
    let context_rules = RuleSet::parse(&shipped).unwrap().rules.len();
    let plain_rules = RuleSet::parse(&without_context).unwrap().rules.len();
    assert!(
        context_rules > plain_rules,
        "the shipped file has context rules"
    );
    for (label, text) in [
        ("none".to_owned(), String::new()),
        (
            format!("{plain_rules} (shipped, without context rules)"),
            without_context,
        ),
        (
            format!("{context_rules} (shipped config/rules.toml)"),
            shipped,
        ),
        ("50 (every kind)".to_owned(), fifty_rules(5)),
    ] {
        let rules = RuleSet::parse(&text).unwrap();
        let mut states: HashMap<PersonKey, TriggerState> = HashMap::new();
        let explain = |_: &str| Vec::<Contribution>::new();
        let mut samples = Vec::with_capacity(events.len());
        let mut fired = 0usize;
        let memories = memories(rules.memory_needs);
        let started_all = Instant::now();
        for (i, ((event, row), (memory, memory_cost))) in
            events.iter().zip(&rows).zip(&memories).enumerate()
        {
            let scores = [
                ("purchase".to_owned(), (i % 100) as f64 / 100.0),
                ("churn".to_owned(), ((i * 7) % 100) as f64 / 100.0),
            ];
            let segments = nudge::segments::rule_segments(row);
            let started = Instant::now();
            let state = states.entry(event.person.clone()).or_default();
            let facts = Facts {
                person: &event.person,
                row,
                scores: &scores,
                segment: Some("casual"),
                segments: &segments,
                history: Default::default(),
                memory,
                explain: &explain,
                now: event.time,
            };
            fired += std::hint::black_box(trigger::evaluate(
                &rules,
                state,
                &facts,
                trigger::Cause::Event(event),
            ))
            .firings
            .len();
            samples.push(started.elapsed() + *memory_cost);
        }
        let total =
            started_all.elapsed() + memories.iter().map(|(_, cost)| *cost).sum::<Duration>();
        samples.sort();
        println!(
            "{:<40} {:>10.2} {:>10.2} {:>14.0}   ({} decisions)",
            label,
            percentile(&samples, 0.5) * 1e3,
            percentile(&samples, 0.99) * 1e3,
            events.len() as f64 / total.as_secs_f64(),
            fired
        );
    }
    // What the product memory costs per person, in the profiles these events built
    // (1000 people, 100 events each over 97 products and 7 categories).
    let size = |p: &Profile| std::mem::size_of::<Profile>() + p.heap_bytes();
    let products = |p: &Profile| p.products().heap_bytes();
    let n = profiles.len() as f64;
    let total: usize = profiles.values().map(size).sum();
    let memory: usize = profiles.values().map(products).sum();
    println!(
        "  resident bytes per person (profile struct + heap): {:.0}, of which product memory {:.0} ({:.1} products each; without it {:.0})",
        total as f64 / n,
        memory as f64 / n,
        profiles.values().map(|p| p.products().len()).sum::<usize>() as f64 / n,
        (total - memory) as f64 / n
    );
}

fn config(dir: &std::path::Path, rules: &str, tick_ms: u64) -> Config {
    let path = dir.join("rules.toml");
    std::fs::write(&path, rules).unwrap();
    let mut config = Config::default();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.models.dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    config.store.dir = dir.join("data");
    config.engine.queue_capacity = 4096;
    config.triggers.rules = path;
    config.triggers.tick_ms = tick_ms;
    config
}

fn wire_event(i: u64, people: u64, now: Time) -> pb::Event {
    pb::Event {
        event_id: format!("b{i}"),
        user_id: format!("bench-{}", i % people),
        anonymous_id: String::new(),
        // Each person goes through the kinds in turn.
        r#type: KINDS[((i / people + i % people) % KINDS.len() as u64) as usize].into(),
        event_time: Some(nudge::api::convert::timestamp(now)),
        properties: Some(pb::EventProperties {
            product_id: Some(format!("sku-{}", i % 500)),
            category: Some(format!("c{}", i % 7)),
            price: Some(25.0),
            quantity: Some(1),
            order_value: Some(50.0),
            dwell_seconds: Some(40.0),
            ..Default::default()
        }),
        attributes: HashMap::new(),
    }
}

/// Event to trigger at a sustained rate: `rate` events/s for `seconds`, 4 paced streams.
async fn latency_under_ingest(rate: u64, seconds: u64) {
    let dir = tempfile::tempdir().unwrap();
    // The cap is lifted so that every probe is delivered.
    let probe = "[[rules]]\nname = \"probe\"\npriority = 100\nwhen = \"event.kind == 'add_to_cart'\"\naction = { type = \"probe\" }\n\n";
    let running = common::start(
        config(dir.path(), &(fifty_rules(1_000_000) + probe), 1000),
        Arc::new(SystemClock),
    )
    .await;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    // The subscriber: probe triggers only; the cause names the event.
    let subscriber = {
        let (addr, sent) = (running.addr.clone(), sent.clone());
        tokio::spawn(async move {
            let mut client = NudgeServiceClient::connect(addr).await.unwrap();
            let mut stream = client
                .subscribe_triggers(pb::SubscribeTriggersRequest {
                    cursor: 0,
                    rules: vec!["probe".into()],
                })
                .await
                .unwrap()
                .into_inner();
            let mut latencies = Vec::new();
            while let Ok(Some(m)) = stream.message().await {
                let cause = m.trigger.unwrap().cause;
                let id = cause.trim_start_matches("event:");
                if let Some(at) = sent.lock().unwrap().remove(id) {
                    latencies.push(at.elapsed());
                }
            }
            latencies
        })
    };
    let streams = 4u64;
    let batch = 100u64;
    let pace = Duration::from_secs_f64((batch * streams) as f64 / rate as f64);
    let until = Instant::now() + Duration::from_secs(seconds);
    let people = 2_000;
    let started = Instant::now();
    let mut senders = Vec::new();
    for s in 0..streams {
        let (addr, sent) = (running.addr.clone(), sent.clone());
        senders.push(tokio::spawn(async move {
            let mut client = NudgeServiceClient::connect(addr).await.unwrap();
            let (tx, rx) = mpsc::channel::<pb::TrackStreamRequest>(16);
            let batch_sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
            let feeder_sent = batch_sent.clone();
            let feeder = tokio::spawn(async move {
                let batch_sent = feeder_sent;
                let mut tick = tokio::time::interval(pace);
                let mut seq = 0u64;
                while Instant::now() < until {
                    tick.tick().await;
                    let now = SystemClock.now();
                    let events: Vec<pb::Event> = (0..batch)
                        .map(|k| wire_event((seq * streams + s) * batch + k, people, now))
                        .collect();
                    {
                        let mut sent = sent.lock().unwrap();
                        let at = Instant::now();
                        for e in &events {
                            if e.r#type == pb::EventType::AddToCart as i32 {
                                sent.insert(e.event_id.clone(), at);
                            }
                        }
                        batch_sent.lock().unwrap().insert(seq, at);
                    }
                    if tx
                        .send(pb::TrackStreamRequest {
                            sequence: seq,
                            events,
                        })
                        .await
                        .is_err()
                    {
                        break;
                    }
                    seq += 1;
                }
                seq * batch
            });
            let mut acks = client
                .track_stream(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let mut ack_latencies = Vec::new();
            while let Some(ack) = acks.next().await {
                let ack = ack.expect("no batch is refused at this load");
                if let Some(at) = batch_sent.lock().unwrap().remove(&ack.sequence) {
                    ack_latencies.push(at.elapsed());
                }
            }
            (feeder.await.unwrap(), ack_latencies)
        }));
    }
    let mut events = 0;
    let mut acks = Vec::new();
    for s in senders {
        let (sent, latencies) = s.await.unwrap();
        events += sent;
        acks.extend(latencies);
    }
    acks.sort();
    let achieved = events as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let Running { stop, task, .. } = running;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    let mut latencies = subscriber.await.unwrap();
    latencies.sort();
    println!(
        "  {:>6.0} events/s for {seconds} s, 50 rules + probe: {} triggers received; event -> subscriber p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} probes never arrived",
        achieved,
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
        sent.lock().unwrap().len()
    );
    println!(
        "          (the same batches' Track acknowledgements: p50 {:.2} ms, p99 {:.2} ms)",
        percentile(&acks, 0.5),
        percentile(&acks, 0.99)
    );
}

/// Loads `n` people with a cart each (one pending timer each), then lets them all come due.
async fn timers(n: u64) {
    let dir = tempfile::tempdir().unwrap();
    let rules = "[[rules]]\nname = \"cart\"\nabsence = { after = [\"add_to_cart\"], missing = [\"purchase\"], within = \"30m\" }\naction = { type = \"r\" }\n";
    let t0 = Time(1_772_445_600_000);
    let clock = Arc::new(ManualClock::new(t0));
    let running = common::start(config(dir.path(), rules, 20), clock.clone()).await;
    let rss_before = rss_bytes();
    let mut client = NudgeServiceClient::connect(running.addr.clone())
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel::<pb::TrackStreamRequest>(16);
    let feeder = tokio::spawn(async move {
        for chunk in 0..n.div_ceil(500) {
            let events = (chunk * 500..((chunk + 1) * 500).min(n))
                .map(|i| {
                    let mut e = wire_event(i, n, t0);
                    e.r#type = pb::EventType::AddToCart.into();
                    e.user_id = format!("timer-{i}");
                    e
                })
                .collect();
            if tx
                .send(pb::TrackStreamRequest {
                    sequence: chunk,
                    events,
                })
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let loading = Instant::now();
    let mut acks = client
        .track_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }
    feeder.await.unwrap();
    let load_time = loading.elapsed();
    let rss_after = rss_bytes();
    let metrics = reqwest::get(format!("http://{}/metrics", running.metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let pending = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nudge_timers_pending "))
        .unwrap_or("?")
        .to_owned();
    println!(
        "  {n} people with a cart loaded in {:.1} s: {pending} timers pending; resident memory {:.0} -> {:.0} MiB ({:.0} bytes per person with profile, trigger state and timer)",
        load_time.as_secs_f64(),
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        rss_after.saturating_sub(rss_before) as f64 / n as f64
    );
    let mut stream = client
        .subscribe_triggers(pb::SubscribeTriggersRequest {
            cursor: 0,
            rules: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    clock.set(t0.plus_ms(31 * MINUTE_MS));
    let mut received = 0u64;
    let mut first = None;
    while received < n {
        match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
            Ok(Ok(Some(_))) => {
                received += 1;
                first.get_or_insert_with(|| started.elapsed());
            }
            _ => break,
        }
    }
    let elapsed = started.elapsed();
    println!(
        "  all due at once: {received} fired and delivered to a subscriber in {:.2} s = {:.0} timers/s (first after {:.0} ms)",
        elapsed.as_secs_f64(),
        received as f64 / elapsed.as_secs_f64(),
        first.unwrap_or_default().as_secs_f64() * 1e3
    );
    let Running { stop, task, .. } = running;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    if std::env::var("NUDGE_BENCH_SKIP_CORE").is_err() {
        evaluation_cost();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("\n2. event -> trigger latency under sustained ingest (real gRPC, fsync per group, 2 models)");
    if std::env::var("NUDGE_BENCH_SKIP_LATENCY").is_err() {
        runtime.block_on(latency_under_ingest(2_000, 10));
        runtime.block_on(latency_under_ingest(10_000, 10));
    }
    let n = std::env::var("NUDGE_BENCH_TIMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    println!("\n3. timers");
    runtime.block_on(timers(n));
}
