//! What the CPU kernels share: element types and the type they compute in, contiguous
//! slices out of candle's storages, bounds-checked matrix products, and the split of rows
//! over candle's thread pool.

use candle_core::{CpuStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};
use std::borrow::Cow;
use std::ops::AddAssign;

/// The type a kernel computes in: f32, or f64 for f64 tensors.
pub(crate) trait Accum: num_traits::Float + AddAssign + Default + Send + Sync + 'static {
    fn from_f64(value: f64) -> Self;
    /// `e^self`: for f32 a branch-free form that vectorizes (within 2 ulp), for f64 the
    /// library's.
    fn exp_fast(self) -> Self;
}

impl Accum for f32 {
    fn from_f64(value: f64) -> Self {
        value as f32
    }

    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
}

impl Accum for f64 {
    fn from_f64(value: f64) -> Self {
        value
    }

    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
}

/// `e^x` for f32 without branches or library calls, so that loops over it vectorize:
/// `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `e^r` by Cephes' degree-6 polynomial (within
/// 2 ulp), `2^n` through the exponent bits. Inputs are clamped to `[-86, 88.37]`, whose
/// results are normal numbers whatever the rounding (so `e^-inf` is 4.5e-38, not 0):
/// arithmetic on subnormal numbers is many times slower. NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so that `n · LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-86.0, 88.376_26);
    let rounded = x * LOG2E + ROUND;
    let n = rounded - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // `n` as an integer is the low bits of `rounded`: integer arithmetic on the bits
    // vectorizes, where a float-to-int cast (saturating, NaN to 0) runs lane by lane.
    let n_bits = rounded.to_bits().wrapping_sub(ROUND.to_bits());
    e_r * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// Lanes of the partial sums in [`sum_of`] and [`max_of`]: independent accumulators let
/// the loops vectorize (a float sum in one accumulator must add in order).
const LANES: usize = 16;

/// `Σ f(v)` over `values`, in [`LANES`] partial sums (it differs from a left-to-right sum
/// only by rounding).
#[inline(always)]
pub(crate) fn sum_of<A: Accum>(values: &[A], f: impl Fn(A) -> A) -> A {
    let mut partial = [A::zero(); LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (p, &v) in partial.iter_mut().zip(chunk) {
            *p += f(v);
        }
    }
    let mut sum = partial.iter().fold(A::zero(), |s, &p| s + p);
    for &v in rest {
        sum += f(v);
    }
    sum
}

/// The largest of `values` (−∞ for none), in [`LANES`] partial maxima.
#[inline(always)]
pub(crate) fn max_of<A: Accum>(values: &[A]) -> A {
    let larger = |m: A, v: A| if v > m { v } else { m };
    let mut partial = [A::neg_infinity(); LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (p, &v) in partial.iter_mut().zip(chunk) {
            *p = larger(*p, v);
        }
    }
    rest.iter().fold(partial.iter().fold(A::neg_infinity(), |m, &p| larger(m, p)), |m, &v| larger(m, v))
}

/// A tensor element type the kernels read and write: half types are computed in f32.
pub(crate) trait Element: WithDType {
    type Acc: Accum;
    fn load(self) -> Self::Acc;
    fn store(value: Self::Acc) -> Self;
    /// The values in the compute type: themselves for f32 and f64, a converted copy for
    /// the half types.
    fn computed(values: &[Self]) -> Cow<'_, [Self::Acc]> {
        Cow::Owned(values.iter().map(|&v| v.load()).collect())
    }
}

impl Element for f32 {
    type Acc = f32;
    fn load(self) -> f32 {
        self
    }
    fn store(value: f32) -> Self {
        value
    }
    fn computed(values: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(values)
    }
}

impl Element for f64 {
    type Acc = f64;
    fn load(self) -> f64 {
        self
    }
    fn store(value: f64) -> Self {
        value
    }
    fn computed(values: &[f64]) -> Cow<'_, [f64]> {
        Cow::Borrowed(values)
    }
}

impl Element for f16 {
    type Acc = f32;
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(value: f32) -> Self {
        f16::from_f32(value)
    }
}

impl Element for bf16 {
    type Acc = f32;
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

/// Calls `$f::<T>(args)` for the element type of `$dtype`, or fails naming the op.
macro_rules! for_float {
    ($op:expr, $dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F64 => $f::<f64>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            other => Err($crate::unsupported_dtype($op, other)),
        }
    };
}
pub(crate) use for_float;

/// The elements of a contiguous storage under its layout.
pub(crate) fn slice<'a, T: WithDType>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(crate::op_error(op, format!("needs contiguous inputs, got the layout {layout:?}")));
    };
    Ok(&T::cpu_storage_as_slice(storage)?[start..end])
}

/// Loads a slice into the compute type.
pub(crate) fn load<T: Element>(values: &[T]) -> Vec<T::Acc> {
    values.iter().map(|&v| v.load()).collect()
}

/// Rows handed to one task: enough work to pay for a task, never more tasks than rows.
pub(crate) fn rows_per_task(rows: usize, row_len: usize) -> usize {
    const ELEMENTS_PER_TASK: usize = 1 << 14;
    let threads = rayon::current_num_threads().max(1);
    let by_work = ELEMENTS_PER_TASK.div_ceil(row_len.max(1));
    by_work.max(rows.div_ceil(threads * 4)).max(1)
}

/// A matrix view into a slice: element `(i, j)` at `i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, A> {
    pub data: &'a [A],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, A> Mat<'a, A> {
    /// A row-major `rows × cols` matrix starting at `offset`, rows `row_stride` apart.
    pub fn rows(data: &'a [A], offset: usize, rows: usize, cols: usize, row_stride: usize) -> Self {
        Self { data: &data[offset.min(data.len())..], rows, cols, row_stride, col_stride: 1 }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// Whether every element it names lies inside its slice.
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// How a matrix product uses the threads: not at all (inside a parallel task), or all of
/// candle's.
#[derive(Clone, Copy)]
pub(crate) enum Threads {
    One,
    All,
}

/// `dst = scale · a · b` (or `dst += scale · a · b` with `accumulate`), `dst` a row-major
/// `a.rows × b.cols` matrix at `dst_offset` of `dst`, rows `dst_row_stride` apart. The
/// shapes and every index are checked before the product runs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<A: Accum>(
    dst: &mut [A],
    dst_offset: usize,
    dst_row_stride: usize,
    a: Mat<A>,
    b: Mat<A>,
    accumulate: bool,
    scale: A,
    threads: Threads,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "matmul: inner dimensions");
    assert!(a.fits() && b.fits(), "matmul: an operand outside its slice");
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst_offset + (m - 1) * dst_row_stride + n <= dst.len(), "matmul: the output outside its slice");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[dst_offset + i * dst_row_stride..][..n].fill(A::zero());
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every element gemm reads or writes inside the three
    // slices; `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(dst_offset),
            1,
            dst_row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            A::one(),
            scale,
            false,
            false,
            false,
            match threads {
                Threads::One => gemm::Parallelism::None,
                Threads::All => gemm::Parallelism::Rayon(rayon::current_num_threads()),
            },
        )
    }
}

/// The dtypes the CPU kernels take.
pub(crate) fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_exp_and_stays_normal() {
        let (mut worst, mut worst_at) = (0.0f64, 0.0);
        for i in -1_720_000..=1_767_000 {
            let x = i as f32 * 5e-5;
            let exact = (x as f64).exp();
            let error = ((exp_f32(x) as f64 - exact) / exact).abs();
            if error > worst {
                (worst, worst_at) = (error, x);
            }
        }
        // two units in the last place of an f32 in [1, 2)
        assert!(worst <= 2.0 * f32::EPSILON as f64, "largest relative error {worst:e}, at {worst_at}");
        for x in [f32::NEG_INFINITY, -1e30, -87.0, -100.0] {
            assert!(exp_f32(x).is_normal() && exp_f32(x) < 3e-37, "exp({x}) = {:e}", exp_f32(x));
        }
        for x in [f32::INFINITY, 1e30, 88.5] {
            assert!(exp_f32(x).is_finite() && exp_f32(x) > 2.4e38, "exp({x}) = {:e}", exp_f32(x));
        }
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
