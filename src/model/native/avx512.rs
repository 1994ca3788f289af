//! The AVX-512 kernel: sixteen lanes of `i32` per vector, with mask registers for the
//! decisions and for packing walks apart; node words gathered eight at a time, row codes
//! sixteen.
//! The same operations as [`super::avx2`], one for one.

use std::arch::x86_64::*;

use super::kernel::Scratch;
use super::kernel::{self, Lanes};
use super::layout::{
    Layout, DELTA_SHIFT, FEATURE_MASK, LEFT_LEAF, NAN_CODE, NAN_FLIP, RIGHT_LEAF, ZERO_FLIP,
};

pub(super) struct Avx512;

// SAFETY: the methods are only reached through the entry points below, which require
// AVX-512F, and read only positions the `Lanes` contract keeps in range.
unsafe impl Lanes for Avx512 {
    const N: usize = 16;
    type V = __m512i;

    #[inline(always)]
    unsafe fn load(x: &[u32]) -> __m512i {
        debug_assert!(x.len() >= 16);
        _mm512_loadu_si512(x.as_ptr().cast())
    }

    #[inline(always)]
    unsafe fn and(x: __m512i, mask: u32) -> __m512i {
        _mm512_and_si512(x, _mm512_set1_epi32(mask as i32))
    }

    #[inline(always)]
    unsafe fn step<const FLIPS: bool>(
        layout: &Layout,
        codes: &[i32],
        bases: __m512i,
        nodes: __m512i,
    ) -> (__m512i, u32) {
        let words = layout.nodes.as_ptr().cast::<i64>();
        // Lanes 0–7 and 8–15 as [j, meta] pairs; j is every even i32 of the pair
        // (indices 16 and up select from the second vector), meta every odd one.
        let low = _mm512_i32gather_epi64::<8>(_mm512_castsi512_si256(nodes), words);
        let high = _mm512_i32gather_epi64::<8>(_mm512_extracti64x4_epi64::<1>(nodes), words);
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let j = _mm512_permutex2var_epi32(low, even, high);
        let meta = _mm512_permutex2var_epi32(low, odd, high);
        let column = _mm512_and_si512(meta, _mm512_set1_epi32(FEATURE_MASK as i32));
        let x = _mm512_i32gather_epi32::<4>(_mm512_add_epi32(bases, column), codes.as_ptr());
        let flag = |bit: u32| _mm512_test_epi32_mask(meta, _mm512_set1_epi32(bit as i32));
        let nan = _mm512_cmpeq_epi32_mask(x, _mm512_set1_epi32(NAN_CODE)) & flag(NAN_FLIP);
        let zero = _mm512_cmpeq_epi32_mask(x, _mm512_setzero_si512()) & flag(ZERO_FLIP);
        let right = if FLIPS {
            _mm512_cmpgt_epi32_mask(x, j) ^ (nan | zero)
        } else {
            _mm512_cmpgt_epi32_mask(x, j)
        };
        let leaf = (right & flag(RIGHT_LEAF)) | (!right & flag(LEFT_LEAF));
        let next = _mm512_add_epi32(nodes, _mm512_srli_epi32::<{ DELTA_SHIFT }>(meta));
        (
            _mm512_mask_add_epi32(next, right, next, _mm512_set1_epi32(1)),
            u32::from(leaf),
        )
    }

    #[inline(always)]
    unsafe fn compress(v: __m512i, keep: u32, out: &mut [u32]) {
        debug_assert!(out.len() >= 16);
        _mm512_storeu_si512(
            out.as_mut_ptr().cast(),
            _mm512_maskz_compress_epi32(keep as u16, v),
        )
    }
}

/// # Safety
/// The CPU must have AVX-512F and POPCNT.
#[target_feature(enable = "avx512f,popcnt")]
pub(super) unsafe fn score_rows(layout: &Layout, rows: &[f64], out: &mut [f64]) {
    kernel::score_rows::<Avx512>(layout, rows, out)
}

/// # Safety
/// The CPU must have AVX-512F and POPCNT.
#[target_feature(enable = "avx512f,popcnt")]
pub(super) unsafe fn score_one(layout: &Layout, row: &[f64], scratch: &mut Scratch) -> f64 {
    kernel::score_one::<Avx512>(layout, row, scratch)
}
