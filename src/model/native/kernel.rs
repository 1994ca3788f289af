//! The walks, written once over [`Lanes`]: vectors of (node, tag) pairs stepped through
//! the layout. Each instruction set implements the few operations a step needs
//! (`Portable` here, [`super::avx2`], [`super::avx512`]); the drivers are generic and
//! inlined into each instruction set's entry point, so every path runs one algorithm.
//!
//! **A frontier, not a lockstep.** All the walks still under way — one per row of a block
//! for one tree (`score_rows`), or one per tree for one row (`score_one`) — sit in a flat
//! list. A pass steps every entry of the list once, a vector at a time; an entry whose
//! step reached a leaf leaves the list for the finished list, the others are packed back
//! in place. The next pass walks the shorter list, until it is empty. So every vector
//! step does useful work in every lane (no lane waits at its leaf for the deepest walk of
//! its group), and the entries of one pass are independent, so the processor overlaps
//! their memory reads without help.
//!
//! A row's tree outputs are added in tree order, the order LightGBM adds them in, so the
//! sums are the same doubles; for ONNX models, in `f32` as ONNX Runtime adds them
//! ([`Sum`]). The arithmetic is a constant of each compiled walk, chosen once per call,
//! so the LightGBM walks add exactly as they would without the other.
//!
//! Trees with a categorical split are walked by the scalar step inside every kernel:
//! bitset lookups are rare in the models Nudge serves, and keeping them out of the vector
//! step keeps it short.

use super::ensemble::Sum;
use super::layout::Layout;

/// Rows per block: the codes of a block (here 256 rows of the model's columns) stay in
/// L2 while every tree passes over them; the frontier of one tree stays in L1.
const BLOCK: usize = 256;

/// A vector of `N` lanes of `u32`, and the operations a walk needs.
///
/// # Safety
/// `step` reads `layout.nodes` and `codes` without bounds checks. Callers pass node
/// positions of internal nodes reached from `layout.roots` (the layout keeps every child
/// of a node in range) and bases with `base + layout.stride() <= codes.len()` in every
/// lane, including lanes whose results are not used. `compress` writes `N` values. An
/// implementation may only be called where its instruction set is available.
pub(super) unsafe trait Lanes {
    const N: usize;
    type V: Copy;
    /// The first `N` values of `x`.
    unsafe fn load(x: &[u32]) -> Self::V;
    /// `x & mask` in every lane.
    unsafe fn and(x: Self::V, mask: u32) -> Self::V;
    /// One step from each lane's node: the next nodes, and a bit per lane (lane 0 in bit
    /// 0) set where the next node is a leaf. Without `FLIPS` the splits' NaN and zero
    /// rules may be left out, for layouts that have none.
    unsafe fn step<const FLIPS: bool>(
        layout: &Layout,
        codes: &[i32],
        bases: Self::V,
        nodes: Self::V,
    ) -> (Self::V, u32);
    /// Writes the lanes whose bit is set in `keep`, in lane order, to the start of
    /// `out[..N]`; what it writes after them is unspecified but is values of `v` or 0
    /// (position 0 is always a node: the first tree's root).
    unsafe fn compress(v: Self::V, keep: u32, out: &mut [u32]);
}

/// Walks every entry of `lists.nodes[..len]` / `lists.tags[..len]` to its leaf, writing
/// each finished walk's (leaf, tag) to `lists.leaves` / `lists.done`; returns how many
/// finished. `tag & base_mask` is the entry's offset into `codes`. Each pass reads one
/// pair of lists and writes the survivors to the other (in place, a vector store just
/// behind the next vector load would stall store forwarding).
#[inline(always)]
unsafe fn frontier<L: Lanes, const FLIPS: bool>(
    layout: &Layout,
    codes: &[i32],
    base_mask: u32,
    lists: &mut Lists,
    mut len: usize,
) -> usize {
    let all = (1u32 << L::N) - 1;
    let mut finished = 0;
    let Lists {
        nodes,
        tags,
        next_nodes,
        next_tags,
        leaves,
        done,
    } = lists;
    while len > 0 {
        let mut kept = 0;
        let mut at = 0;
        while at < len {
            let node = L::load(&nodes[at..]);
            let tag = L::load(&tags[at..]);
            let (next, leaf) = L::step::<FLIPS>(layout, codes, L::and(tag, base_mask), node);
            let valid = if len - at >= L::N {
                all
            } else {
                (1u32 << (len - at)) - 1
            };
            let leaf = leaf & valid;
            let going = !leaf & valid;
            L::compress(next, going, &mut next_nodes[kept..]);
            L::compress(tag, going, &mut next_tags[kept..]);
            kept += going.count_ones() as usize;
            // Unconditionally: whether a vector finished some walks is a coin toss, and
            // a mispredicted branch costs more than two stores.
            L::compress(next, leaf, &mut leaves[finished..]);
            L::compress(tag, leaf, &mut done[finished..]);
            finished += leaf.count_ones() as usize;
            at += L::N;
        }
        std::mem::swap(nodes, next_nodes);
        std::mem::swap(tags, next_tags);
        len = kept;
    }
    finished
}

/// Scratch lists for the frontier, with room for `entries` walks and a vector past them.
/// Every slot of `nodes` and `tags` (and their next-pass twins) always holds a node
/// position and a tag valid for the layout being walked, so that the lanes past the end
/// of a list read in range.
struct Lists {
    nodes: Vec<u32>,
    tags: Vec<u32>,
    next_nodes: Vec<u32>,
    next_tags: Vec<u32>,
    leaves: Vec<u32>,
    done: Vec<u32>,
}

impl Lists {
    fn new(entries: usize, pad: usize, fill: u32) -> Lists {
        let size = entries + pad;
        Lists {
            nodes: vec![fill; size],
            tags: vec![0; size],
            next_nodes: vec![fill; size],
            next_tags: vec![0; size],
            leaves: vec![fill; size],
            done: vec![0; size],
        }
    }
}

/// Raw scores for `out.len()` rows of `rows` (row-major, `layout.n_features` columns).
///
/// # Safety
/// `L`'s instruction set must be available.
#[inline(always)]
pub(super) unsafe fn score_rows<L: Lanes>(layout: &Layout, rows: &[f64], out: &mut [f64]) {
    match layout.sum {
        Sum::Double => score_rows_in::<L, false>(layout, rows, out),
        Sum::Float => score_rows_in::<L, true>(layout, rows, out),
    }
}

/// The arithmetic a walk compiled with `FLOAT` adds in.
#[inline(always)]
const fn arithmetic(float: bool) -> Sum {
    if float {
        Sum::Float
    } else {
        Sum::Double
    }
}

/// [`score_rows`] in one arithmetic.
#[inline(always)]
unsafe fn score_rows_in<L: Lanes, const FLOAT: bool>(
    layout: &Layout,
    rows: &[f64],
    out: &mut [f64],
) {
    let sum = arithmetic(FLOAT);
    let n = layout.n_features;
    let stride = layout.stride();
    // No larger than the request: a few rows must not pay for zeroing a whole block.
    let block = BLOCK.min(out.len());
    let mut codes = vec![0i32; block * stride];
    // Finished walks are added to `acc[tag]`, the tag being the row's offset in `codes`.
    let mut acc = vec![0.0f64; block * stride];
    let any_root = layout
        .vector_trees
        .first()
        .map_or(0, |&t| layout.roots[t as usize]);
    let mut lists = Lists::new(block, L::N, any_root);
    for (block_rows, block_out) in rows.chunks(block * n).zip(out.chunks_mut(block)) {
        let count = block_out.len();
        for (r, row) in block_rows.chunks_exact(n).enumerate() {
            layout.encode(row, &mut codes[r * stride..(r + 1) * stride]);
            acc[r * stride] = 0.0;
        }
        let mut vector = layout.vector_trees.iter().peekable();
        for (t, &root) in layout.roots.iter().enumerate() {
            if vector.next_if(|&&v| v as usize == t).is_some() {
                lists.nodes[..count].fill(root);
                for (r, tag) in lists.tags[..count].iter_mut().enumerate() {
                    *tag = (r * stride) as u32;
                }
                let finished = if layout.flips {
                    frontier::<L, true>(layout, &codes, u32::MAX, &mut lists, count)
                } else {
                    frontier::<L, false>(layout, &codes, u32::MAX, &mut lists, count)
                };
                for (&leaf, &tag) in lists.leaves[..finished].iter().zip(&lists.done) {
                    let acc = &mut acc[tag as usize];
                    *acc = sum.add(*acc, layout.values[leaf as usize]);
                }
            } else {
                // A constant tree, or one with a categorical split.
                for r in 0..count {
                    let value = layout.values[layout.walk(&codes, r * stride, root) as usize];
                    acc[r * stride] = sum.add(acc[r * stride], value);
                }
            }
        }
        for (r, out) in block_out.iter_mut().enumerate() {
            *out = acc[r * stride];
        }
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
    scratch: &mut Scratch,
) -> f64 {
    match layout.sum {
        Sum::Double => score_one_in::<L, false>(layout, row, scratch),
        Sum::Float => score_one_in::<L, true>(layout, row, scratch),
    }
}

/// [`score_one`] in one arithmetic.
#[inline(always)]
unsafe fn score_one_in<L: Lanes, const FLOAT: bool>(
    layout: &Layout,
    row: &[f64],
    scratch: &mut Scratch,
) -> f64 {
    let sum = arithmetic(FLOAT);
    let stride = layout.stride();
    let trees = layout.roots.len();
    let any_root = layout
        .vector_trees
        .first()
        .map_or(0, |&t| layout.roots[t as usize]);
    if scratch.lists.nodes.len() < trees + L::N {
        scratch.lists = Lists::new(trees, L::N, any_root);
    }
    scratch.codes.resize(stride, 0);
    scratch.leaves.resize(trees, 0);
    layout.encode(row, &mut scratch.codes);
    let lists = &mut scratch.lists;
    let walks = layout.vector_trees.len();
    for (i, &t) in layout.vector_trees.iter().enumerate() {
        lists.nodes[i] = layout.roots[t as usize];
        lists.tags[i] = t;
    }
    // The lists may hold positions in another model's layout (the scratch is per
    // thread): every slot a pass can read is written here first.
    lists.nodes[walks..walks + L::N].fill(any_root);
    lists.next_nodes[..walks + L::N].fill(any_root);
    // Every lane reads the one row: base 0.
    let finished = if layout.flips {
        frontier::<L, true>(layout, &scratch.codes, 0, lists, walks)
    } else {
        frontier::<L, false>(layout, &scratch.codes, 0, lists, walks)
    };
    let leaves = &mut scratch.leaves;
    for (&leaf, &tree) in lists.leaves[..finished].iter().zip(&lists.done) {
        leaves[tree as usize] = leaf;
    }
    let mut raw = 0.0;
    let mut vector = layout.vector_trees.iter().peekable();
    for (t, &root) in layout.roots.iter().enumerate() {
        let leaf = if vector.next_if(|&&v| v as usize == t).is_some() {
            leaves[t]
        } else {
            layout.walk(&scratch.codes, 0, root)
        };
        raw = sum.add(raw, layout.values[leaf as usize]);
    }
    raw
}

/// What single-row scoring reuses from call to call.
#[derive(Default)]
pub(super) struct Scratch {
    codes: Vec<i32>,
    leaves: Vec<u32>,
    lists: Lists,
}

impl Default for Lists {
    fn default() -> Lists {
        Lists::new(0, 0, 0)
    }
}

/// Lanes as plain arrays, stepped by [`Layout::step`]: the kernel for machines without
/// the vector instructions, and the definition the vector kernels are tested against.
pub(super) struct Portable;

// SAFETY: every read goes through bounds-checked indexing.
unsafe impl Lanes for Portable {
    const N: usize = 8;
    type V = [u32; 8];

    #[inline(always)]
    unsafe fn load(x: &[u32]) -> [u32; 8] {
        x[..8].try_into().expect("eight lanes")
    }

    #[inline(always)]
    unsafe fn and(x: [u32; 8], mask: u32) -> [u32; 8] {
        x.map(|x| x & mask)
    }

    #[inline(always)]
    unsafe fn step<const FLIPS: bool>(
        layout: &Layout,
        codes: &[i32],
        bases: [u32; 8],
        nodes: [u32; 8],
    ) -> ([u32; 8], u32) {
        let mut leaves = 0;
        let next = std::array::from_fn(|l| {
            let (next, leaf) = layout.step(codes, bases[l] as usize, nodes[l]);
            leaves |= (leaf as u32) << l;
            next
        });
        (next, leaves)
    }

    #[inline(always)]
    unsafe fn compress(v: [u32; 8], keep: u32, out: &mut [u32]) {
        let mut at = 0;
        for (l, &x) in v.iter().enumerate() {
            if keep & (1 << l) != 0 {
                out[at] = x;
                at += 1;
            }
        }
    }
}
