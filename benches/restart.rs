//! Restart benchmark, with the real binary and the shipped config, rules and models:
//!
//! 1. a store of `NUDGE_BENCH_PEOPLE` people (default 1,000,000), loaded through
//!    `TrackStream`, half of them with a purchase and so a pending churn recheck a day out
//!    (the shipped `churn_risk` rule): real pending timers that a restart must serve. Then
//!    the time from process start to `SERVING`, `NUDGE_BENCH_RESTARTS` times (3), with the
//!    resident memory at `SERVING` and `nudge_timers_pending` as the server reports it;
//! 2. kill -9 during ingest of a small store (300 people), `NUDGE_BENCH_KILLS` times (30):
//!    the time from process start to `SERVING` after each kill (p50, p90, max), the time the
//!    store took to recover (the binary's "store recovered" log line) and the journal files'
//!    size on disk before each restart (fjall makes a new journal file 64 MiB long before
//!    writing to it, so a fresh one counts 64 MiB however little it holds).
//!
//! `cargo bench --bench restart`. `NUDGE_BENCH_STORE=DIR` keeps (and reuses) the big store in
//! DIR instead of loading a fresh one; `NUDGE_BENCH_SKIP_BIG` or `NUDGE_BENCH_SKIP_KILLS`
//! skips a part.

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nudge::pb::{self, nudge_service_client::NudgeServiceClient};
use nudge::time::{Clock, SystemClock, Time, MINUTE_MS};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

mod common;
use common::percentile;

const BATCH: usize = 500;
const STREAMS: u64 = 2;

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The real binary, serving the shipped config on ports it chose; killed when dropped.
struct Nudge {
    child: Option<std::process::Child>,
    grpc: SocketAddr,
    metrics: SocketAddr,
    /// The "store recovered" line's `elapsed_ms`, once logged.
    recovered_ms: Arc<Mutex<Option<u64>>>,
    /// From spawning the process to health answering SERVING.
    to_serving: Duration,
}

impl Nudge {
    async fn spawn(store: &Path) -> Nudge {
        let started = Instant::now();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
            .args([
                "serve",
                "--config",
                repo("config/nudge.toml").to_str().unwrap(),
                "--grpc-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .current_dir(repo(""))
            .env("NUDGE__STORE__DIR", store)
            .env("NUDGE__LOG__FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let recovered_ms = Arc::new(Mutex::new(None));
        let (addrs_tx, addrs_rx) = std::sync::mpsc::channel();
        {
            let recovered_ms = recovered_ms.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    let fields = &json["fields"];
                    match fields["message"].as_str() {
                        Some("store recovered") => {
                            *recovered_ms.lock().unwrap() = fields["elapsed_ms"].as_u64();
                        }
                        Some("serving") => {
                            let addr = |name: &str| fields[name].as_str()?.parse().ok();
                            if let (Some(g), Some(m)) = (addr("grpc_addr"), addr("metrics_addr")) {
                                let _ = addrs_tx.send((g, m));
                            }
                        }
                        _ => {}
                    }
                }
            });
        }
        let (grpc, metrics) = tokio::task::spawn_blocking(move || {
            addrs_rx
                .recv_timeout(Duration::from_secs(600))
                .expect("the binary serves")
        })
        .await
        .unwrap();
        loop {
            if let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
                .unwrap()
                .connect()
                .await
            {
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                let request = tonic_health::pb::HealthCheckRequest {
                    service: "nudge.v1.NudgeService".into(),
                };
                if health
                    .check(request)
                    .await
                    .is_ok_and(|r| r.into_inner().status == 1)
                {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Nudge {
            child: Some(child),
            grpc,
            metrics,
            recovered_ms,
            to_serving: started.elapsed(),
        }
    }

    fn rss_bytes(&self) -> u64 {
        let pid = self.child.as_ref().unwrap().id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    async fn metric(&self, series: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
    }

    async fn client(&self) -> NudgeServiceClient<tonic::transport::Channel> {
        NudgeServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    /// SIGTERM, and waits for a clean exit.
    fn stop(&mut self) {
        let mut child = self.child.take().unwrap();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        assert!(child.wait().unwrap().success(), "a clean exit");
    }

    /// SIGKILL, and waits for the process to be gone.
    fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Nudge {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Person `p`'s one event: a purchase for even people (the shipped churn rule then keeps a
/// recheck timer a day out), a page view for odd ones.
fn person_event(p: u64, now: Time) -> pb::Event {
    let purchase = p.is_multiple_of(2);
    pb::Event {
        event_id: format!("r{p}"),
        user_id: format!("restart-{p}"),
        anonymous_id: String::new(),
        r#type: if purchase {
            pb::EventType::Purchase
        } else {
            pb::EventType::PageView
        }
        .into(),
        event_time: Some(nudge::api::convert::timestamp(now.plus_ms(-MINUTE_MS))),
        properties: Some(pb::EventProperties {
            order_value: purchase.then_some(60.0),
            ..Default::default()
        }),
        attributes: Default::default(),
    }
}

/// Sends every person's event over `STREAMS` TrackStreams; returns events acknowledged.
async fn load(nudge: &Nudge, people: u64) -> u64 {
    let mut tasks = Vec::new();
    for s in 0..STREAMS {
        let mut client = nudge.client().await;
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = mpsc::channel::<pb::TrackStreamRequest>(8);
            let feeder = tokio::spawn(async move {
                let now = SystemClock.now();
                let mine: Vec<u64> = (s..people).step_by(STREAMS as usize).collect();
                for (seq, chunk) in mine.chunks(BATCH).enumerate() {
                    let events = chunk.iter().map(|p| person_event(*p, now)).collect();
                    let request = pb::TrackStreamRequest {
                        sequence: seq as u64,
                        events,
                    };
                    if tx.send(request).await.is_err() {
                        break;
                    }
                }
            });
            let mut acks = client
                .track_stream(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let mut acked = 0u64;
            while let Some(ack) = acks.next().await {
                acked += ack.unwrap().results.len() as u64;
            }
            feeder.await.unwrap();
            acked
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap();
    }
    acked
}

async fn big_store(people: u64, restarts: usize) {
    let kept = std::env::var("NUDGE_BENCH_STORE").ok().map(PathBuf::from);
    let temp = tempfile::tempdir().unwrap();
    let dir = kept.clone().unwrap_or_else(|| temp.path().join("data"));
    let fresh = !dir.join("keyspaces").exists();
    if fresh {
        let mut nudge = Nudge::spawn(&dir).await;
        let started = Instant::now();
        let acked = load(&nudge, people).await;
        let pending = nudge.metric("nudge_timers_pending").await.unwrap_or(-1.0);
        println!(
            "  loaded {people} people ({acked} events acknowledged) in {:.1} s: {pending} timers pending",
            started.elapsed().as_secs_f64()
        );
        nudge.stop();
    } else {
        println!("  reusing the store in {}", dir.display());
    }
    for _ in 0..restarts {
        let mut nudge = Nudge::spawn(&dir).await;
        let rss = nudge.rss_bytes();
        let pending_at_serving = nudge.metric("nudge_timers_pending").await.unwrap_or(-1.0);
        // Wait for the count of pending timers to settle: a benchmark may poll.
        let settle = Instant::now();
        let mut pending = pending_at_serving;
        while settle.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = nudge.metric("nudge_timers_pending").await.unwrap_or(-1.0);
            if now == pending && now > 0.0 {
                break;
            }
            pending = now;
        }
        println!(
            "  start to SERVING: {:.2} s (store recovered in {} ms); resident memory at SERVING {:.0} MiB; nudge_timers_pending {pending_at_serving} at SERVING, {pending} settled",
            nudge.to_serving.as_secs_f64(),
            nudge.recovered_ms.lock().unwrap().unwrap_or(0),
            rss as f64 / 1048576.0,
        );
        nudge.stop();
    }
}

/// A small deterministic generator (splitmix64).
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

/// A realistic mix for one of 300 people, the `i`-th event overall.
fn small_store_event(i: u64, now: Time) -> pb::Event {
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
        event_id: format!("k{i}"),
        user_id: format!("kill-{}", i % 300),
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

/// Bytes of journal files (`*.jnl`) under `dir`.
fn journal_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "jnl") {
                total += entry.metadata().map_or(0, |m| m.len());
            }
        }
    }
    total
}

async fn kills(cycles: usize) {
    let temp = tempfile::tempdir().unwrap();
    let dir = std::env::var("NUDGE_BENCH_KILL_STORE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| temp.path().join("data"));
    let mut rng = Rng(env_or("NUDGE_BENCH_SEED", 0x5EED));
    let mut next = 0u64;
    let mut restarts = Vec::new();
    let mut recoveries = Vec::new();
    let mut worst: Option<(Duration, u64, u64)> = None;
    let mut journals = Vec::new();
    let mut recovered_each = Vec::new();
    let mut nudge = Nudge::spawn(&dir).await;
    for cycle in 0..=cycles {
        if cycle > 0 {
            let journal = journal_bytes(&dir);
            nudge = Nudge::spawn(&dir).await;
            let recovered = nudge.recovered_ms.lock().unwrap().unwrap_or(0);
            restarts.push(nudge.to_serving);
            recoveries.push(Duration::from_millis(recovered));
            recovered_each.push(recovered);
            journals.push(journal);
            if worst.is_none_or(|(d, _, _)| nudge.to_serving > d) {
                worst = Some((nudge.to_serving, recovered, journal));
            }
        }
        if cycle == cycles {
            break;
        }
        // Ingest flat out over one stream until the kill.
        let kill_after = Duration::from_millis(500 + rng.below(2500));
        let mut client = nudge.client().await;
        let (tx, rx) = mpsc::channel::<pb::TrackStreamRequest>(8);
        let start = next;
        let feeder = tokio::spawn(async move {
            let mut i = start;
            let mut seq = 0;
            loop {
                let now = SystemClock.now();
                let events = (0..100).map(|k| small_store_event(i + k, now)).collect();
                i += 100;
                if tx
                    .send(pb::TrackStreamRequest {
                        sequence: seq,
                        events,
                    })
                    .await
                    .is_err()
                {
                    return i;
                }
                seq += 1;
            }
        });
        let acks = tokio::spawn(async move {
            let Ok(response) = client.track_stream(ReceiverStream::new(rx)).await else {
                return;
            };
            let mut acks = response.into_inner();
            while let Some(Ok(_)) = acks.next().await {}
        });
        tokio::time::sleep(kill_after).await;
        nudge.kill();
        let _ = acks.await;
        next = feeder.await.unwrap();
    }
    nudge.stop();
    let mb = |b: u64| b as f64 / 1048576.0;
    restarts.sort();
    recoveries.sort();
    println!(
        "  {cycles} kill -9 restarts during ingest of 300 people ({next} events sent): start to SERVING p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms; store recovery p50 {:.0} ms, max {:.0} ms",
        percentile(&restarts, 0.5),
        percentile(&restarts, 0.9),
        percentile(&restarts, 1.0),
        percentile(&recoveries, 0.5),
        percentile(&recoveries, 1.0),
    );
    if let Some((d, recovered, journal)) = worst {
        println!(
            "  slowest: {:.0} ms to SERVING, {recovered} ms store recovery, {:.0} MiB of journal; journal before restarts: max {:.0} MiB, last {:.0} MiB",
            d.as_secs_f64() * 1e3,
            mb(journal),
            mb(journals.iter().copied().max().unwrap_or(0)),
            mb(journals.last().copied().unwrap_or(0)),
        );
    }
    // Journal size before each restart against the store's recovery time, largest first.
    let mut pairs: Vec<(u64, u64)> = journals.iter().copied().zip(recovered_each).collect();
    pairs.sort_unstable_by(|a, b| b.cmp(a));
    let pairs: Vec<String> = pairs
        .iter()
        .map(|(j, ms)| format!("{:.0}:{ms}", mb(*j)))
        .collect();
    println!(
        "  journal MiB:recovery ms, per restart: {}",
        pairs.join(" ")
    );
}

fn main() {
    let people: u64 = env_or("NUDGE_BENCH_PEOPLE", 1_000_000);
    let restarts: usize = env_or("NUDGE_BENCH_RESTARTS", 3);
    let cycles: usize = env_or("NUDGE_BENCH_KILLS", 30);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if std::env::var("NUDGE_BENCH_SKIP_BIG").is_err() {
            println!("Restart with {people} people stored, half of them with a pending timer");
            big_store(people, restarts).await;
        }
        if std::env::var("NUDGE_BENCH_SKIP_KILLS").is_err() {
            println!("kill -9 during ingest, then restart");
            kills(cycles).await;
        }
    });
}
