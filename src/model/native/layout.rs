//! The compiled layout: an [`Ensemble`] turned into flat arrays that the kernels walk.
//!
//! **Rows become integer codes.** Every numerical column's thresholds (from every split
//! on it, in every tree) are sorted once at load. A row value `x` is encoded as its rank
//! among them, `code = #{t : t < x} - #{t : t < 0}`, and a split on threshold `t` stores
//! `j = #{t' : t' < t} - #{t' : t' < 0}`. Then `x <= t` exactly when `code <= j`: an
//! integer comparison that is exact for every double, with no rounding to reason about.
//! Two extra boundaries (0 and the largest readable value below it) give zero a code of
//! its own, `0`, so that the zero rule of a split is one integer test; NaN is `i32::MAX`,
//! above every `j`. A categorical column's code is the category itself (`-1` for none).
//!
//! **Nodes are one `u64` each**: `j` in the low 32 bits; the column, two flip flags (NaN
//! goes the other way from the comparison; zero goes the other way), a categorical flag,
//! whether each child is a leaf, and the distance to the children in the high 32. The two
//! children of a node sit side by side, so `next = node + delta + (went right)`, and the
//! step that reaches a leaf knows it. A leaf's own word always goes left to itself
//! (`j = i32::MAX`, `delta = 0`) and says its left child is a leaf, so a walk that keeps
//! stepping stays put and knows it has arrived. `values[node]`
//! holds a leaf's value (and an internal node's expected value, for path attributions).
//!
//! **Hot paths together**: each tree is laid out depth first from its root, pairs of
//! siblings at a time, descending into the child more training rows reached first
//! (LightGBM records the counts), so the likely path through a tree runs forward
//! through memory.
//!
//! This is a layout of our own. It is not QuickScorer or any of its variants (interleaved
//! per-feature threshold scans producing leaf bitvectors), which are patented.

use super::ensemble::{category, Ensemble, Input, Node, Sum, Test, LIGHTGBM_ZERO};

pub const FEATURE_MASK: u32 = (1 << 13) - 1;
pub const NAN_FLIP: u32 = 1 << 13;
pub const ZERO_FLIP: u32 = 1 << 14;
pub const CATEGORICAL: u32 = 1 << 15;
/// The node's left (right) child is a leaf: a walk knows it has arrived when it steps.
pub const LEFT_LEAF: u32 = 1 << 16;
pub const RIGHT_LEAF: u32 = 1 << 17;
pub const DELTA_SHIFT: u32 = 18;
/// The most nodes a tree may have: the many-row walk keeps a walk's position within its
/// tree in the low 24 bits of a `u32` and its row in the high 8.
pub const TREE_NODES: usize = 1 << 24;
pub const MAX_DELTA: usize = (1 << (32 - DELTA_SHIFT)) - 1;
/// A missing value's code: above every split's `j`, so the comparison sends it right.
pub const NAN_CODE: i32 = i32::MAX;
/// A categorical value that names no category.
pub const NO_CATEGORY: i32 = -1;
/// A leaf's word: `j` is above every code, so a leaf always goes left, to itself
/// (`delta = 0`), and says that this child is a leaf.
pub const LEAF: u64 = (i32::MAX as u32 as u64) | ((LEFT_LEAF as u64) << 32);

/// How one column of a row is encoded.
#[derive(Debug, Clone)]
pub enum Encoding {
    /// The sorted, distinct split thresholds of the column (with the two zero
    /// boundaries), and how many of them are below zero. When every split on the column
    /// sends a missing value where it sends zero (LightGBM's missing types None and
    /// Zero, which read NaN as 0), NaN is encoded as zero and no split needs its NaN
    /// rule.
    Numeric {
        thresholds: Vec<f64>,
        zero_rank: i32,
        nan_is_zero: bool,
    },
    Categorical,
}

/// A column the trees read: where it is in the caller's row and how it is encoded.
#[derive(Debug, Clone)]
pub struct Column {
    pub source: usize,
    pub encoding: Encoding,
}

#[derive(Debug, Clone)]
pub struct Layout {
    pub n_features: usize,
    pub input: Input,
    /// How the kernels add a row's tree outputs.
    pub sum: Sum,
    /// The columns the trees read, in row order; a node's column indexes this.
    pub columns: Vec<Column>,
    pub nodes: Vec<u64>,
    pub values: Vec<f64>,
    /// Whether `values` holds every internal node's expected value.
    pub internal_values: bool,
    pub roots: Vec<u32>,
    /// Per tree, whether it has a categorical split (walked by the portable kernel only).
    pub categorical: Vec<bool>,
    /// The trees with a split and without categorical splits, which the vector kernels
    /// walk.
    pub vector_trees: Vec<u32>,
    /// Whether any split needs its NaN or zero rule: the kernels leave both out when
    /// none does (most models: LightGBM's default missing type reads NaN as zero).
    pub flips: bool,
    /// Categorical splits' bitsets: `(offset, words)` into `words`.
    pub sets: Vec<(u32, u32)>,
    pub words: Vec<u32>,
}

impl Layout {
    /// Compiles an ensemble; refuses what the layout cannot hold.
    pub fn build(ensemble: &Ensemble) -> Result<Layout, String> {
        ensemble.check()?;
        let columns = columns(ensemble)?;
        let mut compact = vec![usize::MAX; ensemble.n_features];
        for (c, column) in columns.iter().enumerate() {
            compact[column.source] = c;
        }
        let mut layout = Layout {
            n_features: ensemble.n_features,
            input: ensemble.input,
            sum: ensemble.sum,
            columns,
            nodes: Vec::new(),
            values: Vec::new(),
            internal_values: true,
            roots: Vec::with_capacity(ensemble.trees.len()),
            categorical: Vec::with_capacity(ensemble.trees.len()),
            vector_trees: Vec::new(),
            flips: false,
            sets: Vec::new(),
            words: Vec::new(),
        };
        if layout.columns.len() > FEATURE_MASK as usize + 1 {
            return Err(format!(
                "the trees read {} columns; the native layout holds {}",
                layout.columns.len(),
                FEATURE_MASK + 1
            ));
        }
        for (t, tree) in ensemble.trees.iter().enumerate() {
            if tree.nodes.len() > TREE_NODES {
                return Err(format!(
                    "tree {t} has {} nodes; the native layout holds trees of up to {TREE_NODES}",
                    tree.nodes.len()
                ));
            }
            let root = layout.nodes.len();
            let root_u32 = u32::try_from(root).map_err(|_| "the model has too many nodes")?;
            layout.roots.push(root_u32);
            layout.categorical.push(false);
            layout.nodes.push(0);
            layout.values.push(0.0);
            // Depth first, hot child first: the stack holds (tree node, position).
            let mut stack = vec![(0usize, root)];
            while let Some((i, at)) = stack.pop() {
                match &tree.nodes[i] {
                    Node::Leaf { value, .. } => {
                        layout.nodes[at] = LEAF;
                        layout.values[at] = *value;
                    }
                    Node::Split {
                        feature,
                        test,
                        left,
                        right,
                        value,
                        ..
                    } => {
                        let pair = layout.nodes.len();
                        let delta = pair - at;
                        if delta > MAX_DELTA {
                            return Err(format!(
                                "tree {t} is too large for the native layout ({} nodes; it \
                                 holds trees of up to {MAX_DELTA})",
                                tree.nodes.len()
                            ));
                        }
                        layout.nodes.extend([0, 0]);
                        layout.values.extend([0.0, 0.0]);
                        let column = compact[*feature] as u32;
                        let (j, mut flags) = layout.test(t, column, test)?;
                        if matches!(tree.nodes[*left], Node::Leaf { .. }) {
                            flags |= LEFT_LEAF;
                        }
                        if matches!(tree.nodes[*right], Node::Leaf { .. }) {
                            flags |= RIGHT_LEAF;
                        }
                        layout.nodes[at] =
                            word(j, column | flags | ((delta as u32) << DELTA_SHIFT));
                        match value {
                            Some(v) => layout.values[at] = *v,
                            None => layout.internal_values = false,
                        }
                        let count = |n: usize| match &tree.nodes[n] {
                            Node::Leaf { count, .. } | Node::Split { count, .. } => *count,
                        };
                        // The hotter child is pushed last so that it is laid out next.
                        if count(*right) > count(*left) {
                            stack.push((*left, pair));
                            stack.push((*right, pair + 1));
                        } else {
                            stack.push((*right, pair + 1));
                            stack.push((*left, pair));
                        }
                    }
                }
            }
        }
        if u32::try_from(layout.nodes.len()).is_err() || layout.nodes.len() > i32::MAX as usize {
            return Err("the model has too many nodes for the native layout".into());
        }
        layout.vector_trees = (0..layout.roots.len() as u32)
            .filter(|&t| {
                !layout.categorical[t as usize] && !layout.is_leaf(layout.roots[t as usize])
            })
            .collect();
        Ok(layout)
    }

    /// A split's `j` and flags.
    fn test(&mut self, tree: usize, column: u32, test: &Test) -> Result<(i32, u32), String> {
        match test {
            Test::Le {
                threshold,
                nan_left,
                zero_left,
            } => {
                let Encoding::Numeric {
                    thresholds,
                    zero_rank,
                    nan_is_zero,
                } = &self.columns[column as usize].encoding
                else {
                    unreachable!(
                        "columns() gives every numerically split column a numeric encoding"
                    )
                };
                let rank = thresholds.partition_point(|&t| t < *threshold) as i32;
                let j = rank - zero_rank;
                let mut flags = 0;
                // The comparison sends NaN right (its code is above every j).
                if *nan_left && !nan_is_zero {
                    flags |= NAN_FLIP;
                }
                // The comparison sends zero (code 0) left when 0 <= j.
                if *zero_left != (0 <= j) {
                    flags |= ZERO_FLIP;
                }
                self.flips |= flags != 0;
                Ok((j, flags))
            }
            Test::In { bits } => {
                self.categorical[tree] = true;
                let set = u32::try_from(self.sets.len()).map_err(|_| "too many bitsets")?;
                let offset = u32::try_from(self.words.len()).map_err(|_| "bitsets too large")?;
                self.sets.push((offset, bits.len() as u32));
                self.words.extend_from_slice(bits);
                Ok((set as i32, CATEGORICAL))
            }
        }
    }

    /// Codes per encoded row (at least one, so that a leaf's column 0 is always there).
    pub fn stride(&self) -> usize {
        self.columns.len().max(1)
    }

    /// Encodes one caller row into `out` (`stride()` codes).
    #[inline(always)]
    pub fn encode(&self, row: &[f64], out: &mut [i32]) {
        for (column, code) in self.columns.iter().zip(out.iter_mut()) {
            *code = self.code(column, row[column.source]);
        }
    }

    /// Encodes the rows of `rows` (row-major, `n_features` columns) column by column:
    /// column `c` of row `r` goes to `out[c * spacing + r]`. A column at a time, so that
    /// its thresholds stay in the L1 cache while every row searches them.
    pub fn encode_columns(&self, rows: &[f64], spacing: usize, out: &mut [i32]) {
        for (c, column) in self.columns.iter().enumerate() {
            let codes = &mut out[c * spacing..];
            for (row, code) in rows.chunks_exact(self.n_features).zip(codes.iter_mut()) {
                *code = self.code(column, row[column.source]);
            }
        }
    }

    /// The code of the value `x` in `column`.
    #[inline(always)]
    fn code(&self, column: &Column, x: f64) -> i32 {
        let x = self.input.read(x);
        match &column.encoding {
            Encoding::Numeric {
                thresholds,
                zero_rank,
                nan_is_zero,
            } => {
                if x.is_nan() {
                    if *nan_is_zero {
                        0
                    } else {
                        NAN_CODE
                    }
                } else {
                    thresholds.partition_point(|&t| t < x) as i32 - zero_rank
                }
            }
            Encoding::Categorical => category(x).map_or(NO_CATEGORY, |c| c as i32),
        }
    }

    /// One step of a walk from `node` for the row whose code of column `c` is
    /// `codes[at + c * spacing]` (a row-major row: `at` its start, `spacing` 1): the
    /// child it goes to (or `node` itself at a leaf), and whether that child is a leaf.
    /// The definition every kernel implements.
    #[inline(always)]
    pub fn step(&self, codes: &[i32], at: usize, spacing: usize, node: u32) -> (u32, bool) {
        let word = self.nodes[node as usize];
        let meta = (word >> 32) as u32;
        let x = codes[at + (meta & FEATURE_MASK) as usize * spacing];
        if meta & CATEGORICAL != 0 {
            let j = word as u32;
            let (offset, len) = self.sets[j as usize];
            let in_set = x >= 0
                && (x as u32 / 32) < len
                && (self.words[(offset + x as u32 / 32) as usize] >> (x as u32 % 32)) & 1 == 1;
            let right = !in_set;
            let leaf = meta & if right { RIGHT_LEAF } else { LEFT_LEAF } != 0;
            (node + (meta >> DELTA_SHIFT) + right as u32, leaf)
        } else {
            let (right, leaf) = decide(word, x);
            (node + (meta >> DELTA_SHIFT) + right as u32, leaf)
        }
    }

    /// Whether the node at `node` is a leaf.
    #[inline(always)]
    pub fn is_leaf(&self, node: u32) -> bool {
        self.nodes[node as usize] == LEAF
    }

    /// The leaf a row reaches in the tree rooted at `root`.
    #[inline(always)]
    pub fn walk(&self, codes: &[i32], at: usize, spacing: usize, root: u32) -> u32 {
        let mut node = root;
        while !self.is_leaf(node) {
            node = self.step(codes, at, spacing, node).0;
        }
        node
    }

    /// Path attribution (Saabas): each caller column's credit for the row's raw score,
    /// then the bias (the roots' values); `n_features + 1` values that add up to the raw
    /// score. `None` when the file recorded no internal values.
    pub fn contributions(&self, row: &[f64]) -> Option<Vec<f64>> {
        if !self.internal_values {
            return None;
        }
        let mut codes = vec![0; self.stride()];
        self.encode(row, &mut codes);
        let mut out = vec![0.0; self.n_features + 1];
        for &root in &self.roots {
            out[self.n_features] += self.values[root as usize];
            let mut node = root;
            while !self.is_leaf(node) {
                let next = self.step(&codes, 0, 1, node).0;
                let column = (self.nodes[node as usize] >> 32) as u32 & FEATURE_MASK;
                out[self.columns[column as usize].source] +=
                    self.values[next as usize] - self.values[node as usize];
                node = next;
            }
        }
        Some(out)
    }

    /// Bytes the layout occupies.
    pub fn bytes(&self) -> usize {
        let thresholds: usize = self
            .columns
            .iter()
            .map(|c| match &c.encoding {
                Encoding::Numeric { thresholds, .. } => thresholds.len() * 8,
                Encoding::Categorical => 0,
            })
            .sum();
        self.nodes.len() * 8
            + self.values.len() * 8
            + self.roots.len() * 5
            + self.sets.len() * 8
            + self.words.len() * 4
            + thresholds
            + self.columns.len() * std::mem::size_of::<Column>()
    }
}

/// A numerical node's decision for the code `x`: whether the row goes right, and
/// whether the child it goes to is a leaf.
#[inline(always)]
pub fn decide(word: u64, x: i32) -> (bool, bool) {
    let j = word as u32 as i32;
    let meta = (word >> 32) as u32;
    let right =
        (x > j) ^ (x == NAN_CODE && meta & NAN_FLIP != 0) ^ (x == 0 && meta & ZERO_FLIP != 0);
    (
        right,
        meta & if right { RIGHT_LEAF } else { LEFT_LEAF } != 0,
    )
}

fn word(j: i32, meta: u32) -> u64 {
    u64::from(j as u32) | (u64::from(meta) << 32)
}

/// The columns the trees read and how each is encoded.
fn columns(ensemble: &Ensemble) -> Result<Vec<Column>, String> {
    let mut thresholds: Vec<Option<Vec<f64>>> = vec![None; ensemble.n_features];
    let mut categorical = vec![false; ensemble.n_features];
    let mut nan_is_zero = vec![true; ensemble.n_features];
    for tree in &ensemble.trees {
        for node in &tree.nodes {
            if let Node::Split { feature, test, .. } = node {
                match test {
                    Test::Le {
                        threshold,
                        nan_left,
                        zero_left,
                    } => {
                        thresholds[*feature]
                            .get_or_insert_with(Vec::new)
                            .push(*threshold);
                        nan_is_zero[*feature] &= nan_left == zero_left;
                    }
                    Test::In { .. } => categorical[*feature] = true,
                }
            }
        }
    }
    // The largest value below zero that can reach a comparison: with it and 0 as
    // boundaries, zero's rank is its own.
    let below_zero = match ensemble.input {
        Input::Lightgbm => -LIGHTGBM_ZERO,
        Input::Float32 => -f64::from(f32::from_bits(1)),
    };
    let mut columns = Vec::new();
    for (source, (numeric, categorical)) in thresholds.into_iter().zip(categorical).enumerate() {
        let encoding = match (numeric, categorical) {
            (Some(_), true) => {
                return Err(format!(
                    "column {source} has both numerical and categorical splits"
                ))
            }
            (Some(mut t), false) => {
                t.extend([below_zero, 0.0]);
                t.sort_by(f64::total_cmp);
                // -0.0 and 0.0 compare equal, and so rank the same.
                t.dedup_by(|a, b| a == b);
                if t.len() >= (i32::MAX / 2) as usize {
                    return Err(format!("column {source} has too many thresholds"));
                }
                let zero_rank = t.partition_point(|&x| x < 0.0) as i32;
                Encoding::Numeric {
                    thresholds: t,
                    zero_rank,
                    nan_is_zero: nan_is_zero[source],
                }
            }
            (None, true) => Encoding::Categorical,
            (None, false) => continue,
        };
        columns.push(Column { source, encoding });
    }
    Ok(columns)
}
