//! One sharded parameter: the rank's shard (`Var`, what the optimizer sees) and the
//! gathered node the model's layers hold. How shards are laid out is
//! [`super::flat_buffer`]'s.

use super::autograd::{GatheredParam, GradSink};
use super::flat_buffer::ShardSpec;
use super::storage::{released, Unallocated};
use candle_core::{Result, Shape, Tensor, Var};
use std::sync::Weak;

pub(crate) struct ShardedParam {
    pub fqn: String,
    pub shape: Shape,
    pub spec: ShardSpec,
    /// This rank's shard, 1-D of `spec.shard_len` elements.
    pub shard: Var,
    /// The full parameter as the model's layers see it. Its storage is released while the
    /// unit is sharded and refilled when it is gathered.
    pub gathered: Tensor,
}

impl ShardedParam {
    /// Keeps `shard`, this rank's shard of a parameter split as `spec` says; the gathered
    /// node, of `gathered`'s shape and dtype (the compute dtype), starts out released (its
    /// first gather fills it).
    pub(crate) fn new(
        fqn: String,
        spec: ShardSpec,
        shard: &Tensor,
        gathered: Unallocated,
        sink: Weak<dyn GradSink>,
        unit: usize,
        param: usize,
    ) -> Result<Self> {
        let shard = Var::from_tensor(shard)?;
        let shape = gathered.shape.clone();
        let op = GatheredParam { sink, unit, param, released: gathered };
        let gathered = released(shard.as_tensor().apply_op1(op)?)?;
        Ok(Self { fqn, shape, spec, shard, gathered })
    }

    pub fn gathered_bytes(&self) -> usize {
        self.spec.numel * self.gathered.dtype().size_in_bytes()
    }
}
