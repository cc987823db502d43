//! [`StepLr`]: PyTorch's `torch.optim.lr_scheduler.StepLR`, for any candle-nn optimizer.
//! It is plain data (serde), so a checkpoint keeps it as it is.

use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};

/// PyTorch's `torch.optim.lr_scheduler.StepLR(optimizer, step_size, gamma)`: every
/// `step_size`-th call of [`StepLr::step`] multiplies the optimizer's learning rate by
/// `gamma` (PyTorch's default `gamma` is 0.1). Like PyTorch, call it once per epoch (or
/// step) after the optimizer's own step; the rate is multiplied in place, as PyTorch's
/// chainable form does, so the sequence of rates is PyTorch's to the last bit.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLr {
    step_size: usize,
    gamma: f64,
    last_epoch: usize,
}

impl StepLr {
    /// # Panics
    /// If `step_size` is 0 (PyTorch divides by it too).
    pub fn new(step_size: usize, gamma: f64) -> Self {
        assert!(step_size > 0, "StepLr: step_size must be positive");
        Self { step_size, gamma, last_epoch: 0 }
    }

    /// Ends an epoch: decays `optimizer`'s learning rate when `step_size` epochs have passed
    /// since the last decay.
    pub fn step(&mut self, optimizer: &mut impl Optimizer) {
        self.last_epoch += 1;
        if self.last_epoch.is_multiple_of(self.step_size) {
            optimizer.set_learning_rate(optimizer.learning_rate() * self.gamma);
        }
    }

    /// How many times [`StepLr::step`] has been called (PyTorch's `last_epoch`).
    pub fn last_epoch(&self) -> usize {
        self.last_epoch
    }
}
