// A struct with a generic type parameter.
use candle_fsdp::Shardable;

#[derive(Shardable)]
struct Model<T> {
    proj: T,
}

fn main() {}
