//! HTTP and Kafka ingest benchmark: events/s through the Segment-compatible `POST /v1/batch`
//! and through the Kafka source beside `TrackStream`, against one real server on loopback
//! in the same run (the default durable
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
//! Kafka: librdkafka's MockCluster (3 brokers, in this process: no Kafka broker installs
//! here) holds a topic of `KAFKA_PARTITIONS` partitions, replication 3; the source reads
//! it in Segment's shape, one event per message, keyed by person. In its slice the load
//! generator produces as fast as the source keeps up (at most `KAFKA_LEAD` messages
//! ahead of it, by the server's `nudge_kafka_messages_total`); the figure is the messages
//! produced over the time until the source has taken care of the last of them (tracked,
//! durable, offset stored). The mock brokers' CPU is this process's too, so the figure is
//! a floor for a real broker on another machine. No latency is given for Kafka: the source
//! has no acknowledgement a producer waits for.
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
const KAFKA_TOPIC: &str = "bench-events";
const KAFKA_PARTITIONS: i32 = 3;
/// How far the Kafka load generator may run ahead of the source, in messages.
const KAFKA_LEAD: u64 = 20_000;

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
        if self.latencies.is_empty() {
            println!(
                "  {door:<16} {rate:>7.0} events/s   ({} events in {:.1} s, produced and taken care of)",
                self.events,
                self.elapsed.as_secs_f64(),
            );
        } else {
            println!(
                "  {door:<16} {rate:>7.0} events/s   batch ack p50 {:>6.2} ms  p99 {:>6.2} ms   ({} events in {:.1} s; {} requests shed with 429 and resent)",
                percentile(&self.latencies, 0.5),
                percentile(&self.latencies, 0.99),
                self.events,
                self.elapsed.as_secs_f64(),
                self.shed
            );
        }
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

/// The Kafka source's messages taken care of so far, from the server's metrics.
async fn kafka_taken(client: &reqwest::Client, metrics: &str) -> u64 {
    let text = client
        .get(metrics)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("nudge_kafka_messages_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The Kafka source for `slice`: messages produced as fast as librdkafka takes them, then
/// the time until the source has taken care of all of them.
async fn kafka_source(
    producer: &rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    metrics: &str,
    first: u64,
    slice: Duration,
) -> Measured {
    use rdkafka::producer::{BaseRecord, Producer as _};
    let client = reqwest::Client::new();
    let before = kafka_taken(&client, metrics).await;
    let started = Instant::now();
    let until = started + slice;
    let mut n = 0u64;
    let mut value = String::with_capacity(400);
    while Instant::now() < until {
        // At most `KAFKA_LEAD` messages ahead of the source: a producer flat out would
        // make the figure the mock brokers' cost of storing a flood.
        if n >= KAFKA_LEAD && kafka_taken(&client, metrics).await + KAFKA_LEAD < before + n {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let now = SystemClock.now().plus_ms(-MINUTE_MS);
        let timestamp = jiff::Timestamp::from_millisecond(now.millis())
            .unwrap()
            .to_string();
        for _ in 0..10 * BATCH {
            let i = first + n;
            value.clear();
            message(i, &timestamp, &mut value);
            let key = format!("bench-{}", i % PEOPLE);
            loop {
                match producer.send(BaseRecord::to(KAFKA_TOPIC).key(&key).payload(&value)) {
                    Ok(()) => break,
                    Err((_, _)) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
            n += 1;
        }
        // The producer's threads and the server share the cores with this loop.
        tokio::task::yield_now().await;
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    while kafka_taken(&client, metrics).await < before + n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Measured {
        events: n,
        elapsed: started.elapsed(),
        ..Measured::default()
    }
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

fn mock_cluster(
) -> rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let mock = rdkafka::mocking::MockCluster::new(3).unwrap();
    mock.create_topic(KAFKA_TOPIC, KAFKA_PARTITIONS, 3).unwrap();
    mock
}

#[tokio::main]
async fn main() {
    let seconds = env_or("NUDGE_BENCH_SECONDS", 8);
    let rounds = env_or("NUDGE_BENCH_ROUNDS", 4).max(1);
    let connections = env_or("NUDGE_BENCH_HTTP", 8);
    let slice = Duration::from_secs_f64(seconds as f64 / rounds as f64);
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    let mock = mock_cluster();
    config.kafka.brokers = mock.bootstrap_servers();
    config.kafka.source.topic = KAFKA_TOPIC.into();
    config.kafka.source.format = nudge::kafka::SourceFormat::Segment;
    let producer: rdkafka::producer::ThreadedProducer<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    // The HTTP address is known only once bound: bind here, then run as common::start does.
    let server = nudge::app::Server::bind(config, Arc::new(SystemClock))
        .await
        .unwrap();
    let grpc = format!("http://{}", server.grpc_addr());
    let http = format!("http://{}/v1/batch", server.http_addr().unwrap());
    let metrics = format!("http://{}/metrics", server.metrics_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    println!(
        "Ingest through TrackStream ({STREAMS} streams, up to 8 batches in flight each) and POST /v1/batch \
         ({connections} HTTP/1.1 connections, 1 request in flight each): {BATCH} events per batch; \
         the Kafka source ({KAFKA_PARTITIONS} partitions on 3 mock brokers, one event per message); \
         fsync per group commit, purchase + churn scoring; {seconds} s per door in {rounds} alternating slices"
    );
    // Warm-up: both doors, not measured (people created, caches and connections warm).
    let mut next = 1u64 << 60;
    track_stream(&grpc, next, Duration::from_secs(1)).await;
    next += 1 << 56;
    http_batch(&http, connections, next, Duration::from_secs(1)).await;
    next += 1 << 56;
    kafka_source(&producer, &metrics, next, Duration::from_secs(1)).await;
    let (mut grpc_total, mut http_total, mut kafka_total) = (
        Measured::default(),
        Measured::default(),
        Measured::default(),
    );
    for round in 0..rounds {
        next += 1 << 56;
        let a = next;
        next += 1 << 56;
        let b = next;
        next += 1 << 56;
        let c = next;
        // The doors take turns in a different order each round.
        for door in 0..3 {
            match (door + round) % 3 {
                0 => grpc_total.add(with_cpu(track_stream(&grpc, a, slice)).await),
                1 => http_total.add(with_cpu(http_batch(&http, connections, b, slice)).await),
                _ => kafka_total.add(with_cpu(kafka_source(&producer, &metrics, c, slice)).await),
            }
        }
    }
    let stream_rate = grpc_total.report("TrackStream");
    let http_rate = http_total.report("POST /v1/batch");
    let kafka_rate = kafka_total.report("Kafka source");
    println!(
        "  /v1/batch at {:.0}% and the Kafka source at {:.0}% of TrackStream's rate",
        100.0 * http_rate / stream_rate,
        100.0 * kafka_rate / stream_rate
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
