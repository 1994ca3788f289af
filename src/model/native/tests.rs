//! The native scorer against its reference walk and against LightGBM itself, on randomly
//! generated ensembles and on the shipped models.

use super::ensemble::{Ensemble, Input, Node, Output, Sum, Test, Tree, LIGHTGBM_ZERO};
use super::{Forest, Kernel};
use crate::model::lightgbm::LightgbmScorer;
use crate::model::Scorer;

/// splitmix64: deterministic, so a failure names a seed that reproduces it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
    fn float(&mut self) -> f64 {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 20.0
    }
}

/// Values with rules of their own, for thresholds and for rows.
const SPECIAL: [f64; 14] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    2.5,
    1e-300,
    5e-324,
    -5e-324,
    LIGHTGBM_ZERO,
    -LIGHTGBM_ZERO,
    1e-36,
    1e10,
    -3.75,
    0.5,
];

/// One LightGBM tree in the arrays of its text format.
#[derive(Default)]
struct TextTree {
    split_feature: Vec<usize>,
    threshold: Vec<f64>,
    decision_type: Vec<u8>,
    left: Vec<i64>,
    right: Vec<i64>,
    leaf_value: Vec<f64>,
    leaf_count: Vec<u64>,
    internal_count: Vec<u64>,
    cat_boundaries: Vec<usize>,
    cat_threshold: Vec<u32>,
}

/// A random model in LightGBM's text format: numerical splits of every missing type and
/// default direction, categorical splits over bitsets of several words, constant trees,
/// and chains deep enough (depth 20+) to leave most lanes waiting.
fn random_lightgbm_text(rng: &mut Rng) -> (String, usize) {
    let n = 1 + rng.below(10);
    let categorical: Vec<bool> = (0..n).map(|_| rng.chance(0.25)).collect();
    let pools: Vec<Vec<f64>> = (0..n)
        .map(|_| {
            (0..1 + rng.below(8))
                .map(|_| {
                    if rng.chance(0.5) {
                        rng.pick(&SPECIAL)
                    } else {
                        rng.float()
                    }
                })
                .collect()
        })
        .collect();
    let n_trees = 1 + rng.below(25);
    let mut trees = Vec::new();
    for _ in 0..n_trees {
        let leaves = if rng.chance(0.1) {
            1
        } else if rng.chance(0.2) {
            22 + rng.below(10)
        } else {
            2 + rng.below(15)
        };
        let chain = rng.chance(0.3);
        let mut tree = TextTree::default();
        tree.leaf_value.push(rng.float() / 10.0);
        // Where each leaf hangs: (internal node, is left).
        let mut parent: Vec<Option<(usize, bool)>> = vec![None];
        for _ in 1..leaves {
            let leaf = if chain {
                tree.leaf_value.len() - 1
            } else {
                rng.below(tree.leaf_value.len())
            };
            let node = tree.split_feature.len();
            let feature = rng.below(n);
            tree.split_feature.push(feature);
            if categorical[feature] {
                let words = 1 + rng.below(3);
                let at = tree.cat_threshold.len();
                if tree.cat_boundaries.is_empty() {
                    tree.cat_boundaries.push(0);
                }
                tree.threshold.push((tree.cat_boundaries.len() - 1) as f64);
                tree.cat_threshold
                    .extend((0..words).map(|_| rng.next() as u32 & rng.next() as u32));
                tree.cat_boundaries.push(at + words);
                tree.decision_type.push(1);
            } else {
                tree.threshold.push(rng.pick(&pools[feature]));
                let missing = rng.below(3) as u8;
                let default_left = rng.chance(0.5) as u8;
                tree.decision_type
                    .push((missing << 2) | (default_left << 1));
            }
            let new_leaf = tree.leaf_value.len();
            tree.leaf_value.push(rng.float() / 10.0);
            tree.left.push(!(leaf as i64));
            tree.right.push(!(new_leaf as i64));
            if let Some((p, is_left)) = parent[leaf] {
                let side = if is_left {
                    &mut tree.left
                } else {
                    &mut tree.right
                };
                side[p] = node as i64;
            }
            parent[leaf] = Some((node, true));
            parent.push(Some((node, false)));
            tree.internal_count.push(rng.below(1000) as u64);
        }
        tree.leaf_count = (0..leaves).map(|_| rng.below(1000) as u64).collect();
        trees.push(tree);
    }
    (write_text(n, &trees, rng.chance(0.2)), n)
}

fn join<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Doubles as LightGBM writes them: enough digits to read back the same double.
fn join_f64(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:?}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_text(n: usize, trees: &[TextTree], average: bool) -> String {
    let mut text = format!(
        "tree\nversion=v4\nnum_class=1\nnum_tree_per_iteration=1\nlabel_index=0\n\
         max_feature_idx={}\nobjective=binary sigmoid:1\n{}feature_names={}\n\
         feature_infos={}\n\n",
        n - 1,
        if average { "average_output\n" } else { "" },
        join(&(0..n).map(|i| format!("Column_{i}")).collect::<Vec<_>>()),
        join(&vec!["[-1:1]"; n]),
    );
    for (i, t) in trees.iter().enumerate() {
        let num_cat = t.cat_boundaries.len().saturating_sub(1);
        text += &format!(
            "Tree={i}\nnum_leaves={}\nnum_cat={num_cat}\n",
            t.leaf_value.len()
        );
        if !t.split_feature.is_empty() {
            let internal = t.split_feature.len();
            text += &format!(
                "split_feature={}\nsplit_gain={}\nthreshold={}\ndecision_type={}\n\
                 left_child={}\nright_child={}\n",
                join(&t.split_feature),
                join(&vec![1; internal]),
                join_f64(&t.threshold),
                join(&t.decision_type),
                join(&t.left),
                join(&t.right),
            );
        }
        text += &format!(
            "leaf_value={}\nleaf_weight={}\nleaf_count={}\n",
            join_f64(&t.leaf_value),
            join(&vec![1; t.leaf_value.len()]),
            join(&t.leaf_count),
        );
        if !t.split_feature.is_empty() {
            let internal = t.split_feature.len();
            text += &format!(
                "internal_value={}\ninternal_weight={}\ninternal_count={}\n",
                join(&vec![0; internal]),
                join(&vec![1; internal]),
                join(&t.internal_count),
            );
        }
        if num_cat > 0 {
            text += &format!(
                "cat_boundaries={}\ncat_threshold={}\n",
                join(&t.cat_boundaries),
                join(&t.cat_threshold)
            );
        }
        text += "is_linear=0\nshrinkage=1\n\n\n";
    }
    text + "end of trees\n"
}

/// Rows for a model: its probe rows plus random draws of special values.
fn rows_for(forest: &Forest, rng: &mut Rng) -> Vec<f64> {
    let mut rows = forest.probe_rows(64);
    let n = forest.n_features();
    let extra = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 3e9, -0.5, 70.0];
    for _ in 0..64 * n {
        rows.push(if rng.chance(0.5) {
            rng.pick(&SPECIAL)
        } else if rng.chance(0.3) {
            rng.pick(&extra)
        } else {
            rng.float()
        });
    }
    rows
}

fn assert_bits(what: &str, got: &[f64], expected: &[f64], rows: &[f64], n: usize) {
    assert_eq!(got.len(), expected.len(), "{what}: row count");
    if let Some(i) = got
        .iter()
        .zip(expected)
        .position(|(a, b)| a.to_bits() != b.to_bits())
    {
        panic!(
            "{what}: row {i} {:?} scores {:e} ({:#x}), expected {:e} ({:#x})",
            &rows[i * n..(i + 1) * n],
            got[i],
            got[i].to_bits(),
            expected[i],
            expected[i].to_bits()
        );
    }
}

/// Every kernel this CPU runs, through both walks, gives LightGBM's raw scores and
/// probabilities to the bit, on random models LightGBM itself loads.
#[test]
fn random_models_score_as_lightgbm_does_on_every_kernel() {
    let mut models = 0;
    for seed in 0..150u64 {
        let mut rng = Rng(seed);
        let (text, n) = random_lightgbm_text(&mut rng);
        let lightgbm = LightgbmScorer::from_text(&text)
            .unwrap_or_else(|e| panic!("seed {seed}: LightGBM refuses the model: {e}\n{text}"));
        let forest =
            Forest::from_lightgbm(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{text}"));
        let rows = rows_for(&forest, &mut rng);
        let raw = lightgbm.raw_scores(&rows, n).unwrap();
        let probabilities = lightgbm.predict(&rows, n).unwrap();
        for kernel in Kernel::available() {
            let forest = forest.clone().with_kernel(kernel).unwrap();
            let what = format!("seed {seed}, {}", kernel.name());
            assert_bits(
                &format!("{what}, many rows"),
                &forest.predict_raw_many(&rows),
                &raw,
                &rows,
                n,
            );
            let one: Vec<f64> = rows
                .chunks_exact(n)
                .map(|r| forest.predict_raw_one(r))
                .collect();
            assert_bits(&format!("{what}, one row"), &one, &raw, &rows, n);
            assert_bits(
                &format!("{what}, probability"),
                &forest.predict(&rows),
                &probabilities,
                &rows,
                n,
            );
        }
        models += 1;
    }
    assert_eq!(models, 150);
}

/// A random ensemble straight in the normalised form, including what LightGBM files do
/// not have (float32 inputs, zero rules that differ from the comparison, infinite
/// thresholds): every kernel and both walks against the reference walk.
#[test]
fn random_ensembles_match_the_reference_walk_on_every_kernel() {
    for seed in 1000..1150u64 {
        let mut rng = Rng(seed);
        let n = 1 + rng.below(8);
        let mut thresholds: Vec<f64> = SPECIAL.to_vec();
        thresholds.extend([f64::INFINITY, f64::NEG_INFINITY, f64::MAX, 1.0000001]);
        let categorical: Vec<bool> = (0..n).map(|_| rng.chance(0.2)).collect();
        let trees = (0..1 + rng.below(40))
            .map(|_| {
                let mut nodes = vec![Node::Leaf {
                    value: 0.0,
                    count: 0.0,
                }];
                let splits = if rng.chance(0.2) { 25 } else { rng.below(12) };
                let mut open = vec![0usize];
                for _ in 0..splits {
                    let at = open.swap_remove(rng.below(open.len()));
                    let feature = rng.below(n);
                    let test = if categorical[feature] {
                        Test::In {
                            bits: (0..1 + rng.below(3)).map(|_| rng.next() as u32).collect(),
                        }
                    } else {
                        Test::Le {
                            threshold: rng.pick(&thresholds),
                            nan_left: rng.chance(0.5),
                            zero_left: rng.chance(0.5),
                        }
                    };
                    let (left, right) = (nodes.len(), nodes.len() + 1);
                    nodes.push(Node::Leaf {
                        value: 0.0,
                        count: rng.below(9) as f64,
                    });
                    nodes.push(Node::Leaf {
                        value: 0.0,
                        count: rng.below(9) as f64,
                    });
                    nodes[at] = Node::Split {
                        feature,
                        test,
                        left,
                        right,
                        value: Some(rng.float()),
                        count: 0.0,
                    };
                    open.extend([left, right]);
                }
                for node in &mut nodes {
                    if let Node::Leaf { value, .. } = node {
                        *value = rng.float();
                    }
                }
                Tree { nodes }
            })
            .collect();
        let input = if rng.chance(0.5) {
            Input::Float32
        } else {
            Input::Lightgbm
        };
        // ONNX Runtime's f32 sums, on either input.
        let sum = if rng.chance(0.5) {
            Sum::Float
        } else {
            Sum::Double
        };
        let ensemble = Ensemble {
            n_features: n,
            trees,
            input,
            average_over: None,
            output: Output::Identity,
            sum,
        };
        let forest = Forest::compile(&ensemble).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let rows = rows_for(&forest, &mut rng);
        let expected: Vec<f64> = rows
            .chunks_exact(n)
            .map(|r| ensemble.raw_reference(r))
            .collect();
        for kernel in Kernel::available() {
            let forest = forest.clone().with_kernel(kernel).unwrap();
            let what = format!("seed {seed}, {input:?}, {sum:?}, {}", kernel.name());
            assert_bits(
                &format!("{what}, many rows"),
                &forest.predict_raw_many(&rows),
                &expected,
                &rows,
                n,
            );
            let one: Vec<f64> = rows
                .chunks_exact(n)
                .map(|r| forest.predict_raw_one(r))
                .collect();
            assert_bits(&format!("{what}, one row"), &one, &expected, &rows, n);
            // Several blocks of rows and a part of one (the many-row walk takes rows a
            // block at a time).
            let count = 2 * 256 + 37;
            let (rows, expected): (Vec<&[f64]>, Vec<f64>) = rows
                .chunks_exact(n)
                .zip(&expected)
                .cycle()
                .take(count)
                .unzip();
            let rows = rows.concat();
            assert_bits(
                &format!("{what}, {count} rows"),
                &forest.predict_raw_many(&rows),
                &expected,
                &rows,
                n,
            );
        }
    }
}

fn shipped(name: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let manifest = crate::model::Manifest::parse(
        &std::fs::read_to_string(dir.join(format!("{name}.manifest.toml"))).unwrap(),
    )
    .unwrap();
    std::fs::read_to_string(dir.join(&manifest.file)).unwrap()
}

/// The shipped models score identically through both engines, and their path
/// attributions add up to LightGBM's raw score (up to the six digits the model file
/// keeps of each internal value).
#[test]
fn shipped_models_score_identically_through_both_engines() {
    for name in ["purchase", "churn"] {
        let text = shipped(name);
        let lightgbm = LightgbmScorer::from_text(&text).unwrap();
        let (native, note) =
            crate::model::lightgbm::scorer(&text, crate::model::Engine::Native).unwrap();
        assert_eq!(
            note, None,
            "{name}: the native engine serves the shipped models"
        );
        assert!(
            native.engine().starts_with("native/"),
            "{}",
            native.engine()
        );
        let forest = Forest::from_lightgbm(&text).unwrap();
        let n = forest.n_features();
        let mut rng = Rng(7);
        let rows = rows_for(&forest, &mut rng);
        assert_bits(
            name,
            &native.predict(&rows, n).unwrap(),
            &lightgbm.predict(&rows, n).unwrap(),
            &rows,
            n,
        );
        let raw = lightgbm.raw_scores(&rows, n).unwrap();
        for (row, raw) in rows.chunks_exact(n).zip(raw) {
            let credits: f64 = native.contributions(row).unwrap().unwrap().iter().sum();
            assert!((credits - raw).abs() < 1e-4, "{name}: {credits} vs {raw}");
        }
    }
}

#[test]
fn what_the_native_scorer_does_not_serve_is_refused_with_the_reason() {
    let text = shipped("purchase");
    let multiclass = text.replacen("num_class=1", "num_class=3", 1);
    assert!(Forest::from_lightgbm(&multiclass)
        .unwrap_err()
        .contains("num_class=3"));
    let linear = text.replacen("is_linear=0", "is_linear=1", 1);
    assert!(Forest::from_lightgbm(&linear)
        .unwrap_err()
        .contains("linear"));
    let regression = text.replacen("objective=binary sigmoid:1", "objective=regression", 1);
    assert!(Forest::from_lightgbm(&regression)
        .unwrap_err()
        .contains("regression"));
    // Served by LightGBM instead, with the reason beside it.
    let (scorer, note) =
        crate::model::lightgbm::scorer(&regression, crate::model::Engine::Native).unwrap();
    assert_eq!(scorer.engine(), "lightgbm");
    assert!(note.unwrap().contains("regression"));
}

/// A model the parity check finds different is served by LightGBM: the check can fail.
#[test]
fn a_native_scorer_that_disagrees_with_lightgbm_does_not_serve() {
    let text = shipped("purchase");
    let lightgbm = LightgbmScorer::from_text(&text).unwrap();
    // The same trees with one leaf moved by a millionth: a stand-in for a defect in the
    // layout. (One ulp can vanish in the sum.)
    let at = text.find("leaf_value=").unwrap() + "leaf_value=".len();
    let end = at + text[at..].find(' ').unwrap();
    let leaf: f64 = text[at..end].parse().unwrap();
    let nudged = format!("{}{:?}{}", &text[..at], leaf + 1e-6, &text[end..]);
    let forest = Forest::from_lightgbm(&nudged).unwrap();
    let error = crate::model::lightgbm::check_parity(&forest, &lightgbm).unwrap_err();
    assert!(error.contains("differs from LightGBM"), "{error}");
}

/// The native parsers took a model's declared column count as given, and the layout
/// allocates per declared column: the fuzz target `lightgbm_native` found a shipped model
/// whose `max_feature_idx` a mutation made 6442450946, and the process died allocating
/// 51 GB. A model wider than the native scorer serves is refused, with the count.
#[test]
fn a_model_declaring_more_columns_than_served_is_refused_not_allocated() {
    let text = shipped("purchase");
    for idx in ["6442450946", "65536", "4294967295"] {
        let wide = text.replacen(
            "max_feature_idx=36\n",
            &format!("max_feature_idx={idx}\n"),
            1,
        );
        match Forest::from_lightgbm(&wide) {
            Err(message) => assert!(message.contains("columns"), "{idx}: {message}"),
            Ok(_) => panic!("max_feature_idx={idx} was served"),
        }
    }
    // The widest model served still loads.
    let widest = text.replacen("max_feature_idx=36\n", "max_feature_idx=65535\n", 1);
    assert!(Forest::from_lightgbm(&widest).is_ok());
}
