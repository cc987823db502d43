//! [`OptimizerState`]: the state of an optimizer as named tensors per variable and named
//! scalars, which a sharded checkpoint stores beside each parameter's shard and reshards
//! with it.

use candle_core::{Result, Tensor, Var};
use std::collections::BTreeMap;

/// One variable's optimizer state: tensors of the variable's shape, by name (PyTorch's
/// names where there is one: `exp_avg`, `exp_avg_sq`, `momentum_buffer`).
#[derive(Clone, Debug)]
pub struct VarState {
    /// The variable the optimizer steps.
    pub var: Var,
    /// Empty while the optimizer holds no state for the variable yet (SGD's momentum
    /// before its first gradient).
    pub slots: BTreeMap<String, Tensor>,
}

/// The whole state of an optimizer.
#[derive(Clone, Debug, Default)]
pub struct OptimizerStateDict {
    /// Every variable the optimizer steps, with its state.
    pub vars: Vec<VarState>,
    /// State shared by all variables: the step count, the learning rate.
    pub scalars: BTreeMap<String, f64>,
}

impl OptimizerStateDict {
    /// The scalar `name`, or an error naming it.
    pub fn scalar(&self, name: &str) -> Result<f64> {
        self.scalars
            .get(name)
            .copied()
            .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state has no `{name}`")))
    }
}

/// An optimizer whose state can be saved and restored. The state is per variable, so a
/// checkpoint can store each slot beside the parameter shard it belongs to and cut it
/// anew for another number of ranks.
pub trait OptimizerState {
    /// The current state; the tensors are the optimizer's own (not copies) and are only read.
    fn export_state(&self) -> Result<OptimizerStateDict>;

    /// Replaces the state with `state`, whose variables are matched to this optimizer's
    /// by identity (the same `Var`). Fails, changing nothing, when a variable is not this
    /// optimizer's, a slot is unknown, or a tensor has the wrong shape or dtype.
    fn import_state(&mut self, state: OptimizerStateDict) -> Result<()>;
}

/// The position of each of `vars` in `ours`, by identity; fails on a stranger.
pub(crate) fn positions(ours: &[Var], vars: &[VarState]) -> Result<Vec<usize>> {
    vars.iter()
        .map(|v| {
            ours.iter().position(|o| o.id() == v.var.id()).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "optimizer state for a {:?} variable this optimizer does not step",
                    v.var.shape()
                ))
            })
        })
        .collect()
}

/// Checks that `slot` may replace state of `var`: same shape and dtype.
pub(crate) fn check_slot(var: &Var, name: &str, slot: &Tensor) -> Result<()> {
    if slot.shape() != var.shape() || slot.dtype() != var.dtype() {
        candle_core::bail!(
            "optimizer state `{name}` is {:?} {:?}, but its variable is {:?} {:?}",
            slot.shape(),
            slot.dtype(),
            var.shape(),
            var.dtype()
        )
    }
    Ok(())
}
