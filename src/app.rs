//! Builds every part from the config, serves gRPC and metrics, and drains on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tonic_health::ServingStatus;

use crate::api::auth::{Auth, AuthLayer};
use crate::api::inference::InferenceApi;
use crate::api::segment::WriteKeys;
use crate::api::{self, layer::MetricsLayer, shed::ShedLayer, Limits, NudgeApi};
use crate::config::Config;
use crate::delivery::outbox::Outbox;
use crate::delivery::webhook::{self, Endpoint};
use crate::engine::{Engine, EngineError, EngineOptions};
use crate::identity::{Identities, Pseudonymizer};
use crate::metrics::Metrics;
use crate::model::reload::{self, record_models, Reloader};
use crate::model::{LoadOptions, ModelRegistry};
use crate::pb;
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::pb::nudge_service_server::NudgeServiceServer;
use crate::readiness::{Readiness, Reason as ReadinessReason};
use crate::security::keys::{Keys, Scope};
use crate::security::tls::{self, Incoming, Tls};
use crate::store::{Store, SyncMode};
use crate::time::{Clock, DAY_MS, HOUR_MS};
use crate::trigger::Live;

/// A server with its listeners bound and its models loaded, ready to run.
pub struct Server {
    config: Config,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    models: Arc<ModelRegistry>,
    store: Arc<Store>,
    identities: Arc<Identities>,
    pseudonymizer: Pseudonymizer,
    rules: Arc<Live>,
    outbox: Arc<Outbox>,
    grpc: TcpListener,
    metrics_listener: TcpListener,
    /// The HTTP API's listener and write keys, when `server.http_write_keys_file` is set.
    http: Option<(TcpListener, WriteKeys)>,
    /// TLS for the gRPC listener and for the HTTP/1.1 ones, when `server.tls` is set.
    tls: Option<(Arc<Tls>, Arc<Tls>)>,
    /// The API keys, when `auth.keys_file` is set.
    keys: Option<Arc<Keys>>,
    /// Tick requests from a [`Ticker`], when time is driven from outside.
    manual_ticks: Option<mpsc::Receiver<TickRequest>>,
}

type TickRequest = oneshot::Sender<Result<(), EngineError>>;

/// Fires the engine's due timers on request, in place of the background ticker: see
/// [`Server::manual_ticks`].
#[derive(Clone)]
pub struct Ticker {
    requests: mpsc::Sender<TickRequest>,
}

impl Ticker {
    /// Fires every timer due at the clock's `now` and returns once what fired is committed
    /// (and so readable from the outbox).
    pub async fn tick(&self) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(reply)
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        answer.await.map_err(|_| EngineError::ShuttingDown)?
    }
}

impl Server {
    /// Recovers the store, loads the models and binds both listeners. A model that fails
    /// its checks is logged and counted; the others serve.
    pub async fn bind(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Server> {
        let metrics = Arc::new(Metrics::new());
        let started = std::time::Instant::now();
        let (store, aliases) = {
            let dir = config.store.dir.clone();
            let sync = SyncMode::from(&config.store);
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let store = Store::open(&dir, sync)
                    .with_context(|| format!("opening the store in {}", dir.display()))?;
                let aliases = store.aliases()?;
                Ok((store, aliases))
            })
            .await??
        };
        tracing::info!(
            dir = %config.store.dir.display(),
            aliases = aliases.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store recovered"
        );
        let identities = Arc::new(Identities::new(aliases));
        let pseudonymizer = match &config.identity.pseudonymize_key_file {
            Some(path) => Pseudonymizer::new(Some(
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            )),
            None => Pseudonymizer::default(),
        };
        let options = LoadOptions::from(&config);
        let (models, failures) = {
            let dir = config.models.dir.clone();
            let now = clock.now();
            tokio::task::spawn_blocking(move || ModelRegistry::open(&dir, options, now))
                .await?
                .with_context(|| format!("loading models from {}", config.models.dir.display()))?
        };
        let set = models.current();
        for failure in &failures {
            tracing::error!(
                manifest = %failure.manifest.display(),
                reason = failure.error.reason(),
                error = %failure.error,
                "model refused"
            );
        }
        for model in set.iter() {
            let m = &model.manifest;
            tracing::info!(name = %m.name, version = %m.version, format = m.format.as_str(), features = m.features.len(), engine = %model.engine(), "model loaded");
            if let Some(note) = model.engine_note() {
                tracing::warn!(name = %m.name, reason = note, "the native scorer does not serve this model; LightGBM does");
            }
        }
        if set.is_empty() {
            tracing::warn!(dir = %config.models.dir.display(), "no model loaded; Score answers UNAVAILABLE");
        }
        record_models(&metrics, &set, &failures);
        api::preset_metrics(&metrics);
        let store = Arc::new(store);
        let rules = Arc::new(Live::open(config.triggers.rules.clone()).with_context(|| {
            format!(
                "loading the trigger rules from {}",
                config.triggers.rules.display()
            )
        })?);
        {
            let rules = rules.current();
            metrics.rules_loaded.set(rules.rules.len() as i64);
            tracing::info!(version = %rules.version, rules = rules.rules.len(), file = %config.triggers.rules.display(), "rules loaded");
        }
        let outbox = Arc::new(Outbox::open(store.clone()).context("opening the outbox")?);

        let grpc = TcpListener::bind(config.server.grpc_addr)
            .await
            .with_context(|| format!("binding gRPC to {}", config.server.grpc_addr))?;
        let metrics_listener = TcpListener::bind(config.server.metrics_addr)
            .await
            .with_context(|| format!("binding metrics to {}", config.server.metrics_addr))?;
        let http = match &config.server.http_write_keys_file {
            Some(path) => {
                let keys = WriteKeys::load(path).map_err(|problem| {
                    anyhow::anyhow!("server.http_write_keys_file {}: {problem}", path.display())
                })?;
                let listener = TcpListener::bind(config.server.http_addr)
                    .await
                    .with_context(|| format!("binding HTTP to {}", config.server.http_addr))?;
                Some((listener, keys))
            }
            None => {
                tracing::info!("the HTTP API is off: server.http_write_keys_file is not set");
                None
            }
        };
        let tls = match config.server.tls.enabled() {
            true => {
                let grpc = Tls::new(&config.server.tls, tls::ALPN_GRPC)
                    .map_err(|e| anyhow::anyhow!("server.tls: {e}"))?;
                let http = Tls::new(&config.server.tls, tls::ALPN_HTTP1)
                    .map_err(|e| anyhow::anyhow!("server.tls: {e}"))?;
                Some((Arc::new(grpc), Arc::new(http)))
            }
            false => None,
        };
        let keys = match &config.auth.keys_file {
            Some(path) => {
                let keys = Keys::load(path).map_err(|e| anyhow::anyhow!("auth.keys_file: {e}"))?;
                tracing::info!(keys = keys.current().len(), file = %path.display(), "API keys loaded");
                Some(Arc::new(keys))
            }
            None => None,
        };
        Ok(Server {
            config,
            tls,
            keys,
            clock,
            metrics,
            models: Arc::new(models),
            store,
            identities,
            pseudonymizer,
            rules,
            outbox,
            grpc,
            metrics_listener,
            http,
            manual_ticks: None,
        })
    }

    /// Turns the background ticker off: timers fire only when the returned [`Ticker`]
    /// asks, at the clock's `now`. For tests and tools that drive time themselves, so that
    /// "nothing fired" is a statement about a tick that happened, not about a wait.
    pub fn manual_ticks(&mut self) -> Ticker {
        let (requests, received) = mpsc::channel(1);
        self.manual_ticks = Some(received);
        Ticker { requests }
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The HTTP API's address, when it is on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(listener, _)| {
            listener
                .local_addr()
                .expect("a bound listener has an address")
        })
    }

    /// Serves until `shutdown` resolves, then reports NOT_SERVING, stops accepting, lets
    /// in-flight calls finish within the grace period, and stops the engine.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Server {
            config,
            clock,
            metrics,
            models,
            store,
            identities,
            pseudonymizer,
            rules,
            outbox,
            grpc,
            metrics_listener,
            http,
            tls,
            keys,
            manual_ticks,
        } = self;
        let dedup_horizon_ms = config.store.dedup_horizon_hours as i64 * HOUR_MS;
        // Live as soon as it listens; ready to score once a model is loaded, while the
        // store takes writes and every shard runs.
        let readiness = Arc::new(Readiness::new(metrics.clone()));
        if models.current().is_empty() {
            readiness.set(ReadinessReason::NoModels, "no model is loaded");
        }
        let engine = Arc::new(Engine::start(
            &EngineOptions {
                shards: config.shards(),
                queue_capacity: config.engine.queue_capacity,
                dedup_horizon_ms,
                queue_budget: Duration::from_millis(config.engine.queue_budget_ms),
                cache_bytes: config.cache_bytes(),
            },
            store.clone(),
            identities,
            models.clone(),
            rules.clone(),
            outbox.clone(),
            metrics.clone(),
            readiness.clone(),
        )?);
        // Shutdown fans out: the gRPC server, trigger streams, the metrics server, the
        // background tasks and the grace timer.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (health, health_service) = tonic_health::server::health_reporter();
        let reloader = Arc::new(Reloader::new(
            models.clone(),
            metrics.clone(),
            clock.clone(),
            {
                let readiness = readiness.clone();
                move |ready| {
                    if ready {
                        readiness.clear(ReadinessReason::NoModels);
                    } else {
                        readiness.set(ReadinessReason::NoModels, "no model is loaded");
                    }
                }
            },
        ));
        let api = NudgeApi {
            engine: engine.clone(),
            models,
            clock: clock.clone(),
            metrics: metrics.clone(),
            limits: Limits {
                max_batch_events: config.server.max_batch_events,
                max_score_rows: config.server.max_score_rows,
                max_message_bytes: config.server.max_message_bytes,
                retention_ms: config.store.retention_days as i64 * DAY_MS,
            },
            pseudonymizer,
            reloader: reloader.clone(),
            outbox: outbox.clone(),
            endpoints: delivery_endpoints(&config).into(),
            stopping: stop_rx.clone(),
        };
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building the reflection service")?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("building the reflection service")?;
        let max = config.server.max_message_bytes;
        let nudge = NudgeServiceServer::new(api.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX);
        let inference = GrpcInferenceServiceServer::new(InferenceApi {
            models: api.models.clone(),
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            max_rows: config.server.max_score_rows,
        })
        .max_decoding_message_size(max)
        .max_encoding_message_size(usize::MAX);
        health.set_service_status("", ServingStatus::Serving).await;
        let health_task = tokio::spawn(follow_readiness(health.clone(), readiness.watch()));

        let grace = Duration::from_secs(config.server.shutdown_grace_seconds);
        let grpc_addr = grpc.local_addr()?;
        let metrics_addr = metrics_listener.local_addr()?;
        let http_addr = match &http {
            Some((listener, _)) => listener.local_addr()?.to_string(),
            None => "off".to_owned(),
        };
        tracing::info!(%grpc_addr, %metrics_addr, %http_addr, "serving");
        // Counting people is a scan of every profile: off the path to SERVING.
        {
            let store = store.clone();
            tokio::task::spawn_blocking(move || match store.people() {
                Ok(people) => tracing::info!(people, "people stored"),
                Err(e) => tracing::warn!(error = %e, "counting the people stored failed"),
            });
        }

        // Reloads: on file changes, SIGHUP and ReloadModels, one at a time.
        let (reload_tx, trigger_rx) = tokio::sync::mpsc::channel(1);
        let _watcher = match config.models.watch {
            true => match reload::watch(&config.models.dir, reload_tx.clone()) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the models directory; reload with SIGHUP or ReloadModels");
                    None
                }
            },
            false => None,
        };
        tokio::spawn(reloader.clone().run(trigger_rx));
        // The rules file is watched through its directory, so an editor's rename counts.
        let (rules_tx, rules_rx) = tokio::sync::mpsc::channel(1);
        let rules_dir = rules
            .path()
            .parent()
            .map(|d| {
                if d.as_os_str().is_empty() {
                    std::path::Path::new(".")
                } else {
                    d
                }
            })
            .filter(|_| !rules.path().as_os_str().is_empty());
        let rules_watcher = rules_dir.and_then(|dir| match reload::watch(dir, rules_tx.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the rules file; reload with SIGHUP or ReloadRules");
                None
            }
        });
        let rules_reloads = tokio::spawn(reload_rules(engine.clone(), rules_rx));
        // Credentials (the keys file, TLS certificates) reload through their directories
        // too, so an atomic rename by a secrets agent counts.
        let (credentials_tx, credentials_rx) = tokio::sync::mpsc::channel(1);
        let mut credential_files: Vec<std::path::PathBuf> = Vec::new();
        if let Some((grpc_tls, _)) = &tls {
            credential_files.extend(grpc_tls.files().map(|p| p.to_path_buf()));
        }
        credential_files.extend(config.auth.keys_file.clone());
        let credential_watchers = watch_parents(&credential_files, &credentials_tx);
        let credential_reloads = tokio::spawn(reload_credentials(
            credentials_rx,
            tls.clone(),
            keys.clone().zip(config.auth.keys_file.clone()),
            metrics.clone(),
        ));
        let hangups = tokio::spawn(reload_on_hangup(
            vec![reload_tx, rules_tx, credentials_tx],
            wait_for_stop(stop_rx.clone()),
        ));
        let maintenance = tokio::spawn(maintain(
            store.clone(),
            clock.clone(),
            Horizons {
                dedup_ms: dedup_horizon_ms,
                audit_ms: config.triggers.audit_retention_days as i64 * DAY_MS,
            },
            wait_for_stop(stop_rx.clone()),
        ));
        let recovery = tokio::spawn(recover_store(
            store.clone(),
            engine.clone(),
            readiness.clone(),
            metrics.clone(),
            stop_rx.clone(),
        ));
        let ticker = tokio::spawn(tick(
            engine.clone(),
            clock.clone(),
            match manual_ticks {
                Some(requests) => Ticks::Manual(requests),
                None => Ticks::Every(Duration::from_millis(config.triggers.tick_ms)),
            },
            wait_for_stop(stop_rx.clone()),
        ));
        let endpoints = delivery_endpoints(&config);
        let outbox_upkeep = tokio::spawn(trim_outbox(
            outbox.clone(),
            clock.clone(),
            config.triggers.outbox_retention_hours as i64 * HOUR_MS,
            endpoints,
            wait_for_stop(stop_rx.clone()),
        ));
        let mut webhooks = Vec::new();
        for w in &config.triggers.webhooks {
            // Checked by Config::validate.
            let endpoint =
                Endpoint::try_from(w).map_err(|e| anyhow::anyhow!("webhook {}: {e}", w.name))?;
            tracing::info!(endpoint = %endpoint.name, url = %endpoint.url, "delivering webhooks");
            webhooks.push(tokio::spawn(webhook::run(
                endpoint,
                outbox.clone(),
                store.clone(),
                metrics.clone(),
                wait_for_stop(stop_rx.clone()),
            )));
        }
        if config.kafka.sink_on() {
            let sink = crate::delivery::kafka::run(
                config.kafka.clone(),
                outbox.clone(),
                store.clone(),
                metrics.clone(),
                wait_for_stop(stop_rx.clone()),
            );
            webhooks.push(tokio::spawn(async move {
                if let Err(e) = sink.await {
                    tracing::error!(error = %e, "the Kafka sink cannot start; triggers are not published to Kafka");
                }
            }));
        }
        let kafka_source = config.kafka.source_on().then(|| {
            tokio::spawn(api::kafka::run(
                api.clone(),
                config.kafka.clone(),
                wait_for_stop(stop_rx.clone()),
            ))
        });
        let handshake_failures = |listener: &'static str| -> tls::OnHandshakeFailure {
            let metrics = metrics.clone();
            Arc::new(move |reason: &str| {
                metrics
                    .tls_handshake_failures
                    .with_label_values(&[listener, reason])
                    .inc();
            })
        };
        let http_tls = tls.as_ref().map(|(_, http)| http.clone());
        let metrics_gate = match (&keys, config.auth.metrics_require_key) {
            (Some(keys), true) => Some(metrics_gate(keys.clone(), metrics.clone())),
            _ => None,
        };
        let metrics_task = tokio::spawn(crate::metrics::serve(
            Incoming::new(
                metrics_listener,
                http_tls.clone(),
                None,
                handshake_failures("metrics"),
            )?,
            metrics.clone(),
            metrics_gate,
            wait_for_stop(stop_rx.clone()),
        ));
        let http_task = match http {
            Some((listener, write_keys)) => Some(tokio::spawn(api::segment::serve(
                Incoming::new(listener, http_tls, None, handshake_failures("http"))?,
                api.clone(),
                write_keys,
                wait_for_stop(stop_rx.clone()),
            ))),
            None => None,
        };
        let auth = keys.clone().map(|keys| {
            Arc::new(Auth::new(
                keys,
                config.auth.open_health,
                config.auth.open_reflection,
                metrics.clone(),
            ))
        });
        let grpc_incoming = Incoming::new(
            grpc,
            tls.as_ref().map(|(grpc, _)| grpc.clone()),
            Some(Duration::from_secs(60)),
            handshake_failures("grpc"),
        )?;
        let grpc_stop = wait_for_stop(stop_rx.clone());
        let grpc_task = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(MetricsLayer::new(metrics.clone(), max))
                .layer(AuthLayer::new(auth))
                .layer(ShedLayer::new(engine.clone()))
                .add_service(health_service)
                .add_service(reflection)
                .add_service(reflection_alpha)
                .add_service(nudge)
                .add_service(inference)
                .serve_with_incoming_shutdown(grpc_incoming.into_stream(), grpc_stop),
        );

        shutdown.await;
        tracing::info!("shutting down: NOT_SERVING, draining in-flight calls");
        readiness.set(ReadinessReason::ShuttingDown, "the server is draining");
        health_task.abort();
        set_health(&health, ServingStatus::NotServing).await;
        let _ = stop_tx.send(true);
        let mut grpc_task = grpc_task;
        match tokio::time::timeout(grace, &mut grpc_task).await {
            Ok(joined) => joined.context("gRPC server task")?.context("gRPC server")?,
            Err(_) => {
                tracing::warn!(
                    ?grace,
                    "in-flight calls did not finish within the grace period; cancelling them"
                );
                grpc_task.abort();
            }
        }
        // HTTP requests in flight finish before the engine stops: their 200 means durable.
        if let Some(mut http_task) = http_task {
            match tokio::time::timeout(grace, &mut http_task).await {
                Ok(joined) => joined.context("HTTP server task")?.context("HTTP server")?,
                Err(_) => {
                    tracing::warn!(
                        ?grace,
                        "HTTP requests did not finish within the grace period; cancelling them"
                    );
                    http_task.abort();
                }
            }
        }
        // The batch in hand finishes before the engine stops, and its offsets commit.
        if let Some(mut source) = kafka_source {
            match tokio::time::timeout(grace, &mut source).await {
                Ok(joined) => {
                    if let Err(e) = joined.context("Kafka source task")? {
                        tracing::error!(error = %e, "the Kafka source failed");
                    }
                }
                Err(_) => {
                    tracing::warn!(
                        ?grace,
                        "the Kafka source did not stop within the grace period"
                    );
                    source.abort();
                }
            }
        }
        if let Ok(joined) = tokio::time::timeout(grace, metrics_task).await {
            joined
                .context("metrics server task")?
                .context("metrics server")?;
        }
        // Nothing new reaches the shards from the ticker or a rules reload once they
        // stop; the drain then finishes what is queued. Handles still held elsewhere (a
        // call cancelled at the grace deadline) only get `ShuttingDown` from now on.
        let _ = ticker.await;
        drop(rules_watcher);
        let _ = rules_reloads.await;
        drop(credential_watchers);
        let _ = credential_reloads.await;
        engine.shutdown().await;
        let _ = maintenance.await;
        let _ = recovery.await;
        let _ = hangups.await;
        let _ = outbox_upkeep.await;
        for w in webhooks {
            let _ = w.await;
        }
        // Written out to tables, not only synced: the next start then has nothing of the
        // journal to insert again (see `Store::flush`).
        tokio::task::spawn_blocking(move || store.flush())
            .await?
            .context("writing the store out at shutdown")?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The delivery endpoints' names: the webhooks', and the Kafka sink's when it runs.
/// Their cursors hold the outbox back from trimming; their dead letters can be listed.
fn delivery_endpoints(config: &Config) -> Vec<String> {
    let mut names: Vec<String> = config
        .triggers
        .webhooks
        .iter()
        .map(|w| w.name.clone())
        .collect();
    if config.kafka.sink_on() {
        names.push(config.kafka.sink.name.clone());
    }
    names
}

/// The health-check name of the Nudge service.
const SERVICE_NAME: &str = "nudge.v1.NudgeService";

async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
}

/// Keeps the readiness service's health status (`nudge.v1.NudgeService`) what readiness
/// says, as it changes.
async fn follow_readiness(
    health: tonic_health::server::HealthReporter,
    mut ready: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let status = if *ready.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status(SERVICE_NAME, status).await;
        if ready.changed().await.is_err() {
            return;
        }
    }
}

/// How long a failed reopen of the store waits before the next.
const REOPEN_RETRY: Duration = Duration::from_secs(1);

/// Recovers from store write faults until `stop`: when a write fails, readiness turns off
/// at once (with the fault as its detail); the store is reopened every [`REOPEN_RETRY`]
/// until that succeeds, the shards rebuild their memory from it, and readiness turns on.
async fn recover_store(
    store: Arc<Store>,
    engine: Arc<Engine>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut faults = store.faults();
    let stopped = wait_for_stop(stop);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            fault = faults.wait_for(|faulted| *faulted) => if fault.is_err() { return },
        }
        let detail = store
            .fault()
            .unwrap_or_else(|| "a store write failed".into());
        readiness.set(
            ReadinessReason::Store,
            format!("{detail}; reopening the store"),
        );
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(REOPEN_RETRY) => {}
            }
            let reopening = store.clone();
            let reopened = tokio::task::spawn_blocking(move || reopening.reopen()).await;
            match reopened {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    metrics.store_reopens.with_label_values(&["failed"]).inc();
                    tracing::warn!(error = %e, "the store does not reopen yet; retrying");
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "reopening the store panicked");
                    continue;
                }
            }
            match engine.resync().await {
                Ok(()) => {
                    store.resume();
                    metrics.store_reopens.with_label_values(&["ok"]).inc();
                    readiness.clear(ReadinessReason::Store);
                    tracing::info!("recovered from the store fault");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "rebuilding memory from the store failed; retrying")
                }
            }
        }
    }
}

/// How long records are kept.
struct Horizons {
    dedup_ms: i64,
    audit_ms: i64,
}

/// Background upkeep until `stop`: fsyncs the store every interval in `interval` sync
/// mode, and drops idempotency records and trigger decisions past their horizons every
/// hour.
async fn maintain(
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    horizons: Horizons,
    stop: impl Future<Output = ()>,
) {
    let sync_every = match store.sync_mode() {
        SyncMode::Interval(every) => every,
        // Nothing to sync; the timer only paces the hourly expiry.
        SyncMode::Always => Duration::from_secs(60),
    };
    let mut sync = tokio::time::interval(sync_every);
    let mut expire = tokio::time::interval(Duration::from_secs(3600));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = sync.tick() => {
                if let SyncMode::Interval(_) = store.sync_mode() {
                    let store = store.clone();
                    match tokio::task::spawn_blocking(move || store.sync_now()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "periodic store sync failed"),
                        Err(e) => tracing::error!(error = %e, "periodic store sync panicked"),
                    }
                }
            }
            _ = expire.tick() => {
                let store = store.clone();
                let now = clock.now();
                let (seen, audit) = (now.plus_ms(-horizons.dedup_ms), now.plus_ms(-horizons.audit_ms));
                let expired = tokio::task::spawn_blocking(move || {
                    Ok::<_, crate::store::StoreError>((store.expire_seen(seen)?, store.expire_audit(audit)?))
                })
                .await;
                match expired {
                    Ok(Ok((seen, audit))) => tracing::debug!(seen, audit, "idempotency records and trigger decisions expired"),
                    Ok(Err(e)) => tracing::error!(error = %e, "expiring old records failed"),
                    Err(e) => tracing::error!(error = %e, "expiring old records panicked"),
                }
            }
        }
    }
}

/// When the engine's timers are fired.
enum Ticks {
    /// On a fixed period.
    Every(Duration),
    /// When a [`Ticker`] asks.
    Manual(mpsc::Receiver<TickRequest>),
}

/// Asks the engine to fire due timers, as `ticks` says, until `stop`.
async fn tick(
    engine: Arc<Engine>,
    clock: Arc<dyn Clock>,
    ticks: Ticks,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    match ticks {
        Ticks::Every(every) => {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = interval.tick() => engine.tick(clock.now()),
                }
            }
        }
        Ticks::Manual(mut requests) => loop {
            tokio::select! {
                _ = &mut stop => return,
                Some(reply) = requests.recv() => {
                    let _ = reply.send(engine.tick_and_wait(clock.now()).await);
                }
            }
        },
    }
}

/// Trims the outbox every hour until `stop`.
async fn trim_outbox(
    outbox: Arc<Outbox>,
    clock: Arc<dyn Clock>,
    retention_ms: i64,
    endpoints: Vec<String>,
    stop: impl Future<Output = ()>,
) {
    let mut hourly = tokio::time::interval(Duration::from_secs(3600));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = hourly.tick() => {
                let (outbox, endpoints, now) = (outbox.clone(), endpoints.clone(), clock.now());
                match tokio::task::spawn_blocking(move || outbox.trim(now, retention_ms, &endpoints)).await {
                    Ok(Ok(n)) => tracing::debug!(trimmed = n, "outbox trimmed"),
                    Ok(Err(e)) => tracing::error!(error = %e, "trimming the outbox failed"),
                    Err(e) => tracing::error!(error = %e, "trimming the outbox panicked"),
                }
            }
        }
    }
}

/// Reloads the rules on each trigger, letting bursts settle, until the channel closes.
async fn reload_rules(engine: Arc<Engine>, mut changes: mpsc::Receiver<&'static str>) {
    while let Some(cause) = changes.recv().await {
        reload::settle(&mut changes).await;
        let engine = engine.clone();
        // Errors are logged and counted inside.
        let _ = tokio::task::spawn_blocking(move || engine.reload_rules(cause)).await;
    }
}

/// Watches the directories of `files` (each once), sending on `changes` when anything in
/// them changes.
fn watch_parents(
    files: &[std::path::PathBuf],
    changes: &mpsc::Sender<&'static str>,
) -> Vec<notify::RecommendedWatcher> {
    let mut dirs: Vec<std::path::PathBuf> = files
        .iter()
        .map(|f| match f.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs.into_iter()
        .filter_map(|dir| match reload::watch(&dir, changes.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch credential files; reload them with SIGHUP");
                None
            }
        })
        .collect()
}

/// Reloads the TLS files and the keys file on each change until `changes` closes. A file
/// with a problem is refused (logged and counted); what was in force stays.
async fn reload_credentials(
    mut changes: mpsc::Receiver<&'static str>,
    tls: Option<(Arc<Tls>, Arc<Tls>)>,
    keys: Option<(Arc<Keys>, std::path::PathBuf)>,
    metrics: Arc<Metrics>,
) {
    while let Some(cause) = changes.recv().await {
        reload::settle(&mut changes).await;
        let count = |file: &str, outcome: &str| {
            metrics
                .credential_reloads
                .with_label_values(&[file, outcome])
                .inc();
        };
        if let Some((grpc, http)) = &tls {
            match grpc.reload().and_then(|()| http.reload()) {
                Ok(()) => {
                    tracing::info!(cause, "TLS certificates reloaded");
                    count("tls", "ok");
                }
                Err(e) => {
                    tracing::warn!(cause, error = %e, "TLS files refused; the certificates in force stay");
                    count("tls", "refused");
                }
            }
        }
        if let Some((keys, path)) = &keys {
            match keys.reload(path) {
                Ok(n) => {
                    tracing::info!(cause, keys = n, "API keys reloaded");
                    count("keys", "ok");
                }
                Err(e) => {
                    tracing::warn!(cause, error = %e, "keys file refused; the keys in force stay");
                    count("keys", "refused");
                }
            }
        }
    }
}

/// The metrics endpoint's check: a known key with the `metrics` scope.
fn metrics_gate(keys: Arc<Keys>, metrics: Arc<Metrics>) -> crate::metrics::Gate {
    Arc::new(move |authorization: Option<&[u8]>| {
        let (key, reason) = match keys.current().check(authorization) {
            Ok(caller) if caller.may(Scope::Metrics) => return true,
            Ok(caller) => (caller.name.clone(), "scope"),
            Err(refusal) => (String::new(), refusal.as_str()),
        };
        metrics
            .auth_refused
            .with_label_values(&[key.as_str(), reason])
            .inc();
        false
    })
}

/// Sends a reload trigger to each of `targets` on every SIGHUP until `stop`.
async fn reload_on_hangup(
    targets: Vec<tokio::sync::mpsc::Sender<&'static str>>,
    stop: impl Future<Output = ()>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            return;
        }
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            Some(()) = hangups.recv() => {
                for target in &targets {
                    let _ = target.try_send("SIGHUP");
                }
            }
        }
    }
}

async fn wait_for_stop(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}
