//! A linear layer without bias, `y = x · wᵀ`, as one autograd node.
//!
//! In candle `x.reshape(..).matmul(&w.t())` and the reshape back are four nodes, and
//! candle's backward starts every node's gradient from zeros and adds to it: four extra
//! zero-fills and additions of activation-sized tensors per layer. Here the forward is one
//! matrix product and the backward one op computing `dx = dy · w` and `dw = dyᵀ · x`.

use crate::cpu::{matmul, slice, Element, Mat, Threads};
use crate::{check_same_dtype, flat_outputs, op_error};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use num_traits::{One, Zero};

const OP: &str = "linear";

/// `x · weightᵀ` for `x` `(..., in)` and `weight` `(out, in)`: `(..., out)`,
/// differentiable in both.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let input = x.dim(D::Minus1).map_err(|_| op_error(OP, "a scalar input".into()))?;
    let Ok((_, weight_in)) = weight.dims2() else {
        return Err(op_error(OP, format!("a 2-D weight expected, got {:?}", weight.dims())));
    };
    if input != weight_in {
        return Err(op_error(OP, format!("input {:?} for a weight {:?}", x.dims(), weight.dims())));
    }
    check_same_dtype(OP, &[x, weight])?;
    x.contiguous()?.apply_op2(&weight.contiguous()?, Linear)
}

struct Linear;

/// The sizes of one call: `rows` (the leading dimensions), `input`, `output`.
fn sizes(lx: &Layout, lw: &Layout) -> (usize, usize, usize) {
    let (output, input) = (lw.dims()[0], lw.dims()[1]);
    (lx.shape().elem_count() / input.max(1), input, output)
}

fn forward<T: Element>(x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout) -> Result<CpuStorage> {
    let (rows, input, output) = sizes(lx, lw);
    let (x, w) = (slice::<T>(OP, x, lx)?, slice::<T>(OP, w, lw)?);
    let (x, w) = (T::computed(x), T::computed(w));
    let mut y = vec![T::Acc::zero(); rows * output];
    let wt = Mat::rows(&w, 0, output, input, input).t();
    matmul(&mut y, 0, output, Mat::rows(&x, 0, rows, input, input), wt, false, T::Acc::one(), Threads::All);
    Ok(T::to_cpu_storage_owned(y.into_iter().map(T::store).collect()))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, w: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = crate::cpu::for_float!(OP, x.dtype(), forward(x, lx, w, lw))?;
        let mut dims = lx.dims().to_vec();
        *dims.last_mut().expect("checked: not a scalar") = lw.dims()[0];
        Ok((y, Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::linear_forward(x, lx, w, lw)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !w.track_op() {
            // A frozen weight: its gradient would be thrown away, so only `dx = dy · w`,
            // the forward's product with the transposed weight.
            let dx = dy.contiguous()?.apply_op2_no_bwd(&w.t()?.contiguous()?, &Linear)?;
            return Ok((Some(dx), None));
        }
        let grads = x.apply_op3_no_bwd(w, &dy.contiguous()?, &LinearBackward)?;
        let [dx, dw] = flat_outputs(&grads, [x.shape(), w.shape()])?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `dx = dy · w` and `dw = dyᵀ · x`, as one flat buffer.
struct LinearBackward;

fn backward<T: Element>(
    (x, lx): (&CpuStorage, &Layout),
    (w, lw): (&CpuStorage, &Layout),
    (dy, ldy): (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    let (rows, input, output) = sizes(lx, lw);
    let (x, w, dy) = (slice::<T>(OP, x, lx)?, slice::<T>(OP, w, lw)?, slice::<T>(OP, dy, ldy)?);
    let (x, w, dy) = (T::computed(x), T::computed(w), T::computed(dy));
    let mut grads = vec![T::Acc::zero(); rows * input + output * input];
    let (dx, dw) = grads.split_at_mut(rows * input);
    let dy = Mat::rows(&dy, 0, rows, output, output);
    matmul(dx, 0, input, dy, Mat::rows(&w, 0, output, input, input), false, T::Acc::one(), Threads::All);
    matmul(dw, 0, input, dy.t(), Mat::rows(&x, 0, rows, input, input), false, T::Acc::one(), Threads::All);
    Ok(T::to_cpu_storage_owned(grads.into_iter().map(T::store).collect()))
}

impl CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "fused-linear-backward"
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
        let grads = crate::cpu::for_float!(OP, x.dtype(), backward((x, lx), (w, lw), (dy, ldy)))?;
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
        crate::cuda::linear_backward(x, lx, w, lw, dy, ldy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, grads_of, randn};
    use candle_core::{DType, Var};

    #[test]
    fn forward_and_both_gradients_equal_a_matmul_with_the_transpose() -> Result<()> {
        for (lead, input, output) in [(vec![1], 1, 1), (vec![3], 5, 7), (vec![2, 9], 16, 33), (vec![4, 16], 128, 344)] {
            let mut shape = lead.clone();
            shape.push(input);
            let x = Var::from_tensor(&randn(1, &shape))?;
            let w = Var::from_tensor(&randn(2, &[output, input]))?;
            let mut out_shape = lead.clone();
            out_shape.push(output);
            let dy = randn(3, &out_shape);
            let ours = linear(&x, &w)?;
            let rows: usize = lead.iter().product();
            let theirs = x.reshape((rows, input))?.matmul(&w.t()?)?.reshape(out_shape.as_slice())?;
            let what = format!("{shape:?} x ({output}, {input})");
            assert_close(&ours, &theirs, 1e-6, &format!("{what} forward"))?;
            let (ours, theirs) = (grads_of(&ours, &dy, &[&x, &w])?, grads_of(&theirs, &dy, &[&x, &w])?);
            for (name, (a, b)) in ["dx", "dw"].iter().zip(ours.iter().zip(&theirs)) {
                assert_close(a, b, 1e-6, &format!("{what} {name}"))?;
            }
        }
        Ok(())
    }

    #[test]
    fn a_weight_that_tracks_no_gradient_gets_none_and_the_input_its_own() -> Result<()> {
        let x = Var::from_tensor(&randn(6, &[2, 5, 12]))?;
        let w = randn(7, &[9, 12]);
        let dy = randn(8, &[2, 5, 9]);
        let grads = (linear(&x, &w)? * &dy)?.sum_all()?.backward()?;
        assert!(grads.get(&w).is_none());
        let expected = dy.reshape((10, 9))?.matmul(&w)?.reshape((2, 5, 12))?;
        assert_close(grads.get(&x).expect("dx"), &expected, 1e-6, "dx with a frozen weight")
    }

    #[test]
    fn half_precision_stays_within_the_rounding_of_an_f32_reference() -> Result<()> {
        let (x, w) = (randn(4, &[6, 40]), randn(5, &[9, 40]));
        for (dtype, tolerance) in [(DType::BF16, 1.0 / 64.0), (DType::F16, 1.0 / 512.0)] {
            let ours = linear(&x.to_dtype(dtype)?, &w.to_dtype(dtype)?)?.to_dtype(DType::F32)?;
            let exact = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(DType::F32);
            let exact = exact(&x)?.matmul(&exact(&w)?.t()?)?;
            assert_close(&ours, &exact, tolerance, &format!("{dtype:?}"))?;
        }
        Ok(())
    }

    #[test]
    fn a_weight_of_another_width_is_refused_naming_the_shapes() {
        let error = linear(&randn(1, &[2, 8]), &randn(2, &[3, 7])).unwrap_err().to_string();
        assert!(error.contains("linear") && error.contains("[2, 8]") && error.contains("[3, 7]"), "{error}");
    }
}
