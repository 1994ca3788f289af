//! The Open Inference Protocol door: `inference.GRPCInferenceService` on Nudge's gRPC port,
//! driven by a tonic client built from Nudge's own proto and by NVIDIA's tritonclient (the
//! real client of Triton and KServe), holding every answer to `Score`'s for the same rows.

use nudge::pb::inference as oip;
use nudge::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use nudge::pb::{self, score_request::Subject};
use oip::model_infer_request::InferInputTensor;
use tonic::Code;

use crate::support::{metric_value, repo_path, TestServer};

/// The manifest's features of the shipped purchase model, in its order.
fn purchase_features() -> Vec<String> {
    let text = std::fs::read_to_string(repo_path("models/purchase.manifest.toml")).unwrap();
    let manifest: toml::Value = toml::from_str(&text).unwrap();
    manifest["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect()
}

/// Rows of varied, plausible feature values (exact in FP32, so both datatypes state the
/// same rows), with some features missing.
fn rows(columns: usize, count: usize) -> Vec<Vec<f64>> {
    (0..count)
        .map(|r| {
            (0..columns)
                .map(|c| {
                    if (r + c) % 7 == 3 {
                        f64::NAN
                    } else {
                        ((r * 31 + c * 17) % 23) as f64 * 0.5
                    }
                })
                .collect()
        })
        .collect()
}

/// What `Score` answers for `rows` given in `features`' order (the packed form).
async fn scored(server: &TestServer, features: &[String], rows: &[Vec<f64>]) -> Vec<f64> {
    let response = server
        .client()
        .await
        .score(pb::ScoreRequest {
            subject: Some(Subject::FeatureRows(pb::FeatureRows {
                rows: vec![],
                columns: features.to_vec(),
                values: rows.concat(),
            })),
            models: vec!["purchase".into()],
        })
        .await
        .unwrap()
        .into_inner();
    response
        .rows
        .iter()
        .map(|r| r.scores[0].probability)
        .collect()
}

fn tensor(datatype: &str, rows: usize, columns: usize) -> InferInputTensor {
    InferInputTensor {
        name: "features".into(),
        datatype: datatype.into(),
        shape: vec![rows as i64, columns as i64],
        ..Default::default()
    }
}

fn infer_request(input: InferInputTensor, raw: Option<Vec<u8>>) -> oip::ModelInferRequest {
    oip::ModelInferRequest {
        model_name: "purchase".into(),
        id: "request-7".into(),
        inputs: vec![input],
        raw_input_contents: raw.into_iter().map(Into::into).collect(),
        ..Default::default()
    }
}

/// The probabilities of an answer, from its typed contents or its raw bytes.
fn probabilities(response: &oip::ModelInferResponse) -> Vec<f64> {
    assert_eq!(response.outputs.len(), 1);
    let output = &response.outputs[0];
    assert_eq!(
        (output.name.as_str(), output.datatype.as_str()),
        ("predict", "FP64")
    );
    let values: Vec<f64> = match response.raw_output_contents.as_slice() {
        [] => output.contents.as_ref().unwrap().fp64_contents.clone(),
        [raw] => raw
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        more => panic!("{} raw outputs for one output", more.len()),
    };
    assert_eq!(output.shape, vec![values.len() as i64, 1]);
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_infer_scores_typed_and_raw_tensors_as_score_does() {
    let server = TestServer::start().await;
    let mut oip = GrpcInferenceServiceClient::new(server.channel().await);
    let features = purchase_features();
    let n = features.len();

    let live = oip.server_live(oip::ServerLiveRequest {}).await.unwrap();
    assert!(live.into_inner().live);
    let ready = oip.server_ready(oip::ServerReadyRequest {}).await.unwrap();
    assert!(ready.into_inner().ready);
    let meta = oip
        .model_metadata(oip::ModelMetadataRequest {
            name: "purchase".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.versions, vec!["sim-3".to_owned()]);
    assert_eq!(meta.platform, "lightgbm");
    assert_eq!(meta.inputs[0].shape, vec![-1, n as i64]);
    let Some(oip::infer_parameter::ParameterChoice::StringParam(listed)) =
        &meta.parameters["features"].parameter_choice
    else {
        panic!("no features parameter: {:?}", meta.parameters);
    };
    assert_eq!(listed.split(',').collect::<Vec<_>>(), features);

    let rows = rows(n, 9);
    let expected = scored(&server, &features, &rows).await;
    assert_eq!(expected.len(), 9);
    assert!(expected.iter().any(|&p| p != expected[0]), "{expected:?}");

    // One request per form: FP64 typed, FP64 raw, FP32 typed, FP32 raw.
    let mut fp64 = tensor("FP64", rows.len(), n);
    fp64.contents = Some(oip::InferTensorContents {
        fp64_contents: rows.concat(),
        ..Default::default()
    });
    let mut fp32 = tensor("FP32", rows.len(), n);
    fp32.contents = Some(oip::InferTensorContents {
        fp32_contents: rows.concat().iter().map(|&v| v as f32).collect(),
        ..Default::default()
    });
    let raw64: Vec<u8> = rows.concat().iter().flat_map(|v| v.to_le_bytes()).collect();
    let raw32: Vec<u8> = rows
        .concat()
        .iter()
        .flat_map(|&v| (v as f32).to_le_bytes())
        .collect();
    let requests = [
        (infer_request(fp64, None), false),
        (
            infer_request(tensor("FP64", rows.len(), n), Some(raw64)),
            true,
        ),
        (infer_request(fp32, None), false),
        (
            infer_request(tensor("FP32", rows.len(), n), Some(raw32)),
            true,
        ),
    ];
    for (request, raw) in requests {
        let datatype = request.inputs[0].datatype.clone();
        let response = oip.model_infer(request).await.unwrap().into_inner();
        assert_eq!(
            (
                response.raw_output_contents.is_empty(),
                response.id.as_str()
            ),
            (!raw, "request-7"),
            "{datatype}: answered in the form asked, echoing the id"
        );
        assert_eq!(
            (
                response.model_name.as_str(),
                response.model_version.as_str()
            ),
            ("purchase", "sim-3")
        );
        let got = probabilities(&response);
        for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{datatype} raw={raw} row {i}: {a} vs {b}"
            );
        }
        assert_eq!(got.len(), expected.len());
    }

    // The calls are counted as every RPC is, and scored through the model's metrics.
    let text = server.metrics().await;
    let ok = metric_value(
        &text,
        "nudge_grpc_requests_total{code=\"OK\",rpc=\"ModelInfer\"}",
    );
    assert_eq!(ok, Some(4.0), "{text}");
    let calls = metric_value(
        &text,
        "nudge_model_score_duration_seconds_count{model=\"purchase\"}",
    )
    .unwrap();
    assert!(calls >= 5.0, "four ModelInfer calls and a Score: {calls}");
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_infer_refuses_bad_requests_by_field_and_counts_them() {
    let server = TestServer::start().await;
    let mut oip = GrpcInferenceServiceClient::new(server.channel().await);
    let n = purchase_features().len();
    let typed = |rows: usize, columns: usize, values: Vec<f64>| {
        let mut input = tensor("FP64", rows, columns);
        input.contents = Some(oip::InferTensorContents {
            fp64_contents: values,
            ..Default::default()
        });
        infer_request(input, None)
    };
    let cases: Vec<(&str, oip::ModelInferRequest, Code, &str, &str)> = vec![
        (
            "one column too few",
            typed(1, n - 1, vec![0.0; n - 1]),
            Code::InvalidArgument,
            "inputs[0].shape",
            "shape_mismatch",
        ),
        (
            "values short of the shape",
            typed(2, n, vec![0.0; n]),
            Code::InvalidArgument,
            "inputs[0].contents.fp64_contents",
            "shape_mismatch",
        ),
        (
            "an integer tensor",
            {
                let mut r = typed(1, n, vec![0.0; n]);
                r.inputs[0].datatype = "INT64".into();
                r
            },
            Code::InvalidArgument,
            "inputs[0].datatype",
            "unsupported",
        ),
        (
            "an infinite value",
            {
                let mut values = vec![0.0; n];
                values[4] = f64::INFINITY;
                typed(1, n, values)
            },
            Code::InvalidArgument,
            "inputs[0][0][4]",
            "not_finite",
        ),
        (
            "too many rows",
            typed(1001, n, vec![0.0; 1001 * n]),
            Code::InvalidArgument,
            "inputs[0].shape",
            "too_many",
        ),
        (
            "an output that is not served",
            {
                let mut r = typed(1, n, vec![0.0; n]);
                r.outputs = vec![oip::model_infer_request::InferRequestedOutputTensor {
                    name: "probabilities".into(),
                    ..Default::default()
                }];
                r
            },
            Code::InvalidArgument,
            "outputs[0].name",
            "unsupported",
        ),
        (
            "an over-long model name",
            {
                let mut r = typed(1, n, vec![0.0; n]);
                r.model_name = "m".repeat(100_000);
                r
            },
            Code::InvalidArgument,
            "model_name",
            "too_long",
        ),
        (
            "an unknown model",
            {
                let mut r = typed(1, n, vec![0.0; n]);
                r.model_name = "no-such-model".into();
                r
            },
            Code::NotFound,
            "no-such-model",
            "unknown_model",
        ),
        (
            "a version not served",
            {
                let mut r = typed(1, n, vec![0.0; n]);
                r.model_version = "sim-1".into();
                r
            },
            Code::NotFound,
            "sim-3",
            "unknown_model",
        ),
    ];
    for (case, request, code, named, reason) in cases {
        let series = format!("nudge_invalid_input_total{{reason=\"{reason}\",rpc=\"ModelInfer\"}}");
        let before = metric_value(&server.metrics().await, &series).unwrap_or(0.0);
        let status = oip.model_infer(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{case}: {}", status.message());
        assert!(
            status.message().contains(named),
            "{case}: {:?} does not name {named}",
            status.message()
        );
        let after = metric_value(&server.metrics().await, &series).unwrap_or(0.0);
        assert_eq!(after, before + 1.0, "{case}: {series}");
    }
    // Readiness of what is not served is a plain no.
    for (name, version) in [("no-such-model", ""), ("purchase", "sim-1")] {
        let ready = oip
            .model_ready(oip::ModelReadyRequest {
                name: name.into(),
                version: version.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!ready.ready, "{name} {version}");
    }
    // The server still scores after every refusal.
    let fine = oip.model_infer(typed(1, n, vec![0.0; n])).await.unwrap();
    assert_eq!(probabilities(&fine.into_inner()).len(), 1);
    server.stop().await.unwrap();
}

/// The interpreter with tritonclient (tests/fixtures/requirements-triton.txt):
/// `NUDGE_TEST_TRITON_PYTHON`, else the venv scripts/test.sh installs it into.
fn triton_python() -> std::path::PathBuf {
    std::env::var_os("NUDGE_TEST_TRITON_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| repo_path(".tools/triton/bin/python"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_reads_metadata_and_scores_as_score_does() {
    let server = TestServer::start().await;
    let features = purchase_features();
    let rows = rows(features.len(), 6);
    let expected = scored(&server, &features, &rows).await;
    let json_rows: Vec<Vec<serde_json::Value>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|v| {
                    if v.is_nan() {
                        serde_json::Value::Null
                    } else {
                        (*v).into()
                    }
                })
                .collect()
        })
        .collect();
    let python = triton_python();
    let addr = server.grpc_addr.to_string();
    let rows_arg = serde_json::to_string(&json_rows).unwrap();
    let output = {
        let python = python.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(python)
                .arg(repo_path("tests/oip_client.py"))
                .args([addr.as_str(), "purchase", rows_arg.as_str()])
                .output()
        })
        .await
        .unwrap()
    }
    .unwrap_or_else(|e| {
        panic!(
            "running {}: {e} (scripts/test.sh installs it)",
            python.display()
        )
    });
    assert!(
        output.status.success(),
        "oip_client.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for key in ["live", "ready", "model_ready", "version_ready"] {
        assert_eq!(report[key], true, "{key}: {report}");
    }
    for key in ["other_version_ready", "unknown_ready"] {
        assert_eq!(report[key], false, "{key}: {report}");
    }
    assert_eq!(report["server"], "nudge");
    assert_eq!(report["versions"], serde_json::json!(["sim-3"]));
    assert_eq!(report["platform"], "lightgbm");
    assert_eq!(
        report["input_shape"],
        serde_json::json!([-1, features.len()])
    );
    assert_eq!(report["output"], "predict");
    for form in ["fp64", "fp32"] {
        let answer = &report[form];
        assert_eq!(answer["id"], "req-1", "{form}: {answer}");
        assert_eq!(answer["model_version"], "sim-3");
        assert_eq!(answer["datatype"], "FP64");
        assert_eq!(answer["shape"], serde_json::json!([rows.len(), 1]));
        let got: Vec<f64> = answer["probability_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| f64::from_bits(p.as_u64().unwrap()))
            .collect();
        assert_eq!(got, expected, "{form}");
    }
    let error = &report["short_row_error"];
    assert_eq!(error["status"], "StatusCode.INVALID_ARGUMENT", "{report}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("inputs[0].shape"),
        "{error}"
    );
    server.stop().await.unwrap();
}
