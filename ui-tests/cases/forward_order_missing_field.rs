// `forward_order` leaving out a field that holds tensors.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
#[fsdp(forward_order(embed, head))]
struct Model {
    embed: Linear,
    norm: Linear,
    head: Linear,
}

fn main() {}
