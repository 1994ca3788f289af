//! The shipped Grafana dashboard against a real Prometheus (Debian's `prometheus`, which
//! `scripts/test.sh` installs) scraping a real Nudge under load: every PromQL expression in
//! `deploy/grafana/nudge.json` must parse and return data. Grafana itself cannot be
//! installed on these machines; its part — substituting `$__rate_interval` — is done here.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nudge::pb::{self, nudge_service_client::NudgeServiceClient, EventType};
use nudge::security::keys::{self, Scope};

use crate::support::*;

/// Every `expr` of every panel's targets.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_path("deploy/grafana/nudge.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has an expr");
            queries.push((panel["title"].as_str().unwrap().to_owned(), expr.to_owned()));
        }
    }
    queries
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts Prometheus scraping `target` every second; its address once it is ready.
async fn prometheus(dir: &std::path::Path, target: SocketAddr) -> (Prometheus, SocketAddr) {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: nudge\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let binary = which("prometheus").expect(
        "the prometheus binary (Debian's `prometheus` package; scripts/test.sh installs it)",
    );
    // The port is chosen free and then given to Prometheus, which cannot report a port it
    // chose itself; if another process takes it in between, the next one is tried.
    for _ in 0..5 {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Prometheus(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = server.0.try_wait() {
                break;
            }
            let ready = reqwest::get(format!("http://{addr}/-/ready")).await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return (server, addr);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = server.0.kill();
    }
    panic!("Prometheus did not start");
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// One instant query: `Err` when Prometheus refuses it (a parse error), else whether it
/// returned at least one finite value.
async fn has_data(prometheus: SocketAddr, expr: &str) -> Result<bool, String> {
    let body = reqwest::Client::new()
        .get(format!("http://{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    let answer: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    if answer["status"] != "success" {
        return Err(format!("{}: {}", answer["errorType"], answer["error"]));
    }
    let result = &answer["data"]["result"];
    let finite = |v: &serde_json::Value| {
        v[1].as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    };
    Ok(match answer["data"]["resultType"].as_str() {
        Some("vector") => result
            .as_array()
            .unwrap()
            .iter()
            .any(|s| finite(&s["value"])),
        Some("scalar") => finite(result),
        _ => false,
    })
}

fn authorized<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_parses_and_returns_data_from_a_real_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    // A webhook endpoint that takes every trigger, so delivery has figures.
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_port = receiver.local_addr().unwrap().port();
    let app = axum::Router::new().route("/hook", axum::routing::post(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(receiver, app).await.unwrap() });

    let keys_file = dir.path().join("keys.toml");
    let key = keys::add(&keys_file, "loadgen", &Scope::ALL, 0.0, 0).unwrap();
    let mut config = test_config();
    config.auth.keys_file = Some(keys_file);
    config.triggers.webhooks = vec![nudge::config::WebhookConfig {
        name: "crm".into(),
        url: format!("http://127.0.0.1:{hook_port}/hook"),
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        secret_file: None,
        rules: vec![],
        concurrency: 2,
        rate_per_second: 500.0,
        max_attempts: 3,
        initial_backoff_ms: 10,
        max_backoff_ms: 100,
        timeout_ms: 2000,
        allow_internal_addresses: true,
        format: Default::default(),
        cloudevents_source: "/nudge".into(),
    }];
    let server = Arc::new(TestServer::start_with(config).await);
    let (_prometheus, prom) = prometheus(dir.path(), server.metrics_addr).await;

    // Load until every query has data: events of each kind, a rejected one, a call without
    // a key, on-demand scores, and time moving on so that abandoned carts' timers fire.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let server = server.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut client = NudgeServiceClient::new(server.channel().await);
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let now = T0.plus_ms(round as i64 * 60_000);
                server.clock.set(now);
                let mut events = Vec::new();
                for p in 0..20 {
                    let user = format!("u{}-{p}", round % 50);
                    let id = |k: &str| format!("{round}-{p}-{k}");
                    // Three products, 150 s each: the shipped `engaged_browser` rule fires
                    // on the event, so event → trigger latency has figures.
                    for sku in ["sku-1", "sku-2", "sku-3"] {
                        let view = product_view(&id(sku), &user, now, sku, "cameras", Some(150.0));
                        events.push(view);
                    }
                    events.push(event(&id("page"), &user, EventType::PageView, now));
                    let mut cart = event(&id("cart"), &user, EventType::AddToCart, now);
                    let line = props(&mut cart);
                    line.product_id = Some("sku-1".into());
                    line.price = Some(120.0);
                    line.quantity = Some(1);
                    events.push(cart);
                    if p % 4 == 0 {
                        let mut bought = event(&id("buy"), &user, EventType::Purchase, now);
                        props(&mut bought).order_value = Some(120.0);
                        events.push(bought);
                    }
                }
                // Refused: no id.
                events.push(event("", "u0", EventType::PageView, now));
                let _ = client
                    .track(authorized(pb::TrackRequest { events }, &key))
                    .await;
                let _ = client
                    .score(authorized(
                        pb::ScoreRequest {
                            subject: Some(pb::score_request::Subject::Person(
                                person("u0-0").unwrap(),
                            )),
                            models: vec![],
                        },
                        &key,
                    ))
                    .await;
                let _ = client.list_models(pb::ListModelsRequest::default()).await;
                server.tick().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let queries: Vec<(String, String)> = dashboard_queries()
        .into_iter()
        .map(|(title, expr)| (title, expr.replace("$__rate_interval", "1m")))
        .collect();
    assert!(queries.len() >= 30, "{} queries", queries.len());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut missing: Vec<(String, String)>;
    loop {
        missing = Vec::new();
        for (title, expr) in &queries {
            match has_data(prom, expr).await {
                Ok(true) => {}
                Ok(false) => missing.push((title.clone(), expr.clone())),
                Err(e) => panic!("Prometheus refused the query of {title:?}:\n{expr}\n{e}"),
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let server =
        Arc::try_unwrap(server).unwrap_or_else(|_| panic!("the load task holds no server"));
    server.stop().await.unwrap();
    assert!(
        missing.is_empty(),
        "queries without data after 120 s of load:\n{}",
        missing
            .iter()
            .map(|(t, e)| format!("  {t}: {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
