//! Optimizers whose state a checkpoint can keep, and the one trait through which any
//! optimizer takes part in checkpoints.
//!
//! candle-nn's optimizers keep their state private, so a run resumed with them restarts
//! the moments and the step count. [`AdamW`] computes candle-nn's `AdamW` update to the
//! bit and exports its state; [`SgdMomentum`] is PyTorch's SGD with momentum; [`StepLr`]
//! is PyTorch's `StepLR`; [`WarmupCosine`] is linear warm-up and cosine decay. A user's optimizer implements [`OptimizerState`] to be saved
//! and resharded like these.

mod adamw;
mod sgd_momentum;
mod state;
mod step_lr;
mod warmup_cosine;

pub use adamw::AdamW;
pub use candle_nn::ParamsAdamW;
pub use sgd_momentum::{SgdMomentum, SgdMomentumConfig};
pub use state::{OptimizerState, OptimizerStateDict, VarState};
pub use step_lr::StepLr;
pub use warmup_cosine::WarmupCosine;
