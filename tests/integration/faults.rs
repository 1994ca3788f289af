//! Storage faults under a running server: a full disk (a small tmpfs filled up), a store
//! directory turned read-only (`chattr +i` on ext4, which refuses writes to files already
//! open, root's too, where tmpfs goes on taking them and a read-only remount is refused
//! while files are open for writing), and a filesystem the kernel turns read-only (ext4
//! on a loop device, errors=remount-ro, with an error injected through sysfs). Writes are
//! refused with UNAVAILABLE, readiness turns NOT_SERVING, nothing acknowledged is lost,
//! and — for the full disk and the read-only directory — the server recovers by itself
//! once the fault clears: SERVING again and every event applied exactly once. A
//! filesystem the kernel remounted read-only comes back only through the operator
//! (unmount, fsck, mount), and then every acknowledged event is there.
//!
//! Mounting needs root and a kernel that lets this container mount; where it cannot, the
//! tests say so on stderr and pass without running (the only skip in the suite).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nudge::pb::{self, EventStatus, EventType};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::support::*;

type Client = pb::nudge_service_client::NudgeServiceClient<tonic::transport::Channel>;

/// A filesystem mounted for one test, unmounted when dropped.
struct Mount {
    dir: tempfile::TempDir,
    /// The image file behind a loop mount.
    image: Option<PathBuf>,
}

impl Mount {
    /// A tmpfs of `mib` MiB, or why not.
    fn tmpfs(mib: u32) -> Result<Mount, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        run(
            "mount",
            &["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"],
            dir.path(),
        )?;
        Ok(Mount { dir, image: None })
    }

    /// An ext4 filesystem of `mib` MiB in an image file on a loop device, mounted with
    /// errors=remount-ro, or why not.
    fn ext4(mib: u64) -> Result<Mount, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let image = dir.path().with_extension("img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .map_err(|e| e.to_string())?;
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .status()
            .map_err(|e| format!("mkfs.ext4: {e}"))?;
        if !made.success() {
            return Err(format!("mkfs.ext4 failed: {made}"));
        }
        let mut args = vec!["-o".to_owned(), "loop,errors=remount-ro".to_owned()];
        args.push(image.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("mount", &args, dir.path())?;
        Ok(Mount {
            dir,
            image: Some(image),
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The sysfs directory of this ext4 filesystem (`/sys/fs/ext4/loopN`).
    fn ext4_sysfs(&self) -> PathBuf {
        let out = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(self.path())
            .output()
            .expect("findmnt runs");
        let source = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let device = Path::new(&source)
            .file_name()
            .expect("a device path")
            .to_owned();
        Path::new("/sys/fs/ext4").join(device)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.path()).status();
        if let Some(image) = &self.image {
            let _ = std::fs::remove_file(image);
        }
    }
}

/// Runs `program args... dir`, or says why it failed.
fn run(program: &str, args: &[&str], dir: &Path) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .arg(dir)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The test's mount, or a clear message and no test where this machine cannot mount.
fn mount_or_skip(mount: Result<Mount, String>, test: &str) -> Option<Mount> {
    match mount {
        Ok(m) => Some(m),
        Err(why) => {
            eprintln!("SKIPPED {test}: cannot mount a test filesystem here ({why})");
            None
        }
    }
}

/// Waits until the readiness service (`nudge.v1.NudgeService`) reports `wanted`, through
/// the health Watch stream; panics after 60 s.
async fn await_readiness(server: &TestServer, wanted: ServingStatus) {
    let mut health = HealthClient::new(server.channel().await);
    let mut statuses = health
        .watch(HealthCheckRequest {
            service: "nudge.v1.NudgeService".into(),
        })
        .await
        .expect("health watch opens")
        .into_inner();
    let reached = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(status) = statuses.next().await {
            if status.expect("a health status").status == wanted as i32 {
                return;
            }
        }
        panic!("the health stream ended");
    })
    .await;
    assert!(reached.is_ok(), "readiness never became {wanted:?}");
}

/// Events sent, by user, and which of them were acknowledged.
#[derive(Default)]
struct Ledger {
    sent: BTreeMap<String, BTreeSet<String>>,
    acknowledged: BTreeSet<String>,
    refused: Vec<pb::Event>,
}

impl Ledger {
    /// Sends one event per user; records what was acknowledged. Answers how many were
    /// refused with UNAVAILABLE (the whole batch is, when the store fails).
    async fn send(&mut self, client: &mut Client, round: usize, users: usize) -> usize {
        let events: Vec<pb::Event> = (0..users)
            .map(|u| {
                event(
                    &format!("e{round}-{u}"),
                    &format!("user-{u}"),
                    EventType::PageView,
                    T0,
                )
            })
            .collect();
        for e in &events {
            self.sent
                .entry(e.user_id.clone())
                .or_default()
                .insert(e.event_id.clone());
        }
        match client
            .track(pb::TrackRequest {
                events: events.clone(),
            })
            .await
        {
            Ok(answer) => {
                for r in answer.into_inner().results {
                    assert_eq!(r.status, EventStatus::Accepted as i32, "{r:?}");
                    self.acknowledged.insert(r.event_id);
                }
                0
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
                let refused = events.len();
                self.refused.extend(events);
                refused
            }
        }
    }

    /// Every event sent was applied exactly once: each user's page views are the
    /// number of distinct events sent for them.
    async fn assert_exactly_once(&self, client: &mut Client) {
        for (user, events) in &self.sent {
            let f = features(client, user).await;
            assert_feature(&f, "page_views_30d", events.len() as f64);
        }
    }
}

/// After a store fault has refused a write: readiness turns NOT_SERVING for the store, and
/// while the fault lasts writes are refused at once. The next round.
async fn not_ready_while_the_fault_lasts(
    server: &TestServer,
    client: &mut Client,
    ledger: &mut Ledger,
    round: usize,
) -> usize {
    await_readiness(server, ServingStatus::NotServing).await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(&metrics, "nudge_not_ready{reason=\"store\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert!(ledger.send(client, round, 20).await > 0);
    round + 1
}

/// Once the fault has cleared: the server is SERVING again by itself after a reopen; the
/// caller retries what was refused, as a caller must; then everything sent was applied
/// exactly once, and new events are taken.
async fn recovered_with_every_event_once(
    server: TestServer,
    mut client: Client,
    mut ledger: Ledger,
    round: usize,
) {
    await_readiness(&server, ServingStatus::Serving).await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(&metrics, "nudge_not_ready{reason=\"store\"}"),
        Some(0.0)
    );
    assert!(metric_value(&metrics, "nudge_store_reopens_total{outcome=\"ok\"}") >= Some(1.0));
    let refused = std::mem::take(&mut ledger.refused);
    for chunk in refused.chunks(100) {
        let answer = client
            .track(pb::TrackRequest {
                events: chunk.to_vec(),
            })
            .await
            .expect("retries are taken after recovery")
            .into_inner();
        for r in answer.results {
            // Accepted, or Duplicate when a refused commit reached the disk after all.
            assert_ne!(r.status, EventStatus::Rejected as i32, "{r:?}");
        }
    }
    assert_eq!(ledger.send(&mut client, round, 20).await, 0);
    ledger.assert_exactly_once(&mut client).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_turns_not_ready_and_recovers_by_itself() {
    let Some(mount) = mount_or_skip(Mount::tmpfs(64), "full disk") else {
        return;
    };
    let mut config = test_config();
    config.store.dir = mount.path().join("store");
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    await_readiness(&server, ServingStatus::Serving).await;
    let mut ledger = Ledger::default();
    for round in 0..5 {
        assert_eq!(ledger.send(&mut client, round, 20).await, 0);
    }

    // Fill the filesystem to the last byte.
    let filler = mount.path().join("filler");
    {
        use std::io::Write as _;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0xa5u8; 1 << 16];
        while file.write_all(&block).is_ok() {}
        while file.write_all(&[0]).is_ok() {}
        let _ = file.sync_all();
    }
    // Events go on arriving; the store runs out of room within a few pages of them.
    let mut round = 5;
    while ledger.refused.is_empty() {
        ledger.send(&mut client, round, 20).await;
        round += 1;
        assert!(round < 5_000, "the full disk never refused a write");
    }
    round = not_ready_while_the_fault_lasts(&server, &mut client, &mut ledger, round).await;

    // Space returns: the server recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    recovered_with_every_event_once(server, client, ledger, round).await;
    drop(mount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_directory_turned_read_only_refuses_writes_and_recovers_by_itself() {
    let Some(mount) = mount_or_skip(Mount::ext4(128), "read-only store directory") else {
        return;
    };
    let store_dir = mount.path().join("store");
    let mut config = test_config();
    config.store.dir = store_dir.clone();
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    await_readiness(&server, ServingStatus::Serving).await;
    let mut ledger = Ledger::default();
    for round in 0..5 {
        assert_eq!(ledger.send(&mut client, round, 20).await, 0);
    }

    // Every file and directory of the store immutable: no write, no new file, for root too.
    let store_arg = store_dir.display().to_string();
    let chattr = |flag: &str| {
        let done = Command::new("chattr")
            .args(["-R", flag, &store_arg])
            .status()
            .expect("chattr runs");
        assert!(done.success(), "chattr -R {flag}: {done}");
    };
    chattr("+i");
    let mut round = 5;
    while ledger.refused.is_empty() {
        ledger.send(&mut client, round, 20).await;
        round += 1;
        assert!(round < 100, "the read-only directory never refused a write");
    }
    round = not_ready_while_the_fault_lasts(&server, &mut client, &mut ledger, round).await;

    // Writable again: the server recovers by itself.
    chattr("-i");
    recovered_with_every_event_once(server, client, ledger, round).await;
    drop(mount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filesystem_turned_read_only_refuses_writes_turns_not_ready_and_loses_nothing() {
    let Some(mount) = mount_or_skip(Mount::ext4(128), "read-only filesystem") else {
        return;
    };
    let store_dir = mount.path().join("store");
    let mut config = test_config();
    config.store.dir = store_dir.clone();
    let server = TestServer::start_with(config.clone()).await;
    let mut client = server.client().await;
    let mut ledger = Ledger::default();
    for round in 0..5 {
        assert_eq!(ledger.send(&mut client, round, 20).await, 0);
    }
    // What the kernel does on a disk error with errors=remount-ro.
    std::fs::write(mount.ext4_sysfs().join("trigger_fs_error"), "nudge test")
        .expect("ext4 takes an injected error");
    let mut round = 5;
    while ledger.refused.is_empty() {
        ledger.send(&mut client, round, 20).await;
        round += 1;
        assert!(
            round < 100,
            "the read-only filesystem never refused a write"
        );
    }
    await_readiness(&server, ServingStatus::NotServing).await;
    assert!(ledger.send(&mut client, round, 20).await > 0);
    // Reads still answer from what was committed.
    let f = features(&mut client, "user-0").await;
    assert!(f["page_views_30d"] >= 5.0, "{f:?}");
    // Shutdown cannot sync a read-only store; that is its error to report.
    let _ = server.stop().await;

    // The operator's way back: unmount, check, mount again. Every acknowledged event is
    // there, once.
    let image = mount.image.clone().expect("a loop mount");
    let dir = mount.path().to_owned();
    run("umount", &[], &dir).expect("unmounts");
    let checked = Command::new("e2fsck")
        .args(["-f", "-y"])
        .arg(&image)
        .status()
        .expect("e2fsck runs");
    assert!(checked.code().is_some_and(|c| c <= 1), "e2fsck: {checked}");
    let image_arg = image.display().to_string();
    run("mount", &["-o", "loop", &image_arg], &dir).expect("mounts again");
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    // Everything is sent again, as callers retry: what was acknowledged is a duplicate,
    // and then every event sent is applied exactly once.
    for (user, ids) in &ledger.sent {
        let events: Vec<pb::Event> = ids
            .iter()
            .map(|id| event(id, user, EventType::PageView, T0))
            .collect();
        let answer = client
            .track(pb::TrackRequest { events })
            .await
            .expect("the remounted store takes writes")
            .into_inner();
        for r in answer.results {
            if ledger.acknowledged.contains(&r.event_id) {
                assert_eq!(r.status, EventStatus::Duplicate as i32, "lost: {r:?}");
            }
        }
    }
    ledger.assert_exactly_once(&mut client).await;
    server.stop().await.unwrap();
    drop(mount);
}
