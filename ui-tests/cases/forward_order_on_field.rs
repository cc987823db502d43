// `forward_order`, a container attribute, written on a field.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
struct Model {
    #[fsdp(forward_order(embed, head))]
    embed: Linear,
    head: Linear,
}

fn main() {}
