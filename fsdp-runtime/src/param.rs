//! One sharded parameter: the rank's shard (`Var`, what the optimizer sees), the gathered
//! node the model's layers hold, and the arithmetic of splitting and reassembling.
//!
//! A parameter of `numel` elements is flattened and padded to `world * shard_len`
//! elements, `shard_len = ceil(numel / world)`; rank `r` owns elements
//! `[r * shard_len, (r + 1) * shard_len)`. A unit's collectives move all its parameters at
//! once: the all-gather input is the concatenation of the rank's shards, so its output is
//! rank-major (rank 0's shards of every parameter, then rank 1's, …), and the
//! reduce-scatter input is packed the same way.

use crate::ops::{BuiltValue, GatheredParam, GradSink};
use candle_core::{Result, Shape, Tensor, Var};
use std::sync::Weak;

pub struct ShardedParam {
    pub fqn: String,
    pub shape: Shape,
    pub numel: usize,
    /// Elements per rank, padding included.
    pub shard_len: usize,
    /// This rank's shard, 1-D of `shard_len` elements.
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
        let numel = full.elem_count();
        let shard_len = numel.div_ceil(world);
        let padded = pad(&full.flatten_all()?, world * shard_len)?;
        let shard = Var::from_tensor(&padded.narrow(0, rank * shard_len, shard_len)?)?;
        let op = GatheredParam {
            sink,
            unit,
            param,
            initial: BuiltValue::new("fsdp-gathered-param", full.clone()),
        };
        let gathered = shard.as_tensor().apply_op1(op)?;
        Ok(Self { fqn, shape: full.shape().clone(), numel, shard_len, shard, gathered })
    }

    pub fn gathered_bytes(&self) -> usize {
        self.numel * self.gathered.dtype().size_in_bytes()
    }
}

/// `flat` (1-D) followed by zeros up to `len` elements.
fn pad(flat: &Tensor, len: usize) -> Result<Tensor> {
    let missing = len - flat.elem_count();
    if missing == 0 {
        return Ok(flat.clone());
    }
    let zeros = Tensor::zeros(missing, flat.dtype(), flat.device())?;
    Tensor::cat(&[flat, &zeros], 0)
}

/// The all-gather input of a unit: this rank's shards, concatenated.
pub(crate) fn flat_shards(params: &[ShardedParam]) -> Result<Tensor> {
    let shards: Vec<&Tensor> = params.iter().map(|p| p.shard.as_tensor()).collect();
    Tensor::cat(&shards, 0)
}

/// Where each parameter's elements lie in a rank-major all-gather output: per parameter,
/// one `(start, len)` range per rank, the last trimmed so the padding is left out.
pub(crate) fn gathered_ranges(params: &[ShardedParam], world: usize) -> Vec<Vec<(usize, usize)>> {
    let per_rank: usize = params.iter().map(|p| p.shard_len).sum();
    let mut offset = 0;
    params
        .iter()
        .map(|param| {
            let mut remaining = param.numel;
            let ranges = (0..world)
                .map(|r| {
                    let len = param.shard_len.min(remaining);
                    remaining -= len;
                    (r * per_rank + offset, len)
                })
                .filter(|(_, len)| *len > 0)
                .collect();
            offset += param.shard_len;
            ranges
        })
        .collect()
}

/// Splits a rank-major all-gather output into the full parameters.
pub(crate) fn unflatten_gathered(params: &[ShardedParam], gathered: &Tensor, world: usize) -> Result<Vec<Tensor>> {
    params
        .iter()
        .zip(gathered_ranges(params, world))
        .map(|(param, ranges)| {
            let pieces =
                ranges.iter().map(|&(start, len)| gathered.narrow(0, start, len)).collect::<Result<Vec<_>>>()?;
            Tensor::cat(&pieces, 0)?.reshape(param.shape.clone())
        })
        .collect()
}

/// Packs full gradients (`(param index, gradient)`) rank-major for a reduce-scatter.
pub(crate) fn pack_for_reduce_scatter(
    params: &[ShardedParam],
    grads: &[(usize, Tensor)],
    world: usize,
) -> Result<Tensor> {
    let padded = grads
        .iter()
        .map(|(i, grad)| pad(&grad.flatten_all()?, world * params[*i].shard_len))
        .collect::<Result<Vec<_>>>()?;
    let mut pieces = Vec::with_capacity(world * grads.len());
    for r in 0..world {
        for ((i, _), grad) in grads.iter().zip(&padded) {
            let len = params[*i].shard_len;
            pieces.push(grad.narrow(0, r * len, len)?);
        }
    }
    Tensor::cat(&pieces, 0)
}

/// Splits this rank's reduce-scatter output back into per-parameter shard gradients.
pub(crate) fn split_reduced(params: &[ShardedParam], grads: &[(usize, Tensor)], reduced: &Tensor) -> Result<Vec<(usize, Tensor)>> {
    let mut offset = 0;
    grads
        .iter()
        .map(|(i, _)| {
            let len = params[*i].shard_len;
            let shard = reduced.narrow(0, offset, len)?;
            offset += len;
            Ok((*i, shard))
        })
        .collect()
}
