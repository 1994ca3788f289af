//! Triggers that carry their context, end to end with the shipped rules file over real
//! gRPC and a real webhook receiver, with pseudonymization on: the seed's camera example
//! (repeated views of an expensive product, no cart addition) and its category-preference
//! example (purchases leaning to one category) fire once each with the expected context
//! and computed parameters, a second product gets its own firing, a visitor who logs in
//! keeps what they looked at without double counting, and no raw id reaches a subscriber,
//! a webhook or ExplainTriggers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nudge::config::WebhookConfig;
use nudge::pb;
use nudge::pb::EventType;
use nudge::time::{Time, MINUTE_MS};

use crate::support::*;

const CAMERA_RULE: &str = "considering_high_end_product";
const CATEGORY_RULE: &str = "category_new_arrivals";

fn viewed(id: &str, user: &str, at: Time, product: &str, category: &str, price: f64) -> pb::Event {
    let mut e = product_view(id, user, at, product, category, None);
    props(&mut e).price = Some(price);
    e
}

fn purchased(id: &str, user: &str, at: Time, product: &str, category: &str) -> pb::Event {
    let mut e = event(id, user, EventType::Purchase, at);
    let p = props(&mut e);
    p.product_id = Some(product.into());
    p.category = Some(category.into());
    p.order_value = Some(80.0);
    e
}

/// The template each stage's action of the camera rule names (config/rules.toml).
fn camera_template(stage: &str) -> &'static str {
    match stage {
        "awareness" => "product-guide",
        "consideration" => "expert-reviews",
        "decision" => "financing-offer",
        other => panic!("unknown stage {other}"),
    }
}

/// A webhook receiver keeping every body it was sent.
async fn receiver(listener: tokio::net::TcpListener, bodies: Arc<Mutex<Vec<serde_json::Value>>>) {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let bodies = bodies.clone();
            async move {
                bodies
                    .lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                axum::http::StatusCode::OK
            }
        }),
    );
    axum::serve(listener, app).await.unwrap();
}

async fn explain(
    client: &mut nudge::pb::nudge_service_client::NudgeServiceClient<tonic::transport::Channel>,
    user: &str,
) -> pb::ExplainTriggersResponse {
    client
        .explain_triggers(pb::ExplainTriggersRequest {
            person: Some(pb::PersonRef {
                user_id: user.into(),
                anonymous_id: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_carry_the_products_categories_and_parameters_that_made_them_personal() {
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), b"a-secret-key-of-32-bytes-or-so!!").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let hook = tokio::spawn(receiver(listener, bodies.clone()));
    let mut config = test_config();
    config.identity.pseudonymize_key_file = Some(key.path().to_owned());
    config.triggers.webhooks = vec![WebhookConfig {
        name: "crm".into(),
        url: format!("http://127.0.0.1:{port}/hook"),
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        secret_file: None,
        rules: vec![CAMERA_RULE.into(), CATEGORY_RULE.into()],
        concurrency: 2,
        rate_per_second: 200.0,
        max_attempts: 10,
        initial_backoff_ms: 50,
        max_backoff_ms: 500,
        timeout_ms: 2000,
        // The test's receiver listens on loopback.
        allow_internal_addresses: true,
        format: Default::default(),
        cloudevents_source: "/nudge".into(),
    }];
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let at = |minutes: i64| T0.plus_ms(-minutes * MINUTE_MS);

    // The camera example: three views of a 1,099 camera (and a cheap strap in between).
    let camera_fan = "camera.fan@example.com";
    let mut history = vec![
        viewed("raw-ev-1", camera_fan, at(50), "cam-1", "cameras", 1099.0),
        viewed(
            "raw-ev-2",
            camera_fan,
            at(45),
            "strap-9",
            "accessories",
            19.0,
        ),
        viewed("raw-ev-3", camera_fan, at(40), "cam-1", "cameras", 1099.0),
        viewed("raw-ev-4", camera_fan, at(35), "cam-1", "cameras", 1099.0),
        // Latched: a fourth view does not fire again.
        viewed("raw-ev-5", camera_fan, at(30), "cam-1", "cameras", 1099.0),
    ];
    // A second camera crosses on its own.
    for (i, minutes) in [25, 20, 15].into_iter().enumerate() {
        history.push(viewed(
            &format!("raw-ev-{}", 6 + i),
            camera_fan,
            at(minutes),
            "cam-2",
            "cameras",
            649.0,
        ));
    }
    track(&mut client, history).await;

    // A visitor looks at a lens twice, logs in, and looks once more: three views, one
    // person, one firing.
    let visitor = "cookie-lens-77";
    let lens_fan = "lens.fan@example.com";
    let mut anonymous = vec![
        viewed("raw-lens-1", "", at(30), "lens-5", "cameras", 799.0),
        viewed("raw-lens-2", "", at(25), "lens-5", "cameras", 799.0),
    ];
    for e in &mut anonymous {
        e.anonymous_id = visitor.into();
    }
    track(&mut client, anonymous).await;
    let mut login = viewed("raw-lens-3", lens_fan, at(20), "lens-5", "cameras", 799.0);
    login.anonymous_id = visitor.into();
    track(&mut client, vec![login]).await;

    // The category example: views spread over three categories, purchases lean to one.
    let outdoor_fan = "outdoor.fan@example.com";
    let mut history = Vec::new();
    for (i, (product, category)) in [
        ("tent-1", "outdoor"),
        ("pan-1", "kitchen"),
        ("book-1", "books"),
        ("boots-1", "outdoor"),
        ("stove-1", "outdoor"),
    ]
    .into_iter()
    .enumerate()
    {
        history.push(viewed(
            &format!("raw-out-{i}"),
            outdoor_fan,
            at(60 - i as i64),
            product,
            category,
            60.0,
        ));
    }
    history.push(purchased(
        "raw-out-p1",
        outdoor_fan,
        at(50),
        "tent-1",
        "outdoor",
    ));
    history.push(purchased(
        "raw-out-p2",
        outdoor_fan,
        at(49),
        "boots-1",
        "outdoor",
    ));
    history.push(event(
        "raw-out-page",
        outdoor_fan,
        EventType::PageView,
        at(10),
    ));
    // Another page view: latched, nothing more.
    history.push(event(
        "raw-out-page2",
        outdoor_fan,
        EventType::PageView,
        at(9),
    ));
    track(&mut client, history).await;

    let mut stream = client
        .subscribe_triggers(pb::SubscribeTriggersRequest {
            cursor: 0,
            rules: vec![CAMERA_RULE.into(), CATEGORY_RULE.into()],
        })
        .await
        .unwrap()
        .into_inner();
    let mut triggers = Vec::new();
    while triggers.len() < 4 {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("four triggers are committed")
            .unwrap()
            .unwrap();
        triggers.push(next.trigger.unwrap());
    }
    let cameras: Vec<&pb::Trigger> = triggers.iter().filter(|t| t.rule == CAMERA_RULE).collect();
    let products: Vec<&str> = cameras
        .iter()
        .map(|t| {
            t.context
                .as_ref()
                .unwrap()
                .product
                .as_ref()
                .unwrap()
                .product_id
                .as_str()
        })
        .collect();
    assert_eq!(products, ["cam-1", "cam-2", "lens-5"], "{triggers:#?}");
    for t in &cameras {
        let context = t.context.as_ref().unwrap();
        let product = context.product.as_ref().unwrap();
        assert_eq!(product.views_7d, 3, "{t:#?}");
        assert!(!product.in_cart && product.category == "cameras");
        let action = t.action.as_ref().unwrap();
        assert_eq!(action.template, camera_template(&t.journey_stage));
        assert_eq!(action.params["product_id"], product.product_id);
        assert_eq!(
            context.event.as_ref().unwrap().product_id,
            product.product_id
        );
        assert_eq!(
            context.segment.as_ref().unwrap().stage,
            t.journey_stage,
            "the segment part carries the stage"
        );
        assert!(!context.top_products.is_empty());
        assert!(context.cart.is_empty() && context.top_categories.is_empty());
    }
    let first = cameras[0].context.as_ref().unwrap();
    assert_eq!(first.product.as_ref().unwrap().price, Some(1099.0));
    assert_eq!(first.top_products[0].product_id, "cam-1");

    let category = triggers.iter().find(|t| t.rule == CATEGORY_RULE).unwrap();
    let action = category.action.as_ref().unwrap();
    assert_eq!(action.template, "new-in-category");
    assert_eq!(action.params["category"], "outdoor");
    assert!(["5", "10"].contains(&action.params["percent"].as_str()));
    let context = category.context.as_ref().unwrap();
    assert_eq!(context.top_categories[0].category, "outdoor");
    // outdoor: 3 views + 2 purchases × 5 = 13 of 15.
    assert!((context.top_categories[0].share - 13.0 / 15.0).abs() < 1e-9);
    assert!(context.product.is_none() && context.event.is_none());

    // The webhook carries the same context, as JSON.
    let ids: Vec<String> = triggers.iter().map(|t| t.trigger_id.clone()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let delivered = loop {
        let got = bodies.lock().unwrap().clone();
        let seen: Vec<&str> = got
            .iter()
            .filter_map(|b| b["data"]["trigger_id"].as_str())
            .collect();
        if ids.iter().all(|id| seen.contains(&id.as_str())) {
            break got;
        }
        assert!(tokio::time::Instant::now() < deadline, "webhooks: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let json = delivered
        .iter()
        .find(|b| b["data"]["trigger_id"] == ids[0].as_str())
        .unwrap();
    assert_eq!(json["data"]["context"]["product"]["product_id"], "cam-1");
    assert_eq!(json["data"]["context"]["product"]["views_7d"], 3);
    assert_eq!(json["data"]["action"]["params"]["product_id"], "cam-1");

    // ExplainTriggers shows the decision with its computed parameters and context.
    let explained = explain(&mut client, camera_fan).await;
    let decisions: Vec<&pb::TriggerDecision> = explained
        .decisions
        .iter()
        .filter(|d| d.rule == CAMERA_RULE)
        .collect();
    assert_eq!(decisions.len(), 2, "{explained:#?}");
    assert_eq!(decisions[0].computed_params["product_id"], "cam-1");
    assert_eq!(
        decisions[1]
            .context
            .as_ref()
            .unwrap()
            .product
            .as_ref()
            .unwrap()
            .product_id,
        "cam-2"
    );

    // The category rule fired once: the second page view found it latched.
    let outdoor = explain(&mut client, outdoor_fan).await;
    let fired: Vec<&pb::TriggerDecision> = outdoor
        .decisions
        .iter()
        .filter(|d| d.rule == CATEGORY_RULE)
        .collect();
    assert_eq!(fired.len(), 1, "{outdoor:#?}");
    assert_eq!(fired[0].computed_params["category"], "outdoor");

    // No raw id anywhere a consumer looks.
    let everything = format!("{triggers:?}{explained:?}{outdoor:?}{delivered:?}");
    for raw in [
        camera_fan,
        lens_fan,
        outdoor_fan,
        visitor,
        "raw-ev-",
        "raw-lens-",
        "raw-out-",
    ] {
        assert!(!everything.contains(raw), "{raw} leaked: {everything}");
    }
    server.stop().await.unwrap();
    hook.abort();
}
