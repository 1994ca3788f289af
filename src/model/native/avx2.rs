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
/// Zen 3 the loads win (Model M: single rows 12–13 µs against 17–22 µs, batches 96–107k
/// rows/s against 64–103k, measured side by side), where gathers are microcoded; Intel's
/// gathers are cheaper. [`super::Kernel::best`] picks by vendor; both are tested.
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

    #[inline(always)]
    unsafe fn load(x: &[u32]) -> __m256i {
        debug_assert!(x.len() >= 8);
        _mm256_loadu_si256(x.as_ptr().cast())
    }

    #[inline(always)]
    unsafe fn and(x: __m256i, mask: u32) -> __m256i {
        _mm256_and_si256(x, _mm256_set1_epi32(mask as i32))
    }

    #[inline(always)]
    unsafe fn step<const FLIPS: bool>(
        layout: &Layout,
        codes: &[i32],
        bases: __m256i,
        nodes: __m256i,
    ) -> (__m256i, u32) {
        let words = layout.nodes.as_ptr().cast::<i64>();
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
        let j = _mm256_permute2x128_si256::<0x20>(low, high);
        let meta = _mm256_permute2x128_si256::<0x31>(low, high);
        let column = _mm256_and_si256(meta, _mm256_set1_epi32(FEATURE_MASK as i32));
        let x = if !GATHER {
            let mut at = [0u32; 8];
            _mm256_storeu_si256(at.as_mut_ptr().cast(), _mm256_add_epi32(bases, column));
            let c = |l: usize| *codes.as_ptr().add(at[l] as usize);
            _mm256_setr_epi32(c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7))
        } else {
            _mm256_i32gather_epi32::<4>(codes.as_ptr(), _mm256_add_epi32(bases, column))
        };
        let right = _mm256_cmpgt_epi32(x, j);
        // A flag bit is moved to the sign bit and spread over its lane.
        let flag = |shift| match shift {
            NAN_AT => _mm256_srai_epi32::<31>(_mm256_slli_epi32::<{ 31 - NAN_AT }>(meta)),
            ZERO_AT => _mm256_srai_epi32::<31>(_mm256_slli_epi32::<{ 31 - ZERO_AT }>(meta)),
            LEFT_AT => _mm256_srai_epi32::<31>(_mm256_slli_epi32::<{ 31 - LEFT_AT }>(meta)),
            _ => _mm256_srai_epi32::<31>(_mm256_slli_epi32::<{ 31 - RIGHT_AT }>(meta)),
        };
        let nan = _mm256_and_si256(
            _mm256_cmpeq_epi32(x, _mm256_set1_epi32(NAN_CODE)),
            flag(NAN_AT),
        );
        let zero = _mm256_and_si256(_mm256_cmpeq_epi32(x, _mm256_setzero_si256()), flag(ZERO_AT));
        let right = if FLIPS {
            _mm256_xor_si256(right, _mm256_or_si256(nan, zero))
        } else {
            right
        };
        let leaf = _mm256_blendv_epi8(flag(LEFT_AT), flag(RIGHT_AT), right);
        let delta = _mm256_srli_epi32::<{ DELTA_SHIFT as i32 }>(meta);
        // `right` is -1 where the row goes right: next = node + delta + 1 there.
        let next = _mm256_sub_epi32(_mm256_add_epi32(nodes, delta), right);
        (next, _mm256_movemask_ps(_mm256_castsi256_ps(leaf)) as u32)
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
const RIGHT_AT: i32 = RIGHT_LEAF.trailing_zeros() as i32;

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
