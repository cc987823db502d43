//! The runtime state of one rank: its communicator, its units, and the bookkeeping of the
//! current step (which units ran forward and in what order, which prefetches are in
//! flight). It sequences every unit's gathers, frees and reductions, and it is what the
//! autograd ops call back into during backward.
//!
//! The order of events follows PyTorch FSDP1 (spec §1.4): a unit's pre-backward gathers
//! it if needed and, under `BACKWARD_PRE`, prefetches the unit that ended its forward just
//! before it; its post-backward reduces its gradients, frees it and, under
//! `BACKWARD_POST`, makes the same prefetch. A prefetch targets a unit only if that unit
//! still needs its pre-backward gather and was not prefetched already.

use crate::activations::Activations;
use crate::collectives::Collectives;
use crate::config::{BackwardPrefetch, FsdpConfig, OrderCheck, ShardingStrategy};
use crate::error::{Error, Result};
use crate::memory::MemoryTracker;
use crate::ops::{BackwardHook, GradSink, LiveHook};
use crate::sharded_unit::ShardedUnit;
use crate::trace::{Trace, TraceEvent, UnshardCause};
use candle_core::Tensor;
use candle_core::{TensorId, Var};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// The unit of parameters that sit in no `Unit`.
pub(crate) const ROOT: usize = 0;

/// The bookkeeping of the current step.
#[derive(Default)]
struct Step {
    /// Units in the order their forward started (first start only).
    forward_seen: Vec<usize>,
    /// Units in the order their forward ended (first end only).
    post_forward_order: Vec<usize>,
    order_mismatch_reported: bool,
    prefetches_in_flight: usize,
    /// Reduced shard gradients of this step: (unit, parameter, gradient).
    reduced: Vec<(usize, usize, Tensor)>,
}

pub(crate) struct RankState {
    pub comm: Arc<dyn Collectives>,
    pub config: FsdpConfig,
    pub units: Vec<ShardedUnit>,
    /// The static forward order of units, expanded for this model.
    pub forward_order: Vec<usize>,
    pub trace: Trace,
    pub memory: MemoryTracker,
    /// Whether backward reduces gradients; when off they accumulate unsharded per rank.
    pub gradient_sync: AtomicBool,
    /// While on, forwards attach no backward hooks and free the root at the end.
    pub inference: AtomicBool,
    /// Backward hooks attached to outputs and not yet dropped with their graphs.
    pub live_hooks: Arc<AtomicUsize>,
    /// How many backward passes have finished. Hooks carry the value of their forward, so
    /// a backward through the outputs of a finished step (whose gathered parameters are
    /// freed and whose bookkeeping is gone) is refused instead of run.
    generation: AtomicU64,
    post_accumulate_hooks: Mutex<Vec<(usize, usize, PostAccumulateHook)>>,
    /// (unit, parameter) of each gathered node, for gradients computed outside candle's
    /// backward walk (a pipeline stage's deferred weight pass).
    gathered_index: HashMap<TensorId, (usize, usize)>,
    step: Mutex<Step>,
    this: Weak<RankState>,
}

/// Called with a parameter's shard and its reduced shard gradient, right after the
/// gradient is computed in backward (PyTorch's post-accumulate-grad hook).
pub type PostAccumulateHook = Box<dyn FnMut(&Var, &Tensor) -> candle_core::Result<()> + Send>;

impl RankState {
    pub fn new(
        comm: Arc<dyn Collectives>,
        config: FsdpConfig,
        forward_order: Vec<usize>,
        build_units: impl FnOnce(Weak<dyn GradSink>) -> Result<Vec<ShardedUnit>>,
    ) -> Result<Arc<Self>> {
        let mut failure = None;
        let state = Arc::new_cyclic(|this: &Weak<RankState>| {
            let sink: Weak<dyn GradSink> = this.clone();
            let units = build_units(sink).unwrap_or_else(|e| {
                failure = Some(e);
                Vec::new()
            });
            let gathered_index = units
                .iter()
                .flat_map(|u| u.params.iter().enumerate().map(move |(p, param)| (param.gathered.id(), (u.index, p))))
                .collect();
            RankState {
                gathered_index,
                comm,
                config,
                units,
                forward_order,
                trace: Trace::default(),
                memory: MemoryTracker::default(),
                gradient_sync: AtomicBool::new(true),
                inference: AtomicBool::new(false),
                live_hooks: Arc::new(AtomicUsize::new(0)),
                generation: AtomicU64::new(0),
                post_accumulate_hooks: Mutex::new(Vec::new()),
                step: Mutex::new(Step::default()),
                this: this.clone(),
            }
        });
        match failure {
            Some(error) => Err(error),
            None => Ok(state),
        }
    }

    fn step(&self) -> std::sync::MutexGuard<'_, Step> {
        self.step.lock().expect("step lock")
    }

    pub fn rank(&self) -> usize {
        self.comm.global_rank()
    }

    fn fail(&self, unit: usize, message: String) -> Error {
        Error::Rank { rank: self.rank(), message: format!("unit `{}`: {message}", self.units[unit].name) }
    }

    /// Frees the full values the units were built with: from now on a unit is gathered
    /// when it runs. Without sharding the values stay, as the parameters themselves, but
    /// are refreshed from the parameters at the first forward, which so sees any change
    /// made to them after wrapping.
    pub fn release_initial(&self) -> Result<()> {
        for unit in &self.units {
            if self.config.strategy == ShardingStrategy::NoShard {
                self.memory.allocated(unit.gathered_bytes());
            } else {
                unit.free()?;
            }
            unit.flags().gathered = false;
        }
        Ok(())
    }

    /// Gathers `unit` unless it is gathered already.
    fn unshard(&self, unit: usize, cause: UnshardCause) -> Result<()> {
        let target = &self.units[unit];
        {
            let mut flags = target.flags();
            if flags.gathered {
                if flags.prefetched && matches!(cause, UnshardCause::Forward | UnshardCause::Backward) {
                    flags.prefetched = false;
                    drop(flags);
                    self.step().prefetches_in_flight -= 1;
                }
                return Ok(());
            }
        }
        let _span = tracing::debug_span!("unshard", unit = %target.name, ?cause).entered();
        target.gather()?;
        // Without sharding the gathered values were never released: a gather refreshes
        // them from the parameters the optimizer stepped.
        if self.config.strategy != ShardingStrategy::NoShard {
            self.memory.allocated(target.gathered_bytes());
        }
        let mut flags = target.flags();
        flags.gathered = true;
        if matches!(cause, UnshardCause::ForwardPrefetch | UnshardCause::BackwardPrefetch) {
            flags.prefetched = true;
            drop(flags);
            self.step().prefetches_in_flight += 1;
        }
        self.trace.record(TraceEvent::Unshard { unit: target.name.clone(), cause });
        Ok(())
    }

    /// Frees `unit`'s gathered parameters unless they are freed already.
    fn reshard(&self, unit: usize) -> Result<()> {
        let target = &self.units[unit];
        {
            let mut flags = target.flags();
            if !flags.gathered {
                return Ok(());
            }
            flags.gathered = false;
            if std::mem::take(&mut flags.prefetched) {
                drop(flags);
                self.step().prefetches_in_flight -= 1;
            }
        }
        target.free()?;
        self.memory.freed(target.gathered_bytes());
        self.trace.record(TraceEvent::Reshard { unit: target.name.clone() });
        Ok(())
    }

    /// Forward prefetches wait while this many units are gathered ahead of use.
    fn may_prefetch(&self) -> bool {
        self.step().prefetches_in_flight < self.config.max_prefetch_in_flight
    }

    pub fn pre_forward(&self, unit: usize) -> Result<()> {
        self.check_order(unit)?;
        self.unshard(unit, UnshardCause::Forward)?;
        if self.config.forward_prefetch {
            let position = self.forward_order.iter().position(|&u| u == unit);
            let next = position.and_then(|p| self.forward_order.get(p + 1)).copied();
            if let Some(next) = next {
                if !self.units[next].flags().gathered && self.may_prefetch() {
                    self.unshard(next, UnshardCause::ForwardPrefetch)?;
                }
            }
        }
        Ok(())
    }

    /// Compares the units' actual forward order with the static one.
    fn check_order(&self, unit: usize) -> Result<()> {
        let mut step = self.step();
        if step.forward_seen.contains(&unit) {
            return Ok(());
        }
        let position = step.forward_seen.len();
        step.forward_seen.push(unit);
        let expected = self.forward_order.get(position).copied();
        if expected == Some(unit) || step.order_mismatch_reported {
            return Ok(());
        }
        step.order_mismatch_reported = true;
        let expected_name = expected.map(|u| self.units[u].name.as_str()).unwrap_or("<none>");
        let message = format!(
            "unit `{}` started its forward at position {position}, where the static order has `{expected_name}`",
            self.units[unit].name
        );
        match self.config.order_check {
            OrderCheck::Warn => {
                tracing::warn!(rank = self.rank(), "{message}; prefetching will target the wrong units this step");
                Ok(())
            }
            OrderCheck::Strict => Err(Error::Rank { rank: self.rank(), message }),
        }
    }

    /// Ends `unit`'s forward: frees it under FULL_SHARD (not the root), records the
    /// post-forward order and hooks the outputs for the pre-backward.
    pub fn post_forward<R: Activations>(&self, unit: usize, outputs: R) -> Result<R> {
        {
            let mut step = self.step();
            if !step.post_forward_order.contains(&unit) {
                step.post_forward_order.push(unit);
            }
        }
        if self.config.strategy == ShardingStrategy::FullShard && unit != ROOT {
            self.reshard(unit)?;
        }
        if self.inference.load(Ordering::Relaxed) {
            return Ok(outputs.map_tensors(&mut |tensor| Ok(tensor.detach()))?);
        }
        let mut hooked = false;
        let outputs = outputs.map_tensors(&mut |tensor| {
            if !tensor.track_op() {
                return Ok(tensor);
            }
            hooked = true;
            let sink: Weak<dyn GradSink> = self.this.clone();
            let hook = BackwardHook {
                sink: Some(sink),
                unit,
                generation: self.generation.load(Ordering::Relaxed),
                _live: Some(LiveHook::new(&self.live_hooks)),
            };
            tensor.broadcast_add(&tensor.apply_op1(hook)?)
        })?;
        self.units[unit].flags().needs_pre_backward_unshard |= hooked;
        Ok(outputs)
    }

    /// Ties a unit's inputs into its first input tensor, so that candle's backward walk
    /// (a depth-first order from the loss) reaches every input, and what produced it, only
    /// after the unit's own parameters: their gradients are then complete, and the unit's
    /// post-backward runs, before the backward of the units that produced its inputs.
    /// Without this, a unit whose second input comes from far back (a decoder layer's
    /// encoder memory) would keep its parameters gathered through that whole backward.
    pub fn bind_inputs<I: Activations>(&self, inputs: I) -> Result<I> {
        let mut tensors = Vec::new();
        inputs.for_each_tensor(&mut |t| tensors.push(t.clone()));
        let Some((first, rest)) = tensors.split_first() else {
            return Ok(inputs);
        };
        let mut anchor: Option<Tensor> = None;
        for other in rest.iter().filter(|t| t.track_op() && t.id() != first.id()) {
            let hook = BackwardHook { sink: None, unit: ROOT, generation: 0, _live: None };
            let zero = other.apply_op1(hook)?.to_dtype(first.dtype())?;
            anchor = Some(match anchor {
                None => zero,
                Some(sum) => (sum + zero)?,
            });
        }
        let Some(anchor) = anchor else {
            return Ok(inputs);
        };
        let first_id = first.id();
        let mut bound = false;
        Ok(inputs.map_tensors(&mut |t| {
            if !bound && t.id() == first_id {
                bound = true;
                t.broadcast_add(&anchor)
            } else {
                Ok(t)
            }
        })?)
    }

    /// The unit prefetched in backward after `unit`: the one that ended its forward just
    /// before it this step, if that one still needs its pre-backward gather.
    fn backward_prefetch(&self, unit: usize) -> Result<()> {
        let target = {
            let step = self.step();
            let position = step.post_forward_order.iter().position(|&u| u == unit);
            position.and_then(|p| p.checked_sub(1)).map(|p| step.post_forward_order[p])
        };
        let target = target.filter(|&t| {
            let flags = self.units[t].flags();
            flags.needs_pre_backward_unshard && !flags.prefetched
        });
        self.trace.record(TraceEvent::BackwardPrefetch {
            unit: self.units[unit].name.clone(),
            target: target.map(|t| self.units[t].name.clone()),
        });
        if let Some(target) = target {
            self.unshard(target, UnshardCause::BackwardPrefetch)?;
        }
        Ok(())
    }

    fn run_pre_backward(&self, unit: usize) -> Result<()> {
        let needs_unshard = {
            let mut flags = self.units[unit].flags();
            if flags.ran_pre_backward {
                return Ok(());
            }
            flags.ran_pre_backward = true;
            std::mem::take(&mut flags.needs_pre_backward_unshard)
        };
        self.trace.record(TraceEvent::PreBackward { unit: self.units[unit].name.clone() });
        if needs_unshard {
            self.unshard(unit, UnshardCause::Backward)?;
        }
        if self.config.backward_prefetch == BackwardPrefetch::Pre {
            self.backward_prefetch(unit)?;
        }
        Ok(())
    }

    /// Reduces `unit`'s gradients (or, without gradient sync, adds them to the unit's
    /// unsharded accumulation), frees it, and (under `BACKWARD_POST`) prefetches.
    fn run_post_backward(&self, unit: usize) -> Result<()> {
        let target = &self.units[unit];
        let sync = self.gradient_sync.load(Ordering::Relaxed);
        let grads: Vec<(usize, Tensor)> = {
            let mut flags = target.flags();
            if flags.ran_post_backward {
                return Ok(());
            }
            flags.ran_post_backward = true;
            let mut grads = Vec::new();
            for i in 0..target.params.len() {
                let fresh = flags.grads[i].take();
                let total = match (flags.accumulated[i].take(), fresh) {
                    (Some(acc), Some(new)) => Some((acc + new)?),
                    (acc, new) => acc.or(new),
                };
                match total {
                    Some(total) if sync => grads.push((i, total)),
                    total => flags.accumulated[i] = total,
                }
            }
            grads
        };
        if !grads.is_empty() {
            let params = grads.len();
            let reduced = target.reduce(grads)?;
            self.trace.record(TraceEvent::ReduceGrads { unit: target.name.clone(), params });
            self.run_post_accumulate_hooks(unit, &reduced)?;
            self.step().reduced.extend(reduced.into_iter().map(|(p, g)| (unit, p, g)));
        }
        if self.config.strategy != ShardingStrategy::NoShard {
            self.reshard(unit)?;
        }
        self.trace.record(TraceEvent::PostBackward { unit: target.name.clone() });
        if self.config.backward_prefetch == BackwardPrefetch::Post {
            self.backward_prefetch(unit)?;
        }
        Ok(())
    }

    pub fn register_post_accumulate_hook(&self, unit: usize, param: usize, hook: PostAccumulateHook) {
        self.post_accumulate_hooks.lock().expect("hooks lock").push((unit, param, hook));
    }

    fn run_post_accumulate_hooks(&self, unit: usize, reduced: &[(usize, Tensor)]) -> Result<()> {
        let mut hooks = self.post_accumulate_hooks.lock().expect("hooks lock");
        for (param, grad) in reduced {
            let shard = &self.units[unit].params[*param].shard;
            for (_, _, hook) in hooks.iter_mut().filter(|(u, p, _)| *u == unit && p == param) {
                hook(shard, grad)?;
            }
        }
        Ok(())
    }

    /// Ends a pipeline input pass: the weight pass needs no gathered parameter, so every
    /// unit is freed; the step's bookkeeping stays for the gradients still to come.
    pub fn finish_input_pass(&self) -> Result<()> {
        if self.config.strategy != ShardingStrategy::NoShard {
            for unit in 0..self.units.len() {
                self.reshard(unit)?;
            }
        }
        Ok(())
    }

    /// Whether a training forward ran since the last backward: its outputs may still be
    /// backpropagated, so the step's bookkeeping must survive an inference forward.
    pub fn training_step_pending(&self) -> bool {
        !self.step().post_forward_order.is_empty()
    }

    /// Ends an inference forward: nothing waits for its backward, so every unit, the root
    /// too, is freed (without sharding the values stay, marked for a refresh from the
    /// parameters as after backward). Unless a training forward is `pending`, the step
    /// starts over; if one is, its bookkeeping stays, and its backward gathers again what
    /// the inference freed.
    pub fn finish_inference(&self, pending: bool) -> Result<()> {
        for unit in 0..self.units.len() {
            if self.config.strategy == ShardingStrategy::NoShard {
                self.units[unit].flags().gathered = false;
            } else {
                self.reshard(unit)?;
            }
        }
        if !pending {
            for unit in &self.units {
                unit.flags().needs_pre_backward_unshard = false;
            }
            *self.step() = Step::default();
        }
        Ok(())
    }

    /// Runs the post-backward of every unit whose gradients did not all arrive (unused
    /// outputs or parameters), the root's last, resets the step and returns the reduced
    /// shard gradients as (unit, parameter, gradient).
    pub fn finish_backward(&self) -> Result<Vec<(usize, usize, Tensor)>> {
        let order: Vec<usize> = self.step().post_forward_order.clone();
        for &unit in order.iter().rev().filter(|&&u| u != ROOT) {
            self.run_post_backward(unit)?;
        }
        if order.contains(&ROOT) {
            self.run_post_backward(ROOT)?;
        }
        // Units gathered but never run (a prefetch the step did not use) are freed too.
        // Without sharding they stay, marked for a refresh after the optimizer step.
        for unit in 0..self.units.len() {
            if self.config.strategy == ShardingStrategy::NoShard {
                self.units[unit].flags().gathered = false;
            } else {
                self.reshard(unit)?;
            }
        }
        for unit in &self.units {
            let mut flags = unit.flags();
            flags.ran_pre_backward = false;
            flags.ran_post_backward = false;
            flags.needs_pre_backward_unshard = false;
            flags.grads.iter_mut().for_each(|g| *g = None);
            flags.deferred.iter_mut().for_each(|d| *d = false);
            flags.grads_pending = unit.params.len();
        }
        let mut step = self.step();
        let reduced = std::mem::take(&mut step.reduced);
        *step = Step::default();
        self.generation.fetch_add(1, Ordering::Relaxed);
        Ok(reduced)
    }
}

/// Autograd's calls arrive as candle errors; keep the runtime's message.
fn to_candle(error: Error) -> candle_core::Error {
    candle_core::Error::Msg(error.to_string())
}

impl GradSink for RankState {
    fn deposit(&self, unit: usize, param: usize, grad: &Tensor) -> candle_core::Result<()> {
        let complete = {
            let mut flags = self.units[unit].flags();
            if flags.ran_post_backward {
                return Err(to_candle(self.fail(
                    unit,
                    format!("gradient of `{}` arrived after the unit's gradients were reduced", self.units[unit].params[param].fqn),
                )));
            }
            // Normally one call per parameter and backward; a pipeline weight pass may add
            // the deferred part of a gradient whose other part autograd delivered.
            match flags.grads[param].take() {
                None => {
                    flags.grads[param] = Some(grad.clone());
                    flags.grads_pending -= 1;
                }
                Some(earlier) => flags.grads[param] = Some((earlier + grad)?),
            }
            flags.complete()
        };
        // The root's gradients are reduced at the end of backward, like PyTorch's root.
        if complete && unit != ROOT {
            self.run_post_backward(unit).map_err(to_candle)?;
        }
        Ok(())
    }

    fn pre_backward(&self, unit: usize, generation: u64) -> candle_core::Result<()> {
        if generation != self.generation.load(Ordering::Relaxed) {
            let message = "backward reached the outputs of a forward whose backward already ran; its gathered \
                           parameters are freed and its gradients reduced. Run the forward again for another backward";
            return Err(to_candle(self.fail(unit, message.to_string())));
        }
        self.run_pre_backward(unit).map_err(to_candle)
    }
}

impl RankState {
    fn param_of(&self, weight: &Tensor) -> Result<(usize, usize)> {
        self.gathered_index.get(&weight.id()).copied().ok_or_else(|| Error::Rank {
            rank: self.rank(),
            message: format!("a deferred gradient for a {:?} tensor that is no parameter of this model", weight.shape()),
        })
    }
}

impl crate::pipeline::DeferredGradSink for RankState {
    fn owns(&self, weight: &Tensor) -> bool {
        self.gathered_index.contains_key(&weight.id())
    }

    fn expect(&self, weight: &Tensor) -> Result<()> {
        let (unit, param) = self.param_of(weight)?;
        self.units[unit].flags().deferred[param] = true;
        Ok(())
    }

    /// The weight pass's part of a gradient: added to what the input pass delivered, and
    /// the unit is reduced at once if nothing else is missing.
    fn deposit(&self, weight: &Tensor, grad: &Tensor) -> Result<()> {
        let (unit, param) = self.param_of(weight)?;
        let complete = {
            let mut flags = self.units[unit].flags();
            if flags.ran_post_backward {
                return Err(self.fail(unit, format!("deferred gradient of `{}` arrived after the unit was reduced", self.units[unit].params[param].fqn)));
            }
            flags.deferred[param] = false;
            flags.grads[param] = Some(match flags.grads[param].take() {
                Some(earlier) => (earlier + grad)?,
                None => {
                    flags.grads_pending -= 1;
                    grad.clone()
                }
            });
            flags.complete()
        };
        if complete && unit != ROOT {
            self.run_post_backward(unit)?;
        }
        Ok(())
    }
}
