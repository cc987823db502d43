//! Rotary position embeddings in the "rotate half" convention (Hugging Face Llama): for
//! `x` of `(batch, seq, heads, head_dim)` (the layout a projection produces, and
//! FlashAttention's) and tables `cos`, `sin` of `(seq, head_dim / 2)`, the halves `x₁, x₂`
//! of each head become `x₁·cos − x₂·sin` and `x₂·cos + x₁·sin`.
//!
//! The rotation is orthogonal, so its backward is the rotation by the opposite angle: the
//! same kernel with `sin` negated. The tables are whatever the caller computed (Llama 3's
//! scaled frequencies included); they are constants and get no gradient.

use crate::cpu::{for_float, slice, Element};
use crate::{check_same_dtype, op_error};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const OP: &str = "rope";

/// `x` `(batch, seq, heads, head_dim)` rotated by the angles whose cosines and sines
/// `cos` and `sin` `(seq, head_dim / 2)` hold, differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, seq, _, head_dim) =
        x.dims4().map_err(|_| op_error(OP, format!("x must be (batch, seq, heads, head_dim), got {:?}", x.dims())))?;
    let table = [seq, head_dim / 2];
    if head_dim % 2 != 0 || cos.dims() != table || sin.dims() != table {
        return Err(op_error(
            OP,
            format!(
                "x {:?} needs cos and sin of {table:?} (an even head_dim), got {:?} and {:?}",
                x.dims(),
                cos.dims(),
                sin.dims()
            ),
        ));
    }
    check_same_dtype(OP, &[x, cos, sin])?;
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { inverse: false })
}

/// The rotation, or with `inverse` its inverse (the backward).
struct Rope {
    inverse: bool,
}

fn rotate<T: Element>(
    (x, lx): (&CpuStorage, &Layout),
    (cos, lc): (&CpuStorage, &Layout),
    (sin, ls): (&CpuStorage, &Layout),
    inverse: bool,
) -> Result<CpuStorage> {
    let (x, cos, sin) = (slice::<T>(OP, x, lx)?, slice::<T>(OP, cos, lc)?, slice::<T>(OP, sin, ls)?);
    let dims = lx.dims();
    let (seq, heads, head_dim) = (dims[1], dims[2], dims[3]);
    let half = head_dim / 2;
    let mut y = vec![T::zero(); x.len()];
    // One task per (batch, position): `heads` rows of `head_dim`, one angle table row.
    let row = heads * head_dim;
    y.par_chunks_mut(row.max(1)).zip(x.par_chunks(row.max(1))).enumerate().for_each(|(bt, (y, x))| {
        let t = bt % seq;
        let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
        rotate_rows(y, x, c, s, head_dim, inverse);
    });
    Ok(T::to_cpu_storage_owned(y))
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
/// Rotates the heads of one position (`head_dim` each) by one row of the tables.
fn rotate_rows<T: Element>(y: &mut [T], x: &[T], c: &[T], s: &[T], head_dim: usize, inverse: bool) {
    let half = head_dim / 2;
    for (out, x) in y.chunks_mut(head_dim).zip(x.chunks(head_dim)) {
        for j in 0..half {
            let (x1, x2) = (x[j].load(), x[half + j].load());
            let (c, s) = (c[j].load(), if inverse { -s[j].load() } else { s[j].load() });
            out[j] = T::store(x1 * c - x2 * s);
            out[half + j] = T::store(x2 * c + x1 * s);
        }
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        cos: &CpuStorage,
        lc: &Layout,
        sin: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = for_float!(OP, x.dtype(), rotate((x, lx), (cos, lc), (sin, ls), self.inverse))?;
        Ok((y, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        cos: &candle_core::CudaStorage,
        lc: &Layout,
        sin: &candle_core::CudaStorage,
        ls: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rope(x, lx, cos, lc, sin, ls, self.inverse)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The tables are constants here: a table that tracks a gradient would get none,
        // which candle's backward cannot take (it panics on a tracked node without one).
        if cos.track_op() || sin.track_op() {
            return Err(op_error(
                OP,
                "the cos/sin tables track a gradient, which the fused rope does not compute; detach them, or \
                 rotate on the composed ops"
                    .into(),
            ));
        }
        let dx = dy.contiguous()?.apply_op3_no_bwd(cos, sin, &Rope { inverse: !self.inverse })?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, grads_of, randn};
    use candle_core::{DType, Var};

    #[test]
    fn tables_that_track_a_gradient_are_an_error_not_a_panic() -> Result<()> {
        let x = candle_core::Var::from_tensor(&randn(1, &[1, 4, 2, 8]))?;
        let (cos, sin) = (candle_core::Var::from_tensor(&randn(2, &[6, 4]))?, randn(3, &[6, 4]));
        // A view of a variable: a tracked node of candle's graph that would get no gradient.
        let y = rope(&x, &cos.as_tensor().narrow(0, 0, 4)?, &sin.narrow(0, 0, 4)?)?;
        let error = y.sum_all()?.backward().unwrap_err().to_string();
        assert!(error.contains("rope") && error.contains("cos/sin"), "{error}");
        Ok(())
    }

    #[test]
    fn forward_and_gradient_equal_the_slice_and_concatenate_chain() -> Result<()> {
        for (b, h, s, d) in [(1, 1, 1, 2), (2, 3, 5, 8), (2, 4, 17, 64), (1, 2, 9, 80), (1, 1, 3, 128)] {
            let x = Var::from_tensor(&randn(1, &[b, s, h, d]))?;
            let angles = (randn(2, &[s, d / 2]) * 3.0)?;
            let (cos, sin) = (angles.cos()?, angles.sin()?);
            let dy = randn(3, &[b, s, h, d]);
            let ours = rope(&x, &cos, &sin)?;
            // candle-nn's chain takes (batch, heads, seq, head_dim).
            let heads_first = x.transpose(1, 2)?.contiguous()?;
            let theirs = candle_nn::rotary_emb::rope_slow(&heads_first, &cos, &sin)?.transpose(1, 2)?;
            let what = format!("({b}, {h}, {s}, {d})");
            assert_close(&ours, &theirs, 1e-6, &format!("{what} forward"))?;
            let (ours, theirs) = (grads_of(&ours, &dy, &[&x])?, grads_of(&theirs, &dy, &[&x])?);
            assert_close(&ours[0], &theirs[0], 1e-6, &format!("{what} dx"))?;
        }
        Ok(())
    }

    #[test]
    fn half_precision_stays_within_the_rounding_of_an_f32_reference() -> Result<()> {
        let (x, angles) = (randn(4, &[2, 6, 2, 16]), randn(5, &[6, 8]));
        for (dtype, tolerance) in [(DType::BF16, 1.0 / 64.0), (DType::F16, 1.0 / 512.0)] {
            let half = |t: &Tensor| t.to_dtype(dtype);
            let ours = rope(&half(&x)?, &half(&angles.cos()?)?, &half(&angles.sin()?)?)?.to_dtype(DType::F32)?;
            let heads_first = x.transpose(1, 2)?.contiguous()?;
            let exact =
                candle_nn::rotary_emb::rope_slow(&heads_first, &angles.cos()?, &angles.sin()?)?.transpose(1, 2)?;
            assert_close(&ours, &exact, tolerance, &format!("{dtype:?}"))?;
        }
        Ok(())
    }

    #[test]
    fn tables_of_another_shape_or_an_odd_head_dim_are_refused() {
        let error = rope(&randn(1, &[1, 4, 2, 8]), &randn(2, &[4, 3]), &randn(3, &[4, 3])).unwrap_err().to_string();
        assert!(error.contains("rope") && error.contains("[4, 4]") && error.contains("[4, 3]"), "{error}");
        assert!(rope(&randn(1, &[1, 4, 2, 7]), &randn(2, &[4, 3]), &randn(3, &[4, 3])).is_err());
        assert!(rope(&randn(1, &[2, 4, 8]), &randn(2, &[4, 4]), &randn(3, &[4, 4])).is_err());
    }
}
