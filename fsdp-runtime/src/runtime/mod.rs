//! How one rank runs a wrapped model: [`Fsdp`] (wrap, forward, backward), the rank's
//! executor that sequences the units, the parameter group (one unit and its lifecycle),
//! the sharded parameter and its flat-buffer layout, the autograd ops and storage swaps,
//! and the trace and memory records. Uses `model` and `dist`; neither uses it.

mod activation_checkpoint;
mod activation_profile;
mod autograd;
mod clip_grad;
mod diagnostics;
mod flat_buffer;
mod fsdp;
mod grad_scaler;
mod memory;
mod meta_model;
mod param_group;
mod pipelining;
mod prefetch;
mod rank_agreement;
mod rank_state;
mod seeded_init;
mod shard_view;
mod sharded_param;
mod storage;
mod summon;
mod trace;

pub use activation_profile::{ActivationProfile, UnitActivations};
pub use diagnostics::Diagnostics;
pub use fsdp::Fsdp;
pub use grad_scaler::{GradScalerConfig, ScaledStep, ShardedGradScaler};
pub use memory::MemoryStats;
pub use meta_model::MetaModel;
pub use pipelining::Pipelining;
pub(crate) use prefetch::{backward_prefetch_target, forward_prefetch_target};
pub(crate) use shard_view::ParamView;
pub use summon::SummonOptions;
pub use trace::{TraceEvent, UnshardCause};

/// What a rank records as it runs: the trace of events and the gathered-memory count.
#[derive(Default)]
pub(crate) struct Recorders {
    pub trace: trace::Trace,
    pub memory: memory::MemoryTracker,
}
