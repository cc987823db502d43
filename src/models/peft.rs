//! PEFT's files for LoRA adapters, so that adapters trained here load in PEFT and PEFT's
//! load here: `adapter_config.json` (read by allow-list) and `adapter_model.safetensors`
//! (the adapter weights alone, each under `base_model.model.` and its FQN). And the
//! adapters merged into the base, exported as a plain Hugging Face checkpoint.

use super::hf_config::HfConfig;
use super::lora::LoraConfig;
use crate::checkpoint::{self, ExportOptions};
use crate::Fsdp;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The adapters' configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapters' weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// What PEFT's model puts before the base model's FQNs.
pub const NAME_PREFIX: &str = "base_model.model.";
/// The FQN patterns of the adapter weights.
pub const ADAPTERS: [&str; 2] = ["*.lora_A.weight", "*.lora_B.weight"];

/// Keys of `adapter_config.json` that describe where the adapters came from or how fresh
/// ones were drawn, never what a trained adapter computes.
const NOT_COMPUTED: &[&str] = &[
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "task_type",
    "auto_mapping",
    "megatron_core",
    "qalora_group_size",
];

/// Keys of `adapter_config.json` with the one value whose adapters this crate computes
/// (PEFT's defaults): any other value is refused by name.
const AT_DEFAULT: &[(&str, &str)] = &[
    ("fan_in_fan_out", "false"),
    ("bias", "\"none\""),
    ("use_dora", "false"),
    ("lora_bias", "false"),
    ("use_qalora", "false"),
    ("ensure_weight_tying", "false"),
    ("rank_pattern", "{}"),
    ("alpha_pattern", "{}"),
    ("modules_to_save", "null"),
    ("layers_to_transform", "null"),
    ("layers_pattern", "null"),
    ("layer_replication", "null"),
    ("target_parameters", "null"),
    ("exclude_modules", "null"),
    ("trainable_token_indices", "null"),
    ("megatron_config", "null"),
    ("eva_config", "null"),
    ("corda_config", "null"),
    ("lora_ga_config", "null"),
    ("kasa_config", "null"),
    ("monteclora_config", "null"),
    ("velora_config", "null"),
    ("arrow_config", "null"),
    ("alora_invocation_tokens", "null"),
    ("use_bdlora", "null"),
];

impl LoraConfig {
    /// Reads PEFT's `adapter_config.json` by allow-list: `r`, `lora_alpha`,
    /// `target_modules` (a list of names; PEFT's regular-expression form is refused) and
    /// `use_rslora` are read, the settings of other LoRA variants must hold PEFT's
    /// defaults, and any other key is refused by name. `lora_dropout` is read and not
    /// applied: dropout changes no trained value, only how a training step draws.
    pub fn from_peft_json(text: &str) -> candle_core::Result<Self> {
        let mut peft = HfConfig::parse(text, "LoRA")?;
        match peft.string("peft_type")?.as_deref() {
            Some("LORA") => {}
            other => return peft.refuse(format!("`peft_type` is {other:?} (only \"LORA\")")),
        }
        let r = peft.required_usize("r")?;
        let alpha = peft.f64("lora_alpha")?.unwrap_or(8.0);
        let target_modules = match peft.take("target_modules") {
            Some(Value::Array(names)) => {
                names.iter().map(|n| n.as_str().map(str::to_string)).collect::<Option<Vec<_>>>().ok_or_else(|| {
                    candle_core::Error::Msg("`target_modules` holds a value that is not a name".into())
                })?
            }
            Some(Value::String(regex)) => {
                return peft
                    .refuse(format!("`target_modules` is the regular expression {regex:?} (only a list of names)"))
            }
            other => candle_core::bail!("`target_modules` is {other:?}, not a list of module names"),
        };
        let use_rslora = peft.bool("use_rslora")?.unwrap_or(false);
        if let Some(dropout) = peft.f64("lora_dropout")?.filter(|&p| p != 0.0) {
            tracing::warn!("adapter_config.json: lora_dropout {dropout} is not applied when training here");
        }
        for (key, default) in AT_DEFAULT {
            let value: Value = serde_json::from_str(default).expect("a JSON literal");
            peft.only(key, value)?;
        }
        // How fresh adapters were drawn changes nothing once they are trained, unless the
        // method also rewrote the base weights (PiSSA, OLoRA, LoftQ, EVA, CorDA): such
        // adapters belong to another base than the checkpoint's.
        match peft.take("init_lora_weights") {
            None | Some(Value::Bool(_)) => {}
            Some(Value::String(kind)) if kind == "gaussian" => {}
            Some(other) => {
                return peft.refuse(format!("`init_lora_weights` is {other} (which changes the base weights)"))
            }
        }
        match peft.take("loftq_config") {
            Some(Value::Object(keys)) if !keys.is_empty() => {
                return peft.refuse("`loftq_config` is set (LoftQ changes the base weights)".into())
            }
            _ => {}
        }
        peft.finish_except(NOT_COMPUTED)?;
        if r == 0 {
            candle_core::bail!("`r` is 0: adapters need a rank of at least 1")
        }
        Ok(Self { r, alpha, target_modules, use_rslora })
    }

    /// Reads `dir/adapter_config.json` (see [`LoraConfig::from_peft_json`]).
    pub fn from_peft_dir(dir: &Path) -> candle_core::Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        Self::from_peft_json(&text).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
    }

    /// The configuration as PEFT writes it for a causal language model.
    pub fn to_peft_json(&self) -> String {
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.alpha,
            "target_modules": self.target_modules,
            "use_rslora": self.use_rslora,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "init_lora_weights": true,
            "inference_mode": true,
            "base_model_name_or_path": null,
            "revision": null,
        });
        serde_json::to_string_pretty(&config).expect("a JSON value")
    }
}

/// Sets a wrapped model's adapters from PEFT's `dir` (`adapter_model.safetensors`, under
/// `base_model.model.` and each FQN): every adapter of the model must be there with its
/// shape, and nothing else; the base keeps its values. Check `dir`'s configuration
/// against the model's with [`LoraConfig::from_peft_dir`] first. A collective.
pub fn load_adapters<M>(fsdp: &Fsdp<M>, dir: &Path) -> crate::Result<()> {
    checkpoint::load_pretrained_part(fsdp, &dir.join(WEIGHTS_FILE), &is_adapter, &|fqn| format!("{NAME_PREFIX}{fqn}"))
}

/// Writes the model's adapters into `dir` as PEFT saves them (`adapter_config.json` from
/// `config`, `adapter_model.safetensors`), whole or not at all, as
/// [`checkpoint::export_hf`] writes; returns the files. Only the units holding adapters
/// are gathered. A collective, between steps.
pub fn save_adapters<M>(fsdp: &Fsdp<M>, dir: &Path, config: &LoraConfig) -> crate::Result<Vec<PathBuf>> {
    checkpoint::export_hf(fsdp, dir, &adapter_export_options(config))
}

/// What [`save_adapters`] exports: the adapters under PEFT's names and file names, with
/// `config`'s `adapter_config.json` (also what [`checkpoint::check_export_dir`] checks a
/// folder against before training).
pub fn adapter_export_options(config: &LoraConfig) -> ExportOptions {
    ExportOptions {
        tensors: ADAPTERS.iter().map(|p| p.to_string()).collect(),
        name_prefix: NAME_PREFIX.to_string(),
        weights_stem: WEIGHTS_FILE.trim_end_matches(".safetensors").to_string(),
        files: vec![(CONFIG_FILE.to_string(), config.to_peft_json().into_bytes())],
        ..ExportOptions::default()
    }
}

/// Folds every adapter into its base weight (`W + scale · B A`, PEFT's
/// `merge_and_unload`) and sets `B` to zero, so the model computes what it did; one unit
/// gathered at a time. Then [`export_merged`] writes the plain model. A collective.
pub fn merge_adapters<M>(fsdp: &Fsdp<M>, config: &LoraConfig) -> crate::Result<()> {
    let writeback = crate::SummonOptions { writeback: true, ..Default::default() };
    fsdp.summon_units(writeback, |_, params| -> candle_core::Result<()> {
        let value = |fqn: &str| params.iter().find(|(f, _)| f == fqn).map(|(_, t)| t);
        for (fqn, weight) in params {
            let Some(layer) = fqn.strip_suffix(".lora_A.weight") else {
                continue;
            };
            let (Some(base), Some(b)) = (value(&format!("{layer}.weight")), value(&format!("{layer}.lora_B.weight")))
            else {
                candle_core::bail!("`{fqn}` has no `{layer}.weight` or `{layer}.lora_B.weight` beside it")
            };
            let f32 = candle_core::DType::F32;
            let update = (b.to_dtype(f32)?.matmul(&weight.to_dtype(f32)?)? * config.scale())?;
            let merged = (base.to_dtype(f32)? + update)?.to_dtype(base.dtype())?;
            base.slice_set(&merged, 0, 0)?;
            b.slice_set(&b.zeros_like()?, 0, 0)?;
        }
        Ok(())
    })?
    .into_iter()
    .collect::<candle_core::Result<Vec<()>>>()?;
    Ok(())
}

/// Exports the model without its adapters (after [`merge_adapters`]: a plain Hugging Face
/// checkpoint of the merged weights), as [`checkpoint::export_hf`] with `options`.
pub fn export_merged<M>(fsdp: &Fsdp<M>, dir: &Path, options: &ExportOptions) -> crate::Result<Vec<PathBuf>> {
    let mut tensors = vec!["*".to_string()];
    tensors.extend(ADAPTERS.iter().map(|p| format!("!{p}")));
    checkpoint::export_hf(fsdp, dir, &ExportOptions { tensors, ..options.clone() })
}

/// Whether `fqn` is a LoRA adapter weight.
pub fn is_adapter(fqn: &str) -> bool {
    fqn.ends_with(".lora_A.weight") || fqn.ends_with(".lora_B.weight")
}
