//! [`LlamaDecoderLayer`]: one pre-norm decoder layer (Gemma's with norms around attention
//! and MLP), with an MLP or Mixtral's experts.

use super::super::lora::LoraLinear;
use super::super::moe::{MoeConfig, SparseMoe};
use super::super::Kernels;
use super::attention::LlamaAttention;
use super::config::LlamaConfig;
use super::mlp::LlamaMlp;
use super::norm;
use super::rotary::RotaryEmbedding;
use crate::Shardable;
use candle_core::{Module, Result, Tensor};
use candle_nn::{RmsNorm, VarBuilder};

/// One pre-norm decoder layer:
/// `x = x + self_attn(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x))`.
///
/// The fields are declared in Hugging Face's registration order (the state-dict order);
/// `forward_order` records the order the forward uses them.
#[derive(Clone, Debug, Shardable)]
#[fsdp(forward_order(
    input_layernorm,
    self_attn,
    post_attention_layernorm,
    pre_feedforward_layernorm,
    mlp,
    block_sparse_moe,
    post_feedforward_layernorm
))]
pub struct LlamaDecoderLayer {
    /// The self-attention.
    pub self_attn: LlamaAttention,
    /// The gated MLP (not in Mixtral).
    pub mlp: Option<LlamaMlp>,
    /// Mixtral's experts, in place of the MLP.
    pub block_sparse_moe: Option<SparseMoe>,
    /// The RMSNorm before the attention.
    pub input_layernorm: RmsNorm,
    /// The RMSNorm before the MLP; Gemma's, of the attention's output.
    pub post_attention_layernorm: RmsNorm,
    /// Gemma's RMSNorm before the MLP.
    pub pre_feedforward_layernorm: Option<RmsNorm>,
    /// Gemma's RMSNorm of the MLP's output.
    pub post_feedforward_layernorm: Option<RmsNorm>,
    /// What norm weights are added to (1 for Gemma's `1 + w`).
    pub norm_offset: f64,
    /// The kernels the norms run on.
    #[fsdp(skip)]
    pub kernels: Kernels,
}

impl LlamaDecoderLayer {
    /// Decoder layer `layer`, its parameters under `vb` with the Hugging Face names.
    pub fn new(config: &LlamaConfig, layer: usize, vb: VarBuilder) -> Result<Self> {
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        let gemma = config.gemma.is_some();
        let experts = |moe: &MoeConfig| {
            let vb = vb.pp("block_sparse_moe");
            SparseMoe::new(hidden, inter, moe, config.init(), config.lora.as_ref(), config.kernels, vb)
        };
        Ok(Self {
            self_attn: LlamaAttention::new(config, layer, vb.pp("self_attn"))?,
            mlp: config.moe.is_none().then(|| LlamaMlp::new(config, vb.pp("mlp"))).transpose()?,
            block_sparse_moe: config.moe.as_ref().map(experts).transpose()?,
            input_layernorm: config.norm(vb.pp("input_layernorm"))?,
            post_attention_layernorm: config.norm(vb.pp("post_attention_layernorm"))?,
            pre_feedforward_layernorm: gemma.then(|| config.norm(vb.pp("pre_feedforward_layernorm"))).transpose()?,
            post_feedforward_layernorm: gemma.then(|| config.norm(vb.pp("post_feedforward_layernorm"))).transpose()?,
            norm_offset: config.norm_offset(),
            kernels: config.kernels,
        })
    }

    /// `x` `(batch, seq, hidden)` to `(batch, seq, hidden)`, and with experts the router's
    /// logits `(batch · seq, num_experts)`.
    pub fn forward(&self, x: &Tensor, rotary: &RotaryEmbedding, mask: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let norm = |weights: &RmsNorm, x: &Tensor| norm(self.kernels, weights, self.norm_offset, x);
        let h = self.self_attn.forward(&norm(&self.input_layernorm, x)?, rotary, mask)?;
        // Gemma normalises the attention's output and the MLP's input and output; the
        // others the MLP's input only.
        let (x, normed) = match &self.pre_feedforward_layernorm {
            Some(pre_feedforward) => {
                let x = (x + norm(&self.post_attention_layernorm, &h)?)?;
                let normed = norm(pre_feedforward, &x)?;
                (x, normed)
            }
            None => {
                let x = (x + h)?;
                let normed = norm(&self.post_attention_layernorm, &x)?;
                (x, normed)
            }
        };
        let (h, router_logits) = match (&self.mlp, &self.block_sparse_moe) {
            (Some(mlp), None) => (mlp.forward(&normed)?, None),
            (None, Some(moe)) => {
                let (h, logits) = moe.forward(&normed)?;
                (h, Some(logits))
            }
            _ => candle_core::bail!("LlamaDecoderLayer: either an MLP or experts"),
        };
        let h = match &self.post_feedforward_layernorm {
            Some(post_feedforward) => norm(post_feedforward, &h)?,
            None => h,
        };
        Ok(((x + h)?, router_logits))
    }

    /// Its projections, for the check that LoRA targets something.
    pub(super) fn projections(&self) -> impl Iterator<Item = &LoraLinear> {
        let mlp = self.mlp.iter().flat_map(|m| m.projections());
        let experts = self.block_sparse_moe.iter().flat_map(|m| m.projections());
        self.self_attn.projections().chain(mlp).chain(experts)
    }
}
