// `forward_order` naming a skipped field.
use candle_fsdp::Shardable;
use candle_nn::Linear;

struct Config;

#[derive(Shardable)]
#[fsdp(forward_order(proj, config))]
struct Model {
    proj: Linear,
    #[fsdp(skip)]
    config: Config,
}

fn main() {}
