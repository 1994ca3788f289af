//! Overload benchmark: what Nudge does when offered more than it can take. The server is
//! the real `nudge` binary with the shipped config (its models and rules, the default
//! durable store: `store.sync = "always"`, fsync per group commit), in a process of its
//! own; the load generator is this process. With two CPUs or more they are pinned apart
//! (`taskset`): the server to every CPU but the first (`NUDGE_BENCH_SERVER_CPUS`), the
//! generator to the first (`NUDGE_BENCH_CLIENT_CPUS`; `none` for either leaves it
//! unpinned), so the generator's encoding of 3× the server's rate takes nothing from the
//! server and the server's latency and memory are its own.
//!
//! 1. Sustained rate: a closed loop of callers, each sending a unary `Track` of
//!    `NUDGE_BENCH_BATCH` (100) events and the next one when it is answered (20 ms after a
//!    refusal), for `NUDGE_BENCH_SUSTAIN_SECONDS` (10) after `NUDGE_BENCH_WARMUP_SECONDS`
//!    (2), split evenly over the concurrencies `NUDGE_BENCH_CALLERS` (8,16,32,64): the best
//!    rate of events acknowledged per second.
//! 2. Overload: an open loop at `NUDGE_BENCH_FACTOR` (3) times that rate for
//!    `NUDGE_BENCH_OVERLOAD_SECONDS` (20). Requests go out on a fixed schedule whatever the
//!    answers, each in its own task with a 5 s deadline (`grpc-timeout`, and the client gives
//!    up then too), so the offered rate does not fall when the server slows, as it would not
//!    with many independent clients. Reported: offered rate and goodput, answers by status
//!    code, the accepted requests' latency at the client and in the server (from the server's
//!    `nudge_grpc_request_duration_seconds{rpc="Track"}` histogram, scraped before and after),
//!    the server process's resident memory every second, and the shed and request counters
//!    the server exports.
//! 3. Back to normal: from the moment the schedule stops, one single-event `Track` at a time,
//!    at most one per 50 ms, until 10 in a row answer OK within 50 ms.
//!
//! The answers that matter here are refusals and missed deadlines, so none of them fails the
//! run; it fails only when the server does not start or acknowledges nothing.
//!
//! `cargo bench --bench overload`. The whole run takes about a minute by default.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nudge::pb::{self, nudge_service_client::NudgeServiceClient};
use nudge::time::{Clock, SystemClock, Time, MINUTE_MS};
use tonic::transport::Channel;

mod common;
use common::{percentile, pin_self, rss_of_pid, scrape, Binary};

/// The deadline every overload request carries, as a client with a 5 s timeout would.
const DEADLINE: Duration = Duration::from_secs(5);
/// How long a recovery probe may take and still count as normal.
const NORMAL: Duration = Duration::from_millis(50);
/// Probes that must be normal in a row.
const NORMAL_IN_A_ROW: usize = 10;
/// How long a closed-loop caller waits after a refusal.
const REFUSED_BACKOFF: Duration = Duration::from_millis(20);
/// The people the events are spread over: few enough that every one of them has a profile
/// before the overload starts, so memory during the overload is not profiles being created.
const PEOPLE: u64 = 50_000;

/// The load, from environment variables.
struct Settings {
    batch: usize,
    callers: Vec<usize>,
    channels: usize,
    warmup: Duration,
    sustain: Duration,
    overload: Duration,
    factor: f64,
    recovery_limit: Duration,
    client_threads: usize,
    /// `taskset` CPU lists for the server process and this one; `None`: unpinned.
    server_cpus: Option<String>,
    client_cpus: Option<String>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let seconds = |name, default| Duration::from_secs_f64(env_or(name, default));
        let settings = Settings {
            batch: env_or("NUDGE_BENCH_BATCH", 100),
            callers: std::env::var("NUDGE_BENCH_CALLERS")
                .unwrap_or_else(|_| "8,16,32,64".to_owned())
                .split(',')
                .map(|c| {
                    c.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("NUDGE_BENCH_CALLERS: {c:?} is not a number"))
                })
                .collect(),
            // Many connections, because a tonic server lets 200 streams run at once on one
            // HTTP/2 connection and the client holds back the rest: with few connections
            // the overload would queue in the load generator, not in the server.
            channels: env_or("NUDGE_BENCH_CHANNELS", 16),
            warmup: seconds("NUDGE_BENCH_WARMUP_SECONDS", 2.0),
            sustain: seconds("NUDGE_BENCH_SUSTAIN_SECONDS", 10.0),
            overload: seconds("NUDGE_BENCH_OVERLOAD_SECONDS", 20.0),
            factor: env_or("NUDGE_BENCH_FACTOR", 3.0),
            recovery_limit: seconds("NUDGE_BENCH_RECOVERY_LIMIT_SECONDS", 30.0),
            client_threads: env_or("NUDGE_BENCH_CLIENT_THREADS", 1),
            server_cpus: cpus("NUDGE_BENCH_SERVER_CPUS", |n| format!("1-{}", n - 1)),
            client_cpus: cpus("NUDGE_BENCH_CLIENT_CPUS", |_| "0".to_owned()),
        };
        assert!(
            settings.batch > 0
                && !settings.callers.is_empty()
                && !settings.callers.contains(&0)
                && settings.channels > 0
                && settings.factor > 0.0
                && settings.client_threads > 0,
            "batch, callers, channels, factor and threads must be positive"
        );
        settings
    }
}

/// A CPU list from `name`, or `default` of the CPU count when there are two or more;
/// `none` (or a single CPU) pins nothing.
fn cpus(name: &str, default: impl Fn(usize) -> String) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if v == "none" => None,
        Ok(v) => Some(v),
        Err(_) => {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            (n >= 2).then(|| default(n))
        }
    }
}

/// Every event id is new, so no event is skipped as a duplicate.
static NEXT_EVENT: AtomicU64 = AtomicU64::new(0);

/// A Track of `n` events: four in a row per person (a page view, two product views, a cart
/// add), so the rules' cart-abandonment timers, journey stages and score thresholds all work.
fn track(n: usize, now: Time) -> pb::TrackRequest {
    let kinds = [
        pb::EventType::PageView,
        pb::EventType::ProductView,
        pb::EventType::ProductView,
        pb::EventType::AddToCart,
    ];
    let first = NEXT_EVENT.fetch_add(n as u64, Ordering::Relaxed);
    let events = (first..first + n as u64)
        .map(|i| pb::Event {
            event_id: format!("o{i}"),
            user_id: format!("overload-{}", (i / 4) % PEOPLE),
            anonymous_id: String::new(),
            r#type: kinds[(i % 4) as usize].into(),
            event_time: Some(nudge::api::convert::timestamp(now.plus_ms(-MINUTE_MS))),
            properties: Some(pb::EventProperties {
                product_id: Some(format!("sku-{}", i % 500)),
                category: Some(format!("cat-{}", i % 12)),
                price: Some(10.0 + (i % 90) as f64),
                dwell_seconds: i.is_multiple_of(2).then_some(20.0),
                ..Default::default()
            }),
            attributes: Default::default(),
        })
        .collect();
    pb::TrackRequest { events }
}

/// How one request ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Answer {
    Code(tonic::Code),
    /// No answer a grace after the deadline: the bench's own backstop, should a deadline
    /// not be enforced by tonic (it is, in the client's channel and in the server).
    GaveUp,
}

impl Answer {
    /// The order answers are printed in: by gRPC code, OK first; no answer last.
    fn rank(self) -> i32 {
        match self {
            Answer::Code(code) => code as i32,
            Answer::GaveUp => i32::MAX,
        }
    }

    fn label(self) -> String {
        match self {
            // tonic ends a call whose `grpc-timeout` passed with CANCELLED "Timeout
            // expired", not DEADLINE_EXCEEDED, on either side: the client's channel and the
            // server both enforce the header, whichever clock runs out first.
            Answer::Code(code) => {
                let mut label = String::new();
                for c in format!("{code:?}").chars() {
                    if c.is_uppercase() && !label.is_empty() {
                        label.push('_');
                    }
                    label.push(c.to_ascii_uppercase());
                }
                label
            }
            Answer::GaveUp => "no answer by the deadline (client gave up)".to_owned(),
        }
    }
}

struct Outcome {
    answer: Answer,
    /// The status message of an error.
    message: String,
    latency: Duration,
    /// Events the answer acknowledged as accepted.
    accepted: u64,
}

/// Sends one Track and waits for its answer, `deadline` at most when given.
async fn send(
    mut client: NudgeServiceClient<Channel>,
    events: usize,
    deadline: Option<Duration>,
) -> Outcome {
    let mut request = tonic::Request::new(track(events, SystemClock.now()));
    if let Some(deadline) = deadline {
        request.set_timeout(deadline);
    }
    let started = Instant::now();
    let call = client.track(request);
    let answered = match deadline {
        // tonic's channel ends the call at the deadline itself; this backstop, a grace
        // later, only keeps a call that nobody ends from holding up the run.
        Some(deadline) => tokio::time::timeout(deadline + Duration::from_millis(250), call)
            .await
            .ok(),
        None => Some(call.await),
    };
    let latency = started.elapsed();
    match answered {
        Some(Ok(response)) => Outcome {
            answer: Answer::Code(tonic::Code::Ok),
            message: String::new(),
            latency,
            accepted: response
                .into_inner()
                .results
                .iter()
                .filter(|r| r.status() == pb::EventStatus::Accepted)
                .count() as u64,
        },
        Some(Err(status)) => Outcome {
            answer: Answer::Code(status.code()),
            message: status.message().to_owned(),
            latency,
            accepted: 0,
        },
        None => Outcome {
            answer: Answer::GaveUp,
            message: String::new(),
            latency,
            accepted: 0,
        },
    }
}

/// The closed loop: `callers` callers, each sending the next Track when the last is
/// answered (after [`REFUSED_BACKOFF`] when it was refused), until `until`.
async fn closed_loop(
    clients: &[NudgeServiceClient<Channel>],
    callers: usize,
    batch: usize,
    until: Instant,
) -> Vec<Outcome> {
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let client = clients[c % clients.len()].clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while Instant::now() < until {
                    let outcome = send(client.clone(), batch, None).await;
                    // A refused caller waits before it tries again, as a client that honors
                    // the retry hint would; one that retried at once would spin on refusals
                    // and take from the server the CPU its accepted work needs.
                    if outcome.answer != Answer::Code(tonic::Code::Ok) {
                        tokio::time::sleep(REFUSED_BACKOFF).await;
                    }
                    outcomes.push(outcome);
                }
                outcomes
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.extend(task.await.unwrap());
    }
    outcomes
}

/// The server's resident memory once a second, with the phase it was taken in, until
/// `stop` is set.
fn sample_memory(
    pid: u32,
    phase: Arc<std::sync::Mutex<&'static str>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Duration, &'static str, u64)>> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            samples.push((started.elapsed(), *phase.lock().unwrap(), rss_of_pid(pid)));
        }
        samples
    })
}

/// One sample line: name, labels, value.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a Prometheus text exposition (labels without escaped quotes, as Nudge's
/// are).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            Some(Sample {
                name: name.to_owned(),
                labels,
                value,
            })
        })
        .collect()
}

fn series_key(s: &Sample) -> String {
    let labels: Vec<_> = s
        .labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{v}\""))
        .collect();
    format!("{}{{{}}}", s.name, labels.join(","))
}

/// What each series matching `keep` grew by from `before` to `after`.
fn deltas(before: &str, after: &str, keep: impl Fn(&Sample) -> bool) -> Vec<(Sample, f64)> {
    let earlier: BTreeMap<String, f64> = samples(before)
        .into_iter()
        .filter(&keep)
        .map(|s| (series_key(&s), s.value))
        .collect();
    samples(after)
        .into_iter()
        .filter(&keep)
        .map(|s| {
            let grew = s.value - earlier.get(&series_key(&s)).copied().unwrap_or(0.0);
            (s, grew)
        })
        .collect()
}

/// A histogram's growth between two scrapes, over the series `keep` picks: (upper bound
/// `le` in seconds, observations at or below it), cumulative and in order.
fn histogram_growth(before: &str, after: &str, keep: impl Fn(&Sample) -> bool) -> Vec<(f64, f64)> {
    let mut buckets: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (s, grew) in deltas(before, after, |s| s.name.ends_with("_bucket") && keep(s)) {
        let Some(le) = s.labels.get("le") else {
            continue;
        };
        let bound = le.parse().unwrap_or(f64::INFINITY);
        buckets.entry(le.clone()).or_insert((bound, 0.0)).1 += grew;
    }
    let mut buckets: Vec<_> = buckets.into_values().collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The Track calls the server timed between two scrapes; where the histogram has a `code`
/// label, only the OK calls.
fn track_histogram(before: &str, after: &str) -> Vec<(f64, f64)> {
    histogram_growth(before, after, |s| {
        s.name == "nudge_grpc_request_duration_seconds_bucket"
            && s.labels.get("rpc").map(String::as_str) == Some("Track")
            && s.labels.get("code").is_none_or(|c| c == "OK")
    })
}

/// The bucket holding the observation of rank `rank` (0-based) in a cumulative histogram,
/// as "(lower, upper] ms": a histogram quantile is known only to its bucket.
/// The p50 and p99 of what histogram `metric` counted between two scrapes, if it counted
/// anything: `label`, then how many `what` it counted.
fn print_growth(before: &str, after: &str, label: &str, metric: &str, what: &str) {
    let bucket = format!("{metric}_bucket");
    let grown = histogram_growth(before, after, |s| s.name == bucket);
    if let Some(&(_, counted)) = grown.last().filter(|b| b.1 > 0.0) {
        println!(
            "  {label:<28} p50 {}, p99 {} ({counted:.0} {what}; bucket resolution)",
            bucket_of(&grown, counted * 0.5),
            bucket_of(&grown, counted * 0.99),
        );
    }
}

fn bucket_of(buckets: &[(f64, f64)], rank: f64) -> String {
    let mut lower = 0.0;
    for &(le, count) in buckets {
        if count > rank {
            return if le.is_infinite() {
                format!("> {:.0} ms", lower * 1e3)
            } else {
                format!("({} ms, {} ms]", ms(lower), ms(le))
            };
        }
        lower = le;
    }
    "n/a".to_owned()
}

fn ms(seconds: f64) -> String {
    let ms = seconds * 1e3;
    if ms < 1.0 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.0}")
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / 1048576.0)
}

/// Latencies of the OK answers, sorted.
fn ok_latencies(outcomes: &[Outcome]) -> Vec<Duration> {
    let mut latencies: Vec<_> = outcomes
        .iter()
        .filter(|o| o.answer == Answer::Code(tonic::Code::Ok))
        .map(|o| o.latency)
        .collect();
    latencies.sort();
    latencies
}

fn main() {
    let settings = Settings::from_env();
    if let Some(cpus) = &settings.client_cpus {
        pin_self(cpus);
    }
    let server = Binary::spawn(settings.server_cpus.as_deref(), &[]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.client_threads)
        .thread_name("client")
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench(&settings, &server));
    server.stop();
}

async fn bench(settings: &Settings, server: &Binary) {
    let Settings { batch, .. } = *settings;
    let (addr, metrics_addr) = (server.addr.clone(), server.metrics_addr);
    let mut clients = Vec::new();
    for _ in 0..settings.channels {
        let channel = Channel::from_shared(addr.clone())
            .unwrap()
            .connect()
            .await
            .expect("the server accepts connections");
        clients.push(NudgeServiceClient::new(channel));
    }
    let phase = Arc::new(std::sync::Mutex::new("warm-up"));
    let stop_sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let memory = sample_memory(server.pid(), phase.clone(), stop_sampling.clone());
    let pinned = |cpus: &Option<String>| {
        cpus.as_ref()
            .map_or_else(|| "unpinned".to_owned(), |c| format!("CPUs {c}"))
    };
    println!(
        "Overload over unary Track: {batch} events per request over {PEOPLE} people, the \
         nudge binary with the shipped config (durable store, shipped models and rules) on \
         {}, the load generator in this process on {} ({} runtime threads), {} connections",
        pinned(&settings.server_cpus),
        pinned(&settings.client_cpus),
        settings.client_threads,
        settings.channels,
    );

    // 1. Sustained rate, after a warm-up that also gives every person a profile.
    closed_loop(
        &clients,
        settings.callers[settings.callers.len() / 2],
        batch,
        Instant::now() + settings.warmup,
    )
    .await;
    *phase.lock().unwrap() = "sustained";
    // The rate is the best of a few concurrencies, each for an equal share of the time:
    // without admission by time more callers only queue longer, but with it a caller too
    // many is refused, and the best concurrency is no longer simply the most.
    println!(
        "\n1. sustained (closed loop, {:.0} s in all, the best of {} concurrencies):",
        settings.sustain.as_secs_f64(),
        settings.callers.len()
    );
    let step = settings.sustain / settings.callers.len() as u32;
    let mut sustained = 0.0f64;
    for &callers in &settings.callers {
        let started = Instant::now();
        let outcomes = closed_loop(&clients, callers, batch, started + step).await;
        let elapsed = started.elapsed().as_secs_f64();
        let rate = outcomes.iter().map(|o| o.accepted).sum::<u64>() as f64 / elapsed;
        let refused = outcomes
            .iter()
            .filter(|o| o.answer != Answer::Code(tonic::Code::Ok))
            .count();
        let latencies = ok_latencies(&outcomes);
        let latency = if latencies.is_empty() {
            String::new()
        } else {
            format!(
                ", OK p50 {:.1} ms, p99 {:.1} ms",
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99)
            )
        };
        println!(
            "  {:<28} {rate:>9.0} events/s ({:.0} requests/s{latency}, {refused} refused)",
            format!("{callers} callers"),
            latencies.len() as f64 / elapsed,
        );
        sustained = sustained.max(rate);
    }
    assert!(
        sustained > 0.0,
        "the server acknowledged no event in the closed loop"
    );
    println!("  {:<28} {sustained:>9.0} events/s", "sustained");

    // 2. Overload: an open loop on a fixed schedule.
    *phase.lock().unwrap() = "overload";
    let target = sustained * settings.factor;
    let interval = Duration::from_secs_f64(batch as f64 / target);
    let before = scrape(metrics_addr).await;
    let rss_before = rss_of_pid(server.pid());
    let started = Instant::now();
    let end = started + settings.overload;
    let mut tasks = Vec::new();
    let mut behind = Duration::ZERO;
    let mut next = started;
    while next < end {
        tokio::time::sleep_until(next.into()).await;
        // Every request that is due goes out now, so a late wake-up does not lower the
        // offered rate; how late the schedule ran is printed.
        let now = Instant::now();
        behind = behind.max(now - next);
        while next <= now && next < end {
            let client = clients[tasks.len() % clients.len()].clone();
            tasks.push(tokio::spawn(send(client, batch, Some(DEADLINE))));
            next += interval;
        }
    }
    let offered_for = started.elapsed().as_secs_f64();
    let sent = tasks.len();

    // 3. Back to normal, probed while the overload's last requests are still answered.
    *phase.lock().unwrap() = "recovery";
    let overload_ended = Instant::now();
    let probe_client = NudgeServiceClient::new(
        Channel::from_shared(addr.clone())
            .unwrap()
            .connect()
            .await
            .expect("the server accepts connections"),
    );
    let probes_sent = Arc::new(AtomicU64::new(0));
    let probes = tokio::spawn({
        let limit = settings.recovery_limit;
        let probes_sent = probes_sent.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut in_a_row = 0;
            let mut run_started = None;
            let mut probes = 0;
            while overload_ended.elapsed() < limit {
                tick.tick().await;
                let sent_at = overload_ended.elapsed();
                probes_sent.fetch_add(1, Ordering::Relaxed);
                let outcome = send(probe_client.clone(), 1, Some(DEADLINE)).await;
                probes += 1;
                if outcome.answer == Answer::Code(tonic::Code::Ok) && outcome.latency <= NORMAL {
                    in_a_row += 1;
                    run_started.get_or_insert(sent_at);
                    if in_a_row == NORMAL_IN_A_ROW {
                        return (run_started, probes);
                    }
                } else {
                    in_a_row = 0;
                    run_started = None;
                }
            }
            (None, probes)
        }
    });
    let mut outcomes = Vec::with_capacity(sent);
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    let all_answered = overload_ended.elapsed();
    let probes_by_then = probes_sent.load(Ordering::Relaxed);
    let after = scrape(metrics_addr).await;
    let (back_to_normal, probes) = probes.await.unwrap();
    *phase.lock().unwrap() = "done";
    stop_sampling.store(true, Ordering::Relaxed);
    let memory = memory.await.unwrap();

    // The overload's figures.
    // Each answer with its latencies and the first message it came with.
    let mut answers = BTreeMap::<i32, (Answer, Vec<Duration>, &str)>::new();
    for o in &outcomes {
        answers
            .entry(o.answer.rank())
            .or_insert((o.answer, Vec::new(), &o.message))
            .1
            .push(o.latency);
    }
    let acknowledged: u64 = outcomes.iter().map(|o| o.accepted).sum();
    let goodput = acknowledged as f64 / offered_for;
    let latencies = ok_latencies(&outcomes);
    println!(
        "\n2. overload (open loop, {:.1}x for {offered_for:.0} s, deadline {} s)",
        settings.factor,
        DEADLINE.as_secs()
    );
    println!(
        "  {:<28} {:>9.0} events/s ({} requests; target {target:.0}, schedule at most {:.0} ms late)",
        "offered",
        (sent * batch) as f64 / offered_for,
        sent,
        behind.as_secs_f64() * 1e3
    );
    println!(
        "  {:<28} {goodput:>9.0} events/s ({:.0}% of sustained)",
        "goodput (acknowledged)",
        goodput / sustained * 100.0
    );
    for (answer, latencies, message) in answers.values_mut() {
        latencies.sort();
        let message = if message.is_empty() {
            String::new()
        } else {
            format!(" \"{}\"", message.chars().take(100).collect::<String>())
        };
        println!(
            "  {:<28} {:>9} requests ({:.1}%), answered in p50 {:.1} ms, max {:.1} ms{message}",
            answer.label(),
            latencies.len(),
            latencies.len() as f64 / sent as f64 * 100.0,
            percentile(latencies, 0.5),
            percentile(latencies, 1.0),
        );
    }
    if !latencies.is_empty() {
        println!(
            "  {:<28} p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            "accepted, at the client",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            percentile(&latencies, 1.0)
        );
    }
    // The server's histogram, between the scrapes around the overload (the scrape after
    // waits for every overload request's answer, and also holds the recovery probes sent
    // until then).
    let histogram = track_histogram(&before, &after);
    let timed = histogram.last().map_or(0.0, |b| b.1);
    let ok_counted = deltas(&before, &after, |s| {
        s.name == "nudge_grpc_requests_total"
            && s.labels.get("rpc").map(String::as_str) == Some("Track")
            && s.labels.get("code").map(String::as_str) == Some("OK")
    })
    .iter()
    .map(|(_, grew)| grew)
    .sum::<f64>();
    let filtered = samples(&after).iter().any(|s| {
        s.name == "nudge_grpc_request_duration_seconds_bucket" && s.labels.contains_key("code")
    });
    if timed > 0.0 {
        if filtered {
            println!(
                "  {:<28} p50 {}, p99 {} ({timed:.0} OK calls timed; bucket resolution)",
                "accepted, in the server",
                bucket_of(&histogram, timed * 0.5),
                bucket_of(&histogram, timed * 0.99),
            );
        } else {
            // The histogram has every Track call, refused ones too. The refusals are
            // answered without waiting, so the accepted calls are taken to be the slowest
            // `ok_counted` of them; where a refusal took longer than an accepted call this
            // overstates the accepted latency a little.
            println!(
                "  {:<28} p50 {}, p99 {} (all {timed:.0} Track calls timed; bucket resolution)",
                "every call, in the server",
                bucket_of(&histogram, timed * 0.5),
                bucket_of(&histogram, timed * 0.99),
            );
            let refused = timed - ok_counted;
            println!(
                "  {:<28} p50 {}, p99 {} (the slowest {ok_counted:.0} of them, as many as \
                 answered OK)",
                "accepted, in the server",
                bucket_of(&histogram, refused + ok_counted * 0.5),
                bucket_of(&histogram, refused + ok_counted * 0.99),
            );
        }
    }
    // The wait in the shards' queues, where the server exports it (all commands, the
    // recovery probes' included), and the group commits (an fsync each), which every
    // accepted request waits for one of.
    print_growth(
        &before,
        &after,
        "queue wait, in the server",
        "nudge_queue_wait_seconds",
        "waits",
    );
    print_growth(
        &before,
        &after,
        "store commit, in the server",
        "nudge_store_commit_duration_seconds",
        "group commits",
    );
    println!(
        "  {:<28} {all_answered:.1?} after the schedule stopped ({probes_by_then} recovery \
         probes sent by then)",
        "last overload answer"
    );
    let counters = deltas(&before, &after, |s| {
        s.name.starts_with("nudge_shed")
            || (s.name == "nudge_grpc_requests_total"
                && s.labels.get("rpc").map(String::as_str) == Some("Track"))
    });
    println!("  server counters over the overload (grew by):");
    if !counters
        .iter()
        .any(|(s, _)| s.name.starts_with("nudge_shed"))
    {
        println!("    (no nudge_shed_total series exported)");
    }
    for (s, grew) in counters.iter().filter(|(_, grew)| *grew != 0.0) {
        println!("    {} +{grew:.0}", series_key(s));
    }

    // Memory, every second.
    let during: Vec<u64> = memory
        .iter()
        .filter(|(_, phase, _)| *phase == "overload")
        .map(|(_, _, rss)| *rss)
        .collect();
    if let (Some(min), Some(max)) = (during.iter().min(), during.iter().max()) {
        println!(
            "  {:<28} {} before, {} to {} during ({} samples; the server process)",
            "resident memory",
            mib(rss_before),
            mib(*min),
            mib(*max),
            during.len()
        );
    }
    // What of it is the people the shards hold (the cache, bounded by engine.cache_mb).
    println!(
        "  {:<28} {} before, {} after",
        "people in memory (cache)",
        mib(common::metric_sum(&before, "nudge_cache_bytes") as u64),
        mib(common::metric_sum(&after, "nudge_cache_bytes") as u64),
    );
    let shown: Vec<String> = memory
        .iter()
        .step_by(5)
        .map(|(at, phase, rss)| format!("{:.0}s {phase} {}", at.as_secs_f64(), mib(*rss)))
        .collect();
    println!("    samples: {}", shown.join(", "));

    println!(
        "\n3. back to normal (one 1-event Track at a time, at most every 50 ms, {} in a row OK \
         within {} ms):",
        NORMAL_IN_A_ROW,
        NORMAL.as_millis()
    );
    match back_to_normal {
        Some(at) => println!(
            "  {:<28} {:.2} s after the overload stopped ({probes} probes)",
            "normal from",
            at.as_secs_f64()
        ),
        None => println!(
            "  {:<28} not within {:.0} s ({probes} probes)",
            "normal from",
            settings.recovery_limit.as_secs_f64()
        ),
    }
    assert!(
        acknowledged > 0,
        "the server acknowledged none of the {sent} requests of the overload (answers above)"
    );
}
