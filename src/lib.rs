//! candle-fsdp: fully sharded data parallel training for candle.
//!
//! Depend on this crate alone: it re-exports `#[derive(Shardable)]` and the runtime.

#![warn(missing_docs)]

// The derive names `::candle_fsdp`, also inside this crate.
extern crate self as candle_fsdp;

pub use fsdp_macros::{Activations, Shardable};
pub use fsdp_runtime::*;
pub mod data;
pub mod models;
