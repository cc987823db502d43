// A tuple-struct field whose type does not implement `Shardable`.
use candle_fsdp::Shardable;
use candle_nn::Linear;

struct Config;

#[derive(Shardable)]
struct Model(Linear, Config);

fn main() {}
