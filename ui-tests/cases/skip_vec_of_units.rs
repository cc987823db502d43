// `skip` on a `Vec<Unit<T>>` field.
use candle_fsdp::{Shardable, Unit};
use candle_nn::Linear;

#[derive(Shardable)]
struct Model {
    #[fsdp(skip)]
    layers: Vec<Unit<Linear>>,
    head: Linear,
}

fn main() {}
