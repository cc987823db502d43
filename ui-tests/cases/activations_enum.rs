// `Activations` derived for an enum.
use candle_core::Tensor;
use candle_fsdp::Activations;

#[derive(Activations)]
enum Hidden {
    One(Tensor),
    Two(Tensor, Tensor),
}

fn main() {}
