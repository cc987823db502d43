//! What candle-nn's optimizers lack and the ported PyTorch tests use:
//!
//! - [`SgdMomentum`]: SGD with momentum, as PyTorch's `torch.optim.SGD(lr, momentum)` (no
//!   dampening, no Nesterov, no weight decay). candle-nn's `SGD` has no momentum, and the
//!   reference parity tests need it: Adam's scale invariance would hide gradient-scaling
//!   errors.
//! - [`StepLr`]: PyTorch's `torch.optim.lr_scheduler.StepLR`, for any candle-nn optimizer.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::Optimizer;

#[derive(Clone, Copy, Debug)]
pub struct SgdMomentumConfig {
    pub lr: f64,
    pub momentum: f64,
}

pub struct SgdMomentum {
    vars: Vec<Var>,
    /// The momentum buffer of each variable; `None` until its first gradient.
    velocity: Vec<Option<Tensor>>,
    config: SgdMomentumConfig,
}

impl Optimizer for SgdMomentum {
    type Config = SgdMomentumConfig;

    fn new(vars: Vec<Var>, config: SgdMomentumConfig) -> Result<Self> {
        let velocity = vec![None; vars.len()];
        Ok(Self { vars, velocity, config })
    }

    /// `v = momentum * v + g` (`v = g` the first time), then `p -= lr * v`. Variables
    /// without a gradient are left alone, momentum included.
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (var, velocity) in self.vars.iter().zip(self.velocity.iter_mut()) {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let next = match velocity.take() {
                None => grad.clone(),
                Some(v) => ((v * self.config.momentum)? + grad)?,
            };
            var.set(&(var.as_tensor() - (&next * self.config.lr)?)?)?;
            *velocity = Some(next);
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }
}

/// PyTorch's `torch.optim.lr_scheduler.StepLR(optimizer, step_size, gamma)`: every
/// `step_size`-th call of [`StepLr::step`] multiplies the optimizer's learning rate by
/// `gamma` (PyTorch's default `gamma` is 0.1). Like PyTorch, call it once per epoch (or
/// step) after the optimizer's own step; the rate is multiplied in place, as PyTorch's
/// chainable form does, so the sequence of rates is PyTorch's to the last bit.
#[derive(Clone, Copy, Debug)]
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
