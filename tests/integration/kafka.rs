//! The Kafka source and sink against librdkafka's MockCluster: three mock brokers in this
//! process, speaking the Kafka protocol on loopback sockets (no Kafka broker installs on
//! these machines; ../shared/DEPENDENCIES.md). Nudge's clients are the real librdkafka.

use std::collections::BTreeMap;
use std::time::Duration;

use nudge::pb::{self, EventType};
use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};

use crate::support::{
    assert_feature, event, features, metric_value, python, repo_path, test_config, track,
    TestServer, T0,
};

fn mock_cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    MockCluster::new(3).expect("a mock cluster of three brokers")
}

fn producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .unwrap()
}

async fn produce(producer: &FutureProducer, topic: &str, key: &str, value: &[u8]) {
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(value),
            Timeout::After(Duration::from_secs(10)),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("the mock cluster takes the message");
}

/// Reads `topic` from its start until `n` messages arrived; `within` only bounds a hang.
async fn read_topic(bootstrap: &str, topic: &str, n: usize, within: Duration) -> Vec<OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("test-reader-{topic}-{n}-{}", std::process::id()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => got.push(m.detach()),
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => panic!("{topic}: {} of {n} messages within {within:?}", got.len()),
        }
    }
    got
}

fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    let headers = m.headers()?;
    headers
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
}

/// Waits until the metric series reach the values (a series never written is 0); `within`
/// only bounds a hang.
async fn metrics_reach(server: &TestServer, want: &[(&str, f64)], within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = server.metrics().await;
        let now: Vec<f64> = want
            .iter()
            .map(|(series, _)| metric_value(&text, series).unwrap_or(0.0))
            .collect();
        if want.iter().zip(&now).all(|((_, v), n)| n == v) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics {now:?}, waiting for {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rfc3339(t: nudge::time::Time) -> String {
    jiff::Timestamp::from_millisecond(t.millis())
        .unwrap()
        .to_string()
}

/// A product view in the protobuf JSON mapping of `nudge.v1.Event`.
fn view(id: &str, user: &str, product: &str, minutes_before: i64) -> Vec<u8> {
    json!({
        "eventId": id,
        "userId": user,
        "type": "EVENT_TYPE_PRODUCT_VIEW",
        "eventTime": rfc3339(T0.plus_ms(-minutes_before * 60_000)),
        "properties": {"productId": product, "category": "shoes", "price": 20.0},
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_tracks_a_topic_commits_only_what_is_durable_and_dead_letters_what_it_refuses() {
    let mock = mock_cluster();
    let bootstrap = mock.bootstrap_servers();
    mock.create_topic("events", 3, 3).unwrap();
    mock.create_topic("events.dead-letter", 1, 3).unwrap();
    let producer = producer(&bootstrap);
    let mut sent = 0;
    for i in 0..30 {
        let user = format!("k-{}", i % 10);
        let value = view(&format!("kv-{i}"), &user, &format!("p-{}", i / 10), 30 - i);
        produce(&producer, "events", &user, &value).await;
        sent += 1;
    }
    // Two Nudge refuses (bytes that are no JSON; a product view without its product),
    // and a message sent twice.
    let garbage = b"{not json".to_vec();
    produce(&producer, "events", "k-0", &garbage).await;
    let no_product =
        json!({"eventId": "kv-bad", "userId": "k-1", "type": "EVENT_TYPE_PRODUCT_VIEW",
        "eventTime": rfc3339(T0)})
        .to_string();
    produce(&producer, "events", "k-1", no_product.as_bytes()).await;
    produce(&producer, "events", "k-0", &view("kv-0", "k-0", "p-0", 30)).await;
    sent += 3;

    let data = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.store.dir = data.path().to_owned();
    config.kafka.brokers = bootstrap.clone();
    config.kafka.source.topic = "events".into();
    config.kafka.source.commit_interval_ms = 100;
    let server = TestServer::start_with(config.clone()).await;
    let within = Duration::from_secs(30);
    let text = metrics_reach(
        &server,
        &[
            (r#"nudge_kafka_messages_total{outcome="tracked"}"#, 30.0),
            (r#"nudge_kafka_messages_total{outcome="duplicate"}"#, 1.0),
            (r#"nudge_kafka_messages_total{outcome="dead_letter"}"#, 2.0),
        ],
        within,
    )
    .await;
    assert_eq!(
        metric_value(
            &text,
            r#"nudge_events_total{outcome="accepted",source="kafka",type="product_view"}"#
        ),
        Some(30.0),
        "{text}"
    );
    let mut client = server.client().await;
    let f = features(&mut client, "k-0").await;
    assert_feature(&f, "product_views_30d", 3.0);

    // The dead letters: the message as it came, and why, and from where.
    let dead = read_topic(&bootstrap, "events.dead-letter", 2, within).await;
    let by_key: BTreeMap<String, &OwnedMessage> = dead
        .iter()
        .map(|m| (String::from_utf8(m.key().unwrap().to_vec()).unwrap(), m))
        .collect();
    let garbled = by_key["k-0"];
    assert_eq!(garbled.payload(), Some(&garbage[..]));
    assert_eq!(
        header(garbled, "nudge-error-reason").as_deref(),
        Some("undecodable")
    );
    assert_eq!(
        header(garbled, "nudge-source-topic").as_deref(),
        Some("events")
    );
    assert!(header(garbled, "nudge-source-offset").is_some());
    let refused = by_key["k-1"];
    assert_eq!(refused.payload(), Some(no_product.as_bytes()));
    assert_eq!(
        header(refused, "nudge-error-field").as_deref(),
        Some("properties.product_id")
    );
    assert_eq!(
        header(refused, "nudge-error-reason").as_deref(),
        Some("missing")
    );

    // Every offset is committed once taken care of.
    let group: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "nudge")
        .create()
        .unwrap();
    let mut partitions = TopicPartitionList::new();
    for p in 0..3 {
        partitions.add_partition("events", p);
    }
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let committed = group
            .committed_offsets(partitions.clone(), Duration::from_secs(5))
            .unwrap();
        let total: i64 = committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum();
        if total == sent {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "committed {total} of {sent} offsets"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await.unwrap();

    // Reading the whole topic again (a crash before any commit reads as much) changes
    // nothing: every event is a duplicate, and the profile is what it was.
    config.kafka.source.group_id = "nudge-again".into();
    let server = TestServer::start_with(config).await;
    metrics_reach(
        &server,
        &[
            (r#"nudge_kafka_messages_total{outcome="tracked"}"#, 0.0),
            (r#"nudge_kafka_messages_total{outcome="duplicate"}"#, 31.0),
            (r#"nudge_kafka_messages_total{outcome="dead_letter"}"#, 2.0),
        ],
        within,
    )
    .await;
    let f = features(&mut server.client().await, "k-0").await;
    assert_feature(&f, "product_views_30d", 3.0);
    server.stop().await.unwrap();
}

const VIEWS: &str = r#"
    [[rules]]
    name = "views"
    when = "event.kind == 'page_view'"
    action = { type = "v" }
"#;

/// Parses Kafka messages with the CloudEvents Python SDK's Kafka binding.
fn parse_cloudevents(messages: &[OwnedMessage]) -> Vec<Value> {
    use base64::Engine as _;
    let input: Vec<Value> = messages
        .iter()
        .map(|m| {
            let headers: BTreeMap<String, String> = m
                .headers()
                .unwrap()
                .iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        String::from_utf8(h.value.unwrap().to_vec()).unwrap(),
                    )
                })
                .collect();
            json!({
                "headers": headers,
                "key": m.key().map(|k| String::from_utf8(k.to_vec()).unwrap()),
                "body": base64::engine::general_purpose::STANDARD.encode(m.payload().unwrap()),
            })
        })
        .collect();
    let mut child = std::process::Command::new(python())
        .arg(repo_path("tests/fixtures/cloudevents_parse.py"))
        .arg("--kafka")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the test Python (scripts/test.sh installs it)");
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        serde_json::to_string(&input).unwrap().as_bytes(),
    )
    .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the CloudEvents SDK refused the messages"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_calls_from_a_topic_fire_triggers_published_as_cloudevents_through_a_broker_loss() {
    let mock = mock_cluster();
    let bootstrap = mock.bootstrap_servers();
    mock.create_topic("segment", 1, 3).unwrap();
    mock.create_topic("triggers", 1, 3).unwrap();
    // The triggers' partition is led by broker 1, which this test takes down.
    mock.partition_leader("triggers", 0, Some(1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, VIEWS).unwrap();
    let mut config = test_config();
    config.triggers.rules = rules;
    config.kafka.brokers = bootstrap.clone();
    config.kafka.source.topic = "segment".into();
    config.kafka.source.format = nudge::kafka::SourceFormat::Segment;
    config.kafka.sink.topic = "triggers".into();
    config.kafka.sink.cloudevents_source = "/nudge/test".into();
    let server = TestServer::start_with(config).await;

    // Segment's own shapes: a page call, an e-commerce event, an identify that links a
    // visitor, an event name Nudge does not model.
    let producer = producer(&bootstrap);
    let at = rfc3339(T0.plus_ms(-60_000));
    let calls = [
        json!({"type": "page", "messageId": "sg-1", "anonymousId": "anon-7", "name": "Home",
               "properties": {"path": "/"}, "timestamp": at}),
        json!({"type": "track", "event": "Product Viewed", "messageId": "sg-2", "anonymousId": "anon-7",
               "properties": {"product_id": "507f1f77", "category": "Games", "price": 18.99},
               "timestamp": at}),
        json!({"type": "identify", "messageId": "sg-3", "anonymousId": "anon-7", "userId": "sam",
               "traits": {"email": "sam@example.com"}, "timestamp": at}),
        json!({"type": "track", "event": "Coupon Entered", "messageId": "sg-4", "userId": "sam",
               "timestamp": at}),
    ];
    for call in &calls {
        produce(&producer, "segment", "anon-7", call.to_string().as_bytes()).await;
    }
    let within = Duration::from_secs(30);
    metrics_reach(
        &server,
        &[
            (r#"nudge_kafka_messages_total{outcome="tracked"}"#, 2.0),
            (r#"nudge_kafka_messages_total{outcome="merged"}"#, 1.0),
            (r#"nudge_kafka_messages_total{outcome="ignored"}"#, 0.0),
            (
                r#"nudge_ignored_total{call="track",name="Coupon Entered",source="kafka"}"#,
                1.0,
            ),
            (r#"nudge_kafka_produced_total{result="delivered"}"#, 1.0),
        ],
        within,
    )
    .await;
    let mut client = server.client().await;
    // The visitor's views are the user's now.
    let f = features(&mut client, "sam").await;
    assert_feature(&f, "product_views_30d", 1.0);

    // The broker leading the triggers' partition goes down, the partition moves to
    // another, and a trigger fired meanwhile still arrives.
    mock.broker_down(1).unwrap();
    mock.partition_leader("triggers", 0, Some(2)).unwrap();
    track(
        &mut client,
        vec![event("page-2", "sam", EventType::PageView, T0)],
    )
    .await;
    metrics_reach(
        &server,
        &[(r#"nudge_kafka_produced_total{result="delivered"}"#, 2.0)],
        within,
    )
    .await;
    mock.broker_up(1).unwrap();

    let mut fired: Vec<pb::Trigger> = Vec::new();
    let mut stream = client
        .subscribe_triggers(pb::SubscribeTriggersRequest {
            cursor: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while fired.len() < 2 {
        let m = tokio::time::timeout(within, stream.message())
            .await
            .expect("two triggers")
            .unwrap()
            .unwrap();
        fired.push(m.trigger.unwrap());
    }
    let published = read_topic(&bootstrap, "triggers", 2, within).await;
    let events = parse_cloudevents(&published);
    for (event, trigger) in events.iter().zip(&fired) {
        let a = &event["attributes"];
        assert_eq!(a["id"], trigger.trigger_id.as_str(), "{event}");
        assert_eq!(a["source"], "/nudge/test");
        assert_eq!(a["type"], "dev.nudge.trigger.v");
        assert_eq!(a["nudgerule"], "views");
        assert_eq!(a["datacontenttype"], "application/json");
        assert_eq!(event["data"]["trigger_id"], trigger.trigger_id.as_str());
    }
    // Keyed by the person: the visitor's page view fired before the link, the user's after.
    assert_eq!(events[0]["attributes"]["partitionkey"], "anon-7");
    assert_eq!(events[1]["attributes"]["partitionkey"], "sam");
    assert_eq!(events[1]["attributes"]["subject"], "sam");
    server.stop().await.unwrap();
}
