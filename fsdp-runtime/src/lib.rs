//! The runtime of candle-fsdp: the static model description that `#[derive(Shardable)]`
//! emits, its expansion for a built model, the sharding plan, and the executor that trains
//! a model sharded over ranks.

pub mod activations;
pub mod collectives;
pub mod config;
pub mod error;
pub mod fsdp;
pub mod launch;
pub mod layers;
pub mod layout;
pub mod memory;
mod ops;
pub mod optim;
mod param;
pub mod pipeline;
pub mod plan;
pub mod process_group;
pub mod rendezvous;
pub mod schema;
mod sharded_unit;
mod state;
pub mod store;
pub mod table;
pub mod trace;
pub mod unit;

pub use activations::Activations;
pub use collectives::Collectives;
pub use config::{FsdpConfig, OrderCheck};
pub use error::{Error, Result};
pub use fsdp::Fsdp;
pub use launch::{launch, launch_each, LaunchOptions, RankContext};
pub use layout::{Layout, ParamInfo, Tie, UnitInfo};
pub use memory::MemoryStats;
pub use optim::{SgdMomentum, SgdMomentumConfig, StepLr};
pub use pipeline::{
    deferred_bias_add, deferred_matmul, deferred_matmul_t, stage_backward, stage_backward_input, stage_backward_weight,
    GradAccumulator, PassMode, StageContext, StageInput, StageLinear, WorkCounts,
};
pub use plan::{BackwardPrefetch, Plan, PlanConfig, ShardingStrategy};
pub use process_group::{Backend, ProcessGroup};
pub use rendezvous::{DistEnv, Rendezvous};
pub use schema::{Role, Shardable, VisitOrder};
pub use store::{Store, StoreServer};
pub use table::{ShardableModel, StaticTable};
pub use trace::{TraceEvent, UnshardCause};
pub use unit::Unit;

/// Items the derive's generated code names; not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub type CandleResult<T> = candle_core::Result<T>;
    pub use candle_core::Tensor;
}
