//! Where each parameter of a unit lies in the unit's flat collective buffers (FSDP2's
//! `_fsdp_collectives`): pure arithmetic over shard lengths, plus the tensor copies that
//! follow it.
//!
//! A parameter of `numel` elements is flattened and padded to `world * shard_len`
//! elements, `shard_len = ceil(numel / world)`; rank `r` owns elements
//! `[r * shard_len, (r + 1) * shard_len)`. A unit's collectives move all its parameters at
//! once: the all-gather input is the concatenation of the rank's shards, so its output is
//! rank-major (rank 0's shards of every parameter, then rank 1's, …), and the
//! reduce-scatter input is packed the same way.

use candle_core::{Result, Shape, Tensor};

/// How one parameter is split over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ShardSpec {
    /// Elements of the full parameter, unpadded.
    pub numel: usize,
    /// Elements per rank, padding included.
    pub shard_len: usize,
}

impl ShardSpec {
    pub fn new(numel: usize, world: usize) -> Self {
        Self { numel, shard_len: numel.div_ceil(world) }
    }

    /// Elements of rank `rank`'s shard that are not padding.
    pub fn real_len(&self, rank: usize) -> usize {
        self.numel.saturating_sub(rank * self.shard_len).min(self.shard_len)
    }

    /// The elements of the flattened full parameter that rank `rank`'s shard holds
    /// (padding left out).
    pub fn real_range(&self, rank: usize) -> std::ops::Range<usize> {
        let start = (rank * self.shard_len).min(self.numel);
        start..start + self.real_len(rank)
    }

    /// Rank `rank`'s shard (1-D, padded with zeros) of `full`, without a padded copy of
    /// the whole parameter.
    pub fn shard_of(&self, full: &Tensor, rank: usize) -> Result<Tensor> {
        let range = self.real_range(rank);
        pad(&full.flatten_all()?.narrow(0, range.start, range.len())?, self.shard_len)
    }
}

/// `flat` (1-D) followed by zeros up to `len` elements.
pub(crate) fn pad(flat: &Tensor, len: usize) -> Result<Tensor> {
    let missing = len - flat.elem_count();
    if missing == 0 {
        return Ok(flat.clone());
    }
    let zeros = Tensor::zeros(missing, flat.dtype(), flat.device())?;
    Tensor::cat(&[flat, &zeros], 0)
}

/// Where each parameter's elements lie in a rank-major all-gather output: per parameter,
/// one `(start, len)` range per rank, the last trimmed so the padding is left out.
pub(crate) fn gathered_ranges(specs: &[ShardSpec], world: usize) -> Vec<Vec<(usize, usize)>> {
    let per_rank: usize = specs.iter().map(|s| s.shard_len).sum();
    let mut offset = 0;
    specs
        .iter()
        .map(|spec| {
            let ranges =
                (0..world).map(|r| (r * per_rank + offset, spec.real_len(r))).filter(|(_, len)| *len > 0).collect();
            offset += spec.shard_len;
            ranges
        })
        .collect()
}

/// Splits a rank-major all-gather output into the full parameters of `shapes`.
pub(crate) fn unflatten_gathered(
    specs: &[ShardSpec],
    shapes: &[Shape],
    gathered: &Tensor,
    world: usize,
) -> Result<Vec<Tensor>> {
    specs
        .iter()
        .zip(shapes)
        .zip(gathered_ranges(specs, world))
        .map(|((_, shape), ranges)| {
            let pieces =
                ranges.iter().map(|&(start, len)| gathered.narrow(0, start, len)).collect::<Result<Vec<_>>>()?;
            Tensor::cat(&pieces, 0)?.reshape(shape.clone())
        })
        .collect()
}

/// Packs full gradients (`(param index, gradient)`) rank-major for a reduce-scatter.
pub(crate) fn pack_for_reduce_scatter(specs: &[ShardSpec], grads: &[(usize, Tensor)], world: usize) -> Result<Tensor> {
    let padded = grads
        .iter()
        .map(|(i, grad)| pad(&grad.flatten_all()?, world * specs[*i].shard_len))
        .collect::<Result<Vec<_>>>()?;
    let mut pieces = Vec::with_capacity(world * grads.len());
    for r in 0..world {
        for ((i, _), grad) in grads.iter().zip(&padded) {
            let len = specs[*i].shard_len;
            pieces.push(grad.narrow(0, r * len, len)?);
        }
    }
    Tensor::cat(&pieces, 0)
}

/// Splits this rank's reduce-scatter output back into per-parameter shard gradients, in
/// the order of `params` (the parameter indices that were packed).
pub(crate) fn split_reduced(specs: &[ShardSpec], params: &[usize], reduced: &Tensor) -> Result<Vec<(usize, Tensor)>> {
    let mut offset = 0;
    params
        .iter()
        .map(|&i| {
            let len = specs[i].shard_len;
            let shard = reduced.narrow(0, offset, len)?;
            offset += len;
            Ok((i, shard))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn specs(numels: &[usize], world: usize) -> Vec<ShardSpec> {
        numels.iter().map(|&n| ShardSpec::new(n, world)).collect()
    }

    #[test]
    fn shards_round_up_and_the_last_rank_holds_the_padding() {
        let spec = ShardSpec::new(10, 4);
        assert_eq!(spec.shard_len, 3);
        assert_eq!((0..4).map(|r| spec.real_len(r)).collect::<Vec<_>>(), [3, 3, 3, 1]);
        // More ranks than elements: the later ranks hold padding only.
        let spec = ShardSpec::new(2, 4);
        assert_eq!((spec.shard_len, (0..4).map(|r| spec.real_len(r)).collect::<Vec<_>>()), (1, vec![1, 1, 0, 0]));
    }

    #[test]
    fn gathered_ranges_skip_the_padding_of_a_rank_major_buffer() {
        // Two parameters of 5 and 2 elements over 2 ranks: shard lengths 3 and 1, so each
        // rank contributes 4 elements: [a0 a1 a2 b0 | a3 a4 pad b1].
        let ranges = gathered_ranges(&specs(&[5, 2], 2), 2);
        assert_eq!(ranges, vec![vec![(0, 3), (4, 2)], vec![(3, 1), (7, 1)]]);
        // World 3, 4 elements: shard length 2; rank 2 holds only padding and is left out.
        assert_eq!(gathered_ranges(&specs(&[4], 3), 3), vec![vec![(0, 2), (2, 2)]]);
    }

    #[test]
    fn packing_and_gathering_invert_each_other() -> Result<()> {
        let world = 3;
        let specs = specs(&[7, 2, 5], world);
        let shapes = [Shape::from(7), Shape::from((1, 2)), Shape::from(5)];
        let values: Vec<Tensor> = [0f32, 100., 200.]
            .iter()
            .zip(&shapes)
            .map(|(base, shape)| {
                let n = shape.elem_count();
                Tensor::arange(*base, base + n as f32, &Device::Cpu)?.reshape(shape.clone())
            })
            .collect::<Result<_>>()?;
        let grads: Vec<(usize, Tensor)> = values.iter().cloned().enumerate().collect();
        // The packed buffer is what every rank would contribute if it held every shard:
        // the all-gather output of the shards.
        let packed = pack_for_reduce_scatter(&specs, &grads, world)?;
        let per_rank: usize = specs.iter().map(|s| s.shard_len).sum();
        assert_eq!(packed.elem_count(), world * per_rank);
        let rank1 = packed.narrow(0, per_rank, per_rank)?.to_vec1::<f32>()?;
        // Rank 1's shards: elements 3..6 of the first, element 1 of the second, 2..4 of the third.
        assert_eq!(rank1, [3., 4., 5., 101., 202., 203.]);
        let back = unflatten_gathered(&specs, &shapes, &packed, world)?;
        for (original, restored) in values.iter().zip(&back) {
            assert_eq!(original.shape(), restored.shape());
            assert_eq!(original.flatten_all()?.to_vec1::<f32>()?, restored.flatten_all()?.to_vec1::<f32>()?);
        }
        let split = split_reduced(&specs, &[0, 2], &Tensor::arange(0f32, 5., &Device::Cpu)?)?;
        assert_eq!(split[0].1.to_vec1::<f32>()?, [0., 1., 2.]);
        assert_eq!((split[1].0, split[1].1.to_vec1::<f32>()?), (2, vec![3., 4.]));
        Ok(())
    }
}
