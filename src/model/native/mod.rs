//! Nudge's own tree scorer: LightGBM models (and ONNX tree ensembles) compiled at load
//! into a compact layout and walked with SIMD, giving LightGBM's scores to the bit.
//!
//! - [`ensemble`]: the trees in one normalised form, whichever file they came from, with
//!   a one-node-at-a-time reference walk.
//! - [`lightgbm`]: the LightGBM text format → ensemble.
//! - [`onnx`]: an ONNX binary tree classifier → ensemble, with ONNX Runtime's semantics.
//! - [`layout`]: ensemble → flat arrays (integer-coded rows, one `u64` per node); its
//!   module documentation describes the layout.
//! - `kernel`: the walks, written once over a lane type, and the portable lanes;
//!   `avx2` and `avx512`: the same walks with those instructions, chosen at run time
//!   ([`Kernel::best`]).
//!
//! Loading compiles nothing and generates no code: model M of the benchmark (500 trees of
//! 63 leaves) loads in a few milliseconds.
//!
//! Every kernel adds a row's tree outputs in tree order, as LightGBM does, so a raw
//! score is the same double LightGBM computes; the model loader checks that on sample
//! rows against LightGBM itself before a native model serves
//! ([`crate::model::lightgbm`]). An ONNX model's sums are kept in `f32` in the same
//! order, as ONNX Runtime keeps them, and checked against ONNX Runtime
//! ([`crate::model::onnx`]).

pub mod ensemble;
pub mod layout;
pub mod lightgbm;
pub mod onnx;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod kernel;

use std::cell::RefCell;

use ensemble::{Ensemble, Input, Output};
use layout::Layout;

/// An instruction set the walks can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    /// AVX2 decisions, lanes loaded one by one.
    Avx2,
    /// AVX2 decisions and gathers.
    Avx2Gather,
    Avx512,
}

impl Kernel {
    /// Every kernel this CPU can run.
    pub fn available() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            // Every CPU with AVX2 has POPCNT; the kernels count lanes with it.
            let popcnt = std::arch::is_x86_feature_detected!("popcnt");
            if popcnt && std::arch::is_x86_feature_detected!("avx2") {
                kernels.push(Kernel::Avx2);
                kernels.push(Kernel::Avx2Gather);
            }
            if popcnt && std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(Kernel::Avx512);
            }
        }
        kernels
    }

    /// The fastest kernel this CPU can run: AVX-512, else AVX2 — with gathers on Intel,
    /// whose gather instructions are fast, and with lanes loaded one by one elsewhere
    /// (on AMD's Zen 3 the gathers are microcoded and slower than the loads).
    pub fn best() -> Kernel {
        let available = Kernel::available();
        if available.contains(&Kernel::Avx512) {
            Kernel::Avx512
        } else if available.contains(&Kernel::Avx2) && intel() {
            Kernel::Avx2Gather
        } else if available.contains(&Kernel::Avx2) {
            Kernel::Avx2
        } else {
            Kernel::Portable
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx2Gather => "avx2-gather",
            Kernel::Avx512 => "avx512",
        }
    }

    pub fn is_available(self) -> bool {
        Kernel::available().contains(&self)
    }
}

/// Whether the CPU is Intel's (CPUID vendor "GenuineIntel").
fn intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0);
        let vendor = [id.ebx, id.edx, id.ecx];
        vendor == [0x756e_6547, 0x4965_6e69, 0x6c65_746e]
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A compiled tree ensemble.
#[derive(Debug, Clone)]
pub struct Forest {
    layout: Layout,
    average_over: Option<u32>,
    output: Output,
    kernel: Kernel,
}

/// Below this many rows, [`Forest::predict_raw`] walks them one at a time. The many-row
/// walk pays about 100 µs per call on model M whatever the rows (each tree's last
/// passes hold a few walks, each waiting for the one before); on Zen 3, 16 rows cost
/// 164 µs one at a time against 184 µs together, 32 rows 464 µs against 312 µs.
const FEW_ROWS: usize = 20;

thread_local! {
    /// Single-row scoring's lists, reused from call to call.
    static SCRATCH: RefCell<kernel::Scratch> = RefCell::new(kernel::Scratch::default());
}

impl Forest {
    /// Compiles a LightGBM text model; `Err` names what the native scorer does not serve.
    pub fn from_lightgbm(text: &str) -> Result<Forest, String> {
        Forest::compile(&lightgbm::parse(text)?)
    }

    /// Compiles an ONNX model's tree ensemble; `Err` names what the native scorer does
    /// not serve.
    pub fn from_onnx(bytes: &[u8]) -> Result<Forest, String> {
        Forest::compile(&onnx::parse(bytes)?)
    }

    /// Compiles an ensemble, to run on the best kernel this CPU has.
    pub fn compile(ensemble: &Ensemble) -> Result<Forest, String> {
        Ok(Forest {
            layout: Layout::build(ensemble)?,
            average_over: ensemble.average_over,
            output: ensemble.output,
            kernel: Kernel::best(),
        })
    }

    /// The same forest on another kernel; `None` if this CPU cannot run it.
    pub fn with_kernel(mut self, kernel: Kernel) -> Option<Forest> {
        kernel.is_available().then(|| {
            self.kernel = kernel;
            self
        })
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Input columns per row.
    pub fn n_features(&self) -> usize {
        self.layout.n_features
    }

    pub fn n_trees(&self) -> usize {
        self.layout.roots.len()
    }

    pub fn n_nodes(&self) -> usize {
        self.layout.nodes.len()
    }

    /// Bytes of the compiled layout.
    pub fn bytes(&self) -> usize {
        self.layout.bytes()
    }

    /// The sum of the trees for each row of `rows` (row-major, `n_features()` columns;
    /// NaN is missing).
    pub fn predict_raw(&self, rows: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.row_count(rows)];
        self.raw_into(rows, &mut out);
        out
    }

    /// The model's answer (the probability, for binary models) for each row.
    pub fn predict(&self, rows: &[f64]) -> Vec<f64> {
        let mut out = self.predict_raw(rows);
        for p in &mut out {
            *p = self.finish(*p);
        }
        out
    }

    /// The raw sum of one row through the single-row walk (each lane a tree), which
    /// [`Forest::predict_raw`] uses for one row; public so that tests hold both walks to
    /// the same answers.
    pub fn predict_raw_one(&self, row: &[f64]) -> f64 {
        assert_eq!(
            row.len(),
            self.n_features(),
            "one row of n_features() values"
        );
        SCRATCH.with_borrow_mut(|scratch| match self.kernel {
            // SAFETY: `with_kernel` and `Kernel::best` only choose kernels the CPU runs.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { avx512::score_one(&self.layout, row, scratch) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::score_one::<false>(&self.layout, row, scratch) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Gather => unsafe { avx2::score_one::<true>(&self.layout, row, scratch) },
            // SAFETY: the portable lanes check every index.
            _ => unsafe { kernel::score_one::<kernel::Portable>(&self.layout, row, scratch) },
        })
    }

    /// The raw sums of rows through the many-row walk (each lane a row), which
    /// [`Forest::predict_raw`] uses for more than one row.
    pub fn predict_raw_many(&self, rows: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.row_count(rows)];
        match self.kernel {
            // SAFETY: `with_kernel` and `Kernel::best` only choose kernels the CPU runs.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { avx512::score_rows(&self.layout, rows, &mut out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::score_rows::<false>(&self.layout, rows, &mut out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Gather => unsafe { avx2::score_rows::<true>(&self.layout, rows, &mut out) },
            // SAFETY: the portable lanes check every index.
            _ => unsafe { kernel::score_rows::<kernel::Portable>(&self.layout, rows, &mut out) },
        }
        out
    }

    fn raw_into(&self, rows: &[f64], out: &mut [f64]) {
        // A few rows walk one at a time, each lane a tree: the many-row walk fills a
        // vector's lanes with rows and needs a few vectors' worth to pay for its set-up.
        if out.len() < FEW_ROWS {
            for (out, row) in out.iter_mut().zip(rows.chunks_exact(self.n_features())) {
                *out = self.predict_raw_one(row);
            }
        } else {
            out.copy_from_slice(&self.predict_raw_many(rows));
        }
    }

    fn row_count(&self, rows: &[f64]) -> usize {
        let n = self.n_features();
        assert!(
            rows.len().is_multiple_of(n),
            "{} values are not rows of {n} columns",
            rows.len()
        );
        rows.len() / n
    }

    /// The raw sum after averaging and the output transform.
    pub fn finish(&self, raw: f64) -> f64 {
        let raw = match self.average_over {
            Some(n) => raw / f64::from(n),
            None => raw,
        };
        self.output.apply(raw)
    }

    /// `count` rows (row-major) made to test a scorer against this model: every value
    /// that decides a split — each threshold, the doubles just above and below it (and
    /// the floats, for rows read as `f32`) — and
    /// the values with rules of their own (NaN, ±0, ±inf, subnormals, LightGBM's zero
    /// band and its edges, categories in and out of every bitset), spread over the rows
    /// so that each column takes each of its values (there are more than `count` rows
    /// when a column has more values); the first two rows are all-missing and all-zero.
    pub fn probe_rows(&self, count: usize) -> Vec<f64> {
        let n = self.n_features();
        let specials = [
            f64::NAN,
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::from_bits(1),
            -f64::from_bits(1),
            1e-310,
            ensemble::LIGHTGBM_ZERO,
            -ensemble::LIGHTGBM_ZERO,
            ensemble::LIGHTGBM_ZERO.next_up(),
            (-ensemble::LIGHTGBM_ZERO).next_down(),
            1e-36,
            -1e-40,
            1.0,
            -1.0,
        ];
        let float32 = self.layout.input == Input::Float32;
        let mut specials = specials.to_vec();
        if float32 {
            // Rows rounded to f32 have rules of their own at its edges: the largest f32,
            // a double that rounds up to infinity, f32's smallest subnormal and normal.
            let tiny = f64::from(f32::from_bits(1));
            let max = f64::from(f32::MAX);
            specials.extend([max, -max, 3.5e38, -3.5e38, tiny, -tiny]);
            specials.push(f64::from(f32::MIN_POSITIVE));
        }
        let mut candidates: Vec<Vec<f64>> = vec![specials; n];
        for column in &self.layout.columns {
            let values = &mut candidates[column.source];
            match &column.encoding {
                layout::Encoding::Numeric { thresholds, .. } => {
                    for &t in thresholds {
                        values.extend([t, t.next_up(), t.next_down()]);
                        if float32 {
                            // A double beside a threshold reads as the threshold itself
                            // once rounded; the f32 values beside it are what differ.
                            let t = t as f32;
                            values.extend([f64::from(t.next_up()), f64::from(t.next_down())]);
                        }
                    }
                }
                layout::Encoding::Categorical => {
                    let bits = self.layout.words.len() as f64 * 32.0;
                    values.extend([2.5, -0.5, 0.999, -3.0, 1e10, 3e9, bits, bits + 1.0]);
                    values.extend((0..64).map(f64::from));
                }
            }
        }
        let longest = candidates.iter().map(Vec::len).max().unwrap_or(0);
        let count = count.max(longest + 2);
        let mut rows = Vec::with_capacity(count * n);
        for r in 0..count {
            for (c, values) in candidates.iter().enumerate() {
                rows.push(match r {
                    0 => f64::NAN,
                    1 => 0.0,
                    // Each column walks through all of its values, from a start of its
                    // own, so that rows combine values of different columns differently.
                    _ => values[(r - 2 + c * 37) % values.len()],
                });
            }
        }
        rows
    }

    /// Path attributions for one row: each column's credit for the raw score, then the
    /// bias; `None` when the model file recorded no internal values.
    pub fn contributions(&self, row: &[f64]) -> Option<Vec<f64>> {
        (row.len() == self.n_features())
            .then(|| self.layout.contributions(row))
            .flatten()
    }
}

#[cfg(test)]
mod tests;
