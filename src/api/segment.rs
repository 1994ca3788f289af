//! The Segment-compatible HTTP Tracking API: `POST /v1/track`, `/v1/identify`, `/v1/page`,
//! `/v1/screen`, `/v1/alias` and `/v1/batch` (`/v1/b`), on its own listener
//! (`server.http_addr`), so that Segment's and RudderStack's SDKs deliver to Nudge as they
//! are.
//!
//! It lives in `api/` because it is another protocol's edge onto the same path: a Segment
//! call becomes the `pb::Event` a `Track` request would carry and goes through
//! [`NudgeApi::track_batch`] — the same validation, pseudonymization, engine admission and
//! durable acknowledgement — and identify/alias calls through the same merge `Identify`
//! does. Nothing of Segment's shape goes past this module.
//!
//! What the translation decides:
//! - `messageId` is the event id, so an SDK's retry of a batch is answered as duplicates
//!   and changes nothing. A message without one gets an id derived from its bytes (the
//!   same bytes give the same id).
//! - `userId`/`anonymousId` are Track's `user_id`/`anonymous_id`; a message with both is a
//!   login. `identify` with both ids, and `alias` (`previousId`, read as the anonymous id,
//!   into `userId`), merge the visitor into the user like `Identify`; an identify with one
//!   id has nothing for Nudge to do and is counted as ignored.
//! - The event time is `timestamp` when the message has one; else Segment's clock-skew
//!   correction `receivedAt - (sentAt - originalTimestamp)` with `receivedAt` the server's
//!   clock and `sentAt` the message's or the batch's; else `originalTimestamp`; else
//!   `receivedAt`.
//! - E-commerce v2 event names (and their v1 aliases, compared without regard to ASCII
//!   case) become Nudge's event types; `page` and `screen` calls are page views. Any other
//!   event name, and `group` calls, are accepted and counted in `nudge_ignored_total` — an
//!   error would only make an SDK retry a call that can never succeed.
//! - Acknowledgements are Track's: 200 means every message was applied durably (or was a
//!   duplicate, or is ignored). A message Nudge refuses gets 400 naming it
//!   (`batch[3].properties.price`) while the other messages of the batch still apply, as
//!   in a Track batch; SDKs do not retry a 400, and a retry would only be duplicates.
//!   Overload is 429 and a store or shutdown 503, both with `Retry-After`, and nothing of
//!   the failed part is acknowledged (what was applied before it is deduplicated on retry).
//! - The write key is the HTTP Basic user (password empty) or, as Segment also accepts,
//!   the body's `writeKey`. Keys come from `server.http_write_keys_file`; only their
//!   SHA-256 digests are kept, and no key is ever logged. Without that file the listener
//!   is off: an ingest door that admits nobody would only be an open port.
//! - Limits as Segment's: a request of one call at most 32 KB, a batch at most 500 KB and
//!   each message in it at most 32 KB; a larger body is refused as soon as it passes the
//!   limit (never buffered whole), gzip included (RudderStack's SDK gzips by default).

use std::collections::HashSet;
use std::future::Future;
use std::io::Read as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine as _;
use futures_util::StreamExt as _;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{convert, ApiError, NudgeApi};
use crate::engine::{Admit, EngineError};
use crate::event::{FieldError, Reason};
use crate::pb;
use crate::time::Time;

/// The largest call, alone or inside a batch (Segment's 32 KB).
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// The largest batch request (Segment's 500 KB).
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// Distinct ignored event names that get a series of their own; later ones are "other",
/// so a caller's names cannot grow the metrics without bound.
pub const MAX_IGNORED_NAMES: usize = 100;
/// Ignored event names longer than this are "other" too.
const MAX_IGNORED_NAME_BYTES: usize = 64;
/// What `nudge_events_total{source}` says for events that came this way.
const SOURCE: &str = "http";
/// Request bodies being read or held at once, across connections: with each at most
/// [`MAX_BATCH_BYTES`], a bound of 32 MB on what callers can make the server buffer. A
/// request past it waits for a slot with only its headers read.
const MAX_BODIES: usize = 64;
/// How long a body may take to arrive: a caller that drips one byte at a time does not
/// hold a slot for longer (408, which the SDKs retry).
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The write keys the API accepts, as SHA-256 digests.
pub struct WriteKeys {
    digests: HashSet<[u8; 32]>,
}

impl std::fmt::Debug for WriteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests are not keys, but there is nothing to gain from printing them either.
        f.debug_struct("WriteKeys")
            .field("keys", &self.digests.len())
            .finish()
    }
}

impl WriteKeys {
    /// Reads a keys file: one key a line, or `sha256:<64 hex digits>` for a key given by
    /// its digest; blank lines and lines starting with `#` are skipped. The problems name
    /// lines, never keys.
    pub fn load(path: &Path) -> Result<WriteKeys, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        WriteKeys::parse(&text)
    }

    pub fn parse(text: &str) -> Result<WriteKeys, String> {
        let mut digests = HashSet::new();
        let mut problems = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(hex) = line.strip_prefix("sha256:") {
                match hex::decode(hex)
                    .ok()
                    .and_then(|d| <[u8; 32]>::try_from(d).ok())
                {
                    Some(digest) => {
                        digests.insert(digest);
                    }
                    None => problems.push(format!(
                        "line {}: sha256: must be followed by 64 hex digits",
                        i + 1
                    )),
                }
            } else if line.contains(':') || line.chars().any(char::is_whitespace) {
                // HTTP Basic ends the user name at the first ':'.
                problems.push(format!(
                    "line {}: a write key cannot hold ':' or spaces",
                    i + 1
                ));
            } else {
                digests.insert(digest(line));
            }
        }
        if digests.is_empty() && problems.is_empty() {
            problems.push("holds no write key".to_owned());
        }
        if problems.is_empty() {
            Ok(WriteKeys { digests })
        } else {
            Err(problems.join("; "))
        }
    }

    fn admits(&self, key: &str) -> bool {
        !key.is_empty() && self.digests.contains(&digest(key))
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The endpoints, each a Segment call type or the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Track,
    Identify,
    Page,
    Screen,
    Alias,
    Batch,
}

impl Endpoint {
    /// The path, which is also the `rpc` label of the refusals counted.
    const fn path(self) -> &'static str {
        match self {
            Endpoint::Track => "/v1/track",
            Endpoint::Identify => "/v1/identify",
            Endpoint::Page => "/v1/page",
            Endpoint::Screen => "/v1/screen",
            Endpoint::Alias => "/v1/alias",
            Endpoint::Batch => "/v1/batch",
        }
    }

    const fn call(self) -> Option<Call> {
        match self {
            Endpoint::Track => Some(Call::Track),
            Endpoint::Identify => Some(Call::Identify),
            Endpoint::Page => Some(Call::Page),
            Endpoint::Screen => Some(Call::Screen),
            Endpoint::Alias => Some(Call::Alias),
            Endpoint::Batch => None,
        }
    }
}

/// A Segment call type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Call {
    Track,
    Identify,
    Page,
    Screen,
    Alias,
    Group,
}

impl Call {
    fn parse(name: &str) -> Option<Call> {
        Some(match name {
            "track" => Call::Track,
            "identify" => Call::Identify,
            "page" => Call::Page,
            "screen" => Call::Screen,
            "alias" => Call::Alias,
            "group" => Call::Group,
            _ => return None,
        })
    }

    pub(super) const fn as_str(self) -> &'static str {
        match self {
            Call::Track => "track",
            Call::Identify => "identify",
            Call::Page => "page",
            Call::Screen => "screen",
            Call::Alias => "alias",
            Call::Group => "group",
        }
    }
}

/// Segment's e-commerce v2 (and v1) and email event names, and the event type each is.
const EVENT_NAMES: &[(&str, pb::EventType)] = &[
    ("Product Viewed", pb::EventType::ProductView),
    ("Viewed Product", pb::EventType::ProductView),
    ("Product Added", pb::EventType::AddToCart),
    ("Added Product", pb::EventType::AddToCart),
    ("Product Removed", pb::EventType::RemoveFromCart),
    ("Removed Product", pb::EventType::RemoveFromCart),
    ("Checkout Started", pb::EventType::CheckoutStarted),
    ("Started Order", pb::EventType::CheckoutStarted),
    ("Order Completed", pb::EventType::Purchase),
    ("Completed Order", pb::EventType::Purchase),
    ("Products Searched", pb::EventType::Search),
    ("Searched Products", pb::EventType::Search),
    ("Email Opened", pb::EventType::EmailOpen),
    ("Email Link Clicked", pb::EventType::EmailClick),
];

fn event_type(name: &str) -> Option<pb::EventType> {
    EVENT_NAMES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|&(_, t)| t)
}

/// Track's field names (as a refusal names them) and the Segment fields each was read
/// from.
pub(super) type Renames = Vec<(&'static str, &'static str)>;

/// An event waiting to be tracked with the others of its run: where it is in the request
/// ("batch[3]"), the event, its renames.
type Pending = (String, pb::Event, Renames);

/// What one Segment message asks of Nudge.
#[derive(Debug, PartialEq)]
pub(super) enum Action {
    /// An event to track; `renames` turn the Track field names its refusal would name into
    /// the Segment fields they were read from.
    Track {
        event: Box<pb::Event>,
        renames: Renames,
    },
    /// Merge the visitor into the user (identify with both ids, alias).
    Merge {
        anonymous_id: String,
        user_id: String,
    },
    /// Accepted, not modeled.
    Ignore { call: Call, name: Option<String> },
}

/// Reads one message: `call` is the endpoint's call type (a batch's messages say theirs
/// in `type`), `raw` its bytes (a missing `messageId` is derived from them), `sent_at`
/// the batch's `sentAt`, `received` the server's clock when the request arrived.
pub(super) fn message(
    msg: &Map<String, Value>,
    call: Option<Call>,
    raw: &str,
    sent_at: Option<&Value>,
    received: Time,
) -> Result<Action, FieldError> {
    let call = match call {
        Some(call) => call,
        None => {
            let name = string(msg, "type")?
                .ok_or_else(|| FieldError::new("type", Reason::Missing, "is required"))?;
            Call::parse(&name).ok_or_else(|| {
                FieldError::new(
                    "type",
                    Reason::UnknownEventType,
                    format!(
                        "{} is not a Segment call; one of track, identify, page, screen, alias, group",
                        crate::event::quoted(&name)
                    ),
                )
            })?
        }
    };
    let user_id = id(msg, "userId")?;
    let anonymous_id = id(msg, "anonymousId")?;
    let properties = match msg.get("properties") {
        None | Some(Value::Null) => None,
        Some(Value::Object(p)) => Some(p),
        Some(_) => {
            return Err(FieldError::new(
                "properties",
                Reason::Undecodable,
                "must be an object",
            ))
        }
    };
    let (r#type, props, mut renames) = match call {
        Call::Group => return Ok(Action::Ignore { call, name: None }),
        Call::Identify => {
            return Ok(match (user_id, anonymous_id) {
                (Some(user_id), Some(anonymous_id)) => Action::Merge {
                    anonymous_id,
                    user_id,
                },
                _ => Action::Ignore { call, name: None },
            });
        }
        Call::Alias => {
            let previous = id(msg, "previousId")?
                .ok_or_else(|| FieldError::new("previousId", Reason::Missing, "is required"))?;
            let user_id =
                user_id.ok_or_else(|| FieldError::new("userId", Reason::Missing, "is required"))?;
            return Ok(Action::Merge {
                anonymous_id: previous,
                user_id,
            });
        }
        Call::Track => {
            let name = string(msg, "event")?
                .ok_or_else(|| FieldError::new("event", Reason::Missing, "is required"))?;
            let Some(r#type) = event_type(&name) else {
                return Ok(Action::Ignore {
                    call,
                    name: Some(name),
                });
            };
            let (props, renames) = track_properties(r#type, properties)?;
            (r#type, props, renames)
        }
        Call::Page | Call::Screen => {
            let mut props = pb::EventProperties::default();
            let mut renames = Vec::new();
            let context_page = msg
                .get("context")
                .and_then(|c| c.get("page"))
                .and_then(Value::as_object);
            let page = [
                (properties, "path", "properties.path"),
                (context_page, "path", "context.page.path"),
                (properties, "url", "properties.url"),
                (Some(msg), "name", "name"),
                (properties, "name", "properties.name"),
            ];
            fn named(field: &'static str) -> impl Fn(FieldError) -> FieldError {
                move |e| FieldError {
                    field: field.to_owned(),
                    ..e
                }
            }
            for (object, key, field) in page {
                let value = object.map(|o| string(o, key)).transpose();
                if let Some(value) = value.map_err(named(field))?.flatten() {
                    props.page = Some(value);
                    renames.push(("properties.page", field));
                    break;
                }
            }
            for (object, field) in [(properties, "properties.category"), (Some(msg), "category")] {
                let value = object.map(|o| string(o, "category")).transpose();
                if let Some(value) = value.map_err(named(field))?.flatten() {
                    props.category = Some(value);
                    renames.push(("properties.category", field));
                    break;
                }
            }
            (pb::EventType::PageView, props, renames)
        }
    };
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(FieldError::new(
            "userId",
            Reason::Missing,
            "one of userId and anonymousId is required",
        ));
    }
    let (time, time_field) = event_time(msg, sent_at, received)?;
    renames.push(("event_time", time_field));
    renames.extend([
        ("user_id", "userId"),
        ("anonymous_id", "anonymousId"),
        ("event_id", "messageId"),
    ]);
    let event_id = match string(msg, "messageId")? {
        Some(id) if !id.is_empty() => id,
        _ => derived_id(raw),
    };
    Ok(Action::Track {
        event: Box::new(pb::Event {
            event_id,
            user_id: user_id.unwrap_or_default(),
            anonymous_id: anonymous_id.unwrap_or_default(),
            r#type: r#type.into(),
            event_time: Some(convert::timestamp(time)),
            properties: Some(props),
            attributes: Default::default(),
        }),
        renames,
    })
}

/// The properties of a tracked e-commerce or email event, as the spec names them.
fn track_properties(
    r#type: pb::EventType,
    properties: Option<&Map<String, Value>>,
) -> Result<(pb::EventProperties, Renames), FieldError> {
    let mut props = pb::EventProperties::default();
    let mut renames = Vec::new();
    let Some(p) = properties else {
        return Ok((props, renames));
    };
    let under = |e: FieldError| e.under("properties");
    use pb::EventType as T;
    match r#type {
        T::ProductView | T::AddToCart | T::RemoveFromCart => {
            for key in ["product_id", "sku"] {
                if let Some(value) = id(p, key).map_err(under)? {
                    props.product_id = Some(value);
                    renames.push((
                        "properties.product_id",
                        if key == "sku" {
                            "properties.sku"
                        } else {
                            "properties.product_id"
                        },
                    ));
                    break;
                }
            }
            props.category = string(p, "category").map_err(under)?;
            props.price = number(p, "price").map_err(under)?;
            props.quantity = quantity(p).map_err(under)?;
        }
        T::CheckoutStarted => {
            props.order_id = id(p, "order_id").map_err(under)?;
        }
        T::Purchase => {
            props.order_id = id(p, "order_id").map_err(under)?;
            // `revenue` is what the products earned (no shipping or tax), which is what
            // Nudge's monetary features mean; `total` and `value` stand in without it.
            for (key, field) in [
                ("revenue", "properties.revenue"),
                ("total", "properties.total"),
                ("value", "properties.value"),
            ] {
                if let Some(value) = number(p, key).map_err(under)? {
                    props.order_value = Some(value);
                    renames.push(("properties.order_value", field));
                    break;
                }
            }
            if props.order_value.is_none() {
                renames.push(("properties.order_value", "properties.revenue"));
            }
        }
        T::Search => {
            props.search_query = match p.get("query") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                // The spec allows an object (structured filters): kept as its JSON.
                Some(other) => Some(other.to_string()),
            };
            renames.push(("properties.search_query", "properties.query"));
        }
        T::EmailOpen | T::EmailClick => {
            props.campaign_id = id(p, "campaign_id").map_err(under)?;
        }
        T::PageView | T::Unspecified => {}
    }
    Ok((props, renames))
}

/// The event time and the field it was read from (the one a refusal names).
fn event_time(
    msg: &Map<String, Value>,
    batch_sent_at: Option<&Value>,
    received: Time,
) -> Result<(Time, &'static str), FieldError> {
    if let Some(t) = timestamp(msg.get("timestamp"), "timestamp")? {
        return Ok((t, "timestamp"));
    }
    let Some(original) = timestamp(msg.get("originalTimestamp"), "originalTimestamp")? else {
        return Ok((received, "timestamp"));
    };
    let sent = match msg.get("sentAt") {
        Some(v) if !v.is_null() => timestamp(Some(v), "sentAt")?,
        _ => timestamp(batch_sent_at, "sentAt")?,
    };
    Ok(match sent {
        // The device's clock is off by (sentAt - receivedAt); the event happened that far
        // from originalTimestamp.
        Some(sent) => (received.plus_ms(-sent.since(original)), "originalTimestamp"),
        None => (original, "originalTimestamp"),
    })
}

/// An ISO-8601 time; one without an offset is UTC, as Segment reads it.
fn timestamp(value: Option<&Value>, field: &str) -> Result<Option<Time>, FieldError> {
    let text = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(FieldError::new(
                field,
                Reason::Undecodable,
                "must be an ISO-8601 string",
            ))
        }
    };
    let parsed = text.parse::<jiff::Timestamp>().or_else(|_| {
        text.parse::<jiff::civil::DateTime>()
            .and_then(|t| t.to_zoned(jiff::tz::TimeZone::UTC))
            .map(|z| z.timestamp())
    });
    match parsed {
        Ok(t) => Ok(Some(Time(t.as_millisecond()))),
        Err(_) => Err(FieldError::new(
            field,
            Reason::Undecodable,
            format!(
                "{} is not an ISO-8601 time such as 2026-03-02T10:00:00.000Z",
                crate::event::quoted(text)
            ),
        )),
    }
}

/// A string field; absent or null is `None`.
fn string(o: &Map<String, Value>, key: &str) -> Result<Option<String>, FieldError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(FieldError::new(
            key,
            Reason::Undecodable,
            "must be a string",
        )),
    }
}

/// An identifier: a string or a number (SDKs send numeric ids either way); empty is none.
fn id(o: &Map<String, Value>, key: &str) -> Result<Option<String>, FieldError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(FieldError::new(
            key,
            Reason::Undecodable,
            "must be a string or a number",
        )),
    }
}

/// A number, or a string holding one (some clients quote prices). Its range is Track's
/// to check.
fn number(o: &Map<String, Value>, key: &str) -> Result<Option<f64>, FieldError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(Value::String(s)) => s.trim().parse::<f64>().map(Some).map_err(|_| {
            FieldError::new(
                key,
                Reason::Undecodable,
                format!("{} is not a number", crate::event::quoted(s)),
            )
        }),
        Some(_) => Err(FieldError::new(
            key,
            Reason::Undecodable,
            "must be a number",
        )),
    }
}

/// A whole, positive quantity (Track checks its upper bound).
fn quantity(o: &Map<String, Value>) -> Result<Option<u32>, FieldError> {
    let Some(q) = number(o, "quantity")? else {
        return Ok(None);
    };
    if q.fract() != 0.0 || !(1.0..=f64::from(u32::MAX)).contains(&q) {
        return Err(FieldError::new(
            "quantity",
            Reason::OutOfRange,
            format!(
                "is {q}; a whole number from 1 to {} is required",
                crate::event::MAX_QUANTITY
            ),
        ));
    }
    Ok(Some(q as u32))
}

/// The event id of a message that has no `messageId`: the same bytes, the same id, so a
/// retried request still deduplicates.
fn derived_id(raw: &str) -> String {
    format!(
        "sha256:{}",
        &hex::encode(Sha256::digest(raw.as_bytes()))[..40]
    )
}

/// A refusal renamed from Track's field names to the Segment fields they came from.
pub(super) fn renamed(field: &str, renames: &[(&'static str, &'static str)]) -> String {
    for (from, to) in renames {
        if let Some(rest) = field.strip_prefix(from) {
            if rest.is_empty() || rest.starts_with('.') || rest.starts_with('[') {
                return format!("{to}{rest}");
            }
        }
    }
    field.to_owned()
}

/// `prefix` ("batch[3]", or nothing for a single call) before a field path.
fn at(prefix: &str, field: &str) -> String {
    match (prefix.is_empty(), field.is_empty()) {
        (true, _) => field.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) => format!("{prefix}.{field}"),
    }
}

/// The first [`MAX_IGNORED_NAMES`] distinct names ignored, each its own metric series.
#[derive(Default)]
pub(super) struct IgnoredNames {
    seen: Mutex<HashSet<String>>,
}

impl IgnoredNames {
    /// Counts an accepted call Nudge does not model in `nudge_ignored_total`.
    pub(super) fn count(
        &self,
        metrics: &crate::metrics::Metrics,
        source: &str,
        call: Call,
        name: Option<String>,
    ) {
        let name = name.map(|n| self.label(&n)).unwrap_or_default();
        metrics
            .ignored
            .with_label_values(&[source, call.as_str(), &name])
            .inc();
    }

    fn label(&self, name: &str) -> String {
        if name.len() > MAX_IGNORED_NAME_BYTES {
            return "other".to_owned();
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(name) {
            return name.to_owned();
        }
        if seen.len() < MAX_IGNORED_NAMES {
            seen.insert(name.to_owned());
            return name.to_owned();
        }
        "other".to_owned()
    }
}

/// The HTTP API's state, shared by every request.
#[derive(Clone)]
struct Segment {
    api: NudgeApi,
    keys: Arc<WriteKeys>,
    ignored: Arc<IgnoredNames>,
    bodies: Arc<tokio::sync::Semaphore>,
}

/// Serves the HTTP API on `listener` until `shutdown` resolves; then stops accepting and
/// lets requests in flight finish.
pub async fn serve<L>(
    listener: L,
    api: NudgeApi,
    keys: WriteKeys,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, router(api, keys))
        .with_graceful_shutdown(shutdown)
        .await
}

fn router(api: NudgeApi, keys: WriteKeys) -> Router {
    let state = Segment {
        api,
        keys: Arc::new(keys),
        ignored: Arc::default(),
        bodies: Arc::new(tokio::sync::Semaphore::new(MAX_BODIES)),
    };
    let route = |endpoint: Endpoint| {
        post(
            move |State(s): State<Segment>, headers: HeaderMap, body: Body| async move {
                s.handle(endpoint, headers, body).await
            },
        )
    };
    Router::new()
        .route("/v1/track", route(Endpoint::Track))
        .route("/v1/identify", route(Endpoint::Identify))
        .route("/v1/page", route(Endpoint::Page))
        .route("/v1/screen", route(Endpoint::Screen))
        .route("/v1/alias", route(Endpoint::Alias))
        .route("/v1/batch", route(Endpoint::Batch))
        .route("/v1/b", route(Endpoint::Batch))
        .fallback(|| async {
            reply(
                StatusCode::NOT_FOUND,
                &Failure::new(
                    "path",
                    "not_found",
                    "no such endpoint; POST /v1/track, /v1/identify, /v1/page, /v1/screen, /v1/alias or /v1/batch",
                ),
            )
        })
        .method_not_allowed_fallback(|| async {
            reply(
                StatusCode::METHOD_NOT_ALLOWED,
                &Failure::new("method", "method_not_allowed", "the tracking endpoints take POST"),
            )
        })
        .with_state(state)
}

/// A refused request's JSON: `code` and `message` as Segment's SDKs read them, `field`
/// and `reason` as the gRPC API's `FieldError`.
#[derive(Debug, serde::Serialize)]
struct Failure {
    success: bool,
    code: String,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl Failure {
    fn new(field: &str, reason: &str, message: &str) -> Failure {
        Failure {
            success: false,
            code: reason.to_owned(),
            message: format!("{field}: {message}"),
            field: Some(field.to_owned()),
            reason: Some(reason.to_owned()),
        }
    }

    fn field(e: &FieldError) -> Failure {
        Failure::new(&e.field, e.reason.as_str(), &e.message)
    }

    fn plain(code: &str, message: String) -> Failure {
        Failure {
            success: false,
            code: code.to_owned(),
            message,
            field: None,
            reason: None,
        }
    }
}

/// One refused message of a request.
#[derive(Debug, serde::Serialize)]
struct MessageError {
    field: String,
    reason: String,
    message: String,
}

/// What became of a request's messages.
#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    success: bool,
    accepted: usize,
    duplicate: usize,
    merged: usize,
    ignored: usize,
    rejected: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<MessageError>,
}

fn reply(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let json = serde_json::to_vec(body).unwrap_or_else(|_| b"{\"success\":false}".to_vec());
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json,
    )
        .into_response()
}

/// Why a request was refused as a whole, before or instead of its messages' outcome.
enum Refusal {
    /// 401: no valid write key, and why.
    Unauthorized(&'static str),
    /// 400 naming a field (already counted in `nudge_invalid_input_total`).
    Field(FieldError),
    /// 408: the body did not arrive within [`BODY_TIMEOUT`].
    Timeout,
    /// The engine or the store could not take it.
    Api(ApiError),
}

impl Segment {
    async fn handle(&self, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
        let response = match self.respond(endpoint, &headers, body).await {
            Ok(summary) if summary.errors.is_empty() => reply(StatusCode::OK, &summary),
            Ok(summary) => {
                // The SDKs read `code` and `message`; `errors` lists every refusal.
                let first = &summary.errors[0];
                let mut body = serde_json::to_value(&summary).unwrap_or_default();
                if let Value::Object(o) = &mut body {
                    o.insert("code".into(), first.reason.clone().into());
                    o.insert("message".into(), first.message.clone().into());
                    o.insert("field".into(), first.field.clone().into());
                    o.insert("reason".into(), first.reason.clone().into());
                }
                reply(StatusCode::BAD_REQUEST, &body)
            }
            Err(Refusal::Unauthorized(message)) => reply(
                StatusCode::UNAUTHORIZED,
                &Failure::new("writeKey", "unauthorized", message),
            ),
            Err(Refusal::Field(e)) => reply(StatusCode::BAD_REQUEST, &Failure::field(&e)),
            Err(Refusal::Timeout) => reply(
                StatusCode::REQUEST_TIMEOUT,
                &Failure::new(
                    "body",
                    "timeout",
                    &format!(
                        "did not arrive within {} s; send it again",
                        BODY_TIMEOUT.as_secs()
                    ),
                ),
            ),
            Err(Refusal::Api(e)) => api_error(e),
        };
        self.api
            .metrics
            .http_requests
            .with_label_values(&[endpoint.path(), response.status().as_str()])
            .inc();
        response
    }

    async fn respond(
        &self,
        endpoint: Endpoint,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Summary, Refusal> {
        let rpc = endpoint.path();
        let bad = |e: FieldError| {
            self.api.count_refusal(rpc, &e);
            Refusal::Field(e)
        };
        // A key in the header is checked before the body is read.
        let header_key = basic_user(headers);
        if let Some(key) = &header_key {
            match key {
                Some(key) if self.keys.admits(key) => {}
                _ => {
                    return Err(Refusal::Unauthorized(
                        "is not a valid write key; send it as the HTTP Basic user name with an empty password",
                    ))
                }
            }
        }
        let limit = match endpoint {
            Endpoint::Batch => MAX_BATCH_BYTES,
            _ => MAX_MESSAGE_BYTES,
        };
        // Held until the answer: the body's bytes live that long.
        let _slot = self
            .bodies
            .acquire()
            .await
            .map_err(|_| Refusal::Api(ApiError::Engine(EngineError::ShuttingDown)))?;
        let bytes = tokio::time::timeout(BODY_TIMEOUT, read_body(headers, body, limit))
            .await
            .map_err(|_| Refusal::Timeout)?
            .map_err(bad)?;
        let received = self.api.clock.now();

        // The messages, as raw JSON each, and what the request says around them.
        let (messages, sent_at, body_key): (Vec<&RawValue>, Option<Value>, Option<String>);
        let single: Map<String, Value>;
        #[derive(serde::Deserialize)]
        struct Batch<'a> {
            #[serde(borrow)]
            batch: Option<Vec<&'a RawValue>>,
            #[serde(rename = "sentAt")]
            sent_at: Option<Value>,
            #[serde(rename = "writeKey")]
            write_key: Option<Value>,
        }
        let undecodable = |e: serde_json::Error| {
            bad(FieldError::new(
                "body",
                Reason::Undecodable,
                format!("is not a JSON object: {e}"),
            ))
        };
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            bad(FieldError::new(
                "body",
                Reason::Undecodable,
                "is not UTF-8 text",
            ))
        })?;
        let key_of = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        if endpoint == Endpoint::Batch {
            let batch: Batch<'_> = serde_json::from_str(text).map_err(undecodable)?;
            messages = batch
                .batch
                .ok_or_else(|| bad(FieldError::new("batch", Reason::Missing, "is required")))?;
            sent_at = batch.sent_at;
            body_key = key_of(batch.write_key.as_ref());
            single = Map::new();
        } else {
            single = serde_json::from_str(text).map_err(undecodable)?;
            messages = Vec::new();
            sent_at = None;
            body_key = key_of(single.get("writeKey"));
        }
        if header_key.is_none() && !body_key.is_some_and(|k| self.keys.admits(&k)) {
            return Err(Refusal::Unauthorized(
                "a valid write key is required: the HTTP Basic user name (password empty) or the body's writeKey",
            ));
        }

        // Every message read, in order, before anything is applied.
        let max = self.api.limits.max_batch_events;
        if messages.len() > max {
            return Err(bad(FieldError::new(
                "batch",
                Reason::TooMany,
                format!(
                    "has {} messages; at most {max} are allowed per request",
                    messages.len()
                ),
            )));
        }
        let mut actions = Vec::new();
        if let Some(call) = endpoint.call() {
            actions.push((
                String::new(),
                message(&single, Some(call), text, None, received),
            ));
        } else {
            for (i, raw) in messages.into_iter().enumerate() {
                let prefix = format!("batch[{i}]");
                let action = if raw.get().len() > MAX_MESSAGE_BYTES {
                    Err(FieldError::new(
                        "",
                        Reason::MessageTooLarge,
                        format!(
                            "is {} bytes; a message may be at most {MAX_MESSAGE_BYTES} (32 KB)",
                            raw.get().len()
                        ),
                    ))
                } else {
                    match serde_json::from_str::<Map<String, Value>>(raw.get()) {
                        Ok(msg) => message(&msg, None, raw.get(), sent_at.as_ref(), received),
                        Err(_) => Err(FieldError::new(
                            "",
                            Reason::Undecodable,
                            "must be a JSON object",
                        )),
                    }
                };
                actions.push((prefix, action));
            }
        }
        self.apply(rpc, actions).await.map_err(Refusal::Api)
    }

    /// Applies the messages in order: runs of events as one Track batch, each merge
    /// between them on its own.
    async fn apply(
        &self,
        rpc: &'static str,
        actions: Vec<(String, Result<Action, FieldError>)>,
    ) -> Result<Summary, ApiError> {
        let mut summary = Summary {
            success: true,
            ..Summary::default()
        };
        let mut pending: Vec<Pending> = Vec::new();
        for (prefix, action) in actions {
            match action {
                Ok(Action::Track { event, renames }) => pending.push((prefix, *event, renames)),
                Ok(Action::Merge {
                    anonymous_id,
                    user_id,
                }) => {
                    self.track(rpc, std::mem::take(&mut pending), &mut summary)
                        .await?;
                    self.merge(rpc, &prefix, anonymous_id, user_id, &mut summary)
                        .await?;
                }
                Ok(Action::Ignore { call, name }) => {
                    self.ignored.count(&self.api.metrics, SOURCE, call, name);
                    summary.ignored += 1;
                }
                Err(e) => {
                    let e = FieldError {
                        field: at(&prefix, &e.field),
                        ..e
                    };
                    self.api.count_refusal(rpc, &e);
                    self.api
                        .metrics
                        .events
                        .with_label_values(&[SOURCE, "unknown", "rejected"])
                        .inc();
                    summary.reject(e);
                }
            }
        }
        self.track(rpc, pending, &mut summary).await?;
        summary.success = summary.errors.is_empty();
        Ok(summary)
    }

    async fn track(
        &self,
        rpc: &'static str,
        pending: Vec<Pending>,
        summary: &mut Summary,
    ) -> Result<(), ApiError> {
        if pending.is_empty() {
            return Ok(());
        }
        let (names, events): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .map(|(prefix, event, renames)| ((prefix, renames), event))
            .unzip();
        // Overload is answered at once, as a unary Track is: the SDK retries later.
        let results = self
            .api
            .track_batch(rpc, SOURCE, events, Admit::Shed { deadline: None })
            .await?;
        for (result, (prefix, renames)) in results.into_iter().zip(names) {
            match (pb::EventStatus::try_from(result.status), result.error) {
                (_, Some(error)) => {
                    // Track names the event `events[i]`; the caller knows it by its place
                    // in the request and by Segment's field names.
                    let field = error
                        .field
                        .split_once('.')
                        .map_or("", |(_, rest)| rest)
                        .to_owned();
                    let message = error.message;
                    let field = at(&prefix, &renamed(&field, &renames));
                    summary.rejected += 1;
                    summary.errors.push(MessageError {
                        message: format!("{field}: {message}"),
                        field,
                        reason: error.reason,
                    });
                }
                (Ok(pb::EventStatus::Duplicate), None) => summary.duplicate += 1,
                (_, None) => summary.accepted += 1,
            }
        }
        Ok(())
    }

    async fn merge(
        &self,
        rpc: &'static str,
        prefix: &str,
        anonymous_id: String,
        user_id: String,
        summary: &mut Summary,
    ) -> Result<(), ApiError> {
        match self.api.merge_ids(rpc, anonymous_id, user_id).await? {
            Ok(()) => summary.merged += 1,
            Err(e) => {
                let field = match e.field.as_str() {
                    "user_id" => "userId",
                    _ => "anonymousId",
                };
                summary.reject(FieldError {
                    field: at(prefix, field),
                    ..e
                });
            }
        }
        Ok(())
    }
}

impl NudgeApi {
    /// Merges the visitor into the user, as `Identify` does, for a Segment identify or
    /// alias call (from HTTP or Kafka). `Ok(Err)` is an id Nudge refuses (counted under
    /// `rpc`; the field is `user_id` or `anonymous_id`); a link refused because the
    /// anonymous id already belongs to another user is taken, as for a Track event with
    /// both ids, and logged.
    pub(super) async fn merge_ids(
        &self,
        rpc: &'static str,
        anonymous_id: String,
        user_id: String,
    ) -> Result<Result<(), FieldError>, ApiError> {
        let request = pb::IdentifyRequest {
            anonymous_id,
            user_id,
        };
        let (anonymous, user) = match convert::identify(request, &self.pseudonymizer) {
            Ok(people) => people,
            Err(e) => {
                self.count_refusal(rpc, &e);
                return Ok(Err(e));
            }
        };
        match self.engine.merge(anonymous, user).await {
            Ok(_) => Ok(Ok(())),
            Err(EngineError::Conflict(reason)) => {
                tracing::warn!(%reason, "identity link refused");
                Ok(Ok(()))
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Summary {
    fn reject(&mut self, e: FieldError) {
        self.rejected += 1;
        self.errors.push(MessageError {
            message: e.to_string(),
            field: e.field,
            reason: e.reason.as_str().to_owned(),
        });
    }
}

/// The user name of an HTTP Basic `Authorization` header: `None` without the header,
/// `Some(None)` for one that is not Basic or does not decode.
fn basic_user(headers: &HeaderMap) -> Option<Option<String>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let user = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        })
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .map(|pair| match pair.split_once(':') {
            Some((user, _password)) => user.to_owned(),
            None => pair,
        });
    Some(user)
}

/// The request body, at most `limit` bytes (after gzip, if it is gzipped): a declared
/// length over the limit is refused before reading, a stream that passes it as soon as it
/// does.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, FieldError> {
    let too_large = |size: String| {
        FieldError::new(
            "body",
            Reason::MessageTooLarge,
            format!(
                "is {size} bytes; at most {limit} ({} KB) are allowed for this endpoint",
                limit / 1024
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        return Err(too_large(n.to_string()));
    }
    let mut bytes = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            FieldError::new(
                "body",
                Reason::Undecodable,
                format!("could not be read: {e}"),
            )
        })?;
        if bytes.len() + chunk.len() > limit {
            return Err(too_large(format!("more than {limit}")));
        }
        bytes.extend_from_slice(&chunk);
    }
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("" | "identity") => Ok(bytes),
        Some("gzip") => {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(bytes.as_slice())
                .take(limit as u64 + 1)
                .read_to_end(&mut plain)
                .map_err(|e| {
                    FieldError::new(
                        "body",
                        Reason::Undecodable,
                        format!("is not valid gzip: {e}"),
                    )
                })?;
            if plain.len() > limit {
                return Err(too_large(format!("more than {limit} (unzipped)")));
            }
            Ok(plain)
        }
        Some(other) => Err(FieldError::new(
            "Content-Encoding",
            Reason::Undecodable,
            format!(
                "{} is not supported; send gzip or nothing",
                crate::event::quoted(other)
            ),
        )),
    }
}

/// An engine or store failure as an HTTP answer: overload 429, what passes 503, both with
/// `Retry-After` (whole seconds, as the SDKs read it).
fn api_error(e: ApiError) -> Response {
    let message = e.to_string();
    let (status, code, retry_after) = match &e {
        ApiError::Invalid(e) => return reply(StatusCode::BAD_REQUEST, &Failure::field(e)),
        ApiError::Engine(EngineError::Overloaded { retry_after }) => (
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            Some(retry_after.as_millis().div_ceil(1000).max(1) as u64),
        ),
        ApiError::Engine(
            EngineError::ShuttingDown
            | EngineError::Store(_)
            | EngineError::GroupFailed
            | EngineError::DeadlineUnmeetable
            | EngineError::DeadlineExpired,
        )
        | ApiError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", Some(1)),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
    };
    let mut response = reply(status, &Failure::plain(code, message));
    if let Some(secs) = retry_after {
        if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-03-02T10:00:00Z.
    const RECEIVED: Time = Time(1_772_445_600_000);

    fn read(json: &str, call: Option<Call>) -> Result<Action, FieldError> {
        let msg: Map<String, Value> = serde_json::from_str(json).unwrap();
        message(&msg, call, json, None, RECEIVED)
    }

    fn event(json: &str) -> pb::Event {
        match read(json, None) {
            Ok(Action::Track { event, .. }) => *event,
            other => panic!("{json}: {other:?}"),
        }
    }

    fn at_ms(iso: &str) -> prost_types::Timestamp {
        convert::timestamp(Time(
            iso.parse::<jiff::Timestamp>().unwrap().as_millisecond(),
        ))
    }

    #[test]
    fn ecommerce_names_map_to_event_types() {
        for (name, want) in [
            ("Product Viewed", pb::EventType::ProductView),
            ("product viewed", pb::EventType::ProductView),
            ("Product Added", pb::EventType::AddToCart),
            ("Product Removed", pb::EventType::RemoveFromCart),
            ("Checkout Started", pb::EventType::CheckoutStarted),
            ("Order Completed", pb::EventType::Purchase),
            ("Completed Order", pb::EventType::Purchase),
            ("Products Searched", pb::EventType::Search),
            ("Email Opened", pb::EventType::EmailOpen),
            ("Email Link Clicked", pb::EventType::EmailClick),
        ] {
            let json = format!(r#"{{"type":"track","event":"{name}","userId":"u"}}"#);
            assert_eq!(event(&json).r#type, want as i32, "{name}");
        }
        let ignored = read(
            r#"{"type":"track","event":"Course Clicked","userId":"u"}"#,
            None,
        );
        assert_eq!(
            ignored,
            Ok(Action::Ignore {
                call: Call::Track,
                name: Some("Course Clicked".into())
            })
        );
    }

    #[test]
    fn properties_map_to_track_fields() {
        let e = event(
            r#"{"type":"track","event":"Product Added","anonymousId":"a","messageId":"m1",
                "properties":{"sku":"G-32","category":"Games","price":"18.99","quantity":2}}"#,
        );
        let p = e.properties.unwrap();
        assert_eq!(e.event_id, "m1");
        assert_eq!(e.anonymous_id, "a");
        assert_eq!(p.product_id.as_deref(), Some("G-32"));
        assert_eq!(p.category.as_deref(), Some("Games"));
        assert_eq!(p.price, Some(18.99));
        assert_eq!(p.quantity, Some(2));
        let order = event(
            r#"{"type":"track","event":"Order Completed","userId":7,
                "properties":{"order_id":"o-1","total":27.5,"revenue":25}}"#,
        );
        assert_eq!(order.user_id, "7");
        let p = order.properties.unwrap();
        assert_eq!(
            (p.order_value, p.order_id.as_deref()),
            (Some(25.0), Some("o-1"))
        );
        let search = event(
            r#"{"type":"track","event":"Products Searched","userId":"u","properties":{"query":"blue roses"}}"#,
        );
        assert_eq!(
            search.properties.unwrap().search_query.as_deref(),
            Some("blue roses")
        );
        let page = event(
            r#"{"type":"page","name":"Pricing","userId":"u","properties":{"path":"/pricing"}}"#,
        );
        assert_eq!(page.r#type, pb::EventType::PageView as i32);
        assert_eq!(page.properties.unwrap().page.as_deref(), Some("/pricing"));
        let screen = event(r#"{"type":"screen","name":"Home","userId":"u"}"#);
        assert_eq!(screen.properties.unwrap().page.as_deref(), Some("Home"));
    }

    #[test]
    fn identify_and_alias_merge_when_they_name_both_people() {
        assert_eq!(
            read(
                r#"{"userId":"u","anonymousId":"a","traits":{}}"#,
                Some(Call::Identify)
            ),
            Ok(Action::Merge {
                anonymous_id: "a".into(),
                user_id: "u".into()
            })
        );
        assert_eq!(
            read(r#"{"userId":"u"}"#, Some(Call::Identify)),
            Ok(Action::Ignore {
                call: Call::Identify,
                name: None
            })
        );
        assert_eq!(
            read(r#"{"type":"alias","previousId":"a","userId":"u"}"#, None),
            Ok(Action::Merge {
                anonymous_id: "a".into(),
                user_id: "u".into()
            })
        );
        assert_eq!(
            read(r#"{"type":"alias","userId":"u"}"#, None)
                .unwrap_err()
                .field,
            "previousId"
        );
    }

    #[test]
    fn clock_skew_is_corrected_as_segment_does() {
        // The device's clock is 10 minutes fast: it sent at 10:10 (its time) what it saw
        // at 10:05 (its time); the server received it at 10:00.
        let json = r#"{"type":"track","event":"Email Opened","userId":"u",
            "originalTimestamp":"2026-03-02T10:05:00Z","sentAt":"2026-03-02T10:10:00.000Z"}"#;
        assert_eq!(event(json).event_time, Some(at_ms("2026-03-02T09:55:00Z")));
        // The batch's sentAt serves messages without their own.
        let msg: Map<String, Value> = serde_json::from_str(
            r#"{"type":"page","userId":"u","originalTimestamp":"2026-03-02T10:05:00+00:00"}"#,
        )
        .unwrap();
        let sent = Value::from("2026-03-02T10:06:00Z");
        let Ok(Action::Track { event: e, .. }) = message(&msg, None, "", Some(&sent), RECEIVED)
        else {
            panic!()
        };
        assert_eq!(e.event_time, Some(at_ms("2026-03-02T09:59:00Z")));
        // An explicit timestamp is taken as it is; no time at all is the receipt.
        let explicit = r#"{"type":"page","userId":"u","timestamp":"2026-03-01T08:00:00",
            "originalTimestamp":"2026-03-02T10:05:00Z","sentAt":"2026-03-02T10:10:00Z"}"#;
        assert_eq!(
            event(explicit).event_time,
            Some(at_ms("2026-03-01T08:00:00Z"))
        );
        assert_eq!(
            event(r#"{"type":"page","userId":"u"}"#).event_time,
            Some(convert::timestamp(RECEIVED))
        );
        let bad = read(
            r#"{"type":"page","userId":"u","timestamp":"yesterday"}"#,
            None,
        );
        assert_eq!(bad.unwrap_err().field, "timestamp");
    }

    #[test]
    fn a_message_without_an_id_gets_one_from_its_bytes() {
        let a = event(r#"{"type":"page","userId":"u"}"#).event_id;
        let b = event(r#"{"type":"page","userId":"u"}"#).event_id;
        let c = event(r#"{"type":"page","userId":"v"}"#).event_id;
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.len() <= crate::event::MAX_EVENT_ID_BYTES);
    }

    #[test]
    fn bad_fields_are_named() {
        for (json, field, reason) in [
            (
                r#"{"type":"bogus","userId":"u"}"#,
                "type",
                Reason::UnknownEventType,
            ),
            (r#"{"userId":"u"}"#, "type", Reason::Missing),
            (r#"{"type":"track","userId":"u"}"#, "event", Reason::Missing),
            (
                r#"{"type":"track","event":"Product Added","userId":"u","properties":{"quantity":1.5}}"#,
                "properties.quantity",
                Reason::OutOfRange,
            ),
            (
                r#"{"type":"track","event":"Product Added","userId":"u","properties":{"price":"cheap"}}"#,
                "properties.price",
                Reason::Undecodable,
            ),
            (
                r#"{"type":"page","userId":{"a":1}}"#,
                "userId",
                Reason::Undecodable,
            ),
            (r#"{"type":"page","userId":""}"#, "userId", Reason::Missing),
            (
                r#"{"type":"page","userId":"u","properties":[]}"#,
                "properties",
                Reason::Undecodable,
            ),
        ] {
            let e = read(json, None).unwrap_err();
            assert_eq!((e.field.as_str(), e.reason), (field, reason), "{json}");
        }
    }

    #[test]
    fn track_refusals_are_renamed_to_segment_fields() {
        let renames = [
            ("properties.order_value", "properties.total"),
            ("event_time", "originalTimestamp"),
            ("user_id", "userId"),
        ];
        assert_eq!(
            renamed("properties.order_value", &renames),
            "properties.total"
        );
        assert_eq!(renamed("event_time", &renames), "originalTimestamp");
        assert_eq!(renamed("user_id", &renames), "userId");
        assert_eq!(renamed("properties.price", &renames), "properties.price");
        assert_eq!(at("batch[2]", "userId"), "batch[2].userId");
        assert_eq!(at("", "userId"), "userId");
        assert_eq!(at("batch[2]", ""), "batch[2]");
    }

    #[test]
    fn write_keys_keep_digests_and_name_lines_not_keys() {
        let hashed = hex::encode(digest("second"));
        let keys = WriteKeys::parse(&format!("# keys\nfirst\n\nsha256:{hashed}\n")).unwrap();
        assert!(keys.admits("first") && keys.admits("second"));
        assert!(!keys.admits("third") && !keys.admits(""));
        assert!(!format!("{keys:?}").contains("first"));
        let err = WriteKeys::parse("ok\nse:cret\nsha256:12\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("line 3"), "{err}");
        assert!(!err.contains("se:cret"), "{err}");
        assert!(WriteKeys::parse("# none\n").is_err());
    }

    #[test]
    fn ignored_names_are_bounded() {
        let names = IgnoredNames::default();
        for i in 0..MAX_IGNORED_NAMES {
            assert_eq!(names.label(&format!("e{i}")), format!("e{i}"));
        }
        assert_eq!(names.label("one too many"), "other");
        assert_eq!(names.label("e0"), "e0");
        assert_eq!(names.label(&"x".repeat(65)), "other");
    }

    #[test]
    fn overload_and_outages_say_when_to_retry() {
        let overloaded = api_error(ApiError::Engine(EngineError::Overloaded {
            retry_after: std::time::Duration::from_millis(1500),
        }));
        assert_eq!(overloaded.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(overloaded.headers()[header::RETRY_AFTER], "2");
        // Whole seconds, at least one: "0" would tell an SDK to retry at once.
        let soon = api_error(ApiError::Engine(EngineError::Overloaded {
            retry_after: std::time::Duration::ZERO,
        }));
        assert_eq!(soon.headers()[header::RETRY_AFTER], "1");
        let stopping = api_error(ApiError::Engine(EngineError::ShuttingDown));
        assert_eq!(stopping.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(stopping.headers()[header::RETRY_AFTER], "1");
        let defect = api_error(ApiError::Engine(EngineError::Panicked));
        assert_eq!(defect.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(defect.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn basic_auth_gives_the_user_name() {
        let mut headers = HeaderMap::new();
        assert_eq!(basic_user(&headers), None);
        let b64 = base64::engine::general_purpose::STANDARD.encode("key-1:");
        headers.insert(
            header::AUTHORIZATION,
            format!("Basic {b64}").parse().unwrap(),
        );
        assert_eq!(basic_user(&headers), Some(Some("key-1".into())));
        headers.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert_eq!(basic_user(&headers), Some(None));
    }
}
