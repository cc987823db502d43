//! A port of the small decoder-only `Transformer` of PyTorch's distributed tests
//! (`torch/testing/_internal/distributed/_tensor/common_dtensor.py`, configured by its
//! `ModelArgs`), the model of FSDP2's optimizer-in-backward parity test: token and
//! position embeddings, pre-norm blocks (`attention_norm`, causal multi-head attention with
//! bias-free `wq`/`wk`/`wv`/`wo`, `ffn_norm`, `w1` → GELU → `w2`), a final `norm`, and an
//! `output` projection whose weight is `tok_embeddings.weight` when weights are tied.
//!
//! **Dropout is not implemented.** The ported tests run it with `dropout_p = 0.0`, where
//! PyTorch's model computes exactly what this port computes.
//!
//! Parameter names are PyTorch's:
//!
//! ```text
//! tok_embeddings.weight, pos_embeddings.weight,
//! layers.{i}.attention_norm.{weight,bias}, layers.{i}.attention.{wq,wk,wv,wo}.weight,
//! layers.{i}.ffn_norm.{weight,bias}, layers.{i}.feed_forward.{w1,w2}.{weight,bias},
//! norm.{weight,bias}, output.weight (the same tensor as tok_embeddings.weight when tied)
//! ```
//!
//! Each block is an FSDP [`Unit`] (PyTorch's `fully_shard` on every layer and then on the
//! root); the root unit holds the embeddings (with the tied output) and the final norm.
//! Initialisation follows PyTorch's defaults: embeddings `N(0, 1)`, linear layers
//! `U(±1/sqrt(fan_in))`, norms weight 1 and bias 0.

use super::llama::{causal_mask, LinearNoBias};
use super::{layer_norm, softmax_last_dim, torch_linear, torch_linear_init};
use crate::{Shardable, Unit};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, Init, LayerNorm, LayerNormConfig, Linear, VarBuilder};

/// The hyper-parameters of [`Gpt`] (PyTorch's `ModelArgs`); `Default` gives its defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptConfig {
    /// The number of blocks.
    pub n_layers: usize,
    /// The number of token ids (rows of `tok_embeddings`).
    pub vocab_size: usize,
    /// The longest sequence the model accepts (rows of `pos_embeddings`).
    pub max_seq_len: usize,
    /// The model width; a positive multiple of `n_heads`.
    pub dim: usize,
    /// The number of attention heads.
    pub n_heads: usize,
    /// Causal attention (PyTorch passes `is_causal = use_attn_mask` to its attention).
    pub use_attn_mask: bool,
    /// `output.weight` is `tok_embeddings.weight`.
    pub weight_tying: bool,
}

impl Default for GptConfig {
    fn default() -> Self {
        Self {
            n_layers: 2,
            vocab_size: 8,
            max_seq_len: 16,
            dim: 16,
            n_heads: 4,
            use_attn_mask: true,
            weight_tying: true,
        }
    }
}

impl GptConfig {
    fn validate(&self) -> Result<()> {
        if self.n_heads == 0 || !self.dim.is_multiple_of(self.n_heads) {
            candle_core::bail!("Gpt: dim ({}) must be a positive multiple of n_heads ({})", self.dim, self.n_heads)
        }
        Ok(())
    }

    fn norm(&self, vb: VarBuilder) -> Result<LayerNorm> {
        candle_nn::layer_norm(self.dim, LayerNormConfig::default(), vb)
    }

    fn linear_no_bias(&self, in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<LinearNoBias> {
        Ok(LinearNoBias { weight: vb.get_with_hints((out_dim, in_dim), "weight", torch_linear_init(in_dim))? })
    }
}

/// Multi-head self-attention with bias-free projections, causal when configured.
#[derive(Clone, Debug, Shardable)]
pub struct GptAttention {
    /// The query projection, `(dim, dim)`.
    pub wq: LinearNoBias,
    /// The key projection, `(dim, dim)`.
    pub wk: LinearNoBias,
    /// The value projection, `(dim, dim)`.
    pub wv: LinearNoBias,
    /// The output projection, `(dim, dim)`.
    pub wo: LinearNoBias,
    /// The number of heads; each has `dim / n_heads` dimensions.
    pub n_heads: usize,
    /// Causal attention: a position attends to itself and earlier ones only.
    pub use_attn_mask: bool,
}

impl GptAttention {
    /// The projections under `vb` (`wq`, `wk`, `wv`, `wo`), initialised `U(±1/sqrt(dim))`.
    /// Fails unless `dim` is a positive multiple of `n_heads`.
    pub fn new(config: &GptConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let dim = config.dim;
        Ok(Self {
            wq: config.linear_no_bias(dim, dim, vb.pp("wq"))?,
            wk: config.linear_no_bias(dim, dim, vb.pp("wk"))?,
            wv: config.linear_no_bias(dim, dim, vb.pp("wv"))?,
            wo: config.linear_no_bias(dim, dim, vb.pp("wo"))?,
            n_heads: config.n_heads,
            use_attn_mask: config.use_attn_mask,
        })
    }
}

impl Module for GptAttention {
    /// `x` `(batch, seq, dim)` to `(batch, seq, dim)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, dim) = x.dims3()?;
        let head_dim = dim / self.n_heads;
        let heads =
            |t: Tensor| -> Result<Tensor> { t.reshape((b, s, self.n_heads, head_dim))?.transpose(1, 2)?.contiguous() };
        let q = heads(self.wq.forward(x)?)?;
        let k = heads(self.wk.forward(x)?)?;
        let v = heads(self.wv.forward(x)?)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (head_dim as f64).sqrt()))?;
        let scores = if self.use_attn_mask {
            scores.broadcast_add(&causal_mask(s, None, scores.dtype(), scores.device())?)?
        } else {
            scores
        };
        let out = softmax_last_dim(&scores)?.matmul(&v)?; // (b, heads, s, head_dim)
        let out = out.transpose(1, 2)?.contiguous()?.reshape((b, s, dim))?;
        self.wo.forward(&out)
    }
}

/// `w2(gelu(w1(x)))` with the exact (erf) GELU of `nn.GELU()`.
#[derive(Clone, Debug, Shardable)]
pub struct GptFeedForward {
    /// `(hidden_dim, dim)` with bias: the expansion before the GELU.
    pub w1: Linear,
    /// `(dim, hidden_dim)` with bias: the projection back.
    pub w2: Linear,
}

impl GptFeedForward {
    /// `w1` and `w2` under `vb`, with PyTorch's default `nn.Linear` initialisation.
    pub fn new(dim: usize, hidden_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { w1: torch_linear(dim, hidden_dim, vb.pp("w1"))?, w2: torch_linear(hidden_dim, dim, vb.pp("w2"))? })
    }
}

impl Module for GptFeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.w2.forward(&self.w1.forward(x)?.gelu_erf()?)
    }
}

/// One pre-norm block: `h = x + attention(attention_norm(x)); h + feed_forward(ffn_norm(h))`.
/// The hidden size of the feed-forward is `4 · dim`.
#[derive(Clone, Debug, Shardable)]
pub struct GptBlock {
    /// The LayerNorm before the attention.
    pub attention_norm: LayerNorm,
    /// The self-attention.
    pub attention: GptAttention,
    /// The LayerNorm before the feed-forward.
    pub ffn_norm: LayerNorm,
    /// The feed-forward.
    pub feed_forward: GptFeedForward,
}

impl GptBlock {
    /// One block, its parameters under `vb` with PyTorch's names.
    pub fn new(config: &GptConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attention_norm: config.norm(vb.pp("attention_norm"))?,
            attention: GptAttention::new(config, vb.pp("attention"))?,
            ffn_norm: config.norm(vb.pp("ffn_norm"))?,
            feed_forward: GptFeedForward::new(config.dim, 4 * config.dim, vb.pp("feed_forward"))?,
        })
    }
}

impl Module for GptBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = (x + self.attention.forward(&layer_norm(&self.attention_norm, x)?)?)?;
        &h + self.feed_forward.forward(&layer_norm(&self.ffn_norm, &h)?)?
    }
}

/// The model (see the module documentation).
#[derive(Debug, Shardable)]
#[fsdp(forward_order(tok_embeddings, pos_embeddings, layers, norm, output))]
pub struct Gpt {
    /// The token embedding, `(vocab_size, dim)`, initialised `N(0, 1)`.
    pub tok_embeddings: Embedding,
    /// The learned position embedding, `(max_seq_len, dim)`, initialised `N(0, 1)`.
    pub pos_embeddings: Embedding,
    /// The blocks, each an FSDP unit.
    pub layers: Vec<Unit<GptBlock>>,
    /// The final LayerNorm, before `output`.
    pub norm: LayerNorm,
    /// `Linear(dim, vocab_size, bias=False)`; tied: its weight is `tok_embeddings.weight`.
    pub output: LinearNoBias,
    /// The hyper-parameters the model was built with.
    #[fsdp(skip)]
    pub config: GptConfig,
}

impl Gpt {
    /// Creates the parameters under `vb` with PyTorch's names (`layers.0.…`). Fails unless
    /// `dim` is a positive multiple of `n_heads`.
    pub fn new(config: &GptConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let embedding = |rows: usize, name: &str| -> Result<Embedding> {
            let weight =
                vb.pp(name).get_with_hints((rows, config.dim), "weight", Init::Randn { mean: 0.0, stdev: 1.0 })?;
            Ok(Embedding::new(weight, config.dim))
        };
        let tok_embeddings = embedding(config.vocab_size, "tok_embeddings")?;
        let pos_embeddings = embedding(config.max_seq_len, "pos_embeddings")?;
        let layers = (0..config.n_layers)
            .map(|i| GptBlock::new(config, vb.pp("layers").pp(i)).map(Unit::new))
            .collect::<Result<_>>()?;
        let output = if config.weight_tying {
            LinearNoBias { weight: tok_embeddings.embeddings().clone() }
        } else {
            config.linear_no_bias(config.dim, config.vocab_size, vb.pp("output"))?
        };
        Ok(Self { tok_embeddings, pos_embeddings, layers, norm: config.norm(vb.pp("norm"))?, output, config: *config })
    }

    /// `tokens` `(batch, seq)` (u32, `seq ≤ max_seq_len`) to logits `(batch, seq, vocab_size)`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (_, seq) = tokens.dims2()?;
        if seq > self.config.max_seq_len {
            candle_core::bail!("Gpt: sequence length {seq} exceeds max_seq_len ({})", self.config.max_seq_len)
        }
        let positions = Tensor::arange(0u32, seq as u32, tokens.device())?;
        let mut h = self.tok_embeddings.forward(tokens)?.broadcast_add(&self.pos_embeddings.forward(&positions)?)?;
        for layer in &self.layers {
            h = layer.forward(&h)?;
        }
        self.output.forward(&layer_norm(&self.norm, &h)?)
    }
}
