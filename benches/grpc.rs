//! gRPC `Score` benchmark: a load generator in Rust against two servers on loopback TCP in
//! the same run — a real Nudge server with the shipped models, and a trivial tonic server
//! implementing the same `NudgeService` whose `Score` answers a fixed response of the same
//! shape without any work (the ceiling of gRPC on this machine).
//!
//! Many requests are in flight on a few HTTP/2 connections: `NUDGE_BENCH_CHANNELS` tonic
//! channels (default 4; each is one connection) with `NUDGE_BENCH_INFLIGHT` (default 64)
//! requests outstanding on each. Each figure is `NUDGE_BENCH_SECONDS` (default 8) of
//! measured load per server, in `NUDGE_BENCH_ROUNDS` (default 4) slices that alternate
//! between the servers, each slice after `NUDGE_BENCH_WARMUP_SECONDS` (default 1) of the
//! same load that is not measured: the machine is shared, and alternating puts whatever
//! else runs on it on both servers alike. It
//! reports single-row requests/s with p50 and p99 latency in both row forms, Nudge's share
//! of the trivial server's rate, 100-row requests (`NUDGE_BENCH_BATCH_ROWS`) in the packed
//! and the map form in rows/s, latency with one request in flight, and the CPU time each
//! side spent per request. It first prints the figures behind the server's
//! `INLINE_SCORE_ROWS` bound: a `spawn_blocking` round trip beside the cost of scoring.
//!
//! Client and servers run on separate tokio runtimes with `NUDGE_BENCH_CLIENT_THREADS` and
//! `NUDGE_BENCH_SERVER_THREADS` worker threads (default 1 each; see [`Settings`]).
//!
//! `cargo bench --bench grpc` (`scripts/bench.sh` runs it after the scoring bench).

use std::collections::HashMap;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::Stream;
use nudge::config::Config;
use nudge::features::{FeatureSpec, FEATURE_COUNT};
use nudge::metrics::Metrics;
use nudge::model::{score_rows, LoadOptions, ModelSet};
use nudge::pb::nudge_service_server::{NudgeService, NudgeServiceServer};
use nudge::pb::{self, nudge_service_client::NudgeServiceClient, score_request::Subject};
use nudge::time::{Clock, SystemClock};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

mod common;

/// The load and the runtimes, from environment variables.
///
/// The machine this was written for has 2 cores, so by default the servers' runtime gets 1
/// worker thread and the client's runtime 1: for the trivial server the client does about
/// as much per request as the server (encode a request and decode an answer against
/// decode and encode, the same HTTP/2 framing), so giving the client less than the server
/// would make the "ceiling" a measure of the client. Both servers live on the one server
/// runtime but only one is under load at a time. Nudge's blocking pool (large Score
/// batches) and its other threads are not counted in the 1, and compete for the same two
/// cores, as they would in production; the CPU columns show where the time went.
struct Settings {
    channels: usize,
    inflight: usize,
    measure: Duration,
    warmup: Duration,
    rounds: u32,
    server_threads: usize,
    client_threads: usize,
    batch_rows: usize,
}

fn env_or(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let settings = Settings {
            channels: env_or("NUDGE_BENCH_CHANNELS", 4),
            inflight: env_or("NUDGE_BENCH_INFLIGHT", 64),
            measure: Duration::from_secs(env_or("NUDGE_BENCH_SECONDS", 8) as u64),
            warmup: Duration::from_secs(env_or("NUDGE_BENCH_WARMUP_SECONDS", 1) as u64),
            rounds: env_or("NUDGE_BENCH_ROUNDS", 4) as u32,
            server_threads: env_or("NUDGE_BENCH_SERVER_THREADS", 1),
            client_threads: env_or("NUDGE_BENCH_CLIENT_THREADS", 1),
            batch_rows: env_or("NUDGE_BENCH_BATCH_ROWS", 100),
        };
        assert!(
            settings.channels > 0
                && settings.inflight > 0
                && settings.rounds > 0
                && settings.server_threads > 0
                && settings.client_threads > 0
                && settings.batch_rows > 1,
            "channels, in-flight requests, rounds and threads must be at least 1, batch rows at \
             least 2"
        );
        settings
    }
}

/// Row `i` of the benchmark's rows, in FeatureSpec order: varied values, every seventh
/// feature missing (NaN), as callers' rows have gaps.
fn row(i: usize) -> [f64; FEATURE_COUNT] {
    std::array::from_fn(|j| {
        if (i + j).is_multiple_of(7) {
            f64::NAN
        } else {
            ((i * 31 + j * 17) % 97) as f64 / 4.0
        }
    })
}

/// Rows `0..n` as a Score request in the packed form (`columns` + `values`).
fn packed(n: usize) -> pb::ScoreRequest {
    let spec = FeatureSpec::current();
    pb::ScoreRequest {
        subject: Some(Subject::FeatureRows(pb::FeatureRows {
            rows: vec![],
            columns: spec.names().map(str::to_owned).collect(),
            values: (0..n).flat_map(row).collect(),
        })),
        models: vec![],
    }
}

/// The same rows in the map form: one name → value map per row, missing features left out.
fn mapped(n: usize) -> pb::ScoreRequest {
    let spec = FeatureSpec::current();
    pb::ScoreRequest {
        subject: Some(Subject::FeatureRows(pb::FeatureRows {
            rows: (0..n)
                .map(|i| pb::FeatureRow {
                    values: spec
                        .names()
                        .zip(row(i))
                        .filter(|(_, v)| !v.is_nan())
                        .map(|(name, v)| (name.to_owned(), v))
                        .collect::<HashMap<_, _>>(),
                })
                .collect(),
            columns: vec![],
            values: vec![],
        })),
        models: vec![],
    }
}

/// The ceiling: a `NudgeService` whose `Score` answers a response taken from Nudge for the
/// same request (one row, or the batch) without looking at the rows.
struct Trivial {
    one_row: pb::ScoreResponse,
    batch: pb::ScoreResponse,
}

type Unimplemented<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "the trivial server answers only Score",
    ))
}

#[tonic::async_trait]
impl NudgeService for Trivial {
    async fn score(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let rows = match &request.get_ref().subject {
            Some(Subject::FeatureRows(r)) if !r.rows.is_empty() => r.rows.len(),
            Some(Subject::FeatureRows(r)) => r.values.len() / r.columns.len().max(1),
            _ => 1,
        };
        Ok(Response::new(if rows == 1 {
            self.one_row.clone()
        } else {
            self.batch.clone()
        }))
    }

    async fn track(
        &self,
        _: Request<pb::TrackRequest>,
    ) -> Result<Response<pb::TrackResponse>, Status> {
        unimplemented()
    }

    type TrackStreamStream = Unimplemented<pb::TrackStreamResponse>;

    async fn track_stream(
        &self,
        _: Request<Streaming<pb::TrackStreamRequest>>,
    ) -> Result<Response<Self::TrackStreamStream>, Status> {
        unimplemented()
    }

    async fn identify(
        &self,
        _: Request<pb::IdentifyRequest>,
    ) -> Result<Response<pb::IdentifyResponse>, Status> {
        unimplemented()
    }

    async fn delete_user(
        &self,
        _: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        unimplemented()
    }

    async fn get_profile(
        &self,
        _: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        unimplemented()
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        unimplemented()
    }

    async fn reload_models(
        &self,
        _: Request<pb::ReloadModelsRequest>,
    ) -> Result<Response<pb::ReloadModelsResponse>, Status> {
        unimplemented()
    }

    type SubscribeTriggersStream = Unimplemented<pb::SubscribeTriggersResponse>;

    async fn subscribe_triggers(
        &self,
        _: Request<pb::SubscribeTriggersRequest>,
    ) -> Result<Response<Self::SubscribeTriggersStream>, Status> {
        unimplemented()
    }

    async fn explain_triggers(
        &self,
        _: Request<pb::ExplainTriggersRequest>,
    ) -> Result<Response<pb::ExplainTriggersResponse>, Status> {
        unimplemented()
    }

    async fn get_experiment_report(
        &self,
        _: Request<pb::GetExperimentReportRequest>,
    ) -> Result<Response<pb::GetExperimentReportResponse>, Status> {
        unimplemented()
    }

    async fn reload_rules(
        &self,
        _: Request<pb::ReloadRulesRequest>,
    ) -> Result<Response<pb::ReloadRulesResponse>, Status> {
        unimplemented()
    }

    async fn list_dead_letters(
        &self,
        _: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        unimplemented()
    }
}

/// Starts the trivial server on loopback, with the same TCP settings as Nudge's listener
/// (no Nagle delay), on the current runtime.
async fn start_trivial(trivial: Trivial) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NudgeServiceServer::new(trivial))
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    addr
}

fn nudge_config(dir: &std::path::Path) -> Config {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut config = Config::default();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.metrics_addr = "127.0.0.1:0".parse().unwrap();
    config.models.dir = root.join("models");
    config.store.dir = dir.to_owned();
    config.triggers.rules = root.join("config/rules.toml");
    config
}

/// CPU time this process has used, all threads (including those that have exited), from
/// `/proc/self/stat` (utime + stime, in the kernel's fixed 100 Hz USER_HZ ticks).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// CPU time of this process's threads whose name starts with `prefix`, from each thread's
/// `schedstat` (nanoseconds on the CPU). The client's threads never exit during a run.
fn threads_cpu(prefix: &str) -> Duration {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with(prefix) {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            let ns: u64 = stat
                .split(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            total += Duration::from_nanos(ns);
        }
    }
    total
}

const CLIENT_THREAD: &str = "bench-client";
const SERVER_THREAD: &str = "bench-server";

/// What one measured load phase gave.
struct Measured {
    requests: usize,
    elapsed: Duration,
    /// Sorted.
    latencies: Vec<Duration>,
    server_cpu: Duration,
    client_cpu: Duration,
}

impl Measured {
    fn empty() -> Measured {
        Measured {
            requests: 0,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
            server_cpu: Duration::ZERO,
            client_cpu: Duration::ZERO,
        }
    }

    fn add(&mut self, slice: Measured) {
        self.requests += slice.requests;
        self.elapsed += slice.elapsed;
        self.latencies.extend(slice.latencies);
        self.latencies.sort_unstable();
        self.server_cpu += slice.server_cpu;
        self.client_cpu += slice.client_cpu;
    }

    fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_us(&self, q: f64) -> f64 {
        common::percentile(&self.latencies, q) * 1e3
    }

    fn cpu_us_per_request(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.requests as f64
    }
}

/// Opens `channels` HTTP/2 connections to `addr`.
async fn connect(addr: &str, channels: usize) -> Vec<NudgeServiceClient<Channel>> {
    let mut clients = Vec::with_capacity(channels);
    for _ in 0..channels {
        let channel = Channel::from_shared(addr.to_owned())
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connects");
        clients.push(NudgeServiceClient::new(channel).max_decoding_message_size(64 << 20));
    }
    clients
}

/// Sends `request` from `inflight` tasks on each client in a loop: `warmup` unmeasured,
/// then `measure`. Counts the requests that started within the measured window and their
/// latencies, and the CPU each side used in that window.
async fn load(
    clients: &[NudgeServiceClient<Channel>],
    inflight: usize,
    request: &pb::ScoreRequest,
    warmup: Duration,
    measure: Duration,
) -> Measured {
    let from = Instant::now() + warmup;
    let until = from + measure;
    let mut tasks = Vec::new();
    for client in clients {
        for _ in 0..inflight {
            let mut client = client.clone();
            let request = request.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let started = Instant::now();
                    if started >= until {
                        break;
                    }
                    client.score(request.clone()).await.expect("Score answers");
                    if started >= from {
                        latencies.push(started.elapsed());
                    }
                }
                latencies
            }));
        }
    }
    tokio::time::sleep_until(from.into()).await;
    let (cpu0, client0) = (process_cpu(), threads_cpu(CLIENT_THREAD));
    tokio::time::sleep_until(until.into()).await;
    let (cpu1, client1) = (process_cpu(), threads_cpu(CLIENT_THREAD));
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    latencies.sort_unstable();
    let client_cpu = client1.saturating_sub(client0);
    Measured {
        requests: latencies.len(),
        elapsed: measure,
        latencies,
        server_cpu: cpu1.saturating_sub(cpu0).saturating_sub(client_cpu),
        client_cpu,
    }
}

/// Puts the same load on every server (`clients[s]` holds server s's connections) in
/// alternating slices, the order turning each round. Answers, per server, the whole
/// measurement and, per round, the rate of the second server over the first's.
async fn compare(
    clients: &[&[NudgeServiceClient<Channel>]],
    inflight: usize,
    request: &pb::ScoreRequest,
    settings: &Settings,
) -> (Vec<Measured>, Vec<f64>) {
    let slice = settings.measure / settings.rounds;
    let mut totals: Vec<Measured> = clients.iter().map(|_| Measured::empty()).collect();
    let mut ratios = Vec::new();
    for round in 0..settings.rounds as usize {
        let mut rates = vec![0.0; clients.len()];
        for k in 0..clients.len() {
            let s = (k + round) % clients.len();
            let m = load(clients[s], inflight, request, settings.warmup, slice).await;
            rates[s] = m.per_second();
            totals[s].add(m);
        }
        ratios.push(rates[1] / rates[0]);
    }
    ratios.sort_by(f64::total_cmp);
    (totals, ratios)
}

/// The figures behind `nudge::api::INLINE_SCORE_ROWS`: what a `spawn_blocking` round trip
/// costs on a worker of a runtime like the server's (its latency, and the CPU the whole
/// process spends on it), and what scoring n rows with the shipped models costs, so the
/// bound can be checked against this machine and the engine that serves.
fn calibrate(server: &tokio::runtime::Runtime) {
    const ROUND_TRIPS: usize = 20_000;
    let (round_trips, cpu) = server
        .block_on(server.spawn(async {
            let mut times = Vec::with_capacity(ROUND_TRIPS);
            let cpu = process_cpu();
            for i in 0..ROUND_TRIPS {
                let started = Instant::now();
                black_box(
                    tokio::task::spawn_blocking(move || black_box(i))
                        .await
                        .unwrap(),
                );
                times.push(started.elapsed());
            }
            times.sort_unstable();
            (times, process_cpu().saturating_sub(cpu))
        }))
        .unwrap();
    let round_trip_cpu_us = cpu.as_secs_f64() * 1e6 / ROUND_TRIPS as f64;
    println!(
        "spawn_blocking round trip from an idle server worker: p50 {:.1} µs, p99 {:.1} µs, \
         {:.1} µs of CPU each",
        common::percentile(&round_trips, 0.5) * 1e3,
        common::percentile(&round_trips, 0.99) * 1e3,
        round_trip_cpu_us
    );

    // As the server loads them (the default engine).
    let options = LoadOptions::from(&Config::default());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let (set, failures) = ModelSet::load_dir(&dir, &options, SystemClock.now()).unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    let models: Vec<_> = set.iter().cloned().collect();
    let metrics = Metrics::new();
    let mut line = format!(
        "scoring n rows with the {} shipped models, p50:",
        models.len()
    );
    let mut break_even = 0;
    for n in [1, 2, 4, 8, 16, 32, 64] {
        let rows: Vec<_> = (0..n)
            .map(|i| nudge::features::FeatureRow(row(i)))
            .collect();
        let mut times: Vec<Duration> = (0..2_000)
            .map(|_| {
                let started = Instant::now();
                black_box(score_rows(&models, &rows, &metrics).unwrap());
                started.elapsed()
            })
            .collect();
        times.sort_unstable();
        let us = common::percentile(&times, 0.5) * 1e3;
        line += &format!(" {n}: {us:.1} µs;");
        if us <= round_trip_cpu_us {
            break_even = n;
        }
    }
    println!("{line}");
    println!(
        "rows scored in at most a round trip's CPU: {break_even}; the server's inline bound \
         (INLINE_SCORE_ROWS): {}",
        nudge::api::INLINE_SCORE_ROWS
    );
}

fn runtime(threads: usize, name: &'static str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        // Blocking threads stay for the whole run, so no figure pays for starting one.
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()
        .unwrap()
}

fn main() {
    let settings = Settings::from_env();
    let server_rt = runtime(settings.server_threads, SERVER_THREAD);
    let client_rt = runtime(settings.client_threads, CLIENT_THREAD);
    println!(
        "Nudge gRPC Score benchmark — loopback TCP, {} HTTP/2 connections × {} requests in \
         flight; per figure {} s measured per server in {} alternating slices, each after {} s \
         of warm-up",
        settings.channels,
        settings.inflight,
        settings.measure.as_secs(),
        settings.rounds,
        settings.warmup.as_secs()
    );
    println!(
        "runtimes: servers {} worker thread(s), client {} worker thread(s), {} cores",
        settings.server_threads,
        settings.client_threads,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    calibrate(&server_rt);

    let data = tempfile::tempdir().unwrap();
    let nudge = server_rt.block_on(common::start(
        nudge_config(data.path()),
        Arc::new(SystemClock),
    ));
    let (one_packed, one_mapped) = (packed(1), mapped(1));
    let (batch_packed, batch_mapped) = (packed(settings.batch_rows), mapped(settings.batch_rows));

    // The trivial server answers what Nudge answers, so both send responses of one shape;
    // both forms must give Nudge's same scores, or the comparison below means nothing.
    let (one_row, batch) = client_rt.block_on(async {
        let client = connect(&nudge.addr, 1).await.remove(0);
        let answer = |request: &pb::ScoreRequest| {
            let request = request.clone();
            let mut client = client.clone();
            async move { client.score(request).await.unwrap().into_inner() }
        };
        let one_row = answer(&one_packed).await;
        assert_eq!(one_row, answer(&one_mapped).await);
        let batch = answer(&batch_packed).await;
        assert_eq!(batch, answer(&batch_mapped).await);
        assert_eq!(batch.rows.len(), settings.batch_rows);
        (one_row, batch)
    });
    let trivial = server_rt.block_on(start_trivial(Trivial { one_row, batch }));

    let servers = [
        ("trivial", trivial.as_str()),
        ("nudge", nudge.addr.as_str()),
    ];
    let scenarios: [(&str, &pb::ScoreRequest, usize); 4] = [
        ("1 row, packed", &one_packed, 1),
        ("1 row, map", &one_mapped, 1),
        ("batch, packed", &batch_packed, settings.batch_rows),
        ("batch, map", &batch_mapped, settings.batch_rows),
    ];
    println!();
    println!(
        "{:<14} {:<8} {:>10} {:>10} {:>8} {:>8} {:>16} {:>10} {:>10}",
        "request",
        "server",
        "requests/s",
        "rows/s",
        "p50 µs",
        "p99 µs",
        "of trivial",
        "server CPU",
        "client CPU"
    );
    let mut summary = Vec::new();
    client_rt.block_on(async {
        let mut conns = Vec::new();
        for (_, addr) in servers {
            conns.push(connect(addr, settings.channels).await);
        }
        let all: Vec<&[_]> = conns.iter().map(Vec::as_slice).collect();
        for (name, request, rows) in scenarios {
            let (measured, ratios) = compare(&all, settings.inflight, request, &settings).await;
            let ceiling = measured[0].per_second();
            for ((server, _), m) in servers.iter().zip(&measured) {
                let rate = m.per_second();
                let share = if *server == "trivial" {
                    String::new()
                } else {
                    summary.push(format!(
                        "{name}: nudge at {:.1}% of the trivial server's rate (per slice \
                         {:.1}%–{:.1}%); server CPU per request {:.1} µs against {:.1} µs",
                        100.0 * rate / ceiling,
                        100.0 * ratios[0],
                        100.0 * ratios[ratios.len() - 1],
                        m.cpu_us_per_request(m.server_cpu),
                        measured[0].cpu_us_per_request(measured[0].server_cpu),
                    ));
                    format!(
                        "{:.1}% ({:.0}–{:.0})",
                        100.0 * rate / ceiling,
                        100.0 * ratios[0],
                        100.0 * ratios[ratios.len() - 1]
                    )
                };
                println!(
                    "{:<14} {:<8} {:>10.0} {:>10.0} {:>8.0} {:>8.0} {:>16} {:>7.1} µs {:>7.1} µs",
                    name,
                    server,
                    rate,
                    rate * rows as f64,
                    m.percentile_us(0.5),
                    m.percentile_us(0.99),
                    share,
                    m.cpu_us_per_request(m.server_cpu),
                    m.cpu_us_per_request(m.client_cpu),
                );
            }
        }
        // Latency without queueing: one request at a time on one connection.
        println!();
        println!("one request in flight on one connection (latency without queueing):");
        let first: Vec<&[_]> = conns.iter().map(|c| &c[..1]).collect();
        for (name, request) in [("1 row, packed", &one_packed), ("1 row, map", &one_mapped)] {
            let (measured, _) = compare(&first, 1, request, &settings).await;
            for ((server, _), m) in servers.iter().zip(&measured) {
                println!(
                    "{:<14} {:<8} {:>10.0} requests/s, p50 {:.0} µs, p99 {:.0} µs",
                    name,
                    server,
                    m.per_second(),
                    m.percentile_us(0.5),
                    m.percentile_us(0.99),
                );
            }
        }
    });
    println!();
    for line in summary {
        println!("{line}");
    }
    println!(
        "of trivial: nudge's rate over the trivial server's, whole run (lowest–highest slice); \
         CPU: µs per request in the measured slices, the server's being the process's minus \
         the client threads'"
    );

    let _ = nudge.stop.send(());
    server_rt.block_on(nudge.task).unwrap().unwrap();
}
