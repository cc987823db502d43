//! The parameter names of the seed's `nn.Transformer` (spec §1.3), written out literally:
//! the independent reference the FQN and prefetch tests compare against.

/// spec §1.3 `ENCODER_PARAM_FQNS` (12, flat-parameter order).
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

/// spec §1.3 `DECODER_PARAM_FQNS` (18, flat-parameter order).
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

/// The seed's `nn.Transformer` structure (6 encoder + 6 decoder layers, PyTorch's layer
/// norm eps) at a size small enough for CPU tests.
pub fn seed_transformer_config(
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
