//! What a model is, for the runtime: its static schema (emitted by `#[derive(Shardable)]`),
//! the [`Unit`](crate::Unit) boundaries and the [`Activations`] that
//! flow between them, the FQN table flattened at compile time, and the [`Layout`] of one
//! built model. This module holds what a hand-written `Shardable` impl and a reader of the
//! tables use; the traits themselves are at the crate root.
//!
//! Nothing here knows ranks or communication: a unit reaches the executor only through
//! the hooks object installed in its [`UnitCell`] at wrap time.

pub(crate) mod activations;
mod frozen;
pub(crate) mod group_norm;
pub(crate) mod layers;
mod layout;
pub(crate) mod schema;
pub(crate) mod table;
pub(crate) mod unit;
pub(crate) mod unit_hooks;

pub(crate) use unit_hooks::Recompute;

pub use layout::{Layout, ParamInfo, Tie, UnitInfo};
pub use schema::{FieldSchema, Node, Role, StructSchema, TensorMap, VisitOrder, Visitor, INDEX};
pub use table::{FqnTemplate, ParamTemplate, StaticTable, UnitTemplate, MAX_DEPTH};
pub use unit_hooks::UnitCell;

pub(crate) use activations::Activations;
pub(crate) use schema::Shardable;
pub(crate) use table::ShardableModel;
pub(crate) use unit_hooks::UnitHooks;
