//! [`ShardedGradScaler`]: dynamic loss scaling for f16 training over shards (PyTorch's
//! `ShardedGradScaler`). f16 gradients underflow to zero below about 6e-8; the loss is
//! multiplied by a large scale before backward, and the shard gradients divided by it
//! after. When any rank finds a gradient that is not finite, every rank skips the step
//! (one collective agrees on it) and the scale is halved; after a run of good steps it
//! grows again.

use super::Fsdp;
use crate::error::ConfigError;
use crate::error::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use fsdp_comm::ReduceOp;

/// How a [`ShardedGradScaler`] moves its scale (PyTorch's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradScalerConfig {
    /// The scale the first step's loss is multiplied by.
    pub init_scale: f64,
    /// The scale is multiplied by this after `growth_interval` good steps in a row.
    pub growth_factor: f64,
    /// The scale is multiplied by this after a step with gradients that are not finite.
    pub backoff_factor: f64,
    /// How many good steps in a row make the scale grow by `growth_factor`.
    pub growth_interval: usize,
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        Self { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 }
    }
}

/// Where the scaler stands in the current step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScalerState {
    /// The step's gradients are still multiplied by the scale.
    Scaled,
    /// They were divided by it; `finite` is what the ranks agreed.
    Unscaled { finite: bool },
}

/// What [`ShardedGradScaler::step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaledStep {
    /// Whether the optimizer stepped (every rank's gradients were finite).
    pub stepped: bool,
    /// The scale the step's loss was multiplied by.
    pub scale: f64,
    /// The scale for the next step.
    pub next_scale: f64,
}

/// See the module docs. Per step: `backward(&scaler.scale_loss(&loss)?)`, optionally
/// [`ShardedGradScaler::unscale`] (before clipping the gradients), then
/// [`ShardedGradScaler::step`].
#[derive(Clone, Debug)]
pub struct ShardedGradScaler {
    config: GradScalerConfig,
    scale: f64,
    /// Good steps in a row since the scale last changed.
    good_steps: usize,
    state: ScalerState,
}

impl ShardedGradScaler {
    /// A scaler starting at `config.init_scale`. Fails with
    /// [`ConfigError::GradScalerArgument`] when the configuration cannot work (see there).
    pub fn new(config: GradScalerConfig) -> Result<Self> {
        let valid = config.init_scale > 0.0
            && config.init_scale.is_finite()
            && config.growth_factor > 1.0
            && config.backoff_factor > 0.0
            && config.backoff_factor < 1.0
            && config.growth_interval > 0;
        if !valid {
            return Err(Error::Config(ConfigError::GradScalerArgument { config: format!("{config:?}") }));
        }
        Ok(Self { config, scale: config.init_scale, good_steps: 0, state: ScalerState::Scaled })
    }

    /// The scale this step's loss is multiplied by.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// What a checkpoint keeps to resume the same scaling: the scale and the good steps
    /// since it last changed.
    pub fn state(&self) -> (f64, usize) {
        (self.scale, self.good_steps)
    }

    /// Continues from a saved [`ShardedGradScaler::state`].
    pub fn restore(&mut self, (scale, good_steps): (f64, usize)) -> Result<()> {
        if !(scale > 0.0 && scale.is_finite()) || good_steps >= self.config.growth_interval {
            return Err(Error::Config(ConfigError::GradScalerArgument {
                config: format!("a saved state of scale {scale} after {good_steps} good steps"),
            }));
        }
        self.scale = scale;
        self.good_steps = good_steps;
        self.state = ScalerState::Scaled;
        Ok(())
    }

    /// `loss` times the scale, to backpropagate instead of `loss`.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        Ok((loss * self.scale)?)
    }

    /// Divides the shard gradients in `grads` by the scale, in place, and returns whether
    /// every rank's are finite. A collective (one all-reduce of one element); a second
    /// call in the same step changes nothing and returns the same answer.
    pub fn unscale<M>(&mut self, fsdp: &Fsdp<M>, grads: &mut GradStore) -> Result<bool> {
        if let ScalerState::Unscaled { finite } = self.state {
            return Ok(finite);
        }
        let inverse = 1.0 / self.scale;
        // Σ|g| per shard, in f64: NaN or infinite exactly when an element is.
        let mut sums = Vec::new();
        for var in fsdp.parameters() {
            if let Some(grad) = grads.get(var.as_tensor()) {
                let unscaled = (grad * inverse)?;
                sums.push(unscaled.to_dtype(DType::F64)?.abs()?.sum_all()?);
                grads.insert(var.as_tensor(), unscaled);
            }
        }
        let local_finite = sums.is_empty() || Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?.is_finite();
        let comm = fsdp.comm();
        let flag = Tensor::new(&[if local_finite { 0f32 } else { 1.0 }], &comm.device())?;
        let label = "whether every rank's gradients are finite (ShardedGradScaler)";
        let found = comm.all_reduce(&flag, ReduceOp::Sum, label)?.wait()?.to_device(&Device::Cpu)?;
        let finite = found.to_vec1::<f32>()?[0] == 0.0;
        self.state = ScalerState::Unscaled { finite };
        Ok(finite)
    }

    /// Unscales the gradients (unless [`ShardedGradScaler::unscale`] did this step), steps
    /// `optimizer` with them when every rank's are finite, and updates the scale: every
    /// rank takes the same decision. A collective.
    pub fn step<M>(
        &mut self,
        fsdp: &Fsdp<M>,
        optimizer: &mut impl Optimizer,
        grads: &mut GradStore,
    ) -> Result<ScaledStep> {
        let finite = self.unscale(fsdp, grads)?;
        if finite {
            optimizer.step(grads)?;
        }
        let scale = self.scale;
        self.update(finite);
        Ok(ScaledStep { stepped: finite, scale, next_scale: self.scale })
    }

    fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps == self.config.growth_interval {
                self.scale *= self.config.growth_factor;
                self.good_steps = 0;
            }
        } else {
            self.scale *= self.config.backoff_factor;
            self.good_steps = 0;
        }
        self.state = ScalerState::Scaled;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_backs_off_at_once_and_grows_after_an_interval() {
        let config = GradScalerConfig { init_scale: 8.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 3 };
        let mut scaler = ShardedGradScaler::new(config).unwrap();
        let mut scales = Vec::new();
        for finite in [true, true, false, true, true, true, true] {
            scaler.update(finite);
            scales.push(scaler.scale());
        }
        // Two good steps, an overflow (halved, the count restarts), three good steps (doubled).
        assert_eq!(scales, [8.0, 8.0, 4.0, 4.0, 4.0, 8.0, 8.0]);
    }

    #[test]
    fn a_restored_state_continues_the_same_schedule() {
        let config = GradScalerConfig { init_scale: 8.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 3 };
        let mut first = ShardedGradScaler::new(config).unwrap();
        for finite in [true, false, true, true] {
            first.update(finite);
        }
        let mut resumed = ShardedGradScaler::new(config).unwrap();
        resumed.restore(first.state()).unwrap();
        for finite in [true, true, true, false, true] {
            first.update(finite);
            resumed.update(finite);
            assert_eq!(first.state(), resumed.state());
        }
        assert!(resumed.restore((f64::NAN, 0)).is_err() && resumed.restore((4.0, 3)).is_err());
    }

    #[test]
    fn a_config_that_cannot_work_is_refused() {
        for config in [
            GradScalerConfig { init_scale: 0.0, ..Default::default() },
            GradScalerConfig { growth_factor: 1.0, ..Default::default() },
            GradScalerConfig { backoff_factor: 1.5, ..Default::default() },
            GradScalerConfig { growth_interval: 0, ..Default::default() },
        ] {
            assert!(ShardedGradScaler::new(config).is_err(), "{config:?} was accepted");
        }
    }
}
