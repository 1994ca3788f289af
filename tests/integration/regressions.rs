//! Defects found in review and in testing from outside (issue 9), each pinned by the test
//! that failed before its fix.

use nudge::pb;
use tonic::Code;

use crate::support::*;

/// With pseudonymization on, every RPC that names a person must find the person Track
/// stored: Score by person looked the raw id up and answered NOT_FOUND.
#[tokio::test]
async fn every_rpc_finds_a_pseudonymized_person_by_their_raw_id() {
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), b"a-secret-key-of-32-bytes-or-so!!").unwrap();
    let mut config = test_config();
    config.identity.pseudonymize_key_file = Some(key.path().to_owned());
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let user = "jane.doe@example.com";
    track(
        &mut client,
        vec![product_view("e1", user, T0, "p1", "shoes", Some(3.0))],
    )
    .await;

    let scores = client
        .score(pb::ScoreRequest {
            subject: Some(pb::score_request::Subject::Person(person(user).unwrap())),
            models: vec![],
        })
        .await
        .expect("Score finds the person")
        .into_inner();
    assert_eq!(scores.rows.len(), 1);
    assert_eq!(scores.rows[0].scores.len(), 2, "both shipped models");
    assert_feature(&features(&mut client, user).await, "product_views_30d", 1.0);
    client
        .explain_triggers(pb::ExplainTriggersRequest {
            person: person(user),
        })
        .await
        .expect("ExplainTriggers finds the person");
    let deleted = client
        .delete_user(pb::DeleteUserRequest {
            person: person(user),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.existed);
    server.stop().await.unwrap();
}

/// Every RPC has its own label in the request metrics; five of them were `unknown`.
#[tokio::test]
async fn every_rpc_is_counted_under_its_own_name() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .explain_triggers(pb::ExplainTriggersRequest {
            person: person("nobody"),
        })
        .await
        .unwrap();
    client
        .get_experiment_report(pb::GetExperimentReportRequest::default())
        .await
        .unwrap();
    client
        .reload_rules(pb::ReloadRulesRequest::default())
        .await
        .unwrap();
    let _ = client
        .list_dead_letters(pb::ListDeadLettersRequest {
            endpoint: "crm".into(),
            limit: 0,
        })
        .await;
    let text = server.metrics().await;
    for (rpc, code) in [
        ("ExplainTriggers", "OK"),
        ("GetExperimentReport", "OK"),
        ("ReloadRules", "OK"),
        ("ListDeadLetters", "NOT_FOUND"),
    ] {
        let series = format!("nudge_grpc_requests_total{{code=\"{code}\",rpc=\"{rpc}\"}}");
        assert_eq!(metric_value(&text, &series), Some(1.0), "{series}\n{text}");
    }
    assert!(!text.contains("rpc=\"unknown\""), "{text}");
    server.stop().await.unwrap();
}

/// A typo in the endpoint name must not look like an endpoint with nothing dead; an
/// over-long name (which once panicked inside the store) is refused before any lookup.
#[tokio::test]
async fn dead_letters_of_an_endpoint_that_is_not_configured_are_not_found() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for (endpoint, code) in [
        ("crn".to_owned(), Code::NotFound),
        ("x".repeat(70_000), Code::InvalidArgument),
    ] {
        let err = client
            .list_dead_letters(pb::ListDeadLettersRequest { endpoint, limit: 0 })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().starts_with("endpoint: "), "{}", err.message());
    }
    server.stop().await.unwrap();
}

/// `nudge check-config` prints the effective config; a webhook's signing secret must not
/// be in it.
#[test]
fn check_config_shows_the_config_without_its_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nudge.toml");
    std::fs::write(
        &file,
        r#"
[[triggers.webhooks]]
name = "crm"
url = "https://crm.example/hooks"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nudge"))
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("crm.example"), "{stdout}");
    assert!(!stdout.contains("MfKQ9r8G"), "{stdout}");
    assert!(stdout.contains("<redacted>"), "{stdout}");
}
