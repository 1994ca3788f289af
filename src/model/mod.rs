//! Models: the `Scorer` trait that every backend implements, loading a model from its
//! manifest with every check that keeps a wrong file from serving, and the set of models
//! being served.
//!
//! Invariant: a model is served only if its file's sha256 matches its manifest, every
//! feature its manifest names is in the FeatureSpec, the file's own column count (and, for
//! LightGBM, its column names) agree with the manifest, and it answers finite
//! probabilities in [0, 1] for a warm-up batch.

pub mod lightgbm;
pub mod manifest;
pub mod native;
pub mod onnx;
pub mod publish;
pub mod reload;
pub mod score;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::features::{FeatureRow, FeatureSpec};
use crate::time::Time;
pub use manifest::{Manifest, ModelFormat};
pub use score::{score_each, score_matrix, score_row, score_rows, Score, Scores};

/// A backend that turns feature rows into probabilities. A faster backend joins by
/// implementing this.
pub trait Scorer: Send + Sync {
    /// The positive-class probability for each row of `rows`, a row-major matrix with
    /// `n_columns` columns in the model's own column order. NaN means missing.
    fn predict(&self, rows: &[f64], n_columns: usize) -> Result<Vec<f64>, ScoreError>;

    /// How many input columns the model file declares.
    fn num_features(&self) -> usize;

    /// The column names the model file records, if it records any.
    fn feature_names(&self) -> Option<Vec<String>>;

    /// Each column's additive contribution to one row's raw score, then the bias
    /// (`n_columns + 1` values), for backends that can say; `None` for the others.
    fn contributions(&self, _row: &[f64]) -> Option<Result<Vec<f64>, ScoreError>> {
        None
    }

    /// What scores: `native/avx2`, `lightgbm`, `onnxruntime`.
    fn engine(&self) -> String;
}

/// Which engine scores tree models (`models.engine`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Nudge's own scorer ([`native`]), where it serves the model (LightGBM models, and
    /// ONNX models that are tree ensembles it imports); the model's library elsewhere.
    #[default]
    Native,
    /// The model's library for every model: LightGBM's C API for LightGBM models, ONNX
    /// Runtime for ONNX models.
    Lightgbm,
}

/// Scoring failed inside a backend.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScoreError {
    #[error("model backend failed: {0}")]
    Backend(String),
}

/// Why a model was refused at load. Each variant is one `reason` of the load-failure metric.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("invalid manifest: {0}")]
    Manifest(String),
    #[error("model file is {size} bytes; models.max_file_bytes allows {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("sha256 of {file} is {actual}, but the manifest says {expected}")]
    HashMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error(
        "the manifest names {} features but the model file has {model} columns",
        manifest
    )]
    FeatureCount { manifest: usize, model: usize },
    #[error("feature names differ from the manifest: {0}")]
    FeatureNames(String),
    #[error("the manifest names features the FeatureSpec (version {spec_version}) does not have: {names:?}")]
    UnknownFeature {
        names: Vec<String>,
        spec_version: &'static str,
    },
    #[error("cannot parse the model: {0}")]
    Parse(String),
    #[error("{0}")]
    Runtime(String),
    #[error("warm-up scoring failed: {0}")]
    BadOutput(String),
    #[error("another manifest already serves a model named {0:?}")]
    DuplicateName(String),
    #[error("invalid segments file: {0}")]
    Segments(String),
}

impl LoadError {
    /// Every `reason` label, so the metric shows each at zero before the first failure.
    pub const REASONS: [&'static str; 12] = [
        "io",
        "manifest",
        "too_large",
        "hash_mismatch",
        "feature_count",
        "feature_names",
        "unknown_feature",
        "parse",
        "runtime",
        "bad_output",
        "duplicate_name",
        "segments",
    ];

    /// The metric label for this failure.
    pub const fn reason(&self) -> &'static str {
        match self {
            LoadError::Io { .. } => "io",
            LoadError::Manifest(_) => "manifest",
            LoadError::TooLarge { .. } => "too_large",
            LoadError::HashMismatch { .. } => "hash_mismatch",
            LoadError::FeatureCount { .. } => "feature_count",
            LoadError::FeatureNames(_) => "feature_names",
            LoadError::UnknownFeature { .. } => "unknown_feature",
            LoadError::Parse(_) => "parse",
            LoadError::Runtime(_) => "runtime",
            LoadError::BadOutput(_) => "bad_output",
            LoadError::DuplicateName(_) => "duplicate_name",
            LoadError::Segments(_) => "segments",
        }
    }
}

/// Options for loading models.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The largest model file accepted.
    pub max_file_bytes: u64,
    /// The ONNX Runtime shared library, loaded the first time an ONNX model is.
    pub onnxruntime_library: PathBuf,
    /// Which engine scores LightGBM models.
    pub engine: Engine,
}

impl From<&crate::config::Config> for LoadOptions {
    fn from(config: &crate::config::Config) -> LoadOptions {
        LoadOptions {
            max_file_bytes: config.models.max_file_bytes,
            onnxruntime_library: config.onnxruntime_library(),
            engine: config.models.engine,
        }
    }
}

/// A loaded, checked model ready to score FeatureSpec rows.
pub struct Model {
    pub manifest: Manifest,
    /// For each model column, its position in a FeatureSpec row.
    columns: Vec<usize>,
    scorer: Box<dyn Scorer>,
    /// Why the native engine does not serve this model, when it was asked to.
    engine_note: Option<String>,
    pub loaded_at: Time,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.manifest.name)
            .field("version", &self.manifest.version)
            .field("format", &self.manifest.format)
            .field("engine", &self.scorer.engine())
            .finish()
    }
}

impl Model {
    /// Checks `manifest` against the FeatureSpec and the model bytes (whose hash
    /// [`read_manifest`] has checked), builds the backend and warms it up.
    fn load(
        manifest: Manifest,
        bytes: &[u8],
        options: &LoadOptions,
        now: Time,
    ) -> Result<Model, LoadError> {
        let spec = FeatureSpec::current();
        let columns = map_columns(&manifest, spec)?;
        let (scorer, engine_note) = build_scorer(manifest.format, bytes, options)?;
        if scorer.num_features() != manifest.features.len() {
            return Err(LoadError::FeatureCount {
                manifest: manifest.features.len(),
                model: scorer.num_features(),
            });
        }
        if let Some(names) = scorer.feature_names() {
            if let Some(diff) = describe_name_diff(&manifest.features, &names) {
                return Err(LoadError::FeatureNames(diff));
            }
        }
        let model = Model {
            manifest,
            columns,
            scorer,
            engine_note,
            loaded_at: now,
        };
        model.warm_up()?;
        Ok(model)
    }

    /// Reads the manifest at `path` and the model file it names (from the same directory
    /// only), then loads the model.
    pub fn load_from_manifest(
        path: &Path,
        options: &LoadOptions,
        now: Time,
    ) -> Result<Model, LoadError> {
        let (manifest, bytes) = read_manifest(path, options)?;
        Model::load(manifest, &bytes, options, now)
    }

    /// Loads a model from a manifest that is not written yet and the bytes of the file it
    /// names, with every check [`Model::load_from_manifest`] makes, so that a tool writing
    /// manifests (`nudge manifest`) refuses what the server would refuse, for the same
    /// reason.
    pub fn load_unwritten(
        manifest: Manifest,
        bytes: &[u8],
        options: &LoadOptions,
        now: Time,
    ) -> Result<Model, LoadError> {
        check_manifest_fields(&manifest)?;
        check_size(bytes.len() as u64, options)?;
        check_hash(&manifest, bytes)?;
        Model::load(manifest, bytes, options, now)
    }

    /// Scores FeatureSpec rows: picks this model's columns, in its order, and asks the backend.
    pub fn score(&self, rows: &[FeatureRow]) -> Result<Vec<f64>, ScoreError> {
        let n = self.columns.len();
        let mut matrix = Vec::with_capacity(rows.len() * n);
        for row in rows {
            matrix.extend(self.columns.iter().map(|&c| row.0[c]));
        }
        self.score_matrix(&matrix)
    }

    /// Scores rows already in this model's column order (the manifest's `features`), row
    /// after row: the form an Open Inference Protocol tensor arrives in.
    pub fn score_matrix(&self, matrix: &[f64]) -> Result<Vec<f64>, ScoreError> {
        let n = self.columns.len();
        let rows = matrix.len() / n;
        if rows * n != matrix.len() {
            return Err(ScoreError::Backend(format!(
                "{} numbers are not whole rows of {n}",
                matrix.len()
            )));
        }
        let out = self.scorer.predict(matrix, n)?;
        if out.len() != rows {
            return Err(ScoreError::Backend(format!(
                "{} answers for {rows} rows",
                out.len(),
            )));
        }
        Ok(out)
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// What scores this model: `native/avx2`, `lightgbm`, `onnxruntime`.
    pub fn engine(&self) -> String {
        self.scorer.engine()
    }

    /// Why the native engine does not serve this model, when it was asked to.
    pub fn engine_note(&self) -> Option<&str> {
        self.engine_note.as_deref()
    }

    /// The `top` features that moved this row's score most, by the size of their
    /// contribution to the raw score; empty for backends that cannot explain.
    pub fn contributions(&self, row: &FeatureRow, top: usize) -> Vec<(&'static str, f64)> {
        let matrix: Vec<f64> = self.columns.iter().map(|&c| row.0[c]).collect();
        let Some(Ok(values)) = self.scorer.contributions(&matrix) else {
            return Vec::new();
        };
        let mut named: Vec<(&'static str, f64)> = self
            .columns
            .iter()
            .zip(values)
            .map(|(&c, v)| (crate::features::FEATURES[c].name, v))
            .filter(|(_, v)| *v != 0.0 && v.is_finite())
            .collect();
        named.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        named.truncate(top);
        named
    }

    /// Scores an all-missing row and an all-zero row; both must give a probability.
    fn warm_up(&self) -> Result<(), LoadError> {
        let rows = [
            FeatureRow::missing(),
            FeatureRow([0.0; crate::features::FEATURE_COUNT]),
        ];
        let out = self
            .score(&rows)
            .map_err(|e| LoadError::BadOutput(e.to_string()))?;
        match out.iter().find(|p| !(0.0..=1.0).contains(*p)) {
            Some(p) => Err(LoadError::BadOutput(format!(
                "the model answered {p}, not a probability in [0, 1]"
            ))),
            None => Ok(()),
        }
    }
}

/// Reads and checks a manifest, and reads the model file it names, checking its size and
/// hash: everything short of parsing the model.
fn read_manifest(path: &Path, options: &LoadOptions) -> Result<(Manifest, Vec<u8>), LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    let manifest = Manifest::parse(&text).map_err(|e| LoadError::Manifest(e.to_string()))?;
    check_manifest_fields(&manifest)?;
    if name_of(path) != Some(manifest.name.as_str()) {
        return Err(LoadError::Manifest(format!(
            "a manifest for {:?} must be named {:?}",
            manifest.name,
            format!("{}{}", manifest.name, manifest::MANIFEST_SUFFIX)
        )));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let file = dir.join(&manifest.file);
    let size = std::fs::metadata(&file)
        .map_err(|e| io_error(&file, e))?
        .len();
    check_size(size, options)?;
    let bytes = std::fs::read(&file).map_err(|e| io_error(&file, e))?;
    check_hash(&manifest, &bytes)?;
    Ok((manifest, bytes))
}

fn check_size(size: u64, options: &LoadOptions) -> Result<(), LoadError> {
    if size > options.max_file_bytes {
        return Err(LoadError::TooLarge {
            size,
            limit: options.max_file_bytes,
        });
    }
    Ok(())
}

fn check_hash(manifest: &Manifest, bytes: &[u8]) -> Result<(), LoadError> {
    let actual = manifest::sha256_hex(bytes);
    if !actual.eq_ignore_ascii_case(&manifest.sha256) {
        return Err(LoadError::HashMismatch {
            file: manifest.file.clone(),
            expected: manifest.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// Builds the backend for a model file's bytes, and says why the native engine does not
/// serve it when it was asked to.
fn build_scorer(
    format: ModelFormat,
    bytes: &[u8],
    options: &LoadOptions,
) -> Result<(Box<dyn Scorer>, Option<String>), LoadError> {
    Ok(match format {
        ModelFormat::Lightgbm => {
            let text = std::str::from_utf8(bytes).map_err(|e| {
                LoadError::Parse(format!("a LightGBM text model must be UTF-8: {e}"))
            })?;
            lightgbm::scorer(text, options.engine)?
        }
        ModelFormat::Onnx => onnx::scorer(bytes, &options.onnxruntime_library, options.engine)?,
    })
}

/// The column names a model file records, read by the backend that would serve it (so a
/// file the server cannot parse is refused with the server's reason); `None` when the file
/// records none, as ONNX files and LightGBM files trained on unnamed columns do.
pub fn file_feature_names(
    format: ModelFormat,
    bytes: &[u8],
    options: &LoadOptions,
) -> Result<Option<Vec<String>>, LoadError> {
    check_size(bytes.len() as u64, options)?;
    Ok(build_scorer(format, bytes, options)?.0.feature_names())
}

/// The model name a manifest path is for: `purchase.manifest.toml` → `purchase`.
fn name_of(path: &Path) -> Option<&str> {
    path.file_name()?
        .to_str()?
        .strip_suffix(manifest::MANIFEST_SUFFIX)
}

/// The manifests in a directory, in name order.
fn manifests_in(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_error(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| name_of(p).is_some())
        .collect();
    manifests.sort();
    Ok(manifests)
}

fn io_error(path: &Path, e: std::io::Error) -> LoadError {
    LoadError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Checks the manifest fields that need no model file.
fn check_manifest_fields(m: &Manifest) -> Result<(), LoadError> {
    let mut problems = Vec::new();
    let valid_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    if !valid_name(&m.name) {
        problems.push(format!(
            "name {:?} must be 1 to 64 of a-z, 0-9, '_' and '-'",
            m.name
        ));
    }
    if m.version.is_empty() {
        problems.push("version is empty".to_owned());
    }
    // The model file must sit beside its manifest: no directories, no "..".
    let plain = Path::new(&m.file)
        .file_name()
        .is_some_and(|f| f == m.file.as_str());
    if !plain || m.file.starts_with('.') {
        problems.push(format!(
            "file {:?} must be a plain file name in the manifest's directory",
            m.file
        ));
    }
    if m.sha256.len() != 64 || !m.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        problems.push(format!("sha256 {:?} is not 64 hex digits", m.sha256));
    }
    if m.features.is_empty() {
        problems.push("features is empty".to_owned());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(LoadError::Manifest(problems.join("; ")))
    }
}

/// Maps the manifest's feature names to FeatureSpec positions.
fn map_columns(manifest: &Manifest, spec: &FeatureSpec) -> Result<Vec<usize>, LoadError> {
    let unknown: Vec<String> = manifest
        .features
        .iter()
        .filter(|n| spec.index_of(n).is_none())
        .cloned()
        .collect();
    if !unknown.is_empty() {
        return Err(LoadError::UnknownFeature {
            names: unknown,
            spec_version: spec.version,
        });
    }
    let mut seen = HashSet::new();
    if let Some(dup) = manifest.features.iter().find(|n| !seen.insert(n.as_str())) {
        return Err(LoadError::FeatureNames(format!(
            "the manifest lists {dup:?} twice"
        )));
    }
    Ok(manifest
        .features
        .iter()
        .filter_map(|n| spec.index_of(n))
        .collect())
}

/// Describes how the model file's column names differ from the manifest's, if they do.
fn describe_name_diff(manifest: &[String], model: &[String]) -> Option<String> {
    let diffs: Vec<String> = manifest
        .iter()
        .zip(model)
        .enumerate()
        .filter(|(_, (m, f))| m != f)
        .map(|(i, (m, f))| {
            format!("column {i} is {f:?} in the model file but {m:?} in the manifest")
        })
        .collect();
    if diffs.is_empty() {
        return None;
    }
    let shown = diffs.len().min(5);
    let more = if diffs.len() > shown {
        format!(" (and {} more)", diffs.len() - shown)
    } else {
        String::new()
    };
    Some(format!("{}{more}", diffs[..shown].join("; ")))
}

/// A model that could not be loaded, and why.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    pub manifest: PathBuf,
    pub error: LoadError,
    /// When the load was tried.
    pub at: Time,
}

/// The models being served, by name.
#[derive(Debug, Default)]
pub struct ModelSet {
    models: Vec<Arc<Model>>,
}

impl ModelSet {
    /// Loads every `*.manifest.toml` in `dir`, in name order. A model that fails a check is
    /// left out and reported; the others still load.
    pub fn load_dir(
        dir: &Path,
        options: &LoadOptions,
        now: Time,
    ) -> Result<(ModelSet, Vec<LoadFailure>), LoadError> {
        ModelSet::reload(dir, options, now, &ModelSet::default())
    }

    /// Loads every manifest in `dir` into a new set. A model whose manifest and file are
    /// unchanged from `current` is reused as it is. A model that fails a check is reported,
    /// and if `current` serves a model of that name, that one keeps serving. A model whose
    /// manifest is gone is no longer served.
    pub fn reload(
        dir: &Path,
        options: &LoadOptions,
        now: Time,
        current: &ModelSet,
    ) -> Result<(ModelSet, Vec<LoadFailure>), LoadError> {
        let mut set = ModelSet::default();
        let mut failures = Vec::new();
        for path in manifests_in(dir)? {
            let loaded = read_manifest(&path, options).and_then(|(manifest, bytes)| {
                if set.get(&manifest.name).is_some() {
                    return Err(LoadError::DuplicateName(manifest.name));
                }
                match current.get(&manifest.name) {
                    Some(serving) if serving.manifest == manifest => Ok(serving.clone()),
                    _ => Model::load(manifest, &bytes, options, now).map(Arc::new),
                }
            });
            match loaded {
                Ok(model) => set.models.push(model),
                Err(error) => {
                    let name = name_of(&path).unwrap_or_default();
                    if let Some(serving) = current.get(name) {
                        if set.get(name).is_none() {
                            set.models.push(serving.clone());
                        }
                    }
                    failures.push(LoadFailure {
                        manifest: path,
                        error,
                        at: now,
                    });
                }
            }
        }
        Ok((set, failures))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Model>> {
        self.models.iter().find(|m| m.name() == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.models.iter()
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The models named in `names`, or all of them when `names` is empty. Returns the first
    /// unknown name as the error.
    pub fn select<'a>(&self, names: &'a [String]) -> Result<Vec<Arc<Model>>, &'a str> {
        if names.is_empty() {
            return Ok(self.models.clone());
        }
        names
            .iter()
            .map(|n| self.get(n).cloned().ok_or(n.as_str()))
            .collect()
    }
}

/// The current model set, swappable while requests are in flight: each request keeps the
/// `Arc` it started with. Reloads read the models directory again and swap in the new set
/// in one step; a model that fails its checks leaves the one it would replace serving.
#[derive(Debug, Default)]
pub struct ModelRegistry {
    current: ArcSwap<ModelSet>,
    /// The published behavioral segments, if the models directory has them.
    segments: ArcSwap<Option<crate::segments::Segments>>,
    source: Option<(PathBuf, LoadOptions)>,
    reloads: std::sync::Mutex<ReloadState>,
}

#[derive(Debug, Default)]
struct ReloadState {
    /// The manifests failing as of the last reload, with a fingerprint of what failed, so a
    /// file that is still the same bad file is neither retried in the logs nor recounted.
    failing: Vec<(LoadFailure, Vec<u8>)>,
}

/// What a reload did.
#[derive(Debug)]
pub struct ReloadReport {
    pub set: Arc<ModelSet>,
    /// Models that now serve a different manifest than before (or are new, or are gone).
    pub changed: Vec<String>,
    /// Failures that are new since the last reload.
    pub new_failures: Vec<LoadFailure>,
}

/// What identifies a manifest and its file's state: the manifest's bytes and the file's
/// size and modification time.
fn fingerprint(manifest: &Path) -> Vec<u8> {
    let mut print = std::fs::read(manifest).unwrap_or_default();
    if let Some(file) = std::str::from_utf8(&print)
        .ok()
        .and_then(|t| Manifest::parse(t).ok())
        .map(|m| manifest.parent().unwrap_or(Path::new(".")).join(m.file))
    {
        if let Ok(meta) = std::fs::metadata(file) {
            print.extend(meta.len().to_le_bytes());
            if let Ok(modified) = meta.modified() {
                print.extend(format!("{modified:?}").bytes());
            }
        }
    }
    print
}

impl ModelRegistry {
    /// A registry serving a fixed set (tests, benchmarks).
    pub fn new(set: ModelSet) -> ModelRegistry {
        ModelRegistry {
            current: ArcSwap::from_pointee(set),
            ..ModelRegistry::default()
        }
    }

    /// A registry that serves the models of `dir` and can reload them.
    pub fn open(
        dir: &Path,
        options: LoadOptions,
        now: Time,
    ) -> Result<(ModelRegistry, Vec<LoadFailure>), LoadError> {
        let registry = ModelRegistry {
            source: Some((dir.to_owned(), options)),
            ..ModelRegistry::default()
        };
        let report = registry.reload(now)?;
        Ok((registry, report.new_failures))
    }

    pub fn current(&self) -> Arc<ModelSet> {
        self.current.load_full()
    }

    /// Reads the models directory again and swaps in the result. Blocking: model files are
    /// parsed on the calling thread. Reloads run one at a time.
    pub fn reload(&self, now: Time) -> Result<ReloadReport, LoadError> {
        let Some((dir, options)) = &self.source else {
            return Ok(ReloadReport {
                set: self.current(),
                changed: Vec::new(),
                new_failures: Vec::new(),
            });
        };
        let mut state = self.reloads.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.current();
        let (set, mut failures) = ModelSet::reload(dir, options, now, &before)?;
        let segments_path = dir.join(crate::segments::SEGMENTS_FILE);
        if segments_path.exists() {
            match crate::segments::Segments::load(&segments_path) {
                Ok(segments) => self.segments.store(Arc::new(Some(segments))),
                // The segments in force, if any, stay.
                Err(e) => failures.push(LoadFailure {
                    manifest: segments_path,
                    error: LoadError::Segments(e),
                    at: now,
                }),
            }
        }
        let mut new_failures = Vec::new();
        let mut failing = Vec::new();
        for failure in failures {
            let print = fingerprint(&failure.manifest);
            let known = state
                .failing
                .iter()
                .find(|(f, p)| f.manifest == failure.manifest && *p == print);
            match known {
                Some((first, _)) => failing.push((first.clone(), print)),
                None => {
                    new_failures.push(failure.clone());
                    failing.push((failure, print));
                }
            }
        }
        state.failing = failing;
        let version = |s: &ModelSet, name: &str| s.get(name).map(|m| m.manifest.clone());
        let mut changed: Vec<String> = set
            .iter()
            .map(|m| m.manifest.name.clone())
            .chain(before.iter().map(|m| m.manifest.name.clone()))
            .filter(|name| version(&set, name) != version(&before, name))
            .collect();
        changed.sort();
        changed.dedup();
        let set = Arc::new(set);
        self.current.store(set.clone());
        Ok(ReloadReport {
            set,
            changed,
            new_failures,
        })
    }

    /// The behavioral segments in force, if any.
    pub fn segments(&self) -> Arc<Option<crate::segments::Segments>> {
        self.segments.load_full()
    }

    /// The manifests that failed to load at the last reload, and why.
    pub fn failures(&self) -> Vec<LoadFailure> {
        let state = self.reloads.lock().unwrap_or_else(|e| e.into_inner());
        state.failing.iter().map(|(f, _)| f.clone()).collect()
    }
}
