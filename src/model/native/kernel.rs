//! The walks, written once over [`Lanes`]: vectors of walks stepped through the layout.
//! Each instruction set implements the few operations a step needs (`Portable` here,
//! [`super::avx2`], [`super::avx512`]); the drivers are generic and inlined into each
//! instruction set's entry point, so every path runs one algorithm.
//!
//! **A frontier, not a lockstep.** All the walks still under way — one per row of a block
//! for one tree (`score_rows`), or one per tree for one row (`score_one`) — sit in a flat
//! list. A pass steps every entry of the list once, a vector at a time; an entry whose
//! step reached a leaf leaves the list for the finished list, the others are packed into
//! the next pass's list. The next pass walks the shorter list, until it is empty. So
//! every vector step does useful work in every lane (no lane waits at its leaf for the
//! deepest walk of its group), and the entries of one pass are independent, so the
//! processor overlaps their memory reads without help.
//!
//! **Many rows: the top of a tree without gathers.** A block's codes are column-major.
//! On a tree's first [`TOP`] levels a row can only be at one of a few nodes (1, 2, 4, 8),
//! the same for every row, so a vector of rows loads each candidate node's column of
//! codes contiguously and keeps its own, and takes its node's word from the candidates'
//! with a permutation by its path; the frontier starts below them, where each lane
//! gathers its node's word and its code. A many-row walk is one `u32`, its row beside
//! its position in the tree, so one list holds the walks. (Each level is the one
//! comparison of a row's own walk; nothing evaluates nodes a row does not reach.)
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
use super::layout::{decide, Layout, DELTA_SHIFT, FEATURE_MASK, LEAF, TREE_NODES};

/// Rows per block, as a power of two: the row of a many-row walk is the top
/// `BLOCK_BITS` bits of its `u32`, and its position in the tree the rest.
pub(super) const BLOCK_BITS: u32 = 32 - TREE_NODES.trailing_zeros();
/// Rows per block: the codes of a block (256 rows of the model's columns, 40 KiB for
/// model M's 40) stay in L2 while every tree passes over them; the frontier of one tree
/// stays in L1. (128 rows, whose codes fit in a 32 KiB L1, were slower on Zen 3: every
/// tree's set-up and last passes are paid per block; 512 and 1024 no faster.)
const BLOCK: usize = 1 << BLOCK_BITS;
/// A many-row walk's position in its tree.
const NODE_MASK: u32 = TREE_NODES as u32 - 1;

/// A vector of `N` lanes of `u32`, and the operations a walk needs.
///
/// # Safety
/// `words` and `codes` read without bounds checks. Callers pass node positions in range
/// of `words` in every lane, including lanes whose results are not used, and bases and
/// columns that keep `codes` in range (see each). `load` and `load_codes` read `N`
/// values and `compress` writes `N`. An implementation may only be called where its
/// instruction set is available.
pub(super) unsafe trait Lanes {
    const N: usize;
    type V: Copy;
    /// A mask with one flag per lane.
    type M: Copy;
    /// The first `N` values of `x`.
    unsafe fn load(x: &[u32]) -> Self::V;
    /// The first `N` codes of `x`.
    unsafe fn load_codes(x: &[i32]) -> Self::V;
    /// `x` in every lane.
    unsafe fn splat(x: u32) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `x & mask` in every lane.
    unsafe fn and(x: Self::V, mask: u32) -> Self::V;
    /// Each lane's top `BLOCK_BITS` bits: a many-row walk's row.
    unsafe fn row(x: Self::V) -> Self::V;
    /// `a` where the mask is set, else `b`.
    unsafe fn select(mask: Self::M, a: Self::V, b: Self::V) -> Self::V;
    /// `table[index]` in every lane (indices below `N`).
    unsafe fn permute(table: Self::V, index: Self::V) -> Self::V;
    /// `2 * path + 1` where the mask is set, else `2 * path`.
    unsafe fn path(path: Self::V, right: Self::M) -> Self::V;
    /// The words of each lane's node, `words[node]`, as their halves `(j, meta)`.
    unsafe fn words(words: &[u64], nodes: Self::V) -> (Self::V, Self::V);
    /// Each lane's code of its node's column: `codes[base + (column << SHIFT)]`.
    unsafe fn codes<const SHIFT: i32>(codes: &[i32], bases: Self::V, meta: Self::V) -> Self::V;
    /// A numerical node's decision for each lane's code `x` ([`super::layout::decide`]):
    /// how far the child is from the node (`delta`, plus one to the right), whether the
    /// row goes right, and a bit per lane (lane 0 in bit 0) set where the child is a leaf.
    /// Without `FLIPS` the splits' NaN and zero rules may be left out, for layouts that
    /// have none.
    unsafe fn decide<const FLIPS: bool>(
        j: Self::V,
        meta: Self::V,
        x: Self::V,
    ) -> (Self::V, Self::M, u32);
    /// Writes the lanes whose bit is set in `keep`, in lane order, to the start of
    /// `out[..N]`; what it writes after them is unspecified but is values of `v` or 0.
    unsafe fn compress(v: Self::V, keep: u32, out: &mut [u32]);
}

/// One step of every lane: the next node's distance from each lane's node, and a bit per
/// lane set where it is a leaf. A lane's codes are at `codes[base + (column << SHIFT)]`.
#[inline(always)]
unsafe fn step<L: Lanes, const FLIPS: bool, const SHIFT: i32>(
    words: &[u64],
    codes: &[i32],
    bases: L::V,
    nodes: L::V,
) -> (L::V, u32) {
    let (j, meta) = L::words(words, nodes);
    let x = L::codes::<SHIFT>(codes, bases, meta);
    let (inc, _, leaf) = L::decide::<FLIPS>(j, meta, x);
    (inc, leaf)
}

/// The lanes of a vector that hold entries of a list of `len` from `at` on.
#[inline(always)]
fn valid<L: Lanes>(len: usize, at: usize) -> u32 {
    if len - at >= L::N {
        (1u32 << L::N) - 1
    } else {
        (1u32 << (len - at)) - 1
    }
}

/// Levels from the root that every row of a block walks without gathers.
const TOP: usize = 4;
/// The nodes a walk can be at on the deepest of them.
const TOP_NODES: usize = 1 << (TOP - 1);

/// A tree's first [`TOP`] levels: on level `d`, the `2^d` nodes a walk can be at,
/// indexed by its path (its turns so far, the first in the highest bit; a walk that
/// reached a leaf stays there, on both of its paths): their words' halves, and where
/// their columns' codes start.
struct Top {
    j: [[u32; 16]; TOP],
    meta: [[u32; 16]; TOP],
    columns: [[usize; TOP_NODES]; TOP],
}

impl Top {
    fn new(words: &[u64]) -> Top {
        let mut top = Top {
            j: [[0; 16]; TOP],
            meta: [[0; 16]; TOP],
            columns: [[0; TOP_NODES]; TOP],
        };
        let mut level = [0usize; TOP_NODES];
        for d in 0..TOP {
            let mut next = [0usize; TOP_NODES];
            for (i, &node) in level[..1 << d].iter().enumerate() {
                let word = words[node];
                let meta = (word >> 32) as u32;
                top.j[d][i] = word as u32;
                top.meta[d][i] = meta;
                top.columns[d][i] = ((meta & FEATURE_MASK) as usize) << BLOCK_BITS;
                if d + 1 < TOP {
                    let left = if word == LEAF {
                        node
                    } else {
                        node + (meta >> DELTA_SHIFT) as usize
                    };
                    next[2 * i] = left;
                    next[2 * i + 1] = if word == LEAF { node } else { left + 1 };
                }
            }
            level = next;
        }
        top
    }
}

/// Walks every row of a block (`count` rows, codes column-major: column `c` of row `r`
/// at `codes[(c << BLOCK_BITS) + r]`) through the tree whose nodes start at `words[0]`,
/// leaving each row's walk at its leaf in `walks.finished[..count]`, in no order.
///
/// A walk is one `u32`: its row in the top `BLOCK_BITS` bits, its node's position in
/// the tree below them, so a step adds the distance to the child and one list holds the
/// walks. On the tree's first [`TOP`] levels a walk can only be at a few nodes, the same
/// for every row: a vector of rows takes each candidate's codes with one contiguous
/// load, keeps its own by the turns taken so far, and picks its node's word from the
/// candidates' by its path; no gathers. Each pass of the frontier then steps the walks
/// still under way ([`frontier`]).
#[inline(always)]
unsafe fn walk_tree<L: Lanes, const FLIPS: bool>(
    words: &[u64],
    codes: &[i32],
    walks: &mut Walks,
    count: usize,
) {
    let top = Top::new(words);
    let lanes = L::load(&LANE_ROWS);
    let Walks {
        walks: list,
        next,
        finished,
    } = walks;
    let (mut kept, mut done) = (0, 0);
    for at in (0..count).step_by(L::N) {
        let x = L::load_codes(&codes[top.columns[0][0] + at..]);
        let (j, meta) = (L::splat(top.j[0][0]), L::splat(top.meta[0][0]));
        let (mut inc, right, mut leaf) = L::decide::<FLIPS>(j, meta, x);
        let mut path = L::path(L::splat(0), right);
        // `turns[d]`: where each lane went right on level d.
        let mut turns = [right; TOP];
        for d in 1..TOP {
            let mut x = [L::splat(0); TOP_NODES];
            for (x, &column) in x.iter_mut().zip(&top.columns[d][..1 << d]) {
                *x = L::load_codes(&codes[column + at..]);
            }
            // Candidates that differ in the last turn first, then the one before.
            for s in 0..d {
                for i in 0..1 << (d - s - 1) {
                    x[i] = L::select(turns[d - 1 - s], x[2 * i + 1], x[2 * i]);
                }
            }
            let j = L::permute(L::load(&top.j[d]), path);
            let meta = L::permute(L::load(&top.meta[d]), path);
            let (step, right, step_leaf) = L::decide::<FLIPS>(j, meta, x[0]);
            inc = L::add(inc, step);
            leaf = step_leaf;
            turns[d] = right;
            path = L::path(path, right);
        }
        let walk = L::add(
            L::add(lanes, L::splat((at as u32) << (32 - BLOCK_BITS))),
            inc,
        );
        let valid = valid::<L>(count, at);
        let (leaf, going) = (leaf & valid, !leaf & valid);
        L::compress(walk, going, &mut list[kept..]);
        kept += going.count_ones() as usize;
        L::compress(walk, leaf, &mut finished[done..]);
        done += leaf.count_ones() as usize;
    }
    frontier::<L, FLIPS>(words, codes, list, next, finished, kept, done);
}

/// Each lane's row, in a walk's top bits: the first `N` are a vector of rows from 0.
static LANE_ROWS: [u32; 16] = {
    let mut rows = [0; 16];
    let mut lane = 0;
    while lane < 16 {
        rows[lane] = (lane as u32) << (32 - BLOCK_BITS);
        lane += 1;
    }
    rows
};

/// Steps every walk of `list[..len]` to its leaf, adding each finished walk to
/// `finished` after the `done` there already. Each pass reads one list and writes the
/// walks still under way to the other (in place, a vector store just behind the next
/// vector load would stall store forwarding), then a vector of root walks past them, so
/// that the lanes past the end of the next pass read in range.
#[inline(always)]
unsafe fn frontier<'a, L: Lanes, const FLIPS: bool>(
    words: &[u64],
    codes: &[i32],
    mut list: &'a mut [u32],
    mut next: &'a mut [u32],
    finished: &mut [u32],
    mut len: usize,
    mut done: usize,
) {
    list[len..len + L::N].fill(0);
    while len > 0 {
        let mut kept = 0;
        let mut at = 0;
        while at < len {
            let walk = L::load(&list[at..]);
            let (inc, leaf) = step::<L, FLIPS, { BLOCK_BITS as i32 }>(
                words,
                codes,
                L::row(walk),
                L::and(walk, NODE_MASK),
            );
            let walk = L::add(walk, inc);
            let valid = valid::<L>(len, at);
            let (leaf, going) = (leaf & valid, !leaf & valid);
            L::compress(walk, going, &mut next[kept..]);
            kept += going.count_ones() as usize;
            // Unconditionally: whether a vector finished some walks is a coin toss, and
            // a mispredicted branch costs more than a store.
            L::compress(walk, leaf, &mut finished[done..]);
            done += leaf.count_ones() as usize;
            at += L::N;
        }
        next[kept..kept + L::N].fill(0);
        std::mem::swap(&mut list, &mut next);
        len = kept;
    }
}

/// The many-row walk's lists, with room for a block and a vector past it.
struct Walks {
    walks: Vec<u32>,
    next: Vec<u32>,
    finished: Vec<u32>,
}

impl Walks {
    fn new(entries: usize, pad: usize) -> Walks {
        let size = entries + pad;
        Walks {
            walks: vec![0; size],
            next: vec![0; size],
            finished: vec![0; size],
        }
    }
}

/// Walks every tree for one row, each lane a tree: `lists.nodes[..len]` are the walks'
/// nodes (positions in `layout.nodes`) and `lists.tags[..len]` their trees. Writes each
/// finished walk's (leaf, tree) to `lists.leaves` / `lists.done`; returns how many
/// finished. Each pass reads one pair of lists and writes the survivors to the other.
#[inline(always)]
unsafe fn frontier_one<L: Lanes, const FLIPS: bool>(
    layout: &Layout,
    codes: &[i32],
    lists: &mut Lists,
    mut len: usize,
) -> usize {
    let mut finished = 0;
    let Lists {
        nodes,
        tags,
        next_nodes,
        next_tags,
        leaves,
        done,
    } = lists;
    // Every lane reads the one row.
    let base = L::splat(0);
    while len > 0 {
        let mut kept = 0;
        let mut at = 0;
        while at < len {
            let node = L::load(&nodes[at..]);
            let tag = L::load(&tags[at..]);
            let (inc, leaf) = step::<L, FLIPS, 0>(&layout.nodes, codes, base, node);
            let next = L::add(node, inc);
            let valid = valid::<L>(len, at);
            let leaf = leaf & valid;
            let going = !leaf & valid;
            L::compress(next, going, &mut next_nodes[kept..]);
            L::compress(tag, going, &mut next_tags[kept..]);
            kept += going.count_ones() as usize;
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

/// Scratch lists for the single-row frontier, with room for `entries` walks and a vector
/// past them. Every slot of `nodes` and `tags` (and their next-pass twins) always holds
/// a node position and a tag valid for the layout being walked, so that the lanes past
/// the end of a list read in range.
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
    // Column-major, a column's codes `BLOCK` apart (and a vector past the last, which
    // the top levels' contiguous loads may read): a tree's first levels read the codes
    // of a column for consecutive rows.
    let mut codes = vec![0i32; layout.stride() * BLOCK + L::N];
    // No larger than the request: a few rows must not pay for a whole block.
    let block = BLOCK.min(out.len());
    let mut acc = vec![0.0f64; block];
    let mut walks = Walks::new(block, L::N);
    for (block_rows, block_out) in rows.chunks(block * n).zip(out.chunks_mut(block)) {
        let count = block_out.len();
        layout.encode_columns(block_rows, BLOCK, &mut codes);
        acc[..count].fill(0.0);
        let mut vector = layout.vector_trees.iter().peekable();
        for (t, &root) in layout.roots.iter().enumerate() {
            if vector.next_if(|&&v| v as usize == t).is_some() {
                let words = &layout.nodes[root as usize..];
                if layout.flips {
                    walk_tree::<L, true>(words, &codes, &mut walks, count);
                } else {
                    walk_tree::<L, false>(words, &codes, &mut walks, count);
                }
                for &walk in &walks.finished[..count] {
                    let leaf = root as usize + (walk & NODE_MASK) as usize;
                    let acc = &mut acc[(walk >> (32 - BLOCK_BITS)) as usize];
                    *acc = sum.add(*acc, layout.values[leaf]);
                }
            } else {
                // A constant tree, or one with a categorical split.
                for (r, acc) in acc[..count].iter_mut().enumerate() {
                    let value = layout.values[layout.walk(&codes, r, BLOCK, root) as usize];
                    *acc = sum.add(*acc, value);
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
    let finished = if layout.flips {
        frontier_one::<L, true>(layout, &scratch.codes, lists, walks)
    } else {
        frontier_one::<L, false>(layout, &scratch.codes, lists, walks)
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
            layout.walk(&scratch.codes, 0, 1, root)
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

/// Lanes as plain arrays, decided by [`super::layout::decide`]: the kernel for machines
/// without the vector instructions, and the definition the vector kernels are tested
/// against.
pub(super) struct Portable;

// SAFETY: every read goes through bounds-checked indexing.
unsafe impl Lanes for Portable {
    const N: usize = 8;
    type V = [u32; 8];
    type M = [bool; 8];

    #[inline(always)]
    unsafe fn load(x: &[u32]) -> [u32; 8] {
        x[..8].try_into().expect("eight lanes")
    }

    #[inline(always)]
    unsafe fn load_codes(x: &[i32]) -> [u32; 8] {
        std::array::from_fn(|l| x[l] as u32)
    }

    #[inline(always)]
    unsafe fn splat(x: u32) -> [u32; 8] {
        [x; 8]
    }

    #[inline(always)]
    unsafe fn add(a: [u32; 8], b: [u32; 8]) -> [u32; 8] {
        std::array::from_fn(|l| a[l].wrapping_add(b[l]))
    }

    #[inline(always)]
    unsafe fn and(x: [u32; 8], mask: u32) -> [u32; 8] {
        x.map(|x| x & mask)
    }

    #[inline(always)]
    unsafe fn row(x: [u32; 8]) -> [u32; 8] {
        x.map(|x| x >> (32 - BLOCK_BITS))
    }

    #[inline(always)]
    unsafe fn select(mask: [bool; 8], a: [u32; 8], b: [u32; 8]) -> [u32; 8] {
        std::array::from_fn(|l| if mask[l] { a[l] } else { b[l] })
    }

    #[inline(always)]
    unsafe fn permute(table: [u32; 8], index: [u32; 8]) -> [u32; 8] {
        index.map(|i| table[i as usize])
    }

    #[inline(always)]
    unsafe fn path(path: [u32; 8], right: [bool; 8]) -> [u32; 8] {
        std::array::from_fn(|l| 2 * path[l] + right[l] as u32)
    }

    #[inline(always)]
    unsafe fn words(words: &[u64], nodes: [u32; 8]) -> ([u32; 8], [u32; 8]) {
        let word = nodes.map(|n| words[n as usize]);
        (word.map(|w| w as u32), word.map(|w| (w >> 32) as u32))
    }

    #[inline(always)]
    unsafe fn codes<const SHIFT: i32>(codes: &[i32], bases: [u32; 8], meta: [u32; 8]) -> [u32; 8] {
        std::array::from_fn(|l| {
            codes[bases[l] as usize + (((meta[l] & FEATURE_MASK) as usize) << SHIFT)] as u32
        })
    }

    #[inline(always)]
    unsafe fn decide<const FLIPS: bool>(
        j: [u32; 8],
        meta: [u32; 8],
        x: [u32; 8],
    ) -> ([u32; 8], [bool; 8], u32) {
        let mut leaves = 0;
        let mut right = [false; 8];
        let inc = std::array::from_fn(|l| {
            let word = u64::from(j[l]) | (u64::from(meta[l]) << 32);
            let (r, leaf) = decide(word, x[l] as i32);
            leaves |= (leaf as u32) << l;
            right[l] = r;
            (meta[l] >> DELTA_SHIFT) + r as u32
        });
        (inc, right, leaves)
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
