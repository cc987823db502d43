//! One sharded parameter: the rank's shard (`Var`, what the optimizer sees) and the
//! gathered node the model's layers hold. How shards are laid out is
//! [`super::flat_buffer`]'s.

use super::autograd::{GatheredParam, GradSink};
use super::flat_buffer::{pad, ShardSpec};
use crate::backend::BuiltValue;
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
    /// Splits `full` (the same on every rank) over `world` ranks and keeps rank `rank`'s
    /// shard; the gathered node starts out holding `full`.
    pub(crate) fn new(
        fqn: String,
        full: &Tensor,
        rank: usize,
        world: usize,
        sink: Weak<dyn GradSink>,
        unit: usize,
        param: usize,
    ) -> Result<Self> {
        let spec = ShardSpec::new(full.elem_count(), world);
        let padded = pad(&full.flatten_all()?, world * spec.shard_len)?;
        let shard = Var::from_tensor(&padded.narrow(0, rank * spec.shard_len, spec.shard_len)?)?;
        let op = GatheredParam { sink, unit, param, initial: BuiltValue::new("fsdp-gathered-param", full.clone()) };
        let gathered = shard.as_tensor().apply_op1(op)?;
        Ok(Self { fqn, shape: full.shape().clone(), spec, shard, gathered })
    }

    pub fn gathered_bytes(&self) -> usize {
        self.spec.numel * self.gathered.dtype().size_in_bytes()
    }
}
