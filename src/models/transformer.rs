//! A port of PyTorch's `nn.Transformer`: post-norm (`norm_first=False`), ReLU feed-forward,
//! `batch_first=False` (every activation is `(sequence, batch, d_model)`), final LayerNorms
//! after the encoder and decoder stacks, and no masks (as `nn.Transformer` is called in the
//! FSDP tests).
//!
//! **Dropout is not implemented.** Every use of this model in the ported tests runs with
//! dropout off (`eval()` mode or `dropout=0`), where `nn.Transformer` computes exactly what
//! this port computes.
//!
//! Parameter names and their order are those of PyTorch's `nn.Transformer`, so the FQN table of
//! [`Transformer`] is PyTorch's flat-parameter order:
//!
//! ```text
//! encoder.layers.{i}.self_attn.in_proj_weight, .in_proj_bias, .out_proj.weight, .out_proj.bias,
//!   .linear1.weight, .linear1.bias, .linear2.weight, .linear2.bias, .norm1.*, .norm2.*
//! encoder.norm.weight, encoder.norm.bias
//! decoder.layers.{i}.self_attn.*, .multihead_attn.*, .linear1.*, .linear2.*, .norm1.*, .norm2.*, .norm3.*
//! decoder.norm.weight, decoder.norm.bias
//! ```
//!
//! Each encoder and decoder layer is an FSDP [`Unit`] (PyTorch's
//! `ModuleWrapPolicy({TransformerEncoderLayer, TransformerDecoderLayer})`); the root unit
//! holds the two final norms.
//!
//! Initialisation follows PyTorch's distributions: `nn.Transformer` applies
//! `xavier_uniform_` to every matrix; attention input/output biases start at zero, the
//! feed-forward biases at `U(±1/sqrt(fan_in))`, norms at weight 1, bias 0.

use super::{affine, layer_norm, softmax_last_dim, torch_linear_init, xavier_uniform};
use crate::{Shardable, Unit};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, LayerNorm, LayerNormConfig, Linear, VarBuilder};

/// The hyper-parameters of [`Transformer`]; `Default` gives `nn.Transformer`'s defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransformerConfig {
    /// The model width `E`; a positive multiple of `nhead`.
    pub d_model: usize,
    /// The number of attention heads.
    pub nhead: usize,
    /// The number of encoder layers.
    pub num_encoder_layers: usize,
    /// The number of decoder layers.
    pub num_decoder_layers: usize,
    /// The feed-forward's hidden width.
    pub dim_feedforward: usize,
    /// The `eps` inside the square root of every LayerNorm.
    pub layer_norm_eps: f64,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        Self {
            d_model: 512,
            nhead: 8,
            num_encoder_layers: 6,
            num_decoder_layers: 6,
            dim_feedforward: 2048,
            layer_norm_eps: 1e-5,
        }
    }
}

impl TransformerConfig {
    fn validate(&self) -> Result<()> {
        if self.nhead == 0 || !self.d_model.is_multiple_of(self.nhead) {
            candle_core::bail!(
                "Transformer: d_model ({}) must be a positive multiple of nhead ({})",
                self.d_model,
                self.nhead
            )
        }
        Ok(())
    }

    fn norm_config(&self) -> LayerNormConfig {
        LayerNormConfig { eps: self.layer_norm_eps, remove_mean: true, affine: true }
    }
}

fn norm(config: &TransformerConfig, vb: VarBuilder) -> Result<LayerNorm> {
    candle_nn::layer_norm(config.d_model, config.norm_config(), vb)
}

/// A feed-forward linear layer as `nn.Transformer` initialises it: xavier-uniform weight,
/// `U(±1/sqrt(fan_in))` bias.
fn feed_forward_linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", xavier_uniform(out_dim, in_dim))?;
    let bias = vb.get_with_hints(out_dim, "bias", torch_linear_init(in_dim))?;
    Ok(Linear::new(weight, Some(bias)))
}

/// Checks that `x` is `(sequence, batch, d_model)`.
fn check_input(what: &str, x: &Tensor, d_model: usize) -> Result<(usize, usize)> {
    match x.dims() {
        &[seq, batch, dim] if dim == d_model => Ok((seq, batch)),
        dims => candle_core::bail!("Transformer: {what} must be (sequence, batch, {d_model}), got {dims:?}"),
    }
}

/// PyTorch's `nn.MultiheadAttention` (no masks, no dropout, `batch_first=False`): the q, k
/// and v projections packed in one `(3·d, d)` matrix, scaled dot-product attention per
/// head, then `out_proj`.
#[derive(Clone, Debug, Shardable)]
pub struct MultiheadAttention {
    /// `(3·embed_dim, embed_dim)`: rows `[0, d)` project queries, `[d, 2d)` keys, `[2d, 3d)` values.
    pub in_proj_weight: Tensor,
    /// `(3·embed_dim)`.
    pub in_proj_bias: Tensor,
    /// `(embed_dim, embed_dim)` with bias: the projection of the heads' concatenated outputs.
    pub out_proj: Linear,
    /// The number of heads; each has `embed_dim / num_heads` dimensions.
    pub num_heads: usize,
}

impl MultiheadAttention {
    /// Attention of width `embed_dim` over `num_heads` heads, its parameters under `vb` with
    /// PyTorch's names: xavier-uniform matrices, zero biases. Fails unless `embed_dim` is a
    /// positive multiple of `num_heads`.
    pub fn new(embed_dim: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        if num_heads == 0 || !embed_dim.is_multiple_of(num_heads) {
            candle_core::bail!(
                "MultiheadAttention: embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})"
            )
        }
        let in_proj_weight =
            vb.get_with_hints((3 * embed_dim, embed_dim), "in_proj_weight", xavier_uniform(3 * embed_dim, embed_dim))?;
        let in_proj_bias = vb.get_with_hints(3 * embed_dim, "in_proj_bias", Init::Const(0.))?;
        let out_vb = vb.pp("out_proj");
        let out_weight =
            out_vb.get_with_hints((embed_dim, embed_dim), "weight", xavier_uniform(embed_dim, embed_dim))?;
        let out_bias = out_vb.get_with_hints(embed_dim, "bias", Init::Const(0.))?;
        Ok(Self { in_proj_weight, in_proj_bias, out_proj: Linear::new(out_weight, Some(out_bias)), num_heads })
    }

    /// The width `E` (the rows of `out_proj.weight`).
    pub fn embed_dim(&self) -> usize {
        self.out_proj.weight().dim(0).unwrap_or(0)
    }

    /// Attention of `query` `(L, N, E)` over `key` and `value` `(S, N, E)`; returns `(L, N, E)`.
    ///
    /// Like PyTorch, self-attention (`query`, `key` and `value` the same tensor) projects
    /// with one packed matrix product, and `key` = `value` projects keys and values together.
    pub fn forward(&self, query: &Tensor, key: &Tensor, value: &Tensor) -> Result<Tensor> {
        let e = self.embed_dim();
        let (l, n) = check_input("query", query, e)?;
        let (s, n_k) = check_input("key", key, e)?;
        let (s_v, n_v) = check_input("value", value, e)?;
        if n_k != n || n_v != n || s_v != s {
            candle_core::bail!(
                "MultiheadAttention: query {:?}, key {:?} and value {:?} disagree in batch or source length",
                query.dims(),
                key.dims(),
                value.dims()
            )
        }
        let w = &self.in_proj_weight;
        let b = &self.in_proj_bias;
        let (q, k, v) = if query.id() == key.id() && key.id() == value.id() {
            let qkv = affine(query, w, Some(b))?;
            (qkv.narrow(2, 0, e)?, qkv.narrow(2, e, e)?, qkv.narrow(2, 2 * e, e)?)
        } else {
            let q = affine(query, &w.narrow(0, 0, e)?, Some(&b.narrow(0, 0, e)?))?;
            if key.id() == value.id() {
                let kv = affine(key, &w.narrow(0, e, 2 * e)?, Some(&b.narrow(0, e, 2 * e)?))?;
                (q, kv.narrow(2, 0, e)?, kv.narrow(2, e, e)?)
            } else {
                let k = affine(key, &w.narrow(0, e, e)?, Some(&b.narrow(0, e, e)?))?;
                let v = affine(value, &w.narrow(0, 2 * e, e)?, Some(&b.narrow(0, 2 * e, e)?))?;
                (q, k, v)
            }
        };
        let h = self.num_heads;
        let head_dim = e / h;
        // (len, N, E) -> (len, N·H, head_dim) -> (N·H, len, head_dim), as PyTorch does.
        let heads = |x: Tensor, len: usize| -> Result<Tensor> {
            x.contiguous()?.reshape((len, n * h, head_dim))?.transpose(0, 1)?.contiguous()
        };
        let q = heads(q, l)?;
        let k = heads(k, s)?;
        let v = heads(v, s)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (head_dim as f64).sqrt()))?;
        let attention = softmax_last_dim(&scores)?;
        let out = attention.matmul(&v)?; // (N·H, L, head_dim)
        let out = out.transpose(0, 1)?.contiguous()?.reshape((l, n, e))?;
        self.out_proj.forward(&out)
    }
}

/// PyTorch's `nn.TransformerEncoderLayer` (post-norm, ReLU):
/// `x = norm1(x + self_attn(x)); x = norm2(x + linear2(relu(linear1(x))))`.
///
/// The fields are declared in PyTorch's registration order, which is the flat-parameter
/// order; `forward_order` records the order the forward uses them.
#[derive(Clone, Debug, Shardable)]
#[fsdp(forward_order(self_attn, norm1, linear1, linear2, norm2))]
pub struct TransformerEncoderLayer {
    /// The self-attention.
    pub self_attn: MultiheadAttention,
    /// `(dim_feedforward, d_model)` with bias: the feed-forward's expansion.
    pub linear1: Linear,
    /// `(d_model, dim_feedforward)` with bias: the projection back.
    pub linear2: Linear,
    /// The LayerNorm after the self-attention's residual.
    pub norm1: LayerNorm,
    /// The LayerNorm after the feed-forward's residual.
    pub norm2: LayerNorm,
}

impl TransformerEncoderLayer {
    /// One encoder layer, its parameters under `vb` with PyTorch's names. Fails unless
    /// `d_model` is a positive multiple of `nhead`.
    pub fn new(config: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            self_attn: MultiheadAttention::new(config.d_model, config.nhead, vb.pp("self_attn"))?,
            linear1: feed_forward_linear(config.d_model, config.dim_feedforward, vb.pp("linear1"))?,
            linear2: feed_forward_linear(config.dim_feedforward, config.d_model, vb.pp("linear2"))?,
            norm1: norm(config, vb.pp("norm1"))?,
            norm2: norm(config, vb.pp("norm2"))?,
        })
    }

    fn feed_forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear2.forward(&self.linear1.forward(x)?.relu()?)
    }
}

impl Module for TransformerEncoderLayer {
    /// `src` `(S, N, E)` to `(S, N, E)`.
    fn forward(&self, src: &Tensor) -> Result<Tensor> {
        let x = layer_norm(&self.norm1, &(src + self.self_attn.forward(src, src, src)?)?)?;
        layer_norm(&self.norm2, &(&x + self.feed_forward(&x)?)?)
    }
}

/// PyTorch's `nn.TransformerDecoderLayer` (post-norm, ReLU):
/// `x = norm1(x + self_attn(x)); x = norm2(x + multihead_attn(x, memory));
/// x = norm3(x + linear2(relu(linear1(x))))`.
#[derive(Clone, Debug, Shardable)]
#[fsdp(forward_order(self_attn, norm1, multihead_attn, norm2, linear1, linear2, norm3))]
pub struct TransformerDecoderLayer {
    /// The self-attention.
    pub self_attn: MultiheadAttention,
    /// The attention over the encoder's memory.
    pub multihead_attn: MultiheadAttention,
    /// `(dim_feedforward, d_model)` with bias: the feed-forward's expansion.
    pub linear1: Linear,
    /// `(d_model, dim_feedforward)` with bias: the projection back.
    pub linear2: Linear,
    /// The LayerNorm after the self-attention's residual.
    pub norm1: LayerNorm,
    /// The LayerNorm after the memory attention's residual.
    pub norm2: LayerNorm,
    /// The LayerNorm after the feed-forward's residual.
    pub norm3: LayerNorm,
}

impl TransformerDecoderLayer {
    /// One decoder layer, its parameters under `vb` with PyTorch's names. Fails unless
    /// `d_model` is a positive multiple of `nhead`.
    pub fn new(config: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            self_attn: MultiheadAttention::new(config.d_model, config.nhead, vb.pp("self_attn"))?,
            multihead_attn: MultiheadAttention::new(config.d_model, config.nhead, vb.pp("multihead_attn"))?,
            linear1: feed_forward_linear(config.d_model, config.dim_feedforward, vb.pp("linear1"))?,
            linear2: feed_forward_linear(config.dim_feedforward, config.d_model, vb.pp("linear2"))?,
            norm1: norm(config, vb.pp("norm1"))?,
            norm2: norm(config, vb.pp("norm2"))?,
            norm3: norm(config, vb.pp("norm3"))?,
        })
    }

    /// `tgt` `(T, N, E)` attending over `memory` `(S, N, E)`; returns `(T, N, E)`.
    pub fn forward(&self, tgt: &Tensor, memory: &Tensor) -> Result<Tensor> {
        let x = layer_norm(&self.norm1, &(tgt + self.self_attn.forward(tgt, tgt, tgt)?)?)?;
        let x = layer_norm(&self.norm2, &(&x + self.multihead_attn.forward(&x, memory, memory)?)?)?;
        let ff = self.linear2.forward(&self.linear1.forward(&x)?.relu()?)?;
        layer_norm(&self.norm3, &(&x + ff)?)
    }
}

/// PyTorch's `nn.TransformerEncoder` with its final norm: each layer an FSDP unit.
#[derive(Debug, Shardable)]
pub struct TransformerEncoder {
    /// The encoder layers, each an FSDP unit.
    pub layers: Vec<Unit<TransformerEncoderLayer>>,
    /// The LayerNorm after the last layer.
    pub norm: LayerNorm,
}

impl TransformerEncoder {
    /// `num_encoder_layers` layers and the final norm, their parameters under `vb`.
    pub fn new(config: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let layers = (0..config.num_encoder_layers)
            .map(|i| TransformerEncoderLayer::new(config, vb.pp("layers").pp(i)).map(Unit::new))
            .collect::<Result<_>>()?;
        Ok(Self { layers, norm: norm(config, vb.pp("norm"))? })
    }
}

impl Module for TransformerEncoder {
    /// `src` `(S, N, E)` to the memory `(S, N, E)`.
    fn forward(&self, src: &Tensor) -> Result<Tensor> {
        let mut x = src.clone();
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        layer_norm(&self.norm, &x)
    }
}

/// PyTorch's `nn.TransformerDecoder` with its final norm: each layer an FSDP unit.
#[derive(Debug, Shardable)]
pub struct TransformerDecoder {
    /// The decoder layers, each an FSDP unit.
    pub layers: Vec<Unit<TransformerDecoderLayer>>,
    /// The LayerNorm after the last layer.
    pub norm: LayerNorm,
}

impl TransformerDecoder {
    /// `num_decoder_layers` layers and the final norm, their parameters under `vb`.
    pub fn new(config: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let layers = (0..config.num_decoder_layers)
            .map(|i| TransformerDecoderLayer::new(config, vb.pp("layers").pp(i)).map(Unit::new))
            .collect::<Result<_>>()?;
        Ok(Self { layers, norm: norm(config, vb.pp("norm"))? })
    }

    /// `tgt` `(T, N, E)` attending over `memory` `(S, N, E)`; returns `(T, N, E)`.
    pub fn forward(&self, tgt: &Tensor, memory: &Tensor) -> Result<Tensor> {
        let mut x = tgt.clone();
        for layer in &self.layers {
            // `memory` is an input of every layer (it carries gradients back to the encoder).
            x = layer.run_fn((x, memory.clone()), |layer, (x, memory)| layer.forward(&x, &memory))?;
        }
        layer_norm(&self.norm, &x)
    }
}

/// PyTorch's `nn.Transformer` (see the module documentation).
#[derive(Debug, Shardable)]
pub struct Transformer {
    /// The encoder stack (FQNs `encoder.…`).
    pub encoder: TransformerEncoder,
    /// The decoder stack (FQNs `decoder.…`).
    pub decoder: TransformerDecoder,
    /// The hyper-parameters the model was built with.
    #[fsdp(skip)]
    pub config: TransformerConfig,
}

impl Transformer {
    /// Creates the parameters under `vb` with PyTorch's names (`encoder.layers.0.…`).
    pub fn new(config: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            encoder: TransformerEncoder::new(config, vb.pp("encoder"))?,
            decoder: TransformerDecoder::new(config, vb.pp("decoder"))?,
            config: *config,
        })
    }

    /// `src` `(S, N, d_model)` and `tgt` `(T, N, d_model)` to `(T, N, d_model)`: the encoder
    /// stack and `encoder.norm` give the memory, which every decoder layer attends over.
    pub fn forward(&self, src: &Tensor, tgt: &Tensor) -> Result<Tensor> {
        let (_, src_batch) = check_input("src", src, self.config.d_model)?;
        let (_, tgt_batch) = check_input("tgt", tgt, self.config.d_model)?;
        if src_batch != tgt_batch {
            candle_core::bail!("Transformer: src batch ({src_batch}) and tgt batch ({tgt_batch}) differ")
        }
        let memory = self.encoder.forward(src)?;
        self.decoder.forward(tgt, &memory)
    }
}
