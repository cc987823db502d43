// A field whose type carries no tensors the runtime can find.
use candle_core::Tensor;
use candle_fsdp::Activations;

struct Note;

#[derive(Activations)]
struct Hidden {
    states: Tensor,
    note: Note,
}

fn main() {}
