//! What TLS and API keys cost: single-row `Score` requests/s and latency against four real
//! Nudge servers in the same run — plaintext without keys, plaintext with keys, TLS without
//! keys, TLS with keys — and the time to open a connection and make a first call.
//!
//! `NUDGE_BENCH_CHANNELS` connections (default 4) with `NUDGE_BENCH_INFLIGHT` requests
//! outstanding on each (default 32); each setup gets `NUDGE_BENCH_SECONDS` (default 6) of
//! measured load in `NUDGE_BENCH_ROUNDS` (default 3) slices that alternate between the
//! setups, after a second of unmeasured load each: the machine is shared, and alternating
//! puts whatever else runs on it on every setup alike. Servers and client run on separate
//! tokio runtimes of one worker thread each, as in `benches/grpc.rs`.
//!
//! `cargo bench --bench security`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nudge::app::Server;
use nudge::config::Config;
use nudge::features::{FeatureSpec, FEATURE_COUNT};
use nudge::pb::{self, nudge_service_client::NudgeServiceClient, score_request::Subject};
use nudge::security::keys::{self, Scope};
use nudge::time::{Clock, SystemClock};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

mod common;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number"))
        })
        .unwrap_or(default)
}

/// One server setup under test.
struct Setup {
    label: &'static str,
    addr: std::net::SocketAddr,
    /// The CA to trust, when the server speaks TLS.
    ca: Option<String>,
    /// The key to send, when the server checks keys.
    key: Option<String>,
    served: Vec<Duration>,
    requests: u64,
    elapsed: Duration,
}

impl Setup {
    async fn channel(&self) -> Channel {
        let endpoint = match &self.ca {
            Some(ca) => Channel::from_shared(format!("https://localhost:{}", self.addr.port()))
                .unwrap()
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(ca))
                        .domain_name("localhost"),
                )
                .unwrap(),
            None => Channel::from_shared(format!("http://{}", self.addr)).unwrap(),
        };
        endpoint.connect().await.unwrap()
    }

    fn request(&self) -> tonic::Request<pb::ScoreRequest> {
        let spec = FeatureSpec::current();
        let mut request = tonic::Request::new(pb::ScoreRequest {
            subject: Some(Subject::FeatureRows(pb::FeatureRows {
                rows: vec![],
                columns: spec.names().map(str::to_owned).collect(),
                values: (0..FEATURE_COUNT)
                    .map(|j| ((j * 17) % 97) as f64 / 4.0)
                    .collect(),
            })),
            models: vec![],
        });
        if let Some(key) = &self.key {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        request
    }
}

fn certificates(dir: &std::path::Path) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bench CA");
    let ca =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    ca.pem()
}

fn main() {
    let channels = env_or("NUDGE_BENCH_CHANNELS", 4) as usize;
    let inflight = env_or("NUDGE_BENCH_INFLIGHT", 32) as usize;
    let measure = Duration::from_secs(env_or("NUDGE_BENCH_SECONDS", 6));
    let rounds = env_or("NUDGE_BENCH_ROUNDS", 3) as u32;
    let dir = tempfile::tempdir().unwrap();
    let ca = certificates(dir.path());
    let keys_file = dir.path().join("keys.toml");
    let key = keys::add(&keys_file, "bench", &[Scope::Score], 0.0, 0).unwrap();

    // The check itself, in process: what each call pays for its key.
    {
        let metrics = Arc::new(nudge::metrics::Metrics::new());
        let keys = Arc::new(nudge::security::keys::Keys::load(&keys_file).unwrap());
        let auth = nudge::api::auth::Auth::new(keys, true, true, metrics);
        let header = format!("Bearer {key}");
        let n = 1_000_000;
        let started = Instant::now();
        for _ in 0..n {
            let caller = auth
                .check("/nudge.v1.NudgeService/Score", Some(header.as_bytes()))
                .unwrap();
            std::hint::black_box(caller);
        }
        println!(
            "the key check of one call (header parse, SHA-256, lookup, scope, count): {:.0} ns\n",
            started.elapsed().as_nanos() as f64 / n as f64
        );
    }

    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut setups = Vec::new();
    let mut stops = Vec::new();
    for (label, tls, auth) in [
        ("plaintext", false, false),
        ("plaintext + keys", false, true),
        ("TLS", true, false),
        ("TLS + keys", true, true),
    ] {
        let mut config = Config::default();
        config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
        config.server.metrics_addr = "127.0.0.1:0".parse().unwrap();
        config.models.dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
        config.triggers.rules = std::path::PathBuf::new();
        let store = dir.path().join(format!("store-{}", setups.len()));
        config.store.dir = store;
        if tls {
            config.server.tls.cert_file = Some(dir.path().join("server.crt"));
            config.server.tls.key_file = Some(dir.path().join("server.key"));
        }
        if auth {
            config.auth.keys_file = Some(keys_file.clone());
        }
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let (addr, stop) = servers.block_on(async {
            let server = Server::bind(config, clock).await.unwrap();
            let addr = server.grpc_addr();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(server.run(async {
                let _ = stopped.await;
            }));
            (addr, stop)
        });
        stops.push(stop);
        setups.push(Setup {
            label,
            addr,
            ca: tls.then(|| ca.clone()),
            key: auth.then(|| key.clone()),
            served: Vec::new(),
            requests: 0,
            elapsed: Duration::ZERO,
        });
    }

    client.block_on(async {
        // Every setup answers before any is measured.
        for setup in &setups {
            let mut c = NudgeServiceClient::new(setup.channel().await);
            let deadline = Instant::now() + Duration::from_secs(60);
            while c.score(setup.request()).await.is_err() {
                assert!(Instant::now() < deadline, "{} never served", setup.label);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let slice = measure / rounds;
        for _ in 0..rounds {
            for setup in setups.iter_mut() {
                let mut clients = Vec::new();
                for _ in 0..channels {
                    clients.push(NudgeServiceClient::new(setup.channel().await));
                }
                load(setup, &clients, inflight, Duration::from_secs(1), false).await;
                load(setup, &clients, inflight, slice, true).await;
            }
        }
        println!(
            "Score, one row a request, {channels} connections x {inflight} in flight, \
             {} s per setup in {rounds} alternating slices:",
            measure.as_secs()
        );
        println!(
            "{:<18} {:>12} {:>9} {:>9} {:>9}",
            "setup", "requests/s", "of plain", "p50 ms", "p99 ms"
        );
        let base = setups[0].requests as f64 / setups[0].elapsed.as_secs_f64();
        for setup in setups.iter_mut() {
            setup.served.sort_unstable();
            let rate = setup.requests as f64 / setup.elapsed.as_secs_f64();
            println!(
                "{:<18} {:>12.0} {:>8.1}% {:>9.3} {:>9.3}",
                setup.label,
                rate,
                100.0 * rate / base,
                common::percentile(&setup.served, 0.50),
                common::percentile(&setup.served, 0.99),
            );
        }

        println!("\none request in flight (one connection), and a new connection's first call:");
        println!(
            "{:<18} {:>9} {:>9} {:>16} {:>16}",
            "setup", "p50 ms", "p99 ms", "connect p50 ms", "connect p99 ms"
        );
        for setup in &setups {
            let mut c = NudgeServiceClient::new(setup.channel().await);
            let mut single = Vec::new();
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                let t = Instant::now();
                c.score(setup.request()).await.unwrap();
                single.push(t.elapsed());
            }
            single.sort_unstable();
            let mut connects = Vec::new();
            for _ in 0..100 {
                let t = Instant::now();
                let mut fresh = NudgeServiceClient::new(setup.channel().await);
                fresh.score(setup.request()).await.unwrap();
                connects.push(t.elapsed());
            }
            connects.sort_unstable();
            println!(
                "{:<18} {:>9.3} {:>9.3} {:>16.3} {:>16.3}",
                setup.label,
                common::percentile(&single, 0.50),
                common::percentile(&single, 0.99),
                common::percentile(&connects, 0.50),
                common::percentile(&connects, 0.99),
            );
        }
    });
    for stop in stops {
        let _ = stop.send(());
    }
    servers.shutdown_timeout(Duration::from_secs(5));
}

/// `inflight` requests outstanding on each client for `length`; recorded when `measured`.
async fn load(
    setup: &mut Setup,
    clients: &[NudgeServiceClient<Channel>],
    inflight: usize,
    length: Duration,
    measured: bool,
) {
    let until = Instant::now() + length;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        for _ in 0..inflight {
            let mut client = client.clone();
            let request = setup.request();
            tasks.spawn(async move {
                let mut times = Vec::new();
                let mut next = Some(request);
                while Instant::now() < until {
                    let request = next.take().unwrap();
                    let again = clone_request(&request);
                    let t = Instant::now();
                    client.score(request).await.expect("served");
                    times.push(t.elapsed());
                    next = Some(again);
                }
                times
            });
        }
    }
    let mut times = Vec::new();
    while let Some(done) = tasks.join_next().await {
        times.extend(done.unwrap());
    }
    if measured {
        setup.requests += times.len() as u64;
        setup.elapsed += started.elapsed();
        setup.served.extend(times);
    }
}

fn clone_request(request: &tonic::Request<pb::ScoreRequest>) -> tonic::Request<pb::ScoreRequest> {
    let mut copy = tonic::Request::new(request.get_ref().clone());
    *copy.metadata_mut() = request.metadata().clone();
    copy
}
