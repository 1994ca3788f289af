//! Property-based fuzz targets on stable Rust (cargo-fuzz needs nightly): each target
//! drives one of Nudge's input parsers through its public entry point with proptest-made
//! inputs — wire messages from random bytes and from structured random messages, rules
//! files, CEL expressions run against random people, model files and manifests mutated
//! from the shipped ones, the config file and its `NUDGE__` overrides, packed Score rows
//! — and holds it to one property: bad input is an error, never a panic (plus what each
//! target states of its answers).
//!
//! A harness of its own (`harness = false`): `cargo test` runs a short pass of every
//! target; `scripts/fuzz.sh [CASES] [TARGET...]` runs longer ones.
//!   - `NUDGE_FUZZ_CASES`: cases per target (default: each target's short count).
//!   - `NUDGE_FUZZ_TIMEOUT_SECONDS`: how long one case of a model target may run before
//!     it counts as a hang and ends the process (default 60).
//!   - `NUDGE_FUZZ_SEED`: the random seed (default fixed, so a short pass is repeatable;
//!     `random` draws one, printed so a failure can be replayed).
//!   - arguments: the targets to run (default all); `--list` names them.
//!
//! A failure is shrunk to a small input and printed with the panic's message and place.
//! Panics that the code under test catches itself (its guards around CEL and LightGBM)
//! are counted and the first is shown: each is a defect in a dependency, held off.

mod gen;
mod targets;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use proptest::test_runner::{Config, RngAlgorithm, RngSeed, TestCaseError, TestError, TestRunner};

/// One fuzz target: its name, its cases in the short pass, and its body.
pub struct Target {
    pub name: &'static str,
    /// What it feeds which entry point, for `--list`.
    pub about: &'static str,
    pub short: u32,
    pub run: fn(&mut TestRunner) -> Result<(), String>,
    /// Runs the target's body once on a file's bytes (`--replay TARGET FILE`), for the
    /// targets whose crash [`remember`] keeps.
    pub replay: Option<fn(&[u8])>,
}

/// Every panic on any thread since the last [`take_panics`]: (count, first message).
static PANICS: AtomicU64 = AtomicU64::new(0);
static FIRST_PANIC: Mutex<Option<String>> = Mutex::new(None);
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn record_panics() {
    std::panic::set_hook(Box::new(|info| {
        PANICS.fetch_add(1, Ordering::Relaxed);
        // Some payloads quote a whole input (lightgbm3's NulError holds the model's bytes).
        let mut message = info.to_string();
        if message.len() > 400 {
            let mut end = 400;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str(" …");
        }
        let mut first = FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(message.clone());
        }
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
    }));
}

fn take_panics() -> (u64, Option<String>) {
    let count = PANICS.swap(0, Ordering::Relaxed);
    let first = FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
    (count, first)
}

/// Runs `test` on `runner`'s cases of `strategy`; a failure (a panic, or a property the
/// test states) is shrunk and described with the smallest input found.
pub fn check<S>(
    runner: &mut TestRunner,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> Result<(), String>
where
    S: proptest::strategy::Strategy,
    S::Value: std::fmt::Debug,
{
    let start = Instant::now();
    let result = runner.run(&strategy, test);
    *CHECKED.lock().unwrap_or_else(|e| e.into_inner()) = Some(start.elapsed().as_secs_f64());
    result.map_err(|e| match e {
        TestError::Abort(why) => format!("aborted: {why}"),
        TestError::Fail(why, input) => {
            // The last panic seen is the last failing shrink step's: the minimal input's.
            let place = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut input = format!("{input:#?}");
            if input.len() > 4000 {
                input.truncate(4000);
                input.push_str(" …");
            }
            format!(
                "{}\n    panic: {}\n    minimal input: {input}",
                why.message(),
                place.unwrap_or_else(|| "none".into())
            )
        }
    })
}

/// How long the last [`check`] ran its cases, without the target's setup (loading models,
/// compiling a corpus), which cases/s should not count.
static CHECKED: Mutex<Option<f64>> = Mutex::new(None);

/// Where [`remember`] keeps the input of the case running now: a crash that no unwinding
/// survives (a stack overflow, an abort in C++) cannot be shrunk, but it can be replayed.
static LAST_INPUT: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Writes `bytes` where a crash leaves them (`NUDGE_FUZZ_LAST`, else the temp directory's
/// `nudge-fuzz-<target>.last`). Only the model targets call it: their parsers size allocations from the file and
/// LightGBM and ONNX Runtime are C++, so theirs are the crashes a panic hook never sees.
pub fn remember(bytes: &[u8]) {
    if let Some(path) = &*LAST_INPUT.lock().unwrap_or_else(|e| e.into_inner()) {
        let _ = std::fs::write(path, bytes);
    }
    CASE_STARTED.store(since_start_ms(), Ordering::Relaxed);
}

/// When the case [`remember`] saw last began, in ms since the process started (0: none).
static CASE_STARTED: AtomicU64 = AtomicU64::new(0);
static PROCESS_START: LazyLock<Instant> = LazyLock::new(Instant::now);
/// The real stderr while [`Quiet`] has sent fd 2 to /dev/null (-1 otherwise).
static SAVED_STDERR: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

fn since_start_ms() -> u64 {
    (PROCESS_START.elapsed().as_millis() as u64).max(1)
}

/// A hang is a finding too (LightGBM once looped forever on a tree that linked back to
/// its root): a case of a model target that runs past `NUDGE_FUZZ_TIMEOUT_SECONDS` (60)
/// ends the process with exit code 3 and says where its input is, for `--replay`, as
/// libFuzzer's `-timeout` does. A hang unwinds nothing, so nothing short of ending the
/// process gets the pass going again.
fn watch_for_hangs() {
    let limit_ms = std::env::var("NUDGE_FUZZ_TIMEOUT_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(60)
        * 1000;
    LazyLock::force(&PROCESS_START);
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let started = CASE_STARTED.load(Ordering::Relaxed);
        if started == 0 || since_start_ms() - started < limit_ms {
            continue;
        }
        // A case that began since the load above is not the one that hung.
        if CASE_STARTED.load(Ordering::Relaxed) != started {
            continue;
        }
        let input = LAST_INPUT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or_else(|| "(not kept)".to_owned(), |p| p.display().to_string());
        let message = format!(
            "\nFAILED: a case ran for over {} s (a hang); its input is {input} \
             (--replay TARGET FILE runs it again)\n",
            limit_ms / 1000
        );
        let saved = SAVED_STDERR.load(Ordering::Relaxed);
        let fd = if saved >= 0 { saved } else { 2 };
        // SAFETY: writing a buffer we own to an open descriptor, then ending the process
        // without running destructors (the hung thread holds what they would wait for).
        unsafe {
            write(fd, message.as_ptr(), message.len());
            _exit(3);
        }
    });
}

/// Sends this process's stdout and stderr to /dev/null while it lives: LightGBM and ONNX
/// Runtime print every refusal of a malformed model (and warnings), thousands of lines in
/// a pass, which would bury the targets' report. The report is printed between cases.
pub struct Quiet {
    saved: [i32; 2],
}

extern "C" {
    fn write(fd: i32, buf: *const u8, count: usize) -> isize;
    fn _exit(code: i32) -> !;
    fn dup(fd: i32) -> i32;
    fn dup2(from: i32, to: i32) -> i32;
    fn close(fd: i32) -> i32;
}

impl Quiet {
    pub fn output() -> Quiet {
        static NULL: LazyLock<Option<std::fs::File>> = LazyLock::new(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .ok()
        });
        let Some(null) = &*NULL else {
            return Quiet { saved: [-1, -1] };
        };
        let _ = std::io::Write::flush(&mut std::io::stdout());
        // SAFETY: plain descriptor calls on this process's own descriptors; the saved
        // copies are restored and closed on drop.
        let saved = [1, 2].map(|fd| unsafe {
            let saved = dup(fd);
            if saved >= 0 {
                dup2(null.as_raw_fd(), fd);
            }
            saved
        });
        SAVED_STDERR.store(saved[1], Ordering::Relaxed);
        Quiet { saved }
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        SAVED_STDERR.store(-1, Ordering::Relaxed);
        for (fd, saved) in [1, 2].into_iter().zip(self.saved) {
            if saved >= 0 {
                // SAFETY: `saved` is the descriptor `dup` returned above, still open.
                unsafe {
                    dup2(saved, fd);
                    close(saved);
                }
            }
        }
    }
}

fn seed() -> u64 {
    match std::env::var("NUDGE_FUZZ_SEED").ok().as_deref() {
        None | Some("") => 0x6e75_6467_6566_757a,
        Some("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        Some(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("NUDGE_FUZZ_SEED={s:?} is not a number")),
    }
}

/// FNV-1a of a target's name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let targets = targets::all();
    if args.iter().any(|a| a == "--list") {
        for t in &targets {
            println!("{:<18} {:>6}  {}", t.name, t.short, t.about);
        }
        return;
    }
    if let [flag, name, file] = args.as_slice() {
        if flag == "--replay" {
            let target = targets.iter().find(|t| t.name == name.as_str());
            let Some(replay) = target.and_then(|t| t.replay) else {
                eprintln!("{name:?} is not a target that replays a file");
                std::process::exit(2);
            };
            let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{file}: {e}"));
            replay(&bytes);
            println!("{name}: the input ran to completion");
            return;
        }
    }
    // cargo test passes its own flags through (e.g. --nocapture); names are the rest.
    let wanted: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    if let Some(unknown) = wanted
        .iter()
        .find(|w| !targets.iter().any(|t| t.name == **w))
    {
        eprintln!("no fuzz target {unknown:?}; --list names them");
        std::process::exit(2);
    }
    let cases: Option<u32> = std::env::var("NUDGE_FUZZ_CASES")
        .ok()
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("NUDGE_FUZZ_CASES is a number"));
    let seed = seed();
    println!("fuzz seed {seed} (NUDGE_FUZZ_SEED={seed} replays it)");
    println!(
        "{:<18} {:>10} {:>9} {:>10}  result",
        "target", "cases", "seconds", "cases/s"
    );
    record_panics();
    watch_for_hangs();
    let (mut passed, mut failed) = (0, 0);
    for target in targets
        .iter()
        .filter(|t| wanted.is_empty() || wanted.contains(&t.name))
    {
        let cases = cases.unwrap_or(target.short);
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            rng_algorithm: RngAlgorithm::XorShift,
            // Each target its own stream: targets with the same input shape (the two
            // LightGBM ones) would otherwise see the same inputs.
            rng_seed: RngSeed::Fixed(seed ^ name_hash(target.name)),
            // Shrinking a slow target's input may take long; a minute of it is plenty.
            max_shrink_time: 60_000,
            ..Config::default()
        });
        *LAST_INPUT.lock().unwrap_or_else(|e| e.into_inner()) = Some(
            std::env::var_os("NUDGE_FUZZ_LAST")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    std::env::temp_dir().join(format!("nudge-fuzz-{}.last", target.name))
                }),
        );
        take_panics();
        let start = Instant::now();
        // A panic outside `check` (a target's setup: its seeds, its models) is the
        // target's failure, with its message; the panic hook records but does not print.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (target.run)(&mut runner)))
                .unwrap_or_else(|_| {
                    let place = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    Err(format!(
                        "the target's setup panicked: {}",
                        place.unwrap_or_else(|| "no message".into())
                    ))
                });
        // The target's last case is over: the watchdog waits for the next target's first.
        CASE_STARTED.store(0, Ordering::Relaxed);
        let total = start.elapsed().as_secs_f64();
        let seconds = CHECKED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or(total);
        let setup = total - seconds;
        let (caught, first) = take_panics();
        let rate = f64::from(cases) / seconds.max(1e-9);
        match result {
            Ok(()) => {
                passed += 1;
                let note = match (caught, first) {
                    (0, _) => String::new(),
                    (n, Some(first)) => {
                        format!(" ({n} panics caught by the code's own guards; first: {first})")
                    }
                    (n, None) => format!(" ({n} panics caught by the code's own guards)"),
                };
                let setup = if setup >= 0.5 {
                    format!(" (setup {setup:.1} s)")
                } else {
                    String::new()
                };
                println!(
                    "{:<18} {cases:>10} {seconds:>9.2} {rate:>10.0}  ok{setup}{note}",
                    target.name
                );
            }
            Err(why) => {
                failed += 1;
                println!(
                    "{:<18} {:>10} {seconds:>9.2} {:>10}  FAILED\n  {why}",
                    target.name, "-", "-"
                );
            }
        }
    }
    println!("fuzz: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
