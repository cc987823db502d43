//! The Llama model and a Hugging Face `config.json`, against candle-transformers' own Llama
//! as the independent reference: a model read from the config, trained under FSDP on 2
//! ranks and exported, loads into `candle_transformers::models::llama::Llama` (which
//! parses the same config.json itself), and its logits equal the FSDP model's inference
//! forward; with grouped key/value heads, and with a tied head and Llama 3.1's rope
//! scaling. Settings the model does not compute are refused by their key.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_fsdp::checkpoint::{self, ExportOptions};
use candle_fsdp::models::llama::{Llama, LlamaConfig};
use candle_fsdp::optim::{AdamW, ParamsAdamW};
use candle_fsdp::{launch, Fsdp, FsdpConfig, LaunchOptions};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use candle_transformers::models::llama as reference;
use std::path::Path;

/// A small model in Hugging Face's config.json form; `extra` adds or overrides keys.
fn config_json(extra: &str) -> String {
    format!(
        r#"{{
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "vocab_size": 96,
  "hidden_size": 32,
  "intermediate_size": 80,
  "num_hidden_layers": 3,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "max_position_embeddings": 64,
  "rms_norm_eps": 1e-5,
  "rope_theta": 500000.0,
  "hidden_act": "silu",
  "initializer_range": 0.2,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "torch_dtype": "float32"{extra}
}}"#
    )
}

const TIED_LLAMA3: &str = r#",
  "tie_word_embeddings": true,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16, "rope_type": "llama3"}"#;

fn ids(seed: u32, batch: usize, seq: usize) -> Tensor {
    let values: Vec<u32> = (0..batch * seq).map(|i| (i as u32 * 37 + seed * 11 + 5) % 96).collect();
    Tensor::from_vec(values, (batch, seq), &Device::Cpu).unwrap()
}

/// Builds the model of `dir/config.json` (the same initial values on both ranks), trains
/// 3 AdamW steps under FSDP on 2 ranks, exports to `dir`, and returns rank 0's inference
/// logits on `input`.
fn train_and_export(dir: &Path, input: &Tensor) -> Tensor {
    let config = LlamaConfig::from_hf_file(&dir.join("config.json")).expect("read config.json");
    let var_map = VarMap::new();
    Llama::new(&config, VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu)).unwrap();
    let initial: std::collections::HashMap<String, Tensor> =
        var_map.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap())).collect();
    let outputs = launch(LaunchOptions::new(2), |ctx| {
        let model = Llama::new(&config, VarBuilder::from_tensors(initial.clone(), DType::F32, &Device::Cpu))?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW { lr: 1e-2, ..ParamsAdamW::default() })?;
        for step in 0..3 {
            let batch = ids(step * 2 + ctx.rank as u32, 2, 12);
            let logits = fsdp.forward(|m| m.forward(&batch))?;
            let (b, s, v) = logits.dims3()?;
            let targets = batch.narrow(1, 1, s - 1)?.flatten_all()?;
            let logits = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
            let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
            optimizer.step(&fsdp.backward(&loss)?)?;
        }
        // The config.json the model was read from is part of the export.
        let config_json = std::fs::read(dir.join("config.json"))?;
        let options = ExportOptions { files: vec![("config.json".into(), config_json)], ..ExportOptions::default() };
        checkpoint::export_hf(&fsdp, dir, &options)?;
        fsdp.forward_inference(|m| m.forward(input))
    })
    .expect("train and export");
    outputs.into_iter().next().unwrap()
}

/// candle-transformers' logits for the last position of `input`, from `dir`'s config.json
/// and model.safetensors.
fn reference_logits(dir: &Path, input: &Tensor) -> Tensor {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config: reference::LlamaConfig = serde_json::from_str(&text).unwrap();
    let config = config.into_config(false);
    let files = [dir.join("model.safetensors")];
    // SAFETY: committed golden files, which nothing writes while the tests map them.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }.unwrap();
    let model = reference::Llama::load(vb, &config).unwrap();
    let mut cache = reference::Cache::new(false, DType::F32, &config, &Device::Cpu).unwrap();
    model.forward(input, 0, &mut cache).unwrap()
}

fn export_matches_candle_transformers(extra: &str, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config_json(extra)).unwrap();
    let input = ids(99, 2, 10);
    let ours = train_and_export(dir.path(), &input);
    let ours_last = ours.i((.., 9, ..)).unwrap();
    let theirs = reference_logits(dir.path(), &input);
    let diff = (&ours_last - &theirs).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    let scale = theirs.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    eprintln!("{what}: max |logit difference| {diff:.3e} (logits up to {scale:.3})");
    assert!(diff <= 1e-4 * scale.max(1.0), "{what}: logits differ by {diff} from candle-transformers' (scale {scale})");
}

#[test]
fn an_export_loads_into_candle_transformers_llama_with_equal_logits() {
    export_matches_candle_transformers("", "grouped key/value heads");
}

#[test]
fn a_tied_head_and_llama3_rope_scaling_match_candle_transformers() {
    export_matches_candle_transformers(TIED_LLAMA3, "tied head, llama3 rope scaling");
    let config = LlamaConfig::from_hf_json(&config_json(TIED_LLAMA3)).unwrap();
    assert!(config.tie_word_embeddings);
    // A tied head is saved once, under the embedding's name.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config_json(TIED_LLAMA3)).unwrap();
    train_and_export(dir.path(), &ids(1, 1, 4));
    let names = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(names.contains_key("model.embed_tokens.weight") && !names.contains_key("lm_head.weight"));
}

#[test]
fn an_explicit_head_dim_sets_the_projection_shapes() {
    // The same head dimension written out changes nothing.
    let implicit = LlamaConfig::from_hf_json(&config_json("")).unwrap();
    let explicit = LlamaConfig::from_hf_json(&config_json(r#", "head_dim": 8"#)).unwrap();
    let var_map = VarMap::new();
    let model = Llama::new(&implicit, VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu)).unwrap();
    let values: std::collections::HashMap<String, Tensor> =
        var_map.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let same = Llama::new(&explicit, VarBuilder::from_tensors(values, DType::F32, &Device::Cpu)).unwrap();
    let input = ids(3, 1, 6);
    let (a, b) = (model.forward(&input).unwrap(), same.forward(&input).unwrap());
    assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());

    // A head dimension other than hidden / heads: Hugging Face's projection shapes.
    let wide = LlamaConfig::from_hf_json(&config_json(r#", "head_dim": 16"#)).unwrap();
    let var_map = VarMap::new();
    let model = Llama::new(&wide, VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu)).unwrap();
    let shape = |name: &str| var_map.data().lock().unwrap()[name].dims().to_vec();
    let shapes: Vec<Vec<usize>> =
        ["q_proj", "k_proj", "o_proj"].iter().map(|p| shape(&format!("model.layers.0.self_attn.{p}.weight"))).collect();
    assert_eq!(shapes, [vec![64, 32], vec![32, 32], vec![32, 64]]);
    assert_eq!(model.forward(&input).unwrap().dims(), [1, 6, 96]);
}

#[test]
fn a_config_written_by_the_library_reads_back_the_same() {
    for extra in ["", TIED_LLAMA3, r#", "head_dim": 16"#] {
        let config = LlamaConfig::from_hf_json(&config_json(extra)).unwrap();
        assert_eq!(LlamaConfig::from_hf_json(&config.to_hf_json()).unwrap(), config);
        // candle-transformers reads it too.
        let theirs: reference::LlamaConfig = serde_json::from_str(&config.to_hf_json()).unwrap();
        assert_eq!(theirs.num_key_value_heads(), config.num_key_value_heads);
    }
}

#[test]
fn settings_the_model_does_not_compute_are_refused_by_key() {
    let cases = [
        (r#", "attention_bias": true"#, "`attention_bias`"),
        (r#", "mlp_bias": true"#, "`mlp_bias`"),
        (r#", "sliding_window": 4096"#, "`sliding_window`"),
        (r#", "unknown_setting": 1"#, "`unknown_setting`"),
        (r#", "rope_scaling": {"type": "linear", "factor": 2.0}"#, "`rope_scaling` of type `linear`"),
        (r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#, "`rope_scaling` of type `yarn`"),
        (r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#, "`rope_scaling.low_freq_factor`"),
    ];
    for (extra, needle) in cases {
        let error = LlamaConfig::from_hf_json(&config_json(extra)).unwrap_err().to_string();
        assert!(error.contains(needle), "{extra}: the error `{error}` does not name {needle}");
    }
    let gelu = config_json("").replace(r#""hidden_act": "silu""#, r#""hidden_act": "gelu""#);
    let error = LlamaConfig::from_hf_json(&gelu).unwrap_err().to_string();
    assert!(error.contains("`hidden_act` is `gelu`"), "{error}");
    let gemma = config_json("").replace(r#""model_type": "llama""#, r#""model_type": "gemma""#);
    let error = LlamaConfig::from_hf_json(&gemma).unwrap_err().to_string();
    assert!(error.contains("`model_type` is `gemma`"), "{error}");
    // Another family's type with a Llama's architectures entry disagrees with itself.
    let mistral = config_json("").replace(r#""model_type": "llama""#, r#""model_type": "mistral""#);
    let error = LlamaConfig::from_hf_json(&mistral).unwrap_err().to_string();
    assert!(error.contains("`architectures`"), "{error}");
    // Settings that change no arithmetic pass, and defaults follow Hugging Face.
    let plain = LlamaConfig::from_hf_json(&config_json(r#", "attention_bias": false, "rope_scaling": null"#)).unwrap();
    assert_eq!((plain.num_key_value_heads, plain.rope_scaling, plain.tie_word_embeddings), (2, None, false));
}

/// The golden models transformers wrote (`tests/golden/hf_llama/make_golden.py`):
/// (folder, `rope_theta`, whether the llama3 scaling is on, whether the head is tied).
const GOLDEN: [(&str, f64, bool, bool); 4] = [
    ("v4-llama31-scaled-untied", 500000.0, true, false),
    ("v4-theta-tied", 500000.0, false, true),
    ("v5-llama32-scaled-tied", 500000.0, true, true),
    ("v5-theta-untied", 500000.0, false, false),
];

fn golden_dir(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hf_llama").join(name)
}

/// The golden's input ids and the logits transformers computed for them.
fn golden_logits(dir: &Path) -> (Tensor, Tensor) {
    let file = candle_core::safetensors::load(dir.join("logits.safetensors"), &Device::Cpu).unwrap();
    (file["input_ids"].to_dtype(DType::U32).unwrap(), file["logits"].clone())
}

/// A plain (unwrapped) model of `config` with the golden's weights.
fn golden_model(config: &LlamaConfig, dir: &Path) -> Llama {
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    Llama::new(config, VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu)).unwrap()
}

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Logits within 1e-4 of transformers' (which are up to about 5).
const LOGIT_TOLERANCE: f32 = 1e-4;

#[test]
fn configs_of_both_transformers_layouts_give_transformers_logits() {
    for (name, theta, scaled, tied) in GOLDEN {
        let dir = golden_dir(name);
        let config = LlamaConfig::from_hf_file(&dir.join("config.json")).unwrap();
        assert_eq!(
            (config.rope_theta, config.rope_scaling.is_some(), config.tie_word_embeddings),
            (theta, scaled, tied),
            "{name}"
        );
        let (input, expected) = golden_logits(&dir);
        let plain = golden_model(&config, &dir).forward(&input).unwrap();
        let diff = max_difference(&plain, &expected);
        eprintln!("{name}: max logit difference from transformers {diff:.2e}");
        assert!(diff <= LOGIT_TOLERANCE, "{name}: logits differ from transformers' by {diff}");

        // The same checkpoint loaded into a sharded model over 2 ranks.
        let sharded = launch(LaunchOptions::new(2), |ctx| {
            let var_map = VarMap::new();
            let model = Llama::new(&config, VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu))?;
            let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
            checkpoint::load_pretrained(&fsdp, &dir)?;
            fsdp.forward_inference(|m| m.forward(&input))
        })
        .unwrap();
        for logits in sharded {
            let diff = max_difference(&logits, &expected);
            assert!(diff <= LOGIT_TOLERANCE, "{name}, sharded: logits differ from transformers' by {diff}");
        }

        // The rotary settings matter at these sizes: read as the plain rotary embedding
        // (what an ignored `rope_parameters` gives), the logits are far off.
        let misread = LlamaConfig { rope_theta: 10_000.0, rope_scaling: None, ..config.clone() };
        let diff = max_difference(&golden_model(&misread, &dir).forward(&input).unwrap(), &expected);
        eprintln!("{name}: misread rotary embedding moves the logits by {diff:.2e}");
        assert!(diff > 100.0 * LOGIT_TOLERANCE, "{name}: a misread rotary embedding moves the logits only by {diff}");
    }
}

#[test]
fn an_export_of_a_transformers_5_checkpoint_reads_back_as_the_same_model() {
    for (name, ..) in GOLDEN {
        let dir = golden_dir(name);
        let config = LlamaConfig::from_hf_file(&dir.join("config.json")).unwrap();
        let out = tempfile::tempdir().unwrap();
        launch(LaunchOptions::new(2), |ctx| {
            let var_map = VarMap::new();
            let model = Llama::new(&config, VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu))?;
            let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
            checkpoint::load_pretrained(&fsdp, &dir)?;
            let files = vec![("config.json".into(), config.to_hf_json().into_bytes())];
            checkpoint::export_hf(&fsdp, out.path(), &ExportOptions { files, ..ExportOptions::default() })?;
            Ok(())
        })
        .unwrap();
        // Both layouts are written and agree; each reader finds the same model.
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(written["rope_theta"], written["rope_parameters"]["rope_theta"], "{name}");
        let again = LlamaConfig::from_hf_file(&out.path().join("config.json")).unwrap();
        assert_eq!(again, config, "{name}");
        let (input, expected) = golden_logits(&dir);
        let diff = max_difference(&golden_model(&again, out.path()).forward(&input).unwrap(), &expected);
        assert!(diff <= LOGIT_TOLERANCE, "{name}, exported: logits differ from transformers' by {diff}");
        // candle-transformers, which reads only the top-level keys, computes the same.
        let theirs = reference_logits(out.path(), &input);
        let ours_last = expected.i((.., expected.dim(1).unwrap() - 1, ..)).unwrap();
        let diff = max_difference(&theirs, &ours_last);
        assert!(diff <= LOGIT_TOLERANCE, "{name}: candle-transformers' logits differ from transformers' by {diff}");
    }
}

#[test]
fn the_transformers_5_layout_is_read_by_allow_list() {
    let v5 = std::fs::read_to_string(golden_dir("v5-llama32-scaled-tied").join("config.json")).unwrap();
    let with = |from: &str, to: &str| {
        assert!(v5.contains(from), "the golden config holds {from}");
        v5.replacen(from, to, 1)
    };
    let cases = [
        (with(r#""rope_type": "llama3""#, r#""rope_type": "linear""#), "`rope_parameters` of type `linear`"),
        (with(r#""rope_type": "llama3""#, r#""rope_type": "yarn""#), "`rope_parameters` of type `yarn`"),
        (with(r#""factor": 8.0,"#, ""), "`rope_parameters.factor` is missing"),
        (with(r#""factor": 8.0,"#, r#""factor": 8.0, "mscale": 1.0,"#), "`rope_parameters.mscale`"),
        // Both layouts, disagreeing.
        (with(r#""rms_norm_eps""#, r#""rope_theta": 10000.0, "rms_norm_eps""#), "`rope_theta` is 10000"),
        (
            with(
                r#""rms_norm_eps""#,
                r#""rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, "rms_norm_eps""#,
            ),
            "`rope_scaling` and `rope_parameters` describe different",
        ),
        // Keys the reader does not know, and settings it does not compute.
        (
            with(r#""use_cache": true"#, r#""use_cache": true, "quantization_config": {"bits": 4}"#),
            "`quantization_config`",
        ),
        (with(r#""use_cache": true"#, r#""use_cache": true, "auto_map": {}"#), "`auto_map`"),
        (with(r#""attention_dropout": 0.0"#, r#""attention_dropout": 0.1"#), "`attention_dropout` is 0.1"),
        (with(r#""pretraining_tp": 1"#, r#""pretraining_tp": 2"#), "`pretraining_tp` is 2"),
        (with(r#""LlamaForCausalLM""#, r#""LlamaForSequenceClassification""#), "`architectures`"),
        (
            with(r#""use_cache": true"#, r#""use_cache": true, "is_encoder_decoder": true"#),
            "`is_encoder_decoder` is true",
        ),
    ];
    for (text, needle) in cases {
        let error = LlamaConfig::from_hf_json(&text).unwrap_err().to_string();
        assert!(error.contains(needle), "the error `{error}` does not name {needle}");
    }
    // Both layouts agreeing, and settings written out at their defaults, pass.
    let agreeing = with(r#""rms_norm_eps""#, r#""rope_theta": 500000.0, "is_decoder": false, "rms_norm_eps""#);
    assert_eq!(LlamaConfig::from_hf_json(&agreeing).unwrap(), LlamaConfig::from_hf_json(&v5).unwrap());
}
