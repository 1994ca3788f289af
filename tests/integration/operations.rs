//! Operations: /metrics content, health, reflection, and graceful shutdown — in process and
//! of the real binary under SIGTERM.

use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use nudge::pb::{self, EventType};

use crate::support::*;

#[tokio::test]
async fn metrics_cover_requests_events_models_and_never_a_person() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let secret = "canary-user-7f3a@example.com";
    track(
        &mut client,
        vec![
            event("m1", secret, EventType::PageView, T0),
            product_view("m2", secret, T0, "p1", "shoes", None),
        ],
    )
    .await;
    let _ = client
        .get_profile(pb::GetProfileRequest {
            person: person("nobody"),
            as_of: None,
        })
        .await;
    let text = server.metrics().await;

    for (series, value) in [
        ("nudge_grpc_requests_total{code=\"OK\",rpc=\"Track\"}", 1.0),
        (
            "nudge_grpc_requests_total{code=\"NOT_FOUND\",rpc=\"GetProfile\"}",
            1.0,
        ),
        (
            "nudge_grpc_request_duration_seconds_count{code=\"OK\",rpc=\"Track\"}",
            1.0,
        ),
        (
            "nudge_events_total{outcome=\"accepted\",source=\"grpc\",type=\"page_view\"}",
            1.0,
        ),
        (
            "nudge_events_total{outcome=\"accepted\",source=\"grpc\",type=\"product_view\"}",
            1.0,
        ),
        (
            "nudge_model_info{format=\"lightgbm\",name=\"purchase\",version=\"sim-3\"}",
            1.0,
        ),
        (
            "nudge_model_info{format=\"lightgbm\",name=\"churn\",version=\"sim-3\"}",
            1.0,
        ),
        // One call: a request's events are scored as one batch.
        (
            "nudge_model_score_duration_seconds_count{model=\"purchase\"}",
            1.0,
        ),
        ("nudge_profiles", 1.0),
        // The first event reads the store, the second finds the profile in memory;
        // GetProfile of nobody reads the store.
        (
            "nudge_cache_lookups_total{part=\"profile\",result=\"miss\"}",
            2.0,
        ),
        (
            "nudge_cache_lookups_total{part=\"profile\",result=\"hit\"}",
            1.0,
        ),
        (
            "nudge_invalid_input_total{reason=\"in_future\",rpc=\"Track\"}",
            0.0,
        ),
    ] {
        assert_eq!(metric_value(&text, series), Some(value), "{series}\n{text}");
    }
    assert_eq!(
        metric_value(
            &text,
            "nudge_model_load_failures_total{reason=\"hash_mismatch\"}"
        ),
        Some(0.0)
    );
    assert!(
        !text.contains("canary"),
        "a person's id leaked into metrics"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn health_reports_serving_then_not_serving_on_shutdown() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "nudge.v1.NudgeService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "nudge.v1.NudgeService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    // A call in flight when shutdown starts still completes.
    let mut client = server.client().await;
    let in_flight = tokio::spawn(async move {
        client
            .track(pb::TrackRequest {
                events: vec![event("s1", "u", EventType::PageView, T0)],
            })
            .await
    });
    let stopping = tokio::spawn(server.stop());
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    in_flight
        .await
        .unwrap()
        .expect("the in-flight call finished");
    stopping
        .await
        .unwrap()
        .expect("the server drained and stopped cleanly");
}

#[tokio::test]
async fn without_models_the_service_is_live_but_not_ready() {
    let empty = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.models.dir = empty.path().to_owned();
    let server = TestServer::start_with(config).await;
    let mut health = HealthClient::new(server.channel().await);
    let status = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let live = health.check(status("")).await.unwrap().into_inner().status;
    let ready = health
        .check(status("nudge.v1.NudgeService"))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(live, ServingStatus::Serving as i32);
    assert_eq!(ready, ServingStatus::NotServing as i32);

    let mut client = server.client().await;
    let tracked = track(&mut client, vec![event("n1", "u", EventType::PageView, T0)]).await;
    assert!(tracked.results[0].scores.is_empty());
    let err = client
        .score(pb::ScoreRequest {
            subject: Some(pb::score_request::Subject::Person(person("u").unwrap())),
            models: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = TestServer::start().await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["nudge.v1.NudgeService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_binary_serves_and_exits_zero_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let child = spawn_nudge(data.path(), &[]).await;
    let mut health = HealthClient::new(crate::crash::until_serving(&child).await);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    child.signal("TERM");
    let (status, log) = child.exit().await;
    assert_eq!(status.code(), Some(0), "exit status; log:\n{log}");
    assert!(log.contains("\"stopped\""), "log:\n{log}");
}
