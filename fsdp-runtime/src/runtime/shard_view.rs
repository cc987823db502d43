//! What checkpointing sees of a wrapped model: unit by unit, each parameter's name, full
//! shape and dtype, where this rank's part of its flattened value lies, and that part to
//! read or to fill; each buffer whole. How a unit holds its shards (one flat buffer per
//! unit, padding, shard and replica groups) stays behind these views, so it can change
//! without touching the checkpoint code.

use super::flat_buffer::pad;
use super::param_group::ParamGroup;
use super::storage::Fill;
use crate::error::Result;
use candle_core::{DType, Device, Tensor, TensorId};
use std::ops::Range;

/// A tensor of the wrapped model that is not trained (a running statistic): every rank
/// holds it whole; checkpoints save and restore it.
pub(crate) struct Buffer {
    pub fqn: String,
    pub unit: usize,
    /// The tensor the model's layers hold.
    pub tensor: Tensor,
}

/// One unit of a wrapped model.
#[derive(Clone, Copy)]
pub(crate) struct UnitView<'a> {
    group: &'a ParamGroup,
    buffers: &'a [Buffer],
}

impl<'a> UnitView<'a> {
    pub(crate) fn new(group: &'a ParamGroup, buffers: &'a [Buffer]) -> Self {
        Self { group, buffers }
    }

    /// The unit's FQN.
    pub fn name(&self) -> &'a str {
        &self.group.name
    }

    /// The ranks the unit is sharded over (its shard group).
    pub fn group_size(&self) -> usize {
        self.group.comm.size()
    }

    /// Whether the unit is sharded (and replicated) over all `world` ranks, so that every
    /// rank agrees on its value. A unit kept to a smaller group (a per-rank expert) holds
    /// another value in each group.
    pub fn spans_world(&self, world: usize) -> bool {
        self.group.comm.size() * self.group.replica_count() == world
    }

    /// The unit's parameters, in flat-parameter order.
    pub fn params(&self) -> impl Iterator<Item = ParamView<'a>> + 'a {
        let group = self.group;
        (0..group.params.len()).map(move |index| ParamView { group, index })
    }

    /// The buffers the unit's layers hold.
    pub fn buffers(&self) -> impl Iterator<Item = BufferView<'a>> + 'a {
        let unit = self.group.index;
        self.buffers.iter().filter(move |b| b.unit == unit).map(BufferView::new)
    }

    /// Every parameter's full value, gathered from the unit's ranks (a collective all of
    /// them call), each as pieces of one gathered buffer (no copy), in parameter order.
    pub fn gather_full_values(&self) -> Result<Vec<Vec<Tensor>>> {
        self.group.full_value_pieces()
    }
}

/// One parameter, as this rank holds it.
#[derive(Clone, Copy)]
pub(crate) struct ParamView<'a> {
    group: &'a ParamGroup,
    index: usize,
}

impl<'a> ParamView<'a> {
    /// Its FQN.
    pub fn fqn(&self) -> &'a str {
        &self.group.params[self.index].fqn
    }

    /// The full value's shape.
    pub fn shape(&self) -> &'a [usize] {
        self.group.params[self.index].shape.dims()
    }

    /// The dtype of its shards (the model's dtype).
    pub fn dtype(&self) -> DType {
        self.group.params[self.index].shard.dtype()
    }

    /// Where this rank's shard lives.
    pub fn device(&self) -> &'a Device {
        self.group.params[self.index].shard.device()
    }

    /// The elements of the flattened full value that the unit's shard rank `shard_rank`
    /// holds (its shard without padding; empty past the end).
    pub fn range_of(&self, shard_rank: usize) -> Range<usize> {
        self.group.params[self.index].spec.real_range(shard_rank)
    }

    /// The elements this rank holds.
    pub fn range(&self) -> Range<usize> {
        self.range_of(self.group.shard_rank())
    }

    /// Each shard rank of the unit with the elements it holds, those that hold any.
    pub fn pieces(&self) -> impl Iterator<Item = (usize, Range<usize>)> + 'a {
        let view = *self;
        (0..self.group.shard_world).map(move |r| (r, view.range_of(r))).filter(|(_, range)| !range.is_empty())
    }

    /// How many of its elements this rank (global rank `rank`) writes to a checkpoint: its
    /// range on one replica of each shard, and without sharding on rank 0 alone; else 0.
    pub fn saved_len(&self, rank: usize) -> usize {
        if (self.group.shard_world == 1 && rank != 0) || self.group.replica_rank() != 0 {
            return 0;
        }
        self.range().len()
    }

    /// This rank's elements, a view of its shard.
    pub fn values(&self) -> Result<Tensor> {
        let param = &self.group.params[self.index];
        Ok(param.shard.as_tensor().narrow(0, 0, self.range().len())?)
    }

    /// A tensor cut as this rank's shard is, from a full value whose flattened elements
    /// `read(start, len, dtype)` returns range by range (this parameter's, or an
    /// optimizer slot's); the padding is zero, as at wrap time.
    pub fn cut(&self, read: impl FnOnce(usize, usize, DType) -> Result<Tensor>) -> Result<Tensor> {
        let param = &self.group.params[self.index];
        let range = self.range();
        let values = if range.is_empty() {
            Tensor::zeros(0, self.dtype(), self.device())?
        } else {
            read(range.start, range.len(), self.dtype())?
        };
        Ok(pad(&values, param.spec.shard_len)?)
    }

    /// Sets this rank's shard from a full value read as for [`ParamView::cut`].
    pub fn fill(&self, read: impl FnOnce(usize, usize, DType) -> Result<Tensor>) -> Result<()> {
        let shard = self.cut(read)?;
        self.group.params[self.index].shard.set(&shard)?;
        Ok(())
    }

    /// The identity of the variable an optimizer steps for this parameter (its shard).
    pub fn var_id(&self) -> TensorId {
        self.group.params[self.index].shard.id()
    }
}

/// One buffer (running statistics and the like), whole on every rank.
#[derive(Clone, Copy)]
pub(crate) struct BufferView<'a>(&'a Buffer);

impl<'a> BufferView<'a> {
    pub(crate) fn new(buffer: &'a Buffer) -> Self {
        Self(buffer)
    }

    /// Its FQN.
    pub fn fqn(&self) -> &'a str {
        &self.0.fqn
    }

    /// Its shape.
    pub fn shape(&self) -> &'a [usize] {
        self.0.tensor.dims()
    }

    /// Its dtype.
    pub fn dtype(&self) -> DType {
        self.0.tensor.dtype()
    }

    /// Where it lives.
    pub fn device(&self) -> &'a Device {
        self.0.tensor.device()
    }

    /// Its value (the tensor the layers hold).
    pub fn values(&self) -> &'a Tensor {
        &self.0.tensor
    }

    /// Overwrites it in place (the layers hold it) with `flat`, the full value's
    /// flattened elements.
    pub fn fill(&self, flat: Tensor) -> Result<()> {
        let (numel, dtype) = (self.0.tensor.elem_count(), self.dtype());
        let flat = flat.to_dtype(dtype)?.contiguous()?;
        self.0.tensor.inplace_op1(&Fill { source: flat, ranges: vec![(0, numel)], dtype })?;
        Ok(())
    }
}
