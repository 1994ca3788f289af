//! The walks, written once over [`Lanes`]: a vector of node positions stepped through the
//! layout together. Each instruction set implements the few operations a step needs
//! (`portable` here, [`super::avx2`], [`super::avx512`]); the drivers are generic and
//! inlined into each instruction set's entry point, so that every path runs the same
//! algorithm.
//!
//! Two ways to fill the lanes:
//! - **Many rows** (`score_rows`): each lane is a row, all lanes walk the same tree, in
//!   blocks of rows that stay in L1 while every tree passes over them. Lanes that reach
//!   their leaf early stay there (a leaf steps to itself) until the block's last lane
//!   does.
//! - **One row** (`score_one`): each lane is a tree, all walking the one row.
//!
//! Both add each row's tree outputs in tree order, the order LightGBM adds them in, so
//! the sums are the same doubles.
//!
//! Trees with a categorical split are walked by the portable step inside every kernel:
//! bitset lookups are rare in the models Nudge serves, and keeping them out of the vector
//! steps keeps those short.

use super::layout::Layout;

/// Vectors walked side by side per tree, to overlap their memory latencies.
const INTERLEAVE: usize = 2;
/// Row groups per block: the codes of a block (here up to 4 × 2 × 16 rows) stay in L1
/// while every tree passes over them.
const BLOCK_GROUPS: usize = 4;

/// A vector of `N` lanes of `u32` node positions, and the operations a walk needs.
///
/// # Safety
/// `step` and `add_values` read `layout.nodes`, `codes` and `layout.values` without
/// bounds checks. Callers pass node positions reached from `layout.roots` by `step` (the
/// layout keeps every child of a reachable node in range) and `bases` such that
/// `base + layout.stride() <= codes.len()` in every lane. An implementation may only be
/// called where its instruction set is available.
pub(super) unsafe trait Lanes {
    const N: usize;
    type V: Copy;
    unsafe fn splat(x: u32) -> Self::V;
    /// The first `N` values of `x`.
    unsafe fn load(x: &[u32]) -> Self::V;
    unsafe fn store(v: Self::V, out: &mut [u32]);
    unsafe fn step(layout: &Layout, codes: &[i32], bases: Self::V, nodes: Self::V) -> Self::V;
    unsafe fn same(a: Self::V, b: Self::V) -> bool;
    /// `acc[l] += layout.values[nodes[l]]` for each lane.
    unsafe fn add_values(layout: &Layout, nodes: Self::V, acc: &mut [f64]);
}

/// Raw scores for `out.len()` rows of `rows` (row-major, `layout.n_features` columns).
///
/// # Safety
/// `L`'s instruction set must be available.
#[inline(always)]
pub(super) unsafe fn score_rows<L: Lanes>(layout: &Layout, rows: &[f64], out: &mut [f64]) {
    let n = layout.n_features;
    let stride = layout.stride();
    let group = L::N * INTERLEAVE;
    let block = group * BLOCK_GROUPS;
    let mut codes = vec![0i32; block * stride];
    let starts: Vec<u32> = (0..block).map(|r| (r * stride) as u32).collect();
    let mut bases = Vec::with_capacity(BLOCK_GROUPS * INTERLEAVE);
    for v in 0..BLOCK_GROUPS * INTERLEAVE {
        bases.push(L::load(&starts[v * L::N..]));
    }
    let mut acc = vec![0.0f64; block];
    for (block_rows, block_out) in rows.chunks(block * n).zip(out.chunks_mut(block)) {
        let count = block_out.len();
        for (r, row) in block_rows.chunks_exact(n).enumerate() {
            layout.encode(row, &mut codes[r * stride..(r + 1) * stride]);
        }
        // Rows past `count` in the last block keep codes from earlier rows: valid codes,
        // whose sums are not read.
        acc.fill(0.0);
        let groups = count.div_ceil(group);
        for (&root, &categorical) in layout.roots.iter().zip(&layout.categorical) {
            if categorical {
                for (r, acc) in acc.iter_mut().enumerate().take(count) {
                    *acc += layout.values[layout.walk(&codes, r * stride, root) as usize];
                }
                continue;
            }
            let start = L::splat(root);
            for g in 0..groups {
                let bases = &bases[g * INTERLEAVE..(g + 1) * INTERLEAVE];
                let mut nodes = [start; INTERLEAVE];
                loop {
                    let mut moved = false;
                    for v in 0..INTERLEAVE {
                        let next = L::step(layout, &codes, bases[v], nodes[v]);
                        moved |= !L::same(next, nodes[v]);
                        nodes[v] = next;
                    }
                    if !moved {
                        break;
                    }
                }
                for (v, &at) in nodes.iter().enumerate() {
                    let from = g * group + v * L::N;
                    L::add_values(layout, at, &mut acc[from..from + L::N]);
                }
            }
        }
        block_out.copy_from_slice(&acc[..count]);
    }
}

/// The raw score of one row.
///
/// # Safety
/// `L`'s instruction set must be available.
#[inline(always)]
pub(super) unsafe fn score_one<L: Lanes>(
    layout: &Layout,
    row: &[f64],
    leaves: &mut Vec<u32>,
) -> f64 {
    let stride = layout.stride();
    let group = L::N * INTERLEAVE;
    let mut small = [0i32; 64];
    let mut heap = Vec::new();
    let codes: &mut [i32] = if stride <= small.len() {
        &mut small[..stride]
    } else {
        heap.resize(stride, 0);
        &mut heap
    };
    layout.encode(row, codes);
    leaves.clear();
    leaves.resize(layout.roots.len(), 0);
    let zero = L::splat(0);
    let mut roots = [0u32; 64];
    let mut reached = [0u32; 64];
    debug_assert!(group <= roots.len());
    for trees in layout.vector_trees.chunks(group) {
        // A last, short group walks copies of its first tree in the spare lanes.
        roots[..group].fill(layout.roots[trees[0] as usize]);
        for (root, &tree) in roots.iter_mut().zip(trees) {
            *root = layout.roots[tree as usize];
        }
        let mut nodes = [zero; INTERLEAVE];
        for (v, nodes) in nodes.iter_mut().enumerate() {
            *nodes = L::load(&roots[v * L::N..]);
        }
        loop {
            let mut moved = false;
            for node in nodes.iter_mut() {
                let next = L::step(layout, codes, zero, *node);
                moved |= !L::same(next, *node);
                *node = next;
            }
            if !moved {
                break;
            }
        }
        for (v, &node) in nodes.iter().enumerate() {
            L::store(node, &mut reached[v * L::N..]);
        }
        for (&tree, &leaf) in trees.iter().zip(&reached) {
            leaves[tree as usize] = leaf;
        }
    }
    let mut raw = 0.0;
    for (t, (&leaf, &root)) in leaves.iter().zip(&layout.roots).enumerate() {
        let leaf = if layout.categorical[t] {
            layout.walk(codes, 0, root)
        } else {
            leaf
        };
        raw += layout.values[leaf as usize];
    }
    raw
}

/// Lanes as plain arrays, stepped by [`Layout::step`]: the kernel for machines without
/// the vector instructions, and the definition the vector kernels are tested against.
pub(super) struct Portable;

// SAFETY: every read goes through bounds-checked indexing.
unsafe impl Lanes for Portable {
    const N: usize = 8;
    type V = [u32; 8];

    unsafe fn splat(x: u32) -> [u32; 8] {
        [x; 8]
    }

    unsafe fn load(x: &[u32]) -> [u32; 8] {
        x[..8].try_into().expect("eight lanes")
    }

    unsafe fn store(v: [u32; 8], out: &mut [u32]) {
        out[..8].copy_from_slice(&v);
    }

    #[inline(always)]
    unsafe fn step(layout: &Layout, codes: &[i32], bases: [u32; 8], nodes: [u32; 8]) -> [u32; 8] {
        std::array::from_fn(|l| layout.step(codes, bases[l] as usize, nodes[l]))
    }

    unsafe fn same(a: [u32; 8], b: [u32; 8]) -> bool {
        a == b
    }

    unsafe fn add_values(layout: &Layout, nodes: [u32; 8], acc: &mut [f64]) {
        for (acc, node) in acc.iter_mut().zip(nodes) {
            *acc += layout.values[node as usize];
        }
    }
}
