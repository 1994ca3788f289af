//! The ONNX import against ONNX Runtime itself, on the shipped parity model
//! (`tests/fixtures/parity/parity_onnx.onnx`, a LightGBM conversion) and on versions of it
//! edited here, and what it refuses.

use std::path::{Path, PathBuf};

use prost::Message;

use super::proto::attribute_proto::AttributeType;
use super::proto::{AttributeProto, ModelProto, NodeProto};
use super::*;
use crate::model::native::{Forest, Kernel};
use crate::model::onnx::{check_parity, OnnxScorer};
use crate::model::{Engine, Scorer};

fn shipped() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/parity_onnx.onnx");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn library() -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .expect("ORT_DYLIB_PATH (.cargo/config.toml sets it)")
}

fn runtime(bytes: &[u8]) -> OnnxScorer {
    OnnxScorer::from_bytes(bytes, &library()).expect("ONNX Runtime loads the model")
}

/// The shipped model with `edit` applied to its tree node, encoded again.
fn edited(edit: impl FnOnce(&mut NodeProto)) -> Vec<u8> {
    edited_model(|model| edit(tree_of(model)))
}

/// The shipped model at `ai.onnx.ml` opset 3 (whose operator has the `*_as_tensor`
/// attributes) with `edit` applied to its tree node.
fn edited_v3(edit: impl FnOnce(&mut NodeProto)) -> Vec<u8> {
    edited_model(|model| {
        for o in &mut model.opset_import {
            if o.domain() == ML_DOMAIN {
                o.version = Some(3);
            }
        }
        edit(tree_of(model))
    })
}

/// The shipped model with `edit` applied to the whole of it, encoded again.
fn edited_model(edit: impl FnOnce(&mut ModelProto)) -> Vec<u8> {
    let mut model = ModelProto::decode(shipped().as_slice()).unwrap();
    edit(&mut model);
    model.encode_to_vec()
}

fn tree_of(model: &mut ModelProto) -> &mut NodeProto {
    let graph = model.graph.as_mut().unwrap();
    graph
        .node
        .iter_mut()
        .find(|n| n.op_type() == "TreeEnsembleClassifier")
        .unwrap()
}

fn attribute<'a>(node: &'a mut NodeProto, name: &str) -> &'a mut AttributeProto {
    node.attribute
        .iter_mut()
        .find(|a| a.name() == name)
        .unwrap_or_else(|| panic!("the model has no attribute {name}"))
}

/// Sets (or adds) an attribute of the given type.
fn set(
    node: &mut NodeProto,
    name: &str,
    ty: AttributeType,
    fill: impl FnOnce(&mut AttributeProto),
) {
    node.attribute.retain(|a| a.name() != name);
    let mut a = AttributeProto {
        name: Some(name.to_owned()),
        r#type: Some(ty as i32),
        ..AttributeProto::default()
    };
    fill(&mut a);
    node.attribute.push(a);
}

fn remove(node: &mut NodeProto, name: &str) {
    node.attribute.retain(|a| a.name() != name);
}

/// A float tensor of `values`, as `*_as_tensor` attributes hold them.
fn float_tensor(values: &[f32]) -> TensorProto {
    TensorProto {
        dims: vec![values.len() as i64],
        data_type: Some(FLOAT),
        float_data: values.to_vec(),
        ..TensorProto::default()
    }
}

/// The largest |native - ONNX Runtime| over the forest's probe rows, on every kernel and
/// through both walks (0 when every probability is the same number).
fn largest_difference(bytes: &[u8]) -> f64 {
    let forest = Forest::from_onnx(bytes).unwrap_or_else(|e| panic!("not imported: {e}"));
    let runtime = runtime(bytes);
    let n = forest.n_features();
    let rows = forest.probe_rows(512);
    let want = runtime.predict(&rows, n).unwrap();
    let mut largest = 0.0f64;
    for kernel in Kernel::available() {
        let forest = forest.clone().with_kernel(kernel).unwrap();
        let many = forest.predict(&rows);
        let one = rows.chunks_exact(n).take(64).map(|r| forest.predict(r)[0]);
        for (got, want) in many.into_iter().chain(one).zip(want.iter().chain(&want)) {
            let d = (got - want).abs();
            assert!(!d.is_nan(), "{}: {got} vs {want}", kernel.name());
            largest = largest.max(d);
        }
    }
    largest
}

#[test]
fn the_shipped_model_is_served_natively_and_scores_as_onnx_runtime_to_the_bit() {
    let bytes = shipped();
    assert_eq!(largest_difference(&bytes), 0.0);
    let (scorer, note) = crate::model::onnx::scorer(&bytes, &library(), Engine::Native).unwrap();
    assert_eq!(note, None);
    assert!(
        scorer.engine().starts_with("native/"),
        "{}",
        scorer.engine()
    );
    assert_eq!(scorer.num_features(), 30);
    // The library engine serves it through ONNX Runtime.
    let (scorer, note) = crate::model::onnx::scorer(&bytes, &library(), Engine::Lightgbm).unwrap();
    assert_eq!((scorer.engine().as_str(), note), ("onnxruntime", None));
}

/// Each split mode, written as an edit of the shipped model's `x <= t` splits that asks
/// the same question (so ONNX Runtime's answers stay the same): `x > t` and
/// `x >= next_up(t)` with the children swapped and the NaN direction flipped, and
/// `x < next_up(t)`; all of one mode (ONNX Runtime's one-mode walk) and mixed. (Splits
/// on +inf stay `x <= inf`: `x < next_up(inf)` is false for `x = inf`.)
#[test]
fn every_split_mode_scores_as_onnx_runtime() {
    let original = runtime(&shipped());
    let rows = Forest::from_onnx(&shipped()).unwrap().probe_rows(512);
    let want = original.predict(&rows, 30).unwrap();
    let modes: [&[&str]; 4] = [
        &["BRANCH_GT"],
        &["BRANCH_LT"],
        &["BRANCH_GTE"],
        &["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT"],
    ];
    for cycle in modes {
        let bytes = edited(|node| {
            let values = attribute(node, "nodes_values").floats.clone();
            let tracks = attribute(node, "nodes_missing_value_tracks_true")
                .ints
                .clone();
            let (trues, falses) = (
                attribute(node, "nodes_truenodeids").ints.clone(),
                attribute(node, "nodes_falsenodeids").ints.clone(),
            );
            let mut split = 0;
            let modes = attribute(node, "nodes_modes");
            let mut out = (values, tracks, trues, falses);
            for (i, m) in modes.strings.iter_mut().enumerate() {
                let (values, tracks, trues, falses) = &mut out;
                if m.as_slice() != b"BRANCH_LEQ" {
                    continue;
                }
                let new = cycle[split % cycle.len()];
                split += 1;
                if values[i] == f32::INFINITY && matches!(new, "BRANCH_LT" | "BRANCH_GTE") {
                    continue;
                }
                if matches!(new, "BRANCH_LT" | "BRANCH_GTE") {
                    values[i] = values[i].next_up();
                }
                if matches!(new, "BRANCH_GT" | "BRANCH_GTE") {
                    std::mem::swap(&mut trues[i], &mut falses[i]);
                    tracks[i] = 1 - tracks[i];
                }
                *m = new.as_bytes().to_vec();
            }
            let (values, tracks, trues, falses) = out;
            attribute(node, "nodes_values").floats = values;
            attribute(node, "nodes_missing_value_tracks_true").ints = tracks;
            attribute(node, "nodes_truenodeids").ints = trues;
            attribute(node, "nodes_falsenodeids").ints = falses;
        });
        assert_eq!(largest_difference(&bytes), 0.0, "{cycle:?}");
        let edited = runtime(&bytes).predict(&rows, 30).unwrap();
        assert_eq!(
            edited, want,
            "{cycle:?}: the edit changed ONNX Runtime's answers"
        );
    }
}

/// The other forms the import reads: no transform, a base value, weights all positive
/// (ONNX Runtime writes its columns another way for those), the `*_as_tensor` forms,
/// string labels, no NaN tracking.
#[test]
fn transforms_base_values_and_attribute_forms_score_as_onnx_runtime() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "NONE",
            edited(|node| attribute(node, "post_transform").s = Some(b"NONE".to_vec())),
        ),
        (
            "a base value",
            edited(|node| {
                set(node, "base_values", AttributeType::Floats, |a| {
                    a.floats = vec![-0.3]
                })
            }),
        ),
        (
            "a base value as a tensor",
            edited_v3(|node| {
                set(node, "base_values_as_tensor", AttributeType::Tensor, |a| {
                    a.t = Some(float_tensor(&[0.7]))
                })
            }),
        ),
        (
            "positive weights, LOGISTIC",
            edited(|node| {
                for w in &mut attribute(node, "class_weights").floats {
                    *w = w.abs();
                }
            }),
        ),
        (
            "positive weights, NONE",
            edited(|node| {
                for w in &mut attribute(node, "class_weights").floats {
                    *w = w.abs() / 40.0;
                }
                attribute(node, "post_transform").s = Some(b"NONE".to_vec());
            }),
        ),
        (
            "thresholds and weights as tensors",
            edited_v3(|node| {
                let values = attribute(node, "nodes_values").floats.clone();
                let weights = attribute(node, "class_weights").floats.clone();
                remove(node, "nodes_values");
                remove(node, "class_weights");
                set(node, "nodes_values_as_tensor", AttributeType::Tensor, |a| {
                    a.t = Some(float_tensor(&values))
                });
                set(
                    node,
                    "class_weights_as_tensor",
                    AttributeType::Tensor,
                    |a| a.t = Some(float_tensor(&weights)),
                );
            }),
        ),
        (
            "string labels",
            edited(|node| {
                remove(node, "classlabels_int64s");
                // Digits, for the converter's Cast of the label to int64.
                set(node, "classlabels_strings", AttributeType::Strings, |a| {
                    a.strings = vec![b"0".to_vec(), b"1".to_vec()]
                });
            }),
        ),
        (
            "no NaN tracking",
            edited(|node| remove(node, "nodes_missing_value_tracks_true")),
        ),
    ];
    for (what, bytes) in cases {
        assert_eq!(largest_difference(&bytes), 0.0, "{what}");
    }
}

/// The f32 sum and the f32 logistic are what make the scores ONNX Runtime's to the bit:
/// the same trees summed in f64, or through the f64 sigmoid, differ.
#[test]
fn f32_arithmetic_is_what_makes_the_scores_exact() {
    let bytes = shipped();
    let runtime = runtime(&bytes);
    let imported = parse(&bytes).unwrap();
    assert_eq!(
        (imported.sum, imported.output),
        (Sum::Float, Output::Logistic32)
    );
    for (what, ensemble) in [
        (
            "f64 sum",
            Ensemble {
                sum: Sum::Double,
                ..imported.clone()
            },
        ),
        (
            "f64 sigmoid",
            Ensemble {
                output: Output::Sigmoid(1.0),
                ..imported.clone()
            },
        ),
    ] {
        let forest = Forest::compile(&ensemble).unwrap();
        let rows = forest.probe_rows(512);
        let want = runtime.predict(&rows, 30).unwrap();
        let got = forest.predict(&rows);
        let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        assert!(differ > 0, "{what}: every probability is ONNX Runtime's");
        // Still within the load-time bound: f32 arithmetic is exactness, not a rescue.
        check_parity(&forest, &runtime).unwrap();
    }
}

/// The parity check can fail: a forest that differs from the model is refused.
#[test]
fn a_native_scorer_that_disagrees_with_onnx_runtime_does_not_serve() {
    let bytes = shipped();
    let nudged = edited(|node| attribute(node, "class_weights").floats[7] += 0.01);
    let forest = Forest::from_onnx(&nudged).unwrap();
    let error = check_parity(&forest, &runtime(&bytes)).unwrap_err();
    assert!(error.contains("differs from ONNX Runtime"), "{error}");
}

/// A model that ONNX Runtime serves but the native scorer does not import is served by
/// ONNX Runtime, with the reason beside it.
#[test]
fn a_model_the_native_scorer_refuses_is_served_by_onnx_runtime_with_the_reason() {
    let bytes = edited(|node| attribute(node, "nodes_modes").strings[0] = b"BRANCH_EQ".to_vec());
    let (scorer, note) = crate::model::onnx::scorer(&bytes, &library(), Engine::Native).unwrap();
    assert_eq!(scorer.engine(), "onnxruntime");
    assert!(
        note.as_deref().unwrap_or_default().contains("BRANCH_EQ"),
        "{note:?}"
    );
}

/// A tree whose branch leads back up its own path: ONNX Runtime loads it and then loops
/// forever on a row that takes the branch (the fuzz target `onnx_load` found one, node
/// 3's true child turned into node 1, its parent; the load's parity rows took it). It is
/// refused before ONNX Runtime sees it, with either engine, naming the tree and the nodes.
/// The load runs on a thread of its own so that, without the check, the test fails
/// instead of hanging.
#[test]
fn a_tree_with_a_cycle_is_refused_before_onnx_runtime_runs_it() {
    let cases = [
        // Node 3 (a child of node 1) sends its true branch back to node 1.
        (
            edited(|node| attribute(node, "nodes_truenodeids").ints[3] = 1),
            "node 3 leads back to node 1",
        ),
        // A node that is its own child.
        (
            edited(|node| attribute(node, "nodes_falsenodeids").ints[1] = 1),
            "node 1 leads back to node 1",
        ),
    ];
    for (bytes, expected) in cases {
        for engine in [Engine::Native, Engine::Lightgbm] {
            let bytes = bytes.clone();
            let (done, answer) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let loaded = crate::model::onnx::scorer(&bytes, &library(), engine).and_then(
                    |(scorer, _)| {
                        // What a load does next: score rows, every branch's side.
                        let rows = [0.0, 1e9, -1e9, f64::NAN].map(|v| [v; 30]).concat();
                        scorer
                            .predict(&rows, 30)
                            .map_err(|e| crate::model::LoadError::Parse(format!("scoring: {e}")))
                    },
                );
                let _ = done.send(loaded.map(|_| ()).map_err(|e| e.to_string()));
            });
            match answer.recv_timeout(std::time::Duration::from_secs(30)) {
                Ok(Err(message)) => assert!(message.contains(expected), "{engine:?}: {message}"),
                Ok(Ok(())) => panic!("{engine:?}: the model with a cycle was served"),
                Err(_) => panic!("{engine:?}: loading and scoring did not finish in 30 s"),
            }
        }
    }
}

/// Why the import refuses `bytes`.
fn refusal(bytes: &[u8]) -> String {
    match parse(bytes) {
        Ok(_) => panic!("the import accepted the model"),
        Err(e) => e,
    }
}

#[test]
fn what_the_native_scorer_does_not_import_is_refused_with_the_reason() {
    let mode = |i: usize, to: &'static str| {
        edited(move |node| attribute(node, "nodes_modes").strings[i] = to.as_bytes().to_vec())
    };
    let ints = |name: &'static str, edit: fn(&mut Vec<i64>)| {
        edited(move |node| edit(&mut attribute(node, name).ints))
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("BRANCH_EQ", mode(0, "BRANCH_EQ"), "mode BRANCH_EQ"),
        ("BRANCH_NEQ", mode(2, "BRANCH_NEQ"), "mode BRANCH_NEQ"),
        ("an unknown mode", mode(0, "BRANCH_LE"), "unknown mode"),
        (
            "SOFTMAX",
            edited(|node| attribute(node, "post_transform").s = Some(b"SOFTMAX".to_vec())),
            "post_transform is SOFTMAX",
        ),
        (
            "PROBIT",
            edited(|node| attribute(node, "post_transform").s = Some(b"PROBIT".to_vec())),
            "post_transform is PROBIT",
        ),
        (
            "a weight for class 1",
            ints("class_ids", |ids| ids[3] = 1),
            "for class 1",
        ),
        (
            "three classes",
            ints("classlabels_int64s", |labels| labels.push(2)),
            "3 classes",
        ),
        (
            "two base values",
            edited(|node| {
                set(node, "base_values", AttributeType::Floats, |a| {
                    a.floats = vec![0.1, 0.2]
                })
            }),
            "base_values has 2 entries",
        ),
        (
            "an aggregate function",
            edited(|node| {
                set(node, "aggregate_function", AttributeType::String, |a| {
                    a.s = Some(b"AVERAGE".to_vec())
                })
            }),
            "\"aggregate_function\"",
        ),
        (
            "a threshold list one short",
            edited(|node| {
                attribute(node, "nodes_values").floats.pop();
            }),
            "nodes_values has 7319 entries, but nodes_treeids has 7320",
        ),
        (
            "a weight list one short",
            edited(|node| {
                attribute(node, "class_weights").floats.pop();
            }),
            "class_weights has 3719 entries, but class_ids has 3720",
        ),
        (
            "thresholds twice",
            edited_v3(|node| {
                set(node, "nodes_values_as_tensor", AttributeType::Tensor, |a| {
                    a.t = Some(float_tensor(&[0.0; 7320]))
                })
            }),
            "both nodes_values and nodes_values_as_tensor",
        ),
        (
            "a tensor attribute in opset 1",
            edited(|node| {
                set(node, "base_values_as_tensor", AttributeType::Tensor, |a| {
                    a.t = Some(float_tensor(&[0.7]))
                })
            }),
            "new in ai.onnx.ml opset 3",
        ),
        (
            "a double tensor",
            edited_v3(|node| {
                let mut tensor = float_tensor(&[]);
                tensor.dims = vec![1];
                tensor.data_type = Some(11);
                tensor.raw_data = Some(0.5f64.to_le_bytes().to_vec());
                set(node, "base_values_as_tensor", AttributeType::Tensor, |a| {
                    a.t = Some(tensor)
                })
            }),
            "element type 11, not float",
        ),
        (
            "thresholds of the wrong type",
            edited(|node| {
                let a = attribute(node, "nodes_values");
                a.r#type = Some(AttributeType::Ints as i32);
            }),
            "nodes_values is Ints, not Floats",
        ),
        (
            "a child id out of range",
            ints("nodes_truenodeids", |ids| ids[0] = 100_000),
            "child 100000, which is not listed",
        ),
        (
            "a child id past i32",
            ints("nodes_falsenodeids", |ids| ids[0] = 1 << 40),
            "out of range",
        ),
        (
            "a cycle",
            ints("nodes_truenodeids", |ids| ids[1] = 0),
            "reached twice",
        ),
        (
            "a node pointing to itself",
            ints("nodes_falsenodeids", |ids| ids[1] = 1),
            "reached twice",
        ),
        (
            "a node listed twice",
            ints("nodes_nodeids", |ids| ids[5] = ids[4]),
            "listed twice",
        ),
        (
            "a column past the input",
            ints("nodes_featureids", |ids| ids[0] = 30),
            "reads column 30, but the input has 30",
        ),
        (
            "a negative column",
            ints("nodes_featureids", |ids| ids[0] = -1),
            "reads column -1",
        ),
        (
            "a NaN tracking flag of 2",
            ints("nodes_missing_value_tracks_true", |t| t[0] = 2),
            "not 0 or 1",
        ),
        (
            "a leaf without a weight",
            edited(|node| {
                for name in ["class_ids", "class_treeids", "class_nodeids"] {
                    attribute(node, name).ints.remove(0);
                }
                attribute(node, "class_weights").floats.remove(0);
            }),
            "has no weight",
        ),
        (
            "a leaf with two weights",
            edited(|node| {
                for name in ["class_ids", "class_treeids", "class_nodeids"] {
                    let a = attribute(node, name);
                    a.ints.push(a.ints[0]);
                }
                let w = attribute(node, "class_weights");
                w.floats.push(0.5);
            }),
            "more than one weight",
        ),
        (
            "a weight for a node not listed",
            ints("class_nodeids", |ids| ids[0] = 90_000),
            "which is not listed",
        ),
        (
            "a NaN threshold",
            edited(|node| attribute(node, "nodes_values").floats[0] = f32::NAN),
            "threshold is NaN",
        ),
        (
            "x < -inf",
            edited(|node| {
                attribute(node, "nodes_modes").strings[0] = b"BRANCH_LT".to_vec();
                attribute(node, "nodes_values").floats[0] = f32::NEG_INFINITY;
            }),
            "on -inf",
        ),
        (
            "a regressor",
            edited(|node| node.op_type = Some("TreeEnsembleRegressor".into())),
            "TreeEnsembleRegressor",
        ),
        (
            "a Mul by 2",
            edited_model(|model| {
                let one = &mut model.graph.as_mut().unwrap().initializer[0];
                assert_eq!(one.name(), "one");
                one.float_data = vec![2.0];
                one.raw_data = None;
            }),
            "ai.onnx Mul node",
        ),
        (
            "a ZipMap",
            edited_model(|model| {
                model.graph.as_mut().unwrap().node.push(NodeProto {
                    op_type: Some("ZipMap".into()),
                    domain: Some(ML_DOMAIN.into()),
                    input: vec!["probabilities".into()],
                    output: vec!["zipped".into()],
                    ..NodeProto::default()
                })
            }),
            "ai.onnx.ml ZipMap node",
        ),
        (
            "opset 5",
            edited_model(|model| {
                for o in &mut model.opset_import {
                    if o.domain() == ML_DOMAIN {
                        o.version = Some(5);
                    }
                }
            }),
            "opset 5",
        ),
        (
            "a double input",
            edited_model(|model| {
                let input = &mut model.graph.as_mut().unwrap().input[0];
                match input.r#type.as_mut().unwrap().value.as_mut().unwrap() {
                    proto::type_proto::Value::TensorType(t) => t.elem_type = Some(11),
                }
            }),
            "element type 11, not float",
        ),
        (
            "no fixed column count",
            edited_model(|model| {
                let input = &mut model.graph.as_mut().unwrap().input[0];
                let proto::type_proto::Value::TensorType(t) =
                    input.r#type.as_mut().unwrap().value.as_mut().unwrap();
                t.shape.as_mut().unwrap().dim[1].value = Some(
                    proto::tensor_shape_proto::dimension::Value::DimParam("k".into()),
                );
            }),
            "fixed column count",
        ),
        (
            "probabilities from the label",
            edited_model(|model| {
                let graph = model.graph.as_mut().unwrap();
                let identity = graph
                    .node
                    .iter_mut()
                    .find(|n| n.output == ["lgbmprobabilities"])
                    .unwrap();
                identity.input = vec!["label_tensor".into()];
            }),
            "output 0, not its scores",
        ),
        (
            "no graph",
            edited_model(|model| model.graph = None),
            "no graph",
        ),
        (
            "not protobuf",
            b"\xff\xff\xff\xff".to_vec(),
            "not an ONNX model",
        ),
    ];
    for (what, bytes, reason) in cases {
        let error = refusal(&bytes);
        assert!(error.contains(reason), "{what}: {error}");
    }
}

/// Cut anywhere, the file is refused or read as a smaller model, never a panic.
#[test]
fn a_truncated_file_is_refused_without_a_panic() {
    let bytes = shipped();
    for cut in (0..bytes.len()).step_by(997) {
        let _ = parse(&bytes[..cut]);
    }
    assert!(parse(&bytes[..bytes.len() / 2]).is_err());
}
