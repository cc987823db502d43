// A struct with a lifetime parameter.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
struct Model<'a> {
    proj: &'a Linear,
}

fn main() {}
