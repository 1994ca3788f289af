//! Parity of Nudge's tree scorers with the libraries that made the models, on the fixtures
//! `tests/fixtures/make_native_fixtures.py` writes (scripts/test.sh runs it before the
//! tests): LightGBM text models must score bit for bit as Python LightGBM 4.7 does (raw
//! score and probability), ONNX tree ensembles within 1e-6 of ONNX Runtime 1.31.1.
//!
//! The fixtures are checked against the libraries themselves (LightGBM's C API through
//! `lightgbm3`, ONNX Runtime through `ort`), which proves the fixtures and this harness,
//! and against Nudge's native scorer on every kernel this CPU runs: it must serve every
//! LightGBM case but the refused ones, and import every ONNX case.

use std::path::{Path, PathBuf};

use nudge::model::lightgbm::LightgbmScorer;
use nudge::model::native::{Forest, Kernel};
use nudge::model::onnx::OnnxScorer;
use nudge::model::Scorer;
use serde_json::Value;

/// The command that makes the fixtures, for the message when they are missing.
const GENERATE: &str = ".tools/pyenv/bin/python tests/fixtures/make_native_fixtures.py \
                        --out target/native-fixtures (scripts/test.sh runs it)";

/// An engine's answer for a batch: `rows` is row-major with `n_columns` columns; the answer
/// has the case's `outputs_per_row` values per row.
type Predict<'a> = &'a dyn Fn(&[f64], usize) -> Result<Vec<f64>, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lightgbm,
    Onnx,
}

/// What an engine must do with a case's model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Score it as the reference does.
    Parity,
    /// Refuse it at load (the native engine; `lightgbm3` still serves linear trees).
    Refuse,
}

/// One fixture case, read whole.
struct Case {
    name: String,
    kind: Kind,
    expect: Expect,
    covers: String,
    model: PathBuf,
    n_features: usize,
    outputs_per_row: usize,
    /// Row-major, `n_features` per row, exactly as the generator wrote them.
    rows: Vec<f64>,
    /// LightGBM: per row `outputs_per_row` raw scores, then as many probabilities.
    /// ONNX: per row the positive-class probability.
    expected: Vec<f64>,
    /// The largest difference allowed; 0 means bit for bit.
    tolerance: f64,
}

impl Case {
    fn n_rows(&self) -> usize {
        self.rows.len() / self.n_features
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.rows[i * self.n_features..(i + 1) * self.n_features]
    }

    /// Column block `block` (0 = raw, 1 = probability) of the LightGBM expectations.
    fn expected_block(&self, block: usize) -> Vec<f64> {
        let k = self.outputs_per_row;
        self.expected
            .chunks_exact(2 * k)
            .flat_map(|r| r[block * k..(block + 1) * k].iter().copied())
            .collect()
    }

    fn expected_raw(&self) -> Vec<f64> {
        self.expected_block(0)
    }

    fn expected_probability(&self) -> Vec<f64> {
        match self.kind {
            Kind::Lightgbm => self.expected_block(1),
            Kind::Onnx => self.expected.clone(),
        }
    }

    fn model_text(&self) -> String {
        std::fs::read_to_string(&self.model)
            .unwrap_or_else(|e| panic!("{}: cannot read {}: {e}", self.name, self.model.display()))
    }
}

fn fixture_dir() -> PathBuf {
    std::env::var_os("NUDGE_NATIVE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/native-fixtures"))
}

/// Every case of the index. Missing or malformed fixtures fail the test, never skip it.
fn cases() -> Vec<Case> {
    let dir = fixture_dir();
    let index_path = dir.join("index.json");
    let index = std::fs::read_to_string(&index_path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}. Make the fixtures first: {GENERATE}",
            index_path.display()
        )
    });
    let index: Value = serde_json::from_str(&index).unwrap_or_else(|e| {
        panic!(
            "{} is not JSON ({e}); remake it: {GENERATE}",
            index_path.display()
        )
    });
    let entries = index["cases"]
        .as_array()
        .unwrap_or_else(|| panic!("{} has no cases array", index_path.display()));
    let cases: Vec<Case> = entries.iter().map(|e| read_case(&dir, e)).collect();
    // A stale or truncated index must not pass by having nothing in it.
    for (kind, expect) in [
        (Kind::Lightgbm, Expect::Parity),
        (Kind::Lightgbm, Expect::Refuse),
        (Kind::Onnx, Expect::Parity),
    ] {
        assert!(
            cases.iter().any(|c| c.kind == kind && c.expect == expect),
            "{} has no {kind:?} case with expect {expect:?}; remake it: {GENERATE}",
            index_path.display()
        );
    }
    cases
}

fn read_case(dir: &Path, entry: &Value) -> Case {
    let name = entry["name"]
        .as_str()
        .expect("a case without a name")
        .to_owned();
    let text = |key: &str| {
        entry[key]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: index field {key:?} is missing or not a string"))
            .to_owned()
    };
    let count = |key: &str| {
        entry[key]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or_else(|| panic!("{name}: index field {key:?} is missing or not a count"))
    };
    let kind = match text("kind").as_str() {
        "lightgbm" => Kind::Lightgbm,
        "onnx" => Kind::Onnx,
        other => panic!("{name}: unknown kind {other:?}"),
    };
    let expect = match text("expect").as_str() {
        "parity" => Expect::Parity,
        "refuse" => Expect::Refuse,
        other => panic!("{name}: unknown expect {other:?}"),
    };
    let (n_rows, n_features, outputs_per_row) = (
        count("n_rows"),
        count("n_features"),
        count("outputs_per_row"),
    );
    assert!(
        n_rows > 0 && n_features > 0 && outputs_per_row > 0,
        "{name}: empty case"
    );
    let rows = read_f64(&name, &dir.join(text("rows_file")), n_rows * n_features);
    let per_row = match kind {
        Kind::Lightgbm => 2 * outputs_per_row,
        Kind::Onnx => outputs_per_row,
    };
    let expected = read_f64(&name, &dir.join(text("expected_file")), n_rows * per_row);
    let tolerance = match kind {
        Kind::Lightgbm => 0.0,
        Kind::Onnx => entry["tolerance"]
            .as_f64()
            .unwrap_or_else(|| panic!("{name}: an ONNX case needs a tolerance")),
    };
    Case {
        covers: text("covers"),
        model: dir.join(text("model_file")),
        name,
        kind,
        expect,
        n_features,
        outputs_per_row,
        rows,
        expected,
        tolerance,
    }
}

/// Raw little-endian f64 values, exactly `count` of them.
fn read_f64(case: &str, path: &Path, count: usize) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "{case}: cannot read {}: {e}; remake: {GENERATE}",
            path.display()
        )
    });
    assert_eq!(
        bytes.len(),
        count * 8,
        "{case}: {} has {} bytes, the index says {count} values",
        path.display(),
        bytes.len()
    );
    bytes
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("chunks of 8")))
        .collect()
}

/// Rows per call in the middle way of calling an engine: not a power of two, so batched
/// kernels meet partial blocks and slices that start mid-block.
const ODD_BATCH: usize = 13;

/// The three ways an engine is called: the whole batch at once, batches of [`ODD_BATCH`]
/// rows, and one row at a time (Nudge scores single rows on every event, and engines take
/// other paths for them).
fn answers(case: &Case, what: &str, predict: Predict) -> Result<[Vec<f64>; 3], String> {
    let batch = predict(&case.rows, case.n_features)
        .map_err(|e| format!("{}: {what}: the batch failed: {e}", case.name))?;
    let in_chunks = |rows_per_call: usize| {
        let mut all = Vec::new();
        for (i, chunk) in case
            .rows
            .chunks(rows_per_call * case.n_features)
            .enumerate()
        {
            let answer = predict(chunk, case.n_features).map_err(|e| {
                format!(
                    "{}: {what}: rows from {} failed: {e}",
                    case.name,
                    i * rows_per_call
                )
            })?;
            all.extend(answer);
        }
        Ok::<_, String>(all)
    };
    let (odd, single) = (in_chunks(ODD_BATCH)?, in_chunks(1)?);
    Ok([batch, odd, single])
}

/// The first row where `got` and `want` differ by more than `tolerance` (bit for bit when
/// it is 0), described with the row's values and both numbers' bits.
fn first_mismatch(
    case: &Case,
    what: &str,
    got: &[f64],
    want: &[f64],
    tolerance: f64,
) -> Result<(), String> {
    let k = case.outputs_per_row;
    if got.len() != want.len() {
        return Err(format!(
            "{}: {what}: {} values for {} rows, expected {}",
            case.name,
            got.len(),
            case.n_rows(),
            want.len()
        ));
    }
    let differs = |g: f64, w: f64| {
        if tolerance == 0.0 {
            g.to_bits() != w.to_bits()
        } else {
            // NaN on either side is a difference.
            matches!(
                (g - w).abs().partial_cmp(&tolerance),
                None | Some(std::cmp::Ordering::Greater)
            )
        }
    };
    let Some(at) = (0..got.len()).find(|&i| differs(got[i], want[i])) else {
        return Ok(());
    };
    let row = at / k;
    let values: Vec<String> = case
        .row(row)
        .iter()
        .map(|v| format!("{v:e} ({:#018x})", v.to_bits()))
        .collect();
    let count = (0..got.len()).filter(|&i| differs(got[i], want[i])).count();
    Err(format!(
        "{}: {what}: row {row} (output {}) differs{}: got {:e} ({:#018x}), expected {:e} \
         ({:#018x}); {count} of {} values differ. Row: [{}]",
        case.name,
        at % k,
        if tolerance == 0.0 {
            String::new()
        } else {
            format!(" by more than {tolerance:e}")
        },
        got[at],
        got[at].to_bits(),
        want[at],
        want[at].to_bits(),
        got.len(),
        values.join(", ")
    ))
}

fn compare(case: &Case, what: &str, predict: Predict, want: &[f64], tolerance: f64) -> Vec<String> {
    match answers(case, what, predict) {
        Err(e) => vec![e],
        Ok([batch, odd, single]) => [
            ("the whole batch".to_owned(), batch),
            (format!("{ODD_BATCH} rows at a time"), odd),
            ("one row at a time".to_owned(), single),
        ]
        .into_iter()
        .filter_map(|(how, got)| {
            first_mismatch(case, &format!("{what}, {how}"), &got, want, tolerance).err()
        })
        .collect(),
    }
}

/// A LightGBM case through one engine: its raw scores and its probabilities must equal
/// Python LightGBM's bit for bit. Returns the failures.
fn check_lightgbm(case: &Case, engine: &str, raw: Predict, probability: Predict) -> Vec<String> {
    let mut failures = compare(
        case,
        &format!("{engine} raw"),
        raw,
        &case.expected_raw(),
        0.0,
    );
    failures.extend(compare(
        case,
        &format!("{engine} probability"),
        probability,
        &case.expected_probability(),
        0.0,
    ));
    with_covers(case, failures)
}

/// Failure messages that say what the case is there to cover.
fn with_covers(case: &Case, failures: Vec<String>) -> Vec<String> {
    failures
        .into_iter()
        .map(|f| format!("{f}\n    (the case covers: {})", case.covers))
        .collect()
}

/// An ONNX case through one engine: the positive-class probability within the case's
/// tolerance (1e-6) of ONNX Runtime's. Returns the failures.
fn check_onnx(case: &Case, engine: &str, probability: Predict) -> Vec<String> {
    let failures = compare(
        case,
        &format!("{engine} probability"),
        probability,
        &case.expected_probability(),
        case.tolerance,
    );
    with_covers(case, failures)
}

/// The largest |got - want|; NaN when one side is NaN and the other is not.
fn max_difference(got: &[f64], want: &[f64]) -> f64 {
    let mut largest = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        if g.to_bits() != w.to_bits() {
            let d = (g - w).abs();
            if d.is_nan() {
                return f64::NAN;
            }
            largest = largest.max(d);
        }
    }
    largest
}

fn report(checked: &[String], failures: Vec<String>) {
    assert!(!checked.is_empty(), "no case was checked");
    eprintln!("checked: {}", checked.join("; "));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn lightgbm_cases_score_bit_for_bit_as_python_lightgbm() {
    let mut checked = Vec::new();
    let mut failures = Vec::new();
    for case in cases().iter().filter(|c| c.kind == Kind::Lightgbm) {
        let text = case.model_text();
        // Raw scores straight from LightGBM's C API (the Scorer trait answers probabilities).
        let booster = lightgbm3::Booster::from_string(&text)
            .unwrap_or_else(|e| panic!("{}: LightGBM cannot load the fixture: {e}", case.name));
        let raw = |rows: &[f64], n: usize| {
            booster
                .raw_scores(rows, n as i32, true)
                .map_err(|e| e.to_string())
        };
        let booster_probability = |rows: &[f64], n: usize| {
            booster
                .predict(rows, n as i32, true)
                .map_err(|e| e.to_string())
        };
        failures.extend(check_lightgbm(
            case,
            "lightgbm3",
            &raw,
            &booster_probability,
        ));

        // Nudge's LightGBM backend, as served. It serves binary models only, so it refuses
        // the multiclass case; it serves linear trees.
        match LightgbmScorer::from_text(&text) {
            Ok(scorer) => {
                let probability =
                    |rows: &[f64], n: usize| scorer.predict(rows, n).map_err(|e| e.to_string());
                let found = compare(
                    case,
                    "LightgbmScorer probability",
                    &probability,
                    &case.expected_probability(),
                    0.0,
                );
                failures.extend(with_covers(case, found));
            }
            Err(e) if case.outputs_per_row > 1 => {
                assert!(
                    e.to_string().contains("outputs per row"),
                    "{}: {e}",
                    case.name
                )
            }
            Err(e) => failures.push(format!("{}: LightgbmScorer refused it: {e}", case.name)),
        }

        // The native scorer, on every kernel this CPU runs, through both walks (the
        // many-row walk for batches, the one-row walk for single rows).
        match (case.expect, Forest::from_lightgbm(&text)) {
            (Expect::Refuse, Err(_)) => {}
            (Expect::Refuse, Ok(_)) => failures.push(format!(
                "{}: the native scorer serves a model it must refuse",
                case.name
            )),
            (Expect::Parity, Err(e)) => {
                failures.push(format!("{}: the native scorer refused it: {e}", case.name))
            }
            (Expect::Parity, Ok(forest)) => {
                for kernel in Kernel::available() {
                    let forest = forest.clone().with_kernel(kernel).expect("available");
                    let raw = |rows: &[f64], _: usize| Ok(forest.predict_raw(rows));
                    let probability = |rows: &[f64], _: usize| Ok(forest.predict(rows));
                    failures.extend(check_lightgbm(
                        case,
                        &format!("native {}", kernel.name()),
                        &raw,
                        &probability,
                    ));
                }
                // And through the backend as the loader builds it: native, parity-checked.
                let (scorer, note) =
                    nudge::model::lightgbm::scorer(&text, nudge::model::Engine::Native).unwrap();
                if let Some(note) = note {
                    failures.push(format!("{}: served by LightGBM: {note}", case.name));
                }
                assert!(scorer.engine().starts_with("native/"), "{}", case.name);
            }
        }
        checked.push(format!("{} ({} rows)", case.name, case.n_rows()));
    }
    report(&checked, failures);
}

#[test]
fn onnx_cases_score_as_onnx_runtime() {
    let library = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| {
        panic!(
            "ORT_DYLIB_PATH is not set; .cargo/config.toml sets it to the library scripts/setup.sh \
             installs under .tools/ort"
        )
    });
    let mut checked = Vec::new();
    let mut failures = Vec::new();
    for case in cases().iter().filter(|c| c.kind == Kind::Onnx) {
        let bytes = std::fs::read(&case.model)
            .unwrap_or_else(|e| panic!("{}: cannot read {}: {e}", case.name, case.model.display()));
        let scorer = OnnxScorer::from_bytes(&bytes, Path::new(&library))
            .unwrap_or_else(|e| panic!("{}: ONNX Runtime cannot load the fixture: {e}", case.name));
        assert_eq!(scorer.num_features(), case.n_features, "{}", case.name);
        let probability =
            |rows: &[f64], n: usize| scorer.predict(rows, n).map_err(|e| e.to_string());
        failures.extend(check_onnx(case, "OnnxScorer", &probability));

        // The native scorer, on every kernel this CPU runs, through both walks. Every ONNX
        // case is a tree ensemble it must import.
        let mut largest = Vec::new();
        match Forest::from_onnx(&bytes) {
            Err(e) => failures.push(format!("{}: the native scorer refused it: {e}", case.name)),
            Ok(forest) => {
                for kernel in Kernel::available() {
                    let forest = forest.clone().with_kernel(kernel).expect("available");
                    let probability = |rows: &[f64], _: usize| Ok(forest.predict(rows));
                    let what = format!("native {}", kernel.name());
                    failures.extend(check_onnx(case, &what, &probability));
                    let got = forest.predict(&case.rows);
                    largest.push(format!(
                        "{} {:e}",
                        kernel.name(),
                        max_difference(&got, &case.expected)
                    ));
                }
                // And through the backend as the loader builds it: native, parity-checked.
                let (scorer, note) = nudge::model::onnx::scorer(
                    &bytes,
                    Path::new(&library),
                    nudge::model::Engine::Native,
                )
                .unwrap_or_else(|e| panic!("{}: the ONNX backend refused it: {e}", case.name));
                if let Some(note) = note {
                    failures.push(format!("{}: served by ONNX Runtime: {note}", case.name));
                }
                if !scorer.engine().starts_with("native/") {
                    failures.push(format!("{}: served by {}", case.name, scorer.engine()));
                }
            }
        }
        checked.push(format!(
            "{} ({} rows; max |native - ONNX Runtime|: {})",
            case.name,
            case.n_rows(),
            largest.join(", ")
        ));
    }
    report(&checked, failures);
}

/// The comparison itself fails on the smallest difference: one ulp in one LightGBM value,
/// or a little more than the tolerance in one ONNX value, is reported with its row.
#[test]
fn the_comparison_catches_the_smallest_difference() {
    let cases = cases();
    for case in [Kind::Lightgbm, Kind::Onnx].map(|k| cases.iter().find(|c| c.kind == k).unwrap()) {
        let want = case.expected_probability();
        let at = want.len() / 2;
        let tolerance = case.tolerance;
        assert_eq!(
            first_mismatch(case, "same", &want, &want, tolerance),
            Ok(())
        );
        let mut got = want.clone();
        got[at] = if tolerance == 0.0 {
            f64::from_bits(got[at].to_bits() + 1)
        } else {
            got[at] + 2.0 * tolerance
        };
        let message = first_mismatch(case, "nudged", &got, &want, tolerance).unwrap_err();
        let row = at / case.outputs_per_row;
        assert!(message.contains(&format!("row {row} ")), "{message}");
        assert!(message.contains("1 of "), "{message}");
        if tolerance > 0.0 {
            got[at] = want[at] + tolerance / 2.0;
            assert_eq!(
                first_mismatch(case, "within", &got, &want, tolerance),
                Ok(())
            );
        }
    }
}
