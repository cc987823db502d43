//! Qwen2, Qwen3, Mistral and Phi-3 checkpoints written by transformers (`tests/golden/hf_families`,
//! with the script that makes them) through the public import API, against the logits,
//! loss and gradients transformers computed: each family's own settings switched on
//! (Qwen2's q/k/v biases, Qwen3's per-head q/k norms with an explicit head dimension,
//! Mistral's sliding window shorter than the sequence, Phi-3's fused q/k/v and gate/up
//! projections with a window), on both kernel paths. Trained 2
//! steps at world 2 and exported, each reads back as the model that was trained.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_fsdp::checkpoint::{self, ExportOptions};
use candle_fsdp::models::llama::{Family, Llama, LlamaConfig};
use candle_fsdp::models::Kernels;
use candle_fsdp::optim::{AdamW, ParamsAdamW};
use candle_fsdp::{launch, Fsdp, FsdpConfig, LaunchOptions};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FAMILIES: [(&str, Family); 3] =
    [("qwen2", Family::Qwen2), ("qwen3", Family::Qwen3), ("mistral", Family::Mistral)];

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hf_families").join(name)
}

fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    let diff = (actual - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    (diff / expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()) as f64
}

fn assert_close(actual: &Tensor, expected: &Tensor, what: &str) {
    let error = relative_error(actual, expected);
    assert!(error <= 1e-4, "{what}: off by {error:.2e} of its largest value");
}

fn wrapped(config: &LlamaConfig, comm: std::sync::Arc<dyn candle_fsdp::dist::Collectives>) -> Fsdp<Llama> {
    let model = Llama::new(config, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu)).unwrap();
    Fsdp::wrap(model, comm, FsdpConfig::default()).unwrap()
}

#[test]
fn transformers_logits_loss_and_gradients_of_qwen2_qwen3_mistral_and_phi3() {
    for (name, family) in FAMILIES {
        let golden = candle_core::safetensors::load(dir(name).join("golden.safetensors"), &Device::Cpu).unwrap();
        let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
        let (inputs, targets) = (ids.i((.., ..9)).unwrap(), ids.i((.., 1..)).unwrap());
        let read = LlamaConfig::from_hf_file(&dir(name).join("config.json")).unwrap();
        assert_eq!(read.family, family);
        assert_eq!(LlamaConfig::from_hf_json(&read.to_hf_json()).unwrap(), read, "{name}: config.json round trip");
        for kernels in [Kernels::Fused, Kernels::Composed] {
            let what = format!("{name}, {kernels:?} kernels");
            let config = LlamaConfig { kernels, ..read.clone() };
            launch(LaunchOptions::new(1), |ctx| {
                let fsdp = wrapped(&config, ctx.comm.clone());
                checkpoint::load_pretrained(&fsdp, &dir(name))?;
                assert_close(
                    &fsdp.forward_inference(|m| m.forward(&ids))?,
                    &golden["logits"],
                    &format!("{what}: logits"),
                );
                let loss = fsdp.forward(|m| m.loss(&inputs, &targets))?;
                assert_close(&loss.reshape(1)?, &golden["loss"], &format!("{what}: loss"));
                let grads = fsdp.backward(&loss)?;
                let params: HashMap<String, candle_core::Var> = fsdp.named_parameters().into_iter().collect();
                for (key, expected) in golden.iter().filter(|(k, _)| k.starts_with("grad.")) {
                    let fqn = &key["grad.".len()..];
                    let grad = grads.get(params[fqn].as_tensor()).expect("a gradient");
                    let grad = grad.narrow(0, 0, expected.elem_count())?.reshape(expected.shape())?;
                    assert_close(&grad, expected, &format!("{what}: gradient of `{fqn}`"));
                }
                Ok(())
            })
            .unwrap();
        }
    }
}

/// What makes each family differ from a Llama is in effect: without it the logits move
/// far beyond the tolerance above.
#[test]
fn each_familys_own_setting_changes_the_logits() {
    for (name, _) in FAMILIES {
        let golden = candle_core::safetensors::load(dir(name).join("golden.safetensors"), &Device::Cpu).unwrap();
        let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
        let read = LlamaConfig::from_hf_file(&dir(name).join("config.json")).unwrap();
        let without = LlamaConfig { sliding_window: None, ..read.clone() };
        let tensors = candle_core::safetensors::load(dir(name).join("model.safetensors"), &Device::Cpu).unwrap();
        let logits = launch(LaunchOptions::new(1), |ctx| {
            let fsdp = wrapped(&without, ctx.comm.clone());
            // Qwen's biases and norms zeroed (the rest loaded), or Mistral's window off.
            checkpoint::load_pretrained(&fsdp, &dir(name))?;
            let zeroed: Vec<(String, Tensor)> = tensors
                .iter()
                .filter(|(fqn, _)| fqn.ends_with("_proj.bias") || (fqn.contains("_norm.") && fqn.contains("self_attn")))
                .map(|(fqn, t)| {
                    (fqn.clone(), if fqn.contains("_norm.") { t.ones_like() } else { t.zeros_like() }.unwrap())
                })
                .collect();
            fsdp.summon_units(candle_fsdp::SummonOptions { writeback: true, ..Default::default() }, |_, params| {
                for (fqn, value) in params {
                    if let Some((_, replacement)) = zeroed.iter().find(|(f, _)| f == fqn) {
                        value.slice_set(replacement, 0, 0).unwrap();
                    }
                }
            })?;
            fsdp.forward_inference(|m| m.forward(&ids))
        })
        .unwrap();
        let moved = relative_error(&logits[0], &golden["logits"]);
        assert!(moved > 1e-2, "{name}: without its own setting the logits move by only {moved:.2e}");
    }
}

#[test]
fn trained_at_world_2_each_family_exports_and_reads_back() {
    for (name, _) in FAMILIES {
        let config = LlamaConfig::from_hf_file(&dir(name).join("config.json")).unwrap();
        let golden = candle_core::safetensors::load(dir(name).join("golden.safetensors"), &Device::Cpu).unwrap();
        let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
        let out = tempfile::tempdir().unwrap();
        let export = out.path().join(name);
        let trained = launch(LaunchOptions::new(2), |ctx| {
            let fsdp = wrapped(&config, ctx.comm.clone());
            checkpoint::load_pretrained(&fsdp, &dir(name))?;
            let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW { lr: 1e-2, ..Default::default() })?;
            let rows = ids.i(ctx.rank..ctx.rank + 1)?;
            for _ in 0..2 {
                let loss = fsdp.forward(|m| m.loss(&rows.i((.., ..9))?, &rows.i((.., 1..))?))?;
                optimizer.step(&fsdp.backward(&loss)?)?;
            }
            let files = vec![("config.json".to_string(), config.to_hf_json().into_bytes())];
            checkpoint::export_hf(&fsdp, &export, &ExportOptions { files, ..Default::default() })?;
            fsdp.forward_inference(|m| m.forward(&ids))
        })
        .unwrap();
        assert!(relative_error(&trained[0], &golden["logits"]) > 1e-3, "{name}: training moved the logits");
        let reread = LlamaConfig::from_hf_file(&export.join("config.json")).unwrap();
        assert_eq!(reread, config, "{name}: the exported config.json");
        let reloaded = launch(LaunchOptions::new(1), |ctx| {
            let fsdp = wrapped(&reread, ctx.comm.clone());
            checkpoint::load_pretrained(&fsdp, &export)?;
            fsdp.forward_inference(|m| m.forward(&ids))
        })
        .unwrap();
        assert_close(&reloaded[0], &trained[0], &format!("{name}: the export's logits"));
    }
}

#[test]
fn family_settings_not_computed_here_are_refused_by_key() {
    let text = |name: &str| std::fs::read_to_string(dir(name).join("config.json")).unwrap();
    let with = |name: &str, key: &str, value: &str| {
        let mut config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text(name)).unwrap();
        config.insert(key.to_string(), serde_json::from_str(value).unwrap());
        serde_json::to_string(&config).unwrap()
    };
    for (name, key, value) in [
        ("qwen2", "use_sliding_window", "true"),
        ("qwen2", "layer_types", r#"["full_attention", "sliding_attention"]"#),
        ("qwen3", "attention_bias", "true"),
        ("mistral", "layer_types", r#"["full_attention", "full_attention"]"#),
        ("mistral", "architectures", r#"["Qwen2ForCausalLM"]"#),
        ("qwen3", "rope_parameters", r#"{"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}"#),
        ("phi3", "embd_pdrop", "0.1"),
        ("phi3", "partial_rotary_factor", "0.5"),
        ("phi3", "rope_parameters", r#"{"rope_type": "longrope", "rope_theta": 10000.0}"#),
    ] {
        let error = LlamaConfig::from_hf_json(&with(name, key, value)).unwrap_err().to_string();
        assert!(error.contains(key), "{name} with `{key}: {value}`: the error `{error}` does not name it");
    }
}
