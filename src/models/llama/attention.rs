//! [`LlamaAttention`]: causal self-attention with rotary embeddings, grouped key/value
//! heads and each family's additions (biases, head norms, windows, soft caps).

use super::super::gemma::softcap;
use super::super::lora::LoraLinear;
use super::super::{softmax_last_dim, Kernels};
use super::config::{Family, LlamaConfig};
use super::rotary::RotaryEmbedding;
use super::{at_least_f32, norm, windowed};
use crate::Shardable;
use candle_core::{Module, Result, Tensor};
use candle_nn::{RmsNorm, VarBuilder};

/// Causal self-attention with rotary embeddings and grouped key/value heads.
#[derive(Clone, Debug, Shardable)]
pub struct LlamaAttention {
    /// `(num_attention_heads · head_dim, hidden_size)` (not in Phi-3).
    pub q_proj: Option<LoraLinear>,
    /// `(num_key_value_heads · head_dim, hidden_size)` (not in Phi-3).
    pub k_proj: Option<LoraLinear>,
    /// `(num_key_value_heads · head_dim, hidden_size)` (not in Phi-3).
    pub v_proj: Option<LoraLinear>,
    /// Phi-3's `q_proj`, `k_proj` and `v_proj` stacked, in that order.
    pub qkv_proj: Option<LoraLinear>,
    /// `(hidden_size, num_attention_heads · head_dim)`.
    pub o_proj: LoraLinear,
    /// Qwen3's RMSNorm over each query head, `(head_dim)`.
    pub q_norm: Option<RmsNorm>,
    /// Qwen3's RMSNorm over each key head, `(head_dim)`.
    pub k_norm: Option<RmsNorm>,
    /// Mistral's window: each position attends to itself and the `w - 1` before it.
    #[fsdp(skip)]
    pub sliding_window: Option<usize>,
    /// What the scores `q·k` are multiplied by: `head_dim^-1/2`, Gemma's
    /// `query_pre_attn_scalar^-1/2`.
    pub scale: f64,
    /// Gemma 2's soft cap of the scores.
    #[fsdp(skip)]
    pub softcap: Option<f64>,
    /// What the q/k norm weights are added to (1 for Gemma's `1 + w`).
    pub norm_offset: f64,
    /// The number of query heads.
    pub num_heads: usize,
    /// The number of key/value heads.
    pub num_kv_heads: usize,
    /// The dimension of each head.
    pub head_dim: usize,
    /// The kernels the forward runs on.
    #[fsdp(skip)]
    pub kernels: Kernels,
}

impl LlamaAttention {
    /// The projections of layer `layer` under `vb` (`q_proj`, `k_proj`, `v_proj`,
    /// `o_proj`), initialised `N(0, initializer_range)`.
    pub fn new(config: &LlamaConfig, layer: usize, vb: VarBuilder) -> Result<Self> {
        let hidden = config.hidden_size;
        let head_dim = config.head_dim();
        let q_dim = config.num_attention_heads * head_dim;
        let kv_dim = config.num_key_value_heads * head_dim;
        let fused = config.family == Family::Phi3;
        let separate = |dim: usize, name: &str| {
            (!fused).then(|| config.projection(hidden, dim, config.qkv_bias, vb.pp(name))).transpose()
        };
        Ok(Self {
            q_proj: separate(q_dim, "q_proj")?,
            k_proj: separate(kv_dim, "k_proj")?,
            v_proj: separate(kv_dim, "v_proj")?,
            qkv_proj: fused
                .then(|| config.projection(hidden, q_dim + 2 * kv_dim, false, vb.pp("qkv_proj")))
                .transpose()?,
            o_proj: config.projection(q_dim, hidden, false, vb.pp("o_proj"))?,
            q_norm: config.qk_norm.then(|| config.norm_of(head_dim, vb.pp("q_norm"))).transpose()?,
            k_norm: config.qk_norm.then(|| config.norm_of(head_dim, vb.pp("k_norm"))).transpose()?,
            sliding_window: config.layer_window(layer),
            scale: match &config.gemma {
                Some(gemma) => gemma.query_pre_attn_scalar.powf(-0.5),
                None => (head_dim as f64).powf(-0.5),
            },
            softcap: config.gemma.as_ref().and_then(|g| g.attn_logit_softcapping),
            norm_offset: config.norm_offset(),
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_key_value_heads,
            head_dim,
            kernels: config.kernels,
        })
    }

    /// `x` `(batch, seq, hidden)`, causal. The composed kernels add `mask` `(seq, seq)` to
    /// the attention scores; the fused attention is causal by construction and ignores it.
    pub fn forward(&self, x: &Tensor, rotary: &RotaryEmbedding, mask: &Tensor) -> Result<Tensor> {
        match self.kernels {
            // The fused attention is causal without a window or a soft cap: a window
            // shorter than the sequence takes the composed path, with `mask` holding it.
            Kernels::Fused if self.softcap.is_none() && !windowed(self.sliding_window, x.dim(1)?) => {
                self.forward_fused(x, rotary)
            }
            _ => self.forward_composed(x, rotary, mask),
        }
    }

    /// The projections, in the order of the FQN table.
    pub(super) fn projections(&self) -> impl Iterator<Item = &LoraLinear> {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.qkv_proj].into_iter().flatten().chain([&self.o_proj])
    }

    /// The queries, keys and values of `x`, each `(batch, seq, heads · head_dim)`: three
    /// products, or Phi-3's one, split.
    fn qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        match (&self.qkv_proj, &self.q_proj, &self.k_proj, &self.v_proj) {
            (Some(qkv), None, None, None) => {
                let (q_dim, kv_dim) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
                let all = qkv.forward(x)?;
                let part = |start: usize, len: usize| all.narrow(candle_core::D::Minus1, start, len)?.contiguous();
                Ok((part(0, q_dim)?, part(q_dim, kv_dim)?, part(q_dim + kv_dim, kv_dim)?))
            }
            (None, Some(q), Some(k), Some(v)) => Ok((q.forward(x)?, k.forward(x)?, v.forward(x)?)),
            _ => candle_core::bail!("LlamaAttention: either q_proj, k_proj and v_proj, or qkv_proj"),
        }
    }

    /// Qwen3's per-head norm of `heads` (head_dim last), when the model has it.
    fn head_norm(&self, weights: &Option<RmsNorm>, heads: Tensor) -> Result<Tensor> {
        match weights {
            None => Ok(heads),
            Some(weights) => norm(self.kernels, weights, self.norm_offset, &heads),
        }
    }

    /// Projections, rotations and attention on `(batch, seq, heads, head_dim)`: no
    /// transposes.
    fn forward_fused(&self, x: &Tensor, rotary: &RotaryEmbedding) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| t.reshape((b, s, n, self.head_dim));
        let (q, k, v) = self.qkv(x)?;
        let q = rotary.apply_fused(&self.head_norm(&self.q_norm, heads(q, self.num_heads)?)?)?;
        let k = rotary.apply_fused(&self.head_norm(&self.k_norm, heads(k, self.num_kv_heads)?)?)?;
        let v = heads(v, self.num_kv_heads)?;
        let out = crate::ops::causal_attention(&q, &k, &v, self.scale)?;
        self.o_proj.forward(&out.reshape((b, s, self.num_heads * self.head_dim))?)
    }

    fn forward_composed(&self, x: &Tensor, rotary: &RotaryEmbedding, mask: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize| -> Result<Tensor> {
            t.reshape((b, s, heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = self.qkv(x)?;
        let q = rotary.apply(&self.head_norm(&self.q_norm, split(q, self.num_heads)?)?)?;
        let k = rotary.apply(&self.head_norm(&self.k_norm, split(k, self.num_kv_heads)?)?)?;
        let v = split(v, self.num_kv_heads)?;
        let (k, v) = (self.repeat_kv(k)?, self.repeat_kv(v)?);
        let scores = (q.matmul(&k.t()?.contiguous()?)? * self.scale)?;
        let scores = match self.softcap {
            Some(cap) => softcap(&scores, cap)?,
            None => scores,
        };
        let scores = scores.broadcast_add(mask)?;
        // Softmax in at least f32 (Hugging Face computes it in f32 for half-precision
        // activations), then back to the activation dtype.
        let attention = softmax_last_dim(&scores.to_dtype(at_least_f32(v.dtype()))?)?.to_dtype(v.dtype())?;
        let out = attention.matmul(&v)?; // (b, heads, s, head_dim)
        let out = out.transpose(1, 2)?.contiguous()?.reshape((b, s, self.num_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }

    /// `(b, kv_heads, s, d)` to `(b, heads, s, d)`: query head `i` uses key/value head
    /// `i / (heads / kv_heads)`.
    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let repeats = self.num_heads / self.num_kv_heads;
        if repeats == 1 {
            return Ok(x);
        }
        let (b, kv_heads, s, d) = x.dims4()?;
        x.unsqueeze(2)?.broadcast_as((b, kv_heads, repeats, s, d))?.contiguous()?.reshape((b, kv_heads * repeats, s, d))
    }
}
