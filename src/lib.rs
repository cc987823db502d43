//! candle-fsdp: fully sharded data parallel training for candle.
//!
//! A model with two FSDP units, trained for two steps on two ranks (threads of this process):
//!
//! ```rust
//! use candle_core::{DType, Device, Module, Result, Tensor};
//! use candle_fsdp::optim::{AdamW, ParamsAdamW};
//! use candle_fsdp::{launch, Fsdp, FsdpConfig, LaunchOptions, Shardable, Unit};
//! use candle_nn::{linear, Linear, Optimizer, VarBuilder, VarMap};
//!
//! #[derive(Shardable)]
//! struct Model {
//!     layers: Vec<Unit<Linear>>, // each element is one FSDP unit
//!     head: Linear,              // parameters in no `Unit` form the root unit
//! }
//!
//! impl Model {
//!     fn new(vb: VarBuilder) -> Result<Self> {
//!         let layers = (0..2).map(|i| linear(8, 8, vb.pp("layers").pp(i)).map(Unit::new)).collect::<Result<_>>()?;
//!         Ok(Self { layers, head: linear(8, 1, vb.pp("head"))? })
//!     }
//!
//!     fn forward(&self, x: &Tensor) -> Result<Tensor> {
//!         let x = self.layers.iter().try_fold(x.clone(), |x, layer| layer.forward(&x)?.relu())?;
//!         self.head.forward(&x)
//!     }
//! }
//!
//! fn main() -> candle_fsdp::Result<()> {
//!     let var_map = VarMap::new(); // one set of initial values, shared by the ranks
//!     let losses = launch(LaunchOptions::new(2), |ctx| {
//!         let model = Model::new(VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu))?;
//!         let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
//!         let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW::default())?; // this rank's shards
//!         let x = Tensor::ones((4, 8), DType::F32, &ctx.device)?;
//!         let mut losses = Vec::new();
//!         for _step in 0..2 {
//!             let loss = fsdp.forward(|m| m.forward(&x))?.sqr()?.mean_all()?;
//!             optimizer.step(&fsdp.backward(&loss)?)?; // shard gradients, averaged over the ranks
//!             losses.push(loss.to_scalar::<f32>()?);
//!         }
//!         Ok(losses)
//!     })?;
//!     assert_eq!(losses[0], losses[1]); // both ranks saw the same inputs and parameters
//!     Ok(())
//! }
//! ```
//!
//! Depend on this crate alone: it re-exports `#[derive(Shardable)]` and the runtime.

#![warn(missing_docs)]

// The derive names `::candle_fsdp`, also inside this crate.
extern crate self as candle_fsdp;

pub use fsdp_macros::{Activations, Shardable};
pub use fsdp_runtime::*;
/// Fused forward-and-backward training ops for any candle model (crate `fused-ops`).
pub use fused_ops as ops;
pub mod data;
pub mod models;

/// The README's example whole, `examples/quickstart.rs`, compiled and run as a doc test
/// (the README and docs/ show it in pieces; `tests/readme.rs` finds each of their lines in it).
#[cfg(doctest)]
#[doc = concat!("```rust\n", include_str!("../examples/quickstart.rs"), "\n```")]
pub struct ReadmeExample;
