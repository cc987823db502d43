// `rename` with a character that cannot appear in an FQN segment.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
struct Model {
    #[fsdp(rename = "q-proj")]
    proj: Linear,
}

fn main() {}
