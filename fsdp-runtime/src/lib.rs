//! The runtime of candle-fsdp: the static model description that `#[derive(Shardable)]`
//! emits, its expansion for a built model, and the sharding plan.

pub mod error;
pub mod layers;
pub mod layout;
pub mod plan;
pub mod schema;
pub mod table;
pub mod unit;

pub use error::{Error, Result};
pub use layout::{Layout, ParamInfo, Tie, UnitInfo};
pub use plan::{Plan, ShardingStrategy};
pub use schema::{Role, Shardable, VisitOrder};
pub use table::{ShardableModel, StaticTable};
pub use unit::Unit;

/// Items the derive's generated code names; not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub type CandleResult<T> = candle_core::Result<T>;
}
