//! The runtime of candle-fsdp: fully sharded data parallel training (ZeRO-3) for candle.
//! Depend on `candle-fsdp`, which re-exports this crate with the derives.
//!
//! The crate root holds what a training program needs: wrap and configure ([`Fsdp`],
//! [`FsdpConfig`]), describe the model ([`Shardable`], [`Unit`], [`Activations`]), start
//! ranks ([`launch`], [`ProcessGroup`]), plan ([`Plan`]) and observe ([`TraceEvent`],
//! [`MemoryStats`]). The modules hold what is implemented or called less often: [`model`]
//! (the schema a hand-written `Shardable` speaks, the FQN tables, the layout of a built
//! model), [`dist`] (the collectives and their backends, the store and rendezvous, from
//! the `fsdp-comm` crate), [`layers`], [`optim`] and [`pipeline`].
//!
//! Inside, `model` knows no ranks, the communication crate knows no model, and `runtime`
//! (how one rank runs a wrapped model) uses both.

#![warn(missing_docs)]

mod backend;
pub mod checkpoint;
mod config;
pub mod dist;
mod error;
mod fqn_patterns;
mod launch;
pub mod model;
pub mod optim;
pub mod pipeline;
mod plan;
mod runtime;

pub use config::{BackwardPrefetch, FrozenPatterns, FsdpConfig, MixedPrecision, OrderCheck, ShardingStrategy};
pub use error::{CheckpointError, ConfigError, Error, MisuseError, Result};
pub use fsdp_comm::{Backend, ProcessGroup, RankContext};
pub use launch::{launch, launch_each, LaunchOptions};
pub use model::activations::Activations;
pub use model::schema::Shardable;
pub use model::table::ShardableModel;
pub use model::unit::Unit;
pub use plan::{Bytes, Plan, PlanConfig, RankMemory, UnitPlan};
pub use runtime::{
    ActivationProfile, Diagnostics, Fsdp, GradScalerConfig, MemoryStats, MetaModel, Pipelining, ScaledStep,
    ShardedGradScaler, SummonOptions, TraceEvent, UnitActivations, UnshardCause,
};

/// Layers candle-nn lacks in a form the runtime can shard.
pub mod layers {
    pub use crate::model::group_norm::{group_norm, GroupNorm};
}

/// Items the derives' generated code names: the only paths it uses, so the crate's
/// module tree can change freely. Not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::model::activations::Activations;
    pub use crate::model::schema::{
        holds_unit, FieldSchema, Node, Role, Shardable, StructSchema, TensorMap, VisitOrder, Visitor,
    };
    pub use crate::model::table::{param_count, unit_count, ShardableModel, StaticTable, Table};
    pub use candle_core::Tensor;
    pub type CandleResult<T> = candle_core::Result<T>;
}
