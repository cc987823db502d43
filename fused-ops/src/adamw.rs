//! The AdamW update in place: the two moments, then the parameter, each one pass over
//! its elements with no temporaries (the composed update is a dozen tensor ops, each a
//! pass and an allocation), split into chunks over the threads of the caller's pool.
//!
//! The arithmetic is candle-nn's, operation for operation and in the same order (a
//! multiplication by a constant adds a zero, as candle's `affine` does: it turns a `-0`
//! into `+0`), so the result is the same to the bit.

use crate::adamw_step::AdamWStep;
use crate::cpu::slice;
use crate::op_error;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, WithDType};
use rayon::prelude::*;

const OP: &str = "adamw";

/// Elements one task updates: large enough that splitting costs nothing, small enough
/// that a shard keeps every thread of the rank's pool busy. Each element is computed the
/// same way whatever the split, so the result does not depend on it.
const CHUNK: usize = 1 << 15;

/// Updates `theta` and its moments `m` and `v` in place from the gradient `grad`: `m =
/// β₁m + (1 − β₁)g`, `v = β₂v + (1 − β₂)g²`, then `θ = θ(1 − lr·wd) − lr · m·scale_m /
/// (sqrt(v·scale_v) + eps)`. All four contiguous, of one shape and dtype (f32 or f64).
pub fn adamw_update(theta: &Tensor, m: &Tensor, v: &Tensor, grad: &Tensor, step: &AdamWStep) -> Result<()> {
    let tensors = [theta, m, v, grad];
    if tensors.iter().any(|t| t.dims() != theta.dims() || t.dtype() != theta.dtype() || !t.is_contiguous()) {
        let shapes: Vec<String> = tensors.iter().map(|t| format!("{:?} {:?}", t.dtype(), t.dims())).collect();
        return Err(op_error(
            OP,
            format!("four contiguous tensors of one shape and dtype expected: {}", shapes.join(", ")),
        ));
    }
    if !matches!(theta.dtype(), DType::F32 | DType::F64) {
        return Err(crate::unsupported_dtype(OP, theta.dtype()));
    }
    m.inplace_op2(grad, &Moment { beta: step.beta1, squared: false })?;
    v.inplace_op2(grad, &Moment { beta: step.beta2, squared: true })?;
    theta.inplace_op3(m, v, &Parameter(*step))
}

/// A moment's update from the gradient: `β·s + (1 − β)·g` (of `g²` when `squared`).
struct Moment {
    beta: f64,
    squared: bool,
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn moment<T: WithDType>(s: &mut [T], g: &[T], beta: f64, squared: bool) {
    let (beta, rest, zero) = (T::from_f64(beta), T::from_f64(1.0 - beta), T::from_f64(0.0));
    for (s, &g) in s.iter_mut().zip(g) {
        let g = if squared { g * g } else { g };
        *s = (*s * beta + zero) + (g * rest + zero);
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "fused-adamw-moment"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, ls: &Layout, g: &CpuStorage, lg: &Layout) -> Result<()> {
        let (start, end) = ls.contiguous_offsets().ok_or_else(|| op_error(OP, "a strided moment".into()))?;
        match s {
            CpuStorage::F32(values) => moments(&mut values[start..end], slice::<f32>(OP, g, lg)?, self),
            CpuStorage::F64(values) => moments(&mut values[start..end], slice::<f64>(OP, g, lg)?, self),
            other => return Err(crate::unsupported_dtype(OP, other.dtype())),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &mut candle_core::CudaStorage,
        ls: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<()> {
        crate::cuda::adamw_moment(s, ls, g, lg, self.beta, self.squared)
    }
}

/// [`moment`] over `s` in chunks on the pool's threads.
fn moments<T: WithDType>(s: &mut [T], g: &[T], op: &Moment) {
    s.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(s, g)| moment(s, g, op.beta, op.squared));
}

/// The parameter's update from the updated moments.
struct Parameter(AdamWStep);

/// [`parameter`] over `theta` in chunks on the pool's threads.
fn parameters<T: WithDType + num_traits::Float>(theta: &mut [T], m: &[T], v: &[T], step: &AdamWStep) {
    let chunks = theta.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK));
    chunks.for_each(|((theta, m), v)| parameter(theta, m, v, step));
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn parameter<T: WithDType + num_traits::Float>(theta: &mut [T], m: &[T], v: &[T], step: &AdamWStep) {
    let constant = T::from_f64;
    let (lr, eps, zero) = (constant(step.lr), constant(step.eps), constant(0.0));
    let (decay, scale_m, scale_v) =
        (constant(1.0 - step.lr * step.weight_decay), constant(step.scale_m), constant(step.scale_v));
    for ((theta, &m), &v) in theta.iter_mut().zip(m).zip(v) {
        let decayed = *theta * decay + zero;
        let adjusted = (m * scale_m + zero) / ((v * scale_v + zero).sqrt() + eps);
        *theta = decayed - (adjusted * lr + zero);
    }
}

impl InplaceOp3 for Parameter {
    fn name(&self) -> &'static str {
        "fused-adamw-parameter"
    }

    fn cpu_fwd(
        &self,
        theta: &mut CpuStorage,
        lt: &Layout,
        m: &CpuStorage,
        lm: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<()> {
        let (start, end) = lt.contiguous_offsets().ok_or_else(|| op_error(OP, "a strided parameter".into()))?;
        match theta {
            CpuStorage::F32(values) => {
                parameters(&mut values[start..end], slice::<f32>(OP, m, lm)?, slice::<f32>(OP, v, lv)?, &self.0)
            }
            CpuStorage::F64(values) => {
                parameters(&mut values[start..end], slice::<f64>(OP, m, lm)?, slice::<f64>(OP, v, lv)?, &self.0)
            }
            other => return Err(crate::unsupported_dtype(OP, other.dtype())),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        theta: &mut candle_core::CudaStorage,
        lt: &Layout,
        m: &candle_core::CudaStorage,
        lm: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<()> {
        crate::cuda::adamw_parameter(theta, lt, m, lm, v, lv, &self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::randn;
    use candle_core::Var;
    use candle_nn::{Optimizer, ParamsAdamW};

    #[test]
    fn three_steps_equal_candle_nns_adamw_to_the_bit() -> Result<()> {
        for dtype in [DType::F32, DType::F64] {
            let start = randn(1, &[5, 7]).to_dtype(dtype)?;
            let params = ParamsAdamW { lr: 0.01, beta1: 0.8, beta2: 0.95, eps: 1e-6, weight_decay: 0.1 };
            let theirs = Var::from_tensor(&start)?;
            let mut reference = candle_nn::AdamW::new(vec![theirs.clone()], params.clone())?;
            let ours = Var::from_tensor(&start)?;
            let (m, v) = (ours.zeros_like()?, ours.zeros_like()?);
            for t in 1..=3 {
                let grad = (randn(10 + t, &[5, 7]) * 0.5)?.to_dtype(dtype)?;
                let grads = (theirs.as_tensor() * &grad)?.sum_all()?.backward()?;
                reference.step(&grads)?;
                let step = AdamWStep {
                    lr: params.lr,
                    beta1: params.beta1,
                    beta2: params.beta2,
                    eps: params.eps,
                    weight_decay: params.weight_decay,
                    scale_m: 1.0 / (1.0 - params.beta1.powi(t as i32)),
                    scale_v: 1.0 / (1.0 - params.beta2.powi(t as i32)),
                };
                adamw_update(&ours, &m, &v, &grad, &step)?;
            }
            let bits = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>();
            assert_eq!(bits(&ours)?, bits(&theirs)?, "{dtype:?}");
        }
        Ok(())
    }

    #[test]
    fn a_shard_of_many_chunks_updates_as_one_pass_would() -> Result<()> {
        // Several chunks and a ragged last one, on a pool of 3 threads: each element as the
        // sequential loops compute it.
        let n = 3 * CHUNK + 17;
        let (theta, grad) = (randn(3, &[n]), randn(4, &[n]));
        let step = AdamWStep {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            scale_m: 10.0,
            scale_v: 100.0,
        };
        let (mut t, mut m, mut v) = (theta.to_vec1::<f32>()?, vec![0.1f32; n], vec![0.2f32; n]);
        let g = grad.to_vec1::<f32>()?;
        moment(&mut m, &g, step.beta1, false);
        moment(&mut v, &g, step.beta2, true);
        parameter(&mut t, &m, &v, &step);
        let ours = theta.copy()?;
        let (om, ov) =
            (Tensor::full(0.1f32, n, &candle_core::Device::Cpu)?, Tensor::full(0.2f32, n, &candle_core::Device::Cpu)?);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a pool");
        pool.install(|| adamw_update(&ours, &om, &ov, &grad, &step))?;
        assert_eq!(ours.to_vec1::<f32>()?, t);
        assert_eq!((om.to_vec1::<f32>()?, ov.to_vec1::<f32>()?), (m, v));
        Ok(())
    }

    #[test]
    fn tensors_of_other_shapes_are_refused() {
        let (a, b) = (randn(1, &[4]), randn(2, &[5]));
        let step =
            AdamWStep { lr: 1.0, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0, scale_m: 1.0, scale_v: 1.0 };
        let error = adamw_update(&a, &a, &a, &b, &step).unwrap_err().to_string();
        assert!(error.contains("adamw") && error.contains("[5]"), "{error}");
    }
}
