//! Webhook delivery, at least once, following Standard Webhooks
//! (<https://www.standardwebhooks.com>): each POST carries `webhook-id` (the trigger id, the
//! same on every retry), `webhook-timestamp` (Unix seconds) and `webhook-signature`
//! (`v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under the endpoint's secret).
//!
//! Each endpoint is one task that reads the outbox from its own durable cursor. It keeps
//! a bounded window of triggers in flight — at most `concurrency` requests at a time, at
//! most `rate_per_second` started per second — so a slow endpoint holds back only itself
//! and memory stays bounded however far behind it is. A failed attempt is retried with
//! exponential backoff and jitter, or after the `Retry-After` the endpoint asked for;
//! after `max_attempts` the trigger becomes a dead letter in the store. The cursor only
//! moves past triggers that were delivered or dead-lettered, so a restart redelivers what
//! was in flight (consumers deduplicate on `webhook-id`).
//!
//! What the body is, per endpoint ([`Format`]): Nudge's own envelope, or a CloudEvent 1.0
//! in the HTTP binding's binary or structured mode (<https://cloudevents.io>), with the
//! trigger id as the event id, so a receiver deduplicates on `ce-id` as on `webhook-id`.
//! The Standard Webhooks signature covers the body in every format.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::outbox::Outbox;
use crate::metrics::Metrics;
use crate::security::address::GuardedResolver;
use crate::store::{Store, StoreError};
use crate::trigger::Trigger;

/// One `[[triggers.webhooks]]` entry of the config file.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// A name for logs, metrics and the endpoint's cursor; keep it when the URL changes.
    pub name: String,
    pub url: String,
    /// The signing secret, `whsec_` + base64 (Standard Webhooks); or `secret_file`.
    #[serde(default)]
    pub secret: String,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Only these rules' triggers; all when empty.
    #[serde(default)]
    pub rules: Vec<String>,
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    #[serde(default = "defaults::rate_per_second")]
    pub rate_per_second: f64,
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "defaults::initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    #[serde(default = "defaults::max_backoff_ms")]
    pub max_backoff_ms: u64,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Let this endpoint reach loopback, private, link-local and other internal addresses
    /// (`security::address`); off, such a URL is refused at load and such a resolved
    /// address at delivery.
    #[serde(default)]
    pub allow_internal_addresses: bool,
    /// What each POST's body is.
    #[serde(default)]
    pub format: Format,
    /// The CloudEvents `source` attribute (a URI reference naming this Nudge deployment).
    #[serde(default = "defaults::cloudevents_source")]
    pub cloudevents_source: String,
}

/// How a trigger is put on the wire.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `{"type": "trigger.fired", "data": <trigger>}` as `application/json`.
    #[default]
    Standard,
    /// A CloudEvent in HTTP binary mode: its attributes in `ce-` headers, the trigger as
    /// the `application/json` body.
    CloudeventsBinary,
    /// A CloudEvent in HTTP structured mode: one `application/cloudevents+json` document
    /// with the trigger as its `data`.
    CloudeventsStructured,
}

/// The CloudEvents `type` of a trigger: this prefix and the action's type
/// (`dev.nudge.trigger.discount`), so a consumer subscribes to what it is asked to send.
/// The rule that fired is the `nudgerule` extension attribute.
pub const CLOUDEVENTS_TYPE_PREFIX: &str = "dev.nudge.trigger.";

mod defaults {
    pub fn concurrency() -> usize {
        4
    }
    pub fn rate_per_second() -> f64 {
        50.0
    }
    pub fn max_attempts() -> u32 {
        12
    }
    pub fn initial_backoff_ms() -> u64 {
        1000
    }
    pub fn max_backoff_ms() -> u64 {
        600_000
    }
    pub fn timeout_ms() -> u64 {
        10_000
    }
    pub fn cloudevents_source() -> String {
        "/nudge".to_owned()
    }
}

/// Shown as `<redacted>`: a config printed by `nudge check-config` or a log line must not
/// carry the signing secret.
const REDACTED: &str = "<redacted>";

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field(
                "secret",
                &if self.secret.is_empty() { "" } else { REDACTED },
            )
            .field("secret_file", &self.secret_file)
            .field("rules", &self.rules)
            .field("concurrency", &self.concurrency)
            .field("rate_per_second", &self.rate_per_second)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff_ms", &self.initial_backoff_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .field("timeout_ms", &self.timeout_ms)
            .field("allow_internal_addresses", &self.allow_internal_addresses)
            .field("format", &self.format)
            .field("cloudevents_source", &self.cloudevents_source)
            .finish()
    }
}

impl WebhookConfig {
    /// Every problem with this entry, each prefixed with `at` (where it is in the file).
    pub fn problems(&self, at: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            problems.push(format!("{at}: url must start with http:// or https://"));
        } else if let Err(e) =
            crate::security::address::check_url(&self.url, self.allow_internal_addresses)
        {
            problems.push(format!("{at}: {e}"));
        }
        if self.cloudevents_source.is_empty() {
            problems.push(format!(
                "{at}: cloudevents_source must not be empty (CloudEvents requires a source)"
            ));
        }
        if !(self.rate_per_second.is_finite() && self.rate_per_second > 0.0) {
            problems.push(format!("{at}: rate_per_second must be positive"));
        }
        if self.initial_backoff_ms == 0 || self.max_backoff_ms < self.initial_backoff_ms {
            problems.push(format!(
                "{at}: initial_backoff_ms must be at least 1 and at most max_backoff_ms"
            ));
        }
        if let Err(e) = Endpoint::try_from(self) {
            problems.push(format!("{at}: {e}"));
        }
        problems
    }
}

impl TryFrom<&WebhookConfig> for Endpoint {
    type Error = String;

    /// The endpoint's delivery settings, with its secret read and decoded.
    fn try_from(c: &WebhookConfig) -> Result<Endpoint, String> {
        let secret = match &c.secret_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .trim()
                .to_owned(),
            None => c.secret.clone(),
        };
        if secret.is_empty() {
            return Err("give a secret or a secret_file".into());
        }
        if c.concurrency == 0 || c.max_attempts == 0 {
            return Err("concurrency and max_attempts must be at least 1".into());
        }
        Ok(Endpoint {
            name: c.name.clone(),
            url: c.url.clone(),
            secret: secret_key(&secret)?,
            rules: c.rules.clone(),
            concurrency: c.concurrency,
            rate_per_second: c.rate_per_second,
            max_attempts: c.max_attempts,
            initial_backoff: Duration::from_millis(c.initial_backoff_ms),
            max_backoff: Duration::from_millis(c.max_backoff_ms),
            timeout: Duration::from_millis(c.timeout_ms),
            allow_internal_addresses: c.allow_internal_addresses,
            format: c.format,
            cloudevents_source: c.cloudevents_source.clone(),
        })
    }
}

/// One endpoint's settings, checked.
#[derive(Clone)]
pub struct Endpoint {
    pub name: String,
    pub url: String,
    /// The HMAC key (decoded from `whsec_…`).
    pub secret: Vec<u8>,
    /// Only these rules' triggers (all when empty).
    pub rules: Vec<String>,
    pub concurrency: usize,
    pub rate_per_second: f64,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub timeout: Duration,
    pub allow_internal_addresses: bool,
    pub format: Format,
    pub cloudevents_source: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secret", &REDACTED)
            .field("rules", &self.rules)
            .field("concurrency", &self.concurrency)
            .field("rate_per_second", &self.rate_per_second)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("timeout", &self.timeout)
            .field("allow_internal_addresses", &self.allow_internal_addresses)
            .field("format", &self.format)
            .field("cloudevents_source", &self.cloudevents_source)
            .finish()
    }
}

/// The shortest signing key accepted, in bytes: the Standard Webhooks specification asks
/// for secrets of 24 to 64 bytes.
const MIN_SECRET_BYTES: usize = 24;

/// The key of a Standard Webhooks secret: base64, with or without the `whsec_` prefix —
/// exactly as the reference libraries read it, so a receiver verifying with one of them
/// and the same secret string agrees with Nudge's signatures.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    // The reference libraries accept the base64 with or without its padding.
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let key = lenient
        .decode(b64)
        .map_err(|e| {
            format!("the secret must be base64 (optionally after whsec_), as Standard Webhooks libraries read it: {e}")
        })?;
    if key.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "the secret decodes to {} bytes; Standard Webhooks secrets are at least {MIN_SECRET_BYTES}",
            key.len()
        ));
    }
    Ok(key)
}

/// The `webhook-signature` header for a message.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// The JSON body of [`Format::Standard`]: `{"type": "trigger.fired", "data": <trigger>}`.
#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    data: &'a Trigger,
}

/// One trigger as an endpoint gets it: the same bytes and headers on every attempt.
#[derive(Debug, PartialEq)]
pub struct Message {
    pub content_type: &'static str,
    /// Headers besides `content-type` and the signature's.
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Message {
    pub fn new(format: Format, source: &str, trigger: &Trigger) -> Message {
        let attributes = || CloudEventAttributes::of(source, trigger);
        match format {
            Format::Standard => Message {
                content_type: "application/json",
                headers: Vec::new(),
                body: to_json(&Envelope {
                    kind: "trigger.fired",
                    data: trigger,
                }),
            },
            Format::CloudeventsBinary => {
                let headers = attributes()
                    .pairs()
                    .into_iter()
                    .map(|(name, value)| (name.http, header_value(&value)))
                    .collect();
                Message {
                    content_type: "application/json",
                    headers,
                    body: to_json(trigger),
                }
            }
            Format::CloudeventsStructured => Message {
                content_type: "application/cloudevents+json",
                headers: Vec::new(),
                body: to_json(&StructuredEvent {
                    attributes: attributes(),
                    datacontenttype: "application/json",
                    data: trigger,
                }),
            },
        }
    }
}

fn to_json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("a trigger encodes as JSON")
}

/// A trigger's CloudEvents context attributes.
#[derive(Serialize)]
struct CloudEventAttributes<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    kind: String,
    /// When the trigger was made, RFC 3339.
    time: String,
    /// The person: the user id, else the anonymous id (pseudonymized when that is on).
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    /// Extension attribute: the rule that fired.
    nudgerule: &'a str,
}

/// A CloudEvents attribute's header name in the HTTP binding (`ce-id`) and in the Kafka
/// binding (`ce_id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttributeName {
    pub http: &'static str,
    pub kafka: &'static str,
}

/// A trigger's CloudEvents attributes, as the binary modes of the HTTP and Kafka bindings
/// carry them in headers: each name for both bindings and its value (not yet encoded for
/// either).
pub fn cloudevent_attributes(source: &str, trigger: &Trigger) -> Vec<(AttributeName, String)> {
    CloudEventAttributes::of(source, trigger).pairs()
}

impl<'a> CloudEventAttributes<'a> {
    fn pairs(&self) -> Vec<(AttributeName, String)> {
        let name = |http, kafka| AttributeName { http, kafka };
        let mut pairs = vec![
            (
                name("ce-specversion", "ce_specversion"),
                self.specversion.to_owned(),
            ),
            (name("ce-id", "ce_id"), self.id.to_owned()),
            (name("ce-source", "ce_source"), self.source.to_owned()),
            (name("ce-type", "ce_type"), self.kind.clone()),
            (name("ce-time", "ce_time"), self.time.clone()),
            (
                name("ce-nudgerule", "ce_nudgerule"),
                self.nudgerule.to_owned(),
            ),
        ];
        if let Some(subject) = self.subject {
            pairs.push((name("ce-subject", "ce_subject"), subject.to_owned()));
        }
        pairs
    }

    fn of(source: &'a str, t: &'a Trigger) -> CloudEventAttributes<'a> {
        CloudEventAttributes {
            specversion: "1.0",
            id: &t.trigger_id,
            source,
            kind: format!("{CLOUDEVENTS_TYPE_PREFIX}{}", t.action.kind),
            time: jiff::Timestamp::from_millisecond(t.time_ms).map_or_else(
                |_| jiff::Timestamp::UNIX_EPOCH.to_string(),
                |ts| ts.to_string(),
            ),
            subject: t.user_id.as_deref().or(t.anonymous_id.as_deref()),
            nudgerule: &t.rule,
        }
    }
}

/// The structured-mode document: the attributes beside `data`.
#[derive(Serialize)]
struct StructuredEvent<'a> {
    #[serde(flatten)]
    attributes: CloudEventAttributes<'a>,
    datacontenttype: &'static str,
    data: &'a Trigger,
}

/// An attribute as an HTTP header value, percent-encoded as the CloudEvents HTTP binding
/// asks (section 3.1.3.2): every byte outside printable ASCII, and space, `"` and `%`.
fn header_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// A trigger whose delivery gave up, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub endpoint: String,
    /// The trigger's outbox sequence number.
    pub seq: u64,
    pub attempts: u32,
    pub last_error: String,
    /// When delivery gave up (Unix milliseconds).
    pub at_ms: i64,
    pub trigger: Trigger,
}

/// An endpoint's dead letters, oldest first, at most `limit`.
pub fn dead_letters(
    store: &Store,
    endpoint: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    Ok(store
        .dead_letters(&consumer(endpoint))?
        .into_iter()
        .filter_map(|(_, bytes)| serde_json::from_slice(&bytes).ok())
        .take(limit)
        .collect())
}

/// The store's name for an endpoint's cursor and dead letters.
pub fn consumer(endpoint: &str) -> String {
    format!("webhook:{endpoint}")
}

/// Spaces out request starts to at most `rate` per second.
struct Pacer {
    interval: Duration,
    next: tokio::sync::Mutex<Instant>,
}

impl Pacer {
    async fn wait(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let slot = (*next).max(Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// The HTTP client of one endpoint. Connections go only to addresses the guarded resolver
/// returned, never through a proxy from the environment, and a redirect is an answer, not
/// an instruction: each would let a delivery reach an address the check did not see.
fn client(endpoint: &Endpoint) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(endpoint.timeout)
        .dns_resolver(GuardedResolver::shared(endpoint.allow_internal_addresses))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
}

/// Delivers `endpoint`'s triggers until `stop`.
pub async fn run(
    endpoint: Endpoint,
    outbox: Arc<Outbox>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()>,
) {
    let name = consumer(&endpoint.name);
    let client = match client(&endpoint) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(endpoint = %endpoint.name, error = %e, "cannot build an HTTP client; webhook disabled");
            return;
        }
    };
    let mut cursor = match store.cursor(&name) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(endpoint = %endpoint.name, error = %e, "cannot read the webhook cursor; webhook disabled");
            return;
        }
    };
    let depth = metrics.outbox_depth.with_label_values(&[&endpoint.name]);
    let shared = Arc::new(Shared {
        client,
        endpoint: endpoint.clone(),
        permits: Semaphore::new(endpoint.concurrency),
        pacer: Pacer {
            interval: Duration::from_secs_f64(1.0 / endpoint.rate_per_second.max(0.001)),
            next: tokio::sync::Mutex::new(Instant::now()),
        },
        metrics: metrics.clone(),
    });
    let window = endpoint.concurrency * 8;
    let mut read_to = cursor;
    let mut pending: BTreeSet<u64> = BTreeSet::new();
    let mut tasks: JoinSet<(u64, Option<Vec<u8>>)> = JoinSet::new();
    let mut changes = outbox.changes();
    tokio::pin!(stop);
    loop {
        // Fill the window.
        while pending.len() < window {
            let batch = match outbox.read(read_to, window - pending.len()) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(endpoint = %endpoint.name, error = %e, "reading the outbox failed");
                    break;
                }
            };
            let Some(&(last, _)) = batch.last() else {
                break;
            };
            read_to = last;
            for (seq, trigger) in batch {
                if endpoint.rules.is_empty() || endpoint.rules.contains(&trigger.rule) {
                    pending.insert(seq);
                    let shared = shared.clone();
                    tasks.spawn(async move { (seq, shared.deliver(seq, trigger).await) });
                }
            }
        }
        // Everything before the oldest trigger still in flight is taken care of.
        let done_to = pending.first().map_or(read_to, |first| first - 1);
        if done_to > cursor {
            match store.advance_cursor(&name, done_to, &[]) {
                Ok(()) => cursor = done_to,
                Err(e) => {
                    tracing::error!(endpoint = %endpoint.name, error = %e, "saving the webhook cursor failed")
                }
            }
        }
        depth.set(outbox.watermark().saturating_sub(cursor) as i64);
        tokio::select! {
            _ = &mut stop => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok((seq, dead)) = joined else { continue };
                if let Some(record) = dead {
                    // The dead letter must be stored before the cursor can pass it.
                    if let Err(e) = store.advance_cursor(&name, cursor, &[(seq, record)]) {
                        tracing::error!(endpoint = %endpoint.name, seq, error = %e, "storing a dead letter failed; it will be retried after a restart");
                        continue;
                    }
                }
                pending.remove(&seq);
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            // A reader that fell behind the window's end polls for room.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    tasks.abort_all();
}

struct Shared {
    client: reqwest::Client,
    endpoint: Endpoint,
    permits: Semaphore,
    pacer: Pacer,
    metrics: Arc<Metrics>,
}

impl Shared {
    /// Delivers one trigger, retrying; answers the dead-letter record if it gave up.
    async fn deliver(&self, seq: u64, trigger: Trigger) -> Option<Vec<u8>> {
        let e = &self.endpoint;
        let message = Message::new(e.format, &e.cloudevents_source, &trigger);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let result = {
                let _permit = self
                    .permits
                    .acquire()
                    .await
                    .expect("the semaphore is never closed");
                self.pacer.wait().await;
                self.post(&trigger.trigger_id, &message).await
            };
            let retry_after = match result {
                Ok(()) => {
                    self.count("delivered");
                    return None;
                }
                Err(failure) if attempt >= e.max_attempts => {
                    self.count("dead_letter");
                    tracing::error!(endpoint = %e.name, trigger_id = %trigger.trigger_id, attempts = attempt, error = %failure.message, "webhook delivery gave up; stored as a dead letter");
                    let record = DeadLetter {
                        endpoint: e.name.clone(),
                        seq,
                        attempts: attempt,
                        last_error: failure.message,
                        at_ms: unix_millis(),
                        trigger,
                    };
                    return Some(
                        serde_json::to_vec(&record).expect("a dead letter encodes as JSON"),
                    );
                }
                Err(failure) => {
                    self.count("retried");
                    tracing::debug!(endpoint = %e.name, trigger_id = %trigger.trigger_id, attempt, error = %failure.message, "webhook delivery failed; retrying");
                    failure.retry_after
                }
            };
            let delay = retry_after
                .unwrap_or_else(|| backoff(e.initial_backoff, e.max_backoff, attempt, seq))
                .min(e.max_backoff);
            tokio::time::sleep(delay).await;
        }
    }

    async fn post(&self, id: &str, message: &Message) -> Result<(), Failure> {
        let timestamp = unix_millis() / 1000;
        let mut request = self
            .client
            .post(&self.endpoint.url)
            .header("content-type", message.content_type)
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                sign(&self.endpoint.secret, id, timestamp, &message.body),
            );
        for (name, value) in &message.headers {
            request = request.header(*name, value);
        }
        let response = request
            .body(message.body.clone())
            .send()
            .await
            .map_err(|e| Failure {
                message: format!("request failed: {}", chain(&e)),
                retry_after: None,
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, std::time::SystemTime::now()));
        Err(Failure {
            message: format!("the endpoint answered {status}"),
            retry_after,
        })
    }

    fn count(&self, result: &str) {
        self.metrics
            .webhook_deliveries
            .with_label_values(&[&self.endpoint.name, result])
            .inc();
    }
}

/// An error and its causes, joined: reqwest's own message ("error sending request") does
/// not say why (a refused address, a TLS failure), its sources do.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}

/// A `Retry-After` value — seconds, or an HTTP date — as a delay from `now`. A date in
/// the past means now.
fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The wall clock: receivers check `webhook-timestamp` against theirs.
fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct Failure {
    message: String,
    retry_after: Option<Duration>,
}

/// Exponential backoff with jitter: the `attempt`th delay is between half and all of
/// `initial * 2^(attempt-1)`, capped at `max`. The jitter is a hash of the sequence number
/// and attempt, so triggers that failed together do not retry together.
fn backoff(initial: Duration, max: Duration, attempt: u32, seq: u64) -> Duration {
    let full = initial
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    let h = crate::event::fnv1a(seq.to_be_bytes().into_iter().chain(attempt.to_be_bytes()));
    let jitter = 0.5 + (h % 1000) as f64 / 2000.0;
    full.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint for `url` with the given allow, as the config would make it.
    fn endpoint(url: &str, allow_internal_addresses: bool) -> Endpoint {
        Endpoint {
            name: "crm".into(),
            url: url.into(),
            secret: vec![0; MIN_SECRET_BYTES],
            rules: vec![],
            concurrency: 1,
            rate_per_second: 1.0,
            max_attempts: 1,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            timeout: Duration::from_secs(5),
            allow_internal_addresses,
            format: Format::Standard,
            cloudevents_source: "/nudge".into(),
        }
    }

    #[tokio::test]
    async fn the_client_reaches_a_name_for_loopback_only_when_allowed_and_follows_no_redirect() {
        use axum::routing::post;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let app = axum::Router::new()
            .route(
                "/hook",
                post({
                    let hits = hits.clone();
                    move || async move {
                        hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        "ok"
                    }
                }),
            )
            .route(
                "/moved",
                post(|| async {
                    (
                        axum::http::StatusCode::TEMPORARY_REDIRECT,
                        [(axum::http::header::LOCATION, "/hook")],
                    )
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let url = format!("http://localhost:{port}/hook");
        let refused = client(&endpoint(&url, false))
            .unwrap()
            .post(&url)
            .send()
            .await
            .unwrap_err();
        let why = chain(&refused);
        assert!(
            why.contains("loopback") && why.contains("allow_internal_addresses"),
            "{why}"
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);

        let allowed = client(&endpoint(&url, true)).unwrap();
        assert!(allowed
            .post(&url)
            .send()
            .await
            .unwrap()
            .status()
            .is_success());
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        let moved = format!("http://localhost:{port}/moved");
        let answer = allowed.post(&moved).send().await.unwrap();
        assert_eq!(answer.status(), 307, "a redirect is the answer");
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "and not followed"
        );
    }

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example from the Standard Webhooks specification's reference libraries.
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    /// Asks the Standard Webhooks reference implementation (Python `standardwebhooks`,
    /// installed by the test command into `.tools/pyenv`) to verify a message Nudge signed.
    fn reference_verifies(
        secret: &str,
        id: &str,
        timestamp: i64,
        body: &[u8],
        signature: &str,
    ) -> bool {
        let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.tools/pyenv/bin/python");
        let script = r#"
import sys
from standardwebhooks import Webhook
secret, id, ts, sig = sys.argv[1:5]
body = sys.stdin.buffer.read()
Webhook(secret).verify(body, {"webhook-id": id, "webhook-timestamp": ts, "webhook-signature": sig})
"#;
        let mut child = std::process::Command::new(python)
            .args(["-c", script, secret, id, &timestamp.to_string(), signature])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the test command installs .tools/pyenv with standardwebhooks");
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(body).unwrap();
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        }
        out.status.success()
    }

    #[test]
    fn the_reference_library_verifies_signatures_for_every_accepted_secret_form() {
        let now = unix_millis() / 1000;
        let body = br#"{"type":"trigger.fired","data":{"trigger_id":"trg_1"}}"#;
        for secret in [
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            // Without the prefix, as some providers hand secrets out.
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            // Unpadded base64 (32 bytes of key).
            "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
        ] {
            let key = secret_key(secret).unwrap();
            let signature = sign(&key, "trg_1", now, body);
            assert!(
                reference_verifies(secret, "trg_1", now, body, &signature),
                "{secret}"
            );
            // And the oracle is not a rubber stamp.
            assert!(!reference_verifies(secret, "trg_2", now, body, &signature));
        }
    }

    fn trigger(user_id: Option<&str>) -> Trigger {
        Trigger {
            trigger_id: "trg_5f2c".into(),
            rule: "cart_abandoned".into(),
            user_id: user_id.map(str::to_owned),
            anonymous_id: Some("anon-7".into()),
            time_ms: 1_764_763_200_123,
            cause: "timer:e1:0".into(),
            scores: [("purchase".to_owned(), 0.81)].into(),
            journey_stage: "decision".into(),
            contributions: Default::default(),
            action: crate::trigger::rules::Action {
                kind: "discount".into(),
                channel: "email".into(),
                template: "cart_reminder".into(),
                params: [("percent".to_owned(), "10".to_owned())].into(),
            },
            context: None,
            experiment: None,
            variant: None,
        }
    }

    /// The Python SDK reads what these make: tests/integration/triggers.rs
    /// (`cloudevents_webhooks_in_both_modes_are_read_by_the_sdk_and_stay_signed`).
    #[test]
    fn both_modes_carry_the_same_attributes_and_the_trigger_whole() {
        // A subject with a space and a non-ASCII letter: percent-encoded in a header.
        let t = trigger(Some("ann é"));
        let binary = Message::new(Format::CloudeventsBinary, "/nudge/eu-1", &t);
        let header = |name: &str| {
            binary
                .headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(binary.content_type, "application/json");
        assert_eq!(header("ce-specversion"), Some("1.0"));
        assert_eq!(header("ce-id"), Some("trg_5f2c"));
        assert_eq!(header("ce-source"), Some("/nudge/eu-1"));
        assert_eq!(header("ce-type"), Some("dev.nudge.trigger.discount"));
        assert_eq!(header("ce-subject"), Some("ann%20%C3%A9"));
        assert_eq!(header("ce-time"), Some("2025-12-03T12:00:00.123Z"));
        assert_eq!(header("ce-nudgerule"), Some("cart_abandoned"));
        let data: Trigger = serde_json::from_slice(&binary.body).unwrap();
        assert_eq!(data, t);

        let structured = Message::new(Format::CloudeventsStructured, "/nudge/eu-1", &t);
        assert_eq!(structured.content_type, "application/cloudevents+json");
        let doc: serde_json::Value = serde_json::from_slice(&structured.body).unwrap();
        assert_eq!(doc["id"], "trg_5f2c");
        assert_eq!(doc["subject"], "ann é", "JSON needs no percent-encoding");
        assert_eq!(doc["time"], "2025-12-03T12:00:00.123Z");
        assert_eq!(doc["datacontenttype"], "application/json");
        let data: Trigger = serde_json::from_value(doc["data"].clone()).unwrap();
        assert_eq!(data, t, "the data is the trigger, whole");
    }

    #[test]
    fn a_trigger_for_an_anonymous_person_has_that_id_as_subject_and_standard_is_unchanged() {
        let t = trigger(None);
        let binary = Message::new(Format::CloudeventsBinary, "/nudge", &t);
        assert!(binary
            .headers
            .contains(&("ce-subject", "anon-7".to_owned())));
        let standard = Message::new(Format::Standard, "/nudge", &t);
        assert!(standard.headers.is_empty());
        let body: serde_json::Value = serde_json::from_slice(&standard.body).unwrap();
        assert_eq!(body["type"], "trigger.fired");
        assert_eq!(body["data"]["trigger_id"], "trg_5f2c");
    }

    #[test]
    fn a_format_nudge_does_not_know_and_an_empty_source_are_refused_at_load() {
        let entry = |extra: &str| {
            toml::from_str::<WebhookConfig>(&format!(
                "name = \"crm\"\nurl = \"https://crm.example/hooks\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n{extra}"
            ))
        };
        let unknown = entry("format = \"cloudevents\"").unwrap_err().to_string();
        assert!(unknown.contains("cloudevents_binary"), "{unknown}");
        let empty =
            entry("format = \"cloudevents_structured\"\ncloudevents_source = \"\"").unwrap();
        assert_eq!(
            empty.problems("triggers.webhooks[0]"),
            ["triggers.webhooks[0]: cloudevents_source must not be empty (CloudEvents requires a source)"]
        );
        assert_eq!(entry("").unwrap().format, Format::Standard);
    }

    #[test]
    fn header_values_are_percent_encoded_as_the_http_binding_asks() {
        assert_eq!(header_value("a-b_c.d/e:f"), "a-b_c.d/e:f");
        assert_eq!(header_value("50% \"off\""), "50%25%20%22off%22");
        assert_eq!(header_value("é\n"), "%C3%A9%0A");
    }

    #[test]
    fn secrets_that_are_not_base64_or_too_short_are_refused() {
        assert!(secret_key("not base64!").unwrap_err().contains("base64"));
        assert!(secret_key("whsec_c2hvcnQ=")
            .unwrap_err()
            .contains("at least 24"));
    }

    #[test]
    fn a_printed_config_never_shows_the_secret() {
        let config: WebhookConfig = toml::from_str(
            r#"
            name = "crm"
            url = "https://crm.example/hooks"
            secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            "#,
        )
        .unwrap();
        let endpoint = Endpoint::try_from(&config).unwrap();
        for shown in [
            format!("{config:?}"),
            format!("{config:#?}"),
            format!("{endpoint:?}"),
        ] {
            assert!(!shown.contains("MfKQ9r8G"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        // RFC 9110's example date, 90 seconds after `now`.
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap() {
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(60));
        for attempt in 1..12 {
            let d = backoff(initial, max, attempt, 7);
            let full = Duration::from_secs(1 << (attempt - 1)).min(max);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert_ne!(backoff(initial, max, 3, 1), backoff(initial, max, 3, 2));
    }
}
