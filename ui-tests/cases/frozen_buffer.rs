// `frozen` on a buffer: a buffer is never trained.
use candle_core::Tensor;
use candle_fsdp::Shardable;

#[derive(Shardable)]
struct Model {
    #[fsdp(buffer, frozen)]
    scale: Tensor,
}

fn main() {}
