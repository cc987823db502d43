// `forward_order` naming a field the struct does not have.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
#[fsdp(forward_order(embed, head, lm_head))]
struct Model {
    embed: Linear,
    head: Linear,
}

fn main() {}
