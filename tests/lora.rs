//! LoRA adapters against PEFT itself: a tiny Llama saved by transformers and adapters
//! saved by PEFT (`tests/golden/peft_lora`, with the script that makes them) load through
//! the public API and give PEFT's logits, loss and adapter gradients; trained here under
//! FSDP at world 2, the adapters alone change, are saved in PEFT's layout and load back,
//! and merged into the base they export as a plain checkpoint that gives PEFT's
//! `merge_and_unload` logits. Settings PEFT writes that change what adapters compute are
//! refused by key.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_fsdp::checkpoint::{self, ExportOptions};
use candle_fsdp::models::llama::{Llama, LlamaConfig};
use candle_fsdp::models::lora::LoraConfig;
use candle_fsdp::models::peft;
use candle_fsdp::models::Kernels;
use candle_fsdp::optim::{AdamW, ParamsAdamW};
use candle_fsdp::{launch, Fsdp, FsdpConfig, LaunchOptions};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/peft_lora")
}

fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden_dir().join("golden.safetensors"), &Device::Cpu).unwrap()
}

/// The golden model's configuration with PEFT's adapters.
fn adapted_config(kernels: Kernels) -> LlamaConfig {
    let mut config = LlamaConfig::from_hf_file(&golden_dir().join("base/config.json")).unwrap();
    config.lora = Some(LoraConfig::from_peft_dir(&golden_dir().join("adapter")).unwrap());
    config.kernels = kernels;
    config
}

/// The model of `config` wrapped with only its adapters trained, its base read from the
/// transformers checkpoint and its adapters from `adapters`.
fn wrapped(
    config: &LlamaConfig,
    comm: std::sync::Arc<dyn candle_fsdp::dist::Collectives>,
    adapters: &Path,
) -> Fsdp<Llama> {
    let model = Llama::new(config, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu)).unwrap();
    let fsdp = Fsdp::wrap(model, comm, FsdpConfig::default().freeze(LoraConfig::FROZEN)).unwrap();
    checkpoint::load_pretrained_part(&fsdp, &golden_dir().join("base"), &|f| !peft::is_adapter(f), &|f| f.to_string())
        .unwrap();
    peft::load_adapters(&fsdp, adapters).unwrap();
    fsdp
}

#[test]
fn peft_adapters_give_peft_logits_loss_and_adapter_gradients() {
    let golden = golden();
    let ids = &golden["input_ids"].to_dtype(DType::U32).unwrap();
    let (inputs, targets) = (ids.i((.., ..9)).unwrap(), ids.i((.., 1..)).unwrap());
    assert!(
        fsdp_testkit::error_of_largest(&golden["logits"], &golden["base_logits"]) > 0.1,
        "the adapters change the logits"
    );
    for kernels in [Kernels::Fused, Kernels::Composed] {
        let what = format!("{kernels:?} kernels");
        let config = adapted_config(kernels);
        launch(LaunchOptions::new(1), |ctx| {
            let fsdp = wrapped(&config, ctx.comm.clone(), &golden_dir().join("adapter"));
            let logits = fsdp.forward_inference(|m| m.forward(ids))?;
            assert_close_1e4(&logits, &golden["logits"], &format!("{what}: logits"));
            let loss = fsdp.forward(|m| m.loss(&inputs, &targets))?;
            assert_close_1e4(&loss.reshape(1)?, &golden["loss"], &format!("{what}: loss"));
            let grads = fsdp.backward(&loss)?;
            let trained: HashMap<String, candle_core::Var> = fsdp.named_parameters().into_iter().collect();
            // Three targets in each of two layers, two adapter weights each: nothing else.
            assert_eq!(trained.len(), 12, "{what}: trained parameters {:?}", trained.keys());
            assert!(trained.keys().all(|fqn| peft::is_adapter(fqn)));
            for (name, expected) in golden.iter().filter(|(n, _)| n.starts_with("grad.")) {
                let fqn = &name["grad.".len()..];
                let grad = grads.get(trained[fqn].as_tensor()).expect("a gradient for every adapter");
                let grad = grad.narrow(0, 0, expected.elem_count())?.reshape(expected.shape())?;
                assert_close_1e4(&grad, expected, &format!("{what}: gradient of `{fqn}`"));
            }
            Ok(())
        })
        .unwrap();
    }
}

#[test]
fn adapters_trained_at_world_2_save_in_peft_layout_reload_and_merge() {
    let config = adapted_config(Kernels::Fused);
    let golden = golden();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (saved, merged) = (dir.path().join("adapter"), dir.path().join("merged"));
    let base_values =
        candle_core::safetensors::load(golden_dir().join("base/model.safetensors"), &Device::Cpu).unwrap();

    let logits = launch(LaunchOptions::new(2), |ctx| {
        let fsdp = wrapped(&config, ctx.comm.clone(), &golden_dir().join("adapter"));
        let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW { lr: 1e-2, ..Default::default() })?;
        let rows = ids.i(ctx.rank..ctx.rank + 1)?;
        for _ in 0..2 {
            let loss = fsdp.forward(|m| m.loss(&rows.i((.., ..9))?, &rows.i((.., 1..))?))?;
            optimizer.step(&fsdp.backward(&loss)?)?;
        }
        // The base did not move; the adapters did.
        for (fqn, value) in fsdp.full_parameters()? {
            match base_values.get(&fqn) {
                Some(base) => assert_eq!(
                    value.flatten_all()?.to_vec1::<f32>()?,
                    base.flatten_all()?.to_vec1::<f32>()?,
                    "frozen `{fqn}` changed"
                ),
                None => assert!(peft::is_adapter(&fqn), "`{fqn}` is neither in the base nor an adapter"),
            }
        }
        let trained = fsdp.forward_inference(|m| m.forward(&ids))?;
        assert!(fsdp_testkit::error_of_largest(&trained, &golden["logits"]) > 1e-3, "two steps moved the logits");
        peft::save_adapters(&fsdp, &saved, config.lora.as_ref().unwrap())?;
        peft::merge_adapters(&fsdp, config.lora.as_ref().unwrap())?;
        let after_merge = fsdp.forward_inference(|m| m.forward(&ids))?;
        assert_close_1e4(&after_merge, &trained, "the merged model's logits");
        let config_json = config.to_hf_json().into_bytes();
        let options = ExportOptions { files: vec![("config.json".into(), config_json)], ..ExportOptions::default() };
        peft::export_merged(&fsdp, &merged, &options)?;
        Ok(trained)
    })
    .unwrap();

    // PEFT's layout: its names, its configuration, nothing but the adapters.
    let files: Vec<String> =
        std::fs::read_dir(&saved).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let mut files = files;
    files.sort();
    assert_eq!(files, ["adapter_config.json", "adapter_model.safetensors"]);
    let written = candle_core::safetensors::load(saved.join(peft::WEIGHTS_FILE), &Device::Cpu).unwrap();
    let peft_names =
        candle_core::safetensors::load(golden_dir().join("adapter").join(peft::WEIGHTS_FILE), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = written.keys().collect();
    let mut expected: Vec<&String> = peft_names.keys().collect();
    names.sort();
    expected.sort();
    assert_eq!(names, expected, "the names PEFT gives the adapters");
    assert_eq!(LoraConfig::from_peft_dir(&saved).unwrap(), *config.lora.as_ref().unwrap());

    // Reloaded at world 1, the saved adapters give the trained model's logits.
    launch(LaunchOptions::new(1), |ctx| {
        let fsdp = wrapped(&config, ctx.comm.clone(), &saved);
        assert_close_1e4(&fsdp.forward_inference(|m| m.forward(&ids))?, &logits[0], "reloaded adapters' logits");
        Ok(())
    })
    .unwrap();

    // The merged export is a plain Llama: no adapters, the trained logits.
    let plain = LlamaConfig::from_hf_file(&merged.join("config.json")).unwrap();
    assert!(plain.lora.is_none());
    let exported = candle_core::safetensors::load(merged.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(exported.keys().all(|k| !peft::is_adapter(k)) && exported.len() == base_values.len());
    launch(LaunchOptions::new(1), |ctx| {
        let model = Llama::new(&plain, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu))?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        checkpoint::load_pretrained(&fsdp, &merged)?;
        assert_close_1e4(&fsdp.forward_inference(|m| m.forward(&ids))?, &logits[0], "the merged export's logits");
        Ok(())
    })
    .unwrap();
}

/// PEFT's `merge_and_unload` on the untrained golden adapters, against the merge here.
#[test]
fn merging_peft_adapters_gives_peft_merged_logits() {
    let golden = golden();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    let config = adapted_config(Kernels::Fused);
    launch(LaunchOptions::new(2), |ctx| {
        let fsdp = wrapped(&config, ctx.comm.clone(), &golden_dir().join("adapter"));
        peft::merge_adapters(&fsdp, config.lora.as_ref().unwrap())?;
        assert_close_1e4(&fsdp.forward_inference(|m| m.forward(&ids))?, &golden["merged_logits"], "merged logits");
        Ok(())
    })
    .unwrap();
}

fn peft_config_with(key: &str, value: &str) -> String {
    let text = std::fs::read_to_string(golden_dir().join("adapter").join(peft::CONFIG_FILE)).unwrap();
    let mut config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    config.insert(key.to_string(), serde_json::from_str(value).unwrap());
    serde_json::to_string(&config).unwrap()
}

#[test]
fn adapter_settings_not_computed_here_are_refused_by_key() {
    let golden_text = std::fs::read_to_string(golden_dir().join("adapter").join(peft::CONFIG_FILE)).unwrap();
    let read = LoraConfig::from_peft_json(&golden_text).unwrap();
    assert_eq!((read.r, read.alpha, read.scale(), read.use_rslora), (4, 8.0, 2.0, false));
    // PEFT writes the targets from a set, in no fixed order.
    let mut targets = read.target_modules.clone();
    targets.sort();
    assert_eq!(targets, ["down_proj", "q_proj", "v_proj"]);
    for (key, value) in [
        ("use_dora", "true"),
        ("fan_in_fan_out", "true"),
        ("bias", "\"all\""),
        ("rank_pattern", "{\"q_proj\": 8}"),
        ("modules_to_save", "[\"lm_head\"]"),
        ("target_modules", "\".*q_proj\""),
        ("peft_type", "\"IA3\""),
        ("init_lora_weights", "\"pissa\""),
        ("loftq_config", "{\"loftq_bits\": 4}"),
        ("some_future_setting", "1"),
    ] {
        let error = LoraConfig::from_peft_json(&peft_config_with(key, value)).unwrap_err().to_string();
        assert!(error.contains(key), "`{key}: {value}` refused naming it: {error}");
    }
    // How fresh adapters were drawn, when it leaves the base alone, changes nothing.
    LoraConfig::from_peft_json(&peft_config_with("init_lora_weights", "\"gaussian\"")).unwrap();
    let rslora = LoraConfig::from_peft_json(&peft_config_with("use_rslora", "true")).unwrap();
    assert_eq!(rslora.scale(), 4.0, "alpha / sqrt(r)");

    // Targets that name no layer of the model, and adapters of another rank.
    let mut config = adapted_config(Kernels::Fused);
    config.lora = Some(LoraConfig::new(4, 8.0, ["c_attn"]));
    let error = Llama::new(&config, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu)).unwrap_err();
    assert!(error.to_string().contains("c_attn"), "{error}");
    let mut config = adapted_config(Kernels::Fused);
    config.lora = Some(LoraConfig::new(2, 8.0, ["q_proj", "v_proj", "down_proj"]));
    let error = launch(LaunchOptions::new(1), |ctx| {
        let model = Llama::new(&config, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu))?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().freeze(LoraConfig::FROZEN))?;
        peft::load_adapters(&fsdp, &golden_dir().join("adapter"))
    })
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") && error.contains("[2, 32]"),
        "{error}"
    );
}

/// On a bf16 base the adapters are f32 (PEFT's `autocast_adapter_dtype`), so one unit
/// holds both dtypes: the golden logits within bf16's rounding, two steps at world 2 that
/// move the f32 adapters and leave every bf16 base value as loaded.
#[test]
fn adapters_on_a_bf16_base_are_f32_and_train_beside_it() {
    let config = adapted_config(Kernels::Fused);
    let golden = golden();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    launch(LaunchOptions::new(2), |ctx| {
        let model = Llama::new(&config, VarBuilder::from_varmap(&VarMap::new(), DType::BF16, &Device::Cpu))?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().freeze(LoraConfig::FROZEN))?;
        checkpoint::load_pretrained_part(&fsdp, &golden_dir().join("base"), &|f| !peft::is_adapter(f), &|f| {
            f.to_string()
        })?;
        peft::load_adapters(&fsdp, &golden_dir().join("adapter"))?;
        assert!(fsdp.named_parameters().iter().all(|(_, v)| v.dtype() == DType::F32));
        assert!(fsdp.named_frozen_parameters().iter().all(|(_, t)| t.dtype() == DType::BF16));
        let logits = fsdp.forward_inference(|m| m.forward(&ids))?.to_dtype(DType::F32)?;
        let error = fsdp_testkit::error_of_largest(&logits, &golden["logits"]);
        assert!(error < 3e-2, "bf16 logits off by {error:.2e} of the largest");
        let before = fsdp.full_parameters()?;
        let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW { lr: 1e-2, ..Default::default() })?;
        let rows = ids.i(ctx.rank..ctx.rank + 1)?;
        for _ in 0..2 {
            let loss = fsdp.forward(|m| m.loss(&rows.i((.., ..9))?, &rows.i((.., 1..))?))?;
            optimizer.step(&fsdp.backward(&loss)?)?;
        }
        for ((fqn, old), (_, new)) in before.iter().zip(fsdp.full_parameters()?) {
            let same =
                (old.to_dtype(DType::F32)? - new.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
            assert_eq!(same, !peft::is_adapter(fqn), "`{fqn}` ({:?})", new.dtype());
        }
        Ok(())
    })
    .unwrap();
}

/// LoRA with the rest of the training recipe: bf16 compute over f32 shards, gradients
/// accumulated over two micro-batches without sync, and activation checkpointing, which
/// must change no bit (the frozen units' input hooks run on the recomputed graph too).
#[test]
fn adapters_train_alike_with_and_without_activation_checkpointing_under_bf16_and_accumulation() {
    use candle_fsdp::MixedPrecision;
    let config = adapted_config(Kernels::Fused);
    let golden = golden();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    let train = |checkpointed: bool| {
        launch(LaunchOptions::new(2), |ctx| {
            let model = Llama::new(&config, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu))?;
            let fsdp_config = FsdpConfig::default()
                .freeze(LoraConfig::FROZEN)
                .mixed_precision(MixedPrecision::compute_in(DType::BF16))
                .activation_checkpointing(checkpointed);
            let fsdp = Fsdp::wrap(model, ctx.comm.clone(), fsdp_config)?;
            checkpoint::load_pretrained_part(&fsdp, &golden_dir().join("base"), &|f| !peft::is_adapter(f), &|f| {
                f.to_string()
            })?;
            peft::load_adapters(&fsdp, &golden_dir().join("adapter"))?;
            let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW { lr: 1e-2, ..Default::default() })?;
            let rows = ids.i(ctx.rank..ctx.rank + 1)?;
            for _ in 0..2 {
                for micro in 0..2 {
                    fsdp.set_requires_gradient_sync(micro == 1);
                    let (start, len) = (micro * 4, 5);
                    let loss = fsdp.forward(|m| {
                        m.loss(&rows.i((.., start..start + len))?, &rows.i((.., start + 1..start + 1 + len))?)
                    })?;
                    let grads = fsdp.backward(&loss)?;
                    if micro == 1 {
                        optimizer.step(&grads)?;
                    }
                }
            }
            fsdp.full_parameters()
        })
        .unwrap()
        .remove(0)
    };
    let (plain, checkpointed) = (train(false), train(true));
    let start =
        candle_core::safetensors::load(golden_dir().join("adapter").join(peft::WEIGHTS_FILE), &Device::Cpu).unwrap();
    for ((fqn, a), (_, b)) in plain.iter().zip(&checkpointed) {
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bits(a), bits(b), "`{fqn}` differs with activation checkpointing");
        if let Some(loaded) = start.get(&format!("{}{fqn}", peft::NAME_PREFIX)) {
            assert!(fsdp_testkit::error_of_largest(a, loaded) > 1e-4, "`{fqn}` did not train");
        }
    }
}

/// Adapters on other families' projections train alone under FSDP: Phi-3's fused
/// `qkv_proj` and `gate_up_proj`, Mixtral's experts (`w1`, `w2`, `w3`), Gemma 2's
/// projections beside its soft caps; the base keeps every value, every adapter moves.
#[test]
fn adapters_on_fused_projections_experts_and_gemma_train_alone() {
    let families = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hf_families");
    for (name, targets) in [
        ("phi3", vec!["qkv_proj", "gate_up_proj"]),
        ("mixtral", vec!["w1", "w2", "w3"]),
        ("gemma2", vec!["q_proj", "down_proj"]),
    ] {
        let dir = families.join(name);
        let mut config = LlamaConfig::from_hf_file(&dir.join("config.json")).unwrap();
        config.lora = Some(LoraConfig::new(2, 4.0, targets.clone()));
        let golden = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
        let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
        let base = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        launch(LaunchOptions::new(2), |ctx| {
            let model = Llama::new(&config, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu))?;
            let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().freeze(LoraConfig::FROZEN))?;
            checkpoint::load_pretrained_part(&fsdp, &dir, &|f| !peft::is_adapter(f), &|f| f.to_string())?;
            let adapters: Vec<String> = fsdp.named_parameters().into_iter().map(|(n, _)| n).collect();
            assert!(!adapters.is_empty() && adapters.iter().all(|n| peft::is_adapter(n)), "{name}: {adapters:?}");
            assert!(adapters.iter().all(|n| targets.iter().any(|t| n.contains(&format!(".{t}.lora_")))), "{name}");
            let before = fsdp.full_parameters()?;
            let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW { lr: 1e-2, ..Default::default() })?;
            let rows = ids.i(ctx.rank..ctx.rank + 1)?;
            for _ in 0..2 {
                let loss = fsdp.forward(|m| m.loss(&rows.i((.., ..9))?, &rows.i((.., 1..))?))?;
                optimizer.step(&fsdp.backward(&loss)?)?;
            }
            for ((fqn, old), (_, new)) in before.iter().zip(fsdp.full_parameters()?) {
                let moved = (old - &new)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.0;
                assert_eq!(moved, peft::is_adapter(fqn), "{name}: `{fqn}`");
                if let Some(loaded) = base.get(fqn) {
                    assert_eq!(
                        loaded.flatten_all()?.to_vec1::<f32>()?,
                        new.flatten_all()?.to_vec1::<f32>()?,
                        "{name}: `{fqn}`"
                    );
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// The golden comparison: within 1e-4 of the largest value.
fn assert_close_1e4(actual: &Tensor, expected: &Tensor, what: &str) {
    fsdp_testkit::assert_within_of_largest(actual, expected, 1e-4, what);
}
