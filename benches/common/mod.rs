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
    rss_of("/proc/self/status")
}

/// glibc's own count of this process's heap: (bytes in use, bytes free inside its arenas).
/// Resident memory beyond the first is fragmentation or memory outside malloc (mmap'd
/// store files, thread stacks).
pub fn malloc_bytes() -> (u64, u64) {
    /// `struct mallinfo2` of glibc 2.33+: ten `size_t`s.
    #[repr(C)]
    #[derive(Default)]
    struct Mallinfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }
    extern "C" {
        fn mallinfo2() -> Mallinfo2;
    }
    // SAFETY: mallinfo2 takes nothing and returns a plain struct by value.
    let info = unsafe { mallinfo2() };
    ((info.uordblks + info.hblkhd) as u64, info.fordblks as u64)
}

/// Process `pid`'s resident memory, in bytes (0 once it is gone).
pub fn rss_of_pid(pid: u32) -> u64 {
    rss_of(&format!("/proc/{pid}/status"))
}

/// The resident memory in a `/proc/<pid>/status` file, in bytes (0 when unreadable).
fn rss_of(status: &str) -> u64 {
    let status = std::fs::read_to_string(status).unwrap_or_default();
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

/// The real `nudge` binary, serving the shipped config (`config/nudge.toml`, its models
/// and rules) with its store in a directory of its own, on loopback ports it chose itself,
/// optionally pinned to CPUs (a `taskset` list): a server measured apart from its load
/// generator. Killed when dropped; [`Binary::stop`] stops it as an operator would.
pub struct Binary {
    child: std::process::Child,
    pub addr: String,
    pub metrics_addr: std::net::SocketAddr,
    /// The store's directory, removed with the value.
    _store: tempfile::TempDir,
    /// The last lines of its log, for a failure's message.
    log: Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
}

impl Binary {
    /// Starts the binary, with `env` added to its environment, and waits (up to 60 s) for
    /// its "serving" log line, which names the addresses it bound.
    pub fn spawn(cpus: Option<&str>, env: &[(&str, &str)]) -> Binary {
        use std::io::BufRead as _;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let store = tempfile::tempdir().expect("a temporary directory");
        let binary = env!("CARGO_BIN_EXE_nudge");
        let mut command = match cpus {
            Some(cpus) => {
                let mut c = std::process::Command::new("taskset");
                c.args(["-c", cpus, binary]);
                c
            }
            None => std::process::Command::new(binary),
        };
        let mut child = command
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .current_dir(root)
            .env("NUDGE__STORE__DIR", store.path())
            .env("NUDGE__LOG__FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the nudge binary starts (and taskset exists, when pinning)");
        let stderr = child.stderr.take().expect("piped");
        let log = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let (serving, addresses) = std::sync::mpsc::channel();
        std::thread::spawn({
            let log = log.clone();
            move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(addrs) = serving_addrs(&line) {
                        let _ = serving.send(addrs);
                    }
                    let mut log = log.lock().unwrap();
                    if log.len() == 50 {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
            }
        });
        let Ok((grpc, metrics_addr)) = addresses.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            let lines: Vec<String> = log.lock().unwrap().iter().cloned().collect();
            panic!(
                "the nudge binary did not serve within 60 s; its log:\n{}",
                lines.join("\n")
            );
        };
        Binary {
            child,
            addr: format!("http://{grpc}"),
            metrics_addr,
            _store: store,
            log,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and waits for the exit: panics, with the log's last lines, unless the
    /// server exits 0.
    pub fn stop(mut self) {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -TERM");
        let status = self.child.wait().expect("the server is waited for");
        let lines: Vec<String> = self.log.lock().unwrap().iter().cloned().collect();
        assert!(status.success(), "{status}; log:\n{}", lines.join("\n"));
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gRPC and metrics addresses of the binary's JSON "serving" log line.
fn serving_addrs(line: &str) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
    let json: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = &json["fields"];
    if fields["message"] != "serving" {
        return None;
    }
    Some((
        fields["grpc_addr"].as_str()?.parse().ok()?,
        fields["metrics_addr"].as_str()?.parse().ok()?,
    ))
}

/// Pins this process (every thread it has now and every one it starts later) to `cpus`,
/// a `taskset` list.
pub fn pin_self(cpus: &str) {
    let pinned = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("taskset runs");
    assert!(pinned.success(), "taskset -c {cpus} refused");
}
