//! The ONNX backend: models scored through ONNX Runtime (`ort`, loaded at run time).
//!
//! Nudge serves binary classifiers as `onnxmltools.convert_lightgbm(..., zipmap=False)`
//! writes them: one f32 input of shape `[N, n_features]` and an output `probabilities` of
//! shape `[N, 2]` whose column 1 is the positive class.

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{Tensor, ValueType};

use super::{LoadError, ScoreError, Scorer};

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
