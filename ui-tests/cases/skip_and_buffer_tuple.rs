// `skip` together with `buffer` on a tuple-struct field.
use candle_core::Tensor;
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
struct Model(Linear, #[fsdp(skip, buffer)] Tensor);

fn main() {}
