// `crate = "..."` naming a path that does not exist.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
#[fsdp(crate = "::candle_fsdp_wrong")]
struct Model {
    proj: Linear,
}

fn main() {}
