// `skip` together with `buffer` on one field.
use candle_core::Tensor;
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
struct Model {
    proj: Linear,
    #[fsdp(skip, buffer)]
    mask: Tensor,
}

fn main() {}
