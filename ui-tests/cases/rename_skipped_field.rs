// `rename` on a skipped field.
use candle_fsdp::Shardable;
use candle_nn::Linear;

struct Config;

#[derive(Shardable)]
struct Model {
    proj: Linear,
    #[fsdp(skip, rename = "cfg")]
    config: Config,
}

fn main() {}
