// One mistake in the derive, at a re-exported crate path: the model is still usable as a
// `ShardableModel`, so the attribute is the only error.
use candle_fsdp::Shardable;
use candle_nn::Linear;

mod runtime {
    pub use candle_fsdp::*;
}

#[derive(Shardable)]
#[fsdp(crate = "crate::runtime", unknown)]
struct Model {
    proj: Linear,
}

fn needs_model<M: runtime::ShardableModel>() {}

fn main() {
    needs_model::<Model>();
}
