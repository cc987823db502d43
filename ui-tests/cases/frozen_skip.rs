// `frozen` on a skipped field: it holds no parameters.
use candle_core::Tensor;
use candle_fsdp::Shardable;

#[derive(Shardable)]
struct Model {
    weight: Tensor,
    #[fsdp(skip, frozen)]
    cache: Tensor,
}

fn main() {}
