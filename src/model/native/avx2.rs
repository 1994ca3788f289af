//! The AVX2 kernel: eight lanes of `i32` per vector; node words and leaf values gathered
//! four at a time, row codes eight at a time.

use std::arch::x86_64::*;

use super::kernel::{self, Lanes};
use super::layout::{Layout, DELTA_SHIFT, FEATURE_MASK, NAN_CODE};

pub(super) struct Avx2;

// SAFETY: the methods are only reached through the entry points below, which require
// AVX2, and read only positions the `Lanes` contract keeps in range.
unsafe impl Lanes for Avx2 {
    const N: usize = 8;
    type V = __m256i;

    #[inline(always)]
    unsafe fn splat(x: u32) -> __m256i {
        _mm256_set1_epi32(x as i32)
    }

    #[inline(always)]
    unsafe fn load(x: &[u32]) -> __m256i {
        assert!(x.len() >= 8);
        _mm256_loadu_si256(x.as_ptr().cast())
    }

    #[inline(always)]
    unsafe fn store(v: __m256i, out: &mut [u32]) {
        assert!(out.len() >= 8);
        _mm256_storeu_si256(out.as_mut_ptr().cast(), v)
    }

    #[inline(always)]
    unsafe fn step(layout: &Layout, codes: &[i32], bases: __m256i, nodes: __m256i) -> __m256i {
        let words = layout.nodes.as_ptr().cast::<i64>();
        // Lanes 0–3 and 4–7 as [j, meta] pairs, then j and meta apart, in lane order.
        let low = _mm256_i32gather_epi64::<8>(words, _mm256_castsi256_si128(nodes));
        let high = _mm256_i32gather_epi64::<8>(words, _mm256_extracti128_si256::<1>(nodes));
        let apart = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        let low = _mm256_permutevar8x32_epi32(low, apart);
        let high = _mm256_permutevar8x32_epi32(high, apart);
        let j = _mm256_permute2x128_si256::<0x20>(low, high);
        let meta = _mm256_permute2x128_si256::<0x31>(low, high);
        let column = _mm256_and_si256(meta, _mm256_set1_epi32(FEATURE_MASK as i32));
        let x = _mm256_i32gather_epi32::<4>(codes.as_ptr(), _mm256_add_epi32(bases, column));
        let right = _mm256_cmpgt_epi32(x, j);
        // The flag bits moved to the sign bit and spread over the lane.
        let nan_flip = _mm256_srai_epi32::<31>(_mm256_slli_epi32::<16>(meta));
        let zero_flip = _mm256_srai_epi32::<31>(_mm256_slli_epi32::<15>(meta));
        let nan = _mm256_and_si256(_mm256_cmpeq_epi32(x, _mm256_set1_epi32(NAN_CODE)), nan_flip);
        let zero = _mm256_and_si256(_mm256_cmpeq_epi32(x, _mm256_setzero_si256()), zero_flip);
        let right = _mm256_xor_si256(right, _mm256_or_si256(nan, zero));
        let delta = _mm256_srli_epi32::<{ DELTA_SHIFT as i32 }>(meta);
        // `right` is -1 where the row goes right: next = node + delta + 1 there.
        _mm256_sub_epi32(_mm256_add_epi32(nodes, delta), right)
    }

    #[inline(always)]
    unsafe fn same(a: __m256i, b: __m256i) -> bool {
        _mm256_movemask_epi8(_mm256_cmpeq_epi32(a, b)) == -1
    }

    #[inline(always)]
    unsafe fn add_values(layout: &Layout, nodes: __m256i, acc: &mut [f64]) {
        assert!(acc.len() >= 8);
        let values = layout.values.as_ptr();
        let low = _mm256_i32gather_pd::<8>(values, _mm256_castsi256_si128(nodes));
        let high = _mm256_i32gather_pd::<8>(values, _mm256_extracti128_si256::<1>(nodes));
        let at = acc.as_mut_ptr();
        _mm256_storeu_pd(at, _mm256_add_pd(_mm256_loadu_pd(at), low));
        _mm256_storeu_pd(at.add(4), _mm256_add_pd(_mm256_loadu_pd(at.add(4)), high));
    }
}

/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn score_rows(layout: &Layout, rows: &[f64], out: &mut [f64]) {
    kernel::score_rows::<Avx2>(layout, rows, out)
}

/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn score_one(layout: &Layout, row: &[f64], leaves: &mut Vec<u32>) -> f64 {
    kernel::score_one::<Avx2>(layout, row, leaves)
}
