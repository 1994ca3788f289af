//! The Segment-compatible HTTP API over a real loopback socket: write keys, limits, the
//! e-commerce mapping as GetProfile shows it, retries, ignored events, clock skew, the
//! spec-shaped payloads in tests/fixtures/segment, and the real Segment and RudderStack
//! Python SDKs.

use std::collections::HashMap;
use std::io::Write as _;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use nudge::pb;

use crate::support::{
    assert_feature, features, metric_value, person, python, repo_path, spawn_nudge, test_config,
    TestServer, T0,
};

const KEY: &str = "wk_test_7f3a";

/// A server with the HTTP API on, accepting [`KEY`]; the keys file lives as long as the
/// returned directory.
async fn server() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("write-keys");
    std::fs::write(&keys, format!("# test keys\n{KEY}\n")).unwrap();
    let mut config = test_config();
    config.server.http_write_keys_file = Some(keys);
    (TestServer::start_with(config).await, dir)
}

fn url(server: &TestServer, path: &str) -> String {
    format!(
        "http://{}{path}",
        server.http_addr.expect("the HTTP API is on")
    )
}

/// POSTs `body` as it is, with `key` as the Basic user when given; the status and the JSON
/// answer.
async fn post_raw(
    server: &TestServer,
    path: &str,
    key: Option<&str>,
    body: Vec<u8>,
    gzip: bool,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(url(server, path))
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.basic_auth(key, Some(""));
    }
    if gzip {
        request = request.header("content-encoding", "gzip");
    }
    let response = request
        .body(body)
        .send()
        .await
        .expect("the HTTP API answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{path} answered {status} with no JSON ({e}): {text}"));
    (status, json)
}

async fn post(server: &TestServer, path: &str, body: &Value) -> (u16, Value) {
    post_raw(
        server,
        path,
        Some(KEY),
        body.to_string().into_bytes(),
        false,
    )
    .await
}

/// A track message for `user` at T0 minus `minutes_ago`.
fn track(id: &str, user: &str, event: &str, minutes_ago: i64, properties: Value) -> Value {
    json!({
        "type": "track",
        "messageId": id,
        "userId": user,
        "event": event,
        "properties": properties,
        "timestamp": iso(T0.plus_ms(-minutes_ago * 60_000)),
    })
}

fn iso(t: nudge::time::Time) -> String {
    jiff::Timestamp::from_millisecond(t.millis())
        .unwrap()
        .to_string()
}

async fn profile(server: &TestServer, user: &str) -> Option<pb::GetProfileResponse> {
    let mut client = server.client().await;
    match client
        .get_profile(pb::GetProfileRequest {
            person: person(user),
            as_of: None,
        })
        .await
    {
        Ok(r) => Some(r.into_inner()),
        Err(status) if status.code() == tonic::Code::NotFound => None,
        Err(status) => panic!("GetProfile: {status}"),
    }
}

fn count(json: &Value, key: &str) -> u64 {
    json[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {json}"))
}

#[tokio::test]
async fn a_request_without_a_valid_write_key_is_401_and_changes_nothing() {
    let (server, _keys) = server().await;
    let body =
        json!({"batch": [track("k-1", "key-user", "Order Completed", 1, json!({"revenue": 5}))]});
    for key in [None, Some("wrong"), Some("")] {
        let (status, json) = post_raw(
            &server,
            "/v1/batch",
            key,
            body.to_string().into_bytes(),
            false,
        )
        .await;
        assert_eq!(status, 401, "{key:?}: {json}");
        assert_eq!(json["code"], "unauthorized", "{json}");
        assert_eq!(json["field"], "writeKey", "{json}");
        assert!(!json.to_string().contains(KEY), "{json}");
    }
    // A bearer token is not a write key either.
    let response = reqwest::Client::new()
        .post(url(&server, "/v1/track"))
        .bearer_auth(KEY)
        .body(body["batch"][0].to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert!(profile(&server, "key-user").await.is_none());
    // The body's writeKey, as Segment also accepts.
    let mut with_key = body.clone();
    with_key["writeKey"] = KEY.into();
    let (status, json) = post_raw(
        &server,
        "/v1/batch",
        None,
        with_key.to_string().into_bytes(),
        false,
    )
    .await;
    assert_eq!((status, count(&json, "accepted")), (200, 1), "{json}");
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "nudge_http_requests_total{code=\"401\",endpoint=\"/v1/batch\"}"
        ),
        Some(3.0)
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn messages_beyond_the_limits_are_400_naming_the_field() {
    let (server, _keys) = server().await;
    let padding = "x".repeat(33 * 1024);
    // One call over 32 KB.
    let big = track(
        "l-1",
        "limits",
        "Products Searched",
        1,
        json!({"query": padding}),
    );
    let (status, json) = post(&server, "/v1/track", &big).await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(
        (json["field"].as_str(), json["reason"].as_str()),
        (Some("body"), Some("message_too_large"))
    );
    // A batch over 500 KB.
    let many: Vec<Value> = (0..20)
        .map(|i| {
            track(
                &format!("l-b{i}"),
                "limits",
                "Products Searched",
                1,
                json!({"query": "y".repeat(30 * 1024)}),
            )
        })
        .collect();
    let (status, json) = post(&server, "/v1/batch", &json!({ "batch": many })).await;
    assert_eq!(
        (status, json["field"].as_str()),
        (400, Some("body")),
        "{json}"
    );
    // One message of a batch over 32 KB: that one is refused, the others apply.
    let batch = json!({"batch": [
        track("l-2", "limits", "Products Searched", 2, json!({"query": "shoes"})),
        big,
    ]});
    let (status, json) = post(&server, "/v1/batch", &batch).await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["field"], "batch[1]", "{json}");
    assert_eq!(json["reason"], "message_too_large", "{json}");
    assert_eq!((count(&json, "accepted"), count(&json, "rejected")), (1, 1));
    assert_feature(
        &features(&mut server.client().await, "limits").await,
        "searches_30d",
        1.0,
    );
    // A Track refusal names the Segment field it came from.
    let bad = json!({"batch": [
        track("l-3", "limits", "Product Added", 1, json!({"product_id": "p", "price": -3})),
        track("l-4", "limits", "Order Completed", 1, json!({"total": 1e300})),
    ]});
    let (status, json) = post(&server, "/v1/batch", &bad).await;
    assert_eq!(status, 400, "{json}");
    let errors: Vec<(&str, &str)> = json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["field"].as_str().unwrap(), e["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        errors,
        [
            ("batch[0].properties.price", "negative"),
            ("batch[1].properties.total", "out_of_range")
        ]
    );
    // Gzip that unpacks past the limit is refused as it unpacks.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![b' '; 600 * 1024]).unwrap();
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 8 * 1024);
    let (status, json) = post_raw(&server, "/v1/batch", Some(KEY), bomb, true).await;
    assert_eq!(
        (status, json["field"].as_str()),
        (400, Some("body")),
        "{json}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_body_without_a_length_is_cut_off_at_the_limit() {
    let (server, _keys) = server().await;
    let mut socket = tokio::net::TcpStream::connect(server.http_addr.unwrap())
        .await
        .unwrap();
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{KEY}:"),
    );
    let head = format!(
        "POST /v1/track HTTP/1.1\r\nhost: nudge\r\nauthorization: Basic {auth}\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    // Chunks until the server answers: it must not wait for the end of a body that is
    // already over its limit. (A write may fail once it has answered and closed.)
    let chunk = format!("{:x}\r\n{}\r\n", 4096, "z".repeat(4096));
    let mut sent = 0;
    for _ in 0..64 {
        if socket.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        sent += 4096;
    }
    let mut answer = vec![0; 4096];
    let n = socket.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("message_too_large"), "{answer}");
    assert!(sent > 32 * 1024, "sent {sent}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn ecommerce_events_show_up_in_the_profile() {
    let (server, _keys) = server().await;
    let batch = json!({"batch": [
        track("e-1", "shopper", "Product Viewed", 10, json!({"product_id": "sku-a", "price": 10.0, "category": "Games"})),
        track("e-2", "shopper", "Product Added", 9, json!({"product_id": "sku-a", "price": 10.0, "quantity": 2})),
        track("e-3", "shopper", "Product Added", 8, json!({"sku": "sku-b", "price": 5.0})),
        track("e-4", "shopper", "Product Removed", 7, json!({"product_id": "sku-a"})),
        track("e-5", "shopper", "Checkout Started", 6, json!({"order_id": "o-1"})),
        track("e-6", "buyer", "Order Completed", 5, json!({"order_id": "o-2", "revenue": 25.0, "total": 27.5})),
        track("e-7", "buyer2", "Order Completed", 5, json!({"order_id": "o-3", "total": 40})),
        track("e-8", "searcher", "Products Searched", 4, json!({"query": "blue roses"})),
        track("e-9", "reader", "Email Opened", 3, json!({"campaign_id": "c-1"})),
        track("e-10", "reader", "Email Link Clicked", 2, json!({"campaign_id": "c-1"})),
        {"type": "page", "messageId": "e-11", "userId": "visitor", "name": "Home", "properties": {"path": "/"}, "timestamp": iso(T0.plus_ms(-60_000))},
        {"type": "screen", "messageId": "e-12", "userId": "visitor", "name": "Cart", "timestamp": iso(T0)},
    ]});
    let (status, json) = post(&server, "/v1/batch", &batch).await;
    assert_eq!((status, count(&json, "accepted")), (200, 12), "{json}");

    let mut client = server.client().await;
    let shopper = profile(&server, "shopper").await.unwrap();
    let cart = shopper.cart.unwrap();
    let lines: Vec<&str> = cart.lines.iter().map(|l| l.product_id.as_str()).collect();
    assert_eq!(lines, ["sku-b"], "Product Removed took sku-a out");
    assert_eq!((cart.items, cart.value), (1, 5.0));
    assert!(cart.checkout_started, "Checkout Started");
    let f = features(&mut client, "shopper").await;
    assert_feature(&f, "product_views_30d", 1.0);
    assert_feature(&f, "cart_adds_30d", 2.0);
    assert_feature(&f, "checkout_since_cart_add", 1.0);
    assert_eq!(shopper.top_category, "Games");
    let f = features(&mut client, "buyer").await;
    assert_feature(&f, "purchases_30d", 1.0);
    assert_feature(&f, "revenue_90d", 25.0);
    // Without revenue, total is the order's value.
    assert_feature(&features(&mut client, "buyer2").await, "revenue_90d", 40.0);
    assert_feature(
        &features(&mut client, "searcher").await,
        "searches_30d",
        1.0,
    );
    let f = features(&mut client, "reader").await;
    assert_feature(&f, "email_opens_30d", 1.0);
    assert_feature(&f, "email_clicks_30d", 1.0);
    assert_feature(
        &features(&mut client, "visitor").await,
        "page_views_30d",
        2.0,
    );

    let metrics = server.metrics().await;
    for (kind, n) in [
        ("product_view", 1.0),
        ("add_to_cart", 2.0),
        ("purchase", 2.0),
        ("page_view", 2.0),
    ] {
        let series =
            format!("nudge_events_total{{outcome=\"accepted\",source=\"http\",type=\"{kind}\"}}");
        assert_eq!(metric_value(&metrics, &series), Some(n), "{series}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_retried_batch_is_answered_as_duplicates_and_changes_nothing() {
    let (server, _keys) = server().await;
    let batch = json!({"batch": [
        track("r-1", "retrier", "Order Completed", 3, json!({"revenue": 10})),
        track("r-2", "retrier", "Product Added", 2, json!({"product_id": "p", "price": 4})),
    ]});
    let (status, first) = post(&server, "/v1/batch", &batch).await;
    assert_eq!((status, count(&first, "accepted")), (200, 2), "{first}");
    for _ in 0..2 {
        let (status, again) = post(&server, "/v1/batch", &batch).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(
            (count(&again, "accepted"), count(&again, "duplicate")),
            (0, 2),
            "{again}"
        );
    }
    let f = features(&mut server.client().await, "retrier").await;
    assert_feature(&f, "purchases_30d", 1.0);
    assert_feature(&f, "revenue_90d", 10.0);
    assert_feature(&f, "cart_items", 1.0);
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "nudge_events_total{outcome=\"duplicate\",source=\"http\",type=\"purchase\"}"
        ),
        Some(2.0)
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_event_nudge_does_not_model_is_accepted_and_counted_by_name() {
    let (server, _keys) = server().await;
    let batch = json!({"batch": [
        track("u-1", "curious", "Course Clicked", 2, json!({"title": "Intro"})),
        track("u-2", "curious", "Course Clicked", 1, json!({})),
        track("u-3", "curious", "Product Viewed", 1, json!({"product_id": "p"})),
        {"type": "group", "userId": "curious", "groupId": "g-1", "traits": {}},
        {"type": "identify", "userId": "curious", "traits": {"plan": "pro"}},
    ]});
    let (status, json) = post(&server, "/v1/batch", &batch).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        (count(&json, "accepted"), count(&json, "ignored")),
        (1, 4),
        "{json}"
    );
    let metrics = server.metrics().await;
    for (series, n) in [
        (
            "nudge_ignored_total{call=\"track\",name=\"Course Clicked\",source=\"http\"}",
            2.0,
        ),
        (
            "nudge_ignored_total{call=\"group\",name=\"\",source=\"http\"}",
            1.0,
        ),
        (
            "nudge_ignored_total{call=\"identify\",name=\"\",source=\"http\"}",
            1.0,
        ),
    ] {
        assert_eq!(metric_value(&metrics, series), Some(n), "{series}");
    }
    assert_feature(
        &features(&mut server.client().await, "curious").await,
        "product_views_30d",
        1.0,
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_device_clock_that_is_off_is_corrected_with_sent_at() {
    let (server, _keys) = server().await;
    // The device's clock is three days fast: taken as it says, the event would be refused
    // as in the future. It was sent 5 s after it happened, so it happened 5 s before the
    // server received it (the server's clock is at T0).
    let device = |t: nudge::time::Time| iso(t.plus_ms(3 * 86_400_000));
    let msg = json!({
        "userId": "skewed",
        "messageId": "s-1",
        "event": "Email Opened",
        "originalTimestamp": device(T0.plus_ms(-5_000)),
        "sentAt": device(T0),
    });
    let (status, json) = post(&server, "/v1/track", &msg).await;
    assert_eq!(status, 200, "{json}");
    let seen = profile(&server, "skewed").await.unwrap().last_seen.unwrap();
    assert_eq!(seen, nudge::api::convert::timestamp(T0.plus_ms(-5_000)));
    // Without sentAt there is nothing to correct with: the device's time stands, and is
    // refused.
    let mut alone = msg.clone();
    alone.as_object_mut().unwrap().remove("sentAt");
    alone["messageId"] = "s-2".into();
    let (status, json) = post(&server, "/v1/track", &alone).await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(
        (json["field"].as_str(), json["reason"].as_str()),
        (Some("originalTimestamp"), Some("in_future"))
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn identify_and_alias_make_the_visitor_the_user() {
    let (server, _keys) = server().await;
    let visit = |id: &str, anon: &str| {
        json!({"type": "track", "messageId": id, "anonymousId": anon, "event": "Product Viewed",
               "properties": {"product_id": id}, "timestamp": iso(T0.plus_ms(-60_000))})
    };
    let (status, json) = post(
        &server,
        "/v1/batch",
        &json!({"batch": [visit("i-1", "anon-i"), visit("i-2", "anon-a")]}),
    )
    .await;
    assert_eq!(status, 200, "{json}");
    let (status, json) = post(
        &server,
        "/v1/identify",
        &json!({"userId": "known-i", "anonymousId": "anon-i", "traits": {}}),
    )
    .await;
    assert_eq!((status, count(&json, "merged")), (200, 1), "{json}");
    let (status, json) = post(
        &server,
        "/v1/alias",
        &json!({"previousId": "anon-a", "userId": "known-a"}),
    )
    .await;
    assert_eq!((status, count(&json, "merged")), (200, 1), "{json}");
    let mut client = server.client().await;
    for user in ["known-i", "known-a"] {
        assert_feature(&features(&mut client, user).await, "product_views_30d", 1.0);
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_spec_shaped_payloads_are_taken() {
    let (server, _keys) = server().await;
    let fixture =
        |name: &str| std::fs::read(repo_path(&format!("tests/fixtures/segment/{name}"))).unwrap();
    let mut answers = HashMap::new();
    for (path, name) in [
        ("/v1/page", "page.json"),
        ("/v1/track", "track.json"),
        ("/v1/batch", "ecommerce_batch.json"),
        ("/v1/identify", "identify.json"),
    ] {
        let (status, json) = post_raw(&server, path, Some(KEY), fixture(name), false).await;
        assert_eq!(status, 200, "{name}: {json}");
        answers.insert(name, json);
    }
    assert_eq!(
        count(&answers["track.json"], "ignored"),
        1,
        "Course Clicked is not modeled"
    );
    assert_eq!(count(&answers["ecommerce_batch.json"], "accepted"), 5);
    assert_eq!(count(&answers["identify.json"], "merged"), 1);
    // The identify made the visitor of the e-commerce batch the spec's user.
    let f = features(&mut server.client().await, "spec-user").await;
    assert_feature(&f, "product_views_30d", 1.0);
    assert_feature(&f, "purchases_30d", 1.0);
    assert_feature(&f, "revenue_90d", 25.0);
    assert_feature(&f, "searches_30d", 1.0);
    // page and product view.
    assert_feature(&f, "page_views_30d", 2.0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_segment_and_rudderstack_python_sdks_deliver() {
    let (server, _keys) = server().await;
    // The SDKs stamp events with the machine's clock.
    server
        .clock
        .set(nudge::time::Time(jiff::Timestamp::now().as_millisecond()));
    let run = std::process::id().to_string();
    let python = python();
    let child = std::process::Command::new(&python)
        .arg(repo_path("tests/segment_sdks.py"))
        .args([url(&server, ""), KEY.to_owned(), run.clone()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; install tests/fixtures/requirements.txt (scripts/test.sh does) or set NUDGE_TEST_PYTHON",
                python.display()
            )
        });
    let pid = child.id();
    let waited = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let output = match waited {
        Ok(joined) => joined.unwrap().unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
            panic!("the SDKs did not finish within 60 s");
        }
    };
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let mut client = server.client().await;
    for sdk in ["segment", "rudder"] {
        let user = format!("{sdk}-{run}-user");
        let f = features(&mut client, &user).await;
        // The visitor's product view and page, merged by identify, and the user's order.
        assert_feature(&f, "product_views_30d", 1.0);
        assert_feature(&f, "page_views_30d", 2.0);
        assert_feature(&f, "purchases_30d", 1.0);
        assert_feature(&f, "revenue_90d", 25.0);
    }
    let metrics = server.metrics().await;
    // Each SDK batched its calls: at least one request each.
    let batches = metric_value(
        &metrics,
        "nudge_http_requests_total{code=\"200\",endpoint=\"/v1/batch\"}",
    );
    assert!(batches.is_some_and(|n| n >= 2.0), "{batches:?}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_binary_serves_the_http_api_when_given_write_keys() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("write-keys");
    std::fs::write(&keys, format!("sha256:{}\n", sha256_hex(KEY))).unwrap();
    let nudge = spawn_nudge(
        &dir.path().join("data"),
        &[(
            "NUDGE__SERVER__HTTP_WRITE_KEYS_FILE",
            keys.display().to_string(),
        )],
    )
    .await;
    // The "serving" line names the address --http-addr 127.0.0.1:0 bound.
    let http_addr = nudge
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "serving")
        .and_then(|l| l["fields"]["http_addr"].as_str().map(str::to_owned))
        .expect("the serving line names the HTTP address");
    let now = jiff::Timestamp::now();
    let response = reqwest::Client::new()
        .post(format!("http://{http_addr}/v1/track"))
        .basic_auth(KEY, Some(""))
        .body(
            json!({"userId": "bin-user", "messageId": "b-1", "event": "Products Searched",
                   "properties": {"query": "socks"}, "timestamp": now.to_string()})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        200,
        "{}",
        response.text().await.unwrap()
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", nudge.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::nudge_service_client::NudgeServiceClient::new(channel);
    assert_feature(
        &features(&mut client, "bin-user").await,
        "searches_30d",
        1.0,
    );
    // The key is in no log line, nor its digest.
    let log = nudge.log();
    assert!(
        !log.contains(KEY) && !log.contains(&sha256_hex(KEY)),
        "{log}"
    );
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

#[tokio::test]
async fn every_endpoint_answers_and_pseudonyms_hold_across_identify() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("write-keys");
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    let secret = dir.path().join("identity-key");
    std::fs::write(&secret, "a pseudonymization key of 32 bytes").unwrap();
    let mut config = test_config();
    config.server.http_write_keys_file = Some(keys);
    config.identity.pseudonymize_key_file = Some(secret);
    let server = TestServer::start_with(config).await;
    let at = iso(T0.plus_ms(-60_000));
    for (path, body) in [
        (
            "/v1/screen",
            json!({"anonymousId": "p-anon", "name": "Cart", "messageId": "p-1", "timestamp": at}),
        ),
        (
            "/v1/page",
            json!({"anonymousId": "p-anon", "name": "Home", "messageId": "p-2", "timestamp": at}),
        ),
        (
            "/v1/b",
            json!({"batch": [track("p-3", "p-user", "Products Searched", 1, json!({"query": "hats"}))]}),
        ),
        (
            "/v1/identify",
            json!({"anonymousId": "p-anon", "userId": "p-user"}),
        ),
    ] {
        let (status, json) = post(&server, path, &body).await;
        assert_eq!(status, 200, "{path}: {json}");
    }
    // Raw ids in, raw ids to read: the HTTP calls, the merge included, and GetProfile turn
    // them into the same pseudonyms.
    let f = features(&mut server.client().await, "p-user").await;
    assert_feature(&f, "page_views_30d", 2.0);
    assert_feature(&f, "searches_30d", 1.0);
    let (status, json) = post(&server, "/v1/nothing", &json!({})).await;
    assert_eq!(
        (status, json["code"].as_str()),
        (404, Some("not_found")),
        "{json}"
    );
    let get = reqwest::get(url(&server, "/v1/track")).await.unwrap();
    assert_eq!(get.status().as_u16(), 405);
    let json: Value = serde_json::from_str(&get.text().await.unwrap()).unwrap();
    assert_eq!(json["code"], "method_not_allowed", "{json}");
    server.stop().await.unwrap();
}
