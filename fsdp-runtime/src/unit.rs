//! [`Unit`]: the FSDP unit boundary in a model struct.
//!
//! A field of type `Unit<T>` (directly, or inside a `Vec`, `Option` or array) makes `T`'s
//! parameters one FSDP unit: gathered together before the unit runs and reduced together
//! after its backward, like a nested FSDP wrap in PyTorch FSDP1 or `fully_shard(module)` in
//! FSDP2. `Unit` adds no FQN segment: a model's names are those of the plain model.

use crate::schema::{Node, Shardable, TensorMap, VisitOrder, Visitor};
use candle_core::{Module, Result, Tensor};

/// An FSDP unit wrapping the module `T`.
#[derive(Clone, Debug)]
pub struct Unit<T> {
    inner: T,
}

impl<T> Unit<T> {
    pub fn new(inner: T) -> Self {
        Self { inner }
    }

    /// Runs `f` on the wrapped module: the way to call a forward with any signature.
    pub fn run<R>(&self, f: impl FnOnce(&T) -> Result<R>) -> Result<R> {
        f(&self.inner)
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: Module> Module for Unit<T> {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(|inner| inner.forward(xs))
    }
}

impl<T: Shardable> Shardable for Unit<T> {
    const NODE: Node = Node::Unit(&T::NODE);

    fn visit(&self, visitor: &mut dyn Visitor, order: VisitOrder) {
        visitor.enter_unit();
        self.inner.visit(visitor, order);
        visitor.leave_unit();
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        Ok(Self::new(self.inner.map_tensors(map)?))
    }
}
