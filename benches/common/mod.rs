//! What the benchmarks share: percentiles, resident memory, and a real server on loopback.

#![allow(dead_code)] // Each benchmark uses its own part.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nudge::app::Server;
use nudge::config::Config;
use nudge::time::Clock;

/// The `q` quantile of sorted durations, in milliseconds.
pub fn percentile(sorted: &[Duration], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3
}

/// This process's resident memory, in bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU time this process's threads used so far, in seconds: the shard threads' and the
/// others' (the gRPC runtime, and a benchmark's own load generator when it runs in the
/// same process).
pub fn cpu_seconds() -> (f64, f64) {
    // utime and stime, in clock ticks (100 per second on Linux).
    let tick = 100.0;
    let mut shards = 0.0;
    let mut others = 0.0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // The command name is in parentheses and may hold spaces: split after it.
        let Some((head, tail)) = stat.rsplit_once(") ") else {
            continue;
        };
        let fields: Vec<&str> = tail.split(' ').collect();
        let used =
            fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
        if head.contains("(nudge-shard") {
            shards += used / tick;
        } else {
            others += used / tick;
        }
    }
    (shards, others)
}

/// The server's metrics text.
pub async fn scrape(metrics_addr: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .expect("the metrics endpoint answers")
        .text()
        .await
        .expect("the metrics endpoint answers text")
}

/// The sum of a metric's samples over all its label sets (0 when absent).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// A running server: stop it with `stop.send(())` and await `task`.
pub struct Running {
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub addr: String,
    pub metrics_addr: std::net::SocketAddr,
    /// From bind to the health check answering SERVING.
    pub to_serving: Duration,
}

/// Starts a server on loopback and waits until it is SERVING.
pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Running {
    let started = Instant::now();
    let server = Server::bind(config, clock).await.unwrap();
    let addr = format!("http://{}", server.grpc_addr());
    let metrics_addr = server.metrics_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    loop {
        if let Ok(channel) = tonic::transport::Channel::from_shared(addr.clone())
            .unwrap()
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let request = tonic_health::pb::HealthCheckRequest {
                service: "nudge.v1.NudgeService".into(),
            };
            if health
                .check(request)
                .await
                .is_ok_and(|r| r.into_inner().status == 1)
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Running {
        stop,
        task,
        addr,
        metrics_addr,
        to_serving: started.elapsed(),
    }
}
