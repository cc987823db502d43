//! [`Pipelining`]: the FSDP side of a pipeline stage whose backward runs outside
//! [`Fsdp::backward`] (`stage_backward`, or `stage_backward_input` then
//! `stage_backward_weight`).

use super::Fsdp;
use crate::error::Result;
use crate::pipeline::DeferredGradSink;
use candle_core::backprop::GradStore;
use std::sync::Arc;

/// A wrapped model as a pipeline stage: `fsdp.pipelining()`.
pub struct Pipelining<'a, M> {
    fsdp: &'a Fsdp<M>,
}

impl<M> Fsdp<M> {
    /// The calls a pipeline stage's split backward needs.
    pub fn pipelining(&self) -> Pipelining<'_, M> {
        Pipelining { fsdp: self }
    }
}

impl<M> Pipelining<'_, M> {
    /// The receiver of deferred weight gradients for this model's parameters: give it to
    /// the stage's `StageContext::set_grad_sink`. A unit's gradients are reduced as soon
    /// as the weight pass has delivered the last of them.
    pub fn deferred_grad_sink(&self) -> Arc<dyn DeferredGradSink> {
        self.fsdp.state.clone()
    }

    /// Ends a stage's input pass (`stage_backward_input`): frees the gathered parameters,
    /// which the weight pass does not read. Units whose weight gradients were deferred are
    /// reduced when `stage_backward_weight` delivers them, through
    /// [`Pipelining::deferred_grad_sink`].
    pub fn finish_input_pass(&self) -> Result<()> {
        self.fsdp.state.finish_input_pass()
    }

    /// Ends the backward: reduces what is left, resets the step, and returns the shard
    /// gradients.
    pub fn finish_backward(&self) -> Result<GradStore> {
        let mut grads = GradStore::default();
        self.fsdp.insert_reduced(&mut grads)?;
        Ok(grads)
    }
}

/// The methods' earlier places, kept so that code written for them still builds, with a
/// warning that names the new one.
#[doc(hidden)]
impl<M> Fsdp<M> {
    #[deprecated(note = "use `fsdp.pipelining().deferred_grad_sink()`")]
    pub fn deferred_grad_sink(&self) -> Arc<dyn DeferredGradSink> {
        self.pipelining().deferred_grad_sink()
    }

    #[deprecated(note = "use `fsdp.pipelining().finish_input_pass()`")]
    pub fn finish_input_pass(&self) -> Result<()> {
        self.pipelining().finish_input_pass()
    }

    #[deprecated(note = "use `fsdp.pipelining().finish_backward()`")]
    pub fn finish_backward(&self) -> Result<GradStore> {
        self.pipelining().finish_backward()
    }
}
