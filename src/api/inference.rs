//! The Open Inference Protocol edge (KServe's V2 protocol, gRPC): `inference.GRPCInferenceService`
//! beside `NudgeService` on the same port, so a client written for KServe, Triton or Seldon
//! MLServer scores against Nudge's models without an adapter.
//!
//! A model takes what MLServer's LightGBM runtime takes: one input tensor of shape `[rows, n]`,
//! FP32 or FP64, whose columns are the model's manifest features in order (ModelMetadata lists
//! them in its `features` parameter), in typed `contents` or in `raw_input_contents`. It answers
//! one output, `predict`, FP64 `[rows, 1]`: the probability per row, in the form the request
//! came in (raw in, raw out). The models, their versions, refusals and metrics are `Score`'s:
//! the same registry, [`score_matrix`] for every call, and `nudge_invalid_input_total` with
//! `rpc="ModelInfer"` for every refusal. No protocol type goes past this module.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::error::ApiError;
use super::INLINE_SCORE_ROWS;
use crate::event::{check_len, quoted, FieldError, Reason, MAX_EVENT_ID_BYTES, MAX_NAME_BYTES};
use crate::metrics::Metrics;
use crate::model::{score_matrix, Model, ModelRegistry};
use crate::pb::inference as oip;
use crate::pb::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::readiness::Readiness;

/// The one output every model answers: its probability per row (MLServer's LightGBM
/// runtime's name for it).
pub const OUTPUT: &str = "predict";

/// The name ModelMetadata gives a model's input tensor. A request may name its one input
/// anything, as MLServer's runtimes allow.
pub const INPUT: &str = "features";

/// The RPC name refusals are counted under.
const RPC: &str = "ModelInfer";

/// The `inference.GRPCInferenceService` implementation.
#[derive(Clone)]
pub struct InferenceApi {
    pub models: Arc<ModelRegistry>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// The most rows one request may hold (`server.max_score_rows`, as for `Score`).
    pub max_rows: usize,
}

/// A request's one input tensor, checked: `values` holds `rows` rows of the model's
/// columns, row after row.
#[derive(Debug, PartialEq)]
struct Rows {
    values: Vec<f64>,
    rows: usize,
    /// Whether the tensor came in `raw_input_contents` (the answer goes out raw too).
    raw: bool,
}

/// The element types an input tensor may have.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Datatype {
    Fp32,
    Fp64,
}

impl Datatype {
    fn parse(text: &str) -> Option<Datatype> {
        match text {
            "FP32" => Some(Datatype::Fp32),
            "FP64" => Some(Datatype::Fp64),
            _ => None,
        }
    }

    const fn width(self) -> usize {
        match self {
            Datatype::Fp32 => 4,
            Datatype::Fp64 => 8,
        }
    }

    const fn as_str(self) -> &'static str {
        match self {
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
        }
    }
}

impl InferenceApi {
    /// Counts a refused input and turns it into the error to answer with.
    fn refuse(&self, e: FieldError) -> ApiError {
        self.metrics
            .invalid_input
            .with_label_values(&[RPC, e.reason.as_str()])
            .inc();
        ApiError::Invalid(e)
    }

    /// The model a request names at the version it names (the served one when empty), or
    /// NOT_FOUND saying what is served.
    fn model(&self, name: &str, version: &str) -> Result<Arc<Model>, ApiError> {
        let set = self.models.current();
        let Some(model) = set.get(name) else {
            if set.is_empty() {
                return Err(ApiError::NoModels);
            }
            let served: Vec<&str> = set.iter().map(|m| m.name()).collect();
            return Err(ApiError::NotFound(format!(
                "model {} is not served; served models: {served:?}",
                quoted(name)
            )));
        };
        if !version.is_empty() && version != model.manifest.version {
            return Err(ApiError::NotFound(format!(
                "model {name:?} is served at version {:?}, not {}",
                model.manifest.version,
                quoted(version)
            )));
        }
        Ok(model.clone())
    }

    /// A name and version a request picks a model with, bounded before anything quotes them.
    fn check_pick(&self, name: &str, version: &str, fields: [&str; 2]) -> Result<(), ApiError> {
        check_len(fields[0], name, MAX_NAME_BYTES).map_err(|e| self.refuse(e))?;
        check_len(fields[1], version, MAX_NAME_BYTES).map_err(|e| self.refuse(e))
    }

    async fn infer(
        &self,
        request: oip::ModelInferRequest,
    ) -> Result<oip::ModelInferResponse, ApiError> {
        self.check_pick(
            &request.model_name,
            &request.model_version,
            ["model_name", "model_version"],
        )?;
        check_len("id", &request.id, MAX_EVENT_ID_BYTES).map_err(|e| self.refuse(e))?;
        let model = match self.model(&request.model_name, &request.model_version) {
            Ok(model) => model,
            Err(e @ ApiError::NotFound(_)) => {
                self.metrics
                    .invalid_input
                    .with_label_values(&[RPC, Reason::UnknownModel.as_str()])
                    .inc();
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        check_outputs(&request.outputs).map_err(|e| self.refuse(e))?;
        let columns = model.manifest.features.len();
        let Rows { values, rows, raw } =
            input_rows(&request, columns, self.max_rows).map_err(|e| self.refuse(e))?;
        let probabilities = if rows <= INLINE_SCORE_ROWS {
            score_matrix(&model, &values, &self.metrics)
        } else {
            // A large tensor is CPU work that would hold up every other request on this
            // async worker; the blocking pool takes it, as for Score.
            let (model, metrics) = (model.clone(), self.metrics.clone());
            tokio::task::spawn_blocking(move || score_matrix(&model, &values, &metrics)).await?
        }
        .map_err(|error| ApiError::Model {
            model: model.manifest.name.clone(),
            error,
        })?;
        Ok(answer(&model, request.id, probabilities, raw))
    }
}

/// Every output a request asks for must be [`OUTPUT`].
fn check_outputs(
    outputs: &[oip::model_infer_request::InferRequestedOutputTensor],
) -> Result<(), FieldError> {
    for (i, output) in outputs.iter().enumerate() {
        if output.name != OUTPUT {
            return Err(FieldError::new(
                format!("outputs[{i}].name"),
                Reason::Unsupported,
                format!(
                    "is {}; a model answers one output, {OUTPUT:?}",
                    quoted(&output.name)
                ),
            ));
        }
    }
    Ok(())
}

/// The rows of a request's one input tensor, checked against the model's `columns`.
fn input_rows(
    request: &oip::ModelInferRequest,
    columns: usize,
    max_rows: usize,
) -> Result<Rows, FieldError> {
    let expected = || {
        format!("one tensor [rows, {columns}] of FP32 or FP64, the model's features as columns (ModelMetadata lists them)")
    };
    let input = match request.inputs.as_slice() {
        [] => {
            return Err(FieldError::new(
                "inputs",
                Reason::Missing,
                format!("is empty; a model takes {}", expected()),
            ))
        }
        [input] => input,
        more => {
            return Err(FieldError::new(
                "inputs",
                Reason::TooMany,
                format!("has {} tensors; a model takes {}", more.len(), expected()),
            ))
        }
    };
    let datatype = Datatype::parse(&input.datatype).ok_or_else(|| {
        FieldError::new(
            "inputs[0].datatype",
            Reason::Unsupported,
            format!("is {}; FP32 and FP64 are taken", quoted(&input.datatype)),
        )
    })?;
    let rows = match input.shape.as_slice() {
        &[rows, n] if n == columns as i64 && rows >= 0 => rows,
        &[_, n] if n != columns as i64 => {
            return Err(FieldError::new(
                "inputs[0].shape",
                Reason::ShapeMismatch,
                format!(
                    "has {n} columns; the model has {columns} features (ModelMetadata lists them)"
                ),
            ))
        }
        shape => {
            return Err(FieldError::new(
                "inputs[0].shape",
                Reason::ShapeMismatch,
                format!(
                    "is {:?}; expected {}",
                    &shape[..shape.len().min(8)],
                    expected()
                ),
            ))
        }
    };
    if rows == 0 {
        return Err(FieldError::new(
            "inputs[0].shape",
            Reason::Missing,
            "has 0 rows; at least one row is required",
        ));
    }
    if rows > max_rows as i64 {
        return Err(FieldError::new(
            "inputs[0].shape",
            Reason::TooMany,
            format!("has {rows} rows; at most {max_rows} are allowed per request"),
        ));
    }
    let rows = rows as usize;
    let count = rows * columns;
    let (values, raw) = if request.raw_input_contents.is_empty() {
        (typed_values(input, datatype, count)?, false)
    } else {
        (raw_values(request, input, datatype, count)?, true)
    };
    if let Some(at) = values.iter().position(|v| v.is_infinite()) {
        return Err(FieldError::new(
            format!("inputs[0][{}][{}]", at / columns, at % columns),
            Reason::NotFinite,
            format!(
                "is {}; NaN marks a missing feature, infinities are refused",
                values[at]
            ),
        ));
    }
    Ok(Rows { values, rows, raw })
}

/// The elements of a tensor sent in `raw_input_contents`: little-endian, row after row.
fn raw_values(
    request: &oip::ModelInferRequest,
    input: &oip::model_infer_request::InferInputTensor,
    datatype: Datatype,
    count: usize,
) -> Result<Vec<f64>, FieldError> {
    if request.raw_input_contents.len() != request.inputs.len() {
        return Err(FieldError::new(
            "raw_input_contents",
            Reason::ShapeMismatch,
            format!(
                "has {} entries; one per input is expected",
                request.raw_input_contents.len()
            ),
        ));
    }
    if input.contents.as_ref().is_some_and(has_elements) {
        return Err(FieldError::new(
            "inputs[0].contents",
            Reason::Conflicting,
            "is set and so is raw_input_contents; send the tensor in one of them",
        ));
    }
    let bytes = &request.raw_input_contents[0];
    let width = datatype.width();
    if bytes.len() != count * width {
        return Err(FieldError::new(
            "raw_input_contents[0]",
            Reason::ShapeMismatch,
            format!(
                "has {} bytes; the shape's {count} {} numbers are {} bytes",
                bytes.len(),
                datatype.as_str(),
                count * width
            ),
        ));
    }
    let values = match datatype {
        Datatype::Fp32 => bytes
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        Datatype::Fp64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("chunks of 8")))
            .collect(),
    };
    Ok(values)
}

/// The elements of a tensor sent in typed `contents`: in the field of its datatype.
fn typed_values(
    input: &oip::model_infer_request::InferInputTensor,
    datatype: Datatype,
    count: usize,
) -> Result<Vec<f64>, FieldError> {
    let Some(contents) = &input.contents else {
        return Err(FieldError::new(
            "inputs[0].contents",
            Reason::Missing,
            "is empty and there is no raw_input_contents; send the tensor in one of them",
        ));
    };
    let (field, len) = match datatype {
        Datatype::Fp32 => ("fp32_contents", contents.fp32_contents.len()),
        Datatype::Fp64 => ("fp64_contents", contents.fp64_contents.len()),
    };
    let others = other_elements(contents, datatype);
    if others > 0 {
        return Err(FieldError::new(
            "inputs[0].contents",
            Reason::Unsupported,
            format!(
                "holds {others} numbers outside {field}; a {} tensor's elements go in {field}",
                datatype.as_str()
            ),
        ));
    }
    if len != count {
        return Err(FieldError::new(
            format!("inputs[0].contents.{field}"),
            Reason::ShapeMismatch,
            format!("has {len} numbers; the shape holds {count}"),
        ));
    }
    Ok(match datatype {
        Datatype::Fp32 => contents
            .fp32_contents
            .iter()
            .map(|&v| f64::from(v))
            .collect(),
        Datatype::Fp64 => contents.fp64_contents.clone(),
    })
}

/// How many elements `contents` holds in fields other than `datatype`'s.
fn other_elements(contents: &oip::InferTensorContents, datatype: Datatype) -> usize {
    let floats = match datatype {
        Datatype::Fp32 => contents.fp64_contents.len(),
        Datatype::Fp64 => contents.fp32_contents.len(),
    };
    floats
        + contents.bool_contents.len()
        + contents.int_contents.len()
        + contents.int64_contents.len()
        + contents.uint_contents.len()
        + contents.uint64_contents.len()
        + contents.bytes_contents.len()
}

fn has_elements(contents: &oip::InferTensorContents) -> bool {
    other_elements(contents, Datatype::Fp32) + contents.fp32_contents.len() > 0
}

/// The answer: one output, `predict`, FP64 `[rows, 1]`, raw when the request was.
fn answer(
    model: &Model,
    id: String,
    probabilities: Vec<f64>,
    raw: bool,
) -> oip::ModelInferResponse {
    let mut output = oip::model_infer_response::InferOutputTensor {
        name: OUTPUT.to_owned(),
        datatype: "FP64".to_owned(),
        shape: vec![probabilities.len() as i64, 1],
        ..Default::default()
    };
    let mut raw_output_contents = Vec::new();
    if raw {
        let mut bytes = Vec::with_capacity(probabilities.len() * 8);
        for p in &probabilities {
            bytes.extend_from_slice(&p.to_le_bytes());
        }
        raw_output_contents.push(bytes.into());
    } else {
        output.contents = Some(oip::InferTensorContents {
            fp64_contents: probabilities,
            ..Default::default()
        });
    }
    oip::ModelInferResponse {
        model_name: model.manifest.name.clone(),
        model_version: model.manifest.version.clone(),
        id,
        parameters: Default::default(),
        outputs: vec![output],
        raw_output_contents,
    }
}

fn string_parameter(value: impl Into<String>) -> oip::InferParameter {
    oip::InferParameter {
        parameter_choice: Some(oip::infer_parameter::ParameterChoice::StringParam(
            value.into(),
        )),
    }
}

/// A model's metadata: its version, format, its one input and output, and in its
/// parameters the feature names of the input's columns, in order.
fn metadata(model: &Model) -> oip::ModelMetadataResponse {
    use oip::model_metadata_response::TensorMetadata;
    let manifest = &model.manifest;
    let parameters = [
        ("features", Some(manifest.features.join(","))),
        (
            "feature_spec_version",
            manifest.feature_spec_version.clone(),
        ),
        ("predicts", Some(manifest.predicts.clone())),
        ("engine", Some(model.engine())),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_owned(), string_parameter(v?))))
    .collect();
    oip::ModelMetadataResponse {
        name: manifest.name.clone(),
        versions: vec![manifest.version.clone()],
        platform: manifest.format.as_str().to_owned(),
        inputs: vec![TensorMetadata {
            name: INPUT.to_owned(),
            datatype: "FP64".to_owned(),
            shape: vec![-1, manifest.features.len() as i64],
            parameters: Default::default(),
        }],
        outputs: vec![TensorMetadata {
            name: OUTPUT.to_owned(),
            datatype: "FP64".to_owned(),
            shape: vec![-1, 1],
            parameters: Default::default(),
        }],
        parameters,
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceApi {
    async fn server_live(
        &self,
        _request: Request<oip::ServerLiveRequest>,
    ) -> Result<Response<oip::ServerLiveResponse>, Status> {
        Ok(Response::new(oip::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<oip::ServerReadyRequest>,
    ) -> Result<Response<oip::ServerReadyResponse>, Status> {
        Ok(Response::new(oip::ServerReadyResponse {
            ready: self.readiness.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<oip::ModelReadyRequest>,
    ) -> Result<Response<oip::ModelReadyResponse>, Status> {
        let oip::ModelReadyRequest { name, version } = request.into_inner();
        self.check_pick(&name, &version, ["name", "version"])?;
        Ok(Response::new(oip::ModelReadyResponse {
            ready: self.model(&name, &version).is_ok(),
        }))
    }

    async fn server_metadata(
        &self,
        _request: Request<oip::ServerMetadataRequest>,
    ) -> Result<Response<oip::ServerMetadataResponse>, Status> {
        Ok(Response::new(oip::ServerMetadataResponse {
            name: "nudge".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<oip::ModelMetadataRequest>,
    ) -> Result<Response<oip::ModelMetadataResponse>, Status> {
        let oip::ModelMetadataRequest { name, version } = request.into_inner();
        self.check_pick(&name, &version, ["name", "version"])?;
        let model = self.model(&name, &version)?;
        Ok(Response::new(metadata(&model)))
    }

    async fn model_infer(
        &self,
        request: Request<oip::ModelInferRequest>,
    ) -> Result<Response<oip::ModelInferResponse>, Status> {
        Ok(Response::new(self.infer(request.into_inner()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oip::model_infer_request::InferInputTensor;

    fn request(
        datatype: &str,
        shape: Vec<i64>,
        contents: oip::InferTensorContents,
    ) -> oip::ModelInferRequest {
        oip::ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: datatype.into(),
                shape,
                contents: Some(contents),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn fp64(values: Vec<f64>) -> oip::InferTensorContents {
        oip::InferTensorContents {
            fp64_contents: values,
            ..Default::default()
        }
    }

    #[test]
    fn typed_and_raw_tensors_read_the_same_rows() {
        let values = vec![1.0, f64::NAN, 3.5, 4.0, 5.0, -6.25];
        let typed = input_rows(&request("FP64", vec![2, 3], fp64(values.clone())), 3, 10).unwrap();
        let mut raw = request("FP64", vec![2, 3], Default::default());
        raw.raw_input_contents = vec![values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into()];
        let raw = input_rows(&raw, 3, 10).unwrap();
        assert_eq!(
            (typed.rows, typed.raw, raw.rows, raw.raw),
            (2, false, 2, true)
        );
        for (a, b) in typed.values.iter().zip(&raw.values) {
            assert!(a.to_bits() == b.to_bits(), "{a} {b}");
        }
        let mut fp32 = request("FP32", vec![2, 3], Default::default());
        fp32.raw_input_contents = vec![values
            .iter()
            .flat_map(|&v| (v as f32).to_le_bytes())
            .collect::<Vec<u8>>()
            .into()];
        let fp32 = input_rows(&fp32, 3, 10).unwrap();
        assert_eq!(fp32.values[5], -6.25);
        assert!(fp32.values[1].is_nan());
    }

    #[test]
    fn a_bad_tensor_is_refused_naming_the_field_and_the_reason() {
        let ok = || request("FP64", vec![1, 2], fp64(vec![1.0, 2.0]));
        let cases: Vec<(oip::ModelInferRequest, &str, Reason)> = vec![
            (oip::ModelInferRequest::default(), "inputs", Reason::Missing),
            (
                {
                    let mut r = ok();
                    r.inputs.push(r.inputs[0].clone());
                    r
                },
                "inputs",
                Reason::TooMany,
            ),
            (
                request("INT64", vec![1, 2], fp64(vec![1.0, 2.0])),
                "inputs[0].datatype",
                Reason::Unsupported,
            ),
            (
                request("FP64", vec![1, 3], fp64(vec![1.0, 2.0, 3.0])),
                "inputs[0].shape",
                Reason::ShapeMismatch,
            ),
            (
                request("FP64", vec![2], fp64(vec![1.0, 2.0])),
                "inputs[0].shape",
                Reason::ShapeMismatch,
            ),
            (
                request("FP64", vec![-1, 2], fp64(vec![1.0, 2.0])),
                "inputs[0].shape",
                Reason::ShapeMismatch,
            ),
            (
                request("FP64", vec![0, 2], fp64(vec![])),
                "inputs[0].shape",
                Reason::Missing,
            ),
            (
                request("FP64", vec![11, 2], fp64(vec![0.0; 22])),
                "inputs[0].shape",
                Reason::TooMany,
            ),
            (
                request("FP64", vec![i64::MAX, 2], fp64(vec![])),
                "inputs[0].shape",
                Reason::TooMany,
            ),
            (
                request("FP64", vec![2, 2], fp64(vec![1.0, 2.0])),
                "inputs[0].contents.fp64_contents",
                Reason::ShapeMismatch,
            ),
            (
                request(
                    "FP64",
                    vec![1, 2],
                    oip::InferTensorContents {
                        fp32_contents: vec![1.0, 2.0],
                        ..Default::default()
                    },
                ),
                "inputs[0].contents",
                Reason::Unsupported,
            ),
            (
                request("FP64", vec![1, 2], fp64(vec![1.0, f64::INFINITY])),
                "inputs[0][0][1]",
                Reason::NotFinite,
            ),
            (
                {
                    let mut r = ok();
                    r.raw_input_contents = vec![vec![0u8; 16].into()];
                    r
                },
                "inputs[0].contents",
                Reason::Conflicting,
            ),
            (
                {
                    let mut r = request("FP32", vec![1, 2], Default::default());
                    r.raw_input_contents = vec![vec![0u8; 12].into()];
                    r
                },
                "raw_input_contents[0]",
                Reason::ShapeMismatch,
            ),
            (
                {
                    let mut r = request("FP32", vec![1, 2], Default::default());
                    r.raw_input_contents = vec![vec![0u8; 8].into(), vec![0u8; 8].into()];
                    r
                },
                "raw_input_contents",
                Reason::ShapeMismatch,
            ),
        ];
        for (request, field, reason) in cases {
            let e = input_rows(&request, 2, 10).unwrap_err();
            assert_eq!((e.field.as_str(), e.reason), (field, reason), "{e:?}");
        }
        assert!(input_rows(&ok(), 2, 10).is_ok());
        let wrong_output = [oip::model_infer_request::InferRequestedOutputTensor {
            name: "probabilities".into(),
            ..Default::default()
        }];
        let e = check_outputs(&wrong_output).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.reason),
            ("outputs[0].name", Reason::Unsupported)
        );
    }
}
