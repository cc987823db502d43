//! [`Unit`]: the FSDP unit boundary in a model struct.
//!
//! A field of type `Unit<T>` (directly, or inside a `Vec`, `Option` or array) makes `T`'s
//! parameters one FSDP unit: gathered together before the unit runs and reduced together
//! after its backward, like a nested FSDP wrap in PyTorch FSDP1 or `fully_shard(module)` in
//! FSDP2. `Unit` adds no FQN segment: a model's names are those of the plain model.
//!
//! Before the model is wrapped by [`crate::Fsdp`], a `Unit` just runs `T`; after, every
//! call goes through the rank's runtime.

use crate::activations::Activations;
use crate::schema::{Node, Shardable, TensorMap, VisitOrder, Visitor};
use crate::state::RankState;
use candle_core::{Module, Result, Tensor};
use std::sync::{Arc, OnceLock};

/// Where a wrapped unit finds its runtime: the rank's state and the unit's index there.
#[derive(Default)]
pub struct UnitCell(OnceLock<(Arc<RankState>, usize)>);

impl UnitCell {
    pub(crate) fn install(&self, state: Arc<RankState>, index: usize) -> crate::Result<()> {
        self.0
            .set((state, index))
            .map_err(|_| crate::Error::Config("a unit can be wrapped by one Fsdp only".into()))
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

/// An FSDP unit wrapping the module `T`.
#[derive(Debug)]
pub struct Unit<T> {
    inner: T,
    cell: UnitCell,
}

impl<T> Unit<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, cell: UnitCell::default() }
    }

    /// Runs the unit's forward `f` on `inputs`: the way to call a forward with any
    /// signature. Once wrapped, the unit's parameters are gathered before `f` and freed
    /// after it as the strategy says, and the outputs are hooked for the backward.
    pub fn run<I: Activations, R: Activations>(&self, inputs: I, f: impl FnOnce(&T, I) -> Result<R>) -> Result<R> {
        let Some((state, index)) = self.cell.0.get() else {
            return f(&self.inner, inputs);
        };
        let candle = |e: crate::Error| candle_core::Error::Msg(e.to_string());
        let inputs = state.bind_inputs(inputs).map_err(candle)?;
        state.pre_forward(*index).map_err(candle)?;
        let outputs = f(&self.inner, inputs)?;
        state.post_forward(*index, outputs).map_err(candle)
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: Module> Module for Unit<T> {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs.clone(), |inner, xs| inner.forward(&xs))
    }
}

impl<T: Shardable> Shardable for Unit<T> {
    const NODE: Node = Node::Unit(&T::NODE);

    fn visit(&self, visitor: &mut dyn Visitor, order: VisitOrder) {
        visitor.enter_unit(&self.cell);
        self.inner.visit(visitor, order);
        visitor.leave_unit();
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        Ok(Self::new(self.inner.map_tensors(map)?))
    }
}
