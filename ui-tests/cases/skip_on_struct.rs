// `skip`, a field attribute, written on the struct.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
#[fsdp(skip)]
struct Model {
    proj: Linear,
}

fn main() {}
