//! The parameter names of PyTorch's `nn.Transformer` in `test_fsdp_backward_prefetch.py`, written out literally:
//! the independent reference the FQN and prefetch tests compare against.

/// The test's `ENCODER_PARAM_FQNS` (12, flat-parameter order).
pub const ENCODER_PARAM_FQNS: [&str; 12] = [
    "encoder.layers.{index}.self_attn.in_proj_weight",
    "encoder.layers.{index}.self_attn.in_proj_bias",
    "encoder.layers.{index}.self_attn.out_proj.weight",
    "encoder.layers.{index}.self_attn.out_proj.bias",
    "encoder.layers.{index}.linear1.weight",
    "encoder.layers.{index}.linear1.bias",
    "encoder.layers.{index}.linear2.weight",
    "encoder.layers.{index}.linear2.bias",
    "encoder.layers.{index}.norm1.weight",
    "encoder.layers.{index}.norm1.bias",
    "encoder.layers.{index}.norm2.weight",
    "encoder.layers.{index}.norm2.bias",
];

/// The test's `DECODER_PARAM_FQNS` (18, flat-parameter order).
pub const DECODER_PARAM_FQNS: [&str; 18] = [
    "decoder.layers.{index}.self_attn.in_proj_weight",
    "decoder.layers.{index}.self_attn.in_proj_bias",
    "decoder.layers.{index}.self_attn.out_proj.weight",
    "decoder.layers.{index}.self_attn.out_proj.bias",
    "decoder.layers.{index}.multihead_attn.in_proj_weight",
    "decoder.layers.{index}.multihead_attn.in_proj_bias",
    "decoder.layers.{index}.multihead_attn.out_proj.weight",
    "decoder.layers.{index}.multihead_attn.out_proj.bias",
    "decoder.layers.{index}.linear1.weight",
    "decoder.layers.{index}.linear1.bias",
    "decoder.layers.{index}.linear2.weight",
    "decoder.layers.{index}.linear2.bias",
    "decoder.layers.{index}.norm1.weight",
    "decoder.layers.{index}.norm1.bias",
    "decoder.layers.{index}.norm2.weight",
    "decoder.layers.{index}.norm2.bias",
    "decoder.layers.{index}.norm3.weight",
    "decoder.layers.{index}.norm3.bias",
];

pub const ROOT_PARAM_FQNS: [&str; 4] =
    ["encoder.norm.weight", "encoder.norm.bias", "decoder.norm.weight", "decoder.norm.bias"];

/// The template list with `{index}` replaced by `i`.
pub fn layer_fqns(templates: &[&str], i: usize) -> Vec<String> {
    templates.iter().map(|t| t.replace("{index}", &i.to_string())).collect()
}

/// Encoder layers whose prefetch the PyTorch test's rule expects after the decoder ones.
pub const ENCODER_PREFETCH_NUM: usize = 5;

/// The test's check rule for backward-prefetch entry `k` of one iteration
/// with encoder begin index `b`: the FQNs of the layer prefetched there, or none.
pub fn expected_prefetch_entry(k: usize, b: usize) -> Option<Vec<String>> {
    if k < b {
        Some(layer_fqns(&DECODER_PARAM_FQNS, b - 1 - k))
    } else if k <= b + ENCODER_PREFETCH_NUM {
        Some(layer_fqns(&ENCODER_PARAM_FQNS, b + ENCODER_PREFETCH_NUM - k))
    } else {
        None
    }
}

/// The PyTorch test's `nn.Transformer` structure (6 encoder + 6 decoder layers, PyTorch's layer
/// norm eps) at a size small enough for CPU tests.
pub fn prefetch_test_transformer_config(
    d_model: usize,
    nhead: usize,
    dim_feedforward: usize,
) -> candle_fsdp::models::transformer::TransformerConfig {
    candle_fsdp::models::transformer::TransformerConfig {
        d_model,
        nhead,
        num_encoder_layers: 6,
        num_decoder_layers: 6,
        dim_feedforward,
        layer_norm_eps: 1e-5,
    }
}
