// A tuple-struct field renamed to the position of a later field.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
struct Model(#[fsdp(rename = "1")] Linear, Linear);

fn main() {}
