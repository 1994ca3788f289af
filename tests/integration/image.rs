//! The container image's layout, tested without Docker: the runtime stage of the
//! `Dockerfile` is laid out in a temporary directory as Docker would lay it out (its COPY,
//! WORKDIR, RUN, VOLUME, ENV, USER, ENTRYPOINT and CMD read from the file), and the real
//! binary runs there as the image's user with the image's working directory and command.
//! It must become SERVING and accept a Track, which needs a store directory it can write.

use std::io::BufRead as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tokio_stream::StreamExt as _;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use nudge::pb::{self, EventType};

use crate::support::*;

/// Docker's default `PATH` in a container, where `ENTRYPOINT ["nudge"]` is looked up.
const DOCKER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The runtime stage's instructions, one per logical line (continuations joined), after
/// the last `FROM`.
fn runtime_stage(dockerfile: &str) -> Vec<(String, String)> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let last_from = logical
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("the Dockerfile has a FROM");
    logical[last_from + 1..]
        .iter()
        .map(|l| {
            let (instruction, rest) = l.split_once(' ').unwrap_or((l, ""));
            (instruction.to_uppercase(), rest.trim().to_owned())
        })
        .collect()
}

/// An image being laid out under `root`, as a Docker build of the runtime stage would.
struct Image {
    root: PathBuf,
    workdir: String,
    env: Vec<(String, String)>,
    user: (u32, u32),
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    volumes: Vec<String>,
}

impl Image {
    /// `path` (absolute, in the image) on the host.
    fn host(&self, path: &str) -> PathBuf {
        let relative = if path.starts_with('/') {
            PathBuf::from(path)
        } else {
            Path::new(&self.workdir).join(path)
        };
        self.root.join(relative.strip_prefix("/").unwrap())
    }

    /// Creates the directories of `path` that are missing, owned by root, mode 755, as
    /// Docker creates the parents of a COPY destination and a WORKDIR.
    fn make_dirs(&self, path: &Path) {
        let mut at = self.root.clone();
        for part in path.strip_prefix(&self.root).unwrap().components() {
            at.push(part);
            if !at.exists() {
                std::fs::create_dir(&at).unwrap();
                std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
    }

    /// Where a COPY source is on this machine. The build context is the repository. The
    /// build stage is the repository after `scripts/setup.sh` and a release build: its
    /// binary is the one under test, and its ONNX Runtime library is the one the tests use
    /// (helper worktrees have no `.tools/` of their own).
    fn source(from_build: bool, path: &str) -> PathBuf {
        if !from_build {
            return repo_path(path);
        }
        let relative = path
            .strip_prefix("/src/")
            .unwrap_or_else(|| panic!("a build-stage path outside /src: {path}"));
        if relative == "target/release/nudge" {
            return PathBuf::from(env!("CARGO_BIN_EXE_nudge"));
        }
        let in_repo = repo_path(relative);
        if in_repo.exists() {
            return in_repo;
        }
        let ort = PathBuf::from(std::env::var_os("ORT_DYLIB_PATH").unwrap_or_default());
        assert_eq!(
            ort.file_name(),
            Path::new(relative).file_name(),
            "the build stage's {path} is not here"
        );
        ort
    }

    fn copy(&self, args: &str) {
        let mut from_build = false;
        let mut chown = None;
        let mut paths = Vec::new();
        for word in args.split_whitespace() {
            if let Some(stage) = word.strip_prefix("--from=") {
                assert_eq!(stage, "build", "COPY from an unknown stage");
                from_build = true;
            } else if let Some(owner) = word.strip_prefix("--chown=") {
                chown = Some(parse_user(owner));
            } else {
                assert!(
                    !word.starts_with("--"),
                    "COPY option {word} is not modelled"
                );
                paths.push(word);
            }
        }
        let dest = paths.pop().expect("COPY has a destination");
        let into_dir = dest.ends_with('/') || paths.len() > 1;
        for source in paths {
            let source = Image::source(from_build, source);
            let target = if into_dir {
                self.host(dest).join(source.file_name().unwrap())
            } else {
                self.host(dest)
            };
            self.make_dirs(target.parent().unwrap());
            copy_tree(&source, &target, chown);
        }
    }

    /// RUN lines are not shell here: the runtime stage may install packages (the host has
    /// what they provide) and make directories with `install -d`; anything else must be
    /// modelled before the test can vouch for the layout.
    fn run(&self, script: &str) {
        for command in script.split("&&").map(str::trim) {
            let words: Vec<&str> = command.split_whitespace().collect();
            let program = words
                .iter()
                .find(|w| !w.contains('='))
                .copied()
                .unwrap_or("");
            match program {
                "apt-get" => {}
                "rm" if command.contains("/var/lib/apt/lists") => {}
                "install" => self.install_dirs(&words[1..]),
                _ => panic!("RUN {command:?} is not modelled by this test"),
            }
        }
    }

    /// `install -d [-o UID] [-g GID] [-m MODE] DIR...`
    fn install_dirs(&self, args: &[&str]) {
        let (mut owner, mut group, mut mode) = (0, 0, 0o755);
        let mut dirs = Vec::new();
        let mut directory = false;
        let mut words = args.iter();
        while let Some(word) = words.next() {
            match *word {
                "-d" => directory = true,
                "-o" => owner = words.next().unwrap().parse().unwrap(),
                "-g" => group = words.next().unwrap().parse().unwrap(),
                "-m" => mode = u32::from_str_radix(words.next().unwrap(), 8).unwrap(),
                dir => dirs.push(dir),
            }
        }
        assert!(directory, "only `install -d` is modelled");
        for dir in dirs {
            let path = self.host(dir);
            self.make_dirs(&path);
            std::os::unix::fs::chown(&path, Some(owner), Some(group)).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }

    /// Lays out the runtime stage of `dockerfile` under `root`.
    fn build(dockerfile: &str, root: &Path) -> Image {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut image = Image {
            root: root.to_owned(),
            workdir: "/".into(),
            env: vec![("PATH".into(), DOCKER_PATH.into())],
            user: (0, 0),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            volumes: Vec::new(),
        };
        for (instruction, args) in runtime_stage(dockerfile) {
            match instruction.as_str() {
                "RUN" => image.run(&args),
                "COPY" => image.copy(&args),
                "WORKDIR" => {
                    image.workdir = Path::new(&image.workdir).join(&args).display().to_string();
                    image.make_dirs(&image.host("."));
                }
                "ENV" => {
                    for pair in args.split_whitespace() {
                        let (key, value) = pair.split_once('=').expect("ENV KEY=VALUE");
                        assert!(!value.contains('"'), "quoted ENV values are not modelled");
                        image.env.push((key.into(), value.into()));
                    }
                }
                "USER" => image.user = parse_user(&args),
                "VOLUME" => {
                    let volumes: Vec<String> = serde_json::from_str(&args)
                        .unwrap_or_else(|_| args.split_whitespace().map(String::from).collect());
                    for volume in volumes {
                        // A volume's mount point that the image lacks is made by Docker,
                        // owned by root.
                        image.make_dirs(&image.host(&volume));
                        image.volumes.push(volume);
                    }
                }
                "ENTRYPOINT" => image.entrypoint = serde_json::from_str(&args).unwrap(),
                "CMD" => image.cmd = serde_json::from_str(&args).unwrap(),
                "EXPOSE" => {}
                other => panic!("Dockerfile instruction {other} is not modelled by this test"),
            }
        }
        image
    }

    /// The image's command, as the image's user in its working directory, with the
    /// image's environment (absolute paths in it taken into the layout) and `overrides`,
    /// as `docker run -e` gives them.
    fn command(&self, overrides: &[(&str, String)]) -> Command {
        let program = self
            .entrypoint
            .first()
            .expect("the image has an ENTRYPOINT");
        let binary = DOCKER_PATH
            .split(':')
            .map(|dir| self.host(dir).join(program))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{program} is not on the image's PATH"));
        let mut command = Command::new(binary);
        command
            .args(&self.entrypoint[1..])
            .args(&self.cmd)
            .current_dir(self.host("."))
            .env_clear()
            .uid(self.user.0)
            .gid(self.user.1);
        for (key, value) in &self.env {
            let value = if value.starts_with('/') && key != "PATH" {
                self.host(value).display().to_string()
            } else {
                value.clone()
            };
            command.env(key, value);
        }
        command.envs(overrides.iter().map(|(k, v)| (k, v)));
        command
    }
}

impl Image {
    /// The config the image's command names with `--config`, as the server reads it.
    fn config(&self) -> nudge::config::Config {
        let args: Vec<&String> = self.entrypoint.iter().chain(&self.cmd).collect();
        let file = args
            .iter()
            .position(|a| *a == "--config")
            .map(|i| self.host(args[i + 1]))
            .expect("the image's command names its config");
        nudge::config::Config::load(Some(&file), std::iter::empty()).unwrap()
    }
}

fn parse_user(spec: &str) -> (u32, u32) {
    let (user, group) = spec.split_once(':').unwrap_or((spec, spec));
    (
        user.parse().expect("a numeric user"),
        group.parse().expect("a numeric group"),
    )
}

/// Copies a file or a directory's contents, keeping modes (as COPY keeps them from the
/// build context), owned by root unless `chown` says otherwise.
fn copy_tree(source: &Path, target: &Path, chown: Option<(u32, u32)>) {
    if source.is_dir() {
        if !target.exists() {
            std::fs::create_dir(target).unwrap();
        }
        let mode = std::fs::metadata(source).unwrap().mode() & 0o7777;
        std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode)).unwrap();
        for entry in std::fs::read_dir(source).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &target.join(entry.file_name()), chown);
        }
    } else {
        std::fs::copy(source, target).unwrap();
    }
    let (uid, gid) = chown.unwrap_or((0, 0));
    std::os::unix::fs::chown(target, Some(uid), Some(gid)).unwrap();
}

#[tokio::test]
async fn the_image_layout_serves_as_its_user() {
    assert_eq!(
        effective_uid(),
        0,
        "this test lays out root-owned files and runs the binary as the image's user: run it as root"
    );
    let dockerfile = std::fs::read_to_string(repo_path("Dockerfile")).unwrap();
    let root = tempfile::tempdir().unwrap();
    let image = Image::build(&dockerfile, root.path());
    assert_ne!(image.user.0, 0, "the image runs as a non-root user");

    // Ports chosen by the kernel (bound, so no other test can take them first), read back
    // from the "serving" line; JSON logs so that line is data.
    let mut child = Running(
        image
            .command(&[
                ("NUDGE__SERVER__GRPC_ADDR", "127.0.0.1:0".to_owned()),
                ("NUDGE__SERVER__METRICS_ADDR", "127.0.0.1:0".to_owned()),
                ("NUDGE__LOG__FORMAT", "json".to_owned()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );

    // The log says "serving" once the listeners are bound, or the process ends first.
    let stderr = child.0.stderr.take().unwrap();
    let (log, serving) = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut log = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            log.push_str(&line);
            log.push('\n');
            if let Some((grpc, _)) = serving_addrs(&line) {
                // Keep draining the log so the server never blocks on a full pipe.
                std::thread::spawn(move || lines.for_each(drop));
                return (log, Some(grpc));
            }
        }
        (log, None)
    })
    .await
    .unwrap();
    let Some(grpc) = serving else {
        let status = child.0.wait().unwrap();
        panic!("the image's command exited ({status}) before serving; log:\n{log}");
    };

    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let status = watch.next().await.expect("health stream open").unwrap();
        if status.status == ServingStatus::Serving as i32 {
            break;
        }
    }
    let mut client = nudge::pb::nudge_service_client::NudgeServiceClient::new(channel);
    let response = track(
        &mut client,
        // The binary runs on the system clock.
        vec![event(
            "img-1",
            "u-image",
            EventType::PageView,
            nudge::time::Clock::now(&nudge::time::SystemClock),
        )],
    )
    .await;
    assert_eq!(
        response.results.first().map(|r| r.status),
        Some(pb::EventStatus::Accepted as i32),
        "{response:?}"
    );
    let profile = client
        .get_profile(pb::GetProfileRequest {
            person: person("u-image"),
            as_of: None,
        })
        .await;
    assert!(profile.is_ok(), "{profile:?}");
    // An open health watch is a call in flight, which shutdown would wait out its grace for.
    drop((watch, client));

    let killed = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Waited for off the runtime, which must keep running the dropped client's connection
    // task so the connection closes and shutdown need not wait out its grace.
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "exit status; log so far:\n{log}");

    // The store was written where the image's config puts it: on a volume, owned by the
    // image's user.
    let data = image.host(&image.config().store.dir.display().to_string());
    let owner = std::fs::metadata(&data)
        .map(|m| (m.uid(), m.gid()))
        .unwrap_or_else(|e| panic!("no store at {}: {e}", data.display()));
    assert_eq!(owner, image.user);
    assert!(
        image.volumes.iter().any(|v| image.host(v) == data),
        "the store directory {} is not a VOLUME ({:?}): a container's writes would be lost with it",
        data.display(),
        image.volumes
    );
}

/// The image listens on every address, so as shipped it refuses to start in plaintext
/// without keys, saying what to configure; said on purpose, it starts.
#[tokio::test]
async fn the_image_refuses_the_network_without_tls_and_keys() {
    assert_eq!(
        effective_uid(),
        0,
        "run as root (see the_image_layout_serves_as_its_user)"
    );
    let dockerfile = std::fs::read_to_string(repo_path("Dockerfile")).unwrap();
    let root = tempfile::tempdir().unwrap();
    let image = Image::build(&dockerfile, root.path());
    let out = image.command(&[]).stdout(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("would serve plaintext"), "{log}");
    assert!(log.contains("would take calls without an API key"), "{log}");
}

/// A child process that is killed if the test ends before it exits.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The owner of `/proc/self`, which is this process's effective uid.
fn effective_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}
