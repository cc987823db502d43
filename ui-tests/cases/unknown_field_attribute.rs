// An unknown key in a field's `#[fsdp(...)]` attribute.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
struct Model {
    #[fsdp(trainable)]
    proj: Linear,
}

fn main() {}
