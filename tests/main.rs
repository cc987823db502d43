//! The integration tests of `candle-fsdp` as one test binary (each binary links candle, so
//! one keeps the build short), one module per concern; `docs/architecture.md` lists them.

mod activation_checkpointing;
mod autograd;
mod backward_prefetch;
mod checkpoint;
mod clip_grad;
mod collectives;
mod faults;
mod fqn_fsdp_test_models;
mod fqn_llama;
mod fqn_transformer;
mod frozen_params;
mod fused_kernels;
mod hf_families;
mod hf_llama;
mod hybrid_shard;
mod lora;
mod main_job;
mod memory;
mod meta_init;
mod mixed_precision;
mod model_math;
mod optim;
mod parity;
mod readme;
mod refusals;
mod released_params;
mod stage_backward;
mod stage_backward_fsdp;
mod summon;
mod tcp_collectives;
mod text_data;
mod torchrun_store;
mod world_one;
