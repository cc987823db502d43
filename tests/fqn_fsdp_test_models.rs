//! FQNs, units and orders of the PyTorch FSDP test models (`fsdp_test_models`), tied parameters, and
//! the refusal of a tie across units. Expected values are written out literally.

use candle_core::{DType, Device, Module, Tensor};
use candle_fsdp::model::{Layout, Role, Tie};
use candle_fsdp::ConfigError;
use candle_fsdp::{Error, Shardable, ShardableModel, Unit};
use candle_nn::{Linear, VarBuilder, VarMap};
use fsdp_testkit::fsdp_test_models::{
    AlwaysWrapNestedWrappedModule, DoubleLinear, DoubleLinearEachUnit, Mlp, NestedWrappedModule,
    TransformerWithSharedParams,
};

fn var_builder(varmap: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu)
}

fn unit_names(layout: &Layout, order: &[usize]) -> Vec<String> {
    order.iter().map(|&u| layout.units[u].display_name().to_string()).collect()
}

const NESTED_FQNS: [&str; 8] = [
    "module.0.weight",
    "module.0.bias",
    "module.1.0.weight",
    "module.1.0.bias",
    "module.1.1.weight",
    "module.1.1.bias",
    "module.2.weight",
    "module.2.bias",
];

#[test]
fn nested_wrapped_module_fqns_and_units() {
    let varmap = VarMap::new();
    let model = NestedWrappedModule::new(var_builder(&varmap)).unwrap();
    let layout = Layout::of(&model).unwrap();
    layout.check_var_map(&varmap).unwrap();

    let fqns: Vec<&str> = layout.params.iter().map(|p| p.fqn.as_str()).collect();
    let mut expected = NESTED_FQNS.to_vec();
    expected.extend(["module.3.weight", "module.3.bias"]);
    assert_eq!(fqns, expected);

    // PyTorch: 4 FSDP units, the root holding Linear(8,4) and Linear(4,8).
    let units: Vec<&str> = layout.units.iter().map(|u| u.display_name()).collect();
    assert_eq!(units, ["<root>", "module.1", "module.1.0", "module.2"]);
    let unit = |name: &str| layout.unit_named(name).unwrap();
    assert_eq!(layout.unit_fqns(0), ["module.0.weight", "module.0.bias", "module.3.weight", "module.3.bias"]);
    assert_eq!(layout.unit_fqns(unit("module.1")), ["module.1.1.weight", "module.1.1.bias"]);
    assert_eq!(layout.unit_fqns(unit("module.1.0")), ["module.1.0.weight", "module.1.0.bias"]);
    assert_eq!(layout.unit_fqns(unit("module.2")), ["module.2.weight", "module.2.bias"]);
    assert_eq!(layout.units[unit("module.1")].parent, Some(0));
    assert_eq!(layout.units[unit("module.1.0")].parent, Some(unit("module.1")));
    assert_eq!(layout.units[unit("module.2")].parent, Some(0));

    assert_eq!(unit_names(&layout, &layout.forward_order), ["<root>", "module.1", "module.1.0", "module.2"]);
    assert_eq!(unit_names(&layout, &layout.post_forward_order), ["module.1.0", "module.1", "module.2", "<root>"]);

    // The static table has the same four units (no `Vec`, so templates are concrete).
    let table = NestedWrappedModule::TABLE;
    let templates: Vec<String> = table.units.iter().map(|u| u.display_name()).collect();
    assert_eq!(templates, ["<root>", "module.1", "module.1.0", "module.2"]);

    // Shapes: Linear(8,4), Linear(4,16), Linear(16,16), Linear(16,4), Linear(4,8).
    let shape = |fqn: &str| layout.params.iter().find(|p| p.fqn == fqn).unwrap().tensor.dims().to_vec();
    assert_eq!(shape("module.0.weight"), [4, 8]);
    assert_eq!(shape("module.1.0.weight"), [16, 4]);
    assert_eq!(shape("module.1.1.weight"), [16, 16]);
    assert_eq!(shape("module.2.weight"), [4, 16]);
    assert_eq!(shape("module.3.weight"), [8, 4]);
    assert_eq!(shape("module.3.bias"), [8]);

    let x = Tensor::rand(0f32, 1.0, (4, 8), &Device::Cpu).unwrap();
    assert_eq!(model.forward(&x).unwrap().dims(), [4, 8]);
}

#[test]
fn always_wrap_nested_wrapped_module_makes_every_linear_and_sequential_a_unit() {
    let varmap = VarMap::new();
    let model = AlwaysWrapNestedWrappedModule::new(var_builder(&varmap)).unwrap();
    let layout = Layout::of(&model).unwrap();
    layout.check_var_map(&varmap).unwrap();

    let fqns: Vec<&str> = layout.params.iter().map(|p| p.fqn.as_str()).collect();
    let mut expected = NESTED_FQNS.to_vec();
    expected.extend(["module.3.weight", "module.3.bias"]);
    assert_eq!(fqns, expected);

    let units: Vec<&str> = layout.units.iter().map(|u| u.display_name()).collect();
    assert_eq!(units, ["<root>", "module", "module.0", "module.1", "module.1.0", "module.1.1", "module.2", "module.3"]);
    let unit = |name: &str| layout.unit_named(name).unwrap();
    assert!(layout.unit_fqns(0).is_empty());
    assert!(layout.unit_fqns(unit("module")).is_empty());
    assert!(layout.unit_fqns(unit("module.1")).is_empty());
    assert_eq!(layout.unit_fqns(unit("module.0")), ["module.0.weight", "module.0.bias"]);
    assert_eq!(layout.unit_fqns(unit("module.1.0")), ["module.1.0.weight", "module.1.0.bias"]);
    assert_eq!(layout.unit_fqns(unit("module.1.1")), ["module.1.1.weight", "module.1.1.bias"]);
    assert_eq!(layout.unit_fqns(unit("module.2")), ["module.2.weight", "module.2.bias"]);
    assert_eq!(layout.unit_fqns(unit("module.3")), ["module.3.weight", "module.3.bias"]);
    assert_eq!(layout.units[unit("module.1.1")].parent, Some(unit("module.1")));
    assert_eq!(layout.units[unit("module.1")].parent, Some(unit("module")));
    assert_eq!(layout.units[unit("module")].parent, Some(0));

    assert_eq!(
        unit_names(&layout, &layout.forward_order),
        ["<root>", "module", "module.0", "module.1", "module.1.0", "module.1.1", "module.2", "module.3"]
    );
    assert_eq!(
        unit_names(&layout, &layout.post_forward_order),
        ["module.0", "module.1.0", "module.1.1", "module.1", "module.2", "module.3", "module", "<root>"]
    );

    let x = Tensor::rand(0f32, 1.0, (4, 8), &Device::Cpu).unwrap();
    assert_eq!(model.forward(&x).unwrap().dims(), [4, 8]);
}

#[test]
fn transformer_with_shared_params_ties_output_proj_to_the_embedding() {
    let varmap = VarMap::new();
    let model = TransformerWithSharedParams::new(true, var_builder(&varmap)).unwrap();
    let layout = Layout::of(&model).unwrap();
    layout.check_var_map(&varmap).unwrap();

    // The tie: `output_proj.weight` is the tensor first listed as `embed_tokens.weight`.
    let embed = layout.params.iter().position(|p| p.fqn == "embed_tokens.weight").unwrap();
    assert_eq!(layout.ties, [Tie { param: embed, fqn: "output_proj.weight".to_string() }]);
    assert_eq!(layout.params[embed].unit, 0, "the embedding is in the root unit");
    assert!(layout.params.iter().all(|p| p.fqn != "output_proj.weight"), "a tie is listed once");

    let units: Vec<&str> = layout.units.iter().map(|u| u.display_name()).collect();
    assert_eq!(
        units,
        [
            "<root>",
            "transformer.encoder.layers.0",
            "transformer.encoder.layers.1",
            "transformer.decoder.layers.0",
            "transformer.decoder.layers.1",
        ]
    );
    // As in PyTorch's test: the root holds embed (tied to output_proj), the encoder/decoder norms and bn.
    assert_eq!(
        layout.unit_fqns(0),
        [
            "embed_tokens.weight",
            "transformer.encoder.norm.weight",
            "transformer.encoder.norm.bias",
            "transformer.decoder.norm.weight",
            "transformer.decoder.norm.bias",
            "output_proj.bias",
            "vocab_bias",
            "long_buffer",
            "bn.weight",
            "bn.bias",
            "bn.running_mean",
            "bn.running_var",
        ]
    );
    let role = |fqn: &str| layout.params.iter().find(|p| p.fqn == fqn).unwrap().role;
    assert_eq!(role("vocab_bias"), Role::Buffer);
    assert_eq!(role("long_buffer"), Role::Buffer);
    assert_eq!(role("bn.running_mean"), Role::Buffer);
    assert_eq!(role("bn.running_var"), Role::Buffer);
    assert_eq!(role("bn.weight"), Role::Parameter);
    assert_eq!(role("output_proj.bias"), Role::Parameter);

    let shape = |fqn: &str| layout.params.iter().find(|p| p.fqn == fqn).unwrap().tensor.dims().to_vec();
    assert_eq!(shape("embed_tokens.weight"), [23, 16]);
    assert_eq!(shape("output_proj.bias"), [23]);
    assert_eq!(shape("transformer.encoder.layers.0.self_attn.in_proj_weight"), [48, 16]);
    assert_eq!(shape("transformer.encoder.layers.1.linear1.weight"), [8, 16]);
    assert_eq!(shape("transformer.decoder.layers.1.linear2.weight"), [16, 8]);
    assert_eq!(shape("bn.running_mean"), [2]);

    let (src, tgt) = TransformerWithSharedParams::get_input(&Device::Cpu).unwrap();
    assert_eq!(src.to_vec2::<u32>().unwrap(), [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]);
    assert_eq!(tgt.to_vec2::<u32>().unwrap(), [[0, 1], [2, 3], [4, 5], [6, 7]]);
    let out = model.forward(&src, &tgt).unwrap();
    assert_eq!(out.dims(), [4, 2, 23]);
    let loss = TransformerWithSharedParams::get_loss(&tgt, &out).unwrap();
    assert!(loss.to_scalar::<f32>().unwrap().is_finite());
}

#[test]
fn transformer_with_shared_params_static_table() {
    let table = TransformerWithSharedParams::TABLE;
    let units: Vec<String> = table.units.iter().map(|u| u.display_name()).collect();
    assert_eq!(units, ["<root>", "transformer.encoder.layers.{index}", "transformer.decoder.layers.{index}"]);
    let root: Vec<String> = table.unit_params(0).map(|p| p.fqn.to_string()).collect();
    assert_eq!(
        root,
        [
            "embed_tokens.weight",
            "transformer.encoder.norm.weight",
            "transformer.encoder.norm.bias",
            "transformer.decoder.norm.weight",
            "transformer.decoder.norm.bias",
            "output_proj.weight",
            "output_proj.bias",
            "vocab_bias",
            "long_buffer",
            "bn.weight",
            "bn.bias",
            "bn.running_mean",
            "bn.running_var",
        ]
    );
}

/// A root `Linear` sharing its weight with a `Linear` inside a unit.
#[derive(Shardable)]
struct CrossUnitTie {
    inner: Unit<Linear>,
    head: Linear,
}

#[test]
fn a_tie_across_units_is_refused_naming_both_fqns_and_units() {
    let varmap = VarMap::new();
    let vb = var_builder(&varmap);
    let weight = vb.pp("inner").get((4, 4), "weight").unwrap();
    let model = CrossUnitTie { inner: Unit::new(Linear::new(weight.clone(), None)), head: Linear::new(weight, None) };
    match Layout::of(&model) {
        Err(Error::Config(ConfigError::TieAcrossUnits { first_fqn, first_unit, second_fqn, second_unit })) => {
            assert_eq!(first_fqn, "inner.weight");
            assert_eq!(first_unit, "inner");
            assert_eq!(second_fqn, "head.weight");
            assert_eq!(second_unit, "<root>");
        }
        other => panic!("expected TieAcrossUnits, got {other:?}"),
    }
    let message = Layout::of(&model).unwrap_err().to_string();
    assert!(message.contains("inner.weight") && message.contains("head.weight"), "{message}");
}

#[test]
fn double_linear_and_mlp_units() {
    let varmap = VarMap::new();
    let model = DoubleLinear::new(24, true, var_builder(&varmap).pp("a")).unwrap();
    let layout = Layout::of(&model).unwrap();
    let units: Vec<&str> = layout.units.iter().map(|u| u.display_name()).collect();
    assert_eq!(units, ["<root>", "lin1"]);
    assert_eq!(layout.unit_fqns(0), ["lin2.weight", "lin2.bias"]);
    assert_eq!(layout.unit_fqns(1), ["lin1.weight", "lin1.bias"]);
    let x = Tensor::rand(0f32, 1.0, (2, 24), &Device::Cpu).unwrap();
    let (out1, out2) = model.forward(&x).unwrap();
    assert_eq!(out1.dims(), [2, 24]);
    assert_eq!(out2.unwrap().dims(), [2, 24]);

    let varmap = VarMap::new();
    let model = DoubleLinearEachUnit::new(24, false, var_builder(&varmap)).unwrap();
    let layout = Layout::of(&model).unwrap();
    layout.check_var_map(&varmap).unwrap();
    let units: Vec<&str> = layout.units.iter().map(|u| u.display_name()).collect();
    assert_eq!(units, ["<root>", "lin1", "lin2"]);
    assert!(layout.unit_fqns(0).is_empty());
    let (_, out2) = model.forward(&x).unwrap();
    assert!(out2.is_none(), "lin2 is unused");

    let varmap = VarMap::new();
    let model = Mlp::new(8, var_builder(&varmap)).unwrap();
    let layout = Layout::of(&model).unwrap();
    layout.check_var_map(&varmap).unwrap();
    let fqns: Vec<&str> = layout.params.iter().map(|p| p.fqn.as_str()).collect();
    assert_eq!(fqns, ["in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias"]);
    let shape = |fqn: &str| layout.params.iter().find(|p| p.fqn == fqn).unwrap().tensor.dims().to_vec();
    assert_eq!(shape("in_proj.weight"), [32, 8]);
    assert_eq!(shape("out_proj.weight"), [8, 32]);
    let x = Tensor::randn(0f32, 1.0, (2, 8), &Device::Cpu).unwrap();
    assert_eq!(model.forward(&x).unwrap().dims(), [2, 8]);
}
