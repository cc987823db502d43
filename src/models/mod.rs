//! Ready-made models that derive [`Shardable`](crate::Shardable).
//!
//! - [`transformer`]: a port of PyTorch's `nn.Transformer` (the model of PyTorch's FSDP
//!   backward-prefetch test), with its parameter names;
//! - [`llama`]: a small Llama-style decoder with the Hugging Face parameter names;
//! - [`gpt`]: the small decoder-only transformer of PyTorch's distributed tests (FSDP2's
//!   optimizer-in-backward test), with tied input and output embeddings.
//!
//! Every model is built from a `candle_nn::VarBuilder`, under exactly the FQNs of its
//! static table, so the keys of a `VarMap` it was built from equal its FQNs and
//! [`Layout::check_var_map`](crate::model::Layout::check_var_map) holds.
//!
//! # Autograd
//!
//! These models are trained, so their forward passes use only differentiable candle ops.
//! In candle-nn 0.11.1 several fused kernels are forward-only: `ops::softmax_last_dim`,
//! `LayerNorm::forward` and `RmsNorm::forward` on contiguous inputs, and
//! `rotary_emb::rope` are built with `apply_op*_no_bwd`, which silently cuts the graph
//! (the parameters below them get no gradient at all). The helpers of this module
//! ([`layer_norm`], [`rms_norm`], [`softmax_last_dim`]) compute the same functions from
//! differentiable primitives, and the models use them instead.

/// Which kernels a model's forward runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// The fused ops of [`crate::ops`]: RMSNorm, RoPE, SwiGLU, causal attention and the
    /// cross-entropy each one pass forward and one backward, attention without `S × S`
    /// scores.
    #[default]
    Fused,
    /// Chains of candle's differentiable primitives: the reference the fused ops are
    /// tested against.
    Composed,
}

pub mod gemma;
pub mod gpt;
mod hf_config;
pub mod llama;
pub mod lora;
pub mod moe;
pub mod peft;
pub mod transformer;

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, LayerNorm, Linear, RmsNorm, VarBuilder};

/// `norm(x)` over the last dimension, differentiable in `x`, the weight and the bias.
///
/// Computes what `LayerNorm::forward` computes (mean removal when the norm has it, biased
/// variance, `eps` inside the square root, statistics in f32 for half-precision inputs).
pub fn layer_norm(norm: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    let normed = normalize(x, norm.remove_mean(), norm.eps())?.broadcast_mul(norm.weight())?;
    match norm.bias() {
        Some(bias) => normed.broadcast_add(bias),
        None => Ok(normed),
    }
}

/// `norm(x)` for an RMS norm (Llama's `x / sqrt(mean(x²) + eps) * weight`), differentiable.
pub fn rms_norm(norm: &RmsNorm, x: &Tensor) -> Result<Tensor> {
    normalize(x, false, norm.eps())?.broadcast_mul(norm.weight())
}

fn normalize(x: &Tensor, remove_mean: bool, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let internal = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    };
    let x = x.to_dtype(internal)?;
    let x = if remove_mean { x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)? } else { x };
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_square + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// Softmax over the last dimension, differentiable (unlike candle-nn's fused kernel).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Log-softmax over the last dimension (differentiable).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::log_softmax(x, D::Minus1)
}

/// `x @ weight.T + bias` for `x` of any rank ≥ 1 (the leading dimensions are flattened).
pub(crate) fn affine(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = *dims.last().ok_or_else(|| candle_core::Error::Msg("affine: scalar input".into()))?;
    let (out_dim, _) = weight.dims2()?;
    let rows = x.elem_count() / in_dim.max(1);
    let y = x.reshape((rows, in_dim))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(bias) => y.broadcast_add(bias)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank checked above") = out_dim;
    y.reshape(out_dims)
}

/// `Init` of PyTorch's `xavier_uniform_` for a `(fan_out, fan_in)` matrix.
pub(crate) fn xavier_uniform(fan_out: usize, fan_in: usize) -> Init {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

/// `Init` of PyTorch's default `nn.Linear` parameters: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`
/// for both weight and bias.
pub fn torch_linear_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform { lo: -bound, up: bound }
}

/// A linear layer with PyTorch's default `nn.Linear` initialisation distribution
/// (weight `(out, in)` and bias `(out)`, both `U(±1/sqrt(in))`).
pub fn torch_linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let init = torch_linear_init(in_dim);
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = vb.get_with_hints(out_dim, "bias", init)?;
    Ok(Linear::new(weight, Some(bias)))
}
