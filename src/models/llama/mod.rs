//! A Llama-style decoder-only language model with the Hugging Face parameter names
//! (`LlamaForCausalLM`), and the families of the same shape it also computes
//! ([`Family`]: Qwen2, Qwen3, Mistral, Phi-3, Mixtral, Gemma 2 and 3):
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
//! "rotate half" convention, optionally with Llama 3.1's frequency scaling), causal
//! self-attention with optional grouped key/value heads and an explicit head dimension, a
//! gated MLP, and an `lm_head` that may be tied to the embedding; each family's additions
//! are optional fields and settings. Each decoder layer is an FSDP [`Unit`]; the root unit
//! holds the embedding, the final norm and `lm_head`.
//!
//! One file per part: `config` ([`LlamaConfig`], read from a Hugging Face `config.json`
//! by allow-list, refusing by name every setting the model does not compute), `rotary`,
//! `attention`, `mlp`, `decoder_layer`, and here the model.
//!
//! Initialisation follows Hugging Face: `N(0, initializer_range)` for every matrix, norm
//! weights 1 (0 for Gemma's `1 + w` norms).

mod attention;
mod config;
mod decoder_layer;
mod mlp;
mod rotary;

pub use attention::LlamaAttention;
pub(crate) use config::{read_rope, read_scaling};
pub use config::{Family, LlamaConfig, RopeScaling};
pub use decoder_layer::LlamaDecoderLayer;
pub use mlp::{Activation, LlamaMlp};
pub use rotary::RotaryEmbedding;

use super::gemma::softcap;
use super::moe::{load_balancing_loss, MoeConfig};
use super::{affine, rms_norm, Kernels};
use crate::{Shardable, Unit};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Init, RmsNorm, VarBuilder};

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

/// The causal language model (see the module documentation).
#[derive(Debug, Shardable)]
pub struct Llama {
    /// The token embedding, `(vocab_size, hidden_size)` (`model.embed_tokens.weight`).
    #[fsdp(rename = "model.embed_tokens")]
    pub embed_tokens: Embedding,
    /// The decoder layers, each an FSDP unit (`model.layers.{i}`).
    #[fsdp(rename = "model.layers")]
    pub layers: Vec<Unit<LlamaDecoderLayer>>,
    /// The final RMSNorm (`model.norm.weight`).
    #[fsdp(rename = "model.norm")]
    pub norm: RmsNorm,
    /// The output projection, `(vocab_size, hidden_size)`; tied, its weight is the
    /// embedding's.
    pub lm_head: LinearNoBias,
    /// Position tables, not parameters.
    #[fsdp(skip)]
    pub rotary: RotaryEmbedding,
    /// Gemma 3's tables of the sliding layers (their own rotary base).
    #[fsdp(skip)]
    pub local_rotary: Option<RotaryEmbedding>,
    /// The hyper-parameters the model was built with.
    #[fsdp(skip)]
    pub config: LlamaConfig,
}

impl Llama {
    /// Creates the parameters under `vb` with the Hugging Face names (`model.layers.0.…`).
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let model = vb.pp("model");
        let embedding = model.pp("embed_tokens").get_with_hints(
            (config.vocab_size, config.hidden_size),
            "weight",
            Init::Randn { mean: 0.0, stdev: config.initializer_range },
        )?;
        // A tied head is the embedding tensor itself: the layout sees one parameter under
        // two names, and checkpoints hold it once, as Hugging Face does.
        let lm_head = if config.tie_word_embeddings {
            LinearNoBias { weight: embedding.clone() }
        } else {
            let weight =
                vb.pp("lm_head").get_with_hints((config.vocab_size, config.hidden_size), "weight", config.init())?;
            LinearNoBias { weight }
        };
        let embed_tokens = candle_nn::Embedding::new(embedding, config.hidden_size);
        let layers: Vec<LlamaDecoderLayer> = (0..config.num_hidden_layers)
            .map(|i| LlamaDecoderLayer::new(config, i, model.pp("layers").pp(i)))
            .collect::<Result<_>>()?;
        if let Some(lora) = &config.lora {
            let mut projections = layers.iter().flat_map(|l| l.projections());
            if !projections.any(|p| p.lora_a.is_some()) {
                candle_core::bail!(
                    "LoRA: the target modules {:?} name none of this model's projections",
                    lora.target_modules
                )
            }
        }
        let layers = layers.into_iter().map(Unit::new).collect();
        Ok(Self {
            embed_tokens,
            layers,
            norm: config.norm(model.pp("norm"))?,
            lm_head,
            rotary: RotaryEmbedding::new(config, vb.dtype(), vb.device())?,
            local_rotary: config
                .gemma
                .as_ref()
                .filter(|g| g.local_rope_theta != config.rope_theta)
                .map(|g| {
                    let positions = config.max_position_embeddings;
                    RotaryEmbedding::from_base(
                        config.head_dim(),
                        g.local_rope_theta,
                        None,
                        positions,
                        vb.dtype(),
                        vb.device(),
                    )
                })
                .transpose()?,
            config: config.clone(),
        })
    }

    /// `input_ids` `(batch, seq)` (u32) to logits `(batch, seq, vocab_size)`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (x, _) = self.hidden_states(input_ids)?;
        self.logits(&norm(self.config.kernels, &self.norm, self.config.norm_offset(), &x)?)
    }

    /// The head's logits of final hidden states, soft-capped for Gemma 2.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(x)?;
        match self.config.gemma.as_ref().and_then(|g| g.final_logit_softcapping) {
            Some(cap) => softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    /// The mean next-token cross-entropy of `input_ids` `(batch, seq)` against `targets`
    /// `(batch, seq)` (u32): the loss of [`Llama::forward`]'s logits. With the fused
    /// kernels the output projection and the loss are one op, so the
    /// `batch · seq × vocab_size` logits never exist whole.
    ///
    /// With Mixtral's experts and `router_aux_loss_coef`, the router's load-balancing loss
    /// over every layer, times the coefficient, is added (as `MixtralForCausalLM` does with
    /// `output_router_logits`).
    pub fn loss(&self, input_ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (hidden_states, router_logits) = self.hidden_states(input_ids)?;
        let x = norm(self.config.kernels, &self.norm, self.config.norm_offset(), &hidden_states)?;
        let (b, s, hidden) = x.dims3()?;
        let (x, targets) = (x.reshape((b * s, hidden))?, targets.reshape(b * s)?);
        let capped = self.config.gemma.as_ref().is_some_and(|g| g.final_logit_softcapping.is_some());
        let loss = match self.config.kernels {
            // The fused head and loss cannot soft-cap the logits between them.
            Kernels::Fused if !capped => crate::ops::linear_cross_entropy(&x, &self.lm_head.weight, &targets)?,
            _ => {
                let log_probs = super::log_softmax_last_dim(&self.logits(&x)?)?;
                log_probs.gather(&targets.unsqueeze(1)?, 1)?.mean_all()?.neg()?
            }
        };
        match &self.config.moe {
            Some(MoeConfig { router_aux_loss_coef: Some(coef), top_k, .. }) => {
                let aux = (load_balancing_loss(&router_logits, *top_k)? * *coef)?.to_dtype(loss.dtype())?;
                loss + aux
            }
            _ => Ok(loss),
        }
    }

    /// The last decoder layer's output, `(batch, seq, hidden_size)`, and with experts each
    /// layer's router logits.
    fn hidden_states(&self, input_ids: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let (_, seq) = input_ids.dims2()?;
        if seq > self.config.max_position_embeddings {
            candle_core::bail!(
                "Llama: sequence length {seq} exceeds max_position_embeddings ({})",
                self.config.max_position_embeddings
            )
        }
        let mut x = self.embed_tokens.forward(input_ids)?;
        if let Some(pad) = self.config.pad_token_id {
            // `nn.Embedding`'s `padding_idx`: the lookup of the padding token passes no
            // gradient to its row.
            let padding = input_ids.eq(pad)?.unsqueeze(2)?.broadcast_as(x.shape())?;
            x = padding.where_cond(&x.detach(), &x)?;
        }
        if self.config.gemma.is_some() {
            // Gemma scales its embeddings by √hidden_size rounded to their dtype.
            let scale = Tensor::new((self.config.hidden_size as f64).sqrt(), x.device())?.to_dtype(x.dtype())?;
            x = (x * scale.to_dtype(DType::F64)?.to_scalar::<f64>()?)?;
        }
        // The fused attention is causal by construction: no mask to build, unless a
        // sliding window shorter than the sequence or a soft cap sends attention the
        // composed way. Layers differ in their window (Gemma's alternate).
        let capped = self.config.gemma.as_ref().is_some_and(|g| g.attn_logit_softcapping.is_some());
        let (dtype, device) = (x.dtype(), x.device().clone());
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        let mut mask_of = |window: Option<usize>| -> Result<Tensor> {
            if let Some((_, mask)) = masks.iter().find(|(w, _)| *w == window) {
                return Ok(mask.clone());
            }
            let mask = match self.config.kernels {
                Kernels::Fused if !capped && !windowed(window, seq) => Tensor::zeros((), dtype, &device)?,
                _ => causal_mask(seq, window, dtype, &device)?,
            };
            masks.push((window, mask.clone()));
            Ok(mask)
        };
        let mut router_logits = Vec::new();
        for (index, layer) in self.layers.iter().enumerate() {
            let mask = mask_of(self.config.layer_window(index))?;
            let local = self.config.gemma.as_ref().is_some_and(|g| g.sliding_layers.get(index) == Some(&true));
            let rotary = match (&self.local_rotary, local) {
                (Some(local_rotary), true) => local_rotary,
                _ => &self.rotary,
            };
            let (cos, sin) = (&rotary.cos, &rotary.sin);
            // Everything the layer reads comes in as an input, so that a checkpointed layer
            // can run its forward again in backward.
            let (out, logits) = layer
                .run_fn((x, mask.clone(), cos.clone(), sin.clone()), |layer, (x, mask, cos, sin)| {
                    layer.forward(&x, &RotaryEmbedding { cos, sin }, &mask)
                })?;
            x = out;
            router_logits.extend(logits);
        }
        Ok((x, router_logits))
    }
}

/// An RMSNorm on the kernels asked for, its weight plus `offset` (Gemma's `1 + w`).
fn norm(kernels: Kernels, norm: &RmsNorm, offset: f64, x: &Tensor) -> Result<Tensor> {
    let shifted;
    let norm = if offset == 0.0 {
        norm
    } else {
        shifted = RmsNorm::new((norm.weight() + offset)?, norm.eps());
        &shifted
    };
    match kernels {
        Kernels::Fused => crate::ops::rms_norm(x, norm.weight(), norm.eps()),
        Kernels::Composed => rms_norm(norm, x),
    }
}

/// `(seq, seq)`: 0 where key position `j` may be attended from query position `i`
/// (`j ≤ i`, and `j > i - window` with a window), −∞ elsewhere.
pub(crate) fn causal_mask(seq: usize, window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
    let seen = move |i: usize, j: usize| j <= i && window.is_none_or(|w| j + w > i);
    let mask: Vec<f32> =
        (0..seq).flat_map(|i| (0..seq).map(move |j| if seen(i, j) { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(mask, (seq, seq), device)?.to_dtype(dtype)
}

/// Whether a sliding window hides anything from a sequence of `seq` positions.
fn windowed(window: Option<usize>, seq: usize) -> bool {
    window.is_some_and(|w| w < seq)
}

/// f32 for half-precision types and f32 itself; f64 stays f64.
fn at_least_f32(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}
