//! SwiGLU, `h = silu(gate) · up`, elementwise: one pass forward, one pass for both
//! gradients. With `σ = sigmoid(gate)`: `d_up = dh · gate · σ` and
//! `d_gate = dh · up · σ · (1 + gate · (1 − σ))`.

use crate::cpu::{for_float, slice, Accum, Element};
use crate::{check_same_dtype, flat_outputs, op_error};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::One;
use rayon::prelude::*;

const OP: &str = "swiglu";
/// Elements per task: enough work to pay for a task.
const CHUNK: usize = 1 << 14;

/// `silu(gate) · up` for two tensors of one shape, differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        return Err(op_error(OP, format!("gate {:?} and up {:?} differ in shape", gate.dims(), up.dims())));
    }
    check_same_dtype(OP, &[gate, up])?;
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

#[inline(always)]
fn sigmoid<A: Accum>(x: A) -> A {
    (A::one() + (-x).exp_fast()).recip()
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn forward_chunk<T: Element>(h: &mut [T], g: &[T], u: &[T]) {
    for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
        let g = g.load();
        *h = T::store(g * sigmoid(g) * u.load());
    }
}

fn forward<T: Element>(g: &CpuStorage, lg: &Layout, u: &CpuStorage, lu: &Layout) -> Result<CpuStorage> {
    let (g, u) = (slice::<T>(OP, g, lg)?, slice::<T>(OP, u, lu)?);
    let mut h = vec![T::zero(); g.len()];
    h.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(h, (g, u))| forward_chunk(h, g, u));
    Ok(T::to_cpu_storage_owned(h))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, g: &CpuStorage, lg: &Layout, u: &CpuStorage, lu: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((for_float!(OP, g.dtype(), forward(g, lg, u, lu))?, lg.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        lg: &Layout,
        u: &candle_core::CudaStorage,
        lu: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::swiglu_forward(g, lg, u, lu)
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _h: &Tensor, dh: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grads = g.apply_op3_no_bwd(u, &dh.contiguous()?, &SwiGluBackward)?;
        let [dg, du] = flat_outputs(&grads, [g.shape(), u.shape()])?;
        Ok((Some(dg), Some(du)))
    }
}

/// Both gradients in one pass, as one flat buffer: `d_gate` then `d_up`.
struct SwiGluBackward;

#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn backward_chunk<T: Element>(dg: &mut [T], du: &mut [T], g: &[T], u: &[T], dh: &[T]) {
    let one = T::Acc::one();
    for i in 0..g.len() {
        let (g, u, dh) = (g[i].load(), u[i].load(), dh[i].load());
        let s = sigmoid(g);
        du[i] = T::store(dh * g * s);
        dg[i] = T::store(dh * u * s * (one + g * (one - s)));
    }
}

fn backward<T: Element>(
    (g, lg): (&CpuStorage, &Layout),
    (u, lu): (&CpuStorage, &Layout),
    (dh, ldh): (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    let (g, u, dh) = (slice::<T>(OP, g, lg)?, slice::<T>(OP, u, lu)?, slice::<T>(OP, dh, ldh)?);
    let mut grads = vec![T::zero(); 2 * g.len()];
    let (dg, du) = grads.split_at_mut(g.len());
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dh.par_chunks(CHUNK)))
        .for_each(|((dg, du), ((g, u), dh))| backward_chunk(dg, du, g, u, dh));
    Ok(T::to_cpu_storage_owned(grads))
}

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "fused-swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
        dh: &CpuStorage,
        ldh: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let grads = for_float!(OP, g.dtype(), backward((g, lg), (u, lu), (dh, ldh)))?;
        Ok((grads, Shape::from(2 * lg.shape().elem_count())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        lg: &Layout,
        u: &candle_core::CudaStorage,
        lu: &Layout,
        dh: &candle_core::CudaStorage,
        ldh: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::swiglu_backward(g, lg, u, lu, dh, ldh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, grads_of, randn};
    use candle_core::{DType, Var};

    #[test]
    fn forward_and_both_gradients_equal_the_composed_reference() -> Result<()> {
        for shape in [vec![1], vec![3, 7], vec![2, 5, 344], vec![40_001]] {
            let g = Var::from_tensor(&(randn(1, &shape) * 3.0)?)?;
            let u = Var::from_tensor(&randn(2, &shape))?;
            let dh = randn(3, &shape);
            let ours = swiglu(&g, &u)?;
            let theirs = (g.as_tensor().silu()? * u.as_tensor())?;
            assert_close(&ours, &theirs, 1e-6, &format!("{shape:?} forward"))?;
            let (ours, theirs) = (grads_of(&ours, &dh, &[&g, &u])?, grads_of(&theirs, &dh, &[&g, &u])?);
            for (name, (a, b)) in ["d_gate", "d_up"].iter().zip(ours.iter().zip(&theirs)) {
                assert_close(a, b, 1e-5, &format!("{shape:?} {name}"))?;
            }
        }
        Ok(())
    }

    #[test]
    fn half_precision_stays_within_the_rounding_of_an_f32_reference() -> Result<()> {
        for (dtype, tolerance) in [(DType::BF16, 1.0 / 128.0), (DType::F16, 1.0 / 1024.0)] {
            let (g, u) = (randn(4, &[9, 31]), randn(5, &[9, 31]));
            let ours = swiglu(&g.to_dtype(dtype)?, &u.to_dtype(dtype)?)?.to_dtype(DType::F32)?;
            let exact =
                (g.to_dtype(dtype)?.to_dtype(DType::F32)?.silu()? * u.to_dtype(dtype)?.to_dtype(DType::F32)?)?;
            assert_close(&ours, &exact, tolerance, &format!("{dtype:?}"))?;
        }
        Ok(())
    }

    #[test]
    fn inputs_of_two_shapes_are_refused_naming_the_op_and_shapes() {
        let error = swiglu(&randn(1, &[2, 3]), &randn(2, &[3, 2])).unwrap_err().to_string();
        assert!(error.contains("swiglu") && error.contains("[2, 3]") && error.contains("[3, 2]"), "{error}");
    }
}
