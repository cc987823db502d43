//! [`WarmupCosine`]: linear warm-up to a peak learning rate, then a cosine decay to a
//! floor, the schedule of most language-model recipes. It is plain data (serde) and a
//! function of the step alone, so a resumed run follows the uninterrupted run's rates.

use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};

/// Hugging Face's `get_cosine_with_min_lr_schedule_with_warmup` (one half cosine), held
/// at the floor after the last step: the rate of optimizer step `s` (counted from 0) is
/// `peak_lr · s / warmup_steps` during the warm-up, then
/// `min_lr + (peak_lr - min_lr) · (1 + cos(π · p)) / 2` with
/// `p = (s - warmup_steps) / (total_steps - warmup_steps)`. Hugging Face lets `p` pass 1
/// (the rate rises again after `total_steps`); here it stops at 1, so the rate stays at
/// `min_lr`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WarmupCosine {
    /// The rate at the end of the warm-up.
    pub peak_lr: f64,
    /// Optimizer steps of linear warm-up from 0 to `peak_lr`.
    pub warmup_steps: usize,
    /// The step at which the decay reaches `min_lr` (warm-up included).
    pub total_steps: usize,
    /// The floor the rate decays to and stays at.
    pub min_lr: f64,
}

impl WarmupCosine {
    /// The rate of optimizer step `step` (counted from 0).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * step as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr + (self.peak_lr - self.min_lr) * cosine
    }

    /// Sets `optimizer`'s rate for step `step`; call it before that step.
    pub fn apply(&self, step: usize, optimizer: &mut impl Optimizer) {
        optimizer.set_learning_rate(self.lr_at(step));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed: peak 1e-3, 4 warm-up steps, 12 in all, floor 1e-4.
    #[test]
    fn warm_up_then_half_a_cosine_to_the_floor() {
        let schedule = WarmupCosine { peak_lr: 1e-3, warmup_steps: 4, total_steps: 12, min_lr: 1e-4 };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
        // Warm-up: 0, 1/4, 2/4, 3/4 of the peak.
        for (step, want) in [(0, 0.0), (1, 2.5e-4), (2, 5e-4), (3, 7.5e-4)] {
            assert!(close(schedule.lr_at(step), want), "step {step}: {}", schedule.lr_at(step));
        }
        // Decay over 8 steps: the peak, halfway between peak and floor at step 8, the floor
        // from step 12 on.
        assert!(close(schedule.lr_at(4), 1e-3));
        assert!(close(schedule.lr_at(8), 5.5e-4));
        // Step 6: p = 1/4, (1 + cos(π/4)) / 2 = 0.853553...
        assert!(close(schedule.lr_at(6), 1e-4 + 9e-4 * (0.5 + 0.5 * std::f64::consts::FRAC_1_SQRT_2)));
        assert!(close(schedule.lr_at(12), 1e-4) && close(schedule.lr_at(40), 1e-4));
    }
}
