//! What Gemma 2 and Gemma 3 compute beyond the Llama shape, and how their `config.json`
//! says so: norms that scale by `1 + weight`, a norm after the attention and around the
//! MLP, a GeGLU MLP (`gelu_pytorch_tanh`), embeddings scaled by `√hidden_size`, scores
//! scaled by `query_pre_attn_scalar^-1/2`, soft-capped scores and logits (Gemma 2),
//! layers that alternate between a sliding window and full attention, with their own
//! rotary base (Gemma 3), and a tied head. [`super::llama::Llama`] computes them when
//! [`super::llama::LlamaConfig::gemma`] is set.

use super::hf_config::{HfConfig, HfObject};
use super::llama::{read_rope, read_scaling, Family};
use candle_core::{Result, Tensor};
use serde_json::{json, Value};

/// Gemma's settings (Hugging Face `Gemma2Config`, `Gemma3TextConfig` names).
#[derive(Clone, Debug, PartialEq)]
pub struct GemmaSettings {
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f64,
    /// Attention scores become `cap · tanh(score / cap)` (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// Logits become `cap · tanh(logit / cap)` (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
    /// For each layer, whether it attends within the sliding window (the others attend
    /// to every earlier position).
    pub sliding_layers: Vec<bool>,
    /// The rotary base of the sliding layers (Gemma 3's local base); the other layers use
    /// `rope_theta`.
    pub local_rope_theta: f64,
}

/// `cap · tanh(x / cap)`.
pub(super) fn softcap(x: &Tensor, cap: f64) -> Result<Tensor> {
    (x / cap)?.tanh()? * cap
}

/// Reads Gemma's keys of `hf` (everything but the sizes and the generic keys the Llama
/// reader takes): the settings, the global rotary base and the window.
pub(super) fn read(hf: &mut HfConfig, family: Family, layers: usize) -> Result<(GemmaSettings, f64, usize)> {
    for key in ["hidden_activation", "hidden_act"] {
        if let Some(act) = hf.string(key)?.filter(|a| a != "gelu_pytorch_tanh") {
            return hf.refuse(format!("`{key}` is `{act}` (only `gelu_pytorch_tanh`)"));
        }
    }
    hf.only("use_bidirectional_attention", false.into())?;
    // A missing key takes transformers' default for the family.
    let window = hf.usize("sliding_window")?.unwrap_or(4096);
    let default_caps = match family {
        Family::Gemma2 => (Some(50.0), Some(30.0)),
        _ => (None, None),
    };
    let sliding_layers = match hf.take("layer_types") {
        Some(Value::Array(kinds)) => Some(
            kinds
                .iter()
                .map(|k| match k.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => hf.refuse(format!("`layer_types` holds {k} (only sliding_attention and full_attention)")),
                })
                .collect::<Result<Vec<bool>>>()?,
        ),
        Some(other) => candle_core::bail!("`layer_types` is {other}, not a list"),
        None => None,
    };
    // transformers' defaults: Gemma 2 alternates, starting with a sliding layer; Gemma 3
    // has one full layer in every `sliding_window_pattern`. Given beside `layer_types`,
    // that must agree with it; transformers 5's `_sliding_window_pattern` is a leftover it
    // writes whatever the list says, used only without one.
    let (pattern, leftover) = match family {
        Family::Gemma2 => (None, None),
        _ => (hf.usize("sliding_window_pattern")?, hf.usize("_sliding_window_pattern")?),
    };
    let from_pattern = |pattern: usize| (0..layers).map(|i| (i + 1) % pattern.max(1) != 0).collect::<Vec<bool>>();
    let sliding_layers = match (sliding_layers, pattern) {
        (Some(listed), Some(pattern)) if listed != from_pattern(pattern) => {
            return hf.refuse(format!("`layer_types` and a `sliding_window_pattern` of {pattern} disagree"));
        }
        (Some(listed), _) => listed,
        (None, pattern) => from_pattern(pattern.or(leftover).unwrap_or(match family {
            Family::Gemma2 => 2,
            _ => 6,
        })),
    };
    if sliding_layers.len() != layers {
        candle_core::bail!("`layer_types` lists {} layers for {layers}", sliding_layers.len())
    }
    let (global_theta, local_theta) = match family {
        Family::Gemma2 => match read_rope(hf, 10_000.0)? {
            (theta, None) => (theta, theta),
            (_, Some(_)) => return hf.refuse("Gemma 2 with a rotary scaling".into()),
        },
        _ => read_gemma3_rope(hf)?,
    };
    let settings = GemmaSettings {
        query_pre_attn_scalar: hf.f64("query_pre_attn_scalar")?.unwrap_or(256.0),
        attn_logit_softcapping: hf.nullable_f64("attn_logit_softcapping", default_caps.0)?,
        final_logit_softcapping: hf.nullable_f64("final_logit_softcapping", default_caps.1)?,
        sliding_layers,
        local_rope_theta: local_theta,
    };
    Ok((settings, global_theta, window))
}

/// Gemma 3's two rotary bases: transformers 5's `rope_parameters` per layer type, or
/// 4.x's `rope_theta` and `rope_local_base_freq`. Scalings are refused.
fn read_gemma3_rope(hf: &mut HfConfig) -> Result<(f64, f64)> {
    let flat_global = hf.f64("rope_theta")?;
    let flat_local = hf.f64("rope_local_base_freq")?;
    if hf.object("rope_scaling")?.is_some() {
        return hf.refuse("`rope_scaling` is set (Gemma 3's scaled global rotary is not computed here)".into());
    }
    let Some(mut nested) = hf.object("rope_parameters")? else {
        return Ok((flat_global.unwrap_or(1_000_000.0), flat_local.unwrap_or(10_000.0)));
    };
    let mut theta_of = |kind: &'static str| -> Result<Option<f64>> {
        let Some(Value::Object(keys)) = nested.remove(kind) else {
            return Ok(None);
        };
        match read_scaling(hf, HfObject::new(kind, keys))? {
            (theta, None) => Ok(theta),
            (_, Some(_)) => hf.refuse(format!("`rope_parameters.{kind}` with a rotary scaling")),
        }
    };
    let (nested_global, nested_local) = (theta_of("full_attention")?, theta_of("sliding_attention")?);
    for (flat, nested, key) in
        [(flat_global, nested_global, "rope_theta"), (flat_local, nested_local, "rope_local_base_freq")]
    {
        if let (Some(flat), Some(nested)) = (flat, nested) {
            if flat != nested {
                return hf.refuse(format!("`{key}` is {flat} but `rope_parameters` gives {nested}"));
            }
        }
    }
    let global = nested_global.or(flat_global).unwrap_or(1_000_000.0);
    let local = nested_local.or(flat_local).unwrap_or(10_000.0);
    if let Some(key) = nested.keys().next() {
        return hf.refuse(format!("`rope_parameters.{key}`"));
    }
    Ok((global, local))
}

/// Gemma's keys of a `config.json`, beside the Llama writer's.
pub(super) fn write(json: &mut Value, settings: &GemmaSettings, family: Family, theta: f64, window: usize) {
    let kinds: Vec<&str> =
        settings.sliding_layers.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
    json["hidden_activation"] = "gelu_pytorch_tanh".into();
    json["query_pre_attn_scalar"] = settings.query_pre_attn_scalar.into();
    json["attn_logit_softcapping"] = settings.attn_logit_softcapping.into();
    json["final_logit_softcapping"] = settings.final_logit_softcapping.into();
    json["sliding_window"] = window.into();
    json["layer_types"] = kinds.into();
    json["attention_bias"] = false.into();
    if family == Family::Gemma3 {
        json["rope_theta"] = theta.into();
        json["rope_local_base_freq"] = settings.local_rope_theta.into();
        json["rope_parameters"] = json!({
            "full_attention": { "rope_type": "default", "rope_theta": theta },
            "sliding_attention": { "rope_type": "default", "rope_theta": settings.local_rope_theta },
        });
    }
}
