// The same attribute (`rename`) given twice on one field.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
struct Model {
    #[fsdp(rename = "q_proj", rename = "k_proj")]
    proj: Linear,
}

fn main() {}
