//! HTTP ingest benchmark: events/s through the Segment-compatible `POST /v1/batch` beside
//! `TrackStream`, against one real server on loopback in the same run (the default durable
//! mode: fsync before every acknowledgement, group commit; both shipped models scoring).
//!
//! Both send the same event mix in batches of `BATCH` events (100, the batch size of
//! Segment's and RudderStack's SDKs) to the same 50,000 people. TrackStream: `STREAMS`
//! streams, each up to 8 batches in flight (the server's window). HTTP: `NUDGE_BENCH_HTTP`
//! (default 8) keep-alive HTTP/1.1 connections, one request in flight each, with each
//! batch's JSON built as an SDK builds it. HTTP has no flow control: a request over the
//! engine's queue budget is answered 429 at once, as a unary `Track` is, and resent after
//! 5 ms; the count of those is printed. Each figure is `NUDGE_BENCH_SECONDS` (default 8)
//! of load per door, in `NUDGE_BENCH_ROUNDS` (default 4) slices that alternate between the
//! doors, so whatever else runs on a shared machine falls on both alike. The load generator
//! runs in the same process, on the same cores.
//!
//! Latency is from building a batch to its acknowledgement. A TrackStream sender runs flat
//! out, so its batches also wait in the client's channel and in HTTP/2 flow control: its
//! figure is what a saturating stream sees, not the server's time. The events/s of each
//! door count acknowledged events over the slice plus the time to drain what it had sent.
//!
//! `cargo bench --bench http`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nudge::config::Config;
use nudge::pb::{self, nudge_service_client::NudgeServiceClient};
use nudge::time::{Clock, SystemClock, Time, MINUTE_MS};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

mod common;
use common::{cpu_seconds, percentile};

const STREAMS: usize = 4;
const BATCH: usize = 100;
const PEOPLE: u64 = 50_000;
const KEY: &str = "bench-key";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const KINDS: [(pb::EventType, &str); 8] = [
    (pb::EventType::PageView, ""),
    (pb::EventType::ProductView, "Product Viewed"),
    (pb::EventType::ProductView, "Product Viewed"),
    (pb::EventType::Search, "Products Searched"),
    (pb::EventType::ProductView, "Product Viewed"),
    (pb::EventType::AddToCart, "Product Added"),
    (pb::EventType::CheckoutStarted, "Checkout Started"),
    (pb::EventType::Purchase, "Order Completed"),
];

/// The `i`-th event for TrackStream.
fn event(i: u64, now: Time) -> pb::Event {
    let (kind, _) = KINDS[(i % KINDS.len() as u64) as usize];
    pb::Event {
        event_id: format!("g{i}"),
        user_id: format!("bench-{}", i % PEOPLE),
        anonymous_id: String::new(),
        r#type: kind.into(),
        event_time: Some(nudge::api::convert::timestamp(now.plus_ms(-MINUTE_MS))),
        properties: Some(pb::EventProperties {
            product_id: Some(format!("sku-{}", i % 500)),
            category: Some(format!("cat-{}", i % 12)),
            price: Some(10.0 + (i % 90) as f64),
            order_value: Some(60.0),
            search_query: Some("shoes".into()),
            ..Default::default()
        }),
        attributes: Default::default(),
    }
}

/// The same event as a Segment message, written straight to `out` (as an SDK's JSON
/// encoder would; building a `serde_json::Value` per message would make the load
/// generator, not the server, the figure).
fn message(i: u64, timestamp: &str, out: &mut String) {
    use std::fmt::Write as _;
    let (_, name) = KINDS[(i % KINDS.len() as u64) as usize];
    let call = if name.is_empty() {
        r#""type":"page","name":"Home""#.to_owned()
    } else {
        format!(r#""type":"track","event":"{name}""#)
    };
    let _ = write!(
        out,
        r#"{{{call},"messageId":"h{i}","userId":"bench-{}","timestamp":"{timestamp}","context":{{"library":{{"name":"analytics-python","version":"2.4.0"}}}},"properties":{{"product_id":"sku-{}","category":"cat-{}","price":{},"revenue":60.0,"query":"shoes"}}}}"#,
        i % PEOPLE,
        i % 500,
        i % 12,
        10.0 + (i % 90) as f64,
    );
}

/// Batch acknowledgement latencies and the events they acknowledged.
#[derive(Default)]
struct Measured {
    events: u64,
    /// Requests answered 429 and sent again.
    shed: u64,
    /// CPU seconds of the shard threads, and of every other thread (the server's runtime
    /// and the load generator, which share it).
    cpu: (f64, f64),
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Measured {
    fn add(&mut self, other: Measured) {
        self.events += other.events;
        self.shed += other.shed;
        self.cpu.0 += other.cpu.0;
        self.cpu.1 += other.cpu.1;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
    }

    fn report(&mut self, door: &str) -> f64 {
        self.latencies.sort_unstable();
        let rate = self.events as f64 / self.elapsed.as_secs_f64();
        println!(
            "  {door:<16} {rate:>7.0} events/s   batch ack p50 {:>6.2} ms  p99 {:>6.2} ms   ({} events in {:.1} s; {} requests shed with 429 and resent)",
            percentile(&self.latencies, 0.5),
            percentile(&self.latencies, 0.99),
            self.events,
            self.elapsed.as_secs_f64(),
            self.shed
        );
        println!(
            "  {:<16} CPU per event: shards {:.1} µs, other threads (server runtime and load generator) {:.1} µs",
            "",
            self.cpu.0 / self.events as f64 * 1e6,
            self.cpu.1 / self.events as f64 * 1e6
        );
        rate
    }
}

/// TrackStream for `seconds`: `STREAMS` streams sending as fast as their window lets them.
async fn track_stream(addr: &str, first: u64, slice: Duration) -> Measured {
    let started = Instant::now();
    let until = started + slice;
    let mut tasks = Vec::new();
    for s in 0..STREAMS as u64 {
        let addr = addr.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = NudgeServiceClient::connect(addr).await.unwrap();
            let (tx, rx) = mpsc::channel::<pb::TrackStreamRequest>(8);
            let sent = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
            let sender = {
                let sent = sent.clone();
                tokio::spawn(async move {
                    let mut seq = 0u64;
                    while Instant::now() < until {
                        let now = SystemClock.now();
                        let base = first + (s << 36) + seq * BATCH as u64;
                        let events = (0..BATCH as u64).map(|k| event(base + k, now)).collect();
                        sent.lock().unwrap().insert(seq, Instant::now());
                        let request = pb::TrackStreamRequest {
                            sequence: seq,
                            events,
                        };
                        if tx.send(request).await.is_err() {
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
                if let Some(at) = sent.lock().unwrap().remove(&ack.sequence) {
                    latencies.push(at.elapsed());
                }
            }
            sender.await.unwrap();
            latencies
        }));
    }
    let mut measured = Measured::default();
    for task in tasks {
        let latencies = task.await.unwrap();
        measured.events += (latencies.len() * BATCH) as u64;
        measured.latencies.extend(latencies);
    }
    measured.elapsed = started.elapsed();
    measured
}

/// `/v1/batch` for `slice` over `connections` keep-alive connections.
async fn http_batch(url: &str, connections: u64, first: u64, slice: Duration) -> Measured {
    let started = Instant::now();
    let until = started + slice;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            // One client each: its own connection, reused.
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            let mut latencies = Vec::new();
            let (mut n, mut shed) = (0u64, 0u64);
            while Instant::now() < until {
                let now = SystemClock.now().plus_ms(-MINUTE_MS);
                let timestamp = jiff::Timestamp::from_millisecond(now.millis())
                    .unwrap()
                    .to_string();
                let base = first + (c << 36) + n * BATCH as u64;
                let mut body = String::with_capacity(BATCH * 320);
                body.push_str(r#"{"batch":["#);
                for k in 0..BATCH as u64 {
                    if k > 0 {
                        body.push(',');
                    }
                    message(base + k, &timestamp, &mut body);
                }
                body.push_str(&format!(r#"],"sentAt":"{timestamp}"}}"#));
                let sent = Instant::now();
                loop {
                    let response = client
                        .post(&url)
                        .basic_auth(KEY, Some(""))
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .expect("the HTTP API answers");
                    let status = response.status();
                    let text = response.text().await.unwrap();
                    if status.as_u16() == 429 {
                        // Shed, nothing applied: an SDK waits Retry-After (whole seconds)
                        // and resends; here a short pause, counted, so the figure is the
                        // rate a caller that retries promptly gets.
                        shed += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    assert!(status.is_success(), "{status}: {text}");
                    break;
                }
                latencies.push(sent.elapsed());
                n += 1;
            }
            (latencies, shed)
        }));
    }
    let mut measured = Measured::default();
    for task in tasks {
        let (latencies, shed) = task.await.unwrap();
        measured.events += (latencies.len() * BATCH) as u64;
        measured.latencies.extend(latencies);
        measured.shed += shed;
    }
    measured.elapsed = started.elapsed();
    measured
}

/// A slice with the CPU the process spent in it.
async fn with_cpu(slice: impl std::future::Future<Output = Measured>) -> Measured {
    let before = cpu_seconds();
    let mut measured = slice.await;
    let after = cpu_seconds();
    measured.cpu = (after.0 - before.0, after.1 - before.1);
    measured
}

fn config(dir: &std::path::Path) -> Config {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let keys = dir.join("write-keys");
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    let mut config = Config::default();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.server.http_addr = "127.0.0.1:0".parse().unwrap();
    config.server.http_write_keys_file = Some(keys);
    config.models.dir = root.join("models");
    config.triggers.rules = root.join("config/rules.toml");
    config.store.dir = dir.join("data");
    config.engine.queue_capacity = 4096;
    config
}

#[tokio::main]
async fn main() {
    let seconds = env_or("NUDGE_BENCH_SECONDS", 8);
    let rounds = env_or("NUDGE_BENCH_ROUNDS", 4).max(1);
    let connections = env_or("NUDGE_BENCH_HTTP", 8);
    let slice = Duration::from_secs_f64(seconds as f64 / rounds as f64);
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    // The HTTP address is known only once bound: bind here, then run as common::start does.
    let server = nudge::app::Server::bind(config, Arc::new(SystemClock))
        .await
        .unwrap();
    let grpc = format!("http://{}", server.grpc_addr());
    let http = format!("http://{}/v1/batch", server.http_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    println!(
        "Ingest through TrackStream ({STREAMS} streams, up to 8 batches in flight each) and POST /v1/batch \
         ({connections} HTTP/1.1 connections, 1 request in flight each): {BATCH} events per batch, \
         fsync per group commit, purchase + churn scoring; {seconds} s per door in {rounds} alternating slices"
    );
    // Warm-up: both doors, not measured (people created, caches and connections warm).
    let mut next = 1u64 << 60;
    track_stream(&grpc, next, Duration::from_secs(1)).await;
    next += 1 << 56;
    http_batch(&http, connections, next, Duration::from_secs(1)).await;
    let (mut grpc_total, mut http_total) = (Measured::default(), Measured::default());
    for round in 0..rounds {
        next += 1 << 56;
        let first = with_cpu(track_stream(&grpc, next, slice));
        next += 1 << 56;
        let second = with_cpu(http_batch(&http, connections, next, slice));
        if round % 2 == 0 {
            grpc_total.add(first.await);
            http_total.add(second.await);
        } else {
            http_total.add(second.await);
            grpc_total.add(first.await);
        }
    }
    let stream_rate = grpc_total.report("TrackStream");
    let http_rate = http_total.report("POST /v1/batch");
    println!(
        "  /v1/batch at {:.0}% of TrackStream's rate",
        100.0 * http_rate / stream_rate
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
