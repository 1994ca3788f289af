//! The `[kafka]` configuration and the librdkafka client settings the Kafka source
//! ([`crate::api::kafka`]) and sink ([`crate::delivery::kafka`]) share.
//!
//! Kafka is off unless `kafka.brokers` is set; then `kafka.source.topic` turns the source
//! on and `kafka.sink.topic` the sink, each on its own.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use serde::Deserialize;

/// `[kafka]`.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// The bootstrap servers, `host:port,host:port`; empty: no Kafka.
    pub brokers: String,
    /// Further librdkafka properties for both clients, as librdkafka names them
    /// (`"socket.keepalive.enable" = "true"`). The ones that carry Nudge's promises
    /// (offset commits, idempotence, acks) are set by Nudge and cannot be overridden.
    pub properties: BTreeMap<String, String>,
    pub source: SourceConfig,
    pub sink: SinkConfig,
}

/// `[kafka.source]`: a topic of events to track.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// The topic to consume; empty: no source.
    pub topic: String,
    /// The consumer group; nodes of one group share the topic's partitions.
    pub group_id: String,
    /// What each message's value holds ([`SourceFormat`]).
    pub format: SourceFormat,
    /// Where messages Nudge refuses go, with the reason in headers; empty:
    /// `<topic>.dead-letter`.
    pub dead_letter_topic: String,
    /// At most this many messages are tracked as one batch (at most
    /// `server.max_batch_events`).
    pub max_batch: usize,
    /// Acknowledged offsets are committed this often, in milliseconds (and when a
    /// partition is revoked or the server stops).
    pub commit_interval_ms: u64,
}

/// What a source message's value is.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// A `nudge.v1.Event` in the protobuf JSON mapping (`event_id` or `eventId`, `type`
    /// as `"EVENT_TYPE_PRODUCT_VIEW"` or its number, `eventTime` in RFC 3339).
    Nudge,
    /// One Segment call (track, identify, page, screen, alias, group), read as the HTTP
    /// API reads a message of `/v1/batch`.
    Segment,
}

/// `[kafka.sink]`: delivered triggers, published as CloudEvents.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// The topic to publish to; empty: no sink.
    pub topic: String,
    /// The sink's name as a delivery endpoint: its outbox cursor, its dead letters
    /// (`ListDeadLetters`), the `endpoint` label of `nudge_outbox_depth`. Unique among the
    /// webhook endpoints' names.
    pub name: String,
    /// Only these rules' triggers; all when empty.
    pub rules: Vec<String>,
    /// The CloudEvents `source` attribute.
    pub cloudevents_source: String,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            topic: String::new(),
            group_id: "nudge".to_owned(),
            format: SourceFormat::Nudge,
            dead_letter_topic: String::new(),
            max_batch: 500,
            commit_interval_ms: 1000,
        }
    }
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            topic: String::new(),
            name: "kafka".to_owned(),
            rules: Vec::new(),
            cloudevents_source: "/nudge".to_owned(),
        }
    }
}

/// A property value that could be a credential: shown as `<redacted>` in `Debug` (what
/// `nudge check-config` and logs print).
fn secret(key: &str) -> bool {
    [
        "password",
        "secret",
        "sasl.oauthbearer.config",
        "ssl.key.pem",
        "ssl_key",
    ]
    .iter()
    .any(|word| key.contains(word))
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if secret(k) { "<redacted>" } else { v.as_str() },
                )
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("properties", &properties)
            .field("source", &self.source)
            .field("sink", &self.sink)
            .finish()
    }
}

/// Properties Nudge sets itself: overriding them would break what the source and sink
/// promise.
const OWN_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.commit.interval.ms",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "isolation.level",
];

impl KafkaConfig {
    /// Whether the source runs.
    pub fn source_on(&self) -> bool {
        !self.brokers.is_empty() && !self.source.topic.is_empty()
    }

    /// Whether the sink runs.
    pub fn sink_on(&self) -> bool {
        !self.brokers.is_empty() && !self.sink.topic.is_empty()
    }

    /// The source's dead-letter topic.
    pub fn dead_letter_topic(&self) -> String {
        match self.source.dead_letter_topic.as_str() {
            "" => format!("{}.dead-letter", self.source.topic),
            topic => topic.to_owned(),
        }
    }

    /// Every problem with `[kafka]`; `max_batch_events` is `server.max_batch_events`.
    pub fn problems(&self, max_batch_events: usize) -> Vec<String> {
        let mut problems = Vec::new();
        let wants = !self.source.topic.is_empty() || !self.sink.topic.is_empty();
        if self.brokers.is_empty() && wants {
            problems.push("kafka.brokers must be set for kafka.source or kafka.sink".into());
        }
        for key in self.properties.keys() {
            if OWN_PROPERTIES.contains(&key.as_str()) {
                problems.push(format!(
                    "kafka.properties.{key:?} is set by Nudge (offsets, idempotence and acks \
                     carry its promises); use kafka.brokers or kafka.source settings instead"
                ));
            }
        }
        let s = &self.source;
        if !s.topic.is_empty() {
            if s.group_id.is_empty() {
                problems.push("kafka.source.group_id must not be empty".into());
            }
            if !(1..=max_batch_events).contains(&s.max_batch) {
                problems.push(format!(
                    "kafka.source.max_batch must be between 1 and server.max_batch_events ({max_batch_events})"
                ));
            }
            if !(10..=60_000).contains(&s.commit_interval_ms) {
                problems
                    .push("kafka.source.commit_interval_ms must be between 10 and 60000".into());
            }
            if self.dead_letter_topic() == s.topic {
                problems.push("kafka.source.dead_letter_topic must not be the source topic".into());
            }
        }
        let k = &self.sink;
        if !k.topic.is_empty() {
            if k.name.is_empty() {
                problems.push("kafka.sink.name must not be empty".into());
            }
            if k.cloudevents_source.is_empty() {
                problems.push(
                    "kafka.sink.cloudevents_source must not be empty (CloudEvents requires a source)"
                        .into(),
                );
            }
            if !s.topic.is_empty() && k.topic == s.topic {
                problems.push("kafka.sink.topic must not be the source topic".into());
            }
        }
        // A client built from these settings is how librdkafka checks the properties.
        if !self.brokers.is_empty() && problems.is_empty() {
            if let Err(e) = self.client().create::<rdkafka::producer::BaseProducer>() {
                problems.push(format!("kafka: {e}"));
            }
        }
        problems
    }

    /// The settings both clients start from: the brokers and the operator's properties.
    pub fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "nudge");
        if let Some(id) = self.properties.get("client.id") {
            config.set("client.id", id);
        }
        config
    }
}

/// The settings of an idempotent producer acknowledged by all in-sync replicas: a
/// message it reports delivered is on every replica in sync, and its own retries neither
/// duplicate nor reorder what it sends.
pub fn producer(config: &KafkaConfig) -> ClientConfig {
    let mut producer = config.client();
    producer
        .set("enable.idempotence", "true")
        .set("acks", "all");
    producer
}

/// A client context that logs librdkafka's messages and errors through `tracing`, under
/// the client's role.
pub struct Logged(pub &'static str);

impl rdkafka::ClientContext for Logged {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(client = self.0, facility, "librdkafka: {message}")
            }
            L::Warning => tracing::warn!(client = self.0, facility, "librdkafka: {message}"),
            L::Notice | L::Info => {
                tracing::info!(client = self.0, facility, "librdkafka: {message}")
            }
            L::Debug => tracing::debug!(client = self.0, facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        // Broker connections that drop are retried by librdkafka; they are warnings.
        tracing::warn!(client = self.0, %error, "librdkafka: {reason}");
    }
}

impl rdkafka::consumer::ConsumerContext for Logged {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_among_the_properties_is_never_printed() {
        let mut config = KafkaConfig::default();
        config
            .properties
            .insert("sasl.password".into(), "hunter2-secret".into());
        config
            .properties
            .insert("socket.keepalive.enable".into(), "true".into());
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("socket.keepalive.enable"), "{shown}");
    }

    #[test]
    fn settings_that_carry_the_promises_cannot_be_overridden() {
        let mut config = KafkaConfig {
            brokers: "127.0.0.1:9".into(),
            ..KafkaConfig::default()
        };
        config.source.topic = "events".into();
        config
            .properties
            .insert("enable.auto.commit".into(), "true".into());
        let problems = config.problems(1000);
        assert!(
            problems.iter().any(|p| p.contains("enable.auto.commit")),
            "{problems:?}"
        );
        config.properties.clear();
        config.source.max_batch = 5000;
        let problems = config.problems(1000);
        assert!(
            problems.iter().any(|p| p.contains("max_batch")),
            "{problems:?}"
        );
        config.source.max_batch = 500;
        assert_eq!(config.problems(1000), Vec::<String>::new());
        config
            .properties
            .insert("no.such.property".into(), "1".into());
        let problems = config.problems(1000);
        assert!(
            problems.iter().any(|p| p.contains("no.such.property")),
            "{problems:?}"
        );
    }
}
