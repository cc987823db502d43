// `rename` with an empty segment between two dots.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
struct Model {
    #[fsdp(rename = "attn..q_proj")]
    proj: Linear,
}

fn main() {}
