//! Hot-swap benchmark, through the real gRPC server on loopback with file watching on:
//! Score latency under load without swaps and while a new model version is published every
//! half second, and the time from a published file to the new version serving.
//!
//! `cargo bench --bench swap`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nudge::app::Server;
use nudge::config::Config;
use nudge::model::manifest::Manifest;
use nudge::model::publish;
use nudge::pb::{self, nudge_service_client::NudgeServiceClient, score_request::Subject};
use nudge::time::SystemClock;

const SECONDS: u64 = 10;
const CLIENTS: usize = 3;

fn request() -> pb::ScoreRequest {
    pb::ScoreRequest {
        subject: Some(Subject::FeatureRows(pb::FeatureRows {
            rows: (0..10)
                .map(|i| pb::FeatureRow {
                    values: [
                        ("cart_value".to_owned(), i as f64 * 9.0),
                        ("sessions_7d".to_owned(), 2.0),
                    ]
                    .into(),
                })
                .collect(),
            ..Default::default()
        })),
        models: vec![],
    }
}

fn pct(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3
}

async fn load(addr: String, stop: Arc<AtomicBool>) -> (Vec<Duration>, usize) {
    let mut client = NudgeServiceClient::connect(addr).await.unwrap();
    let (mut latencies, mut failures) = (Vec::new(), 0);
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match client.score(request()).await {
            Ok(_) => latencies.push(started.elapsed()),
            Err(_) => failures += 1,
        }
    }
    (latencies, failures)
}

async fn run(
    addr: &str,
    publish_every: Option<(Duration, std::path::PathBuf)>,
) -> (Vec<Duration>, usize, Vec<Duration>) {
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(load(addr.to_owned(), stop.clone())))
        .collect();
    let mut to_serving = Vec::new();
    let until = Instant::now() + Duration::from_secs(SECONDS);
    if let Some((every, dir)) = publish_every {
        let shipped =
            Manifest::parse(&std::fs::read_to_string(Manifest::path_in(&dir, "purchase")).unwrap())
                .unwrap();
        let bytes = std::fs::read(dir.join(&shipped.file)).unwrap();
        let mut client = NudgeServiceClient::connect(addr.to_owned()).await.unwrap();
        let mut n = 0;
        while Instant::now() < until {
            n += 1;
            let mut m = shipped.clone();
            m.version = format!("swap-{n}");
            let published = Instant::now();
            publish::publish(&dir, m, &bytes, "txt").unwrap();
            loop {
                let list = client
                    .list_models(pb::ListModelsRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                if list.models.iter().any(|m| m.version == format!("swap-{n}")) {
                    to_serving.push(published.elapsed());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(every.saturating_sub(published.elapsed())).await;
        }
    } else {
        tokio::time::sleep(Duration::from_secs(SECONDS)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut all, mut failures) = (Vec::new(), 0);
    for c in clients {
        let (l, f) = c.await.unwrap();
        all.extend(l);
        failures += f;
    }
    all.sort();
    to_serving.sort();
    (all, failures, to_serving)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let models = tempfile::tempdir().unwrap();
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        for entry in std::fs::read_dir(&shipped).unwrap().flatten() {
            std::fs::copy(entry.path(), models.path().join(entry.file_name())).unwrap();
        }
        let data = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
        config.server.metrics_addr = "127.0.0.1:0".parse().unwrap();
        config.models.dir = models.path().to_owned();
        config.store.dir = data.path().to_owned();
        let server = Server::bind(config, Arc::new(SystemClock)).await.unwrap();
        let addr = format!("http://{}", server.grpc_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;

        println!("Score (10 rows, purchase + churn) from {CLIENTS} clients for {SECONDS} s each:");
        let (quiet, failed, _) = run(&addr, None).await;
        println!(
            "  without swaps: {:>6} requests, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {failed} failed",
            quiet.len(),
            pct(&quiet, 0.5),
            pct(&quiet, 0.99),
            pct(&quiet, 1.0)
        );
        let (busy, failed, to_serving) = run(&addr, Some((Duration::from_millis(500), models.path().to_owned()))).await;
        println!(
            "  during swaps:  {:>6} requests, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {failed} failed ({} versions published)",
            busy.len(),
            pct(&busy, 0.5),
            pct(&busy, 0.99),
            pct(&busy, 1.0),
            to_serving.len()
        );
        println!(
            "  published file -> new version serving (watcher, 200 ms settle included): p50 {:.0} ms, max {:.0} ms",
            pct(&to_serving, 0.5),
            pct(&to_serving, 1.0)
        );
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    });
}
