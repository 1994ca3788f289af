//! The AVX2 kernel: eight lanes of `i32` per vector; node words gathered four at a time,
//! row codes eight at a time; finished and unfinished walks packed apart through a table
//! of permutations.

use std::arch::x86_64::*;

use super::kernel::Scratch;
use super::kernel::{self, Lanes};
use super::layout::{
    Layout, DELTA_SHIFT, FEATURE_MASK, LEFT_LEAF, NAN_CODE, NAN_FLIP, RIGHT_LEAF, ZERO_FLIP,
};

/// `GATHER` chooses how lanes read memory: the AVX2 gather instructions, or one scalar
/// load per lane assembled into a vector. Which is faster depends on the CPU: on AMD's
/// Zen 3 the loads win (model M: single rows 12–13 µs against 17–22 µs; batches 181k
/// rows/s against 170k in one run of `scripts/bench.sh`), where gathers are microcoded;
/// Intel's gathers are cheaper. [`super::Kernel::best`] picks by vendor; both are tested.
pub(super) struct Avx2<const GATHER: bool>;

/// For each 8-bit mask, the lanes whose bit is set, in order: the permutation that packs
/// them to the front.
static PACK: [[u32; 8]; 256] = {
    let mut table = [[0u32; 8]; 256];
    let mut mask = 0;
    while mask < 256 {
        let mut at = 0;
        let mut lane = 0;
        while lane < 8 {
            if mask & (1 << lane) != 0 {
                table[mask][at] = lane as u32;
                at += 1;
            }
            lane += 1;
        }
        mask += 1;
    }
    table
};

// SAFETY: the methods are only reached through the entry points below, which require
// AVX2, and read only positions the `Lanes` contract keeps in range.
unsafe impl<const GATHER: bool> Lanes for Avx2<GATHER> {
    const N: usize = 8;
    type V = __m256i;
    type M = __m256i;

    #[inline(always)]
    unsafe fn load(x: &[u32]) -> __m256i {
        debug_assert!(x.len() >= 8);
        _mm256_loadu_si256(x.as_ptr().cast())
    }

    #[inline(always)]
    unsafe fn load_codes(x: &[i32]) -> __m256i {
        debug_assert!(x.len() >= 8);
        _mm256_loadu_si256(x.as_ptr().cast())
    }

    #[inline(always)]
    unsafe fn splat(x: u32) -> __m256i {
        _mm256_set1_epi32(x as i32)
    }

    #[inline(always)]
    unsafe fn add(a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(a, b)
    }

    #[inline(always)]
    unsafe fn and(x: __m256i, mask: u32) -> __m256i {
        _mm256_and_si256(x, _mm256_set1_epi32(mask as i32))
    }

    #[inline(always)]
    unsafe fn row(x: __m256i) -> __m256i {
        _mm256_srli_epi32::<ROW_SHIFT>(x)
    }

    #[inline(always)]
    unsafe fn select(mask: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_blendv_epi8(b, a, mask)
    }

    #[inline(always)]
    unsafe fn permute(table: __m256i, index: __m256i) -> __m256i {
        _mm256_permutevar8x32_epi32(table, index)
    }

    #[inline(always)]
    unsafe fn path(path: __m256i, right: __m256i) -> __m256i {
        // `right` is -1 where the row went right.
        _mm256_sub_epi32(_mm256_add_epi32(path, path), right)
    }

    #[inline(always)]
    unsafe fn words(words: &[u64], nodes: __m256i) -> (__m256i, __m256i) {
        let words = words.as_ptr().cast::<i64>();
        // Lanes 0–3 and 4–7 as [j, meta] pairs, then j and meta apart, in lane order.
        let (low, high) = if !GATHER {
            let mut at = [0u32; 8];
            _mm256_storeu_si256(at.as_mut_ptr().cast(), nodes);
            let w = |l: usize| *words.add(at[l] as usize);
            (
                _mm256_setr_epi64x(w(0), w(1), w(2), w(3)),
                _mm256_setr_epi64x(w(4), w(5), w(6), w(7)),
            )
        } else {
            (
                _mm256_i32gather_epi64::<8>(words, _mm256_castsi256_si128(nodes)),
                _mm256_i32gather_epi64::<8>(words, _mm256_extracti128_si256::<1>(nodes)),
            )
        };
        let apart = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        let low = _mm256_permutevar8x32_epi32(low, apart);
        let high = _mm256_permutevar8x32_epi32(high, apart);
        (
            _mm256_permute2x128_si256::<0x20>(low, high),
            _mm256_permute2x128_si256::<0x31>(low, high),
        )
    }

    #[inline(always)]
    unsafe fn codes<const SHIFT: i32>(codes: &[i32], bases: __m256i, meta: __m256i) -> __m256i {
        let column = _mm256_and_si256(meta, _mm256_set1_epi32(FEATURE_MASK as i32));
        let at = _mm256_add_epi32(bases, _mm256_slli_epi32::<SHIFT>(column));
        if !GATHER {
            let mut to = [0u32; 8];
            _mm256_storeu_si256(to.as_mut_ptr().cast(), at);
            let c = |l: usize| *codes.as_ptr().add(to[l] as usize);
            _mm256_setr_epi32(c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7))
        } else {
            _mm256_i32gather_epi32::<4>(codes.as_ptr(), at)
        }
    }

    #[inline(always)]
    unsafe fn decide<const FLIPS: bool>(
        j: __m256i,
        meta: __m256i,
        x: __m256i,
    ) -> (__m256i, __m256i, u32) {
        let right = _mm256_cmpgt_epi32(x, j);
        let right = if FLIPS {
            // A flag bit is moved to the sign bit and spread over its lane.
            let nan = _mm256_srai_epi32::<31>(_mm256_slli_epi32::<{ 31 - NAN_AT }>(meta));
            let zero = _mm256_srai_epi32::<31>(_mm256_slli_epi32::<{ 31 - ZERO_AT }>(meta));
            let nan = _mm256_and_si256(_mm256_cmpeq_epi32(x, _mm256_set1_epi32(NAN_CODE)), nan);
            let zero = _mm256_and_si256(_mm256_cmpeq_epi32(x, _mm256_setzero_si256()), zero);
            _mm256_xor_si256(right, _mm256_or_si256(nan, zero))
        } else {
            right
        };
        // The child's leaf flag moved to the sign bit: the left one's by `31 - LEFT_AT`,
        // the right one's by one less (`right` is -1 there).
        let flag = _mm256_sllv_epi32(
            meta,
            _mm256_add_epi32(_mm256_set1_epi32(31 - LEFT_AT), right),
        );
        let delta = _mm256_srli_epi32::<{ DELTA_SHIFT as i32 }>(meta);
        // `right` is -1 where the row goes right: delta + 1 there.
        (
            _mm256_sub_epi32(delta, right),
            right,
            _mm256_movemask_ps(_mm256_castsi256_ps(flag)) as u32,
        )
    }

    #[inline(always)]
    unsafe fn compress(v: __m256i, keep: u32, out: &mut [u32]) {
        debug_assert!(out.len() >= 8);
        let order = _mm256_loadu_si256(PACK[(keep & 0xff) as usize].as_ptr().cast());
        _mm256_storeu_si256(
            out.as_mut_ptr().cast(),
            _mm256_permutevar8x32_epi32(v, order),
        )
    }
}

/// The bit positions of the flags (see [`super::layout`]).
const NAN_AT: i32 = NAN_FLIP.trailing_zeros() as i32;
const ZERO_AT: i32 = ZERO_FLIP.trailing_zeros() as i32;
const LEFT_AT: i32 = LEFT_LEAF.trailing_zeros() as i32;
const _: () = assert!(RIGHT_LEAF == LEFT_LEAF << 1);
/// A many-row walk's row is its top bits.
const ROW_SHIFT: i32 = 32 - kernel::BLOCK_BITS as i32;

/// # Safety
/// The CPU must have AVX2 and POPCNT.
#[target_feature(enable = "avx2,popcnt")]
pub(super) unsafe fn score_rows<const GATHER: bool>(
    layout: &Layout,
    rows: &[f64],
    out: &mut [f64],
) {
    kernel::score_rows::<Avx2<GATHER>>(layout, rows, out)
}

/// # Safety
/// The CPU must have AVX2 and POPCNT.
#[target_feature(enable = "avx2,popcnt")]
pub(super) unsafe fn score_one<const GATHER: bool>(
    layout: &Layout,
    row: &[f64],
    scratch: &mut Scratch,
) -> f64 {
    kernel::score_one::<Avx2<GATHER>>(layout, row, scratch)
}
