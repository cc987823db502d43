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
//! "rotate half" convention, optionally with Llama 3.1's frequency scaling), causal
//! self-attention with optional grouped key/value heads and an explicit head dimension, a
//! SiLU-gated MLP, no biases, and an `lm_head` that may be tied to the embedding. Each
//! decoder layer is an FSDP [`Unit`]; the root unit holds the embedding, the final norm
//! and `lm_head`.
//!
//! [`LlamaConfig::from_hf_json`] reads a Hugging Face `config.json` and refuses, by name,
//! every setting this model does not compute (biases, another activation, another rope
//! scaling, another architecture), so a checkpoint is never run with different arithmetic.
//!
//! Initialisation follows Hugging Face: `N(0, initializer_range)` for every matrix, norm
//! weights 1.

use super::gemma::{softcap, GemmaSettings};
use super::hf_config::{HfConfig, HfObject};
use super::lora::{LoraConfig, LoraLinear};
use super::moe::{load_balancing_loss, MoeConfig, SparseMoe};
use super::{affine, rms_norm, softmax_last_dim, Kernels};
use crate::{Shardable, Unit};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Init, RmsNorm, VarBuilder};
use serde_json::Value;
use std::path::Path;

/// The hyper-parameters of [`Llama`] (Hugging Face `LlamaConfig` names); `Default` is a
/// small model for tests.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// The number of token ids (rows of `embed_tokens` and `lm_head`).
    pub vocab_size: usize,
    /// The model width.
    pub hidden_size: usize,
    /// The MLP's hidden width.
    pub intermediate_size: usize,
    /// The number of decoder layers.
    pub num_hidden_layers: usize,
    /// The number of query heads.
    pub num_attention_heads: usize,
    /// The number of key/value heads; it divides `num_attention_heads` (fewer: grouped-query
    /// attention).
    pub num_key_value_heads: usize,
    /// The longest sequence the model accepts (rows of the rotary tables).
    pub max_position_embeddings: usize,
    /// The `eps` inside the square root of every RMSNorm.
    pub rms_norm_eps: f64,
    /// The rotary base θ.
    pub rope_theta: f64,
    /// The standard deviation of the `N(0, σ)` initialisation of every matrix.
    pub initializer_range: f64,
    /// The attention head dimension, when it is not `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// `lm_head` reuses the embedding matrix (no `lm_head.weight` of its own).
    pub tie_word_embeddings: bool,
    /// Llama 3.1's rotary frequency scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// The kernels the forward runs on (not part of a Hugging Face config).
    pub kernels: Kernels,
    /// LoRA adapters on the attention and MLP projections it targets (not part of a
    /// Hugging Face config; PEFT keeps it in `adapter_config.json`).
    pub lora: Option<LoraConfig>,
    /// Which Hugging Face architecture of this shape the model is (its `model_type`).
    pub family: Family,
    /// Biases on the query, key and value projections (Qwen2's).
    pub qkv_bias: bool,
    /// An RMSNorm over each query and key head before the rotation (Qwen3's `q_norm`,
    /// `k_norm`).
    pub qk_norm: bool,
    /// Each position attends to itself and the `sliding_window - 1` before it (Mistral's).
    pub sliding_window: Option<usize>,
    /// Mixtral's sparse experts in place of the MLP.
    pub moe: Option<MoeConfig>,
    /// Gemma 2's and 3's norms, GeGLU MLP, scalings, soft-capping and per-layer windows
    /// (see [`super::gemma`]); the window is [`LlamaConfig::sliding_window`].
    pub gemma: Option<GemmaSettings>,
    /// The padding token (`pad_token_id`): as `nn.Embedding`'s `padding_idx`, its
    /// embedding row gets no gradient from the lookup.
    pub pad_token_id: Option<u32>,
}

/// The Hugging Face architectures [`Llama`] computes: the same pre-norm decoder with
/// rotary embeddings, grouped key/value heads and a SiLU-gated MLP, and each family's own
/// additions ([`LlamaConfig::qkv_bias`], [`LlamaConfig::qk_norm`],
/// [`LlamaConfig::sliding_window`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Family {
    /// `LlamaForCausalLM`.
    #[default]
    Llama,
    /// `Qwen2ForCausalLM` (Qwen2 and Qwen2.5): biases on q, k and v.
    Qwen2,
    /// `Qwen3ForCausalLM`: a per-head RMSNorm on q and k.
    Qwen3,
    /// `MistralForCausalLM`: attention within a sliding window.
    Mistral,
    /// `Phi3ForCausalLM`: q, k and v in one projection (`qkv_proj`), gate and up in one
    /// (`gate_up_proj`), and Mistral's window.
    Phi3,
    /// `MixtralForCausalLM`: Mistral with sparse experts in place of the MLP.
    Mixtral,
    /// `Gemma2ForCausalLM` (see [`super::gemma`]).
    Gemma2,
    /// `Gemma3ForCausalLM`, `model_type` `gemma3_text`: Gemma 2 with per-head q/k norms,
    /// no soft-capping and a local rotary base for the sliding layers.
    Gemma3,
}

impl Family {
    const ALL: [Family; 8] = [
        Family::Llama,
        Family::Qwen2,
        Family::Qwen3,
        Family::Mistral,
        Family::Phi3,
        Family::Mixtral,
        Family::Gemma2,
        Family::Gemma3,
    ];

    /// The `model_type` of its `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Mistral => "mistral",
            Family::Phi3 => "phi3",
            Family::Mixtral => "mixtral",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
        }
    }

    /// The `architectures` entry of its `config.json`.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }
}

/// Llama 3.1's rotary scaling (Hugging Face `rope_type: "llama3"`): frequencies whose
/// wavelength exceeds `original_max_position_embeddings / low_freq_factor` are divided by
/// `factor`, those below `original_max_position_embeddings / high_freq_factor` kept, and
/// those between interpolated smoothly.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeScaling {
    /// What the low frequencies are divided by.
    pub factor: f64,
    /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the frequencies were made for, before scaling.
    pub original_max_position_embeddings: usize,
}

impl RopeScaling {
    fn scale(&self, inv_freq: f64) -> f64 {
        let original = self.original_max_position_embeddings as f64;
        let wavelength = 2.0 * std::f64::consts::PI / inv_freq;
        if wavelength < original / self.high_freq_factor {
            inv_freq
        } else if wavelength > original / self.low_freq_factor {
            inv_freq / self.factor
        } else {
            let smooth =
                (original / wavelength - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * inv_freq / self.factor + smooth * inv_freq
        }
    }
}

/// The rotary base and scaling from either layout: transformers 5's `rope_parameters`,
/// or the top-level `rope_theta` and `rope_scaling` of 4.x. Where both are given they
/// must agree.
pub(super) fn read_rope(hf: &mut HfConfig) -> Result<(f64, Option<RopeScaling>)> {
    let flat_theta = hf.f64("rope_theta")?;
    let flat_scaling = match hf.object("rope_scaling")? {
        Some(keys) => Some(read_scaling(hf, HfObject::new("rope_scaling", keys))?),
        None => None,
    };
    let Some(nested) = hf.object("rope_parameters")? else {
        let (inner_theta, scaling) = flat_scaling.unwrap_or((None, None));
        return Ok((flat_theta.or(inner_theta).unwrap_or(10_000.0), scaling));
    };
    let (theta, scaling) = read_scaling(hf, HfObject::new("rope_parameters", nested))?;
    let theta = theta.or(flat_theta).unwrap_or(10_000.0);
    if let Some(flat) = flat_theta.filter(|&flat| flat != theta) {
        return hf.refuse(format!("`rope_theta` is {flat} but `rope_parameters.rope_theta` is {theta}"));
    }
    if let Some((flat_inner_theta, flat)) = flat_scaling {
        if flat != scaling || flat_inner_theta.is_some_and(|t| t != theta) {
            return hf.refuse("`rope_scaling` and `rope_parameters` describe different rotary embeddings".into());
        }
    }
    Ok((theta, scaling))
}

/// One rotary description (`rope_scaling`, or `rope_parameters` with its `rope_theta`):
/// the base it gives, if any, and the scaling, `None` for the plain one.
pub(super) fn read_scaling(hf: &HfConfig, mut keys: HfObject) -> Result<(Option<f64>, Option<RopeScaling>)> {
    let theta = match keys.take("rope_theta") {
        Some(value) => Some(value.as_f64().ok_or_else(|| {
            candle_core::Error::Msg(format!("`{}.rope_theta` is {value}, not a number", keys.parent()))
        })?),
        None => None,
    };
    if let Some(factor) = keys.take("partial_rotary_factor") {
        if factor.as_f64() != Some(1.0) {
            return hf.refuse(format!("`{}.partial_rotary_factor` is {factor} (only 1.0)", keys.parent()));
        }
    }
    // transformers writes `rope_type`; older configs `type`.
    let kind = match keys.string("rope_type")? {
        Some(kind) => Some(kind),
        None => keys.string("type")?,
    };
    let scaling = match kind.as_deref() {
        Some("default") => None,
        Some("llama3") => Some(RopeScaling {
            factor: keys.required_f64("factor")?,
            low_freq_factor: keys.required_f64("low_freq_factor")?,
            high_freq_factor: keys.required_f64("high_freq_factor")?,
            original_max_position_embeddings: keys.required_f64("original_max_position_embeddings")? as usize,
        }),
        Some(other) => {
            return hf.refuse(format!("`{}` of type `{other}` (only `default` and `llama3`)", keys.parent()))
        }
        None => return hf.refuse(format!("`{}` without a `rope_type`", keys.parent())),
    };
    keys.finish()?;
    Ok((theta, scaling))
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
            head_dim: None,
            tie_word_embeddings: false,
            rope_scaling: None,
            kernels: Kernels::Fused,
            lora: None,
            family: Family::Llama,
            qkv_bias: false,
            qk_norm: false,
            sliding_window: None,
            moe: None,
            gemma: None,
            pad_token_id: None,
        }
    }
}

impl LlamaConfig {
    /// Reads a Hugging Face Llama `config.json` (see [`LlamaConfig::from_hf_json`]).
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::Msg(format!("cannot read {}: {e}", path.display())))?;
        Self::from_hf_json(&text).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
    }

    /// Parses a Hugging Face `config.json` of a [`Family`] (`model_type` `llama`, `qwen2`,
    /// `qwen3`, `mistral` or `phi3`), written by transformers 4 (top-level `rope_theta` and
    /// `rope_scaling`) or 5 (both inside `rope_parameters`). It is read by allow-list: a
    /// setting this model does not compute is refused by its key, never loaded into
    /// different arithmetic (`attention_bias` or `mlp_bias` true, a `hidden_act` other
    /// than `silu`, a rotary scaling other than `llama3`, the two rotary layouts
    /// disagreeing, a Llama's `sliding_window`, Qwen's `use_sliding_window`, another
    /// `model_type`), and so is a key the reader does not know.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let mut hf = HfConfig::parse(text, "Llama-family")?;
        let family = match hf.string("model_type")? {
            None => Family::Llama,
            Some(kind) => match Family::ALL.into_iter().find(|f| f.model_type() == kind) {
                Some(family) => family,
                None => {
                    return hf.refuse(format!(
                        "`model_type` is `{kind}` (llama, qwen2, qwen3, mistral, phi3, mixtral, gemma2 or gemma3_text)"
                    ))
                }
            },
        };
        if let Some(architectures) = hf.take("architectures") {
            if architectures != serde_json::json!([family.architecture()]) {
                let only = family.architecture();
                return hf.refuse(format!(
                    "`architectures` is {architectures} (only [\"{only}\"] for `{}`)",
                    family.model_type()
                ));
            }
        }
        if !family.is_gemma() {
            if let Some(act) = hf.string("hidden_act")?.filter(|a| a != "silu") {
                return hf.refuse(format!("`hidden_act` is `{act}` (only `silu`)"));
            }
        }
        let num_hidden_layers = hf.required_usize("num_hidden_layers")?;
        let gemma = match family.is_gemma() {
            true => Some(super::gemma::read(&mut hf, family, num_hidden_layers)?),
            false => None,
        };
        if hf.bool("attention_bias")? == Some(true) {
            return hf.refuse("`attention_bias` is true".into());
        }
        if hf.bool("mlp_bias")? == Some(true) {
            return hf.refuse("`mlp_bias` is true".into());
        }
        if let Some(p) = hf.f64("attention_dropout")?.filter(|&p| p != 0.0) {
            return hf.refuse(format!("`attention_dropout` is {p} (the model has no dropout)"));
        }
        let sliding_window = match family {
            Family::Llama => match hf.take("sliding_window") {
                Some(_) => return hf.refuse("`sliding_window` is set".into()),
                None => None,
            },
            Family::Mistral | Family::Mixtral => hf.usize("sliding_window")?,
            Family::Phi3 => {
                for dropout in ["embd_pdrop", "resid_pdrop"] {
                    if let Some(p) = hf.f64(dropout)?.filter(|&p| p != 0.0) {
                        return hf.refuse(format!("`{dropout}` is {p} (the model has no dropout)"));
                    }
                }
                // The context the long-rope scaling starts from: refused with the scaling.
                hf.usize("original_max_position_embeddings")?;
                hf.usize("sliding_window")?
            }
            Family::Qwen2 | Family::Qwen3 => {
                // Qwen keeps a window size and the layers it would apply to even when the
                // window is off; only `use_sliding_window` turns it on.
                hf.only("use_sliding_window", false.into())?;
                hf.usize("sliding_window")?;
                hf.usize("max_window_layers")?;
                None
            }
            Family::Gemma2 | Family::Gemma3 => gemma.as_ref().map(|(_, _, window)| *window),
        };
        let moe = match family {
            Family::Mixtral => {
                if let Some(noise) = hf.f64("router_jitter_noise")?.filter(|&n| n != 0.0) {
                    return hf
                        .refuse(format!("`router_jitter_noise` is {noise} (the router takes its inputs as they are)"));
                }
                let coef = hf.f64("router_aux_loss_coef")?.unwrap_or(0.001);
                let with_aux_loss = hf.bool("output_router_logits")?.unwrap_or(false);
                Some(MoeConfig {
                    num_experts: hf.required_usize("num_local_experts")?,
                    top_k: hf.usize("num_experts_per_tok")?.unwrap_or(2),
                    router_aux_loss_coef: with_aux_loss.then_some(coef),
                })
            }
            _ => None,
        };
        if let Some(Value::Array(kinds)) = hf.take("layer_types") {
            let computed = if sliding_window.is_some() { "sliding_attention" } else { "full_attention" };
            if let Some(other) = kinds.iter().find(|k| k.as_str() != Some(computed)) {
                return hf.refuse(format!("`layer_types` holds {other} (only \"{computed}\" here)"));
            }
        }
        if let Some(factor) = hf.f64("partial_rotary_factor")?.filter(|&f| f != 1.0) {
            return hf.refuse(format!("`partial_rotary_factor` is {factor} (only 1.0)"));
        }
        hf.only("pretraining_tp", 1.into())?;
        hf.only("rope_interleaved", false.into())?;
        let (rope_theta, rope_scaling) = match &gemma {
            Some((_, theta, _)) => (*theta, None),
            None => read_rope(&mut hf)?,
        };
        let num_attention_heads = hf.required_usize("num_attention_heads")?;
        let config = Self {
            vocab_size: hf.required_usize("vocab_size")?,
            hidden_size: hf.required_usize("hidden_size")?,
            intermediate_size: hf.required_usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: hf.usize("num_key_value_heads")?.unwrap_or(num_attention_heads),
            max_position_embeddings: hf.usize("max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: hf.f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            initializer_range: hf.f64("initializer_range")?.unwrap_or(0.02),
            head_dim: hf.usize("head_dim")?.or(family.is_gemma().then_some(256)),
            tie_word_embeddings: hf.bool("tie_word_embeddings")?.unwrap_or(family.is_gemma()),
            rope_scaling,
            kernels: Kernels::default(),
            lora: None,
            family,
            qkv_bias: family == Family::Qwen2,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            sliding_window,
            moe,
            gemma: gemma.map(|(settings, _, _)| settings),
            pad_token_id: hf.usize("pad_token_id")?.map(|id| id as u32),
        };
        hf.finish()?;
        config.validate()?;
        Ok(config)
    }

    /// This configuration as a Hugging Face `config.json` (what [`LlamaConfig::from_hf_json`]
    /// reads back, and what Hugging Face and candle-transformers load beside an export).
    pub fn to_hf_json(&self) -> String {
        let mut json = serde_json::json!({
            "architectures": [self.family.architecture()],
            "model_type": self.family.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
        });
        if let Some(head_dim) = self.head_dim {
            json["head_dim"] = head_dim.into();
        }
        if let Some(pad) = self.pad_token_id {
            json["pad_token_id"] = pad.into();
        }
        if !self.family.is_gemma() {
            json["hidden_act"] = "silu".into();
        }
        match self.family {
            Family::Llama => {
                json["attention_bias"] = false.into();
                json["mlp_bias"] = false.into();
            }
            Family::Gemma2 | Family::Gemma3 => {}
            Family::Qwen2 => json["use_sliding_window"] = false.into(),
            Family::Qwen3 => {
                json["attention_bias"] = false.into();
                json["use_sliding_window"] = false.into();
            }
            Family::Mistral | Family::Phi3 => json["sliding_window"] = self.sliding_window.into(),
            Family::Mixtral => {
                json["sliding_window"] = self.sliding_window.into();
                if let Some(moe) = &self.moe {
                    json["num_local_experts"] = moe.num_experts.into();
                    json["num_experts_per_tok"] = moe.top_k.into();
                    json["output_router_logits"] = moe.router_aux_loss_coef.is_some().into();
                    json["router_aux_loss_coef"] = moe.router_aux_loss_coef.unwrap_or(0.001).into();
                }
            }
        }
        // Both rotary layouts, which agree: transformers 4 (and candle-transformers) read
        // the top-level keys, transformers 5 `rope_parameters`.
        let mut rope = serde_json::json!({ "rope_type": "default", "rope_theta": self.rope_theta });
        if let Some(s) = &self.rope_scaling {
            let scaling = serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
            rope = scaling.clone();
            rope["rope_theta"] = self.rope_theta.into();
            json["rope_scaling"] = scaling;
        }
        json["rope_parameters"] = rope;
        if let (Some(settings), Some(window)) = (&self.gemma, self.sliding_window) {
            super::gemma::write(&mut json, settings, self.family, self.rope_theta, window);
        }
        serde_json::to_string_pretty(&json).expect("a JSON value serializes")
    }

    /// The attention head dimension: `head_dim` when set, else
    /// `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn validate(&self) -> Result<()> {
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads;
        if heads == 0 || (self.head_dim.is_none() && !self.hidden_size.is_multiple_of(heads)) {
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

    fn init(&self) -> Init {
        Init::Randn { mean: 0.0, stdev: self.initializer_range }
    }

    /// A projection of the attention or the MLP, with a bias if `bias`: LoRA adapters
    /// where `lora` targets it.
    fn projection(&self, in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<LoraLinear> {
        LoraLinear::new(in_dim, out_dim, self.init(), bias, self.lora.as_ref(), self.kernels, vb)
    }

    fn norm(&self, vb: VarBuilder) -> Result<RmsNorm> {
        self.norm_of(self.hidden_size, vb)
    }

    /// An RMSNorm over `size`: weights 1, or for Gemma weights 0 that scale by `1 + w`.
    fn norm_of(&self, size: usize, vb: VarBuilder) -> Result<RmsNorm> {
        let start = if self.gemma.is_some() { 0.0 } else { 1.0 };
        Ok(RmsNorm::new(vb.get_with_hints(size, "weight", Init::Const(start))?, self.rms_norm_eps))
    }

    /// What a norm weight `w` is added to before it scales: 1 for Gemma's `1 + w`.
    fn norm_offset(&self) -> f64 {
        if self.gemma.is_some() {
            1.0
        } else {
            0.0
        }
    }

    /// The window layer `layer` attends within, if any.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        match &self.gemma {
            Some(gemma) => self.sliding_window.filter(|_| gemma.sliding_layers.get(layer).copied().unwrap_or(false)),
            None => self.sliding_window,
        }
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
    /// `cos(position · θ^(-2j/head_dim))`, `(max_position_embeddings, head_dim / 2)`.
    pub cos: Tensor,
    /// `sin(position · θ^(-2j/head_dim))`, `(max_position_embeddings, head_dim / 2)`.
    pub sin: Tensor,
}

impl RotaryEmbedding {
    /// The tables are computed in f32 (as Hugging Face does), or in f64 for an f64 model,
    /// and stored in `dtype`.
    pub fn new(config: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let (head_dim, scaling) = (config.head_dim(), config.rope_scaling.as_ref());
        Self::from_base(head_dim, config.rope_theta, scaling, config.max_position_embeddings, dtype, device)
    }

    /// The tables for heads of `head_dim`, base `theta` (with Llama 3's `scaling`, if
    /// given) and positions `0..max_positions`.
    pub fn from_base(
        head_dim: usize,
        theta: f64,
        scaling: Option<&RopeScaling>,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let internal = at_least_f32(dtype);
        let inv_freq: Vec<f64> = (0..half)
            .map(|j| {
                let inv_freq = 1.0 / theta.powf((2 * j) as f64 / head_dim as f64);
                scaling.map_or(inv_freq, |scaling| scaling.scale(inv_freq))
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?.to_dtype(internal)?;
        let positions =
            Tensor::arange(0u32, max_positions as u32, device)?.to_dtype(internal)?.reshape((max_positions, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        Ok(Self { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// Rotates `x` `(batch, heads, seq, head_dim)` for positions `0..seq`:
    /// `x·cos + rotate_half(x)·sin` with the half-split convention of Hugging Face Llama,
    /// from candle's differentiable primitives (candle-nn's `rope` is forward-only).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (cos, sin) = self.tables(x.dim(2)?, x.dtype())?;
        candle_nn::rotary_emb::rope_slow(&x.contiguous()?, &cos, &sin)
    }

    /// The same rotation of `x` `(batch, seq, heads, head_dim)` by the fused op.
    pub fn apply_fused(&self, x: &Tensor) -> Result<Tensor> {
        let (cos, sin) = self.tables(x.dim(1)?, x.dtype())?;
        crate::ops::rope(x, &cos, &sin)
    }

    /// The tables' first `seq` rows in `dtype`: they follow the activations' dtype, which
    /// mixed precision may lower.
    fn tables(&self, seq: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let table = |t: &Tensor| t.narrow(0, 0, seq)?.to_dtype(dtype);
        Ok((table(&self.cos)?, table(&self.sin)?))
    }
}

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
    fn projections(&self) -> impl Iterator<Item = &LoraLinear> {
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

/// The SiLU-gated MLP: `down_proj(silu(gate_proj(x)) · up_proj(x))`.
#[derive(Clone, Debug, Shardable)]
pub struct LlamaMlp {
    /// `(intermediate_size, hidden_size)`: the gate, through SiLU (not in Phi-3).
    pub gate_proj: Option<LoraLinear>,
    /// `(intermediate_size, hidden_size)`: the gated value (not in Phi-3).
    pub up_proj: Option<LoraLinear>,
    /// Phi-3's `gate_proj` and `up_proj` stacked, in that order.
    pub gate_up_proj: Option<LoraLinear>,
    /// `(hidden_size, intermediate_size)`: the projection back.
    pub down_proj: LoraLinear,
    /// What the gate goes through: SiLU, or Gemma's tanh-approximated GELU.
    #[fsdp(skip)]
    pub activation: Activation,
    /// The kernels the forward runs on.
    #[fsdp(skip)]
    pub kernels: Kernels,
}

/// The gate's activation of a gated MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU).
    Silu,
    /// `gelu_pytorch_tanh` (GeGLU).
    GeluTanh,
}

impl LlamaMlp {
    /// The projections under `vb` (`gate_proj`, `up_proj`, `down_proj`), initialised
    /// `N(0, initializer_range)`.
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        let fused = config.family == Family::Phi3;
        let separate = |name: &str| (!fused).then(|| config.projection(hidden, inter, false, vb.pp(name))).transpose();
        Ok(Self {
            gate_proj: separate("gate_proj")?,
            up_proj: separate("up_proj")?,
            gate_up_proj: fused
                .then(|| config.projection(hidden, 2 * inter, false, vb.pp("gate_up_proj")))
                .transpose()?,
            down_proj: config.projection(inter, hidden, false, vb.pp("down_proj"))?,
            activation: if config.gemma.is_some() { Activation::GeluTanh } else { Activation::Silu },
            kernels: config.kernels,
        })
    }
}

impl LlamaMlp {
    /// The projections, in the order of the FQN table.
    fn projections(&self) -> impl Iterator<Item = &LoraLinear> {
        [&self.gate_proj, &self.up_proj, &self.gate_up_proj].into_iter().flatten().chain([&self.down_proj])
    }

    /// The gate and the gated value of `x`: two products, or Phi-3's one, split.
    fn gate_up(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        match (&self.gate_up_proj, &self.gate_proj, &self.up_proj) {
            (Some(both), None, None) => {
                let all = both.forward(x)?;
                let half = all.dim(candle_core::D::Minus1)? / 2;
                let part = |start: usize| all.narrow(candle_core::D::Minus1, start, half)?.contiguous();
                Ok((part(0)?, part(half)?))
            }
            (None, Some(gate), Some(up)) => Ok((gate.forward(x)?, up.forward(x)?)),
            _ => candle_core::bail!("LlamaMlp: either gate_proj and up_proj, or gate_up_proj"),
        }
    }
}

impl Module for LlamaMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = self.gate_up(x)?;
        let gated = match (self.activation, self.kernels) {
            (Activation::Silu, Kernels::Fused) => crate::ops::swiglu(&gate, &up)?,
            (Activation::Silu, Kernels::Composed) => (gate.silu()? * up)?,
            // candle's `gelu` is the tanh approximation; no fused GeGLU yet.
            (Activation::GeluTanh, _) => (gate.gelu()? * up)?,
        };
        self.down_proj.forward(&gated)
    }
}

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
    fn projections(&self) -> impl Iterator<Item = &LoraLinear> {
        let mlp = self.mlp.iter().flat_map(|m| m.projections());
        let experts = self.block_sparse_moe.iter().flat_map(|m| m.projections());
        self.self_attn.projections().chain(mlp).chain(experts)
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
            let local = self.config.gemma.as_ref().is_some_and(|g| g.sliding_layers[index]);
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
pub(super) fn windowed(window: Option<usize>, seq: usize) -> bool {
    window.is_some_and(|w| w < seq)
}

/// f32 for half-precision types and f32 itself; f64 stays f64.
pub(super) fn at_least_f32(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}
