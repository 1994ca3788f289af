//! Shared test support: a real server on 127.0.0.1:0 with a clock the test sets, a real
//! gRPC client, and event builders.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::oneshot;
use tonic::transport::Channel;

use nudge::app::Server;
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
    config.server.shutdown_grace_seconds = 5;
    config.models.dir = repo_path("models");
    config.engine.shards = 2;
    config.triggers.rules = repo_path("config/rules.toml");
    config.triggers.tick_ms = 20;
    config
}

pub struct TestServer {
    /// The store's directory, when the server made its own.
    _data: Option<tempfile::TempDir>,
    pub grpc_addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    pub clock: Arc<ManualClock>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(test_config()).await
    }

    /// Starts a server; unless the config names a store directory, it gets a fresh one.
    pub async fn start_with(mut config: Config) -> TestServer {
        let data = (config.store.dir == Config::default().store.dir).then(|| {
            let dir = tempfile::tempdir().unwrap();
            config.store.dir = dir.path().to_owned();
            dir
        });
        let clock = Arc::new(ManualClock::new(T0));
        let server = Server::bind(config, clock.clone())
            .await
            .expect("server binds");
        let grpc_addr = server.grpc_addr();
        let metrics_addr = server.metrics_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        TestServer {
            _data: data,
            grpc_addr,
            metrics_addr,
            clock,
            stop: Some(stop),
            task,
        }
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

/// A free port on loopback (free when asked; the binary binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real `nudge` binary serving on `grpc` with the shipped config and models, its store
/// in `data`, and `env` overrides; stderr (the log) piped.
pub fn spawn_nudge(
    data: &std::path::Path,
    grpc: u16,
    env: &[(&str, String)],
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args([
            "serve",
            "--config",
            repo_path("config/nudge.toml").to_str().unwrap(),
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--metrics-addr",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .current_dir(repo_path(""))
        .env("NUDGE__STORE__DIR", data)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}
