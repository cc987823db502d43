// `Shardable` derived for a union.
use candle_fsdp::Shardable;

#[derive(Shardable)]
union Bits {
    int: u32,
    float: f32,
}

fn main() {}
