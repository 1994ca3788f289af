//! Shared test support: a real server on 127.0.0.1:0 with a clock and timer ticks the test
//! drives, a real gRPC client, event builders, and the real binary with the addresses it
//! bound read from its log.

use std::collections::HashMap;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tonic::transport::Channel;

use nudge::app::{Server, Ticker};
use nudge::config::Config;
use nudge::pb;
use nudge::pb::nudge_service_client::NudgeServiceClient;
use nudge::time::{ManualClock, Time};

/// 2026-03-02T10:00:00Z, a Monday.
pub const T0: Time = Time(1_772_445_600_000);

pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A config for tests: loopback, ephemeral ports, the shipped models.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.metrics_addr = "127.0.0.1:0".parse().unwrap();
    // Bound only when a test gives it write keys (`http_write_keys_file`).
    config.server.http_addr = "127.0.0.1:0".parse().unwrap();
    config.server.shutdown_grace_seconds = 5;
    config.models.dir = repo_path("models");
    config.engine.shards = 2;
    config.triggers.rules = repo_path("config/rules.toml");
    config
}

pub struct TestServer {
    /// The store's directory, when the server made its own.
    _data: Option<tempfile::TempDir>,
    pub grpc_addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    /// The Segment-compatible HTTP API, when the config gives it write keys.
    pub http_addr: Option<std::net::SocketAddr>,
    pub clock: Arc<ManualClock>,
    /// Timers fire only when the test ticks: "nothing fired" is then a statement about a
    /// tick that happened, not about how long a test waited.
    ticker: Ticker,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(test_config()).await
    }

    /// Starts a server whose timers fire only on [`TestServer::tick`]; unless the config
    /// names a store directory, it gets a fresh one.
    pub async fn start_with(mut config: Config) -> TestServer {
        let data = (config.store.dir == Config::default().store.dir).then(|| {
            let dir = tempfile::tempdir().unwrap();
            config.store.dir = dir.path().to_owned();
            dir
        });
        let clock = Arc::new(ManualClock::new(T0));
        let mut server = Server::bind(config, clock.clone())
            .await
            .expect("server binds");
        let ticker = server.manual_ticks();
        let grpc_addr = server.grpc_addr();
        let metrics_addr = server.metrics_addr();
        let http_addr = server.http_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        TestServer {
            _data: data,
            grpc_addr,
            metrics_addr,
            http_addr,
            clock,
            ticker,
            stop: Some(stop),
            task,
        }
    }

    /// Fires every timer due at the clock's `now` on every shard; returns once what fired
    /// is committed, so it is in the outbox, in ExplainTriggers and in the metrics.
    pub async fn tick(&self) {
        self.ticker.tick().await.expect("the tick commits");
    }

    /// Sets the clock to `now`, then ticks.
    pub async fn tick_at(&self, now: Time) {
        self.clock.set(now);
        self.tick().await;
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .connect()
            .await
            .expect("connects")
    }

    pub async fn client(&self) -> NudgeServiceClient<Channel> {
        NudgeServiceClient::new(self.channel().await).max_encoding_message_size(64 << 20)
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics_addr))
            .await
            .expect("metrics answers")
            .text()
            .await
            .unwrap()
    }

    /// Signals shutdown and waits for the server to finish draining.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        (&mut self.task).await.expect("server task")
    }
}

/// An event builder with sensible defaults.
pub fn event(id: &str, user: &str, kind: pb::EventType, at: Time) -> pb::Event {
    pb::Event {
        event_id: id.to_owned(),
        user_id: user.to_owned(),
        anonymous_id: String::new(),
        r#type: kind.into(),
        event_time: Some(nudge::api::convert::timestamp(at)),
        properties: Some(pb::EventProperties::default()),
        attributes: HashMap::new(),
    }
}

pub fn props(e: &mut pb::Event) -> &mut pb::EventProperties {
    e.properties.get_or_insert_with(Default::default)
}

pub fn product_view(
    id: &str,
    user: &str,
    at: Time,
    product: &str,
    category: &str,
    dwell: Option<f64>,
) -> pb::Event {
    let mut e = event(id, user, pb::EventType::ProductView, at);
    let p = props(&mut e);
    p.product_id = Some(product.to_owned());
    p.category = Some(category.to_owned());
    p.price = Some(10.0);
    p.dwell_seconds = dwell;
    e
}

pub fn person(user: &str) -> Option<pb::PersonRef> {
    Some(pb::PersonRef {
        user_id: user.to_owned(),
        anonymous_id: String::new(),
    })
}

pub async fn track(
    client: &mut NudgeServiceClient<Channel>,
    events: Vec<pb::Event>,
) -> pb::TrackResponse {
    client
        .track(pb::TrackRequest { events })
        .await
        .expect("track succeeds")
        .into_inner()
}

/// GetProfile's features as a name → value map.
pub async fn features(
    client: &mut NudgeServiceClient<Channel>,
    user: &str,
) -> HashMap<String, f64> {
    client
        .get_profile(pb::GetProfileRequest {
            person: person(user),
            as_of: None,
        })
        .await
        .expect("profile exists")
        .into_inner()
        .features
        .into_iter()
        .map(|f| (f.name, f.value))
        .collect()
}

/// Asserts a feature's value; `f64::NAN` expects NaN.
pub fn assert_feature(features: &HashMap<String, f64>, name: &str, expected: f64) {
    let got = *features
        .get(name)
        .unwrap_or_else(|| panic!("no feature {name}"));
    if expected.is_nan() {
        assert!(got.is_nan(), "{name}: expected NaN, got {got}");
    } else {
        assert!(
            (got - expected).abs() < 1e-9,
            "{name}: expected {expected}, got {got}"
        );
    }
}

/// The value of a metric series in Prometheus text, matched by its full line prefix.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// The real `nudge` binary, serving with the shipped config and models on ports it chose
/// itself (`127.0.0.1:0`), read back from its log; killed when dropped.
pub struct Nudge {
    child: Option<std::process::Child>,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// Every log line so far (JSON, one object a line).
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Starts the binary with its store in `data` and `env` overrides, and waits (up to 30 s)
/// for its "serving" log line, which names the addresses it bound. Binding port 0 in the
/// process that serves leaves no window for another test to take the port.
pub async fn spawn_nudge(data: &std::path::Path, env: &[(&str, String)]) -> Nudge {
    spawn_nudge_with(data, &repo_path("config/nudge.toml"), env).await
}

/// [`spawn_nudge`] with the config file `config`.
pub async fn spawn_nudge_with(
    data: &std::path::Path,
    config: &std::path::Path,
    env: &[(&str, String)],
) -> Nudge {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            // Bound only when the test gives the HTTP API write keys.
            "--http-addr",
            "127.0.0.1:0",
        ])
        .current_dir(repo_path(""))
        .env("NUDGE__STORE__DIR", data)
        // The test reads the "serving" line, an info line, as data.
        .env("NUDGE__LOG__FORMAT", "json")
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (serving, addrs) = oneshot::channel::<(SocketAddr, SocketAddr)>();
    let reader = {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut serving = Some(serving);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // Logged before the "serving" signal, so a test woken by it finds the line.
                {
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
                if let Some(addrs) = serving_addrs(&line) {
                    if let Some(tx) = serving.take() {
                        let _ = tx.send(addrs);
                    }
                }
            }
        })
    };
    let mut nudge = Nudge {
        child: Some(child),
        grpc_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        metrics_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        log,
        reader: Some(reader),
    };
    match tokio::time::timeout(Duration::from_secs(30), addrs).await {
        Ok(Ok((grpc, metrics))) => {
            nudge.grpc_addr = grpc;
            nudge.metrics_addr = metrics;
            nudge
        }
        Ok(Err(_)) => panic!("the binary exited before serving; log:\n{}", nudge.log()),
        Err(_) => panic!(
            "the binary did not serve within 30 s; log:\n{}",
            nudge.log()
        ),
    }
}

/// The gRPC and metrics addresses of a JSON "serving" log line.
pub fn serving_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let json: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = &json["fields"];
    if fields["message"] != "serving" {
        return None;
    }
    Some((
        fields["grpc_addr"].as_str()?.parse().ok()?,
        fields["metrics_addr"].as_str()?.parse().ok()?,
    ))
}

impl Nudge {
    pub fn id(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends `signal` (a `kill` name: HUP, TERM) to the process.
    pub fn signal(&self, signal: &str) {
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal}");
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Waits for the process to exit by itself; its exit status and its whole log.
    pub async fn exit(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let reader = self.reader.take().unwrap();
        let status = tokio::task::spawn_blocking(move || {
            let status = child.wait().unwrap();
            // The log ends with the process: the reader sees end of file and stops.
            reader.join().unwrap();
            status
        })
        .await
        .unwrap();
        (status, self.log())
    }

    /// The binary's metrics in Prometheus text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics_addr))
            .await
            .expect("metrics answers")
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Nudge {
    /// A test that fails midway leaves no server running.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends bytes as they are, so a test can put a malformed message on the wire.
#[derive(Clone, Copy)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let len = prost::bytes::Buf::remaining(src);
        Ok(Some(prost::bytes::Buf::copy_to_bytes(src, len).to_vec()))
    }
}

/// The Python interpreter with the SDKs of tests/fixtures/requirements.txt:
/// `NUDGE_TEST_PYTHON`, else the one scripts/test.sh installs them into.
pub fn python() -> std::path::PathBuf {
    std::env::var_os("NUDGE_TEST_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| repo_path(".tools/pyenv/bin/python"))
}
