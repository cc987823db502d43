// `buffer` on a primitive field, which holds no tensors.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
struct Model {
    proj: Linear,
    #[fsdp(buffer)]
    eps: f64,
}

fn main() {}
