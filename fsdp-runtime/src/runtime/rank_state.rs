//! The executor of one rank: its communicator, its parameter groups, and the bookkeeping
//! of the current step (which units ran forward and in what order). It decides when each
//! group unshards, reshards and reduces, and which unit a prefetch targets; it is what the
//! units' hooks and the autograd ops call into.
//!
//! The order of events follows PyTorch FSDP1's `_runtime_utils`: a unit's pre-backward gathers
//! it and, under `BACKWARD_PRE`, prefetches the unit that ended its forward just before
//! it; its post-backward reduces its gradients, frees it and, under `BACKWARD_POST`,
//! makes the same prefetch. A prefetch targets a unit only if that unit's backward is
//! still to come and no prefetch gathered it already.

use super::activation_checkpoint;
use super::activation_profile::{ActivationProfile, Profiler, UnitActivations};
use super::autograd::{BackwardHook, GradSink, HookPoint, LiveHook};
use super::meta_model::storage_address;
use super::param_group::{ParamGroup, Residency, TrainingState};
use super::trace::{TraceEvent, UnshardCause};
use super::{backward_prefetch_target, forward_prefetch_target, Recorders};
use crate::config::{BackwardPrefetch, FsdpConfig, OrderCheck};
use crate::error::MisuseError;
use crate::error::{into_candle, Error, Result};
use crate::model::{Recompute, UnitHooks};
use crate::pipeline::DeferredGradSink;
use candle_core::{DType, Tensor, TensorId, Var};
use fsdp_comm::Collectives;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// `tensors` with every floating-point one in `dtype`.
fn cast_floats(tensors: Vec<Tensor>, dtype: DType) -> candle_core::Result<Vec<Tensor>> {
    tensors.into_iter().map(|t| if t.dtype().is_float() { t.to_dtype(dtype) } else { Ok(t) }).collect()
}

/// The unit of parameters that sit in no `Unit`.
pub(crate) const ROOT: usize = 0;

/// What the forwards running now are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ForwardMode {
    /// Gather, free and hook for the backward.
    Training,
    /// Gather and free, attach no hook, detach the outputs.
    Inference,
    /// Every unit is gathered for [`crate::Fsdp::summon_full_params`]: units run their
    /// layers as they are, touching nothing.
    Summoned,
}

/// The bookkeeping of the current step.
#[derive(Default)]
struct Step {
    /// Units in the order their forward started (first start only).
    forward_seen: Vec<usize>,
    /// Units in the order their forward ended (first end only).
    post_forward_order: Vec<usize>,
    order_mismatch_reported: bool,
    /// Whether this step's backward reached any unit (a pre-backward or a gradient).
    backward_reached: bool,
    /// Reduced shard gradients of this step: (unit, parameter, gradient).
    reduced: Vec<(usize, usize, Tensor)>,
}

/// Called with a parameter's shard and its reduced shard gradient, right after the
/// gradient is computed in backward (PyTorch's post-accumulate-grad hook).
pub type PostAccumulateHook = Box<dyn FnMut(&Var, &Tensor) -> candle_core::Result<()> + Send>;

pub(crate) struct RankState {
    pub comm: Arc<dyn Collectives>,
    pub config: FsdpConfig,
    pub groups: Vec<ParamGroup>,
    /// The static forward order of units, expanded for this model.
    forward_order: Vec<usize>,
    pub recorders: Recorders,
    /// Whether backward reduces gradients; when off they accumulate unsharded per rank.
    pub gradient_sync: AtomicBool,
    mode: Mutex<ForwardMode>,
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
    /// The storages of the gathered parameters, which activation profiles leave out.
    parameter_storages: HashSet<usize>,
    /// Whether training forwards measure what each unit keeps ([`ActivationProfile`]).
    pub profiling: AtomicBool,
    /// The profile of the training forward running now.
    profiler: Mutex<Option<Profiler>>,
    /// The profile of the last profiled training forward.
    pub last_profile: Mutex<Option<ActivationProfile>>,
    step: Mutex<Step>,
    this: Weak<RankState>,
}

impl RankState {
    /// `build_groups` receives the sink the groups' gathered nodes report gradients to.
    pub fn new(
        comm: Arc<dyn Collectives>,
        config: FsdpConfig,
        forward_order: Vec<usize>,
        build_groups: impl FnOnce(Weak<dyn GradSink>) -> Result<Vec<ParamGroup>>,
    ) -> Result<Arc<Self>> {
        let mut failure = None;
        let state = Arc::new_cyclic(|this: &Weak<RankState>| {
            let sink: Weak<dyn GradSink> = this.clone();
            let groups = build_groups(sink).unwrap_or_else(|e| {
                failure = Some(e);
                Vec::new()
            });
            let gathered_index = groups
                .iter()
                .flat_map(|g| g.params.iter().enumerate().map(move |(p, param)| (param.gathered.id(), (g.index, p))))
                .collect();
            let parameter_storages =
                groups.iter().flat_map(|g| g.params.iter().map(|p| storage_address(&p.gathered))).collect();
            RankState {
                gathered_index,
                parameter_storages,
                profiling: AtomicBool::new(false),
                profiler: Mutex::new(None),
                last_profile: Mutex::new(None),
                comm,
                config,
                groups,
                forward_order,
                recorders: Recorders::default(),
                gradient_sync: AtomicBool::new(true),
                mode: Mutex::new(ForwardMode::Training),
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

    fn step(&self) -> MutexGuard<'_, Step> {
        self.step.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn rank(&self) -> usize {
        self.comm.global_rank()
    }

    pub fn mode(&self) -> ForwardMode {
        *self.mode.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Leaves training mode for `mode`, for the duration of `call`; refused inside
    /// another call that changed the mode.
    pub fn enter_mode(&self, mode: ForwardMode, call: &'static str) -> Result<()> {
        let mut current = self.mode.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let inside = match *current {
            ForwardMode::Training => {
                *current = mode;
                return Ok(());
            }
            ForwardMode::Inference => "Fsdp::forward_inference",
            ForwardMode::Summoned => "Fsdp::summon_full_params",
        };
        Err(Error::Misuse(MisuseError::NestedCall { rank: self.rank(), call, inside }))
    }

    /// Back to training mode.
    pub fn leave_mode(&self) {
        *self.mode.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = ForwardMode::Training;
    }

    /// Frees the full values the groups were built with.
    pub fn release_initial(&self) -> Result<()> {
        self.groups.iter().try_for_each(|group| group.release_initial(&self.recorders))
    }

    fn unshard(&self, unit: usize, cause: UnshardCause) -> Result<()> {
        self.groups[unit].unshard(cause, &self.recorders)
    }

    fn reshard_all(&self) -> Result<()> {
        self.groups.iter().try_for_each(|group| group.reshard(&self.recorders))
    }

    /// Forward prefetches wait while this many units are gathered ahead of use.
    fn may_prefetch(&self) -> bool {
        let in_flight = self.groups.iter().filter(|g| g.residency() == Residency::Prefetched).count();
        in_flight < self.config.max_prefetch_in_flight
    }

    /// Starts `unit`'s forward: checks the order, gathers it, and (with forward prefetch)
    /// gathers the next unit of the static order.
    pub fn pre_forward(&self, unit: usize) -> Result<()> {
        if self.mode() == ForwardMode::Summoned {
            return Ok(());
        }
        self.check_order(unit)?;
        self.unshard(unit, UnshardCause::Forward)?;
        if self.config.forward_prefetch {
            if let Some(next) = forward_prefetch_target(&self.forward_order, unit) {
                if self.groups[next].residency() == Residency::Sharded && self.may_prefetch() {
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
        let error = Error::Misuse(MisuseError::OrderViolation {
            rank: self.rank(),
            unit: self.groups[unit].name.clone(),
            position,
            expected: expected.map_or("<none>".to_string(), |u| self.groups[u].name.clone()),
        });
        match self.config.order_check {
            OrderCheck::Warn => {
                tracing::warn!("{error}; prefetching will target the wrong units this step");
                Ok(())
            }
            OrderCheck::Strict => Err(error),
        }
    }

    /// Ends `unit`'s forward: frees it under FULL_SHARD (not the root), records the
    /// post-forward order and hooks the outputs for the pre-backward.
    pub fn post_forward(&self, unit: usize, outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let mode = self.mode();
        if mode == ForwardMode::Summoned {
            return Ok(outputs);
        }
        {
            let mut step = self.step();
            if !step.post_forward_order.contains(&unit) {
                step.post_forward_order.push(unit);
            }
        }
        if mode == ForwardMode::Inference {
            // Copied before the release when they are (views of) the unit's parameters.
            let outputs = outputs.iter().map(|t| self.detached_output(t)).collect::<Result<Vec<_>>>()?;
            self.groups[unit].post_forward(false, &self.recorders)?;
            return Ok(outputs);
        }
        let mut hooked = false;
        let generation = self.generation.load(Ordering::Relaxed);
        let outputs = outputs
            .into_iter()
            .map(|tensor| {
                if !tensor.track_op() {
                    return Ok(tensor);
                }
                hooked = true;
                let sink: Weak<dyn GradSink> = self.this.clone();
                let hook = BackwardHook {
                    sink: Some(sink),
                    point: HookPoint::Output,
                    unit,
                    generation,
                    _live: Some(LiveHook::new(&self.live_hooks)),
                };
                Ok(tensor.broadcast_add(&tensor.apply_op1(hook)?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        self.groups[unit].post_forward(hooked, &self.recorders)?;
        Ok(outputs)
    }

    /// An inference output, detached, in storage of its own when it shares a gathered
    /// parameter's (a layer that returns its weight or a view of it): the caller keeps it
    /// after the unit is released.
    fn detached_output(&self, output: &Tensor) -> Result<Tensor> {
        if self.parameter_storages.contains(&storage_address(output)) {
            Ok(output.detach().copy()?)
        } else {
            Ok(output.detach())
        }
    }

    /// A training forward of the root starts: with profiling on, its profile starts too.
    pub fn start_profile(&self) {
        let on = self.profiling.load(Ordering::Relaxed) && self.mode() == ForwardMode::Training;
        *self.profiler.lock().unwrap_or_else(|p| p.into_inner()) = on.then(Profiler::default);
    }

    /// The root's forward ended with `outputs`: the profile of this forward, if one runs,
    /// becomes the last profile.
    pub fn finish_profile(&self, outputs: &[Tensor]) {
        let Some(profiler) = self.profiler.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let units = profiler
            .finish(ROOT, outputs, &self.parameter_storages)
            .into_iter()
            .map(|(unit, bytes)| UnitActivations { unit: self.groups[unit].name.clone(), bytes })
            .collect();
        *self.last_profile.lock().unwrap_or_else(|p| p.into_inner()) = Some(ActivationProfile { units });
    }

    /// The floating-point `inputs` in the policy's `param_dtype`, when it asks for that.
    pub fn cast_inputs(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let policy = &self.config.mixed_precision;
        match policy.param_dtype.filter(|_| policy.cast_forward_inputs) {
            Some(dtype) => Ok(cast_floats(inputs, dtype)?),
            None => Ok(inputs),
        }
    }

    /// The floating-point `outputs` of the root in the policy's `output_dtype`.
    pub fn cast_outputs(&self, outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        match self.config.mixed_precision.output_dtype {
            Some(dtype) => Ok(cast_floats(outputs, dtype)?),
            None => Ok(outputs),
        }
    }

    /// `unit`'s forward failed with `error`: under mixed precision, the error says in which
    /// dtype the unit ran (once, at the innermost unit).
    pub fn forward_failed(&self, unit: usize, error: candle_core::Error) -> Error {
        let error = Error::from(error);
        match self.config.mixed_precision.param_dtype {
            Some(dtype) if !matches!(error, Error::MixedPrecisionForward { .. }) => Error::MixedPrecisionForward {
                rank: self.rank(),
                unit: self.groups[unit].name.clone(),
                dtype,
                message: error.to_string(),
            },
            _ => error,
        }
    }

    /// Ties a unit's inputs into its first input tensor, so that candle's backward walk
    /// (a depth-first order from the loss) reaches every input, and what produced it, only
    /// after the unit's own parameters: their gradients are then complete, and the unit's
    /// post-backward runs, before the backward of the units that produced its inputs.
    /// Without this, a unit whose second input comes from far back (a decoder layer's
    /// encoder memory) would keep its parameters gathered through that whole backward.
    pub fn bind_inputs(&self, mut inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if self.mode() == ForwardMode::Summoned {
            return Ok(inputs);
        }
        let Some((first, rest)) = inputs.split_first() else {
            return Ok(inputs);
        };
        let mut anchor: Option<Tensor> = None;
        for other in rest.iter().filter(|t| t.track_op() && t.id() != first.id()) {
            let hook = BackwardHook { sink: None, point: HookPoint::Output, unit: ROOT, generation: 0, _live: None };
            let zero = other.apply_op1(hook)?.to_dtype(first.dtype())?;
            anchor = Some(match anchor {
                None => zero,
                Some(sum) => (sum + zero)?,
            });
        }
        if let Some(anchor) = anchor {
            inputs[0] = inputs[0].broadcast_add(&anchor)?;
        }
        Ok(inputs)
    }

    /// Hooks the inputs of a training forward of `unit` when it holds frozen parameters
    /// (see [`ParamGroup::expect_input_pass`]): each input that tracks gradients is
    /// replaced by itself plus a zero whose backward runs once the unit's backward is
    /// done with it.
    fn hook_inputs(&self, unit: usize, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if self.mode() != ForwardMode::Training || !self.groups[unit].has_frozen() {
            return Ok(inputs);
        }
        let generation = self.generation.load(Ordering::Relaxed);
        inputs
            .into_iter()
            .map(|tensor| {
                if !tensor.track_op() {
                    return Ok(tensor);
                }
                let sink: Weak<dyn GradSink> = self.this.clone();
                let hook = BackwardHook { sink: Some(sink), point: HookPoint::Input, unit, generation, _live: None };
                let hooked = tensor.broadcast_add(&tensor.apply_op1(hook)?)?;
                self.groups[unit].expect_input_pass();
                Ok(hooked)
            })
            .collect()
    }

    /// The unit prefetched in backward after `unit`: the one that ended its forward just
    /// before it this step, if that one still waits for its backward.
    fn backward_prefetch(&self, unit: usize) -> Result<()> {
        let target = backward_prefetch_target(&self.step().post_forward_order, unit)
            .filter(|&t| self.groups[t].wants_backward_prefetch());
        self.recorders.trace.record(TraceEvent::BackwardPrefetch {
            unit: self.groups[unit].name.clone(),
            target: target.map(|t| self.groups[t].name.clone()),
        });
        if let Some(target) = target {
            self.unshard(target, UnshardCause::BackwardPrefetch)?;
        }
        Ok(())
    }

    fn run_pre_backward(&self, unit: usize) -> Result<()> {
        self.step().backward_reached = true;
        if self.groups[unit].pre_backward(&self.recorders)? && self.config.backward_prefetch == BackwardPrefetch::Pre {
            self.backward_prefetch(unit)?;
        }
        Ok(())
    }

    /// Reduces `unit`'s gradients, frees it, runs the post-accumulate hooks and (under
    /// `BACKWARD_POST`) prefetches.
    fn run_post_backward(&self, unit: usize) -> Result<()> {
        let sync = self.gradient_sync.load(Ordering::Relaxed);
        let Some(reduced) = self.groups[unit].post_backward(sync, &self.recorders)? else {
            return Ok(());
        };
        self.run_post_accumulate_hooks(unit, &reduced)?;
        self.step().reduced.extend(reduced.into_iter().map(|(p, g)| (unit, p, g)));
        if self.config.backward_prefetch == BackwardPrefetch::Post {
            self.backward_prefetch(unit)?;
        }
        Ok(())
    }

    pub fn register_post_accumulate_hook(&self, unit: usize, param: usize, hook: PostAccumulateHook) {
        self.post_accumulate_hooks.lock().unwrap_or_else(|p| p.into_inner()).push((unit, param, hook));
    }

    fn run_post_accumulate_hooks(&self, unit: usize, reduced: &[(usize, Tensor)]) -> Result<()> {
        let mut hooks = self.post_accumulate_hooks.lock().unwrap_or_else(|p| p.into_inner());
        for (param, grad) in reduced {
            let shard = &self.groups[unit].params[*param].shard;
            for (_, _, hook) in hooks.iter_mut().filter(|(u, p, _)| *u == unit && p == param) {
                hook(shard, grad)?;
            }
        }
        Ok(())
    }

    /// Ends a pipeline input pass: the weight pass needs no gathered parameter, so every
    /// unit is freed; the step's bookkeeping stays for the gradients still to come.
    pub fn finish_input_pass(&self) -> Result<()> {
        self.reshard_all()
    }

    /// Whether a training forward ran since the last backward: its outputs may still be
    /// backpropagated, so the step's bookkeeping must survive an inference forward.
    pub fn training_step_pending(&self) -> bool {
        !self.step().post_forward_order.is_empty()
    }

    /// Whether backward reached any unit since the step began.
    pub fn backward_reached(&self) -> bool {
        self.step().backward_reached
    }

    /// Ends an inference forward: nothing waits for its backward, so every unit, the root
    /// too, is freed. Unless a training forward is `pending`, the step starts over; if one
    /// is, its bookkeeping stays, and its backward gathers again what the inference freed.
    pub fn finish_inference(&self, pending: bool) -> Result<()> {
        self.reshard_all()?;
        if !pending {
            self.groups.iter().for_each(ParamGroup::finish_step);
            *self.step() = Step::default();
        }
        Ok(())
    }

    /// Gathers `units` (every unit, or one) for [`crate::Fsdp::summon_full_params`];
    /// refused while a training step is under way (its units' states belong to its
    /// backward).
    pub fn summon(&self, units: std::ops::Range<usize>) -> Result<()> {
        const CALL: &str = "Fsdp::summon_full_params";
        let busy =
            self.training_step_pending() || self.groups.iter().any(|g| g.training_state() != TrainingState::Idle);
        if busy {
            return Err(Error::Misuse(MisuseError::StepInProgress { rank: self.rank(), call: CALL }));
        }
        self.enter_mode(ForwardMode::Summoned, CALL)?;
        let gathered = units.into_iter().try_for_each(|unit| self.unshard(unit, UnshardCause::Summon));
        if gathered.is_err() {
            self.leave_mode();
        }
        gathered
    }

    /// Ends [`RankState::summon`]: every unit is freed again.
    pub fn end_summon(&self) -> Result<()> {
        self.leave_mode();
        self.reshard_all()
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
        self.reshard_all()?;
        self.groups.iter().for_each(ParamGroup::finish_step);
        let reduced = std::mem::take(&mut *self.step()).reduced;
        self.generation.fetch_add(1, Ordering::Relaxed);
        Ok(reduced)
    }

    fn param_of(&self, weight: &Tensor) -> Result<(usize, usize)> {
        self.gathered_index.get(&weight.id()).copied().ok_or_else(|| Error::Rank {
            rank: self.rank(),
            message: format!(
                "a deferred gradient for a {:?} tensor that is no parameter of this model",
                weight.shape()
            ),
        })
    }

    /// A unit's gradients are complete: reduce them now, except the root's, which are
    /// reduced at the end of backward like PyTorch's root.
    fn on_gradients_complete(&self, unit: usize, complete: bool) -> Result<()> {
        if complete && unit != ROOT {
            self.run_post_backward(unit)?;
        }
        Ok(())
    }
}

impl UnitHooks for RankState {
    fn bind_inputs(&self, unit: usize, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let bound = self.hook_inputs(unit, RankState::bind_inputs(self, self.cast_inputs(inputs)?)?)?;
        if self.profiling.load(Ordering::Relaxed) {
            if let Some(profiler) = self.profiler.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                profiler.started(unit, &bound);
            }
        }
        Ok(bound)
    }

    fn pre_forward(&self, unit: usize) -> Result<()> {
        RankState::pre_forward(self, unit)
    }

    fn post_forward(&self, unit: usize, outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let hooked = RankState::post_forward(self, unit, outputs)?;
        if self.profiling.load(Ordering::Relaxed) {
            if let Some(profiler) = self.profiler.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                profiler.ended(unit, &hooked, &self.parameter_storages);
            }
        }
        Ok(hooked)
    }

    fn forward_failed(&self, unit: usize, error: candle_core::Error) -> candle_core::Error {
        into_candle(RankState::forward_failed(self, unit, error))
    }

    fn unit_name(&self, unit: usize) -> String {
        self.groups[unit].name.clone()
    }

    fn checkpoints(&self, unit: usize) -> bool {
        self.groups[unit].checkpointed.load(Ordering::Relaxed) && self.mode() == ForwardMode::Training
    }

    fn attach_checkpoint(
        &self,
        unit: usize,
        inputs: Vec<Tensor>,
        outputs: Vec<Tensor>,
        recompute: Recompute,
    ) -> Result<Vec<Tensor>> {
        activation_checkpoint::attach(self.groups[unit].name.clone(), self.rank(), inputs, outputs, recompute)
    }
}

impl GradSink for RankState {
    fn deposit(&self, unit: usize, param: usize, grad: &Tensor) -> candle_core::Result<()> {
        self.step().backward_reached = true;
        // Normally one call per parameter and backward; a pipeline weight pass may add
        // the deferred part of a gradient whose other part autograd delivered.
        let complete = self.groups[unit].deposit(param, grad).map_err(into_candle)?;
        self.on_gradients_complete(unit, complete).map_err(into_candle)
    }

    fn pre_backward(&self, unit: usize, generation: u64) -> candle_core::Result<()> {
        if generation != self.generation.load(Ordering::Relaxed) {
            return Err(into_candle(Error::Unit {
                rank: self.rank(),
                unit: self.groups[unit].name.clone(),
                message: "backward reached the outputs of a forward whose backward already ran; its gathered \
                          parameters are freed and its gradients reduced. Run the forward again for another backward"
                    .to_string(),
            }));
        }
        self.run_pre_backward(unit).map_err(into_candle)
    }

    fn input_passed(&self, unit: usize, generation: u64) -> candle_core::Result<()> {
        // A stale generation's backward fails at its outputs' hooks first.
        if generation != self.generation.load(Ordering::Relaxed) {
            return Ok(());
        }
        let complete = self.groups[unit].input_passed();
        self.on_gradients_complete(unit, complete).map_err(into_candle)
    }
}

impl DeferredGradSink for RankState {
    fn owns(&self, weight: &Tensor) -> bool {
        self.gathered_index.contains_key(&weight.id())
    }

    fn expect(&self, weight: &Tensor) -> Result<()> {
        let (unit, _) = self.param_of(weight)?;
        self.groups[unit].pledge_gradient();
        Ok(())
    }

    /// The weight pass's part of a gradient: added to what the input pass delivered, and
    /// the unit is reduced at once if nothing else is missing.
    fn deposit(&self, weight: &Tensor, grad: &Tensor) -> Result<()> {
        let (unit, param) = self.param_of(weight)?;
        let complete = self.groups[unit].deposit_pledged(param, grad)?;
        self.on_gradients_complete(unit, complete)
    }
}
