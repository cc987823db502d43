// Two fields renamed to the same FQN.
use candle_fsdp::Shardable;
use candle_nn::Linear;

#[derive(Shardable)]
struct Model {
    #[fsdp(rename = "attn.proj")]
    q_proj: Linear,
    #[fsdp(rename = "attn.proj")]
    k_proj: Linear,
}

fn main() {}
