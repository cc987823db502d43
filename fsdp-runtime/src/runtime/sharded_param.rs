//! One sharded parameter: the rank's shard (`Var`, what the optimizer sees) and the
//! gathered node the model's layers hold. How shards are laid out is
//! [`super::flat_buffer`]'s.

use super::autograd::GatheredParam;
use super::flat_buffer::ShardSpec;
use super::storage::released;
use candle_core::{Result, Shape, Tensor, Var};

pub(crate) struct ShardedParam {
    pub fqn: String,
    pub shape: Shape,
    pub spec: ShardSpec,
    /// This rank's shard, 1-D of `spec.shard_len` elements.
    pub shard: Var,
    /// Not trained: the gathered node does not track the shard, so autograd computes no
    /// gradient for it (see [`crate::FsdpConfig::frozen`]).
    pub frozen: bool,
    /// The full parameter as the model's layers see it. Its storage is released while the
    /// unit is sharded and refilled when it is gathered.
    pub gathered: Tensor,
}

impl ShardedParam {
    /// Keeps `shard`, this rank's shard of a parameter split as `spec` says; the gathered
    /// node, made by `node` (of the full shape, in the compute dtype), starts out released
    /// (its first gather fills it).
    pub(crate) fn new(fqn: String, spec: ShardSpec, shard: &Tensor, frozen: bool, node: GatheredParam) -> Result<Self> {
        let shard = Var::from_tensor(shard)?;
        let shape = node.released.shape.clone();
        let input = if frozen { shard.as_tensor().detach() } else { shard.as_tensor().clone() };
        let gathered = released(input.apply_op1(node)?)?;
        Ok(Self { fqn, shape, spec, shard, frozen, gathered })
    }

    pub fn gathered_bytes(&self) -> usize {
        self.spec.numel * self.gathered.dtype().size_in_bytes()
    }
}
