//! Ingest benchmark, through the real gRPC server on loopback with the default durable mode
//! (fsync before every acknowledgement, group commit) and both default models scoring:
//!
//! 1. sustained TrackStream throughput: several streams send batches as fast as flow
//!    control lets them, for a fixed time;
//! 2. acknowledgement latency at half that rate: batches paced evenly, p50/p99 from send
//!    to acknowledgement;
//! 3. memory per person: resident memory growth after loading `NUDGE_BENCH_PEOPLE` people
//!    (default 1,000,000) through the engine, divided by people;
//! 4. time from start to SERVING with those people stored.
//!
//! `cargo bench --bench ingest` (or `scripts/bench.sh ingest`). Set NUDGE_BENCH_PEOPLE lower
//! for a quick run, NUDGE_BENCH_SKIP_THROUGHPUT=1 for parts 3 and 4 only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nudge::config::Config;
use nudge::pb::{self, nudge_service_client::NudgeServiceClient};
use nudge::time::{Clock, SystemClock, Time, MINUTE_MS};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

mod common;
use common::{cpu_seconds, malloc_bytes, metric_sum, percentile, rss_bytes, scrape, Running};

const STREAMS: usize = 4;
const BATCH: usize = 100;
const THROUGHPUT_SECONDS: u64 = 15;
const LATENCY_SECONDS: u64 = 15;

fn config(dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.models.dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    config.store.dir = dir.to_owned();
    config.engine.queue_capacity = 4096;
    // NUDGE_BENCH_SYNC=interval: the weaker documented mode, for its figures beside these.
    if std::env::var("NUDGE_BENCH_SYNC").as_deref() == Ok("interval") {
        config.store.sync = nudge::config::SyncPolicy::Interval;
    }
    config.triggers.rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules.toml");
    config
}

/// A realistic mix for `person`, the `i`-th event overall.
fn event(i: u64, person: u64, now: Time) -> pb::Event {
    let kinds = [
        pb::EventType::PageView,
        pb::EventType::ProductView,
        pb::EventType::ProductView,
        pb::EventType::Search,
        pb::EventType::ProductView,
        pb::EventType::AddToCart,
        pb::EventType::CheckoutStarted,
        pb::EventType::Purchase,
    ];
    pb::Event {
        event_id: format!("b{i}"),
        user_id: format!("bench-{person}"),
        anonymous_id: String::new(),
        r#type: kinds[(i % kinds.len() as u64) as usize].into(),
        event_time: Some(nudge::api::convert::timestamp(now.plus_ms(-MINUTE_MS))),
        properties: Some(pb::EventProperties {
            product_id: Some(format!("sku-{}", i % 500)),
            category: Some(format!("cat-{}", i % 12)),
            price: Some(10.0 + (i % 90) as f64),
            order_value: Some(60.0),
            dwell_seconds: i.is_multiple_of(2).then_some(20.0),
            ..Default::default()
        }),
        attributes: Default::default(),
    }
}

/// One stream: sends batches from `next` at `pace` (or flat out), returns ack latencies.
async fn stream(
    addr: String,
    stream_id: u64,
    until: Instant,
    pace: Option<Duration>,
) -> Vec<Duration> {
    let mut client = NudgeServiceClient::connect(addr).await.unwrap();
    let (tx, rx) = mpsc::channel::<pb::TrackStreamRequest>(16);
    let sent_at = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        u64,
        Instant,
    >::new()));
    let sender = {
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut tick = pace.map(tokio::time::interval);
            while Instant::now() < until {
                if let Some(tick) = tick.as_mut() {
                    tick.tick().await;
                }
                let now = SystemClock.now();
                let base = (stream_id << 40) + seq * BATCH as u64;
                let events = (0..BATCH as u64)
                    .map(|k| event(base + k, (base + k) % 50_000, now))
                    .collect();
                sent_at.lock().unwrap().insert(seq, Instant::now());
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
        })
    };
    let mut acks = client
        .track_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut latencies = Vec::new();
    while let Some(ack) = acks.next().await {
        let ack = ack.expect("no batch is refused at this load");
        if let Some(sent) = sent_at.lock().unwrap().remove(&ack.sequence) {
            latencies.push(sent.elapsed());
        }
    }
    sender.await.unwrap();
    latencies
}

async fn run(
    streams: usize,
    seconds: u64,
    pace: Option<Duration>,
    addr: &str,
) -> (f64, Vec<Duration>) {
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|s| {
            tokio::spawn(stream(
                addr.to_owned(),
                s as u64 + if pace.is_some() { 100 } else { 0 },
                until,
                pace,
            ))
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let rate = (latencies.len() * BATCH) as f64 / started.elapsed().as_secs_f64();
    latencies.sort();
    (rate, latencies)
}

fn main() {
    let people: u64 = std::env::var("NUDGE_BENCH_PEOPLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // NUDGE_BENCH_SKIP_THROUGHPUT=1: only memory per person and the restart.
        if std::env::var("NUDGE_BENCH_SKIP_THROUGHPUT").is_err() {
            let dir = tempfile::tempdir().unwrap();
            let Running {
                stop,
                task,
                addr,
                metrics_addr,
                ..
            } = common::start(config(dir.path()), Arc::new(SystemClock)).await;
            let mode = match std::env::var("NUDGE_BENCH_SYNC").as_deref() {
                Ok("interval") => "store.sync = interval (fsync every sync_interval_ms)",
                _ => "default durable mode (fsync per group commit)",
            };
            println!("Ingest over TrackStream: {STREAMS} streams, {BATCH} events per batch, {mode}, purchase + churn scoring");
            let cpu_before = cpu_seconds();
            let metrics_before = scrape(metrics_addr).await;
            let (rate, latencies) = run(STREAMS, THROUGHPUT_SECONDS, None, &addr).await;
            let cpu_after = cpu_seconds();
            let metrics_after = scrape(metrics_addr).await;
            println!(
                "  sustained: {rate:>9.0} events/s over {THROUGHPUT_SECONDS} s (ack p50 {:.1} ms, p99 {:.1} ms at full load)",
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99)
            );
            let events = latencies.len() as f64 * BATCH as f64;
            println!(
                "  CPU per event: {:.1} µs in the shard threads, {:.1} µs in the others (gRPC server and this load generator)",
                (cpu_after.0 - cpu_before.0) * 1e6 / events,
                (cpu_after.1 - cpu_before.1) * 1e6 / events
            );
            let delta = |name: &str| metric_sum(&metrics_after, name) - metric_sum(&metrics_before, name);
            let commits = delta("nudge_store_commit_duration_seconds_count");
            println!(
                "  group commits: {commits:.0}, {:.0} events each, {:.2} ms each on average (the store's sync included)",
                events / commits,
                delta("nudge_store_commit_duration_seconds_sum") * 1e3 / commits
            );
            for (label, target) in [("half rate", rate / 2.0), ("10,000/s", 10_000.0)] {
                let per_stream_batches = target / BATCH as f64 / STREAMS as f64;
                let pace = Duration::from_secs_f64(1.0 / per_stream_batches);
                let (paced_rate, latencies) = run(STREAMS, LATENCY_SECONDS, Some(pace), &addr).await;
                println!(
                    "  at {label:<9}: {paced_rate:>9.0} events/s: ack latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} batches)",
                    percentile(&latencies, 0.5),
                    percentile(&latencies, 0.99),
                    percentile(&latencies, 1.0),
                    latencies.len()
                );
            }
            let _ = stop.send(());
            task.await.unwrap().unwrap();
        }

        // Memory per person: load people through a fresh server, one batch per 100 people,
        // resident memory sampled as they come. With NUDGE_BENCH_CACHE_MB set the cache has
        // that budget and resident memory should level off once it is full; unset, it holds
        // everyone (a budget beyond the machine) and the growth per person is the cost of
        // one cached person.
        let cache_mb: u64 = std::env::var("NUDGE_BENCH_CACHE_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1 << 20);
        let dir = tempfile::tempdir().unwrap();
        let mut memory_config = config(dir.path());
        memory_config.engine.cache_mb = cache_mb;
        let Running {
            stop,
            task,
            addr,
            metrics_addr,
            ..
        } = common::start(memory_config, Arc::new(SystemClock)).await;
        let rss_before = rss_bytes();
        let started = Instant::now();
        let mut client = NudgeServiceClient::connect(addr.clone()).await.unwrap();
        let (tx, rx) = mpsc::channel::<pb::TrackStreamRequest>(16);
        let feeder = tokio::spawn(async move {
            let now = SystemClock.now();
            for chunk in 0..people.div_ceil(100) {
                let events = (0..300u64)
                    .map(|k| {
                        let person = chunk * 100 + k / 3;
                        event(person * 3 + k % 3 + (1 << 50), person + (1 << 40), now)
                    })
                    .collect();
                if tx.send(pb::TrackStreamRequest { sequence: chunk, events }).await.is_err() {
                    break;
                }
            }
        });
        let mut acks = client.track_stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let mut acked = 0u64;
        let batches = people.div_ceil(100);
        let mut series = Vec::new();
        while let Some(ack) = acks.next().await {
            ack.unwrap();
            acked += 1;
            if acked.is_multiple_of((batches / 10).max(1)) {
                series.push(format!("{}k: {:.0}", acked * 100 / 1000, rss_bytes() as f64 / 1048576.0));
            }
        }
        feeder.await.unwrap();
        let load_time = started.elapsed();
        let rss_after = rss_bytes();
        let (malloc_used, malloc_free) = malloc_bytes();
        let text = scrape(metrics_addr).await;
        let cached = metric_sum(&text, "nudge_profiles");
        let cache_bytes = metric_sum(&text, "nudge_cache_bytes");
        println!(
            "  loaded {people} people (3 events each, {acked} batches) in {:.1} s, cache budget {}: resident memory {:.0} MiB -> {:.0} MiB, {:.0} bytes per person loaded",
            load_time.as_secs_f64(),
            if cache_mb >= 1 << 20 { "unbounded".to_owned() } else { format!("{cache_mb} MiB") },
            rss_before as f64 / 1048576.0,
            rss_after as f64 / 1048576.0,
            (rss_after.saturating_sub(rss_before)) as f64 / people as f64
        );
        println!("    resident MiB after people loaded: {}", series.join(", "));
        println!(
            "    malloc: {:.0} MiB in use, {:.0} MiB free in its arenas (resident beyond these: the store's files and caches, stacks)",
            malloc_used as f64 / 1048576.0,
            malloc_free as f64 / 1048576.0
        );
        println!(
            "    cache: {cached:.0} people, {:.0} MiB counted, {:.0} bytes per cached person; {:.0} evicted",
            cache_bytes / 1048576.0,
            cache_bytes / cached.max(1.0),
            metric_sum(&text, "nudge_cache_evictions_total")
        );
        let _ = stop.send(());
        task.await.unwrap().unwrap();
        let stored: u64 = walkdir(dir.path());
        println!(
            "    store on disk: {:.0} MiB, {:.0} bytes per person",
            stored as f64 / 1048576.0,
            stored as f64 / people as f64
        );

        let Running {
            stop,
            task,
            to_serving,
            ..
        } = common::start(config(dir.path()), Arc::new(SystemClock)).await;
        println!("  start to SERVING with {people} people stored: {:.2} s", to_serving.as_secs_f64());
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    });
}

/// The bytes of the files under `dir`.
fn walkdir(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => walkdir(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
