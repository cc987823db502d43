//! The Llama sizes the examples train, by name, so that a name means the same model in
//! every example (the bench's `small` is the GPU check's and the profile's `small`).

use candle_fsdp::models::llama::LlamaConfig;

/// A Llama of these sizes, with the norm epsilon, rotary base and initialisation the
/// examples share.
pub fn llama(
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    (num_attention_heads, num_key_value_heads): (usize, usize),
    max_position_embeddings: usize,
) -> LlamaConfig {
    LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        max_position_embeddings,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        initializer_range: 0.02,
        ..LlamaConfig::default()
    }
}

/// The main job's Llama (`examples/train.rs`): 4 layers of hidden size 128.
pub fn main_job(vocab_size: usize, seq_len: usize) -> LlamaConfig {
    llama(vocab_size, 128, 344, 4, (4, 2), seq_len)
}

/// The bench's `small` model (0.86M parameters), for sequences of 64.
pub fn small() -> LlamaConfig {
    llama(512, 128, 344, 4, (4, 2), 64)
}

/// The bench's `medium` model (4.88M parameters), for sequences of 128.
pub fn medium() -> LlamaConfig {
    llama(1024, 256, 688, 6, (8, 4), 128)
}

/// A 1-layer model of hidden size 32, for checks that need a model, not its size.
pub fn tiny() -> LlamaConfig {
    llama(64, 32, 48, 1, (4, 2), 16)
}

/// The plan example's default: 8 layers of hidden size 512, a 32k vocabulary.
pub fn plan_default() -> LlamaConfig {
    llama(32_000, 512, 1376, 8, (8, 4), 2048)
}

/// Llama 2 7B's shapes (6.74B parameters), for plans only: it is built without values.
pub fn llama2_7b() -> LlamaConfig {
    llama(32_000, 4096, 11_008, 32, (32, 32), 4096)
}
