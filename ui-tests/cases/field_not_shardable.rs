// A field whose type does not implement `Shardable` and is not marked `skip`.
use candle_fsdp::Shardable;
use candle_nn::Linear;

struct Config;

#[derive(Shardable)]
struct Model {
    proj: Linear,
    config: Config,
}

fn main() {}
