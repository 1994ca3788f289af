//! Model manifests: the TOML file beside each model that says what it is, which file holds
//! it, the file's sha256 and the FeatureSpec names of its input columns, in order.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The file name suffix that marks a manifest in the models directory.
pub const MANIFEST_SUFFIX: &str = ".manifest.toml";

/// The model file formats Nudge serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// A LightGBM text model (`Booster.save_model`), scored through the LightGBM C API.
    Lightgbm,
    /// An ONNX model (for example from `onnxmltools.convert_lightgbm(..., zipmap=False)`),
    /// scored through ONNX Runtime.
    Onnx,
}

impl ModelFormat {
    pub const fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Lightgbm => "lightgbm",
            ModelFormat::Onnx => "onnx",
        }
    }
}

/// What a model is and how to feed it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The name callers ask for, such as `purchase` or `churn`.
    pub name: String,
    /// The version, reported with every score.
    pub version: String,
    pub format: ModelFormat,
    /// The model file's name, in the same directory as the manifest.
    pub file: String,
    /// The hex sha256 of the model file.
    pub sha256: String,
    /// What the model predicts, for people: "purchase within 24 hours".
    pub predicts: String,
    /// The FeatureSpec names of the model's input columns, in column order.
    pub features: Vec<String>,
    /// The FeatureSpec version the model was trained against, for information.
    #[serde(default)]
    pub feature_spec_version: Option<String>,
    /// Free-form facts about training (rows, AUC …), for information.
    #[serde(default)]
    pub training: toml::Table,
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Manifest, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a manifest always serializes")
    }

    /// Where the manifest for a model named `name` lives in `dir`.
    pub fn path_in(dir: &Path, name: &str) -> std::path::PathBuf {
        dir.join(format!("{name}{MANIFEST_SUFFIX}"))
    }
}

/// The hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
