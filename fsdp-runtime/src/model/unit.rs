//! [`Unit`]: the FSDP unit boundary in a model struct.
//!
//! A field of type `Unit<T>` (directly, or inside a `Vec`, `Option` or array) makes `T`'s
//! parameters one FSDP unit: gathered together before the unit runs and reduced together
//! after its backward, like a nested FSDP wrap in PyTorch FSDP1 or `fully_shard(module)` in
//! FSDP2. `Unit` adds no FQN segment: a model's names are those of the plain model.
//!
//! Before the model is wrapped by [`crate::Fsdp`], a `Unit` just runs `T`; after, every
//! call goes through the [`UnitHooks`] installed in its [`UnitCell`].

use super::activations::Activations;
use super::schema::{Node, Shardable, TensorMap, VisitOrder, Visitor};
use super::unit_hooks::{Recompute, UnitCell};
use crate::error::into_candle;
use candle_core::{Module, Result, Tensor};
use std::sync::Arc;

/// An FSDP unit wrapping the module `T`.
///
/// The module is shared (an `Arc`) so that a checkpointed unit's backward can run its
/// forward again after the forward call has returned.
#[derive(Debug)]
pub struct Unit<T> {
    inner: Arc<T>,
    cell: UnitCell,
}

impl<T> Unit<T> {
    /// Marks `inner` as one unit; it is not wrapped until the model is given to
    /// [`crate::Fsdp::wrap`].
    pub fn new(inner: T) -> Self {
        Self { inner: Arc::new(inner), cell: UnitCell::default() }
    }

    /// Runs the unit's forward `f` on `inputs`: the way to call a forward with any
    /// signature. Once wrapped, the unit's parameters are gathered before `f` and freed
    /// after it as the strategy says, and the outputs are hooked for the backward.
    ///
    /// `f` may borrow anything, so it cannot run again later: a unit whose activations
    /// are checkpointed ([`crate::FsdpConfig::activation_checkpointing`]) is called
    /// through [`Unit::run_fn`] or `Module::forward` instead, and fails here.
    pub fn run<I: Activations, R: Activations>(&self, inputs: I, f: impl FnOnce(&T, I) -> Result<R>) -> Result<R> {
        let Some((hooks, index)) = self.cell.installed() else {
            return f(&self.inner, inputs);
        };
        if hooks.checkpoints(*index) {
            candle_core::bail!(
                "unit `{}` is checkpointed, but its forward was called through Unit::run, whose closure cannot run \
                 again in backward: call it through Module::forward or Unit::run_fn (a function; pass what it needs \
                 as inputs)",
                hooks.unit_name(*index)
            );
        }
        let bound = hooks.bind_inputs(*index, inputs.tensors()).map_err(into_candle)?;
        let inputs = inputs.with_tensors(bound)?;
        hooks.pre_forward(*index).map_err(into_candle)?;
        let outputs = f(&self.inner, inputs).map_err(|e| hooks.forward_failed(*index, e))?;
        let hooked = hooks.post_forward(*index, outputs.tensors()).map_err(into_candle)?;
        outputs.with_tensors(hooked)
    }

    /// The module, without the unit boundary or any hooks installed in it; fails while a
    /// graph of a checkpointed forward still holds it (drop the outputs first).
    pub fn into_inner(self) -> Result<T> {
        Arc::try_unwrap(self.inner).map_err(|_| {
            candle_core::Error::Msg(
                "the unit's module is still held by the graph of a checkpointed forward: drop its outputs first".into(),
            )
        })
    }
}

impl<T: Send + Sync + 'static> Unit<T> {
    /// As [`Unit::run`], with a forward that can run again: a function (a closure that
    /// captures nothing), which gets everything it needs through `inputs`. A unit whose
    /// activations are checkpointed keeps only its inputs after this forward, and its
    /// backward runs `f` again.
    pub fn run_fn<I, R>(&self, inputs: I, f: fn(&T, I) -> Result<R>) -> Result<R>
    where
        I: Activations + Clone + Send + Sync + 'static,
        R: Activations + 'static,
    {
        let Some((hooks, index)) = self.cell.installed() else {
            return f(&self.inner, inputs);
        };
        if !hooks.checkpoints(*index) {
            return self.run(inputs, f);
        }
        let bound = hooks.bind_inputs(*index, inputs.tensors()).map_err(into_candle)?;
        let inputs = inputs.with_tensors(bound)?;
        hooks.pre_forward(*index).map_err(into_candle)?;
        let received = inputs.tensors();
        // The first forward runs on detached inputs: its graph goes when its outputs are
        // replaced below, and only the inputs and outputs stay.
        let template = inputs.with_tensors(received.iter().map(Tensor::detach).collect())?;
        let outputs = f(&self.inner, template.clone()).map_err(|e| hooks.forward_failed(*index, e))?;
        let values = outputs.tensors().iter().map(Tensor::detach).collect();
        let inner = self.inner.clone();
        let recompute: Recompute = Arc::new(move |tensors: Vec<Tensor>| {
            let inputs = template.clone().with_tensors(tensors)?;
            Ok(f(&inner, inputs)?.tensors())
        });
        let joined = hooks.attach_checkpoint(*index, received, values, recompute).map_err(into_candle)?;
        let hooked = hooks.post_forward(*index, joined).map_err(into_candle)?;
        outputs.with_tensors(hooked)
    }
}

impl<T: Module + Send + Sync + 'static> Module for Unit<T> {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run_fn(xs.clone(), |inner, xs| inner.forward(&xs))
    }
}

impl<T: Shardable> Shardable for Unit<T> {
    const NODE: Node = Node::Unit(&T::NODE);

    fn visit(&self, visitor: &mut dyn Visitor, order: VisitOrder) {
        visitor.enter_unit(&self.cell);
        self.inner.visit(visitor, order);
        visitor.leave_unit();
    }

    /// The rebuilt unit is not wrapped: its cell starts empty.
    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        Ok(Self::new(self.into_inner()?.map_tensors(map)?))
    }
}
