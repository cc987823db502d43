//! How a wrapped [`Unit`](crate::Unit) reaches the rank that runs it: the [`UnitHooks`] a
//! rank implements and the [`UnitCell`] each unit holds them in, installed at wrap time.
//! Nothing here knows a model's schema or a rank's state.

use crate::error::ConfigError;
use crate::error::Error;
use candle_core::{Result, Tensor};
use std::sync::{Arc, OnceLock};

/// A unit's forward as a function of its input tensors (in [`Activations`] order) to its
/// output tensors, which a checkpointed unit runs again in backward.
pub(crate) type Recompute = Arc<dyn Fn(Vec<Tensor>) -> Result<Vec<Tensor>> + Send + Sync>;

/// What a wrapped unit calls around its forward. The executor implements it; hooks see
/// only the flat list of tensors in the unit's inputs and outputs, in
/// [`Activations::for_each_tensor`] order, and return the list to continue with.
pub(crate) trait UnitHooks: Send + Sync {
    /// Before the forward, on the inputs (to order the unit's backward).
    fn bind_inputs(&self, unit: usize, inputs: Vec<Tensor>) -> crate::Result<Vec<Tensor>>;
    /// Before the forward: the unit's parameters must be gathered.
    fn pre_forward(&self, unit: usize) -> crate::Result<()>;
    /// After the forward, on the outputs (to hook the unit's pre-backward).
    fn post_forward(&self, unit: usize, outputs: Vec<Tensor>) -> crate::Result<Vec<Tensor>>;
    /// Whether the unit's activations are checkpointed in this forward (a training
    /// forward of a unit the configuration checkpoints).
    fn checkpoints(&self, unit: usize) -> bool;
    /// The unit's name, for messages.
    fn unit_name(&self, unit: usize) -> String;
    /// Joins the outputs of a checkpointed unit's first forward (detached) to its inputs
    /// so that backward runs `recompute` again; returns the outputs to hand on.
    fn attach_checkpoint(
        &self,
        unit: usize,
        inputs: Vec<Tensor>,
        outputs: Vec<Tensor>,
        recompute: Recompute,
    ) -> crate::Result<Vec<Tensor>>;
    /// The unit's forward failed with `error`: the error to report, with what the runtime
    /// knows of the cause.
    fn forward_failed(&self, unit: usize, error: candle_core::Error) -> candle_core::Error;
}

/// Where a wrapped unit finds the hooks of its executor and its index there. Empty until
/// the model is wrapped.
#[derive(Default)]
pub struct UnitCell(OnceLock<(Arc<dyn UnitHooks>, usize)>);

impl UnitCell {
    pub(crate) fn install(&self, hooks: Arc<dyn UnitHooks>, index: usize) -> crate::Result<()> {
        self.0.set((hooks, index)).map_err(|_| Error::Config(ConfigError::AlreadyWrapped))
    }

    /// The installed hooks and the unit's index there; `None` before the model is wrapped.
    pub(crate) fn installed(&self) -> Option<&(Arc<dyn UnitHooks>, usize)> {
        self.0.get()
    }
}

impl std::fmt::Debug for UnitCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.get() {
            Some((_, index)) => write!(f, "UnitCell(unit {index})"),
            None => f.write_str("UnitCell(not wrapped)"),
        }
    }
}
