// An unknown key in the struct's `#[fsdp(...)]` attribute.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
#[fsdp(prefix = "model")]
struct Model {
    proj: Linear,
}

fn main() {}
