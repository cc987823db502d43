//! The FQN table, units and orders of the `nn.Transformer` port, against the values of
//! PyTorch's `test_fsdp_backward_prefetch.py`.
//!
//! PyTorch's test builds `nn.Transformer(d_model=1024, nhead=8)` with 6 + 6 layers and
//! dim_feedforward 2048; here d_model is 16 and dim_feedforward 32 for CPU speed. Names,
//! units and orders do not depend on those sizes.
//!
//! Every expected value is written out literally from the spec.

use candle_core::{DType, Device, Tensor};
use candle_fsdp::model::{Layout, Role};
use candle_fsdp::models::transformer::{Transformer, TransformerConfig};
use candle_fsdp::{FsdpConfig, Plan, PlanConfig, ShardableModel};
use candle_nn::{VarBuilder, VarMap};

use common::prefetch_test_fqns::{layer_fqns, DECODER_PARAM_FQNS, ENCODER_PARAM_FQNS, ROOT_PARAM_FQNS};
use fsdp_testkit as common;

const D_MODEL: usize = 16;
const DIM_FEEDFORWARD: usize = 32;

fn config() -> TransformerConfig {
    common::prefetch_test_fqns::prefetch_test_transformer_config(D_MODEL, 8, DIM_FEEDFORWARD)
}

fn build() -> (Transformer, VarMap) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Transformer::new(&config(), vb).expect("build the transformer");
    (model, varmap)
}

#[test]
fn static_table_lists_pytorch_flat_param_order() {
    let table = Transformer::TABLE;
    let actual: Vec<String> = table.params.iter().map(|p| p.fqn.to_string()).collect();
    let mut expected: Vec<&str> = Vec::new();
    expected.extend(ENCODER_PARAM_FQNS);
    expected.extend(["encoder.norm.weight", "encoder.norm.bias"]);
    expected.extend(DECODER_PARAM_FQNS);
    expected.extend(["decoder.norm.weight", "decoder.norm.bias"]);
    assert_eq!(actual, expected);
    assert!(table.params.iter().all(|p| p.role == Role::Parameter));
}

#[test]
fn static_table_has_root_and_two_layer_unit_templates() {
    let table = Transformer::TABLE;
    let units: Vec<String> = table.units.iter().map(|u| u.display_name()).collect();
    assert_eq!(units, ["<root>", "encoder.layers.{index}", "decoder.layers.{index}"]);
    assert_eq!(table.units[0].parent, None);
    assert_eq!(table.units[1].parent, Some(0));
    assert_eq!(table.units[2].parent, Some(0));

    let fqns_of = |unit: usize| -> Vec<String> { table.unit_params(unit).map(|p| p.fqn.to_string()).collect() };
    assert_eq!(fqns_of(0), ROOT_PARAM_FQNS);
    assert_eq!(fqns_of(1), ENCODER_PARAM_FQNS);
    assert_eq!(fqns_of(2), DECODER_PARAM_FQNS);

    // Templates: root first / last, encoder before decoder.
    assert_eq!(table.forward_order, [0, 1, 2]);
    assert_eq!(table.post_forward_order, [1, 2, 0]);
    assert_eq!(table.backward_order, [0, 2, 1]);
}

#[test]
fn layout_has_thirteen_units_with_the_spec_fqns() {
    let (model, varmap) = build();
    let layout = Layout::of(&model).expect("layout");
    layout.check_var_map(&varmap).expect("the VarMap's keys are the model's FQNs");

    assert_eq!(layout.units.len(), 13);
    assert_eq!(layout.params.len(), 6 * 12 + 6 * 18 + 4);
    assert!(layout.ties.is_empty());

    let names: Vec<&str> = layout.units.iter().map(|u| u.display_name()).collect();
    assert_eq!(
        names,
        [
            "<root>",
            "encoder.layers.0",
            "encoder.layers.1",
            "encoder.layers.2",
            "encoder.layers.3",
            "encoder.layers.4",
            "encoder.layers.5",
            "decoder.layers.0",
            "decoder.layers.1",
            "decoder.layers.2",
            "decoder.layers.3",
            "decoder.layers.4",
            "decoder.layers.5",
        ]
    );

    assert_eq!(layout.unit_fqns(0), ROOT_PARAM_FQNS);
    for i in 0..6 {
        let enc = layout.unit_named(&format!("encoder.layers.{i}")).expect("encoder unit");
        assert_eq!(layout.unit_fqns(enc), layer_fqns(&ENCODER_PARAM_FQNS, i), "encoder layer {i}");
        assert_eq!(layout.units[enc].parent, Some(0));
        let dec = layout.unit_named(&format!("decoder.layers.{i}")).expect("decoder unit");
        assert_eq!(layout.unit_fqns(dec), layer_fqns(&DECODER_PARAM_FQNS, i), "decoder layer {i}");
        assert_eq!(layout.units[dec].parent, Some(0));
    }
}

#[test]
fn parameter_shapes_are_pytorch_shapes() {
    let (model, _) = build();
    let layout = Layout::of(&model).expect("layout");
    let shape = |fqn: &str| -> Vec<usize> {
        layout.params.iter().find(|p| p.fqn == fqn).unwrap_or_else(|| panic!("{fqn}")).tensor.dims().to_vec()
    };
    // The test's model with d_model 16 and dim_feedforward 32.
    assert_eq!(shape("encoder.layers.0.self_attn.in_proj_weight"), [48, 16]);
    assert_eq!(shape("encoder.layers.0.self_attn.in_proj_bias"), [48]);
    assert_eq!(shape("encoder.layers.0.self_attn.out_proj.weight"), [16, 16]);
    assert_eq!(shape("encoder.layers.0.self_attn.out_proj.bias"), [16]);
    assert_eq!(shape("encoder.layers.3.linear1.weight"), [32, 16]);
    assert_eq!(shape("encoder.layers.3.linear1.bias"), [32]);
    assert_eq!(shape("encoder.layers.3.linear2.weight"), [16, 32]);
    assert_eq!(shape("encoder.layers.3.linear2.bias"), [16]);
    assert_eq!(shape("decoder.layers.5.multihead_attn.in_proj_weight"), [48, 16]);
    assert_eq!(shape("decoder.layers.5.norm3.weight"), [16]);
    assert_eq!(shape("encoder.norm.bias"), [16]);
    assert_eq!(shape("decoder.norm.weight"), [16]);
}

#[test]
fn forward_and_post_forward_orders() {
    let (model, _) = build();
    let layout = Layout::of(&model).expect("layout");
    let names = |order: &[usize]| -> Vec<String> {
        order.iter().map(|&u| layout.units[u].display_name().to_string()).collect()
    };
    assert_eq!(
        names(&layout.forward_order),
        [
            "<root>",
            "encoder.layers.0",
            "encoder.layers.1",
            "encoder.layers.2",
            "encoder.layers.3",
            "encoder.layers.4",
            "encoder.layers.5",
            "decoder.layers.0",
            "decoder.layers.1",
            "decoder.layers.2",
            "decoder.layers.3",
            "decoder.layers.4",
            "decoder.layers.5",
        ]
    );
    assert_eq!(
        names(&layout.post_forward_order),
        [
            "encoder.layers.0",
            "encoder.layers.1",
            "encoder.layers.2",
            "encoder.layers.3",
            "encoder.layers.4",
            "encoder.layers.5",
            "decoder.layers.0",
            "decoder.layers.1",
            "decoder.layers.2",
            "decoder.layers.3",
            "decoder.layers.4",
            "decoder.layers.5",
            "<root>",
        ]
    );
}

/// `test_fsdp_backward_prefetch.py`, BACKWARD_PRE: the pre-backward hooks run root, dec5..dec0, enc5..enc0,
/// and each prefetches the unit that ended its forward just before it.
#[test]
fn backward_pre_prefetch_targets_match_the_spec() {
    let (model, _) = build();
    let layout = Layout::of(&model).expect("layout");
    let unit = |name: &str| layout.unit_named(name).unwrap_or_else(|| panic!("unit {name}"));

    let pre_backward = [
        "<root>",
        "decoder.layers.5",
        "decoder.layers.4",
        "decoder.layers.3",
        "decoder.layers.2",
        "decoder.layers.1",
        "decoder.layers.0",
        "encoder.layers.5",
        "encoder.layers.4",
        "encoder.layers.3",
        "encoder.layers.2",
        "encoder.layers.1",
        "encoder.layers.0",
    ];
    let expected_targets = [
        Some("decoder.layers.5"),
        Some("decoder.layers.4"),
        Some("decoder.layers.3"),
        Some("decoder.layers.2"),
        Some("decoder.layers.1"),
        Some("decoder.layers.0"),
        Some("encoder.layers.5"),
        Some("encoder.layers.4"),
        Some("encoder.layers.3"),
        Some("encoder.layers.2"),
        Some("encoder.layers.1"),
        Some("encoder.layers.0"),
        None,
    ];
    let backward: Vec<&str> = layout.backward_order().map(|u| layout.units[u].display_name()).collect();
    assert_eq!(backward, pre_backward);

    // The targets as the executor and the plan choose them.
    let plan = Plan::new(&layout, PlanConfig::new(2, FsdpConfig::default())).expect("plan");
    let planned: Vec<&str> = plan.backward_prefetch.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(planned, pre_backward);
    let targets: Vec<Option<&str>> = plan.backward_prefetch.iter().map(|(_, t)| t.as_deref()).collect();
    assert_eq!(targets, expected_targets);

    // The PyTorch test's check rule with ENCODER_BEGIN_INDEX_FOR_PRE = 6: entry k is the decoder
    // FQNs of layer 5 - k for k < 6, the encoder FQNs of layer 11 - k for 6 <= k <= 11,
    // and None after.
    for (k, target) in targets.iter().enumerate() {
        let recorded: Option<Vec<&str>> = target.map(|t| layout.unit_fqns(unit(t)));
        let expected: Option<Vec<String>> = match k {
            0..=5 => Some(layer_fqns(&DECODER_PARAM_FQNS, 5 - k)),
            6..=11 => Some(layer_fqns(&ENCODER_PARAM_FQNS, 11 - k)),
            _ => None,
        };
        assert_eq!(recorded.map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>()), expected, "entry {k}");
    }
}

#[test]
fn forward_pass_gives_tgt_shaped_output() {
    let (model, _) = build();
    let device = Device::Cpu;
    // The PyTorch test's input shapes (sequence x batch x d_model) with d_model 16.
    let src = Tensor::randn(0f32, 1.0, (10, 1, D_MODEL), &device).unwrap();
    let tgt = Tensor::randn(0f32, 1.0, (20, 1, D_MODEL), &device).unwrap();
    let out = model.forward(&src, &tgt).expect("forward");
    assert_eq!(out.dims(), [20, 1, D_MODEL]);
    let values: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    assert!(values.iter().all(|v| v.is_finite()));

    // A batch mismatch is refused with a message, not a shape error deep inside.
    let bad_tgt = Tensor::zeros((20, 2, D_MODEL), DType::F32, &device).unwrap();
    let err = model.forward(&src, &bad_tgt).unwrap_err().to_string();
    assert!(err.contains("batch"), "{err}");
}
