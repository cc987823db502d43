//! A small Llama-style decoder-only language model with the Hugging Face parameter names
//! (`LlamaForCausalLM`):
//!
//! ```text
//! model.embed_tokens.weight
//! model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
//! model.layers.{i}.mlp.{gate,up,down}_proj.weight
//! model.layers.{i}.input_layernorm.weight, model.layers.{i}.post_attention_layernorm.weight
//! model.norm.weight
//! lm_head.weight
//! ```
//!
//! Pre-norm decoder layers with RMSNorm, rotary position embeddings (the Hugging Face
//! "rotate half" convention), causal self-attention with optional grouped key/value heads,
//! a SiLU-gated MLP, no biases and an untied `lm_head`. Each decoder layer is an FSDP
//! [`Unit`]; the root unit holds the embedding, the final norm and `lm_head`.
//!
//! Initialisation follows Hugging Face: `N(0, initializer_range)` for every matrix, norm
//! weights 1.

use super::{affine, rms_norm, softmax_last_dim};
use crate::{Shardable, Unit};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Init, RmsNorm, VarBuilder};

/// The hyper-parameters of [`Llama`] (Hugging Face `LlamaConfig` names); `Default` is a
/// small model for tests.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub initializer_range: f64,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            vocab_size: 128,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            initializer_range: 0.02,
        }
    }
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn validate(&self) -> Result<()> {
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads;
        if heads == 0 || !self.hidden_size.is_multiple_of(heads) {
            candle_core::bail!(
                "Llama: hidden_size ({}) must be a positive multiple of num_attention_heads ({heads})",
                self.hidden_size
            )
        }
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            candle_core::bail!(
                "Llama: num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            )
        }
        if !self.head_dim().is_multiple_of(2) {
            candle_core::bail!("Llama: the head dimension ({}) must be even for rotary embeddings", self.head_dim())
        }
        Ok(())
    }

    fn linear(&self, in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<LinearNoBias> {
        let init = Init::Randn { mean: 0.0, stdev: self.initializer_range };
        Ok(LinearNoBias { weight: vb.get_with_hints((out_dim, in_dim), "weight", init)? })
    }

    fn norm(&self, vb: VarBuilder) -> Result<RmsNorm> {
        candle_nn::rms_norm(self.hidden_size, self.rms_norm_eps, vb)
    }
}

/// A linear layer without bias (`nn.Linear(in, out, bias=False)`), `x @ weight.T`.
///
/// candle-nn's `Linear` has an optional bias, so its schema lists a `bias` template that
/// may be present; this layer has none, so the static table of [`Llama`] lists exactly the
/// Hugging Face names.
#[derive(Clone, Debug, Shardable)]
pub struct LinearNoBias {
    /// `(out_features, in_features)`.
    pub weight: Tensor,
}

impl Module for LinearNoBias {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        affine(x, &self.weight, None)
    }
}

/// Precomputed rotary-embedding tables: `cos` and `sin` of `position · θ^(-2j/head_dim)`,
/// each `(max_position_embeddings, head_dim / 2)`. Not parameters.
#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RotaryEmbedding {
    /// The tables are computed in f32 (as Hugging Face does), or in f64 for an f64 model,
    /// and stored in `dtype`.
    pub fn new(config: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let head_dim = config.head_dim();
        let half = head_dim / 2;
        let internal = at_least_f32(dtype);
        let inv_freq: Vec<f64> =
            (0..half).map(|j| 1.0 / config.rope_theta.powf((2 * j) as f64 / head_dim as f64)).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?.to_dtype(internal)?;
        let positions = Tensor::arange(0u32, config.max_position_embeddings as u32, device)?
            .to_dtype(internal)?
            .reshape((config.max_position_embeddings, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        Ok(Self { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// Rotates `x` `(batch, heads, seq, head_dim)` for positions `0..seq`:
    /// `x·cos + rotate_half(x)·sin` with the half-split convention of Hugging Face Llama.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        // `rope_slow` is built from differentiable ops; the fused `rope` is forward-only.
        candle_nn::rotary_emb::rope_slow(&x.contiguous()?, &self.cos, &self.sin)
    }
}

/// Causal self-attention with rotary embeddings and grouped key/value heads.
#[derive(Clone, Debug, Shardable)]
pub struct LlamaAttention {
    pub q_proj: LinearNoBias,
    pub k_proj: LinearNoBias,
    pub v_proj: LinearNoBias,
    pub o_proj: LinearNoBias,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl LlamaAttention {
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let hidden = config.hidden_size;
        let head_dim = config.head_dim();
        let q_dim = config.num_attention_heads * head_dim;
        let kv_dim = config.num_key_value_heads * head_dim;
        Ok(Self {
            q_proj: config.linear(hidden, q_dim, vb.pp("q_proj"))?,
            k_proj: config.linear(hidden, kv_dim, vb.pp("k_proj"))?,
            v_proj: config.linear(hidden, kv_dim, vb.pp("v_proj"))?,
            o_proj: config.linear(q_dim, hidden, vb.pp("o_proj"))?,
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_key_value_heads,
            head_dim,
        })
    }

    /// `x` `(batch, seq, hidden)`; `mask` `(seq, seq)` is added to the attention scores.
    pub fn forward(&self, x: &Tensor, rotary: &RotaryEmbedding, mask: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let split = |t: Tensor, heads: usize| -> Result<Tensor> {
            t.reshape((b, s, heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = rotary.apply(&split(self.q_proj.forward(x)?, self.num_heads)?)?;
        let k = rotary.apply(&split(self.k_proj.forward(x)?, self.num_kv_heads)?)?;
        let v = split(self.v_proj.forward(x)?, self.num_kv_heads)?;
        let k = self.repeat_kv(k)?;
        let v = self.repeat_kv(v)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(mask)?;
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

/// The SiLU-gated MLP: `down_proj(silu(gate_proj(x)) · up_proj(x))`.
#[derive(Clone, Debug, Shardable)]
pub struct LlamaMlp {
    pub gate_proj: LinearNoBias,
    pub up_proj: LinearNoBias,
    pub down_proj: LinearNoBias,
}

impl LlamaMlp {
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        Ok(Self {
            gate_proj: config.linear(hidden, inter, vb.pp("gate_proj"))?,
            up_proj: config.linear(hidden, inter, vb.pp("up_proj"))?,
            down_proj: config.linear(inter, hidden, vb.pp("down_proj"))?,
        })
    }
}

impl Module for LlamaMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

/// One pre-norm decoder layer:
/// `x = x + self_attn(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x))`.
///
/// The fields are declared in Hugging Face's registration order (the state-dict order);
/// `forward_order` records the order the forward uses them.
#[derive(Clone, Debug, Shardable)]
#[fsdp(forward_order(input_layernorm, self_attn, post_attention_layernorm, mlp))]
pub struct LlamaDecoderLayer {
    pub self_attn: LlamaAttention,
    pub mlp: LlamaMlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl LlamaDecoderLayer {
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: LlamaAttention::new(config, vb.pp("self_attn"))?,
            mlp: LlamaMlp::new(config, vb.pp("mlp"))?,
            input_layernorm: config.norm(vb.pp("input_layernorm"))?,
            post_attention_layernorm: config.norm(vb.pp("post_attention_layernorm"))?,
        })
    }

    /// `x` `(batch, seq, hidden)` to `(batch, seq, hidden)`.
    pub fn forward(&self, x: &Tensor, rotary: &RotaryEmbedding, mask: &Tensor) -> Result<Tensor> {
        let h = self.self_attn.forward(&rms_norm(&self.input_layernorm, x)?, rotary, mask)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&rms_norm(&self.post_attention_layernorm, &x)?)?;
        x + h
    }
}

/// The causal language model (see the module documentation).
#[derive(Debug, Shardable)]
pub struct Llama {
    #[fsdp(rename = "model.embed_tokens")]
    pub embed_tokens: Embedding,
    #[fsdp(rename = "model.layers")]
    pub layers: Vec<Unit<LlamaDecoderLayer>>,
    #[fsdp(rename = "model.norm")]
    pub norm: RmsNorm,
    pub lm_head: LinearNoBias,
    /// Position tables, not parameters.
    #[fsdp(skip)]
    pub rotary: RotaryEmbedding,
    #[fsdp(skip)]
    pub config: LlamaConfig,
}

impl Llama {
    /// Creates the parameters under `vb` with the Hugging Face names (`model.layers.0.…`).
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let model = vb.pp("model");
        let embed_tokens = candle_nn::Embedding::new(
            model.pp("embed_tokens").get_with_hints(
                (config.vocab_size, config.hidden_size),
                "weight",
                Init::Randn { mean: 0.0, stdev: config.initializer_range },
            )?,
            config.hidden_size,
        );
        let layers = (0..config.num_hidden_layers)
            .map(|i| LlamaDecoderLayer::new(config, model.pp("layers").pp(i)).map(Unit::new))
            .collect::<Result<_>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: config.norm(model.pp("norm"))?,
            lm_head: config.linear(config.hidden_size, config.vocab_size, vb.pp("lm_head"))?,
            rotary: RotaryEmbedding::new(config, vb.dtype(), vb.device())?,
            config: config.clone(),
        })
    }

    /// `input_ids` `(batch, seq)` (u32) to logits `(batch, seq, vocab_size)`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, seq) = input_ids.dims2()?;
        if seq > self.config.max_position_embeddings {
            candle_core::bail!(
                "Llama: sequence length {seq} exceeds max_position_embeddings ({})",
                self.config.max_position_embeddings
            )
        }
        let mut x = self.embed_tokens.forward(input_ids)?;
        let mask = causal_mask(seq, x.dtype(), x.device())?;
        for layer in &self.layers {
            x = layer.run(x, |layer, x| layer.forward(&x, &self.rotary, &mask))?;
        }
        self.lm_head.forward(&rms_norm(&self.norm, &x)?)
    }
}

/// `(seq, seq)`: 0 where key position ≤ query position, −∞ above the diagonal.
pub(crate) fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..seq).flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (seq, seq), device)?.to_dtype(dtype)
}

/// f32 for half-precision types and f32 itself; f64 stays f64.
fn at_least_f32(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}
