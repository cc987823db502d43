// `Activations` derived for a union.
use candle_fsdp::Activations;

#[derive(Activations)]
union Hidden {
    count: u32,
    scale: f32,
}

fn main() {}
