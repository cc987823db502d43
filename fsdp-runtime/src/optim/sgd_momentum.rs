//! [`SgdMomentum`]: SGD with momentum, as PyTorch's `torch.optim.SGD(lr, momentum)` (no
//! dampening, no Nesterov, no weight decay). candle-nn's `SGD` has no momentum, and the
//! reference parity tests need it: Adam's scale invariance would hide gradient-scaling
//! errors.

use super::state::{check_slot, positions, OptimizerState, OptimizerStateDict, VarState};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::Optimizer;
use std::collections::BTreeMap;

/// PyTorch's name for the momentum state.
const MOMENTUM: &str = "momentum_buffer";

/// The hyper-parameters of [`SgdMomentum`].
#[derive(Clone, Copy, Debug)]
pub struct SgdMomentumConfig {
    /// The learning rate.
    pub lr: f64,
    /// The momentum factor: the velocity is `momentum * v + g`.
    pub momentum: f64,
}

/// SGD with momentum, as PyTorch's `torch.optim.SGD(lr, momentum)` without dampening,
/// Nesterov or weight decay; its momentum buffers are `momentum_buffer` in checkpoints.
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

impl OptimizerState for SgdMomentum {
    fn export_state(&self) -> Result<OptimizerStateDict> {
        let vars = self
            .vars
            .iter()
            .zip(&self.velocity)
            .map(|(var, velocity)| {
                let slots = velocity.iter().map(|v| (MOMENTUM.to_string(), v.clone())).collect();
                VarState { var: var.clone(), slots }
            })
            .collect();
        Ok(OptimizerStateDict { vars, scalars: BTreeMap::from([("lr".to_string(), self.config.lr)]) })
    }

    fn import_state(&mut self, state: OptimizerStateDict) -> Result<()> {
        let lr = state.scalar("lr")?;
        let at = positions(&self.vars, &state.vars)?;
        let mut velocity = self.velocity.clone();
        for (&i, var_state) in at.iter().zip(&state.vars) {
            velocity[i] = None;
            for (name, slot) in &var_state.slots {
                if name != MOMENTUM {
                    candle_core::bail!("SgdMomentum has no state `{name}` (only `{MOMENTUM}`)")
                }
                check_slot(&self.vars[i], name, slot)?;
                velocity[i] = Some(slot.copy()?);
            }
        }
        self.velocity = velocity;
        self.config.lr = lr;
        Ok(())
    }
}
