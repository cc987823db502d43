//! One FSDP unit at run time (FSDP2's parameter group): its sharded parameters, the
//! gradients its backward has produced so far, and its whole lifecycle: unshard, reshard,
//! pre/post forward, pre/post backward. Where the unit stands is two explicit states,
//! [`Residency`] and [`TrainingState`]; the rank's executor decides *when* each step runs
//! (sequencing, prefetch targets), the group *how*.

use super::flat_buffer::{gathered_ranges, pack_for_reduce_scatter, split_reduced, unflatten_gathered, ShardSpec};
use super::sharded_param::ShardedParam;
use super::storage::{Fill, Free};
use super::trace::{TraceEvent, UnshardCause};
use super::Recorders;
use crate::config::{FsdpConfig, ShardingStrategy};
use crate::error::{Error, Result};
use candle_core::{DType, Shape, Tensor};
use fsdp_comm::{Collectives, ReduceOp, Work};
use std::sync::{Arc, Mutex, MutexGuard};

/// Where a group's full parameters are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Residency {
    /// Only the shards are held. Without sharding the full values stay in memory but may
    /// be stale: the next unshard refreshes them from the parameters the optimizer stepped.
    Sharded,
    /// Gathered for the unit's own forward or backward.
    Unsharded,
    /// Gathered ahead of use by a prefetch, and not used since. The all-gather may still
    /// be in flight: its output is copied into the parameters at the first use, so that on
    /// a GPU it runs beside the compute queued before that use.
    Prefetched,
}

/// Where a group stands in the current step (FSDP2's `TrainingState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TrainingState {
    /// No training forward of the unit this step.
    Idle,
    /// Its forward ran, and none of its outputs tracks gradients.
    Forward,
    /// Its forward hooked outputs: backward will reach them and run the pre-backward.
    AwaitingBackward,
    /// Its pre-backward ran: gathered for backward, gradients arriving.
    Backward,
    /// Its post-backward ran: the step's gradients are reduced.
    Reduced,
}

/// The gradients a unit's backward has produced so far this step.
struct Gradients {
    /// Full gradients handed over by autograd, by parameter.
    arrived: Vec<Option<Tensor>>,
    /// How many parameters get a gradient (the frozen ones do not).
    trained: usize,
    /// Trained parameters whose gradient has not arrived yet.
    missing: usize,
    /// Hooked inputs of this step's forwards that the backward has not passed yet. Only
    /// a unit with frozen parameters hooks its inputs: what it computes from a frozen
    /// parameter and an input produces no parameter gradient, so only the input tells
    /// when that computation's backward, which reads the parameter, is done.
    inputs_pending: usize,
    /// Parts of gradients announced by a caller outside autograd (a pipeline's weight pass)
    /// and not delivered yet: the unit waits for them before it reduces.
    pledged: usize,
    /// Unsharded gradients kept from backward passes run without gradient sync.
    accumulated: Vec<Option<Tensor>>,
}

impl Gradients {
    fn new(params: usize, trained: usize) -> Self {
        Self {
            arrived: vec![None; params],
            trained,
            missing: trained,
            inputs_pending: 0,
            pledged: 0,
            accumulated: vec![None; params],
        }
    }

    /// Every gradient of the step has arrived, pledged parts included, and the backward
    /// passed every hooked input.
    fn complete(&self) -> bool {
        self.missing == 0 && self.pledged == 0 && self.inputs_pending == 0
    }

    /// Adds `grad` to parameter `param`'s gradient of this step.
    fn add(&mut self, param: usize, grad: &Tensor) -> Result<()> {
        self.arrived[param] = Some(match self.arrived[param].take() {
            None => {
                self.missing -= 1;
                grad.clone()
            }
            Some(earlier) => (earlier + grad)?,
        });
        Ok(())
    }

    /// Clears the step's gradients; the unsynced accumulation stays.
    fn reset_step(&mut self) {
        self.arrived.iter_mut().for_each(|g| *g = None);
        self.pledged = 0;
        self.inputs_pending = 0;
        self.missing = self.trained;
    }
}

struct GroupState {
    residency: Residency,
    training: TrainingState,
    grads: Gradients,
    /// A prefetch's all-gathers (one per dtype), not yet copied into the parameters.
    prefetched: Vec<Work>,
}

/// The ranks a unit talks to: those it is sharded over, and under hybrid sharding those
/// holding the same shards.
#[derive(Clone)]
pub(crate) struct UnitComms {
    pub shards: Arc<dyn Collectives>,
    pub replicas: Option<Arc<dyn Collectives>>,
}

pub(crate) struct ParamGroup {
    pub index: usize,
    pub name: String,
    pub params: Vec<ShardedParam>,
    /// The ranks this unit is sharded over and reduced across: the world, or the group
    /// given for it at wrap time (a size-1 group keeps a unit local to its rank).
    pub comm: Arc<dyn Collectives>,
    /// How many ranks the parameters are split over (1 without sharding).
    pub shard_world: usize,
    /// Under hybrid sharding, the ranks holding the same shards as this one (one per
    /// shard group), across which the reduced shard gradients are averaged.
    pub replicas: Option<Arc<dyn Collectives>>,
    /// Whether its training forwards keep only their inputs and its backward runs the
    /// forward again (activation checkpointing).
    pub checkpointed: std::sync::atomic::AtomicBool,
    /// Whether it can be checkpointed: not the root, and holding no other unit (a
    /// recomputed forward runs no hooks).
    pub checkpointable: bool,
    /// Whether gathers and reductions go through the collectives. Not over a group of
    /// one rank, where a gather is a copy of the shard and a reduction the gradient
    /// itself, unless the configuration asks for the collectives anyway.
    communicates: bool,
    /// Free the gathered parameters when the unit's forward ends (FULL_SHARD, not the root).
    reshard_after_forward: bool,
    /// Without sharding the full values are never released, only refreshed.
    keeps_full_values: bool,
    /// What each parameter's gradient is reduced in (the mixed-precision policy's
    /// `reduce_dtype`, or the parameter's own).
    reduce_dtypes: Vec<DType>,
    /// The parameters by the dtype they are gathered in, and by their shards' dtype (the
    /// full values): one collective each (see [`buckets`]).
    gather_buckets: Vec<(DType, Vec<usize>)>,
    shard_buckets: Vec<(DType, Vec<usize>)>,
    state: Mutex<GroupState>,
}

impl ParamGroup {
    /// A group over its sharded parameters, whose gathered nodes start out released
    /// (`release_initial` then marks it sharded).
    pub fn new(
        index: usize,
        name: String,
        params: Vec<ShardedParam>,
        comms: UnitComms,
        config: &FsdpConfig,
        is_root: bool,
    ) -> Self {
        let UnitComms { shards: comm, replicas } = comms;
        let shard_world = if config.strategy.shards() { comm.size() } else { 1 };
        let state = GroupState {
            residency: Residency::Unsharded,
            training: TrainingState::Idle,
            grads: Gradients::new(params.len(), params.iter().filter(|p| !p.frozen).count()),
            prefetched: Vec::new(),
        };
        let strategy = config.strategy;
        Self {
            index,
            name,
            communicates: config.communicates_over(comm.size()),
            comm,
            shard_world,
            replicas,
            checkpointed: std::sync::atomic::AtomicBool::new(false),
            checkpointable: false,
            reshard_after_forward: strategy == ShardingStrategy::FullShard && !is_root,
            keeps_full_values: !strategy.shards(),
            reduce_dtypes: params.iter().map(|p| config.mixed_precision.reduce_dtype_for(p.shard.dtype())).collect(),
            gather_buckets: buckets(&params, |p| p.gathered.dtype()),
            shard_buckets: buckets(&params, |p| p.shard.dtype()),
            params,
            state: Mutex::new(state),
        }
    }

    fn state(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn residency(&self) -> Residency {
        self.state().residency
    }

    pub fn training_state(&self) -> TrainingState {
        self.state().training
    }

    /// What errors about this unit's collectives call it.
    pub fn label(&self) -> String {
        format!("unit `{}`", self.name)
    }

    pub fn gathered_bytes(&self) -> usize {
        self.params.iter().map(|p| p.gathered_bytes()).sum()
    }

    /// Every rank of the group holds the parameters (and, after the reduction, their
    /// gradients) whole.
    pub fn replicates(&self) -> bool {
        self.keeps_full_values
    }

    /// This rank's position among the ranks that hold the same shards (0 without hybrid
    /// sharding): a shard is saved and counted once, by position 0.
    pub fn replica_rank(&self) -> usize {
        self.replicas.as_ref().map_or(0, |r| r.rank())
    }

    /// How many ranks hold the same shards (1 without hybrid sharding).
    pub fn replica_count(&self) -> usize {
        self.replicas.as_ref().map_or(1, |r| r.size())
    }

    /// This rank's position among the ranks the parameters are split over (0 without
    /// sharding, where every rank holds everything).
    pub fn shard_rank(&self) -> usize {
        if self.shard_world == 1 {
            0
        } else {
            self.comm.rank()
        }
    }

    fn specs(&self) -> Vec<ShardSpec> {
        self.params.iter().map(|p| p.spec).collect()
    }

    fn fail(&self, message: String) -> Error {
        Error::Unit { rank: self.comm.global_rank(), unit: self.name.clone(), message }
    }

    /// Frees the full values the group was built with: from now on it is gathered when it
    /// runs. Without sharding the values stay (and are counted once as gathered memory),
    /// refreshed from the parameters at the first forward, which so sees any change made
    /// to them after wrapping.
    pub fn release_initial(&self, recorders: &Recorders) -> Result<()> {
        if self.keeps_full_values {
            recorders.memory.allocated(self.gathered_bytes());
        } else {
            self.free()?;
        }
        self.state().residency = Residency::Sharded;
        Ok(())
    }

    /// Gathers the full parameters unless they are gathered already. A prefetch only
    /// issues the all-gather; the first use (not a prefetch) of prefetched parameters
    /// copies them out of it and marks them used.
    pub fn unshard(&self, cause: UnshardCause, recorders: &Recorders) -> Result<()> {
        {
            let mut state = self.state();
            match state.residency {
                Residency::Unsharded => return Ok(()),
                Residency::Prefetched => {
                    if cause.is_prefetch() {
                        return Ok(());
                    }
                    state.residency = Residency::Unsharded;
                    let prefetched = std::mem::take(&mut state.prefetched);
                    drop(state);
                    return self.fill_gathered(prefetched);
                }
                Residency::Sharded => {}
            }
        }
        let _span = tracing::debug_span!("unshard", unit = %self.name, ?cause).entered();
        let gathering = self.start_gather()?;
        if !self.keeps_full_values {
            recorders.memory.allocated(self.gathered_bytes());
        }
        recorders.trace.record(TraceEvent::Unshard { unit: self.name.clone(), cause });
        if cause.is_prefetch() {
            let mut state = self.state();
            state.residency = Residency::Prefetched;
            state.prefetched = gathering;
            return Ok(());
        }
        self.state().residency = Residency::Unsharded;
        self.fill_gathered(gathering)
    }

    /// Releases the gathered parameters unless they are released already (without
    /// sharding: marks them for a refresh).
    pub fn reshard(&self, recorders: &Recorders) -> Result<()> {
        let unused_prefetch = {
            let mut state = self.state();
            if state.residency == Residency::Sharded {
                return Ok(());
            }
            state.residency = Residency::Sharded;
            std::mem::take(&mut state.prefetched)
        };
        for work in unused_prefetch {
            // The peers joined this all-gather: complete it, and let its output go.
            work.wait()?;
        }
        if self.keeps_full_values {
            return Ok(());
        }
        self.free()?;
        recorders.memory.freed(self.gathered_bytes());
        recorders.trace.record(TraceEvent::Reshard { unit: self.name.clone() });
        Ok(())
    }

    /// Ends the unit's forward: records whether backward will come through its outputs
    /// (`hooked`), and frees the parameters under FULL_SHARD.
    pub fn post_forward(&self, hooked: bool, recorders: &Recorders) -> Result<()> {
        {
            let mut state = self.state();
            state.training = match state.training {
                TrainingState::Idle | TrainingState::Forward if hooked => TrainingState::AwaitingBackward,
                TrainingState::Idle => TrainingState::Forward,
                // A second call in one forward keeps the first call's hooks; a forward
                // inside backward changes nothing about the step's backward.
                other => other,
            };
        }
        if self.reshard_after_forward {
            self.reshard(recorders)?;
        }
        Ok(())
    }

    /// Whether a backward prefetch should gather this unit: its backward is still to
    /// come and no prefetch gathered it already.
    pub fn wants_backward_prefetch(&self) -> bool {
        let state = self.state();
        state.training == TrainingState::AwaitingBackward && state.residency != Residency::Prefetched
    }

    /// The unit's backward starts: gathers it for the gradient computation. Returns
    /// `false` when its pre-backward already ran this step.
    pub fn pre_backward(&self, recorders: &Recorders) -> Result<bool> {
        {
            let mut state = self.state();
            if matches!(state.training, TrainingState::Backward | TrainingState::Reduced) {
                return Ok(false);
            }
            state.training = TrainingState::Backward;
        }
        recorders.trace.record(TraceEvent::PreBackward { unit: self.name.clone() });
        self.unshard(UnshardCause::Backward, recorders)?;
        Ok(true)
    }

    /// Autograd's gradient of parameter `param`; `true` when it was the last one missing.
    pub fn deposit(&self, param: usize, grad: &Tensor) -> Result<bool> {
        let mut state = self.state();
        self.check_accepts_gradient(&state, param)?;
        state.grads.add(param, grad)?;
        Ok(state.grads.complete())
    }

    /// Whether some of its parameters are frozen: its training forwards hook their inputs
    /// (see [`ParamGroup::expect_input_pass`]).
    pub fn has_frozen(&self) -> bool {
        self.params.iter().any(|p| p.frozen)
    }

    /// A training forward hooked one of the unit's inputs: the unit reduces only after the
    /// backward passed it.
    pub fn expect_input_pass(&self) {
        self.state().grads.inputs_pending += 1;
    }

    /// The backward passed a hooked input; `true` when nothing is missing any more. After
    /// the unit's gradients were reduced (a forward's input the backward reached late, or
    /// never used) it changes nothing.
    pub fn input_passed(&self) -> bool {
        let mut state = self.state();
        if !matches!(state.training, TrainingState::AwaitingBackward | TrainingState::Backward) {
            return false;
        }
        state.grads.inputs_pending = state.grads.inputs_pending.saturating_sub(1);
        state.grads.complete()
    }

    /// A caller outside autograd will deliver one more part of a gradient this step: the
    /// unit waits for it before it reduces.
    pub fn pledge_gradient(&self) {
        self.state().grads.pledged += 1;
    }

    /// A pledged part of parameter `param`'s gradient; `true` when nothing is missing any
    /// more.
    pub fn deposit_pledged(&self, param: usize, grad: &Tensor) -> Result<bool> {
        let mut state = self.state();
        self.check_accepts_gradient(&state, param)?;
        if state.grads.pledged == 0 {
            let fqn = &self.params[param].fqn;
            return Err(self.fail(format!("a part of the gradient of `{fqn}` arrived that nothing announced")));
        }
        state.grads.pledged -= 1;
        state.grads.add(param, grad)?;
        Ok(state.grads.complete())
    }

    fn check_accepts_gradient(&self, state: &GroupState, param: usize) -> Result<()> {
        let fqn = &self.params[param].fqn;
        match state.training {
            TrainingState::Reduced => {
                Err(self.fail(format!("gradient of `{fqn}` arrived after the unit's gradients were reduced")))
            }
            TrainingState::Idle => Err(self.fail(format!(
                "gradient of `{fqn}` arrived, but the unit ran no training forward this step \
                 (a backward through values read in `summon_full_params` or outside `Fsdp::forward`?)"
            ))),
            TrainingState::Forward | TrainingState::AwaitingBackward | TrainingState::Backward => Ok(()),
        }
    }

    /// Ends the unit's backward: reduces the step's gradients (or, without gradient sync,
    /// adds them to the unsharded accumulation) and frees the parameters. Returns this
    /// rank's shard gradients by parameter, or `None` when the post-backward already ran.
    pub fn post_backward(&self, sync: bool, recorders: &Recorders) -> Result<Option<Vec<(usize, Tensor)>>> {
        let grads = {
            let mut state = self.state();
            if state.training == TrainingState::Reduced {
                return Ok(None);
            }
            state.training = TrainingState::Reduced;
            let grads = &mut state.grads;
            let mut ready = Vec::new();
            for i in 0..self.params.len() {
                // Summed over steps in the reduce dtype, not the (lower) compute dtype.
                let arrived = grads.arrived[i].take().map(|g| g.to_dtype(self.reduce_dtypes[i])).transpose()?;
                let total = match (grads.accumulated[i].take(), arrived) {
                    (Some(acc), Some(new)) => Some((acc + new)?),
                    (acc, new) => acc.or(new),
                };
                match total {
                    Some(total) if sync => ready.push((i, total)),
                    total => grads.accumulated[i] = total,
                }
            }
            ready
        };
        // The parameters are not needed for the reduction: free them before it allocates.
        self.reshard(recorders)?;
        let reduced = if grads.is_empty() {
            Vec::new()
        } else {
            let params = grads.len();
            let reduced = self.reduce(grads)?;
            recorders.trace.record(TraceEvent::ReduceGrads { unit: self.name.clone(), params });
            reduced
        };
        recorders.trace.record(TraceEvent::PostBackward { unit: self.name.clone() });
        Ok(Some(reduced))
    }

    /// Ends the step: the next forward starts afresh.
    pub fn finish_step(&self) {
        let mut state = self.state();
        state.training = TrainingState::Idle;
        state.grads.reset_step();
    }

    /// The full value of every parameter, gathered into fresh tensors (a collective over
    /// the unit's group), leaving the gathered nodes as they are.
    pub fn full_values(&self) -> Result<Vec<Tensor>> {
        let mut values = vec![None; self.params.len()];
        for (bucket, gathered) in self.gather_full_values()? {
            let shapes: Vec<Shape> = bucket.iter().map(|&i| self.params[i].shape.clone()).collect();
            let full = unflatten_gathered(&self.specs_of(&bucket), &shapes, &gathered, self.shard_world)?;
            for (i, value) in bucket.into_iter().zip(full) {
                values[i] = Some(value);
            }
        }
        Ok(values.into_iter().map(|v| v.expect("every parameter is in a bucket")).collect())
    }

    /// Every parameter's full value as pieces of the gathered buffers (a collective over
    /// the unit's group, one per dtype): views, in order, that together hold the
    /// parameter's elements. No more than the unit's full size is allocated, which lets an
    /// export write a unit without a second copy of it.
    pub fn full_value_pieces(&self) -> Result<Vec<Vec<Tensor>>> {
        let mut pieces = vec![Vec::new(); self.params.len()];
        for (bucket, gathered) in self.gather_full_values()? {
            let specs = self.specs_of(&bucket);
            for (i, ranges) in bucket.into_iter().zip(gathered_ranges(&specs, self.shard_world)) {
                pieces[i] = ranges
                    .into_iter()
                    .map(|(start, len)| gathered.narrow(0, start, len))
                    .collect::<candle_core::Result<Vec<_>>>()?;
            }
        }
        Ok(pieces)
    }

    /// Copies this rank's part of the gathered parameters, as they are now (edited in
    /// place while summoned), into its shards: the next gather sees the edit. Gathered in
    /// a lower precision than the shards, only the elements the edit changed are copied:
    /// the others keep their full precision.
    pub fn write_back_gathered(&self) -> Result<()> {
        for param in &self.params {
            let edited = param.spec.shard_of(&param.gathered, self.shard_rank())?;
            let shard = param.shard.as_tensor();
            let value = if edited.dtype() == shard.dtype() {
                edited
            } else {
                let changed = edited.ne(&shard.to_dtype(edited.dtype())?)?;
                changed.where_cond(&edited.to_dtype(shard.dtype())?, shard)?
            };
            param.shard.set(&value)?;
        }
        Ok(())
    }

    /// Per dtype of the shards, the parameters of that dtype and the rank-major buffer of
    /// every rank's shards of them, fresh (it does not alias the shards the optimizer
    /// keeps stepping).
    fn gather_full_values(&self) -> Result<Vec<(Vec<usize>, Tensor)>> {
        self.shard_buckets
            .iter()
            .map(|(dtype, bucket)| {
                let flat = self.flat_shards(bucket, *dtype)?;
                let gathered = if self.gathers_by_collective() {
                    self.comm.all_gather(&flat, &format!("full parameters of {}", self.label()))?.wait()?
                } else {
                    flat.copy()?
                };
                Ok((bucket.clone(), gathered.detach()))
            })
            .collect()
    }

    fn specs_of(&self, bucket: &[usize]) -> Vec<ShardSpec> {
        bucket.iter().map(|&i| self.params[i].spec).collect()
    }

    /// An all-gather input: this rank's shards of `bucket`, concatenated, in `dtype` (each
    /// cast first, so no full-precision copy of the whole is made).
    fn flat_shards(&self, bucket: &[usize], dtype: DType) -> Result<Tensor> {
        let shards =
            bucket.iter().map(|&i| self.params[i].shard.to_dtype(dtype)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&shards, 0)?)
    }

    /// The parameters are gathered by an all-gather over the group, not copied from the
    /// rank's own shards.
    fn gathers_by_collective(&self) -> bool {
        !self.keeps_full_values && self.communicates
    }

    /// Starts gathering the parameters: issues the all-gathers (one per compute dtype)
    /// and returns them, or, when the rank holds them whole, refills the gathered nodes
    /// from the shards and returns none.
    fn start_gather(&self) -> Result<Vec<Work>> {
        if !self.gathers_by_collective() {
            for param in &self.params {
                let dtype = param.gathered.dtype();
                let fill = Fill { source: param.shard.to_dtype(dtype)?, ranges: vec![(0, param.spec.numel)], dtype };
                param.gathered.inplace_op1(&fill)?;
            }
            return Ok(Vec::new());
        }
        self.gather_buckets
            .iter()
            .map(|(dtype, bucket)| Ok(self.comm.all_gather(&self.flat_shards(bucket, *dtype)?, &self.label())?))
            .collect()
    }

    /// Refills the gathered nodes from the all-gathers `works` (in the order
    /// [`ParamGroup::start_gather`] issued them), each node with one copy.
    fn fill_gathered(&self, works: Vec<Work>) -> Result<()> {
        for ((_, bucket), work) in self.gather_buckets.iter().zip(works) {
            let full = work.wait()?;
            let ranges = gathered_ranges(&self.specs_of(bucket), self.shard_world);
            for (&i, ranges) in bucket.iter().zip(ranges) {
                let param = &self.params[i];
                param.gathered.inplace_op1(&Fill { source: full.clone(), ranges, dtype: param.gathered.dtype() })?;
            }
        }
        Ok(())
    }

    fn free(&self) -> Result<()> {
        for param in &self.params {
            param.gathered.inplace_op1(&Free)?;
        }
        Ok(())
    }

    /// Averages the gradients (in the reduce dtype, as `post_backward` hands them over)
    /// over the ranks (one collective per reduce dtype, and under hybrid sharding a second
    /// across the replicas) and returns this rank's shard of each, by parameter index, in
    /// the shards' dtype. Parameters without a gradient get none, as in a plain backward.
    fn reduce(&self, grads: Vec<(usize, Tensor)>) -> Result<Vec<(usize, Tensor)>> {
        let shard_dtype = |i: usize| self.params[i].shard.dtype();
        if !self.communicates && self.replicas.is_none() {
            // Averaging over one rank changes nothing: no packing, no collective.
            return grads.into_iter().map(|(i, grad)| Ok((i, grad.flatten_all()?.to_dtype(shard_dtype(i))?))).collect();
        }
        let mut by_dtype: Vec<Vec<(usize, Tensor)>> = Vec::new();
        for (i, grad) in grads {
            match by_dtype.iter_mut().find(|b| b[0].1.dtype() == grad.dtype()) {
                Some(bucket) => bucket.push((i, grad)),
                None => by_dtype.push(vec![(i, grad)]),
            }
        }
        let specs = self.specs();
        let mut out = Vec::new();
        for bucket in by_dtype {
            let packed = pack_for_reduce_scatter(&specs, &bucket, self.shard_world)?;
            let params: Vec<usize> = bucket.iter().map(|(i, _)| *i).collect();
            // The full gradients are in the packed buffer now: not two copies during the call.
            drop(bucket);
            let mut reduced = if !self.communicates {
                packed
            } else if self.keeps_full_values {
                self.comm.all_reduce(&packed, ReduceOp::Avg, &self.label())?.wait()?
            } else {
                self.comm.reduce_scatter(&packed, ReduceOp::Avg, &self.label())?.wait()?
            };
            if let Some(replicas) = &self.replicas {
                // Every shard group averaged over equally many ranks: the mean of the means is
                // the mean over the world.
                let label = format!("{} across its replicas", self.label());
                reduced = replicas.all_reduce(&reduced, ReduceOp::Avg, &label)?.wait()?;
            }
            for (i, grad) in split_reduced(&specs, &params, &reduced)? {
                out.push((i, grad.to_dtype(shard_dtype(i))?));
            }
        }
        Ok(out)
    }
}

/// The parameters grouped by `dtype_of` them, each group in parameter order, the groups in
/// the order of their first parameter. A unit whose parameters differ in dtype (f32
/// adapters on a bf16 base) moves each dtype's in a collective of its own.
fn buckets(params: &[ShardedParam], dtype_of: impl Fn(&ShardedParam) -> DType) -> Vec<(DType, Vec<usize>)> {
    let mut buckets: Vec<(DType, Vec<usize>)> = Vec::new();
    for (i, param) in params.iter().enumerate() {
        let dtype = dtype_of(param);
        match buckets.iter_mut().find(|(d, _)| *d == dtype) {
            Some((_, bucket)) => bucket.push(i),
            None => buckets.push((dtype, vec![i])),
        }
    }
    buckets
}
