// `Shardable` derived for an enum.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
enum Model {
    Small(Linear),
    Large(Linear),
}

fn main() {}
