//! RMSNorm, `y = x / sqrt(mean(x²) + eps) · w` over the last dimension: one pass forward,
//! and one pass backward for both the input's and the weight's gradient.
//!
//! With `r = (mean(x²) + eps)^(-1/2)` and `g = dy · w` per row of `n` elements:
//! `dx = r · g − x · r³ · mean(g · x)` and `dw = Σ_rows dy · x · r`.

use crate::cpu::{for_float, rows_per_task, slice, sum_of, Accum, Element};
use crate::{check_same_dtype, flat_outputs, op_error};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use num_traits::Zero;
use rayon::prelude::*;

const OP: &str = "rms_norm";

/// RMSNorm of `x` (any shape, normalised over its last dimension) with `weight` (the last
/// dimension's size), differentiable in both. Computed in f32 for f16 and bf16 inputs.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let hidden = x.dim(D::Minus1)?;
    if weight.dims() != [hidden] {
        return Err(op_error(OP, format!("weight {:?} for an input {:?}", weight.dims(), x.dims())));
    }
    check_same_dtype(OP, &[x, weight])?;
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f64,
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
#[inline(always)]
fn inverse_rms<A: Accum>(row: &[A], eps: A) -> A {
    let mean_square = sum_of(row, |v| v * v) / A::from_f64(row.len() as f64);
    (mean_square + eps).sqrt().recip()
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn forward_rows<T: Element>(y: &mut [T], x: &[T], w: &[T::Acc], eps: T::Acc) {
    let n = w.len();
    let mut row = vec![T::Acc::zero(); n];
    for (y, x) in y.chunks_mut(n).zip(x.chunks(n)) {
        row.iter_mut().zip(x).for_each(|(r, &v)| *r = v.load());
        let r = inverse_rms(&row, eps);
        for ((y, &v), &w) in y.iter_mut().zip(&row).zip(w) {
            *y = T::store(v * r * w);
        }
    }
}

fn forward<T: Element>(x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout, eps: f64) -> Result<CpuStorage> {
    let (x, w) = (slice::<T>(OP, x, lx)?, slice::<T>(OP, w, lw)?);
    let n = w.len();
    let w: Vec<T::Acc> = crate::cpu::load(w);
    let eps = T::Acc::from_f64(eps);
    let mut y = vec![T::zero(); x.len()];
    let chunk = rows_per_task(x.len() / n.max(1), n) * n;
    y.par_chunks_mut(chunk.max(1)).zip(x.par_chunks(chunk.max(1))).for_each(|(y, x)| forward_rows(y, x, &w, eps));
    Ok(T::to_cpu_storage_owned(y))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = for_float!(OP, x.dtype(), forward(x, lx, w, lw, self.eps))?;
        Ok((y, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rms_norm_forward(x, lx, w, lw, self.eps)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grads = x.apply_op3_no_bwd(w, &dy.contiguous()?, &RmsNormBackward { eps: self.eps })?;
        let [dx, dw] = flat_outputs(&grads, [x.shape(), w.shape()])?;
        Ok((Some(dx), Some(dw)))
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
/// `dx` of some rows, and their share of `dw`.
fn backward_rows<T: Element>(dx: &mut [T], x: &[T], dy: &[T], w: &[T::Acc], eps: T::Acc) -> Vec<T::Acc> {
    let n = w.len();
    let mut dw = vec![T::Acc::zero(); n];
    let (mut row, mut g) = (vec![T::Acc::zero(); n], vec![T::Acc::zero(); n]);
    for ((dx, x), dy) in dx.chunks_mut(n).zip(x.chunks(n)).zip(dy.chunks(n)) {
        row.iter_mut().zip(x).for_each(|(r, &v)| *r = v.load());
        let r = inverse_rms(&row, eps);
        for ((g, &dy), &w) in g.iter_mut().zip(dy).zip(w) {
            *g = dy.load() * w;
        }
        g.iter_mut().zip(&row).for_each(|(g, &v)| *g = *g * v);
        let gx = sum_of(&g, |v| v);
        for ((g, &dy), &w) in g.iter_mut().zip(dy).zip(w) {
            *g = dy.load() * w;
        }
        let correction = gx / T::Acc::from_f64(n as f64) * r * r * r;
        for i in 0..n {
            dx[i] = T::store(r * g[i] - row[i] * correction);
            dw[i] += dy[i].load() * row[i] * r;
        }
    }
    dw
}

/// Both gradients in one pass, as one flat buffer: `dx` (the input's elements) then `dw`.
struct RmsNormBackward {
    eps: f64,
}

fn backward<T: Element>(
    (x, lx): (&CpuStorage, &Layout),
    (w, lw): (&CpuStorage, &Layout),
    (dy, ldy): (&CpuStorage, &Layout),
    eps: f64,
) -> Result<CpuStorage> {
    let (x, w, dy) = (slice::<T>(OP, x, lx)?, slice::<T>(OP, w, lw)?, slice::<T>(OP, dy, ldy)?);
    let n = w.len();
    let w: Vec<T::Acc> = crate::cpu::load(w);
    let eps = T::Acc::from_f64(eps);
    let mut dx = vec![T::zero(); x.len()];
    let chunk = (rows_per_task(x.len() / n.max(1), n) * n).max(1);
    // Each task sums its rows' share of dw; the shares are added after.
    let shares: Vec<Vec<T::Acc>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dx, (x, dy))| backward_rows(dx, x, dy, &w, eps))
        .collect();
    let mut out: Vec<T> = dx;
    out.extend((0..n).map(|i| T::store(shares.iter().fold(T::Acc::zero(), |sum, share| sum + share[i]))));
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "fused-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        dy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let grads = for_float!(OP, x.dtype(), backward((x, lx), (w, lw), (dy, ldy), self.eps))?;
        Ok((grads, Shape::from(lx.shape().elem_count() + lw.shape().elem_count())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
        dy: &candle_core::CudaStorage,
        ldy: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rms_norm_backward(x, lx, w, lw, dy, ldy, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, grads_of, randn};
    use candle_core::{DType, Device, Var};

    /// The composed reference: the same function from candle's differentiable primitives.
    fn reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&r)?.broadcast_mul(w)
    }

    #[test]
    fn forward_and_both_gradients_equal_the_composed_reference() -> Result<()> {
        for shape in [vec![1, 1], vec![3, 7], vec![2, 5, 33], vec![1, 64], vec![17, 128]] {
            let n = *shape.last().unwrap();
            let x = Var::from_tensor(&randn(1, &shape))?;
            let w = Var::from_tensor(&(randn(2, &[n]) + 1.0)?)?;
            let dy = randn(3, &shape);
            let ours = rms_norm(&x, &w, 1e-5)?;
            let theirs = reference(&x, &w, 1e-5)?;
            assert_close(&ours, &theirs, 1e-5, &format!("{shape:?} forward"))?;
            let (ours, theirs) = (grads_of(&ours, &dy, &[&x, &w])?, grads_of(&theirs, &dy, &[&x, &w])?);
            for (name, (a, b)) in ["dx", "dw"].iter().zip(ours.iter().zip(&theirs)) {
                assert_close(a, b, 1e-5, &format!("{shape:?} {name}"))?;
            }
        }
        Ok(())
    }

    #[test]
    fn half_precision_stays_within_the_rounding_of_an_f32_reference() -> Result<()> {
        for dtype in [DType::BF16, DType::F16] {
            let x = randn(4, &[6, 40]).to_dtype(dtype)?;
            let w = (randn(5, &[40]) + 1.0)?.to_dtype(dtype)?;
            let ours = rms_norm(&x, &w, 1e-6)?.to_dtype(DType::F32)?;
            let exact = reference(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, 1e-6)?;
            // One rounding of the output in the half type.
            let tolerance = if dtype == DType::BF16 { 1.0 / 128.0 } else { 1.0 / 1024.0 };
            assert_close(&ours, &exact, tolerance, &format!("{dtype:?}"))?;
        }
        Ok(())
    }

    #[test]
    fn a_weight_of_another_size_is_refused_naming_the_op_and_shapes() {
        let error = rms_norm(&randn(1, &[2, 8]), &randn(2, &[7]), 1e-5).unwrap_err().to_string();
        assert!(error.contains("rms_norm") && error.contains("[7]") && error.contains("[2, 8]"), "{error}");
        let ints = Tensor::zeros((2, 8), DType::U32, &Device::Cpu).unwrap();
        let error = rms_norm(&ints, &Tensor::zeros(8, DType::U32, &Device::Cpu).unwrap(), 1e-5).unwrap_err();
        assert!(error.to_string().contains("rms_norm") && error.to_string().contains("U32"), "{error}");
    }
}
