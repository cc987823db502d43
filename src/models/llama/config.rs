//! [`LlamaConfig`]: the hyper-parameters of the Llama-shaped model and of the families it
//! computes ([`Family`]), read from and written to a Hugging Face `config.json` by
//! allow-list.

use super::super::gemma::GemmaSettings;
use super::super::hf_config::{HfConfig, HfObject};
use super::super::lora::{LoraConfig, LoraLinear};
use super::super::moe::MoeConfig;
use super::super::Kernels;
use candle_core::Result;
use candle_nn::{Init, RmsNorm, VarBuilder};
use serde_json::Value;
use std::path::Path;

/// The hyper-parameters of [`Llama`](super::Llama) (Hugging Face `LlamaConfig` names); `Default` is a
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
    /// (see [`crate::models::gemma`]); the window is [`LlamaConfig::sliding_window`].
    pub gemma: Option<GemmaSettings>,
    /// The padding token (`pad_token_id`): as `nn.Embedding`'s `padding_idx`, its
    /// embedding row gets no gradient from the lookup.
    pub pad_token_id: Option<u32>,
}

/// The Hugging Face architectures [`Llama`](super::Llama) computes: the same pre-norm decoder with
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
    /// `Gemma2ForCausalLM` (see [`crate::models::gemma`]).
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

    /// transformers' `rms_norm_eps` of the family's config class, for a config without one.
    fn default_rms_norm_eps(self) -> f64 {
        match self {
            Family::Phi3 | Family::Mixtral => 1e-5,
            _ => 1e-6,
        }
    }

    /// transformers' rotary base of the family's config class, for a config without one.
    fn default_rope_theta(self) -> f64 {
        match self {
            Family::Mixtral => 1e6,
            _ => 10_000.0,
        }
    }

    /// transformers' `num_key_value_heads` of the family's config class where it is not
    /// `num_attention_heads`, for a config without one.
    fn default_kv_heads(self) -> Option<usize> {
        match self {
            Family::Mistral | Family::Mixtral => Some(8),
            Family::Gemma2 | Family::Gemma3 => Some(4),
            _ => None,
        }
    }

    pub(super) fn is_gemma(self) -> bool {
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
    pub(super) fn scale(&self, inv_freq: f64) -> f64 {
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
/// must agree; `default_theta` when neither gives a base.
pub(crate) fn read_rope(hf: &mut HfConfig, default_theta: f64) -> Result<(f64, Option<RopeScaling>)> {
    let flat_theta = hf.f64("rope_theta")?;
    let flat_scaling = match hf.object("rope_scaling")? {
        Some(keys) => Some(read_scaling(hf, HfObject::new("rope_scaling", keys))?),
        None => None,
    };
    let Some(nested) = hf.object("rope_parameters")? else {
        let (inner_theta, scaling) = flat_scaling.unwrap_or((None, None));
        return Ok((flat_theta.or(inner_theta).unwrap_or(default_theta), scaling));
    };
    let (theta, scaling) = read_scaling(hf, HfObject::new("rope_parameters", nested))?;
    let theta = theta.or(flat_theta).unwrap_or(default_theta);
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
pub(crate) fn read_scaling(hf: &HfConfig, mut keys: HfObject) -> Result<(Option<f64>, Option<RopeScaling>)> {
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
            true => Some(super::super::gemma::read(&mut hf, family, num_hidden_layers)?),
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
            // transformers' defaults when the key is missing: Mistral 4096, Mixtral none.
            Family::Mistral => hf.nullable_usize("sliding_window", Some(4096))?,
            Family::Mixtral => hf.nullable_usize("sliding_window", None)?,
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
                    // transformers' default when missing; null names no count.
                    num_experts: hf
                        .nullable_usize("num_local_experts", Some(8))?
                        .ok_or_else(|| candle_core::Error::Msg("`num_local_experts` is null".into()))?,
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
            None => read_rope(&mut hf, family.default_rope_theta())?,
        };
        let num_attention_heads = hf.required_usize("num_attention_heads")?;
        let config = Self {
            vocab_size: hf.required_usize("vocab_size")?,
            hidden_size: hf.required_usize("hidden_size")?,
            intermediate_size: hf.required_usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: hf
                .usize("num_key_value_heads")?
                .or(family.default_kv_heads())
                .unwrap_or(num_attention_heads),
            max_position_embeddings: hf.usize("max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: hf.f64("rms_norm_eps")?.unwrap_or(family.default_rms_norm_eps()),
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
            super::super::gemma::write(&mut json, settings, self.family, self.rope_theta, window);
        }
        serde_json::to_string_pretty(&json).expect("a JSON value serializes")
    }

    /// The attention head dimension: `head_dim` when set, else
    /// `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub(super) fn validate(&self) -> Result<()> {
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
        if let Some(gemma) = self.gemma.as_ref().filter(|g| g.sliding_layers.len() != self.num_hidden_layers) {
            candle_core::bail!(
                "Gemma: sliding_layers lists {} layers for num_hidden_layers {}",
                gemma.sliding_layers.len(),
                self.num_hidden_layers
            )
        }
        Ok(())
    }

    pub(super) fn init(&self) -> Init {
        Init::Randn { mean: 0.0, stdev: self.initializer_range }
    }

    /// A projection of the attention or the MLP, with a bias if `bias`: LoRA adapters
    /// where `lora` targets it.
    pub(super) fn projection(&self, in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<LoraLinear> {
        LoraLinear::new(in_dim, out_dim, self.init(), bias, self.lora.as_ref(), self.kernels, vb)
    }

    pub(super) fn norm(&self, vb: VarBuilder) -> Result<RmsNorm> {
        self.norm_of(self.hidden_size, vb)
    }

    /// An RMSNorm over `size`: weights 1, or for Gemma weights 0 that scale by `1 + w`.
    pub(super) fn norm_of(&self, size: usize, vb: VarBuilder) -> Result<RmsNorm> {
        let start = if self.gemma.is_some() { 0.0 } else { 1.0 };
        Ok(RmsNorm::new(vb.get_with_hints(size, "weight", Init::Const(start))?, self.rms_norm_eps))
    }

    /// What a norm weight `w` is added to before it scales: 1 for Gemma's `1 + w`.
    pub(super) fn norm_offset(&self) -> f64 {
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
