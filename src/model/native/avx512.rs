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
    type M = __mmask16;

    #[inline(always)]
    unsafe fn load(x: &[u32]) -> __m512i {
        debug_assert!(x.len() >= 16);
        _mm512_loadu_si512(x.as_ptr().cast())
    }

    #[inline(always)]
    unsafe fn load_codes(x: &[i32]) -> __m512i {
        debug_assert!(x.len() >= 16);
        _mm512_loadu_si512(x.as_ptr().cast())
    }

    #[inline(always)]
    unsafe fn splat(x: u32) -> __m512i {
        _mm512_set1_epi32(x as i32)
    }

    #[inline(always)]
    unsafe fn add(a: __m512i, b: __m512i) -> __m512i {
        _mm512_add_epi32(a, b)
    }

    #[inline(always)]
    unsafe fn and(x: __m512i, mask: u32) -> __m512i {
        _mm512_and_si512(x, _mm512_set1_epi32(mask as i32))
    }

    #[inline(always)]
    unsafe fn row(x: __m512i) -> __m512i {
        _mm512_srli_epi32::<{ 32 - kernel::BLOCK_BITS }>(x)
    }

    #[inline(always)]
    unsafe fn select(mask: __mmask16, a: __m512i, b: __m512i) -> __m512i {
        _mm512_mask_blend_epi32(mask, b, a)
    }

    #[inline(always)]
    unsafe fn permute(table: __m512i, index: __m512i) -> __m512i {
        _mm512_permutexvar_epi32(index, table)
    }

    #[inline(always)]
    unsafe fn path(path: __m512i, right: __mmask16) -> __m512i {
        let twice = _mm512_add_epi32(path, path);
        _mm512_mask_add_epi32(twice, right, twice, _mm512_set1_epi32(1))
    }

    #[inline(always)]
    unsafe fn words(words: &[u64], nodes: __m512i) -> (__m512i, __m512i) {
        let words = words.as_ptr().cast::<i64>();
        // Lanes 0–7 and 8–15 as [j, meta] pairs; j is every even i32 of the pair
        // (indices 16 and up select from the second vector), meta every odd one.
        let low = _mm512_i32gather_epi64::<8>(_mm512_castsi512_si256(nodes), words);
        let high = _mm512_i32gather_epi64::<8>(_mm512_extracti64x4_epi64::<1>(nodes), words);
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        (
            _mm512_permutex2var_epi32(low, even, high),
            _mm512_permutex2var_epi32(low, odd, high),
        )
    }

    #[inline(always)]
    unsafe fn codes<const SHIFT: i32>(codes: &[i32], bases: __m512i, meta: __m512i) -> __m512i {
        let column = _mm512_and_si512(meta, _mm512_set1_epi32(FEATURE_MASK as i32));
        // A shift by a constant (this one's immediate is a `u32`, the trait's an `i32`).
        let shifted = _mm512_sll_epi32(column, _mm_set_epi64x(0, i64::from(SHIFT)));
        let at = _mm512_add_epi32(bases, shifted);
        _mm512_i32gather_epi32::<4>(at, codes.as_ptr())
    }

    #[inline(always)]
    unsafe fn decide<const FLIPS: bool>(
        j: __m512i,
        meta: __m512i,
        x: __m512i,
    ) -> (__m512i, __mmask16, u32) {
        let flag = |bit: u32| _mm512_test_epi32_mask(meta, _mm512_set1_epi32(bit as i32));
        let right = if FLIPS {
            let nan = _mm512_cmpeq_epi32_mask(x, _mm512_set1_epi32(NAN_CODE)) & flag(NAN_FLIP);
            let zero = _mm512_cmpeq_epi32_mask(x, _mm512_setzero_si512()) & flag(ZERO_FLIP);
            _mm512_cmpgt_epi32_mask(x, j) ^ (nan | zero)
        } else {
            _mm512_cmpgt_epi32_mask(x, j)
        };
        let leaf = (right & flag(RIGHT_LEAF)) | (!right & flag(LEFT_LEAF));
        let delta = _mm512_srli_epi32::<{ DELTA_SHIFT }>(meta);
        (
            _mm512_mask_add_epi32(delta, right, delta, _mm512_set1_epi32(1)),
            right,
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
