//! The FQN table of the Llama-style model against the Hugging Face `LlamaForCausalLM`
//! parameter names, and the `VarMap` cross-check. Expected values are written out literally.

use candle_core::{DType, Device, Tensor};
use candle_fsdp::model::{Layout, Role};
use candle_fsdp::models::llama::{Llama, LlamaConfig};
use candle_fsdp::ConfigError;
use candle_fsdp::{Error, ShardableModel};
use candle_nn::{VarBuilder, VarMap};

/// Hugging Face `LlamaForCausalLM.state_dict()` order, per-layer entries as templates.
const HF_NAMES: [&str; 12] = [
    "model.embed_tokens.weight",
    "model.layers.{index}.self_attn.q_proj.weight",
    "model.layers.{index}.self_attn.k_proj.weight",
    "model.layers.{index}.self_attn.v_proj.weight",
    "model.layers.{index}.self_attn.o_proj.weight",
    "model.layers.{index}.mlp.gate_proj.weight",
    "model.layers.{index}.mlp.up_proj.weight",
    "model.layers.{index}.mlp.down_proj.weight",
    "model.layers.{index}.input_layernorm.weight",
    "model.layers.{index}.post_attention_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
];

fn build(config: &LlamaConfig) -> (Llama, VarMap) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Llama::new(config, vb).expect("build llama");
    (model, varmap)
}

#[test]
fn static_table_is_the_hugging_face_name_list() {
    let table = Llama::TABLE;
    let names: Vec<String> = table.params.iter().map(|p| p.fqn.to_string()).collect();
    // Each attention and MLP projection may carry a bias and LoRA adapters (PEFT's names)
    // after its weight; the attention may hold Qwen3's head norms, attention and MLP
    // Phi-3's fused projections, a layer Mixtral's experts and Gemma's norms around the
    // MLP. A Llama built without them holds HF_NAMES alone.
    let mut expected = Vec::new();
    let projection = |expected: &mut Vec<String>, name: &str| {
        // Its weight, Qwen2's bias, then the adapters.
        for part in ["weight", "bias", "lora_A.weight", "lora_B.weight"] {
            expected.push(format!("{name}.{part}"));
        }
    };
    for name in HF_NAMES {
        match name.strip_suffix(".weight").filter(|n| n.ends_with("_proj")) {
            Some(module) => projection(&mut expected, module),
            None => expected.push(name.to_string()),
        }
        // Phi-3's fused projections follow the ones they stack.
        if name.ends_with("v_proj.weight") {
            projection(&mut expected, "model.layers.{index}.self_attn.qkv_proj");
        }
        if name.ends_with("up_proj.weight") {
            projection(&mut expected, "model.layers.{index}.mlp.gate_up_proj");
        }
        if name.ends_with("down_proj.weight") {
            // Mixtral's router and experts, in place of the MLP.
            projection(&mut expected, "model.layers.{index}.block_sparse_moe.gate");
            for w in ["w1", "w2", "w3"] {
                projection(&mut expected, &format!("model.layers.{{index}}.block_sparse_moe.experts.{{index}}.{w}"));
            }
        }
        if name.ends_with("o_proj.weight") {
            // Qwen3's and Gemma 3's per-head norms follow the projections.
            expected.push("model.layers.{index}.self_attn.q_norm.weight".to_string());
            expected.push("model.layers.{index}.self_attn.k_norm.weight".to_string());
        }
        if name.ends_with("post_attention_layernorm.weight") {
            // Gemma's norms around the MLP.
            expected.push("model.layers.{index}.pre_feedforward_layernorm.weight".to_string());
            expected.push("model.layers.{index}.post_feedforward_layernorm.weight".to_string());
        }
    }
    assert_eq!(names, expected);
    assert!(table.params.iter().all(|p| p.role == Role::Parameter));

    let units: Vec<String> = table.units.iter().map(|u| u.display_name()).collect();
    assert_eq!(units, ["<root>", "model.layers.{index}"]);
    let root: Vec<String> = table.unit_params(0).map(|p| p.fqn.to_string()).collect();
    assert_eq!(root, ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]);
    // A renamed field's dotted name stays one template segment.
    assert_eq!(table.params[1].fqn.segments(), ["model.layers", "{index}", "self_attn", "q_proj", "weight"]);
}

#[test]
fn layout_of_a_built_model_matches_its_var_map() {
    let config = LlamaConfig { num_hidden_layers: 3, ..LlamaConfig::default() };
    let (model, varmap) = build(&config);
    let layout = Layout::of(&model).expect("layout");
    layout.check_var_map(&varmap).expect("VarMap keys are the FQNs");

    let names: Vec<&str> = layout.params.iter().map(|p| p.fqn.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.self_attn.o_proj.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.1.self_attn.v_proj.weight",
            "model.layers.1.self_attn.o_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight",
            "model.layers.2.self_attn.q_proj.weight",
            "model.layers.2.self_attn.k_proj.weight",
            "model.layers.2.self_attn.v_proj.weight",
            "model.layers.2.self_attn.o_proj.weight",
            "model.layers.2.mlp.gate_proj.weight",
            "model.layers.2.mlp.up_proj.weight",
            "model.layers.2.mlp.down_proj.weight",
            "model.layers.2.input_layernorm.weight",
            "model.layers.2.post_attention_layernorm.weight",
            "model.norm.weight",
            "lm_head.weight",
        ]
    );

    let units: Vec<&str> = layout.units.iter().map(|u| u.display_name()).collect();
    assert_eq!(units, ["<root>", "model.layers.0", "model.layers.1", "model.layers.2"]);
    assert_eq!(layout.unit_fqns(0), ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]);
    let order: Vec<&str> = layout.post_forward_order.iter().map(|&u| layout.units[u].display_name()).collect();
    assert_eq!(order, ["model.layers.0", "model.layers.1", "model.layers.2", "<root>"]);

    // Shapes with the default config: vocab 128, hidden 32, 4 heads of 8, 2 kv heads, mlp 64.
    let shape = |fqn: &str| layout.params.iter().find(|p| p.fqn == fqn).unwrap().tensor.dims().to_vec();
    assert_eq!(shape("model.embed_tokens.weight"), [128, 32]);
    assert_eq!(shape("model.layers.1.self_attn.q_proj.weight"), [32, 32]);
    assert_eq!(shape("model.layers.1.self_attn.k_proj.weight"), [16, 32]);
    assert_eq!(shape("model.layers.1.self_attn.v_proj.weight"), [16, 32]);
    assert_eq!(shape("model.layers.1.self_attn.o_proj.weight"), [32, 32]);
    assert_eq!(shape("model.layers.1.mlp.gate_proj.weight"), [64, 32]);
    assert_eq!(shape("model.layers.1.mlp.down_proj.weight"), [32, 64]);
    assert_eq!(shape("model.layers.1.input_layernorm.weight"), [32]);
    assert_eq!(shape("lm_head.weight"), [128, 32]);
}

#[test]
fn a_wrong_var_map_names_the_extra_and_the_missing_fqn() {
    let (model, varmap) = build(&LlamaConfig::default());
    let layout = Layout::of(&model).expect("layout");
    {
        let mut vars = varmap.data().lock().unwrap();
        vars.remove("model.layers.1.mlp.up_proj.weight").expect("the key exists");
        let extra = candle_core::Var::zeros(4, DType::F32, &Device::Cpu).unwrap();
        vars.insert("model.layers.1.mlp.extra_proj.weight".to_string(), extra);
    }
    match layout.check_var_map(&varmap) {
        Err(Error::Config(ConfigError::VarMapMismatch { mismatches })) => {
            assert_eq!(
                mismatches,
                [
                    "model.layers.1.mlp.extra_proj.weight: in the VarMap, not in the model",
                    "model.layers.1.mlp.up_proj.weight: in the model, not in the VarMap",
                ]
            );
        }
        other => panic!("expected VarMapMismatch, got {other:?}"),
    }
}

#[test]
fn a_var_map_holding_a_copy_is_refused() {
    let (model, varmap) = build(&LlamaConfig::default());
    let layout = Layout::of(&model).expect("layout");
    {
        let mut vars = varmap.data().lock().unwrap();
        let copy = candle_core::Var::from_tensor(&vars["model.norm.weight"].as_tensor().copy().unwrap()).unwrap();
        vars.insert("model.norm.weight".to_string(), copy);
    }
    match layout.check_var_map(&varmap) {
        Err(Error::Config(ConfigError::VarMapMismatch { mismatches })) => {
            assert_eq!(mismatches, ["model.norm.weight: the VarMap holds a different tensor under this name"]);
        }
        other => panic!("expected VarMapMismatch, got {other:?}"),
    }
}

#[test]
fn forward_gives_logits_and_is_causal() {
    let (model, _) = build(&LlamaConfig::default());
    let device = Device::Cpu;
    let ids = Tensor::new(&[[1u32, 5, 9, 2, 7, 3], [4, 4, 8, 0, 127, 6]], &device).unwrap();
    let logits = model.forward(&ids).expect("forward");
    assert_eq!(logits.dims(), [2, 6, 128]);

    // Changing the last token changes no earlier position's logits.
    let changed = Tensor::new(&[[1u32, 5, 9, 2, 7, 100], [4, 4, 8, 0, 127, 6]], &device).unwrap();
    let logits2 = model.forward(&changed).unwrap();
    let diff = (logits.narrow(1, 0, 5).unwrap() - logits2.narrow(1, 0, 5).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    let last = (logits.narrow(1, 5, 1).unwrap() - logits2.narrow(1, 5, 1).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(last > 0.0);

    let too_long = Tensor::zeros((1, 65), DType::U32, &device).unwrap();
    assert!(model.forward(&too_long).is_err());
}
