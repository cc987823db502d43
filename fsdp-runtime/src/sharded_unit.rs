//! One FSDP unit at run time: its sharded parameters, whether they are gathered, the
//! gradients its backward has produced so far, and the three collective-backed steps
//! (unshard, reshard, reduce) that [`crate::state::RankState`] sequences.

use crate::collectives::{Collectives, ReduceOp};
use crate::error::Result;
use crate::ops::{Fill, Free};
use crate::param::{flat_shards, gathered_ranges, pack_for_reduce_scatter, split_reduced, ShardedParam};
use candle_core::Tensor;
use std::sync::{Arc, Mutex, MutexGuard};

/// The per-step flags of a unit (PyTorch FSDP1's handle state, by the same names).
#[derive(Debug, Default)]
pub(crate) struct UnitFlags {
    pub gathered: bool,
    /// Gathered ahead of its use by a prefetch and not used since.
    pub prefetched: bool,
    pub needs_pre_backward_unshard: bool,
    pub ran_pre_backward: bool,
    pub ran_post_backward: bool,
    /// Full gradients handed over by autograd this step, by parameter.
    pub grads: Vec<Option<Tensor>>,
    /// Parameters whose gradient has not arrived yet this step.
    pub grads_pending: usize,
    /// Unsharded gradients kept from backward passes run without gradient sync.
    pub accumulated: Vec<Option<Tensor>>,
    /// Parameters part of whose gradient a pipeline input pass deferred to its weight pass.
    pub deferred: Vec<bool>,
}

impl UnitFlags {
    /// Every gradient of the step has arrived, deferred parts included.
    pub fn complete(&self) -> bool {
        self.grads_pending == 0 && !self.deferred.iter().any(|&d| d)
    }
}

pub(crate) struct ShardedUnit {
    pub index: usize,
    pub name: String,
    pub params: Vec<ShardedParam>,
    /// The ranks this unit is sharded over and reduced across: the world, or the group
    /// given for it at wrap time (a size-1 group keeps a unit local to its rank).
    pub comm: Arc<dyn Collectives>,
    /// How many ranks the parameters are split over (1 without sharding).
    pub shard_world: usize,
    flags: Mutex<UnitFlags>,
}

impl ShardedUnit {
    pub fn new(
        index: usize,
        name: String,
        params: Vec<ShardedParam>,
        comm: Arc<dyn Collectives>,
        shard_world: usize,
    ) -> Self {
        let flags = UnitFlags {
            gathered: true,
            grads: vec![None; params.len()],
            grads_pending: params.len(),
            accumulated: vec![None; params.len()],
            deferred: vec![false; params.len()],
            ..UnitFlags::default()
        };
        Self { index, name, params, comm, shard_world, flags: Mutex::new(flags) }
    }

    pub fn flags(&self) -> MutexGuard<'_, UnitFlags> {
        self.flags.lock().expect("unit flags lock")
    }

    /// What errors about this unit's collectives call it.
    pub fn label(&self) -> String {
        format!("unit `{}`", self.name)
    }

    pub fn gathered_bytes(&self) -> usize {
        self.params.iter().map(|p| p.gathered_bytes()).sum()
    }

    /// All-gathers the parameters (one collective) and refills the gathered nodes, each
    /// with one copy out of the collective's output (or, unsharded, out of its shard).
    pub fn gather(&self) -> Result<()> {
        if self.params.is_empty() {
            return Ok(());
        }
        if self.shard_world == 1 {
            for param in &self.params {
                let fill = Fill { source: param.shard.as_tensor().clone(), ranges: vec![(0, param.numel)] };
                param.gathered.inplace_op1(&fill)?;
            }
            return Ok(());
        }
        let full = self.comm.all_gather(&flat_shards(&self.params)?, &self.label())?.wait()?;
        for (param, ranges) in self.params.iter().zip(gathered_ranges(&self.params, self.shard_world)) {
            param.gathered.inplace_op1(&Fill { source: full.clone(), ranges })?;
        }
        Ok(())
    }

    /// Releases the gathered storage.
    pub fn free(&self) -> Result<()> {
        for param in &self.params {
            param.gathered.inplace_op1(&Free)?;
        }
        Ok(())
    }

    /// Averages the gradients that arrived over the ranks (one collective) and returns
    /// this rank's shard of each, by parameter index. Parameters without a gradient get
    /// none, as in a plain backward.
    pub fn reduce(&self, grads: Vec<(usize, Tensor)>) -> Result<Vec<(usize, Tensor)>> {
        if grads.is_empty() {
            return Ok(Vec::new());
        }
        if self.comm.size() == 1 {
            // Averaging over one rank changes nothing: no packing, no collective.
            return grads.into_iter().map(|(i, grad)| Ok((i, grad.flatten_all()?))).collect();
        }
        let packed = pack_for_reduce_scatter(&self.params, &grads, self.shard_world)?;
        let reduced = if self.shard_world == 1 {
            self.comm.all_reduce(&packed, ReduceOp::Avg, &self.label())?.wait()?
        } else {
            self.comm.reduce_scatter(&packed, ReduceOp::Avg, &self.label())?.wait()?
        };
        Ok(split_reduced(&self.params, &grads, &reduced)?)
    }
}
