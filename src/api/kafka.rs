//! The Kafka source: a topic of events, tracked as `Track` tracks them.
//!
//! It lives in `api/` for the reason the HTTP API does: it is another protocol's edge
//! onto the same path. Each message becomes the `pb::Event` a `Track` request would carry
//! (or, in Segment's shape, a merge) and goes through [`NudgeApi::track_batch`] — the same
//! validation, pseudonymization, engine and durable acknowledgement.
//!
//! What it promises:
//! - **An offset is committed only after its message is taken care of**: tracked and
//!   durable, a duplicate, merged, ignored, or refused and stored in the dead-letter topic
//!   (acknowledged by all in-sync replicas). Offsets are stored after each batch and
//!   committed every `commit_interval_ms`, at a rebalance and at shutdown, so a crash
//!   re-reads at most what came after the last commit, and the event ids (Segment's
//!   `messageId`) make that re-reading change nothing: exactly once in effect.
//! - **A message Nudge refuses is a dead letter, not a stall**: its bytes and key go to
//!   the dead-letter topic with the reason in headers (`nudge-error-field`,
//!   `nudge-error-reason`, `nudge-error-message`, and where it came from:
//!   `nudge-source-topic`, `-partition`, `-offset`). A batch the dead-letter topic does
//!   not take is tried again whole, so a dead letter may be written twice (the source
//!   headers tell them apart).
//! - **Trouble downstream holds the topic back instead of skipping it**: while the store
//!   fails or the engine is shutting down, the batch is tried again after a backoff and no
//!   offset moves past it.
//! - The messages of a partition are applied in their order (batches one after another);
//!   a producer keying messages by person keeps each person's events in order.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures_util::FutureExt as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::{Map, Value};

use super::segment::{self, Action, IgnoredNames, Renames};
use super::{ApiError, NudgeApi};
use crate::engine::{Admit, EngineError};
use crate::event::{FieldError, Reason};
use crate::kafka::{KafkaConfig, SourceFormat};
use crate::pb;
use crate::time::Time;

/// What `nudge_events_total{source}` says for events that came this way, and the `rpc`
/// label of their refusals.
const SOURCE: &str = "kafka";
/// The first wait after a failed batch; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Empty polls in a row that end a batch (see `run`).
const EMPTY_POLLS: u32 = 16;

/// Consumes `config.source.topic` until `stop` resolves; then finishes the batch in hand
/// and commits what was taken care of. Returns an error only when the clients cannot be
/// built (a bad setting): broker trouble is retried, and logged.
pub async fn run(
    api: NudgeApi,
    config: KafkaConfig,
    stop: impl Future<Output = ()>,
) -> Result<(), rdkafka::error::KafkaError> {
    let source = &config.source;
    let mut consumer_config = config.client();
    consumer_config
        .set("group.id", &source.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.commit.interval.ms",
            source.commit_interval_ms.to_string(),
        );
    if !config.properties.contains_key("auto.offset.reset") {
        // A new group reads the topic from its start: nothing already there is skipped.
        consumer_config.set("auto.offset.reset", "earliest");
    }
    let consumer: StreamConsumer<crate::kafka::Logged> =
        consumer_config.create_with_context(crate::kafka::Logged("kafka source"))?;
    let dead_letters: FutureProducer<crate::kafka::Logged> = crate::kafka::producer(&config)
        .create_with_context(crate::kafka::Logged("kafka dead letters"))?;
    consumer.subscribe(&[&source.topic])?;
    tracing::info!(topic = %source.topic, group = %source.group_id, dead_letters = %config.dead_letter_topic(), "consuming events from Kafka");
    let reader = Reader {
        api,
        format: source.format,
        dead_letters,
        dead_letter_topic: config.dead_letter_topic(),
        ignored: IgnoredNames::default(),
    };
    tokio::pin!(stop);
    loop {
        let first = tokio::select! {
            _ = &mut stop => break,
            received = consumer.recv() => received,
        };
        let first = match first {
            Ok(m) => m.detach(),
            Err(e) => {
                // librdkafka retries by itself; this is a broker or partition problem
                // reported for the log.
                tracing::warn!(error = %e, "kafka source: receiving failed");
                continue;
            }
        };
        let mut batch = vec![first];
        // What librdkafka already holds joins the batch; nothing is waited for. A poll
        // that serves one of librdkafka's other events (a fetch's end, statistics) comes
        // back empty-handed with messages still queued, so only a run of empty polls
        // ends the batch.
        let mut empty = 0;
        while batch.len() < source.max_batch && empty < EMPTY_POLLS {
            match consumer.recv().now_or_never() {
                Some(Ok(m)) => {
                    batch.push(m.detach());
                    empty = 0;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka source: receiving failed");
                    break;
                }
                None => empty += 1,
            }
        }
        let mut backoff = FIRST_BACKOFF;
        loop {
            // A dead letter waits out brokers that are down; stopping does not. What of
            // the batch was applied is a duplicate when it is read again.
            let taken = tokio::select! {
                _ = &mut stop => return commit(&consumer),
                taken = reader.take(&batch) => taken,
            };
            match taken {
                Ok(()) => break,
                Err(Retry::Stop) => return commit(&consumer),
                Err(Retry::After { reason, after }) => {
                    reader
                        .api
                        .metrics
                        .kafka_retries
                        .with_label_values(&[reason])
                        .inc();
                    let after = after.unwrap_or(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    tokio::select! {
                        // Nothing of the batch is stored as taken care of.
                        _ = &mut stop => return commit(&consumer),
                        _ = tokio::time::sleep(after) => {}
                    }
                }
            }
        }
        for m in &batch {
            // Fails for a partition revoked meanwhile: its new owner reads the message
            // again, and the event id makes that change nothing.
            if let Err(e) = consumer.store_offset(m.topic(), m.partition(), m.offset()) {
                tracing::debug!(error = %e, partition = m.partition(), "kafka source: offset not stored");
            }
        }
    }
    commit(&consumer)
}

/// Commits the stored offsets at shutdown (the periodic commit may not have run since
/// the last batch).
fn commit(
    consumer: &StreamConsumer<crate::kafka::Logged>,
) -> Result<(), rdkafka::error::KafkaError> {
    match consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        Ok(()) => {}
        // Nothing stored since the last commit.
        Err(rdkafka::error::KafkaError::ConsumerCommit(
            rdkafka::types::RDKafkaErrorCode::NoOffset,
        )) => {}
        Err(e) => {
            tracing::warn!(error = %e, "kafka source: the last commit failed; what followed the one before it is read again")
        }
    }
    Ok(())
}

/// Why a batch is not taken care of yet.
enum Retry {
    /// Try it again after `after` (or the backoff); `reason` labels the metric.
    After {
        reason: &'static str,
        after: Option<Duration>,
    },
    /// The server is stopping: leave it for the next start.
    Stop,
}

impl From<ApiError> for Retry {
    fn from(e: ApiError) -> Retry {
        match e {
            ApiError::Engine(EngineError::ShuttingDown) => Retry::Stop,
            ApiError::Engine(EngineError::Overloaded { retry_after }) => Retry::After {
                reason: "overloaded",
                after: Some(retry_after),
            },
            ApiError::Engine(EngineError::Store(_)) | ApiError::Store(_) => {
                tracing::warn!(error = %e, "kafka source: the store failed; the batch is tried again");
                Retry::After {
                    reason: "store",
                    after: None,
                }
            }
            e => {
                tracing::warn!(error = %e, "kafka source: the batch failed; it is tried again");
                Retry::After {
                    reason: "other",
                    after: None,
                }
            }
        }
    }
}

/// A message refused, as its dead letter says it.
struct Refusal {
    field: String,
    reason: String,
    message: String,
}

impl From<FieldError> for Refusal {
    fn from(e: FieldError) -> Refusal {
        Refusal {
            reason: e.reason.as_str().to_owned(),
            message: e.to_string(),
            field: e.field,
        }
    }
}

struct Reader {
    api: NudgeApi,
    format: SourceFormat,
    dead_letters: FutureProducer<crate::kafka::Logged>,
    dead_letter_topic: String,
    ignored: IgnoredNames,
}

/// What one message asks of Nudge.
enum Item {
    Track(Box<pb::Event>, Renames),
    Merge {
        anonymous_id: String,
        user_id: String,
    },
    Ignore,
    Refused(Refusal),
}

impl Reader {
    /// Takes care of every message of `batch`, in order, or of none of them as far as the
    /// offsets go (what was applied before a failure is a duplicate when tried again).
    async fn take(&self, batch: &[OwnedMessage]) -> Result<(), Retry> {
        let now = self.api.clock.now();
        let mut items: Vec<Item> = batch.iter().map(|m| self.read(m, now)).collect();
        let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
        // Runs of events are tracked as one batch; a merge between them on its own.
        let mut i = 0;
        while i < items.len() {
            match &items[i] {
                Item::Track(..) => {
                    let end = items[i..]
                        .iter()
                        .position(|item| !matches!(item, Item::Track(..)))
                        .map_or(items.len(), |n| i + n);
                    self.track(&mut items[i..end], &mut outcomes).await?;
                    i = end;
                }
                Item::Merge {
                    anonymous_id,
                    user_id,
                } => {
                    let merged = self
                        .api
                        .merge_ids(SOURCE, anonymous_id.clone(), user_id.clone())
                        .await?;
                    items[i] = match merged {
                        Ok(()) => {
                            *outcomes.entry("merged").or_default() += 1;
                            Item::Ignore
                        }
                        Err(e) => Item::Refused(e.into()),
                    };
                    i += 1;
                }
                Item::Ignore | Item::Refused(_) => i += 1,
            }
        }
        let mut sends = Vec::new();
        for (m, item) in batch.iter().zip(&items) {
            if let Item::Refused(refusal) = item {
                sends.push(self.dead_letter(m, refusal));
            }
        }
        let dead = sends.len() as u64;
        for result in futures_util::future::join_all(sends).await {
            if let Err((e, _)) = result {
                tracing::warn!(error = %e, topic = %self.dead_letter_topic, "kafka source: the dead-letter topic did not take a message; the batch is tried again");
                return Err(Retry::After {
                    reason: "dead_letter_topic",
                    after: None,
                });
            }
        }
        *outcomes.entry("dead_letter").or_default() += dead;
        for (outcome, n) in outcomes {
            self.api
                .metrics
                .kafka_messages
                .with_label_values(&[outcome])
                .inc_by(n);
        }
        Ok(())
    }

    /// Reads one message into what it asks.
    fn read(&self, m: &OwnedMessage, now: Time) -> Item {
        let bytes = m.payload().unwrap_or_default();
        let refused = |e: FieldError| {
            self.api.count_refusal(SOURCE, &e);
            self.api
                .metrics
                .events
                .with_label_values(&[SOURCE, "unknown", "rejected"])
                .inc();
            Item::Refused(e.into())
        };
        let limit = match self.format {
            SourceFormat::Nudge => self.api.limits.max_message_bytes,
            SourceFormat::Segment => segment::MAX_MESSAGE_BYTES,
        };
        if bytes.len() > limit {
            return refused(FieldError::new(
                "",
                Reason::MessageTooLarge,
                format!("is {} bytes; a message may be at most {limit}", bytes.len()),
            ));
        }
        let Ok(text) = std::str::from_utf8(bytes) else {
            return refused(FieldError::new(
                "",
                Reason::Undecodable,
                "is not UTF-8 text",
            ));
        };
        let object = match serde_json::from_str::<Map<String, Value>>(text) {
            Ok(o) => o,
            Err(e) => {
                return refused(FieldError::new(
                    "",
                    Reason::Undecodable,
                    format!("is not a JSON object: {e}"),
                ))
            }
        };
        // The time the broker has for the message stands in for the time it arrived:
        // a consumer behind by an hour must not move the events an hour.
        let arrived = m
            .timestamp()
            .to_millis()
            .map_or(now, |ms| Time(ms.min(now.0)));
        match self.format {
            SourceFormat::Nudge => match nudge_event(&object, arrived) {
                Ok(event) => Item::Track(Box::new(event), Vec::new()),
                Err(e) => refused(e),
            },
            SourceFormat::Segment => match segment::message(&object, None, text, None, arrived) {
                Ok(Action::Track { event, renames }) => Item::Track(event, renames),
                Ok(Action::Merge {
                    anonymous_id,
                    user_id,
                }) => Item::Merge {
                    anonymous_id,
                    user_id,
                },
                Ok(Action::Ignore { call, name }) => {
                    self.ignored.count(&self.api.metrics, SOURCE, call, name);
                    Item::Ignore
                }
                Err(e) => refused(e),
            },
        }
    }

    /// Tracks a run of events; the ones refused become [`Item::Refused`], the others
    /// [`Item::Ignore`] (taken care of).
    async fn track(
        &self,
        run: &mut [Item],
        outcomes: &mut BTreeMap<&'static str, u64>,
    ) -> Result<(), ApiError> {
        let mut renames = Vec::with_capacity(run.len());
        let mut events = Vec::with_capacity(run.len());
        for item in run.iter() {
            if let Item::Track(event, names) = item {
                events.push(pb::Event::clone(event));
                renames.push(names.clone());
            }
        }
        let results = self
            .api
            .track_batch(SOURCE, SOURCE, events, Admit::Flow)
            .await?;
        for ((result, names), item) in results.into_iter().zip(renames).zip(run.iter_mut()) {
            *item = match (pb::EventStatus::try_from(result.status), result.error) {
                (_, Some(error)) => {
                    // Track names the event `events[i]`; a dead letter is one message.
                    let field = error.field.split_once('.').map_or("", |(_, rest)| rest);
                    let field = segment::renamed(field, &names);
                    Item::Refused(Refusal {
                        message: format!("{field}: {}", error.message),
                        field,
                        reason: error.reason,
                    })
                }
                (Ok(pb::EventStatus::Duplicate), None) => {
                    *outcomes.entry("duplicate").or_default() += 1;
                    Item::Ignore
                }
                (_, None) => {
                    *outcomes.entry("tracked").or_default() += 1;
                    Item::Ignore
                }
            };
        }
        Ok(())
    }

    /// Sends a refused message to the dead-letter topic; resolves when all in-sync
    /// replicas have it.
    fn dead_letter<'a>(
        &'a self,
        m: &'a OwnedMessage,
        refusal: &'a Refusal,
    ) -> impl Future<Output = rdkafka::producer::future_producer::OwnedDeliveryResult> + 'a {
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        let mut headers = OwnedHeaders::new();
        // The original headers first, then Nudge's, which a reader of the last value of
        // each name finds.
        if let Some(original) = m.headers() {
            for h in original.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        for (key, value) in [
            ("nudge-error-field", refusal.field.as_str()),
            ("nudge-error-reason", refusal.reason.as_str()),
            ("nudge-error-message", refusal.message.as_str()),
            ("nudge-source-topic", m.topic()),
            ("nudge-source-partition", partition.as_str()),
            ("nudge-source-offset", offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        async move {
            let mut record = FutureRecord::to(&self.dead_letter_topic)
                .payload(m.payload().unwrap_or_default())
                .headers(headers);
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            self.dead_letters.send(record, Timeout::Never).await
        }
    }
}

/// The names of a `nudge.v1.Event` field in the protobuf JSON mapping: the proto name and
/// the lowerCamelCase JSON name (parsers accept both).
type Names = (&'static str, &'static str);

/// An object read field by field; what is left unread at the end is not a field.
struct Fields<'a> {
    object: &'a Map<String, Value>,
    read: Vec<&'a str>,
    prefix: &'static str,
}

impl<'a> Fields<'a> {
    fn new(object: &'a Map<String, Value>, prefix: &'static str) -> Fields<'a> {
        Fields {
            object,
            read: Vec::new(),
            prefix,
        }
    }

    fn at(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The field's value under either name; null is absent, as protobuf JSON has it.
    fn get(&mut self, (proto, json): Names) -> Result<Option<&'a Value>, FieldError> {
        let mut found = None;
        for name in [proto, json] {
            if let Some((key, value)) = self.object.get_key_value(name) {
                if found.is_some() && proto != json {
                    return Err(FieldError::new(
                        self.at(proto),
                        Reason::Conflicting,
                        format!("is given both as {proto} and as {json}"),
                    ));
                }
                self.read.push(key.as_str());
                found = Some(value);
            }
            if proto == json {
                break;
            }
        }
        Ok(found.filter(|v| !v.is_null()))
    }

    fn string(&mut self, names: Names) -> Result<Option<String>, FieldError> {
        match self.get(names)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(FieldError::new(
                self.at(names.0),
                Reason::Undecodable,
                "must be a string",
            )),
        }
    }

    fn number(&mut self, names: Names) -> Result<Option<f64>, FieldError> {
        match self.get(names)? {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(_) => Err(FieldError::new(
                self.at(names.0),
                Reason::Undecodable,
                "must be a number",
            )),
        }
    }

    fn object(&mut self, names: Names) -> Result<Option<&'a Map<String, Value>>, FieldError> {
        match self.get(names)? {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(_) => Err(FieldError::new(
                self.at(names.0),
                Reason::Undecodable,
                "must be an object",
            )),
        }
    }

    /// Refuses a key that is no field.
    fn finish(self, message: &str) -> Result<(), FieldError> {
        match self
            .object
            .keys()
            .find(|k| !self.read.contains(&k.as_str()))
        {
            None => Ok(()),
            Some(key) => Err(FieldError::new(
                format!(
                    "{}{}",
                    self.prefix,
                    key.chars().take(128).collect::<String>()
                ),
                Reason::Undecodable,
                format!("is not a field of {message}"),
            )),
        }
    }
}

/// A `nudge.v1.Event` in the protobuf JSON mapping. Without `event_time`, the event
/// happened when the broker got it (`arrived`).
fn nudge_event(object: &Map<String, Value>, arrived: Time) -> Result<pb::Event, FieldError> {
    let mut f = Fields::new(object, "");
    let event_id = f.string(("event_id", "eventId"))?.unwrap_or_default();
    let user_id = f.string(("user_id", "userId"))?.unwrap_or_default();
    let anonymous_id = f
        .string(("anonymous_id", "anonymousId"))?
        .unwrap_or_default();
    let r#type = match f.get(("type", "type"))? {
        None => 0,
        Some(Value::String(name)) => pb::EventType::from_str_name(name)
            .map(i32::from)
            .ok_or_else(|| {
                FieldError::new(
                    "type",
                    Reason::UnknownEventType,
                    format!(
                        "{} is not an EventType; one of EVENT_TYPE_PAGE_VIEW, EVENT_TYPE_PRODUCT_VIEW, …",
                        crate::event::quoted(name)
                    ),
                )
            })?,
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| {
                FieldError::new("type", Reason::UnknownEventType, "is not an EventType number")
            })?,
        Some(_) => {
            return Err(FieldError::new(
                "type",
                Reason::Undecodable,
                "must be an EventType name or number",
            ))
        }
    };
    let event_time = match f.string(("event_time", "eventTime"))? {
        Some(text) => text
            .parse::<jiff::Timestamp>()
            .map_err(|_| {
                FieldError::new(
                    "event_time",
                    Reason::Undecodable,
                    format!(
                        "{} is not an RFC 3339 time such as 2026-03-02T10:00:00Z",
                        crate::event::quoted(&text)
                    ),
                )
            })
            .map(|t| super::convert::timestamp(Time(t.as_millisecond())))?,
        None => super::convert::timestamp(arrived),
    };
    let properties = f
        .object(("properties", "properties"))?
        .map(properties)
        .transpose()?;
    let attributes = match f.object(("attributes", "attributes"))? {
        None => Default::default(),
        Some(o) => o
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(FieldError::new(
                    format!("attributes.{}", k.chars().take(128).collect::<String>()),
                    Reason::Undecodable,
                    "must be a string",
                )),
            })
            .collect::<Result<_, _>>()?,
    };
    f.finish("nudge.v1.Event")?;
    Ok(pb::Event {
        event_id,
        user_id,
        anonymous_id,
        r#type,
        event_time: Some(event_time),
        properties,
        attributes,
    })
}

fn properties(object: &Map<String, Value>) -> Result<pb::EventProperties, FieldError> {
    let mut f = Fields::new(object, "properties.");
    let quantity = match f.get(("quantity", "quantity"))? {
        None => None,
        Some(Value::Number(n)) => Some(n.as_u64().and_then(|q| u32::try_from(q).ok()).ok_or_else(
            || {
                FieldError::new(
                    "properties.quantity",
                    Reason::OutOfRange,
                    "must be a whole number from 1 to 10000",
                )
            },
        )?),
        Some(_) => {
            return Err(FieldError::new(
                "properties.quantity",
                Reason::Undecodable,
                "must be a number",
            ))
        }
    };
    let properties = pb::EventProperties {
        product_id: f.string(("product_id", "productId"))?,
        category: f.string(("category", "category"))?,
        price: f.number(("price", "price"))?,
        quantity,
        order_value: f.number(("order_value", "orderValue"))?,
        page: f.string(("page", "page"))?,
        search_query: f.string(("search_query", "searchQuery"))?,
        dwell_seconds: f.number(("dwell_seconds", "dwellSeconds"))?,
        order_id: f.string(("order_id", "orderId"))?,
        campaign_id: f.string(("campaign_id", "campaignId"))?,
    };
    f.finish("nudge.v1.EventProperties")?;
    Ok(properties)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<pb::Event, FieldError> {
        let object: Map<String, Value> = serde_json::from_str(json).unwrap();
        nudge_event(&object, Time(1_700_000_000_000))
    }

    #[test]
    fn an_event_reads_in_both_spellings_of_the_protobuf_json_mapping() {
        let proto = read(
            r#"{"event_id":"e1","user_id":"u1","type":"EVENT_TYPE_ADD_TO_CART",
                "event_time":"2026-03-02T10:00:00Z",
                "properties":{"product_id":"p1","price":9.5,"quantity":2},
                "attributes":{"utm":"mail"}}"#,
        )
        .unwrap();
        let json = read(
            r#"{"eventId":"e1","userId":"u1","type":4,"eventTime":"2026-03-02T10:00:00Z",
                "properties":{"productId":"p1","price":9.5,"quantity":2},
                "attributes":{"utm":"mail"}}"#,
        )
        .unwrap();
        assert_eq!(proto, json);
        assert_eq!(proto.r#type, i32::from(pb::EventType::AddToCart));
        let props = proto.properties.unwrap();
        assert_eq!(props.product_id.as_deref(), Some("p1"));
        assert_eq!(props.quantity, Some(2));
        assert_eq!(proto.event_time.unwrap().seconds, 1_772_445_600);
    }

    #[test]
    fn an_event_without_a_time_happened_when_the_broker_got_it() {
        let e = read(r#"{"event_id":"e1","user_id":"u1","type":"EVENT_TYPE_PAGE_VIEW"}"#).unwrap();
        assert_eq!(e.event_time.unwrap().seconds, 1_700_000_000);
    }

    #[test]
    fn what_is_not_an_event_is_refused_naming_the_field() {
        let cases = [
            (r#"{"event_id":"e","typo":1}"#, "typo", Reason::Undecodable),
            (
                r#"{"event_id":"e","eventId":"e"}"#,
                "event_id",
                Reason::Conflicting,
            ),
            (
                r#"{"type":"PRODUCT_VIEW"}"#,
                "type",
                Reason::UnknownEventType,
            ),
            (r#"{"type":true}"#, "type", Reason::Undecodable),
            (
                r#"{"event_time":"yesterday"}"#,
                "event_time",
                Reason::Undecodable,
            ),
            (
                r#"{"properties":{"price":"9"}}"#,
                "properties.price",
                Reason::Undecodable,
            ),
            (
                r#"{"properties":{"quantity":-1}}"#,
                "properties.quantity",
                Reason::OutOfRange,
            ),
            (
                r#"{"properties":{"colour":"red"}}"#,
                "properties.colour",
                Reason::Undecodable,
            ),
            (
                r#"{"attributes":{"n":1}}"#,
                "attributes.n",
                Reason::Undecodable,
            ),
        ];
        for (json, field, reason) in cases {
            let e = read(json).expect_err(json);
            assert_eq!((e.field.as_str(), e.reason), (field, reason), "{json}: {e}");
        }
    }
}
