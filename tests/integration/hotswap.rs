//! Model hot swap: new versions and bad files published under continuous Score load; no
//! request fails, only valid versions answer, every bad file is refused and counted by
//! reason. A server without a model is live but not ready until one arrives.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nudge::model::manifest::{sha256_hex, Manifest};
use nudge::model::publish;
use nudge::pb::{self, score_request::Subject};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::support::*;

/// The shipped purchase model: its manifest and bytes.
fn shipped() -> (Manifest, Vec<u8>) {
    let dir = repo_path("models");
    let manifest =
        Manifest::parse(&std::fs::read_to_string(dir.join("purchase.manifest.toml")).unwrap())
            .unwrap();
    let bytes = std::fs::read(dir.join(&manifest.file)).unwrap();
    (manifest, bytes)
}

fn versioned(version: &str) -> Manifest {
    let mut m = shipped().0;
    m.version = version.to_owned();
    m
}

/// A bad publish of one kind, and the reason the server must give.
fn publish_bad(dir: &std::path::Path, kind: usize, version: &str) -> &'static str {
    let (_, good) = shipped();
    match kind {
        0 => {
            publish::publish(dir, versioned(version), &good[..good.len() / 2], "txt").unwrap();
            "parse"
        }
        1 => {
            let noise: Vec<u8> = (0..50_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
                .collect();
            publish::publish(dir, versioned(version), &noise, "txt").unwrap();
            "parse"
        }
        2 => {
            publish::publish(dir, versioned(version), b"", "txt").unwrap();
            "parse"
        }
        3 => {
            // The model file has one feature more than its manifest lists.
            let mut m = versioned(version);
            m.features.pop();
            publish::publish(dir, m, &good, "txt").unwrap();
            "feature_count"
        }
        4 => {
            let mut m = versioned(version);
            m.features.swap(2, 3);
            publish::publish(dir, m, &good, "txt").unwrap();
            "feature_names"
        }
        5 => {
            // A manifest whose hash does not match its file.
            let m = publish::publish(dir, versioned(version), &good, "txt").unwrap();
            let mut wrong = m.clone();
            wrong.sha256 = sha256_hex(b"something else");
            std::fs::write(Manifest::path_in(dir, "purchase"), wrong.to_toml()).unwrap();
            "hash_mismatch"
        }
        _ => {
            // The serving model's file overwritten in place, without a rename.
            let current = Manifest::parse(
                &std::fs::read_to_string(Manifest::path_in(dir, "purchase")).unwrap(),
            )
            .unwrap();
            std::fs::write(dir.join(&current.file), &good[..good.len() / 3]).unwrap();
            "hash_mismatch"
        }
    }
}

type Client = pb::nudge_service_client::NudgeServiceClient<tonic::transport::Channel>;

/// The purchase version that answers a Score now.
async fn version(client: &mut Client) -> String {
    let answer = client.score(rows()).await.unwrap().into_inner();
    answer.rows[0].scores[0].version.clone()
}

/// Waits (up to 10 s) until `target` answers.
async fn wait_for_version(client: &mut Client, target: &str) {
    let mut waited = Duration::ZERO;
    while version(client).await != target {
        assert!(waited < Duration::from_secs(10), "never served {target}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
}

fn rows() -> pb::ScoreRequest {
    pb::ScoreRequest {
        subject: Some(Subject::FeatureRows(pb::FeatureRows {
            rows: (0..20)
                .map(|i| pb::FeatureRow {
                    values: [
                        ("cart_value".to_owned(), i as f64 * 7.0),
                        ("sessions_7d".to_owned(), (i % 5) as f64),
                    ]
                    .into(),
                })
                .collect(),
            ..Default::default()
        })),
        models: vec!["purchase".into()],
    }
}

/// Tasks sending Score requests while models are swapped.
const LOAD_TASKS: usize = 3;

/// Waits (up to 10 s) until the load tasks have had `LOAD_TASKS + 1` more answers:
/// then at least one task sent a whole request after this call began, which the model
/// serving at that moment answered.
async fn load_moves_on(answered: &AtomicUsize) {
    let from = answered.load(Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while answered.load(Ordering::SeqCst) < from + LOAD_TASKS + 1 {
        assert!(tokio::time::Instant::now() < deadline, "the load stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn publishing_under_load_never_fails_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let (_, good) = shipped();
    publish::publish(dir.path(), versioned("v0"), &good, "txt").unwrap();
    let mut config = test_config();
    config.models.dir = dir.path().to_owned();
    config.models.watch = false; // reload by RPC, so each publish is checked on its own
    let server = TestServer::start_with(config).await;

    let stop = Arc::new(AtomicBool::new(false));
    // Requests answered so far, by all load tasks.
    let answered = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..LOAD_TASKS)
        .map(|_| {
            let stop = stop.clone();
            let answered = answered.clone();
            let addr = server.grpc_addr;
            tokio::spawn(async move {
                let mut client =
                    pb::nudge_service_client::NudgeServiceClient::connect(format!("http://{addr}"))
                        .await
                        .unwrap();
                let (mut ok, mut failed, mut versions) = (0u32, Vec::new(), HashSet::new());
                while !stop.load(Ordering::Relaxed) {
                    match client.score(rows()).await {
                        Ok(r) => {
                            ok += 1;
                            for row in r.into_inner().rows {
                                versions.insert(row.scores[0].version.clone());
                            }
                        }
                        Err(status) => failed.push(status),
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                (ok, failed, versions)
            })
        })
        .collect();

    let mut client = server.client().await;
    load_moves_on(&answered).await;
    let mut good_versions = HashSet::from(["v0".to_owned()]);
    let mut expected: BTreeMap<&str, u32> = BTreeMap::new();
    let mut serving = "v0".to_owned();
    for i in 1..=24 {
        let version = format!("v{i}");
        let mut bad_reason = None;
        if i % 2 == 0 {
            publish::publish(dir.path(), versioned(&version), &good, "txt").unwrap();
            good_versions.insert(version.clone());
            serving = version;
        } else {
            let reason = publish_bad(dir.path(), (i / 2) % 7, &version);
            *expected.entry(reason).or_default() += 1;
            bad_reason = Some(reason);
        }
        let report = client
            .reload_models(pb::ReloadModelsRequest {})
            .await
            .unwrap()
            .into_inner();
        let now_serving = &report
            .models
            .iter()
            .find(|m| m.name == "purchase")
            .unwrap()
            .version;
        assert_eq!(*now_serving, serving, "after publish {i}");
        match bad_reason {
            Some(reason) => {
                let error = report
                    .errors
                    .iter()
                    .find(|e| e.manifest == "purchase.manifest.toml")
                    .expect("the bad file is reported");
                assert_eq!(error.reason, reason, "publish {i}: {error:?}");
            }
            None => assert!(report.errors.is_empty(), "{:?}", report.errors),
        }
        load_moves_on(&answered).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut answered_versions = HashSet::new();
    for task in load {
        let (ok, failed, versions) = task.await.unwrap();
        assert!(
            failed.is_empty(),
            "failed requests during swaps: {failed:?}"
        );
        assert!(
            versions.is_subset(&good_versions),
            "an invalid version answered: {versions:?}"
        );
        answered_versions.extend(versions);
        total += ok;
    }
    // Every version that served was asked while it served: the load ran through every swap.
    assert_eq!(answered_versions, good_versions);
    assert!(total as usize >= 25 * (LOAD_TASKS + 1), "{total} requests");

    let metrics = server.metrics().await;
    for (reason, count) in &expected {
        let series = format!("nudge_model_load_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(
            metric_value(&metrics, &series),
            Some(f64::from(*count)),
            "{series}"
        );
    }
    assert_eq!(
        metric_value(
            &metrics,
            "nudge_model_info{format=\"lightgbm\",name=\"purchase\",version=\"v24\"}"
        ),
        Some(1.0)
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn without_a_model_not_ready_until_one_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.models.dir = dir.path().to_owned();
    let server = TestServer::start_with(config).await;
    let mut health = HealthClient::new(server.channel().await);
    let ready = |health: &mut HealthClient<tonic::transport::Channel>| {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: "nudge.v1.NudgeService".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status
                == 1
        }
    };
    assert!(!ready(&mut health).await);
    // Published into the watched directory: the server notices by itself.
    let (_, good) = shipped();
    publish::publish(dir.path(), versioned("first"), &good, "txt").unwrap();
    let mut waited = Duration::ZERO;
    while !ready(&mut health).await {
        assert!(
            waited < Duration::from_secs(10),
            "the published model never made the server ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    let mut client = server.client().await;
    let answer = client.score(rows()).await.unwrap().into_inner();
    assert_eq!(answer.rows[0].scores[0].version, "first");

    // A rollback is one command (here, the function it runs) and the server follows.
    publish::publish(dir.path(), versioned("second"), &good, "txt").unwrap();
    for target in ["second", "first"] {
        if target == "first" {
            publish::rollback(dir.path(), "purchase").unwrap();
        }
        wait_for_version(&mut client, target).await;
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_binary_reloads_on_sighup() {
    let models = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let (_, good) = shipped();
    publish::publish(models.path(), versioned("before-hup"), &good, "txt").unwrap();
    let env = [
        ("NUDGE__MODELS__DIR", models.path().display().to_string()),
        ("NUDGE__MODELS__WATCH", "false".to_owned()),
    ];
    let mut child = spawn_nudge(data.path(), &env).await;
    let mut client = pb::nudge_service_client::NudgeServiceClient::new(
        crate::crash::until_serving(&child).await,
    );
    assert_eq!(version(&mut client).await, "before-hup");
    // With watching off, a new file changes nothing until SIGHUP: the reload that brings
    // it in is the SIGHUP's (a watcher's event, queued first, would name the reload), and
    // it is the only reload since the start.
    publish::publish(models.path(), versioned("after-hup"), &good, "txt").unwrap();
    assert_eq!(version(&mut client).await, "before-hup");
    child.signal("HUP");
    wait_for_version(&mut client, "after-hup").await;
    // The new version answers as soon as it is swapped in; the reload's log line and
    // count follow it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (swaps, reloads) = loop {
        let swaps = swaps_logged(&child.log());
        let reloads = metric_value(
            &child.metrics().await,
            "nudge_model_reloads_total{outcome=\"ok\"}",
        );
        if !swaps.is_empty() && reloads.is_some() {
            break (swaps, reloads);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reload was not logged and counted; log:\n{}",
            child.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        swaps,
        [("SIGHUP".to_owned(), "after-hup".to_owned())],
        "the one swap is the SIGHUP's"
    );
    assert_eq!(reloads, Some(1.0), "one reload since the start");
    child.kill();
}

/// The (trigger, version) of each "model now serving" line in a JSON log.
fn swaps_logged(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "model now serving")
        .map(|l| {
            let field = |name: &str| l["fields"][name].as_str().unwrap_or("").to_owned();
            (field("trigger"), field("version"))
        })
        .collect()
}
