//! Scoring benchmark: Nudge's native scorer on each kernel this CPU runs, and the
//! LightGBM and ONNX backends, on the peer model (`../shared/peers/model_M.txt`, 500
//! trees over 40 features, and its ONNX conversion, also imported by the native scorer)
//! and on the shipped purchase model;
//! the native layout's load time and size; and Track → scores per event with the shipped
//! default models on each engine.
//!
//! Run through `scripts/bench.sh`, which first runs the peers' own benchmark (Python
//! LightGBM, lleaves, treelite/tl2cgen, ONNX Runtime) and converts the model to ONNX.
//! Inputs come from environment variables:
//!   NUDGE_BENCH_PEERS  the peers directory (default ../shared/peers)
//!   NUDGE_BENCH_ONNX   the ONNX conversion of model_M (skipped if unset)
//!   NUDGE_BENCH_CALLS  single-row calls per engine (default 20000)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nudge::delivery::outbox::Outbox;
use nudge::engine::{Engine, EngineOptions};
use nudge::event::{Event, EventKind, PersonKey, Properties};
use nudge::features;
use nudge::identity::Identities;
use nudge::metrics::Metrics;
use nudge::model::lightgbm::{LightgbmScorer, NativeScorer};
use nudge::model::native::{Forest, Kernel};
use nudge::model::onnx::OnnxScorer;
use nudge::model::{LoadOptions, ModelRegistry, ModelSet, Scorer};
use nudge::profile::Profile;
use nudge::store::{Store, SyncMode};
use nudge::time::{Time, MINUTE_MS};
use nudge::trigger::Live;

const BATCH_ROWS: usize = 10_000;
const BATCH_REPS: usize = 7;

fn main() {
    let peers = PathBuf::from(
        std::env::var("NUDGE_BENCH_PEERS").unwrap_or_else(|_| "../shared/peers".into()),
    );
    let calls: usize = std::env::var("NUDGE_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let (rows, n) = read_sample(&peers.join("sample_1000.csv"));
    let reference = read_reference(&peers.join("predictions_M.csv"));
    println!("Nudge scoring benchmark — peer model M (500 trees, 63 leaves, {n} features)");
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>14} {:>12}",
        "engine", "p50 µs", "p99 µs", "mean µs", "batch rows/s", "max |Δ|"
    );

    let text = std::fs::read_to_string(peers.join("model_M.txt")).expect("reading model_M.txt");
    for kernel in Kernel::available().into_iter().rev() {
        let native = native_scorer(&text, kernel);
        report(
            &format!("nudge native ({})", kernel.name()),
            &native,
            &rows,
            n,
            calls,
            &reference,
        );
    }
    let lightgbm = LightgbmScorer::from_text(&text).expect("loading model_M.txt");
    report(
        "nudge lightgbm (C API)",
        &lightgbm,
        &rows,
        n,
        calls,
        &reference,
    );

    if let Ok(onnx_path) = std::env::var("NUDGE_BENCH_ONNX") {
        let library =
            std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| "libonnxruntime.so".into());
        let bytes = std::fs::read(&onnx_path).expect("reading the ONNX model");
        let onnx =
            OnnxScorer::from_bytes(&bytes, Path::new(&library)).expect("loading the ONNX model");
        report(
            "nudge onnx (ort, 1 thread)",
            &onnx,
            &rows,
            n,
            calls,
            &reference,
        );
        // The same conversion imported by the native scorer (f32 sums, as ONNX Runtime).
        match Forest::from_onnx(&bytes) {
            Ok(forest) => {
                for kernel in Kernel::available().into_iter().rev() {
                    let forest = forest.clone().with_kernel(kernel).expect("available");
                    report(
                        &format!("nudge native onnx ({})", kernel.name()),
                        &NativeScorer::new(forest, None),
                        &rows,
                        n,
                        calls,
                        &reference,
                    );
                }
            }
            Err(e) => println!("(the native scorer does not import the ONNX model: {e})"),
        }
    } else {
        println!("(NUDGE_BENCH_ONNX not set: ONNX backend skipped)");
    }
    println!("batch: {BATCH_ROWS} rows per call, median of {BATCH_REPS}; every backend scores on the calling thread (LightGBM is built without OpenMP; ONNX Runtime with 1 intra-op thread); max |Δ| against the peers' LightGBM probabilities as printed in predictions_M.csv");
    load_and_size(&text);
    println!();

    let purchase = shipped_model_text("purchase");
    let forest = Forest::from_lightgbm(&purchase).expect("compiling the purchase model");
    let n = forest.n_features();
    println!(
        "Shipped purchase model ({} trees, {n} features), on its own probe rows",
        forest.n_trees()
    );
    let rows: Vec<Vec<f64>> = forest
        .probe_rows(1000)
        .chunks_exact(n)
        .map(<[f64]>::to_vec)
        .collect();
    let lightgbm = LightgbmScorer::from_text(&purchase).expect("loading the purchase model");
    let all: Vec<f64> = rows.iter().flatten().copied().collect();
    let reference = lightgbm.predict(&all, n).expect("scoring with LightGBM");
    for kernel in Kernel::available().into_iter().rev() {
        report(
            &format!("nudge native ({})", kernel.name()),
            &native_scorer(&purchase, kernel),
            &rows,
            n,
            calls,
            &reference,
        );
    }
    report(
        "nudge lightgbm (C API)",
        &lightgbm,
        &rows,
        n,
        calls,
        &reference,
    );
    println!();
    track_per_event(nudge::model::Engine::Lightgbm);
    track_per_event(nudge::model::Engine::Native);
}

fn native_scorer(text: &str, kernel: Kernel) -> NativeScorer {
    let forest = Forest::from_lightgbm(text)
        .expect("compiling the model")
        .with_kernel(kernel)
        .expect("an available kernel");
    NativeScorer::new(forest, None)
}

/// How long the native layout of model M takes to build (parse and compile; median of
/// 11), and how much memory it holds, beside LightGBM's own load of the same text.
fn load_and_size(text: &str) {
    let time = |f: &dyn Fn()| {
        let mut took: Vec<Duration> = (0..11)
            .map(|_| {
                let started = Instant::now();
                f();
                started.elapsed()
            })
            .collect();
        took.sort();
        took[took.len() / 2].as_secs_f64() * 1e3
    };
    let native = time(&|| {
        std::hint::black_box(Forest::from_lightgbm(text).unwrap());
    });
    let lightgbm = time(&|| {
        std::hint::black_box(LightgbmScorer::from_text(text).unwrap());
    });
    let forest = Forest::from_lightgbm(text).unwrap();
    println!(
        "load model M: native layout {native:.1} ms ({} nodes, {:.0} KiB), LightGBM {lightgbm:.1} ms; the model file is {:.0} KiB",
        forest.n_nodes(),
        forest.bytes() as f64 / 1024.0,
        text.len() as f64 / 1024.0
    );
}

fn shipped_model_text(name: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let manifest = nudge::model::Manifest::parse(
        &std::fs::read_to_string(dir.join(format!("{name}.manifest.toml"))).unwrap(),
    )
    .unwrap();
    std::fs::read_to_string(dir.join(&manifest.file)).unwrap()
}

fn report(
    name: &str,
    scorer: &dyn Scorer,
    rows: &[Vec<f64>],
    n: usize,
    calls: usize,
    reference: &[f64],
) {
    let all: Vec<f64> = rows.iter().flatten().copied().collect();
    let got = scorer.predict(&all, n).expect("scoring the sample");
    let max_diff = got
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);

    for row in rows.iter().take(1000) {
        scorer.predict(row, n).unwrap();
    }
    let mut single = Vec::with_capacity(calls);
    for i in 0..calls {
        let row = &rows[i % rows.len()];
        let started = Instant::now();
        std::hint::black_box(scorer.predict(std::hint::black_box(row), n).unwrap());
        single.push(started.elapsed());
    }

    let batch: Vec<f64> = all.iter().copied().cycle().take(BATCH_ROWS * n).collect();
    let mut rates: Vec<f64> = (0..BATCH_REPS)
        .map(|_| {
            let started = Instant::now();
            std::hint::black_box(scorer.predict(&batch, n).unwrap());
            BATCH_ROWS as f64 / started.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    let (p50, p99, mean) = percentiles(&mut single);
    println!(
        "{name:<28} {p50:>10.2} {p99:>10.2} {mean:>10.2} {:>14.0} {max_diff:>12.2e}",
        rates[BATCH_REPS / 2]
    );
}

/// p50, p99 and mean in microseconds.
fn percentiles(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| us(samples[((samples.len() - 1) as f64 * q) as usize]);
    let mean = samples.iter().map(|d| us(*d)).sum::<f64>() / samples.len() as f64;
    (at(0.5), at(0.99), mean)
}

fn read_sample(path: &Path) -> (Vec<Vec<f64>>, usize) {
    let text = std::fs::read_to_string(path).expect("reading sample_1000.csv");
    let mut lines = text.lines();
    let n = lines.next().unwrap().split(',').count() - 1; // the last column is the label
    let rows = lines
        .map(|l| l.split(',').take(n).map(|v| v.parse().unwrap()).collect())
        .collect();
    (rows, n)
}

fn read_reference(path: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(path).expect("reading predictions_M.csv");
    text.lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect()
}

/// A browsing stream over many people: product views, searches, carts, purchases.
fn events(people: usize, count: usize) -> Vec<Event> {
    let kinds = [
        EventKind::PageView,
        EventKind::ProductView,
        EventKind::ProductView,
        EventKind::Search,
        EventKind::ProductView,
        EventKind::AddToCart,
        EventKind::CheckoutStarted,
        EventKind::Purchase,
    ];
    let start = Time(1_772_445_600_000);
    (0..count)
        .map(|i| {
            let kind = kinds[i % kinds.len()];
            Event {
                id: format!("e{i}"),
                person: PersonKey::User(format!("u{}", (i / kinds.len()) % people)),
                linked: None,
                kind,
                time: start.plus_ms((i as i64) * MINUTE_MS / 4),
                properties: Properties {
                    product_id: Some(format!("p{}", i % 97)),
                    category: Some(format!("c{}", i % 7)),
                    price: Some(20.0 + (i % 13) as f64),
                    order_value: Some(55.0),
                    dwell_seconds: (i % 3 == 0).then_some(25.0),
                    ..Properties::default()
                },
                attributes: Default::default(),
            }
        })
        .collect()
}

/// Track → scores per event with the shipped models: the pure core path, and the full
/// engine path (queue to the owning shard thread and back) one event per call.
fn track_per_event(engine_kind: nudge::model::Engine) {
    let options = LoadOptions {
        max_file_bytes: 1 << 30,
        onnxruntime_library: "unused".into(),
        engine: engine_kind,
    };
    let models_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let (set, failures) =
        ModelSet::load_dir(&models_dir, &options, Time(0)).expect("loading models/");
    assert!(failures.is_empty(), "{failures:?}");
    let models: Vec<_> = set.iter().cloned().collect();
    println!(
        "Track → scores per event, shipped models ({}), engine {:?}",
        models
            .iter()
            .map(|m| format!("{} on {}", m.name(), m.engine()))
            .collect::<Vec<_>>()
            .join(" + "),
        engine_kind
    );
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>12}",
        "path", "p50 µs", "p99 µs", "mean µs", "events/s"
    );

    let stream = events(1000, 40_000);
    let mut profiles: std::collections::HashMap<PersonKey, Profile> = Default::default();
    let mut samples = Vec::with_capacity(stream.len());
    let started_all = Instant::now();
    for e in &stream {
        let started = Instant::now();
        let profile = profiles.entry(e.person.clone()).or_default();
        profile.apply(e);
        let row = features::extract(profile, e.time);
        for m in &models {
            std::hint::black_box(m.score(std::slice::from_ref(&row)).unwrap());
        }
        samples.push(started.elapsed());
    }
    let rate = stream.len() as f64 / started_all.elapsed().as_secs_f64();
    let (p50, p99, mean) = percentiles(&mut samples);
    println!(
        "{:<40} {p50:>10.2} {p99:>10.2} {mean:>10.2} {rate:>12.0}",
        "core: apply + extract + 2 models"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // The default durable mode: every call waits for its fsync.
    let data = tempfile::tempdir().expect("a temporary directory");
    let store = Arc::new(Store::open(data.path(), SyncMode::Always).expect("opening the store"));
    let metrics = Arc::new(Metrics::new());
    let engine = Engine::start(
        &EngineOptions {
            shards: 2,
            queue_capacity: 1024,
            dedup_horizon_ms: 24 * 3_600_000,
            queue_budget: std::time::Duration::from_millis(25),
            cache_bytes: 1 << 30,
        },
        store.clone(),
        Arc::new(Identities::default()),
        Arc::new(ModelRegistry::new(set)),
        Arc::new(Live::open(PathBuf::new()).expect("no rules file, no rules")),
        Arc::new(Outbox::open(store).expect("opening the outbox")),
        metrics.clone(),
        Arc::new(nudge::readiness::Readiness::new(metrics)),
    )
    .expect("starting the engine");
    let stream = events(1000, 4_000);
    let now = stream.last().unwrap().time;
    let (mut samples, elapsed) = runtime.block_on(async {
        let mut samples = Vec::with_capacity(stream.len());
        let started_all = Instant::now();
        for (i, e) in stream.into_iter().enumerate() {
            let started = Instant::now();
            std::hint::black_box(
                engine
                    .track(vec![(i, e)], now, nudge::engine::Admit::Flow)
                    .await
                    .unwrap(),
            );
            samples.push(started.elapsed());
        }
        (samples, started_all.elapsed())
    });
    let rate = samples.len() as f64 / elapsed.as_secs_f64();
    let (p50, p99, mean) = percentiles(&mut samples);
    println!(
        "{:<40} {p50:>10.2} {p99:>10.2} {mean:>10.2} {rate:>12.0}",
        "engine: Engine::track, 1 event/call, fsync"
    );
    runtime.block_on(engine.shutdown());
}
