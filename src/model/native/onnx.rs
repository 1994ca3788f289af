//! ONNX tree ensembles → [`Ensemble`]: a binary `TreeEnsembleClassifier` (`ai.onnx.ml`,
//! the attributes of opsets 1 and 3) as skl2onnx and onnxmltools write it, read as ONNX
//! Runtime's CPU kernel reads it — ONNX Runtime is what a native ONNX model is checked
//! against at load ([`crate::model::onnx`]), so its behaviour is the specification.
//!
//! What ONNX Runtime 1.31 does with such a node (`tree_ensemble_common.h`,
//! `tree_ensemble_aggregator.h`, `ml_common.h`), and how it is carried over:
//!
//! - **Trees.** A tree starts at each node whose tree id differs from the node listed
//!   before it, and that node is its root; children are found by (tree id, node id).
//!   Every listed leaf must have a weight; weights on internal nodes are ignored.
//! - **Splits** compare the `f32` input with the `f32` threshold, so rows are rounded to
//!   `f32` first ([`Input::Float32`]), and every mode becomes [`Test::Le`] on that value:
//!   `x <= t` is itself; `x < t` is `x <= prev(t)`, `prev` being the next `f32` down
//!   (exact for `f32` x); `x >= t` and `x > t` are the negations of those two, so the
//!   children swap. A NaN fails every comparison, so it takes the false branch unless
//!   `nodes_missing_value_tracks_true` is 1 for the node; after a swap the false branch
//!   is the left child. Zero goes where the plain comparison sends it.
//! - **The sum** of a row is kept in `f32`, from 0, one tree after another in root order
//!   (with one thread, as Nudge runs ONNX Runtime): [`Sum::Float`]. The one base value is
//!   added to it last, in `f32`, which is exactly what a last, constant tree adds.
//! - **The answer.** With every weight on class 0, column 1 of the `probabilities`
//!   output (the positive class) is `T(sum)`, `T` being `LOGISTIC` computed in `f32`
//!   ([`Output::Logistic32`]) or `NONE`. (ONNX Runtime chooses among four ways to write
//!   the two columns by the weights' signs; in 1.31 all four give column 1 that value.)
//!
//! The graph around the node may only be what the converters add: `Identity`, `Cast` to
//! float and `Mul` by a constant 1 between the node's scores and the graph's
//! `probabilities` output, and such nodes on the label's way out. Anything else —
//! another operator, `BRANCH_EQ`/`BRANCH_NEQ`, weights for class 1, more classes, a
//! transform other than `NONE` and `LOGISTIC`, an attribute this file does not know —
//! is refused with the reason, and ONNX Runtime serves the model. So is malformed input:
//! mismatched attribute lengths, ids out of range, a node reached twice — except a cycle,
//! on which ONNX Runtime loops forever: [`check_no_cycles`] refuses the whole model first.

use std::collections::HashMap;

use prost::Message;

use super::ensemble::{Ensemble, Input, Node, Output, Sum, Test, Tree};

/// The messages of `onnx.proto` (the part of ONNX's schema this import reads).
mod proto {
    // Generated code, held to prost's style rather than clippy's (as `crate::pb` is).
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use proto::attribute_proto::AttributeType;
use proto::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};

/// The `ai.onnx.ml` domain of the tree operators.
const ML_DOMAIN: &str = "ai.onnx.ml";
/// The graph output Nudge reads ([`crate::model::onnx`]).
const PROBABILITIES: &str = "probabilities";
/// `TensorProto.DataType.FLOAT`.
const FLOAT: i32 = 1;

/// Reads an ONNX model's bytes into an ensemble; `Err` says why the native scorer does
/// not serve the model.
pub fn parse(bytes: &[u8]) -> Result<Ensemble, String> {
    let model = ModelProto::decode(bytes).map_err(|e| format!("not an ONNX model: {e}"))?;
    let ml_opset = ml_opset(&model)?;
    let graph = model.graph.as_ref().ok_or("the model has no graph")?;
    let (input, n_features) = graph_input(graph)?;
    let tree = tree_node(graph)?;
    if tree.input.len() != 1 || tree.input[0] != input {
        return Err(format!(
            "the {} node does not read the graph input {input:?} directly",
            tree.op_type()
        ));
    }
    check_probabilities_path(graph, tree)?;
    let ensemble = import_classifier(tree, n_features, ml_opset)?;
    ensemble.check()?;
    Ok(ensemble)
}

/// Refuses a tree ensemble in which some tree's branches lead back to a node on their own
/// path: ONNX Runtime 1.31 does not check for that, and a row that takes such a branch
/// loops in its `session.run` forever (the fuzz target `onnx_load` found one, a
/// `nodes_truenodeids` entry turned from a child into its grandparent; the load's parity
/// rows took it and the load never returned). This runs before ONNX Runtime sees a model,
/// whichever engine serves it, and reads only the node lists — a model the native scorer
/// does not import for another reason is still checked — so what it does not recognize
/// (another operator, lists of unequal lengths) it leaves to ONNX Runtime, which refuses
/// those itself.
pub fn check_no_cycles(bytes: &[u8]) -> Result<(), String> {
    let Ok(model) = ModelProto::decode(bytes) else {
        return Ok(());
    };
    let nodes = model.graph.iter().flat_map(|g| &g.node).filter(|n| {
        n.domain() == ML_DOMAIN
            && matches!(
                n.op_type(),
                "TreeEnsembleClassifier" | "TreeEnsembleRegressor"
            )
    });
    for node in nodes {
        let ints = |name: &str| {
            node.attribute
                .iter()
                .find(|a| a.name() == name)
                .map_or(&[][..], |a| a.ints.as_slice())
        };
        let modes: Vec<&[u8]> = node
            .attribute
            .iter()
            .find(|a| a.name() == "nodes_modes")
            .map_or_else(Vec::new, |a| a.strings.iter().map(Vec::as_slice).collect());
        let (trees, ids) = (ints("nodes_treeids"), ints("nodes_nodeids"));
        let (yes, no) = (ints("nodes_truenodeids"), ints("nodes_falsenodeids"));
        let n = trees.len();
        if [ids.len(), yes.len(), no.len(), modes.len()] != [n; 4] {
            continue;
        }
        let index: HashMap<(i64, i64), usize> = (0..n).map(|i| ((trees[i], ids[i]), i)).collect();
        // Depth-first from every node, colouring: on the current path, or done.
        let mut state = vec![0u8; n];
        for start in 0..n {
            if state[start] != 0 {
                continue;
            }
            let mut stack = vec![(start, false)];
            while let Some((i, leaving)) = stack.pop() {
                if leaving {
                    state[i] = 2;
                    continue;
                }
                match state[i] {
                    1 => {
                        return Err(format!(
                            "tree {}: node {} is on a path from itself (a cycle), which \
                             ONNX Runtime would follow forever",
                            trees[i], ids[i]
                        ))
                    }
                    2 => continue,
                    _ => {}
                }
                state[i] = 1;
                stack.push((i, true));
                if modes[i] == b"LEAF" {
                    continue;
                }
                for child in [yes[i], no[i]] {
                    if let Some(&c) = index.get(&(trees[i], child)) {
                        if state[c] == 1 {
                            return Err(format!(
                                "tree {}: node {} leads back to node {child} above it (a \
                                 cycle), which ONNX Runtime would follow forever",
                                trees[i], ids[i]
                            ));
                        }
                        if state[c] == 0 {
                            stack.push((c, false));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The tree operators bind to the highest version of theirs at or below the model's
/// `ai.onnx.ml` opset: version 1 (opsets 1 and 2) or 3 (opsets 3 and 4), whose
/// attributes this file reads. Opset 5 deprecates them for `TreeEnsemble`.
fn ml_opset(model: &ModelProto) -> Result<i64, String> {
    let version = model
        .opset_import
        .iter()
        .filter(|o| o.domain() == ML_DOMAIN)
        .map(|o| o.version())
        .max();
    match version {
        Some(v @ 1..=4) => Ok(v),
        Some(v) => Err(format!(
            "the model imports {ML_DOMAIN} opset {v}; the native scorer reads the tree \
             operators of opsets 1 to 4"
        )),
        None => Err(format!("the model imports no {ML_DOMAIN} opset")),
    }
}

/// The graph's one input that is not an initializer, and its column count: an `f32`
/// matrix `[N, features]` with a fixed column count.
fn graph_input(graph: &GraphProto) -> Result<(String, usize), String> {
    let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(&i.name()))
        .collect();
    let [input] = inputs.as_slice() else {
        return Err(format!("the graph has {} inputs, not one", inputs.len()));
    };
    let tensor = match input.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(proto::type_proto::Value::TensorType(tensor)) => tensor,
        None => return Err(format!("input {:?} is not a tensor", input.name())),
    };
    if tensor.elem_type() != FLOAT {
        return Err(format!(
            "input {:?} has element type {}, not float",
            input.name(),
            tensor.elem_type()
        ));
    }
    let dims = tensor.shape.as_ref().map_or(&[][..], |s| s.dim.as_slice());
    let columns = match dims {
        [_, column] => match column.value {
            Some(proto::tensor_shape_proto::dimension::Value::DimValue(n)) if n > 0 => {
                usize::try_from(n).ok()
            }
            _ => None,
        },
        _ => None,
    };
    let n_features = columns.ok_or_else(|| {
        format!(
            "input {:?} is not a matrix [N, features] with a fixed column count",
            input.name()
        )
    })?;
    Ok((input.name().to_owned(), n_features))
}

/// The graph's one tree operator; every other node must be one the converters add.
fn tree_node(graph: &GraphProto) -> Result<&NodeProto, String> {
    let mut tree = None;
    for node in &graph.node {
        match (node.domain(), node.op_type()) {
            (ML_DOMAIN, "TreeEnsembleClassifier") => {
                if tree.replace(node).is_some() {
                    return Err("the graph has more than one tree ensemble".into());
                }
            }
            (ML_DOMAIN, "TreeEnsembleRegressor") => {
                return Err(
                    "the graph has a TreeEnsembleRegressor; the native scorer imports the \
                     class scores of a binary TreeEnsembleClassifier"
                        .into(),
                )
            }
            ("" | "ai.onnx", "Identity" | "Cast") => {}
            ("" | "ai.onnx", "Mul") if multiplier_input(graph, node).is_some() => {}
            (domain, op) => {
                let domain = if domain.is_empty() { "ai.onnx" } else { domain };
                return Err(format!(
                    "the graph has a {domain} {op} node; the native scorer imports a tree \
                     ensemble followed only by Identity, Cast and Mul by 1"
                ));
            }
        }
    }
    tree.ok_or_else(|| "the graph has no TreeEnsembleClassifier".into())
}

/// For a `Mul` node by a constant 1 (an initializer holding one float 1.0, as
/// onnxmltools multiplies its probabilities), the index of its other input.
fn multiplier_input(graph: &GraphProto, node: &NodeProto) -> Option<usize> {
    let [a, b] = node.input.as_slice() else {
        return None;
    };
    let is_one = |name: &str| {
        graph
            .initializer
            .iter()
            .find(|t| t.name() == name)
            .and_then(|t| tensor_floats(t).ok())
            .is_some_and(|v| v == [1.0])
    };
    match (is_one(a), is_one(b)) {
        (_, true) => Some(0),
        (true, false) => Some(1),
        (false, false) => None,
    }
}

/// Follows the graph's `probabilities` output back to the tree node's class scores
/// (its second output) through nodes that leave values as they are.
fn check_probabilities_path(graph: &GraphProto, tree: &NodeProto) -> Result<(), String> {
    if !graph.output.iter().any(|o| o.name() == PROBABILITIES) {
        return Err(format!("the graph has no output {PROBABILITIES:?}"));
    }
    let mut producers: HashMap<&str, (&NodeProto, usize)> = HashMap::new();
    for node in &graph.node {
        for (slot, output) in node.output.iter().enumerate() {
            if producers.insert(output, (node, slot)).is_some() {
                return Err(format!("the graph computes {output:?} twice"));
            }
        }
    }
    let mut value = PROBABILITIES;
    // Each step goes one node back; a path longer than the graph would be a cycle.
    for _ in 0..=graph.node.len() {
        let Some(&(node, slot)) = producers.get(value) else {
            return Err(format!("no node computes {value:?}"));
        };
        if std::ptr::eq(node, tree) {
            return if slot == 1 {
                Ok(())
            } else {
                Err(format!(
                    "{PROBABILITIES:?} is the tree ensemble's output {slot}, not its scores"
                ))
            };
        }
        let next = match node.op_type() {
            "Identity" => 0,
            "Cast" => {
                let to = node.attribute.iter().find(|a| a.name() == "to");
                if to.map(|a| a.i()) != Some(i64::from(FLOAT)) {
                    return Err(format!(
                        "a Cast on the way to {PROBABILITIES:?} changes the scores' type"
                    ));
                }
                0
            }
            // `tree_node` admitted only Mul nodes by a constant 1.
            _ => multiplier_input(graph, node).unwrap_or(0),
        };
        value = node
            .input
            .get(next)
            .ok_or_else(|| format!("a {} node has no input", node.op_type()))?;
    }
    Err(format!(
        "the way to {PROBABILITIES:?} goes round in a cycle"
    ))
}

/// A float tensor's values (an initializer, or an `*_as_tensor` attribute).
fn tensor_floats(tensor: &TensorProto) -> Result<Vec<f32>, String> {
    if tensor.data_type() != FLOAT {
        return Err(format!(
            "the tensor has element type {}, not float",
            tensor.data_type()
        ));
    }
    if tensor.data_location() == proto::tensor_proto::DataLocation::External {
        return Err("the tensor's data is in an external file".into());
    }
    let count = tensor
        .dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?))
        .ok_or("the tensor has a negative or enormous dimension")?;
    let values: Vec<f32> = match &tensor.raw_data {
        Some(raw) if !raw.is_empty() => {
            if raw.len() % 4 != 0 {
                return Err("the tensor's raw data is not whole floats".into());
            }
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        }
        _ => tensor.float_data.clone(),
    };
    if values.len() as u64 != count {
        return Err(format!(
            "the tensor holds {} values; its shape {:?} has {count}",
            values.len(),
            tensor.dims
        ));
    }
    Ok(values)
}

/// The attributes of the classifier this file reads. Any other is refused: an
/// attribute it does not know could change the answer.
const KNOWN_ATTRIBUTES: [&str; 21] = [
    "nodes_treeids",
    "nodes_nodeids",
    "nodes_featureids",
    "nodes_modes",
    "nodes_values",
    "nodes_values_as_tensor",
    "nodes_truenodeids",
    "nodes_falsenodeids",
    "nodes_missing_value_tracks_true",
    // Hit rates are statistics; ONNX Runtime ignores them too.
    "nodes_hitrates",
    "nodes_hitrates_as_tensor",
    "class_treeids",
    "class_nodeids",
    "class_ids",
    "class_weights",
    "class_weights_as_tensor",
    "classlabels_int64s",
    "classlabels_strings",
    "base_values",
    "base_values_as_tensor",
    "post_transform",
];

/// A node's attributes by name, read with their declared types.
struct Attributes<'a> {
    by_name: HashMap<&'a str, &'a AttributeProto>,
}

impl<'a> Attributes<'a> {
    fn of(node: &'a NodeProto, ml_opset: i64) -> Result<Attributes<'a>, String> {
        let mut by_name = HashMap::new();
        for attribute in &node.attribute {
            let name = attribute.name();
            if !KNOWN_ATTRIBUTES.contains(&name) {
                return Err(format!(
                    "the {} has an attribute {name:?} the native scorer does not read",
                    node.op_type()
                ));
            }
            // Version 1 of the operator has no tensor attributes (ONNX Runtime refuses
            // them there).
            if name.ends_with("_as_tensor") && ml_opset < 3 {
                return Err(format!(
                    "attribute {name} is new in {ML_DOMAIN} opset 3; the model imports \
                     opset {ml_opset}"
                ));
            }
            if !attribute.ref_attr_name().is_empty() {
                return Err(format!("attribute {name} refers to a function's attribute"));
            }
            if by_name.insert(name, attribute).is_some() {
                return Err(format!("attribute {name} is given twice"));
            }
        }
        Ok(Attributes { by_name })
    }

    /// The attribute `name` if it is present, after checking that it has type `ty`.
    fn get(&self, name: &str, ty: AttributeType) -> Result<Option<&'a AttributeProto>, String> {
        match self.by_name.get(name) {
            None => Ok(None),
            Some(a) if a.r#type() == ty => Ok(Some(a)),
            Some(a) => Err(format!("attribute {name} is {:?}, not {ty:?}", a.r#type())),
        }
    }

    fn ints(&self, name: &str) -> Result<&'a [i64], String> {
        Ok(self
            .get(name, AttributeType::Ints)?
            .map_or(&[][..], |a| a.ints.as_slice()))
    }

    fn strings(&self, name: &str) -> Result<Vec<&'a [u8]>, String> {
        Ok(self
            .get(name, AttributeType::Strings)?
            .map_or_else(Vec::new, |a| a.strings.iter().map(Vec::as_slice).collect()))
    }

    fn string(&self, name: &str) -> Result<Option<&'a [u8]>, String> {
        Ok(self.get(name, AttributeType::String)?.map(|a| a.s()))
    }

    /// A list of floats given as the attribute `name` or as the float tensor
    /// `name_as_tensor` (ONNX Runtime takes either, not both; for float input the tensor
    /// must hold floats).
    fn floats(&self, name: &str) -> Result<Vec<f32>, String> {
        let plain = self.get(name, AttributeType::Floats)?;
        let tensor_name = format!("{name}_as_tensor");
        let tensor = self.get(&tensor_name, AttributeType::Tensor)?;
        match (plain, tensor) {
            (Some(_), Some(_)) => Err(format!("both {name} and {tensor_name} are given")),
            (Some(a), None) => Ok(a.floats.clone()),
            (None, Some(a)) => {
                let tensor =
                    a.t.as_ref()
                        .ok_or(format!("{tensor_name} holds no tensor"))?;
                if tensor.dims.len() != 1 {
                    return Err(format!("{tensor_name} is not a vector"));
                }
                tensor_floats(tensor).map_err(|e| format!("{tensor_name}: {e}"))
            }
            (None, None) => Ok(Vec::new()),
        }
    }
}

/// How a node compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Leaf,
    /// `x <= t`, `x < t`, `x >= t`, `x > t`.
    Le,
    Lt,
    Ge,
    Gt,
}

fn mode(name: &[u8]) -> Result<Mode, String> {
    Ok(match name {
        b"LEAF" => Mode::Leaf,
        b"BRANCH_LEQ" => Mode::Le,
        b"BRANCH_LT" => Mode::Lt,
        b"BRANCH_GTE" => Mode::Ge,
        b"BRANCH_GT" => Mode::Gt,
        b"BRANCH_EQ" | b"BRANCH_NEQ" => {
            return Err(format!(
                "a node has mode {}; the native scorer imports BRANCH_LEQ, BRANCH_LT, \
                 BRANCH_GTE and BRANCH_GT splits",
                String::from_utf8_lossy(name)
            ))
        }
        // ONNX Runtime reads any other name as BRANCH_NEQ.
        _ => {
            return Err(format!(
                "a node has an unknown mode {:?}",
                String::from_utf8_lossy(name)
            ))
        }
    })
}

/// An id ONNX Runtime reads as a C `int`: one outside `i32` would alias another.
fn id(value: i64, what: &str) -> Result<i32, String> {
    i32::try_from(value).map_err(|_| format!("{what} {value} is out of range"))
}

/// The classifier's attributes → the ensemble of its class-0 scores.
fn import_classifier(
    node: &NodeProto,
    n_features: usize,
    ml_opset: i64,
) -> Result<Ensemble, String> {
    let attributes = Attributes::of(node, ml_opset)?;
    let tree_ids = attributes.ints("nodes_treeids")?;
    let n = tree_ids.len();
    if n == 0 {
        return Err("the tree ensemble has no nodes".into());
    }
    let same_length = |name: &str, len: usize| {
        if len == n {
            Ok(())
        } else {
            Err(format!(
                "{name} has {len} entries, but nodes_treeids has {n}"
            ))
        }
    };
    let node_ids = attributes.ints("nodes_nodeids")?;
    same_length("nodes_nodeids", node_ids.len())?;
    let features = attributes.ints("nodes_featureids")?;
    same_length("nodes_featureids", features.len())?;
    let modes = attributes.strings("nodes_modes")?;
    same_length("nodes_modes", modes.len())?;
    let true_ids = attributes.ints("nodes_truenodeids")?;
    same_length("nodes_truenodeids", true_ids.len())?;
    let false_ids = attributes.ints("nodes_falsenodeids")?;
    same_length("nodes_falsenodeids", false_ids.len())?;
    let values = attributes.floats("nodes_values")?;
    same_length("nodes_values", values.len())?;
    // ONNX Runtime reads a missing (or short) list as false for every node; Nudge holds
    // the list to the node count like the others.
    let tracks = attributes.ints("nodes_missing_value_tracks_true")?;
    if !tracks.is_empty() {
        same_length("nodes_missing_value_tracks_true", tracks.len())?;
    }
    if let Some(v) = tracks.iter().find(|&&v| v != 0 && v != 1) {
        return Err(format!(
            "nodes_missing_value_tracks_true has {v}, not 0 or 1"
        ));
    }
    let modes = modes
        .into_iter()
        .map(mode)
        .collect::<Result<Vec<Mode>, String>>()?;

    let class_tree_ids = attributes.ints("class_treeids")?;
    let class_node_ids = attributes.ints("class_nodeids")?;
    let class_ids = attributes.ints("class_ids")?;
    let weights = attributes.floats("class_weights")?;
    let m = class_ids.len();
    for (name, len) in [
        ("class_treeids", class_tree_ids.len()),
        ("class_nodeids", class_node_ids.len()),
        ("class_weights", weights.len()),
    ] {
        if len != m {
            return Err(format!("{name} has {len} entries, but class_ids has {m}"));
        }
    }
    let int_labels = attributes.ints("classlabels_int64s")?.len();
    let string_labels = attributes.strings("classlabels_strings")?.len();
    let classes = match (int_labels, string_labels) {
        (n, 0) | (0, n) => n,
        _ => return Err("both classlabels_int64s and classlabels_strings are given".into()),
    };
    if classes != 2 {
        return Err(format!(
            "the classifier has {classes} classes; the native scorer imports binary ones"
        ));
    }
    if let Some(c) = class_ids.iter().find(|&&c| c != 0) {
        // With weights for class 1, ONNX Runtime writes the two columns another way
        // (and adds the base value to class 0 alone); the converters write class 0.
        return Err(format!(
            "a weight is for class {c}; the native scorer imports binary ensembles whose \
             weights are all for class 0, as the converters write them"
        ));
    }
    let base = attributes.floats("base_values")?;
    if base.len() > 1 {
        // Two base values make ONNX Runtime score the classes apart; column 1 then
        // holds no tree's output.
        return Err(format!(
            "base_values has {} entries; the native scorer imports at most one",
            base.len()
        ));
    }
    let post_transform = attributes.string("post_transform")?.unwrap_or(b"NONE");
    let output = match post_transform {
        b"NONE" => Output::Identity,
        b"LOGISTIC" => Output::Logistic32,
        other => {
            return Err(format!(
                "post_transform is {}; the native scorer imports NONE and LOGISTIC",
                String::from_utf8_lossy(other)
            ))
        }
    };

    // (tree id, node id) → position in the node lists.
    let mut position = HashMap::with_capacity(n);
    for i in 0..n {
        let key = (id(tree_ids[i], "a tree id")?, id(node_ids[i], "a node id")?);
        if position.insert(key, i).is_some() {
            return Err(format!("node {} of tree {} is listed twice", key.1, key.0));
        }
    }
    let mut leaf_weight: Vec<Option<f32>> = vec![None; n];
    for k in 0..m {
        let key = (
            id(class_tree_ids[k], "a weight's tree id")?,
            id(class_node_ids[k], "a weight's node id")?,
        );
        let &i = position.get(&key).ok_or_else(|| {
            format!(
                "a weight is for node {} of tree {}, which is not listed",
                key.1, key.0
            )
        })?;
        if modes[i] != Mode::Leaf {
            // ONNX Runtime ignores weights on internal nodes (old onnxmltools wrote them).
            continue;
        }
        if leaf_weight[i].replace(weights[k]).is_some() {
            // ONNX Runtime would add the weights one by one, in an order its sort leaves
            // open among equal keys.
            return Err(format!(
                "leaf {} of tree {} has more than one weight",
                key.1, key.0
            ));
        }
    }
    if let Some(i) = (0..n).find(|&i| modes[i] == Mode::Leaf && leaf_weight[i].is_none()) {
        return Err(format!(
            "leaf {} of tree {} has no weight",
            node_ids[i], tree_ids[i]
        ));
    }

    let nodes = Nodes {
        tree_ids,
        node_ids,
        true_ids,
        false_ids,
        features,
        modes: &modes,
        values: &values,
        tracks,
        leaf_weight: &leaf_weight,
        position: &position,
        n_features,
    };
    let mut trees = Vec::new();
    for root in (0..n).filter(|&i| i == 0 || tree_ids[i] != tree_ids[i - 1]) {
        trees.push(nodes.tree(root)?);
    }
    if let Some(&b) = base.first() {
        // ONNX Runtime adds the base value to the f32 sum after the trees.
        trees.push(Tree {
            nodes: vec![Node::Leaf {
                value: f64::from(b),
                count: 0.0,
            }],
        });
    }
    Ok(Ensemble {
        n_features,
        trees,
        input: Input::Float32,
        average_over: None,
        output,
        sum: Sum::Float,
    })
}

/// The node lists, checked for length, from which trees are built.
struct Nodes<'a> {
    tree_ids: &'a [i64],
    node_ids: &'a [i64],
    true_ids: &'a [i64],
    false_ids: &'a [i64],
    features: &'a [i64],
    modes: &'a [Mode],
    values: &'a [f32],
    tracks: &'a [i64],
    leaf_weight: &'a [Option<f32>],
    position: &'a HashMap<(i32, i32), usize>,
    n_features: usize,
}

impl Nodes<'_> {
    /// The tree whose root is listed at `root`, numbered depth first from the root.
    fn tree(&self, root: usize) -> Result<Tree, String> {
        let tree_id = self.tree_ids[root] as i32;
        // Position in the lists → index in the tree, for the nodes reached so far.
        let mut index: HashMap<usize, usize> = HashMap::new();
        let mut nodes = Vec::new();
        // (position, index): nodes placed in the tree whose fields are still to fill.
        let mut stack = vec![(root, 0usize)];
        index.insert(root, 0);
        nodes.push(None);
        while let Some((i, at)) = stack.pop() {
            let node = if self.modes[i] == Mode::Leaf {
                Node::Leaf {
                    value: f64::from(self.leaf_weight[i].expect("every leaf has a weight")),
                    count: 0.0,
                }
            } else {
                let child = |id_value: i64, which: &str| -> Result<usize, String> {
                    let child_id = id(id_value, "a child id")?;
                    self.position
                        .get(&(tree_id, child_id))
                        .copied()
                        .ok_or_else(|| {
                            format!(
                                "node {} of tree {tree_id} has {which} child {child_id}, which \
                             is not listed",
                                self.node_ids[i]
                            )
                        })
                };
                let on_true = child(self.true_ids[i], "a true")?;
                let on_false = child(self.false_ids[i], "a false")?;
                let mut place = |child: usize| -> Result<usize, String> {
                    if index.contains_key(&child) {
                        return Err(format!(
                            "tree {tree_id}: a node is reached twice (a cycle or a shared \
                             subtree)"
                        ));
                    }
                    let at = nodes.len();
                    nodes.push(None);
                    index.insert(child, at);
                    stack.push((child, at));
                    Ok(at)
                };
                let on_true = place(on_true)?;
                let on_false = place(on_false)?;
                let feature = usize::try_from(self.features[i])
                    .ok()
                    .filter(|&f| f < self.n_features)
                    .ok_or_else(|| {
                        format!(
                            "tree {tree_id}: a split reads column {}, but the input has {}",
                            self.features[i], self.n_features
                        )
                    })?;
                let tracks_true = self.tracks.get(i) == Some(&1);
                let (test, swap) = split(self.modes[i], self.values[i], tracks_true)
                    .map_err(|e| format!("tree {tree_id}: {e}"))?;
                let (left, right) = if swap {
                    (on_false, on_true)
                } else {
                    (on_true, on_false)
                };
                Node::Split {
                    feature,
                    test,
                    left,
                    right,
                    value: None,
                    count: 0.0,
                }
            };
            nodes[at] = Some(node);
        }
        Ok(Tree {
            nodes: nodes
                .into_iter()
                .map(|n| n.expect("every placed node is filled"))
                .collect(),
        })
    }
}

/// A split of mode `mode` on threshold `t` as a [`Test::Le`] on the `f32` value, and
/// whether the left child is the false branch.
fn split(mode: Mode, t: f32, tracks_true: bool) -> Result<(Test, bool), String> {
    if t.is_nan() {
        return Err("a split's threshold is NaN".into());
    }
    let (threshold, swap) = match mode {
        Mode::Le => (t, false),
        Mode::Gt => (t, true),
        // No f32 is below -inf, so `x < -inf` has no `x <= t'` form.
        Mode::Lt | Mode::Ge if t == f32::NEG_INFINITY => {
            return Err("a BRANCH_LT or BRANCH_GTE split is on -inf".into())
        }
        Mode::Lt => (t.next_down(), false),
        Mode::Ge => (t.next_down(), true),
        Mode::Leaf => unreachable!("leaves have no test"),
    };
    let threshold = f64::from(threshold);
    Ok((
        Test::Le {
            threshold,
            // NaN takes the true branch only when tracked; the true branch is the right
            // child after a swap.
            nan_left: tracks_true != swap,
            zero_left: 0.0 <= threshold,
        },
        swap,
    ))
}

#[cfg(test)]
mod tests;
