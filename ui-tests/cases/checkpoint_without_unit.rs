// `checkpoint` on a field that holds no `Unit`: there is nothing to checkpoint.
use candle_fsdp::{Shardable, Unit};
use candle_nn::Linear;

#[derive(Shardable)]
struct Model {
    #[fsdp(checkpoint)]
    proj: Linear,
    block: Unit<Linear>,
}

fn main() {}
