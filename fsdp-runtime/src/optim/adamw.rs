//! [`AdamW`]: candle-nn's `AdamW` update, operation for operation (so bit for bit on the
//! same inputs), with its moments and step count open to checkpoints. f32 and f64
//! variables are updated in place by the fused update (a pass per moment and one for the
//! parameter, no temporaries); others through candle's tensor ops, a chunk at a time.

use super::state::{check_slot, positions, OptimizerState, OptimizerStateDict, VarState};
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use fused_ops::{adamw_update, AdamWStep};
use std::collections::BTreeMap;

/// Elements updated at once: bounds the step's temporaries (about eight arrays of this
/// many elements) whatever a variable's size.
const CHUNK: usize = 1 << 20;

/// PyTorch's names for the first and second moments.
const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";

struct Moments {
    var: Var,
    first: Var,
    second: Var,
}

/// AdamW with decoupled weight decay, as candle-nn 0.11.1 computes it: one step count for
/// all variables (a variable without a gradient is skipped, but the count advances), bias
/// corrections `1 / (1 - beta^t)`, `theta * (1 - lr * weight_decay) - lr * m_hat /
/// (sqrt(v_hat) + eps)`. Non-float variables are ignored, as there.
pub struct AdamW {
    vars: Vec<Moments>,
    step_t: usize,
    params: ParamsAdamW,
}

impl AdamW {
    /// The hyper-parameters; the learning rate as last set.
    pub fn params(&self) -> &ParamsAdamW {
        &self.params
    }

    /// How many steps have been taken.
    pub fn step_count(&self) -> usize {
        self.step_t
    }
}

impl Optimizer for AdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let vars = vars
            .into_iter()
            .filter(|var| var.dtype().is_float())
            .map(|var| {
                let first = Var::zeros(var.shape(), var.dtype(), var.device())?;
                let second = Var::zeros(var.shape(), var.dtype(), var.device())?;
                Ok(Moments { var, first, second })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { vars, step_t: 0, params })
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let ParamsAdamW { lr, beta1, beta2, eps, weight_decay } = self.params;
        let scale_m = 1f64 / (1f64 - beta1.powi(self.step_t as i32));
        let scale_v = 1f64 / (1f64 - beta2.powi(self.step_t as i32));
        for Moments { var: theta, first: m, second: v } in &self.vars {
            let Some(g) = grads.get(theta) else {
                continue;
            };
            if matches!(theta.dtype(), DType::F32 | DType::F64) && theta.is_contiguous() {
                let step = AdamWStep { lr, beta1, beta2, eps, weight_decay, scale_m, scale_v };
                adamw_update(theta.as_tensor(), m.as_tensor(), v.as_tensor(), &g.contiguous()?, &step)?;
                continue;
            }
            // Elementwise, so a chunk at a time gives the same bits with temporaries of a
            // chunk's size, not of the variable's.
            let flat = |t: &Tensor| t.flatten_all();
            let (theta_all, m_all, v_all, g_all) =
                (flat(theta.as_tensor())?, flat(m.as_tensor())?, flat(v.as_tensor())?, flat(&g.contiguous()?)?);
            let numel = theta_all.elem_count();
            for start in (0..numel).step_by(CHUNK) {
                let len = CHUNK.min(numel - start);
                let chunk = |t: &Tensor| t.narrow(0, start, len);
                let (theta, m, v, g) = (chunk(&theta_all)?, chunk(&m_all)?, chunk(&v_all)?, chunk(&g_all)?);
                let next_m = ((&m * beta1)? + (&g * (1.0 - beta1))?)?;
                let next_v = ((&v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let m_hat = (&next_m * scale_m)?;
                let v_hat = (&next_v * scale_v)?;
                let next_theta = (&theta * (1f64 - lr * weight_decay))?;
                let adjusted_grad = (m_hat / (v_hat.sqrt()? + eps)?)?;
                let next_theta = (next_theta - (adjusted_grad * lr)?)?;
                m_all.slice_set(&next_m, 0, start)?;
                v_all.slice_set(&next_v, 0, start)?;
                theta_all.slice_set(&next_theta, 0, start)?;
            }
        }
        Ok(())
    }
}

impl OptimizerState for AdamW {
    fn export_state(&self) -> Result<OptimizerStateDict> {
        let vars = self
            .vars
            .iter()
            .map(|m| {
                let slots = BTreeMap::from([
                    (EXP_AVG.to_string(), m.first.as_tensor().clone()),
                    (EXP_AVG_SQ.to_string(), m.second.as_tensor().clone()),
                ]);
                VarState { var: m.var.clone(), slots }
            })
            .collect();
        let scalars = BTreeMap::from([("step".to_string(), self.step_t as f64), ("lr".to_string(), self.params.lr)]);
        Ok(OptimizerStateDict { vars, scalars })
    }

    fn import_state(&mut self, state: OptimizerStateDict) -> Result<()> {
        let (step, lr) = (state.scalar("step")?, state.scalar("lr")?);
        if step < 0.0 || step.fract() != 0.0 {
            candle_core::bail!("AdamW: the step count {step} is not a whole number")
        }
        let ours: Vec<Var> = self.vars.iter().map(|m| m.var.clone()).collect();
        let at = positions(&ours, &state.vars)?;
        // Everything is checked before anything changes.
        for (&i, var_state) in at.iter().zip(&state.vars) {
            if var_state.slots.len() != 2 {
                candle_core::bail!("AdamW: a variable's state must be `{EXP_AVG}` and `{EXP_AVG_SQ}`")
            }
            for name in [EXP_AVG, EXP_AVG_SQ] {
                let slot =
                    var_state.slots.get(name).ok_or_else(|| candle_core::Error::Msg(format!("AdamW: no `{name}`")))?;
                check_slot(&self.vars[i].var, name, slot)?;
            }
        }
        for (&i, var_state) in at.iter().zip(&state.vars) {
            self.vars[i].first.set(&var_state.slots[EXP_AVG])?;
            self.vars[i].second.set(&var_state.slots[EXP_AVG_SQ])?;
        }
        self.step_t = step as usize;
        self.params.lr = lr;
        Ok(())
    }
}
