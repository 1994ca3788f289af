//! Configuration: typed, defaulted, read from a TOML file and then overridden by
//! `NUDGE__<SECTION>__<KEY>` environment variables. Validation reports every problem at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::delivery::webhook::WebhookConfig;

/// The prefix of environment overrides: `NUDGE__SERVER__GRPC_ADDR=0.0.0.0:50051`.
pub const ENV_PREFIX: &str = "NUDGE__";

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub engine: EngineConfig,
    pub store: StoreConfig,
    pub identity: IdentityConfig,
    pub models: ModelsConfig,
    pub triggers: TriggersConfig,
    pub auth: AuthConfig,
    pub kafka: crate::kafka::KafkaConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where the gRPC API listens.
    pub grpc_addr: SocketAddr,
    /// Where `/metrics` listens.
    pub metrics_addr: SocketAddr,
    /// Where the Segment-compatible HTTP Tracking API listens, when
    /// `http_write_keys_file` is set (without write keys it is off).
    pub http_addr: SocketAddr,
    /// The write keys the HTTP API accepts, one a line (`sha256:<hex>` for a key given by
    /// its hash); read at start. Unset: the HTTP API is off.
    pub http_write_keys_file: Option<PathBuf>,
    /// The largest request message accepted, in bytes; larger ones get RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// The most events in one Track request.
    pub max_batch_events: usize,
    /// The most feature rows in one Score request.
    pub max_score_rows: usize,
    /// How long shutdown waits for in-flight requests, in seconds.
    pub shutdown_grace_seconds: u64,
    /// TLS for every listener (gRPC, metrics, HTTP); off when no certificate is given.
    pub tls: TlsConfig,
    /// Where a listener may serve without TLS: `loopback` (only on 127.0.0.0/8 and ::1),
    /// `never`, or `anywhere` (behind a proxy or mesh that encrypts, on purpose).
    pub plaintext: Exposure,
}

#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM. With `key_file`, TLS is on; both files are
    /// reloaded when they change (and on SIGHUP), so certificates rotate without a restart.
    pub cert_file: Option<PathBuf>,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// CA certificates, PEM: when set, every client must present a certificate they signed
    /// (mutual TLS). Reloaded like the others.
    pub client_ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("client_ca_file", &self.client_ca_file)
            .finish()
    }
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// Where something unprotected (plaintext, calls without a key) is allowed.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Exposure {
    Never,
    Loopback,
    Anywhere,
}

impl std::fmt::Display for Exposure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Exposure::Never => "\"never\"",
            Exposure::Loopback => "\"loopback\"",
            Exposure::Anywhere => "\"anywhere\"",
        })
    }
}

impl Exposure {
    pub fn allows(self, addr: SocketAddr) -> bool {
        match self {
            Exposure::Never => false,
            Exposure::Loopback => addr.ip().is_loopback(),
            Exposure::Anywhere => true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The API keys file (names, scopes, rate limits and each key's SHA-256; made by
    /// `nudge keys add`). Reloaded when it changes and on SIGHUP. Unset: calls need no key,
    /// which `anonymous` must allow for the gRPC address.
    pub keys_file: Option<PathBuf>,
    /// Where the gRPC API may serve calls without a key when `keys_file` is unset:
    /// `loopback`, `never` or `anywhere`.
    pub anonymous: Exposure,
    /// Health checks need no key (load balancers and orchestrators call them).
    pub open_health: bool,
    /// Server reflection (grpcurl, Postman) needs no key.
    pub open_reflection: bool,
    /// `GET /metrics` needs a key with the `metrics` scope (Prometheus sends it with
    /// `authorization: credentials_file`).
    pub metrics_require_key: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            keys_file: None,
            anonymous: Exposure::Loopback,
            open_health: true,
            open_reflection: true,
            metrics_require_key: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Shard threads that own the profiles; 0 means one per CPU.
    pub shards: usize,
    /// Requests waiting per shard before new ones are refused with RESOURCE_EXHAUSTED:
    /// a bound on memory.
    pub queue_capacity: usize,
    /// The most work that may be ahead of a request in a shard's queue, in milliseconds
    /// at the shard's measured rate: a request behind more is refused at once with
    /// RESOURCE_EXHAUSTED and a retry hint. A bound on latency; commits are outside it
    /// (every durable request waits for one), so a slow disk alone refuses nobody. An
    /// admitted request waits for up to the budget in the queue, then for its group (up
    /// to the budget of work, the request's own among it) and a commit: about twice the
    /// budget and a commit at worst. 10 ms keeps an accepted Track's p99 in the server
    /// under 50 ms at three times the sustained rate, where 25 ms gave 100–250 ms
    /// (`benches/overload.rs`), at no cost in throughput.
    pub queue_budget_ms: u64,
    /// The memory the shards may keep people in (profiles and trigger states), in MiB,
    /// shared by the shards; beyond it the people used least lately are evicted (CLOCK)
    /// and read from the store when they come back. 0 means a quarter of the memory this
    /// process may use (its cgroup's limit, or the machine's memory).
    pub cache_mb: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Where profiles, aliases and idempotency records live.
    pub dir: PathBuf,
    /// `always`: fsync before every acknowledgement (group commit). `interval`: fsync every
    /// `sync_interval_ms`; acknowledged events survive a crash of the process but power loss
    /// may lose up to that long.
    pub sync: SyncPolicy,
    pub sync_interval_ms: u64,
    /// How long an event id is remembered: a repeat within it changes nothing.
    pub dedup_horizon_hours: u64,
    /// Events older than this are refused.
    pub retention_days: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    Always,
    Interval,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// A file holding the secret key for pseudonymization. When set, user ids, anonymous
    /// ids and event ids are replaced by HMAC-SHA256 under this key before anything is
    /// stored. Keep the key apart from the data directory.
    pub pseudonymize_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// The directory of model files and their `*.manifest.toml` manifests.
    pub dir: PathBuf,
    /// The largest model file accepted, in bytes.
    pub max_file_bytes: u64,
    /// Reload when files in `dir` change (SIGHUP and ReloadModels work either way).
    pub watch: bool,
    /// The ONNX Runtime shared library; when empty, `ORT_DYLIB_PATH`, then
    /// `libonnxruntime.so` on the library path. Only read once an ONNX model loads.
    pub onnxruntime_library: String,
    /// What scores tree models: `"native"` (Nudge's own scorer, checked at load against
    /// LightGBM, or ONNX Runtime for ONNX tree ensembles; those serve what it does not)
    /// or `"lightgbm"` (each model's own library: LightGBM, or ONNX Runtime).
    pub engine: crate::model::Engine,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TriggersConfig {
    /// The rules file; empty for none. Reloaded when it changes, on SIGHUP and on
    /// ReloadRules; a file with problems is refused and the running rules stay.
    pub rules: PathBuf,
    /// How often due timers are looked for, in milliseconds.
    pub tick_ms: u64,
    /// Delivered triggers stay in the outbox this long for subscribers to resume from
    /// (longer while a webhook endpoint has not taken care of them).
    pub outbox_retention_hours: u64,
    /// Trigger decisions (ExplainTriggers) are kept this long.
    pub audit_retention_days: u64,
    pub webhooks: Vec<WebhookConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter, such as `info` or `nudge=debug,info`; `RUST_LOG` wins if set.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_addr: "127.0.0.1:50051".parse().expect("valid address"),
            metrics_addr: "127.0.0.1:9464".parse().expect("valid address"),
            http_addr: "127.0.0.1:8088".parse().expect("valid address"),
            http_write_keys_file: None,
            max_message_bytes: 4 * 1024 * 1024,
            max_batch_events: 1000,
            max_score_rows: 1000,
            shutdown_grace_seconds: 20,
            tls: TlsConfig::default(),
            plaintext: Exposure::Loopback,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            shards: 0,
            queue_capacity: 1024,
            queue_budget_ms: 10,
            cache_mb: 0,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            dir: PathBuf::from("data"),
            sync: SyncPolicy::Always,
            sync_interval_ms: 100,
            dedup_horizon_hours: 24,
            retention_days: 90,
        }
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            dir: PathBuf::from("models"),
            max_file_bytes: 256 * 1024 * 1024,
            watch: true,
            onnxruntime_library: String::new(),
            engine: crate::model::Engine::Native,
        }
    }
}

impl Default for TriggersConfig {
    fn default() -> Self {
        TriggersConfig {
            rules: PathBuf::from("config/rules.toml"),
            tick_ms: 1000,
            outbox_retention_hours: 168,
            audit_retention_days: 30,
            webhooks: Vec::new(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// Everything wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl Config {
    /// Reads `path` (or only defaults when `None`), applies `NUDGE__` overrides from `env`,
    /// and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    problems: vec![format!("cannot read {}: {e}", path.display())],
                })?;
                text.parse::<toml::Table>().map_err(|e| ConfigError {
                    problems: vec![format!("{}: {e}", path.display())],
                })?
            }
            None => toml::Table::new(),
        };
        let mut problems = Vec::new();
        for (key, value) in env {
            if let Some(path) = key.strip_prefix(ENV_PREFIX) {
                if let Err(problem) = apply_override(&mut table, path, &value) {
                    problems.push(format!("{key}: {problem}"));
                }
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError {
                    problems: vec![e.message().to_owned()],
                })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense, all of them at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let s = &self.server;
        if s.grpc_addr == s.metrics_addr && s.grpc_addr.port() != 0 {
            problems.push(format!(
                "server.grpc_addr and server.metrics_addr are both {}",
                s.grpc_addr
            ));
        }
        for (name, addr) in [("grpc_addr", s.grpc_addr), ("metrics_addr", s.metrics_addr)] {
            if s.http_write_keys_file.is_some() && s.http_addr == addr && addr.port() != 0 {
                problems.push(format!(
                    "server.http_addr and server.{name} are both {addr}"
                ));
            }
        }
        if let Some(path) = &s.http_write_keys_file {
            if let Err(problem) = crate::api::segment::WriteKeys::load(path) {
                problems.push(format!(
                    "server.http_write_keys_file {}: {problem}",
                    path.display()
                ));
            }
        }
        problems.extend(self.security_problems());
        if s.max_message_bytes < 1024 {
            problems.push("server.max_message_bytes must be at least 1024".to_owned());
        }
        if s.max_batch_events == 0 {
            problems.push("server.max_batch_events must be at least 1".to_owned());
        }
        if s.max_score_rows == 0 {
            problems.push("server.max_score_rows must be at least 1".to_owned());
        }
        if self.engine.queue_capacity == 0 {
            problems.push("engine.queue_capacity must be at least 1".to_owned());
        }
        if self.engine.queue_budget_ms == 0 {
            problems.push("engine.queue_budget_ms must be at least 1".to_owned());
        }
        if self.engine.shards > 1024 {
            problems.push("engine.shards must be at most 1024".to_owned());
        }
        if self.store.dir.as_os_str().is_empty() {
            problems.push("store.dir must not be empty".to_owned());
        }
        if self.store.sync == SyncPolicy::Interval && self.store.sync_interval_ms == 0 {
            problems.push("store.sync_interval_ms must be at least 1".to_owned());
        }
        if self.store.dedup_horizon_hours == 0 {
            problems.push("store.dedup_horizon_hours must be at least 1".to_owned());
        }
        if !(1..=3650).contains(&self.store.retention_days) {
            problems.push("store.retention_days must be between 1 and 3650".to_owned());
        }
        if let Some(path) = &self.identity.pseudonymize_key_file {
            match std::fs::metadata(path) {
                Ok(m) if m.len() >= 16 => {}
                Ok(_) => problems.push(format!(
                    "identity.pseudonymize_key_file {} must hold at least 16 bytes",
                    path.display()
                )),
                Err(e) => problems.push(format!(
                    "identity.pseudonymize_key_file {}: {e}",
                    path.display()
                )),
            }
        }
        if self.models.dir.as_os_str().is_empty() {
            problems.push("models.dir must not be empty".to_owned());
        }
        if self.models.max_file_bytes == 0 {
            problems.push("models.max_file_bytes must be at least 1".to_owned());
        }
        let t = &self.triggers;
        if !(10..=60_000).contains(&t.tick_ms) {
            problems.push("triggers.tick_ms must be between 10 and 60000".to_owned());
        }
        if t.outbox_retention_hours == 0 {
            problems.push("triggers.outbox_retention_hours must be at least 1".to_owned());
        }
        if t.audit_retention_days == 0 {
            problems.push("triggers.audit_retention_days must be at least 1".to_owned());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, w) in t.webhooks.iter().enumerate() {
            let at = format!("triggers.webhooks[{i}] ({:?})", w.name);
            if w.name.is_empty() || !names.insert(w.name.clone()) {
                problems.push(format!("{at}: name must be set and unique"));
            }
            problems.extend(w.problems(&at));
        }
        problems.extend(self.kafka.problems(s.max_batch_events));
        if self.kafka.sink_on() && names.contains(&self.kafka.sink.name) {
            problems.push(format!(
                "kafka.sink.name {:?} is also a webhook endpoint's name; each delivery endpoint needs its own",
                self.kafka.sink.name
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problems.push(format!("log.level {:?}: {e}", self.log.level));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// What TLS and credentials settings leave open, or cannot read.
    fn security_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let s = &self.server;
        let tls = &s.tls;
        match (&tls.cert_file, &tls.key_file) {
            (Some(_), None) => {
                problems.push("server.tls.cert_file needs server.tls.key_file".into())
            }
            (None, Some(_)) => {
                problems.push("server.tls.key_file needs server.tls.cert_file".into())
            }
            _ => {}
        }
        if tls.client_ca_file.is_some() && !tls.enabled() {
            problems
                .push("server.tls.client_ca_file needs server.tls.cert_file and key_file".into());
        }
        if tls.enabled() {
            if let Err(e) = crate::security::tls::server_config(tls, &[]) {
                problems.push(format!("server.tls: {e}"));
            }
        } else {
            let mut listeners = vec![("grpc_addr", s.grpc_addr), ("metrics_addr", s.metrics_addr)];
            if s.http_write_keys_file.is_some() {
                listeners.push(("http_addr", s.http_addr));
            }
            for (name, addr) in listeners {
                if !s.plaintext.allows(addr) {
                    problems.push(format!(
                        "server.{name} {addr} would serve plaintext, which server.plaintext = {} \
                         does not allow: give server.tls.cert_file and server.tls.key_file, bind a \
                         loopback address, or set server.plaintext = \"anywhere\" on purpose",
                        s.plaintext
                    ));
                }
            }
        }
        let auth = &self.auth;
        match &auth.keys_file {
            Some(path) => {
                if let Err(e) = crate::security::keys::Keys::load(path) {
                    problems.push(format!("auth.keys_file: {e}"));
                }
            }
            None => {
                if !auth.anonymous.allows(s.grpc_addr) {
                    problems.push(format!(
                        "server.grpc_addr {} would take calls without an API key, which \
                         auth.anonymous = {} does not allow: give auth.keys_file (see `nudge keys \
                         add`), bind a loopback address, or set auth.anonymous = \"anywhere\" on purpose",
                        s.grpc_addr, auth.anonymous
                    ));
                }
                if auth.metrics_require_key {
                    problems.push("auth.metrics_require_key needs auth.keys_file".into());
                }
            }
        }
        problems
    }

    /// The shard count to run with.
    pub fn shards(&self) -> usize {
        match self.engine.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// The shards' cache budget in bytes: `engine.cache_mb`, or a quarter of the memory
    /// this process may use.
    pub fn cache_bytes(&self) -> usize {
        match self.engine.cache_mb {
            0 => usable_memory().map_or(1 << 30, |bytes| bytes / 4),
            mb => usize::try_from(mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
        }
    }

    /// The ONNX Runtime library to load, by the precedence documented on the field.
    pub fn onnxruntime_library(&self) -> PathBuf {
        if !self.models.onnxruntime_library.is_empty() {
            return PathBuf::from(&self.models.onnxruntime_library);
        }
        std::env::var_os("ORT_DYLIB_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"))
    }
}

/// Sets `SECTION__KEY` in `table` to `value`, read as a TOML value when it is one (numbers,
/// booleans, arrays) and as a string otherwise.
fn apply_override(table: &mut toml::Table, path: &str, value: &str) -> Result<(), String> {
    let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    if keys.iter().any(String::is_empty) {
        return Err("empty key segment".to_owned());
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let (last, parents) = keys.split_last().expect("split yields at least one key");
    let mut node = table;
    for key in parents {
        node = node
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("{key} is not a section"))?;
    }
    node.insert(last.clone(), parsed);
    Ok(())
}

/// The memory this process may use: its cgroup's limit (v2, then v1) when it has one, else
/// the machine's memory.
fn usable_memory() -> Option<usize> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let limit = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .into_iter()
    .filter_map(read)
    // "max" (v2) or a huge number (v1) means no limit.
    .filter_map(|s| s.trim().parse::<u64>().ok())
    .find(|&bytes| bytes < 1 << 60);
    let machine = read("/proc/meminfo").and_then(|info| {
        info.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let bytes = match (limit, machine) {
        (Some(l), Some(m)) => l.min(m),
        (l, m) => l.or(m)?,
    };
    usize::try_from(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_config_loads_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/nudge.toml");
        let config = Config::load(Some(&path), []).expect("the shipped config is valid");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = Config::load(
            None,
            env(&[
                ("NUDGE__SERVER__GRPC_ADDR", "127.0.0.1:7000"),
                ("NUDGE__ENGINE__SHARDS", "3"),
                ("NUDGE__LOG__FORMAT", "json"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server.grpc_addr, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.engine.shards, 3);
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = Config::load(
            None,
            env(&[
                ("NUDGE__SERVER__MAX_BATCH_EVENTS", "0"),
                ("NUDGE__ENGINE__QUEUE_CAPACITY", "0"),
                ("NUDGE__SERVER__MAX_SCORE_ROWS", "0"),
            ]),
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
        let keys = Config::load(
            None,
            env(&[
                ("NUDGE__SERVER__HTTP_ADDR", "127.0.0.1:9464"),
                ("NUDGE__SERVER__METRICS_ADDR", "127.0.0.1:9464"),
                ("NUDGE__SERVER__HTTP_WRITE_KEYS_FILE", "/nonexistent/keys"),
            ]),
        )
        .unwrap_err();
        assert_eq!(keys.problems.len(), 2, "{keys}");
        assert!(
            keys.to_string()
                .contains("server.http_addr and server.metrics_addr"),
            "{keys}"
        );
        assert!(
            keys.to_string()
                .contains("server.http_write_keys_file /nonexistent/keys"),
            "{keys}"
        );
        let unknown = Config::load(None, env(&[("NUDGE__SERVER__GRPC_PORT", "1")])).unwrap_err();
        assert!(unknown.to_string().contains("grpc_port"), "{unknown}");
    }

    #[test]
    fn the_network_gets_plaintext_and_keyless_calls_only_when_the_config_says_so() {
        let open = |pairs: &[(&str, &str)]| Config::load(None, env(pairs));
        let err = open(&[("NUDGE__SERVER__GRPC_ADDR", "0.0.0.0:50051")]).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 2, "{text}");
        assert!(
            text.contains("server.grpc_addr 0.0.0.0:50051 would serve plaintext"),
            "{text}"
        );
        assert!(
            text.contains("would take calls without an API key"),
            "{text}"
        );
        let ipv6 = open(&[("NUDGE__SERVER__METRICS_ADDR", "[::]:9464")]).unwrap_err();
        assert!(
            ipv6.to_string().contains("server.metrics_addr [::]:9464"),
            "{ipv6}"
        );
        // Said on purpose, both are allowed.
        open(&[
            ("NUDGE__SERVER__GRPC_ADDR", "0.0.0.0:50051"),
            ("NUDGE__SERVER__PLAINTEXT", "anywhere"),
            ("NUDGE__AUTH__ANONYMOUS", "anywhere"),
        ])
        .unwrap();
        // "never" refuses plaintext even on loopback.
        let never = open(&[("NUDGE__SERVER__PLAINTEXT", "never")]).unwrap_err();
        assert_eq!(never.problems.len(), 2, "{never}");
    }

    #[test]
    fn tls_and_keys_settings_are_checked_when_the_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.pem");
        let missing = missing.to_str().unwrap();
        let err = Config::load(
            None,
            env(&[
                ("NUDGE__SERVER__TLS__CERT_FILE", missing),
                ("NUDGE__AUTH__KEYS_FILE", missing),
            ]),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("server.tls.cert_file needs server.tls.key_file"),
            "{text}"
        );
        assert!(
            text.contains("auth.keys_file: reading the keys file"),
            "{text}"
        );
        let err = Config::load(
            None,
            env(&[
                ("NUDGE__SERVER__TLS__CERT_FILE", missing),
                ("NUDGE__SERVER__TLS__KEY_FILE", missing),
            ]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("server.tls: ") && err.to_string().contains("absent.pem"),
            "{err}"
        );
        let err =
            Config::load(None, env(&[("NUDGE__AUTH__METRICS_REQUIRE_KEY", "true")])).unwrap_err();
        assert!(
            err.to_string()
                .contains("auth.metrics_require_key needs auth.keys_file"),
            "{err}"
        );
    }
}
