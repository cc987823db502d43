// `forward_order` naming the same field twice.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
#[fsdp(forward_order(embed, head, embed))]
struct Model {
    embed: Linear,
    head: Linear,
}

fn main() {}
