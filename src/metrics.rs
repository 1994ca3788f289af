//! The Prometheus registry, every metric Nudge exports, and the `/metrics` endpoint.
//!
//! Names are `nudge_<thing>_<unit>`, counters end in `_total`. Labels are small closed sets
//! (RPC names, status codes, event types, reasons, model names from the models directory);
//! no label ever carries a person's identifier.
//!
//! This module is infrastructure: it imports no domain module. The parts that own a closed
//! label set (event reasons, model load reasons) create its zero series themselves.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 25 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Every metric, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// gRPC requests by RPC and status code.
    pub grpc_requests: IntCounterVec,
    /// gRPC request latency by RPC.
    pub grpc_duration: HistogramVec,
    /// Time to score one call's rows, by model.
    pub model_duration: HistogramVec,
    /// Model scoring calls that failed, by model.
    pub model_errors: IntCounterVec,
    /// Tracked events by source (grpc, http, kafka), type and outcome (accepted, duplicate,
    /// rejected).
    pub events: IntCounterVec,
    /// Calls accepted through the HTTP API that Nudge does not model, by source, call
    /// (track, identify, group) and event name (a bounded set: see `api::segment`).
    pub ignored: IntCounterVec,
    /// Requests to the Segment-compatible HTTP API by endpoint and status code.
    pub http_requests: IntCounterVec,
    /// Messages the Kafka source took care of, by outcome (tracked, duplicate, merged,
    /// ignored, dead_letter); a message's offset is committed only after it is counted.
    pub kafka_messages: IntCounterVec,
    /// Batches the Kafka source had to try again, by reason (overloaded, store,
    /// dead_letter_topic: the dead-letter topic did not take a message).
    pub kafka_retries: IntCounterVec,
    /// Triggers published by the Kafka sink, by result (delivered, retried, dead_letter).
    pub kafka_produced: IntCounterVec,
    /// Refused input by RPC and reason.
    pub invalid_input: IntCounterVec,
    /// 1 for each served model, labelled with its name, version and format.
    pub model_info: IntGaugeVec,
    /// Models refused at load, by reason.
    pub model_load_failures: IntCounterVec,
    /// People with a profile in memory.
    pub profiles: IntGauge,
    /// Lookups of a person's profile or trigger state in the shards' caches, by part and
    /// result (hit, miss: a store read).
    pub cache_lookups: IntCounterVec,
    /// People evicted from the shards' caches to stay within the budget.
    pub cache_evictions: IntCounter,
    /// Bytes the shards' caches count for the people they hold.
    pub cache_bytes: IntGauge,
    /// The shards' caches' budget in bytes (`engine.cache_mb`).
    pub cache_budget: IntGauge,
    /// Identity merges by outcome.
    pub merges: IntCounterVec,
    /// Erasures (DeleteUser).
    pub erasures: IntCounter,
    /// Time to commit one group of changes to the store (fsync included).
    pub store_commit_duration: Histogram,
    /// Store commits that failed.
    pub store_errors: IntCounter,
    /// Attempts to reopen the store after a write fault, by outcome (ok, failed).
    pub store_reopens: IntCounterVec,
    /// 1 while the server is ready (health SERVING for nudge.v1.NudgeService).
    pub ready: IntGauge,
    /// 1 for each reason the server is not ready now (no_models, store, shard,
    /// shutting_down); 0 once it clears.
    pub not_ready: IntGaugeVec,
    /// Panics caught while handling a request, by where (shard, rpc, rule_expression: a
    /// rule's CEL expression while it ran, which then counted as false).
    pub panics: IntCounterVec,
    /// Requests turned away before any work, by reason: overloaded (the queue's wait
    /// would exceed the budget), deadline (it could not finish in time), expired (its
    /// deadline passed while it waited), queue_full (the count bound).
    pub shed: IntCounterVec,
    /// How long requests waited in a shard's queue before their work started.
    pub queue_wait: Histogram,
    /// Model reloads by outcome: ok, refused (some file was refused), failed.
    pub model_reloads: IntCounterVec,
    /// Trigger decisions by rule and outcome: delivered, holdout, or a suppression reason.
    pub triggers: IntCounterVec,
    /// From receiving an event to its trigger being committed to the outbox.
    pub trigger_latency: Histogram,
    /// Absence timers pending, and timers that came due.
    pub timers_pending: IntGauge,
    pub timers_fired: IntCounter,
    /// Experiment exposures (delivered or held out) and conversions, by rule and variant.
    pub exposures: IntCounterVec,
    pub conversions: IntCounterVec,
    /// Rules-file reloads by outcome (ok, refused), and the rules running.
    pub rules_reloads: IntCounterVec,
    pub rules_loaded: IntGauge,
    /// Webhook delivery attempts by endpoint and result (delivered, retried, dead_letter).
    pub webhook_deliveries: IntCounterVec,
    /// Triggers an endpoint has not yet taken care of.
    pub outbox_depth: IntGaugeVec,
    /// Subscribers connected to SubscribeTriggers.
    pub subscribers: IntGauge,
    /// Calls refused for their credentials, by key name ("" when no known key was sent)
    /// and reason (missing, malformed, unknown, scope, rate_limited).
    pub auth_refused: IntCounterVec,
    /// Calls let through, by key name.
    pub auth_accepted: IntCounterVec,
    /// Reloads of the keys file and of the TLS files, by file (keys, tls) and outcome (ok,
    /// refused: the previous ones stay).
    pub credential_reloads: IntCounterVec,
    /// The probabilities models gave, by model: the score distribution a dashboard shows
    /// and a drifting model changes.
    pub score_probability: HistogramVec,
    /// How late timers fired: the tick's `now` minus each timer's due time.
    pub timer_lateness: Histogram,
    /// TLS handshakes that failed, by listener (grpc, metrics, http) and reason (refused,
    /// timeout).
    pub tls_handshake_failures: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let metrics = Metrics {
            grpc_requests: counter(
                "nudge_grpc_requests_total",
                "gRPC requests by RPC and status code.",
                &["rpc", "code"],
            ),
            grpc_duration: histogram(
                "nudge_grpc_request_duration_seconds",
                "gRPC call duration by RPC and status code, to the status (a stream's last message).",
                &["rpc", "code"],
            ),
            model_duration: histogram(
                "nudge_model_score_duration_seconds",
                "Time to score one call's rows, by model.",
                &["model"],
            ),
            model_errors: counter(
                "nudge_model_score_errors_total",
                "Model scoring calls that failed, by model.",
                &["model"],
            ),
            events: counter(
                "nudge_events_total",
                "Tracked events by source, type and outcome.",
                &["source", "type", "outcome"],
            ),
            ignored: counter(
                "nudge_ignored_total",
                "Calls accepted that Nudge does not model, by source, call and event name (the first 100 names; later ones \"other\").",
                &["source", "call", "name"],
            ),
            http_requests: counter(
                "nudge_http_requests_total",
                "Requests to the Segment-compatible HTTP API by endpoint and status code.",
                &["endpoint", "code"],
            ),
            kafka_messages: counter(
                "nudge_kafka_messages_total",
                "Messages the Kafka source took care of, by outcome (tracked, duplicate, merged, ignored, dead_letter).",
                &["outcome"],
            ),
            kafka_retries: counter(
                "nudge_kafka_retries_total",
                "Batches the Kafka source tried again, by reason (overloaded, store, dead_letter_topic).",
                &["reason"],
            ),
            kafka_produced: counter(
                "nudge_kafka_produced_total",
                "Triggers published by the Kafka sink, by result (delivered, retried, dead_letter).",
                &["result"],
            ),
            invalid_input: counter(
                "nudge_invalid_input_total",
                "Refused input by RPC and reason.",
                &["rpc", "reason"],
            ),
            model_info: {
                let g = IntGaugeVec::new(
                    Opts::new("nudge_model_info", "1 for each served model."),
                    &["name", "version", "format"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            model_load_failures: counter(
                "nudge_model_load_failures_total",
                "Models refused at load, by reason.",
                &["reason"],
            ),
            profiles: gauge(&registry, "nudge_profiles", "People with a profile in memory."),
            cache_lookups: counter(
                "nudge_cache_lookups_total",
                "Lookups of a person's profile or trigger state in memory, by part and result (a miss is a store read).",
                &["part", "result"],
            ),
            cache_evictions: {
                let c = IntCounter::new(
                    "nudge_cache_evictions_total",
                    "People evicted from memory to stay within engine.cache_mb.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            cache_bytes: gauge(
                &registry,
                "nudge_cache_bytes",
                "Bytes counted for the people held in memory.",
            ),
            cache_budget: gauge(
                &registry,
                "nudge_cache_budget_bytes",
                "The budget of the people held in memory (engine.cache_mb).",
            ),
            merges: counter(
                "nudge_identity_merges_total",
                "Identity merges by outcome.",
                &["outcome"],
            ),
            erasures: {
                let c = IntCounter::new("nudge_erasures_total", "People erased with DeleteUser.")
                    .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            store_commit_duration: {
                let opts = HistogramOpts::new(
                    "nudge_store_commit_duration_seconds",
                    "Time to commit one group of changes to the store, fsync included.",
                )
                .buckets(LATENCY_BUCKETS.to_vec());
                let h = Histogram::with_opts(opts).expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            store_errors: {
                let c = IntCounter::new("nudge_store_errors_total", "Store commits that failed.")
                    .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            store_reopens: counter(
                "nudge_store_reopens_total",
                "Attempts to reopen the store after a write fault, by outcome (ok, failed).",
                &["outcome"],
            ),
            ready: gauge(
                &registry,
                "nudge_ready",
                "1 while the server is ready (health SERVING for nudge.v1.NudgeService).",
            ),
            not_ready: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "nudge_not_ready",
                        "1 for each reason the server is not ready now (no_models, store, shard, shutting_down).",
                    ),
                    &["reason"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            shed: counter(
                "nudge_shed_total",
                "Requests turned away before any work, by reason (overloaded, deadline, expired, queue_full).",
                &["reason"],
            ),
            score_probability: {
                let opts = HistogramOpts::new(
                    "nudge_score_probability",
                    "The probabilities models gave, by model.",
                )
                .buckets((1..=20).map(|i| f64::from(i) * 0.05).collect());
                let h = HistogramVec::new(opts, &["model"]).expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            timer_lateness: {
                let opts = HistogramOpts::new(
                    "nudge_timer_lateness_seconds",
                    "How late timers fired: the tick's time minus each timer's due time.",
                )
                .buckets(vec![0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]);
                let h = Histogram::with_opts(opts).expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            queue_wait: {
                let opts = HistogramOpts::new(
                    "nudge_queue_wait_seconds",
                    "How long requests waited in a shard's queue before their work started.",
                )
                .buckets(LATENCY_BUCKETS.to_vec());
                let h = Histogram::with_opts(opts).expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            panics: counter(
                "nudge_panics_total",
                "Panics caught while handling a request, by where (shard, rpc, rule_expression).",
                &["where"],
            ),
            model_reloads: counter(
                "nudge_model_reloads_total",
                "Model reloads by outcome (ok, refused, failed).",
                &["outcome"],
            ),
            triggers: counter(
                "nudge_triggers_total",
                "Trigger decisions by rule and outcome: delivered, holdout, or why it was suppressed.",
                &["rule", "outcome"],
            ),
            trigger_latency: {
                let opts = HistogramOpts::new(
                    "nudge_trigger_latency_seconds",
                    "From receiving an event to its trigger being committed to the outbox.",
                )
                .buckets(LATENCY_BUCKETS.to_vec());
                let h = Histogram::with_opts(opts).expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            timers_pending: gauge(&registry, "nudge_timers_pending", "Timers pending: absence deadlines and threshold rechecks."),
            timers_fired: {
                let c = IntCounter::new("nudge_timers_fired_total", "Trigger decisions made when timers came due (delivered, held out or suppressed).")
                    .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            exposures: counter(
                "nudge_experiment_exposures_total",
                "Triggers delivered or held out in an experiment, by rule and variant.",
                &["rule", "variant"],
            ),
            conversions: counter(
                "nudge_experiment_conversions_total",
                "Purchases within the conversion window after an exposure, by rule and variant.",
                &["rule", "variant"],
            ),
            rules_reloads: counter(
                "nudge_rules_reloads_total",
                "Rules-file reloads by outcome (ok, refused).",
                &["outcome"],
            ),
            rules_loaded: gauge(&registry, "nudge_rules_loaded", "Trigger rules running."),
            webhook_deliveries: counter(
                "nudge_webhook_deliveries_total",
                "Webhook delivery attempts by endpoint and result (delivered, retried, dead_letter).",
                &["endpoint", "result"],
            ),
            auth_refused: counter(
                "nudge_auth_refused_total",
                "Calls refused for their credentials, by key name (empty when no known key was sent) and reason (missing, malformed, unknown, scope, rate_limited).",
                &["key", "reason"],
            ),
            auth_accepted: counter(
                "nudge_auth_accepted_total",
                "Calls let through by the credentials check, by key name.",
                &["key"],
            ),
            credential_reloads: counter(
                "nudge_credential_reloads_total",
                "Reloads of the keys file and the TLS files, by file (keys, tls) and outcome (ok, refused).",
                &["file", "outcome"],
            ),
            tls_handshake_failures: counter(
                "nudge_tls_handshake_failures_total",
                "TLS handshakes that failed, by listener (grpc, metrics, http) and reason (refused, timeout).",
                &["listener", "reason"],
            ),
            outbox_depth: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "nudge_outbox_depth",
                        "Triggers in the outbox an endpoint has not yet taken care of.",
                    ),
                    &["endpoint"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            subscribers: gauge(
                &registry,
                "nudge_trigger_subscribers",
                "Streams connected to SubscribeTriggers.",
            ),
            registry,
        };
        metrics.preset();
        metrics
    }

    /// Zero series for the label sets that are only strings at their call sites (the ones
    /// each help text above lists), so that a counter's first increment is an increase a
    /// rate or an alert sees, and dashboards show 0 rather than nothing.
    fn preset(&self) {
        let sets: [(&IntCounterVec, &[&str]); 5] = [
            (
                &self.shed,
                &["overloaded", "deadline", "expired", "queue_full"],
            ),
            (&self.store_reopens, &["ok", "failed"]),
            (&self.model_reloads, &["ok", "refused", "failed"]),
            (&self.rules_reloads, &["ok", "refused"]),
            (&self.panics, &["shard", "rpc", "rule_expression"]),
        ];
        for (counter, values) in sets {
            for value in values {
                counter.with_label_values(&[value]);
            }
        }
        for file in ["keys", "tls"] {
            for outcome in ["ok", "refused"] {
                self.credential_reloads.with_label_values(&[file, outcome]);
            }
        }
    }

    /// Records one model scoring call.
    pub fn observe_model(&self, model: &str, elapsed: Duration, ok: bool) {
        self.model_duration
            .with_label_values(&[model])
            .observe(elapsed.as_secs_f64());
        if !ok {
            self.model_errors.with_label_values(&[model]).inc();
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding to memory cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

/// Decides whether a scrape's `authorization` header value may read the metrics.
pub type Gate = std::sync::Arc<dyn Fn(Option<&[u8]>) -> bool + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves; with a `gate`, a scrape
/// it refuses gets 401.
pub async fn serve<L>(
    listener: L,
    metrics: std::sync::Arc<Metrics>,
    gate: Option<Gate>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    use axum::http::{header, HeaderMap, StatusCode};
    use axum::response::IntoResponse as _;
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let metrics = metrics.clone();
            let gate = gate.clone();
            async move {
                let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
                if gate.is_some_and(|allows| !allows(authorization)) {
                    return (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, "Bearer")],
                        "authorization: this endpoint needs an API key with the metrics scope\n",
                    )
                        .into_response();
                }
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    metrics.render(),
                )
                    .into_response()
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
