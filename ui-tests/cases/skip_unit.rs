// `skip` on a `Unit<T>` field.
use candle_fsdp::{Shardable, Unit};
use candle_nn::Linear;

#[derive(Shardable)]
struct Model {
    #[fsdp(skip)]
    block: Unit<Linear>,
    head: Linear,
}

fn main() {}
