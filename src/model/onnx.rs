//! The ONNX backend: models scored through ONNX Runtime (`ort`, loaded at run time), or
//! by Nudge's native scorer ([`super::native`]) where the model is a tree ensemble it
//! imports.
//!
//! Nudge serves binary classifiers as `onnxmltools.convert_lightgbm(..., zipmap=False)`
//! writes them: one f32 input of shape `[N, n_features]` and an output `probabilities` of
//! shape `[N, 2]` whose column 1 is the positive class.
//!
//! ONNX Runtime loads every model either way: it is the parser of record (a file it
//! refuses is refused) and the validator of the native scorer, which serves only after
//! its probabilities are within [`TOLERANCE`] of ONNX Runtime's on rows made to sit on
//! and beside every threshold of the model ([`Forest::probe_rows`]). The session is then
//! dropped.

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{Tensor, ValueType};

use super::lightgbm::NativeScorer;
use super::native::{Forest, Kernel};
use super::{Engine, LoadError, ScoreError, Scorer};

/// Rows the native scorer must score as ONNX Runtime does before it serves a model.
const PARITY_ROWS: usize = 512;

/// The largest difference from ONNX Runtime's probability the native scorer may have.
/// It adds in `f32` in ONNX Runtime's order and computes the logistic as it does, so on
/// this machine the difference is 0; the bound leaves room for a C library whose `expf`
/// rounds differently in the last place.
pub const TOLERANCE: f64 = 1e-6;

/// Builds the scorer for an ONNX model on `engine`. With the native engine, a model the
/// native scorer does not import (or that fails the parity check) is served by ONNX
/// Runtime, and the reason is returned beside the scorer.
pub fn scorer(
    bytes: &[u8],
    library: &Path,
    engine: Engine,
) -> Result<(Box<dyn Scorer>, Option<String>), LoadError> {
    // Before ONNX Runtime reads it: a tree with a cycle would hang it.
    super::native::onnx::check_no_cycles(bytes).map_err(LoadError::Parse)?;
    let runtime = OnnxScorer::from_bytes(bytes, library)?;
    if engine == Engine::Lightgbm {
        return Ok((Box::new(runtime), None));
    }
    match Forest::from_onnx(bytes).and_then(|forest| {
        check_parity(&forest, &runtime)?;
        Ok(forest)
    }) {
        Ok(forest) => Ok((Box::new(NativeScorer::new(forest, None)), None)),
        Err(reason) => Ok((Box::new(runtime), Some(reason))),
    }
}

/// Holds the native scorer's probabilities to ONNX Runtime's, within [`TOLERANCE`], on
/// every kernel this CPU runs and through both walks.
pub fn check_parity(forest: &Forest, runtime: &OnnxScorer) -> Result<(), String> {
    let n = forest.n_features();
    if n != runtime.num_features() {
        return Err(format!(
            "the native scorer reads {n} columns, ONNX Runtime {}",
            runtime.num_features()
        ));
    }
    let rows = forest.probe_rows(PARITY_ROWS);
    let want = runtime.predict(&rows, n).map_err(|e| e.to_string())?;
    for kernel in Kernel::available() {
        let forest = forest
            .clone()
            .with_kernel(kernel)
            .expect("an available kernel");
        let many = forest.predict(&rows);
        let one = rows.chunks_exact(n).take(32).map(|r| forest.predict(r)[0]);
        let far = |(got, want): (f64, &f64)| {
            let d = (got - want).abs();
            // NaN on either side is a difference.
            d.is_nan() || d > TOLERANCE
        };
        let mismatch = many
            .iter()
            .copied()
            .zip(&want)
            .position(far)
            .or_else(|| one.zip(&want).position(far));
        if let Some(row) = mismatch {
            return Err(format!(
                "the native scorer ({}) differs from ONNX Runtime by more than {TOLERANCE:e} \
                 on parity row {row}: {} vs {}",
                kernel.name(),
                many[row],
                want[row]
            ));
        }
    }
    Ok(())
}

/// The output holding class probabilities.
const PROBABILITIES: &str = "probabilities";

/// The process's one ONNX Runtime environment, or why it could not be made.
static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads the ONNX Runtime library from `library` (once per process) and returns the
/// environment. Later calls return the first outcome, whatever path they name.
fn environment(library: &Path) -> Result<&'static ort::environment::Environment, LoadError> {
    ENVIRONMENT
        .get_or_init(|| {
            let builder = ort::init_from(library).map_err(|e| {
                format!(
                    "cannot load the ONNX Runtime library {}: {e} (set models.onnxruntime_library \
                     or ORT_DYLIB_PATH; scripts/setup.sh installs it under .tools/ort)",
                    library.display()
                )
            })?;
            builder
                .with_name("nudge")
                .build()
                .map_err(|e| format!("cannot start ONNX Runtime: {e}"))
        })
        .as_ref()
        .map_err(|e| LoadError::Runtime(e.clone()))
}

/// An ONNX Runtime session for one model.
pub struct OnnxScorer {
    // `Session::run` takes `&mut self`. Scoring a row takes microseconds, so one lock per
    // model is simpler than a pool and costs little at this scale.
    session: Mutex<Session>,
    input: String,
    num_features: usize,
}

impl OnnxScorer {
    pub fn from_bytes(bytes: &[u8], library: &Path) -> Result<OnnxScorer, LoadError> {
        let env = environment(library)?;
        let parse = |e: ort::Error| LoadError::Parse(e.to_string());
        let session = Session::builder(env)
            .map_err(parse)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| parse(e.into()))?
            .with_intra_threads(1)
            .map_err(|e| parse(e.into()))?
            .commit_from_memory(bytes)
            .map_err(parse)?;

        let [input] = session.inputs() else {
            return Err(LoadError::Parse(format!(
                "the model has {} inputs; Nudge feeds exactly one f32 matrix",
                session.inputs().len()
            )));
        };
        let num_features = match input.dtype() {
            ValueType::Tensor { ty, shape, .. }
                if *ty == ort::value::TensorElementType::Float32 && shape.len() == 2 =>
            {
                usize::try_from(shape[1]).map_err(|_| {
                    LoadError::Parse(format!(
                        "input {:?} has no fixed column count",
                        input.name()
                    ))
                })?
            }
            other => {
                return Err(LoadError::Parse(format!(
                    "input {:?} is {other}; Nudge feeds an f32 matrix [rows, features]",
                    input.name()
                )))
            }
        };
        if !session.outputs().iter().any(|o| o.name() == PROBABILITIES) {
            return Err(LoadError::Parse(format!(
                "the model has no output {PROBABILITIES:?} (convert with zipmap=False)"
            )));
        }
        Ok(OnnxScorer {
            input: input.name().to_owned(),
            session: Mutex::new(session),
            num_features,
        })
    }
}

impl Scorer for OnnxScorer {
    fn predict(&self, rows: &[f64], n_columns: usize) -> Result<Vec<f64>, ScoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let n_rows = rows.len() / n_columns;
        let data: Vec<f32> = rows.iter().map(|&v| v as f32).collect();
        let backend = |e: ort::Error| ScoreError::Backend(e.to_string());
        let tensor = Tensor::from_array(([n_rows, n_columns], data)).map_err(backend)?;
        let mut session = self
            .session
            .lock()
            .map_err(|_| ScoreError::Backend("an earlier ONNX call panicked".into()))?;
        let outputs = session
            .run(ort::inputs![self.input.as_str() => tensor])
            .map_err(backend)?;
        let (shape, probabilities) = outputs[PROBABILITIES]
            .try_extract_tensor::<f32>()
            .map_err(backend)?;
        if shape.len() != 2 || shape[1] != 2 || probabilities.len() != n_rows * 2 {
            return Err(ScoreError::Backend(format!(
                "output {PROBABILITIES:?} has shape {shape:?}; expected [{n_rows}, 2]"
            )));
        }
        Ok(probabilities
            .chunks_exact(2)
            .map(|p| f64::from(p[1]))
            .collect())
    }

    fn num_features(&self) -> usize {
        self.num_features
    }

    /// ONNX files from onnxmltools carry no column names; the manifest is the only record.
    fn feature_names(&self) -> Option<Vec<String>> {
        None
    }

    fn engine(&self) -> String {
        "onnxruntime".into()
    }
}
