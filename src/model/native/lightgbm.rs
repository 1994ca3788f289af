//! Reads a LightGBM text model (`Booster.save_model`, format v4) into an [`Ensemble`],
//! reproducing LightGBM 4.7's prediction semantics (`tree.h`: `NumericalDecision`,
//! `CategoricalDecision`; `gbdt_prediction.cpp`: the sum in tree order, `average_output`;
//! the objective's `ConvertOutput`).
//!
//! What the native scorer does not cover is refused with the reason, and the model is
//! served through LightGBM itself: linear trees, more than one output per row, objectives
//! other than binary and cross-entropy.

use super::ensemble::{Ensemble, Input, Node, Output, Sum, Test, Tree};

/// LightGBM's decision-type bits (`tree.h`).
const CATEGORICAL: u8 = 1;
const DEFAULT_LEFT: u8 = 2;
/// The missing type, in bits 2–3.
const MISSING_NONE: u8 = 0;
const MISSING_ZERO: u8 = 1;
const MISSING_NAN: u8 = 2;

/// Parses a LightGBM text model.
pub fn parse(text: &str) -> Result<Ensemble, String> {
    let (header, trees_text) = text
        .split_once("\nTree=")
        .ok_or("the file has no trees (no \"Tree=\" line)")?;
    let keys = header_keys(header);
    let key = |name: &str| {
        keys.iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.trim())
    };
    for (name, expected) in [("num_class", "1"), ("num_tree_per_iteration", "1")] {
        match key(name) {
            Some(v) if v == expected => {}
            Some(v) => {
                return Err(format!(
                    "{name}={v}: the native scorer serves one output per row"
                ))
            }
            None => return Err(format!("the header has no {name}")),
        }
    }
    let n_features = key("max_feature_idx")
        .and_then(|v| v.parse::<usize>().ok())
        .ok_or("the header has no max_feature_idx")?
        + 1;
    let output = match key("objective").map(|o| o.split_whitespace().collect::<Vec<_>>()) {
        Some(parts) if parts.first() == Some(&"binary") => {
            let scale = parts
                .iter()
                .find_map(|p| p.strip_prefix("sigmoid:"))
                .map(|s| {
                    s.parse::<f64>()
                        .map_err(|_| format!("sigmoid:{s} is not a number"))
                })
                .transpose()?
                .ok_or("the binary objective has no sigmoid: parameter")?;
            Output::Sigmoid(scale)
        }
        Some(parts) if matches!(parts.first(), Some(&"cross_entropy") | Some(&"xentropy")) => {
            Output::Sigmoid(1.0)
        }
        Some(parts) => {
            return Err(format!(
                "objective {:?}: the native scorer serves binary and cross_entropy models",
                parts.join(" ")
            ))
        }
        None => return Err("the header names no objective".into()),
    };
    let average = keys.iter().any(|(key, _)| *key == "average_output");

    let mut trees = Vec::new();
    // The blocks between "Tree=" lines; the last one ends at "end of trees".
    for (i, block) in trees_text.split("\nTree=").enumerate() {
        let block = block.split("\nend of trees").next().unwrap_or(block);
        let tree = parse_tree(block).map_err(|e| format!("tree {i}: {e}"))?;
        trees.push(tree);
    }
    let average_over = if average {
        Some(u32::try_from(trees.len()).map_err(|_| "too many trees")?)
    } else {
        None
    };
    let ensemble = Ensemble {
        n_features,
        trees,
        input: Input::Lightgbm,
        average_over,
        output,
        sum: Sum::Double,
    };
    ensemble.check()?;
    Ok(ensemble)
}

/// The header's lines as LightGBM reads them (`GBDT::LoadModelFromString`): split at
/// every `=`, empty pieces dropped, the first piece the key and the second its value, or
/// the empty value when there is none (a bare `num_class` line gives `num_class` as ""). A
/// line of more pieces LightGBM refuses, except for `feature_names` and
/// `monotone_constraints`, whose value is the rest of the line.
pub(crate) fn header_keys(header: &str) -> Vec<(&str, &str)> {
    header
        .lines()
        .filter_map(|line| {
            let mut pieces = line.split('=').filter(|p| !p.is_empty());
            let key = pieces.next()?;
            let value = pieces.next().unwrap_or("");
            if pieces.next().is_some() {
                return Some((key, line.split_once('=').map_or("", |(_, rest)| rest)));
            }
            Some((key, value))
        })
        .collect()
}

fn parse_tree(block: &str) -> Result<Tree, String> {
    let field = |name: &str| {
        block.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix('='))
                .map(str::trim)
        })
    };
    let numbers = |name: &str| -> Result<Vec<f64>, String> {
        let Some(v) = field(name) else {
            return Err(format!("no {name}"));
        };
        v.split_whitespace()
            .map(|n| {
                n.parse()
                    .map_err(|_| format!("{name} has {n:?}, not a number"))
            })
            .collect()
    };
    let integers = |name: &str| -> Result<Vec<i64>, String> {
        let Some(v) = field(name) else {
            return Err(format!("no {name}"));
        };
        v.split_whitespace()
            .map(|n| {
                n.parse()
                    .map_err(|_| format!("{name} has {n:?}, not an integer"))
            })
            .collect()
    };
    if field("is_linear").is_some_and(|v| v != "0") {
        return Err("linear trees are not served by the native scorer".into());
    }
    let num_leaves: usize = field("num_leaves")
        .and_then(|v| v.parse().ok())
        .ok_or("no num_leaves")?;
    let leaf_value = numbers("leaf_value")?;
    if leaf_value.len() != num_leaves || num_leaves == 0 {
        return Err(format!(
            "{} leaf values for num_leaves={num_leaves}",
            leaf_value.len()
        ));
    }
    // Counts are optional (older files): without them the layout keeps file order.
    let leaf_count = numbers("leaf_count").unwrap_or_else(|_| vec![0.0; num_leaves]);
    if num_leaves == 1 {
        return Ok(Tree {
            nodes: vec![Node::Leaf {
                value: leaf_value[0],
                count: leaf_count.first().copied().unwrap_or(0.0),
            }],
        });
    }
    let internal = num_leaves - 1;
    let split_feature = integers("split_feature")?;
    let threshold = numbers("threshold")?;
    let decision_type = integers("decision_type")?;
    let left_child = integers("left_child")?;
    let right_child = integers("right_child")?;
    let internal_value = numbers("internal_value").ok();
    let internal_count = numbers("internal_count").unwrap_or_else(|_| vec![0.0; internal]);
    let sizes = [
        split_feature.len(),
        threshold.len(),
        decision_type.len(),
        left_child.len(),
        right_child.len(),
        internal_count.len(),
    ];
    if sizes.iter().any(|&n| n != internal)
        || leaf_count.len() != num_leaves
        || internal_value.as_ref().is_some_and(|v| v.len() != internal)
    {
        return Err(format!("node arrays disagree with num_leaves={num_leaves}"));
    }
    let num_cat: usize = field("num_cat")
        .and_then(|v| v.parse().ok())
        .ok_or("no num_cat")?;
    let (cat_boundaries, cat_threshold) = if num_cat > 0 {
        (integers("cat_boundaries")?, integers("cat_threshold")?)
    } else {
        (Vec::new(), Vec::new())
    };

    // Internal nodes keep their indices; leaf k becomes node `internal + k`.
    let child = |c: i64| -> Result<usize, String> {
        if c >= 0 {
            usize::try_from(c)
                .ok()
                .filter(|&c| c < internal)
                .ok_or(format!("child {c} is out of range"))
        } else {
            usize::try_from(!c)
                .ok()
                .filter(|&l| l < num_leaves)
                .map(|l| internal + l)
                .ok_or(format!("leaf child {c} is out of range"))
        }
    };
    let mut nodes = Vec::with_capacity(internal + num_leaves);
    for i in 0..internal {
        let decision = u8::try_from(decision_type[i])
            .map_err(|_| format!("decision_type {} is out of range", decision_type[i]))?;
        let feature = usize::try_from(split_feature[i])
            .map_err(|_| format!("split_feature {} is negative", split_feature[i]))?;
        let test = if decision & CATEGORICAL != 0 {
            let cat = threshold[i];
            let index = cat as usize;
            if cat < 0.0 || cat.fract() != 0.0 || index + 1 >= cat_boundaries.len() {
                return Err(format!("categorical split {i} names bitset {cat}"));
            }
            let (from, to) = (cat_boundaries[index], cat_boundaries[index + 1]);
            let words = usize::try_from(from)
                .ok()
                .zip(usize::try_from(to).ok())
                .filter(|(f, t)| f <= t && *t <= cat_threshold.len())
                .map(|(f, t)| &cat_threshold[f..t])
                .ok_or(format!("categorical split {i} has bad cat_boundaries"))?;
            let bits = words
                .iter()
                .map(|&w| u32::try_from(w).map_err(|_| format!("cat_threshold {w} is not 32 bits")))
                .collect::<Result<_, _>>()?;
            Test::In { bits }
        } else {
            let t = threshold[i];
            let default_left = decision & DEFAULT_LEFT != 0;
            let plain_zero = 0.0 <= t;
            let (nan_left, zero_left) = match (decision >> 2) & 3 {
                // NaN is read as 0.0 and compared.
                MISSING_NONE => (plain_zero, plain_zero),
                // NaN is read as 0.0, and zero takes the default direction.
                MISSING_ZERO => (default_left, default_left),
                MISSING_NAN => (default_left, plain_zero),
                other => return Err(format!("split {i} has missing type {other}")),
            };
            Test::Le {
                threshold: t,
                nan_left,
                zero_left,
            }
        };
        nodes.push(Node::Split {
            feature,
            test,
            left: child(left_child[i])?,
            right: child(right_child[i])?,
            value: internal_value.as_ref().map(|v| v[i]),
            count: internal_count[i],
        });
    }
    for (value, count) in leaf_value.into_iter().zip(leaf_count) {
        nodes.push(Node::Leaf { value, count });
    }
    Ok(Tree { nodes })
}
