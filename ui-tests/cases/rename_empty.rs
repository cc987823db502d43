// `rename` with an empty string.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
struct Model {
    #[fsdp(rename = "")]
    proj: Linear,
}

fn main() {}
