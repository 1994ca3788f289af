//! The Kafka sink: delivered triggers published to a topic, at least once, each a
//! CloudEvent in the Kafka protocol binding's binary mode.
//!
//! Each message's key is the person (user id, else anonymous id), so one person's
//! triggers land in one partition in order; the value is the trigger as JSON
//! (`content-type: application/json`); the CloudEvents attributes are `ce_` headers, with
//! `ce_id` the trigger id (as `webhook-id` is for webhooks), which consumers deduplicate
//! on. The producer is idempotent with `acks=all`: a trigger is delivered when every
//! in-sync replica has it.
//!
//! Like a webhook endpoint, the sink reads the outbox from its own durable cursor, which
//! moves only past triggers the brokers acknowledged (or that became dead letters: a
//! trigger the brokers refuse for good, such as one over `message.max.bytes`). Brokers
//! that are down hold the sink back, retried with backoff; nothing is skipped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::outbox::Outbox;
use super::webhook::{self, DeadLetter};
use crate::kafka::{KafkaConfig, Logged};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::trigger::Trigger;

/// Triggers sent at once, then waited for together.
const WINDOW: usize = 1000;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Publishes the outbox to `config.sink.topic` until `stop` resolves. Returns an error
/// only when the producer cannot be built (a bad setting).
pub async fn run(
    config: KafkaConfig,
    outbox: Arc<Outbox>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()>,
) -> Result<(), KafkaError> {
    let sink = &config.sink;
    let producer: FutureProducer<Logged> =
        crate::kafka::producer(&config).create_with_context(Logged("kafka sink"))?;
    let reader = webhook::consumer(&sink.name);
    let depth = metrics.outbox_depth.with_label_values(&[&sink.name]);
    let count = |result: &str, n: u64| {
        metrics
            .kafka_produced
            .with_label_values(&[result])
            .inc_by(n)
    };
    let mut changes = outbox.changes();
    let mut backoff = FIRST_BACKOFF;
    tracing::info!(topic = %sink.topic, endpoint = %sink.name, "publishing triggers to Kafka");
    tokio::pin!(stop);
    loop {
        let cursor = match store.cursor(&reader) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "kafka sink: reading its cursor failed");
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(MAX_BACKOFF) => continue,
                }
            }
        };
        depth.set(outbox.watermark().saturating_sub(cursor) as i64);
        // Marked seen before reading: a trigger written after the read wakes the wait.
        changes.borrow_and_update();
        let batch = match outbox.read(cursor, WINDOW) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, "kafka sink: reading the outbox failed");
                Vec::new()
            }
        };
        let Some(&(last, _)) = batch.last() else {
            tokio::select! {
                _ = &mut stop => break,
                changed = changes.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        let wanted: Vec<&(u64, Trigger)> = batch
            .iter()
            .filter(|(_, t)| sink.rules.is_empty() || sink.rules.contains(&t.rule))
            .collect();
        let sends = wanted.iter().map(|(_, t)| send(&producer, &config, t));
        // Sends wait out brokers that are down (up to librdkafka's message.timeout.ms);
        // stopping does not. What was in flight is sent again at the next start.
        let results = tokio::select! {
            _ = &mut stop => break,
            results = futures_util::future::join_all(sends) => results,
        };
        // The cursor moves to the first trigger not yet delivered; dead letters before it
        // are stored in the same write.
        let mut done_to = last;
        let mut dead = Vec::new();
        let mut delivered = 0;
        for ((seq, trigger), result) in wanted.iter().zip(results) {
            match result {
                Ok(()) => delivered += 1,
                Err(e) if permanent(&e) => {
                    tracing::error!(trigger_id = %trigger.trigger_id, error = %e, "kafka sink: the brokers refuse this trigger; stored as a dead letter");
                    let record = DeadLetter {
                        endpoint: sink.name.clone(),
                        seq: *seq,
                        attempts: 1,
                        last_error: e.to_string(),
                        at_ms: unix_millis(),
                        trigger: trigger.clone(),
                    };
                    dead.push((
                        *seq,
                        serde_json::to_vec(&record).expect("a dead letter encodes as JSON"),
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka sink: publishing failed; retrying");
                    done_to = seq - 1;
                    break;
                }
            }
        }
        dead.retain(|(seq, _)| *seq <= done_to);
        count("delivered", delivered);
        count("dead_letter", dead.len() as u64);
        if let Err(e) = store.advance_cursor(&reader, done_to, &dead) {
            tracing::error!(error = %e, "kafka sink: saving its cursor failed; what it covered is published again");
        }
        if done_to < last {
            count("retried", 1);
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        } else {
            backoff = FIRST_BACKOFF;
        }
    }
    // What librdkafka still holds was not counted delivered; the cursor has not moved past
    // it, so the next start sends it again.
    Ok(())
}

/// Sends one trigger; resolves when the brokers acknowledged it or refused it.
async fn send(
    producer: &FutureProducer<Logged>,
    config: &KafkaConfig,
    trigger: &Trigger,
) -> Result<(), KafkaError> {
    let mut headers = OwnedHeaders::new().insert(Header {
        key: "content-type",
        value: Some("application/json"),
    });
    for (name, value) in webhook::cloudevent_attributes(&config.sink.cloudevents_source, trigger) {
        headers = headers.insert(Header {
            key: name.kafka,
            value: Some(&value),
        });
    }
    let body = serde_json::to_vec(trigger).expect("a trigger encodes as JSON");
    let key = trigger
        .user_id
        .as_deref()
        .or(trigger.anonymous_id.as_deref())
        .unwrap_or_default();
    let record = FutureRecord::to(&config.sink.topic)
        .key(key)
        .payload(&body)
        .headers(headers);
    producer
        .send(record, Timeout::Never)
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
}

/// Whether the brokers will refuse the message however often it is sent.
fn permanent(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::TopicAuthorizationFailed
        )
    )
}

fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
