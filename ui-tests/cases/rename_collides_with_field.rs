// A field renamed to another field's plain name.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
struct Model {
    head: Linear,
    #[fsdp(rename = "head")]
    lm_head: Linear,
}

fn main() {}
