//! Qwen2, Qwen3, Mistral, Phi-3, Mixtral, Gemma 2 and Gemma 3 checkpoints written by transformers (`tests/golden/hf_families`,
//! with the script that makes them) through the public import API, against the logits,
//! loss and gradients transformers computed: each family's own settings switched on
//! (Qwen2's q/k/v biases, Qwen3's per-head q/k norms with an explicit head dimension,
//! Mistral's sliding window shorter than the sequence, Phi-3's fused q/k/v and gate/up
//! projections with a window, Mixtral's experts with the router's load-balancing loss,
//! Gemma's `1 + w` norms around attention and MLP, GeGLU, scaled embeddings, soft caps,
//! alternating windows and rotary bases, and a padding token whose embedding row gets no
//! gradient), on both kernel paths. Trained 2
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

const FAMILIES: [(&str, Family); 7] = [
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("mistral", Family::Mistral),
    ("phi3", Family::Phi3),
    ("mixtral", Family::Mixtral),
    ("gemma2", Family::Gemma2),
    ("gemma3", Family::Gemma3),
];

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hf_families").join(name)
}

fn wrapped(config: &LlamaConfig, comm: std::sync::Arc<dyn candle_fsdp::dist::Collectives>) -> Fsdp<Llama> {
    let model = Llama::new(config, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu)).unwrap();
    Fsdp::wrap(model, comm, FsdpConfig::default()).unwrap()
}

#[test]
fn transformers_logits_loss_and_gradients_of_each_family() {
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
                assert_close_1e4(
                    &fsdp.forward_inference(|m| m.forward(&ids))?,
                    &golden["logits"],
                    &format!("{what}: logits"),
                );
                let loss = fsdp.forward(|m| m.loss(&inputs, &targets))?;
                assert_close_1e4(&loss.reshape(1)?, &golden["loss"], &format!("{what}: loss"));
                let grads = fsdp.backward(&loss)?;
                let params: HashMap<String, candle_core::Var> = fsdp.named_parameters().into_iter().collect();
                for (key, expected) in golden.iter().filter(|(k, _)| k.starts_with("grad.")) {
                    let fqn = &key["grad.".len()..];
                    let grad = grads.get(params[fqn].as_tensor()).expect("a gradient");
                    let grad = grad.narrow(0, 0, expected.elem_count())?.reshape(expected.shape())?;
                    assert_close_1e4(&grad, expected, &format!("{what}: gradient of `{fqn}`"));
                }
                Ok(())
            })
            .unwrap();
        }
    }
}

/// What makes each family differ from a Llama is in effect: without it the logits move
/// far beyond the tolerance above (Qwen's biases zeroed and head norms set to ones, the
/// window of Mistral and Phi-3 off, Mixtral's tokens sent to one expert instead of two),
/// and Mixtral's loss without the router's load-balancing term is another loss.
#[test]
fn each_familys_own_setting_changes_the_logits() {
    for (name, family) in FAMILIES {
        let golden = candle_core::safetensors::load(dir(name).join("golden.safetensors"), &Device::Cpu).unwrap();
        let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
        let read = LlamaConfig::from_hf_file(&dir(name).join("config.json")).unwrap();
        let mut without = LlamaConfig { sliding_window: None, ..read.clone() };
        if let Some(moe) = &mut without.moe {
            moe.top_k = 1;
        }
        let tensors = candle_core::safetensors::load(dir(name).join("model.safetensors"), &Device::Cpu).unwrap();
        let logits = launch(LaunchOptions::new(1), |ctx| {
            let fsdp = wrapped(&without, ctx.comm.clone());
            checkpoint::load_pretrained(&fsdp, &dir(name))?;
            let neutral: Vec<(String, Tensor)> = tensors
                .iter()
                .filter(|(fqn, _)| fqn.ends_with("_proj.bias") || (fqn.contains("_norm.") && fqn.contains("self_attn")))
                .map(|(fqn, t)| {
                    (fqn.clone(), if fqn.contains("_norm.") { t.ones_like() } else { t.zeros_like() }.unwrap())
                })
                .collect();
            fsdp.summon_units(candle_fsdp::SummonOptions { writeback: true, ..Default::default() }, |_, params| {
                for (fqn, value) in params {
                    if let Some((_, replacement)) = neutral.iter().find(|(f, _)| f == fqn) {
                        value.slice_set(replacement, 0, 0).unwrap();
                    }
                }
            })?;
            fsdp.forward_inference(|m| m.forward(&ids))
        })
        .unwrap();
        let moved = fsdp_testkit::error_of_largest(&logits[0], &golden["logits"]);
        assert!(moved > 1e-2, "{name}: without its own setting the logits move by only {moved:.2e}");
        if family == Family::Mixtral {
            let mut no_aux = read.clone();
            no_aux.moe.as_mut().unwrap().router_aux_loss_coef = None;
            let loss = launch(LaunchOptions::new(1), |ctx| {
                let fsdp = wrapped(&no_aux, ctx.comm.clone());
                checkpoint::load_pretrained(&fsdp, &dir(name))?;
                fsdp.forward_inference(|m| m.loss(&ids.i((.., ..9))?, &ids.i((.., 1..))?))
            })
            .unwrap();
            let moved = fsdp_testkit::error_of_largest(&loss[0].reshape(1).unwrap(), &golden["loss"]);
            assert!(moved > 1e-3, "mixtral: the load-balancing loss moves the loss by only {moved:.2e}");
        }
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
        assert!(
            fsdp_testkit::error_of_largest(&trained[0], &golden["logits"]) > 1e-3,
            "{name}: training moved the logits"
        );
        let reread = LlamaConfig::from_hf_file(&export.join("config.json")).unwrap();
        assert_eq!(reread, config, "{name}: the exported config.json");
        let reloaded = launch(LaunchOptions::new(1), |ctx| {
            let fsdp = wrapped(&reread, ctx.comm.clone());
            checkpoint::load_pretrained(&fsdp, &export)?;
            fsdp.forward_inference(|m| m.forward(&ids))
        })
        .unwrap();
        assert_close_1e4(&reloaded[0], &trained[0], &format!("{name}: the export's logits"));
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
        ("mixtral", "router_jitter_noise", "0.1"),
        ("gemma2", "hidden_activation", r#""gelu""#),
        ("gemma2", "layer_types", r#"["sliding_attention", "chunked_attention"]"#),
        ("gemma3", "use_bidirectional_attention", "true"),
        ("gemma3", "rope_scaling", r#"{"rope_type": "linear", "factor": 8.0}"#),
        ("mixtral", "num_local_experts", "null"),
    ] {
        let error = LlamaConfig::from_hf_json(&with(name, key, value)).unwrap_err().to_string();
        assert!(error.contains(key), "{name} with `{key}: {value}`: the error `{error}` does not name it");
    }
    // A missing key takes transformers' default for the family; null means none.
    let without = |name: &str, key: &str| {
        let mut config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text(name)).unwrap();
        config.remove(key);
        LlamaConfig::from_hf_json(&serde_json::to_string(&config).unwrap()).unwrap()
    };
    assert_eq!(without("mistral", "sliding_window").sliding_window, Some(4096));
    let mut bare: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text("mixtral")).unwrap();
    for key in ["rms_norm_eps", "rope_parameters", "num_key_value_heads"] {
        bare.remove(key);
    }
    // Mixtral's 8 key/value heads by default, so heads a multiple of 8.
    bare.insert("num_attention_heads".into(), 16.into());
    let mixtral = LlamaConfig::from_hf_json(&serde_json::to_string(&bare).unwrap()).unwrap();
    assert_eq!((mixtral.rms_norm_eps, mixtral.rope_theta, mixtral.num_key_value_heads), (1e-5, 1e6, 8));
    let gemma2 = without("gemma2", "attn_logit_softcapping").gemma.unwrap();
    assert_eq!(gemma2.attn_logit_softcapping, Some(50.0));
    let gemma2 = LlamaConfig::from_hf_json(&with("gemma2", "final_logit_softcapping", "null")).unwrap().gemma.unwrap();
    assert_eq!(gemma2.final_logit_softcapping, None);
    assert_eq!(without("gemma3", "final_logit_softcapping").gemma.unwrap().final_logit_softcapping, None);
    // Gemma 3's pattern is read beside the layer list, and must agree with it.
    let error = LlamaConfig::from_hf_json(&with("gemma3", "sliding_window_pattern", "1")).unwrap_err().to_string();
    assert!(error.contains("sliding_window_pattern"), "{error}");
    let gemma3 = without("gemma3", "layer_types").gemma.unwrap();
    assert_eq!(gemma3.sliding_layers, [true, true], "every sixth layer full, from `_sliding_window_pattern`");
    // Settings built by hand that do not fit the model are an error, not a panic later.
    let mut short = LlamaConfig::from_hf_file(&dir("gemma2").join("config.json")).unwrap();
    short.gemma.as_mut().unwrap().sliding_layers.pop();
    let error = Llama::new(&short, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu)).unwrap_err();
    assert!(error.to_string().contains("sliding_layers"), "{error}");
    // Mistral without a window attends to everything before it, and says so back.
    let unwindowed = LlamaConfig::from_hf_json(&with("mistral", "sliding_window", "null")).unwrap();
    assert_eq!(unwindowed.sliding_window, None);
    assert_eq!(LlamaConfig::from_hf_json(&unwindowed.to_hf_json()).unwrap(), unwindowed);
}

/// A Mixtral block under FSDP where the ranks route to disjoint experts (rank 0's tokens
/// reach experts 0 and 1 only, rank 1's experts 2 and 3 only): every rank still reduces
/// every expert (the unused ones with a zero gradient), and one SGD step equals one
/// process's step on both ranks' tokens, gradients averaged.
#[test]
fn experts_no_token_of_a_rank_reaches_still_reduce_in_step() {
    use candle_fsdp::models::moe::{MoeConfig, SparseMoe};
    use candle_fsdp::optim::{SgdMomentum, SgdMomentumConfig};
    use candle_fsdp::{Shardable, Unit};

    #[derive(Debug, Shardable)]
    struct Block {
        moe: Unit<SparseMoe>,
    }
    impl Block {
        fn loss(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            let y = self.moe.run_fn(x.clone(), |moe, x| moe.forward(&x).map(|(y, _)| y))?;
            y.sqr()?.sum_all()
        }
    }
    let config = MoeConfig { num_experts: 4, top_k: 2, router_aux_loss_coef: None };
    let build = |var_map: &VarMap| -> SparseMoe {
        let vb = VarBuilder::from_varmap(var_map, DType::F32, &Device::Cpu);
        let init = candle_nn::Init::Randn { mean: 0.0, stdev: 0.3 };
        SparseMoe::new(4, 6, &config, init, None, Kernels::Fused, vb).unwrap()
    };
    let var_map = VarMap::new();
    build(&var_map);
    // The router: experts 0 and 1 score high on positive inputs, 2 and 3 on negative ones.
    let gate = Tensor::new(
        &[[1f32, 1., 1., 1.], [0.5, 0.5, 0.5, 0.5], [-1., -1., -1., -1.], [-0.5, -0.5, -0.5, -0.5]],
        &Device::Cpu,
    )
    .unwrap();
    var_map.data().lock().unwrap()["gate.weight"].set(&gate).unwrap();
    let input = |rank: usize| {
        let sign = if rank == 0 { 1.0 } else { -1.0 };
        (fsdp_testkit::rand(7 + rank as u64, &[1, 5, 4]).affine(1.0, 0.1).unwrap() * sign).unwrap()
    };
    let sgd = SgdMomentumConfig { lr: 0.1, momentum: 0.0 };

    // One process: both ranks' losses, gradients averaged.
    let reference_map = VarMap::new();
    let reference = Block { moe: Unit::new(build(&reference_map)) };
    for (name, var) in var_map.data().lock().unwrap().iter() {
        reference_map.data().lock().unwrap()[name].set(var.as_tensor()).unwrap();
    }
    let both = ((reference.loss(&input(0)).unwrap() + reference.loss(&input(1)).unwrap()).unwrap() / 2.0).unwrap();
    let mut opt = SgdMomentum::new(reference_map.all_vars(), sgd).unwrap();
    opt.step(&both.backward().unwrap()).unwrap();

    let trained = launch(LaunchOptions::new(2), |ctx| {
        let map = VarMap::new();
        let moe = build(&map);
        for (name, var) in var_map.data().lock().unwrap().iter() {
            map.data().lock().unwrap()[name].set(var.as_tensor())?;
        }
        let fsdp = Fsdp::wrap(Block { moe: Unit::new(moe) }, ctx.comm.clone(), FsdpConfig::default())?;
        let mut opt = SgdMomentum::new(fsdp.parameters(), sgd)?;
        let loss = fsdp.forward(|m| m.loss(&input(ctx.rank)))?;
        let grads = fsdp.backward(&loss)?;
        assert_eq!(
            fsdp.parameters().iter().filter(|v| grads.get(v.as_tensor()).is_some()).count(),
            fsdp.parameters().len()
        );
        opt.step(&grads)?;
        fsdp.full_parameters()
    })
    .unwrap();
    let expected = reference_map.data().lock().unwrap();
    for (fqn, value) in &trained[0] {
        let fqn = fqn.strip_prefix("moe.").unwrap();
        assert_close_1e4(value, expected[fqn].as_tensor(), &format!("`{fqn}` after one step"));
    }
}

/// Every family trains to the same bits with its layers checkpointed, at world 2, with
/// bf16 compute over f32 shards: windows, soft caps, experts and the router's term all
/// recompute as they first ran.
#[test]
fn each_family_trains_alike_with_activation_checkpointing_under_bf16() {
    for (name, _) in FAMILIES {
        let config = LlamaConfig::from_hf_file(&dir(name).join("config.json")).unwrap();
        let golden = candle_core::safetensors::load(dir(name).join("golden.safetensors"), &Device::Cpu).unwrap();
        let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
        let train = |checkpointed: bool| {
            launch(LaunchOptions::new(2), |ctx| {
                let model = Llama::new(&config, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu))?;
                let fsdp_config = FsdpConfig::default()
                    .mixed_precision(candle_fsdp::MixedPrecision::compute_in(DType::BF16))
                    .activation_checkpointing(checkpointed);
                let fsdp = Fsdp::wrap(model, ctx.comm.clone(), fsdp_config)?;
                checkpoint::load_pretrained(&fsdp, &dir(name))?;
                let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW { lr: 1e-2, ..Default::default() })?;
                let rows = ids.i(ctx.rank..ctx.rank + 1)?;
                for _ in 0..2 {
                    let loss = fsdp.forward(|m| m.loss(&rows.i((.., ..7))?, &rows.i((.., 1..8))?))?;
                    optimizer.step(&fsdp.backward(&loss)?)?;
                }
                fsdp.full_parameters()
            })
            .unwrap_or_else(|e| panic!("{name}, checkpointed {checkpointed}: {e}"))
            .remove(0)
        };
        let (plain, checkpointed) = (train(false), train(true));
        for ((fqn, a), (_, b)) in plain.iter().zip(&checkpointed) {
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(bits(a), bits(b), "{name}: `{fqn}` differs with activation checkpointing");
        }
    }
}

/// The golden comparison: within 1e-4 of the largest value.
fn assert_close_1e4(actual: &Tensor, expected: &Tensor, what: &str) {
    fsdp_testkit::assert_within_of_largest(actual, expected, 1e-4, what);
}
