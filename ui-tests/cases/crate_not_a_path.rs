// `crate = "..."` whose value is not a path.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
#[fsdp(crate = "not a path")]
struct Model {
    proj: Linear,
}

fn main() {}
