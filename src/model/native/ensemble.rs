//! A tree ensemble as the native scorer sees it, whatever file it came from: trees of
//! splits in one normalised form, how inputs are read, and how the sum of the trees
//! becomes a probability. The LightGBM and ONNX importers produce it; the layout
//! ([`super::layout`]) compiles it.

/// The most input columns a served model may declare: far more than the FeatureSpec has
/// (a model's columns must each be a FeatureSpec feature), and small enough that what is
/// sized by the count stays small.
pub const MAX_FEATURES: usize = 1 << 16;

/// The trees and what to do with their sum.
#[derive(Debug, Clone, PartialEq)]
pub struct Ensemble {
    /// Input columns the model expects per row.
    pub n_features: usize,
    pub trees: Vec<Tree>,
    pub input: Input,
    /// Divide the sum of the trees by this before the output transform (LightGBM's
    /// `average_output`, written by random-forest boosting).
    pub average_over: Option<u32>,
    pub output: Output,
    /// How the tree outputs are added up.
    pub sum: Sum,
}

/// The arithmetic a row's tree outputs are added in, one tree after another in tree order
/// (as both LightGBM and ONNX Runtime with one thread add them), so that the sum is the
/// number the model's own library computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sum {
    /// In `f64`, from 0: LightGBM.
    Double,
    /// In `f32`, from 0, each leaf value rounded to `f32`: ONNX Runtime's tree ensembles
    /// on float input, which keep their scores in the input's type.
    Float,
}

/// How a row value is read before any comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// As LightGBM's prediction reads a dense row: a value with `|x| <= kZeroThreshold`
    /// is zero (LightGBM drops it from the row before the trees see it).
    Lightgbm,
    /// Rounded to `f32` first, as ONNX Runtime compares float tensors.
    Float32,
}

/// How the raw sum becomes the model's answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Output {
    /// `1 / (1 + exp(-scale * raw))`, LightGBM's binary objective (`sigmoid:` scale)
    /// and cross-entropy (scale 1).
    Sigmoid(f64),
    /// ONNX Runtime's `ComputeLogistic`, in `f32` on the `f32` sum:
    /// `v = 1 / (1 + exp(-|x|))`, and `1 - v` for negative `x`.
    Logistic32,
    /// The raw sum itself.
    Identity,
}

/// One tree: `nodes[0]` is the root.
#[derive(Debug, Clone, PartialEq)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Leaf {
        value: f64,
        /// Training rows that reached it (0 when unknown): the layout puts hot paths
        /// together.
        count: f64,
    },
    Split {
        feature: usize,
        test: Test,
        /// Where a row goes when the test holds.
        left: usize,
        right: usize,
        /// The node's expected value, for path attributions; `None` when the file does
        /// not record it.
        value: Option<f64>,
        count: f64,
    },
}

/// A split's test, normalised: every importer reduces its file's split kinds to these.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    /// Left when `x <= threshold`, except that a missing value (NaN) goes left exactly
    /// when `nan_left`, and an exact zero exactly when `zero_left`. (A plain comparison
    /// has `nan_left = false` and `zero_left = 0 <= threshold`.)
    Le {
        threshold: f64,
        nan_left: bool,
        zero_left: bool,
    },
    /// Left when `x` is not NaN, `trunc(x)` is a non-negative integer `c`, and bit `c`
    /// of `bits` (32 per word, least significant first) is set: LightGBM's categorical
    /// split.
    In { bits: Vec<u32> },
}

/// LightGBM's `kZeroThreshold`: a `float` constant, `1e-35f`, read as a double.
pub const LIGHTGBM_ZERO: f64 = 1e-35_f32 as f64;

impl Input {
    /// The value the trees compare, for a row value `x`.
    #[inline(always)]
    pub fn read(self, x: f64) -> f64 {
        match self {
            Input::Lightgbm if x.abs() <= LIGHTGBM_ZERO => 0.0,
            Input::Lightgbm => x,
            Input::Float32 => x as f32 as f64,
        }
    }
}

impl Output {
    #[inline(always)]
    pub fn apply(self, raw: f64) -> f64 {
        match self {
            // LightGBM writes `1.0f / (1.0f + std::exp(-sigmoid_ * x))`: the float
            // literals are exact in double, and negating the scale first is the same
            // number as negating the product.
            Output::Sigmoid(scale) => 1.0 / (1.0 + (-scale * raw).exp()),
            Output::Logistic32 => {
                let x = raw as f32;
                // `f32::exp` is the C library's `expf`, which ONNX Runtime calls too.
                let v = 1.0 / (1.0 + (-x.abs()).exp());
                f64::from(if x < 0.0 { 1.0 - v } else { v })
            }
            Output::Identity => raw,
        }
    }
}

impl Sum {
    /// `acc` (a sum so far) plus one tree's output, in this arithmetic.
    #[inline(always)]
    pub fn add(self, acc: f64, value: f64) -> f64 {
        match self {
            Sum::Double => acc + value,
            Sum::Float => f64::from(acc as f32 + value as f32),
        }
    }
}

impl Test {
    /// Whether a value read by [`Input::read`] goes left: the reference semantics the
    /// compiled layout must reproduce (and is tested against).
    pub fn goes_left(&self, x: f64) -> bool {
        match self {
            Test::Le {
                threshold,
                nan_left,
                zero_left,
            } => {
                if x.is_nan() {
                    *nan_left
                } else if x == 0.0 {
                    *zero_left
                } else {
                    x <= *threshold
                }
            }
            Test::In { bits } => category(x).is_some_and(|c| {
                bits.get((c / 32) as usize)
                    .is_some_and(|w| (w >> (c % 32)) & 1 == 1)
            }),
        }
    }
}

/// The category a value names for a categorical split, as LightGBM's
/// `CategoricalDecision` reads it: NaN and negatives name none; otherwise the value
/// truncated toward zero. (LightGBM's `static_cast<int>` of a value past `i32` gives
/// `INT_MIN` on x86, which names none; saturating to `i32::MAX` here names a category
/// past every bitset, which goes the same way.)
#[inline(always)]
pub fn category(x: f64) -> Option<u32> {
    if x.is_nan() {
        return None;
    }
    let c = x as i32;
    (c >= 0).then_some(c as u32)
}

impl Ensemble {
    /// The model's answer for one row, walking the trees one node at a time: the
    /// reference the compiled layout is tested against.
    pub fn predict_reference(&self, row: &[f64]) -> f64 {
        let raw = self.raw_reference(row);
        self.finish(raw)
    }

    /// The sum of the trees for one row, in tree order.
    pub fn raw_reference(&self, row: &[f64]) -> f64 {
        let mut raw = 0.0;
        let add = |raw: f64, value: f64| self.sum.add(raw, value);
        for tree in &self.trees {
            let mut node = 0;
            loop {
                match &tree.nodes[node] {
                    Node::Leaf { value, .. } => {
                        raw = add(raw, *value);
                        break;
                    }
                    Node::Split {
                        feature,
                        test,
                        left,
                        right,
                        ..
                    } => {
                        let x = self.input.read(row[*feature]);
                        node = if test.goes_left(x) { *left } else { *right };
                    }
                }
            }
        }
        raw
    }

    /// The raw sum after averaging and the output transform.
    #[inline(always)]
    pub fn finish(&self, raw: f64) -> f64 {
        let raw = match self.average_over {
            Some(n) => raw / f64::from(n),
            None => raw,
        };
        self.output.apply(raw)
    }

    /// Checks that every tree is a tree: children in range, every node reached exactly
    /// once from the root, features in range, thresholds not NaN.
    pub fn check(&self) -> Result<(), String> {
        // The layout and every scoring call allocate per declared column, so a count
        // from the file is bounded before anything is sized by it (a mutated
        // max_feature_idx of 6442450946 made a load allocate 51 GB and abort).
        if self.n_features > MAX_FEATURES {
            return Err(format!(
                "the model declares {} input columns; the native scorer serves at most {MAX_FEATURES}",
                self.n_features
            ));
        }
        if self.trees.is_empty() {
            return Err("the model has no trees".into());
        }
        for (t, tree) in self.trees.iter().enumerate() {
            let n = tree.nodes.len();
            if n == 0 {
                return Err(format!("tree {t} has no nodes"));
            }
            let mut seen = vec![false; n];
            let mut stack = vec![0usize];
            while let Some(i) = stack.pop() {
                if std::mem::replace(&mut seen[i], true) {
                    return Err(format!("tree {t}: node {i} is reached twice"));
                }
                if let Node::Split {
                    feature,
                    test,
                    left,
                    right,
                    ..
                } = &tree.nodes[i]
                {
                    if *feature >= self.n_features {
                        return Err(format!(
                            "tree {t}: a split reads column {feature}, but the model has {}",
                            self.n_features
                        ));
                    }
                    if let Test::Le { threshold, .. } = test {
                        if threshold.is_nan() {
                            return Err(format!("tree {t}: a split's threshold is NaN"));
                        }
                    }
                    for &c in [left, right] {
                        if c >= n {
                            return Err(format!("tree {t}: a child index {c} is out of range"));
                        }
                        stack.push(c);
                    }
                }
            }
        }
        Ok(())
    }
}
