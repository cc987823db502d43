// `Activations` takes only `crate = "..."`.
use candle_core::Tensor;
use candle_fsdp::Activations;

#[derive(Activations)]
#[fsdp(rename = "hidden")]
struct Hidden {
    states: Tensor,
}

// The stand-in impl keeps this use from reporting a second error.
fn needs_activations<A: Activations>() {}

fn main() {
    needs_activations::<Hidden>();
}
