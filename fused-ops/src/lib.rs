//! Fused forward-and-backward training ops for candle.
//!
//! candle-nn's fused kernels (`softmax_last_dim`, `RmsNorm`, `LayerNorm`, `rotary_emb`) have
//! no backward, so a model that trains builds these functions from chains of elementwise
//! primitives: a kernel launch and a full-size intermediate kept for backward at each link,
//! and attention materialises its `S × S` scores. The ops here are candle custom ops with a
//! backward, usable by any candle model:
//!
//! - [`linear`]: `x · wᵀ` as one autograd node (candle's reshape, transpose and matmul
//!   are four, each with a zero-filled gradient and an addition in backward);
//! - [`rms_norm`]: one pass forward, one pass for both gradients;
//! - [`rope`]: rotary embeddings (the "rotate half" convention; any frequency table, so
//!   Llama 3's scaled frequencies too), forward and backward as one rotation each;
//! - [`swiglu`]: `silu(gate) · up` and both gradients in one pass;
//! - [`cross_entropy`]: mean next-token loss over rows, keeping only each row's
//!   log-sum-exp, never the softmax; [`linear_cross_entropy`] fuses the output projection
//!   in, row chunk by row chunk, so the `rows × vocab` logits never exist whole;
//! - [`causal_attention`]: causal attention with grouped key/value heads, tiled over
//!   query blocks so that no `S × S` score matrix is ever stored, keeping each row's
//!   log-sum-exp for a backward that recomputes the scores block by block;
//! - [`adamw_update`]: the AdamW step in place, a pass per moment and one for the
//!   parameter, to the bit what candle-nn's `AdamW` computes.
//!
//! Every op takes f32, f64, f16 and bf16 (the half types computed in f32), needs nothing
//! of its inputs' layout (it makes them contiguous), and refuses shapes or dtypes it does
//! not support with an error naming the op and the shapes. Each has a CPU implementation
//! and, with the `cuda` feature, a CUDA kernel, and is tested against the composed
//! reference it replaces.

mod adamw;
mod adamw_step;
mod attention;
mod cpu;
mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
mod linear;
mod rms_norm;
mod rope;
mod stash;
mod swiglu;
#[cfg(test)]
mod testing;

pub use adamw::adamw_update;
pub use adamw_step::AdamWStep;
pub use attention::causal_attention;
pub use cross_entropy::{cross_entropy, linear_cross_entropy};
pub use linear::linear;
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use swiglu::swiglu;

use candle_core::{DType, Result, Shape, Tensor};

/// An error of op `op`.
pub(crate) fn op_error(op: &str, message: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("fused {op}: {message}"))
}

/// The error of an op given a dtype it has no kernel for.
pub(crate) fn unsupported_dtype(op: &str, dtype: DType) -> candle_core::Error {
    op_error(op, format!("no kernel for {dtype:?} (f32, f64, f16 and bf16 only)"))
}

/// Refuses inputs of different dtypes, or of a dtype the ops do not take.
pub(crate) fn check_same_dtype(op: &str, tensors: &[&Tensor]) -> Result<()> {
    let first = tensors[0].dtype();
    if !cpu::is_float(first) {
        return Err(unsupported_dtype(op, first));
    }
    if let Some(other) = tensors.iter().find(|t| t.dtype() != first) {
        let shapes: Vec<String> = tensors.iter().map(|t| format!("{:?} {:?}", t.dtype(), t.dims())).collect();
        return Err(op_error(
            op,
            format!("inputs of one dtype expected, got {} ({})", other.dtype().as_str(), shapes.join(", ")),
        ));
    }
    Ok(())
}

/// Several gradients computed by one backward op as one flat buffer, cut into views of
/// the given shapes (no copy).
pub(crate) fn flat_outputs<const N: usize>(flat: &Tensor, shapes: [&Shape; N]) -> Result<[Tensor; N]> {
    let mut at = 0;
    let mut out = Vec::with_capacity(N);
    for shape in shapes {
        let len = shape.elem_count();
        out.push(flat.narrow(0, at, len)?.reshape(shape)?);
        at += len;
    }
    Ok(out.try_into().unwrap_or_else(|_| unreachable!("N shapes give N tensors")))
}
