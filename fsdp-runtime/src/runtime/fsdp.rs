//! [`Fsdp`]: a model wrapped for fully sharded data parallel training on one rank.

use super::autograd::{GatheredParam, GradSink};
use super::flat_buffer::{pad, ShardSpec};
use super::meta_model::{storage_address, MetaModel, MetaParam};
use super::param_group::{ParamGroup, UnitComms};
use super::rank_agreement::check_ranks_agree;
use super::rank_state::{ForwardMode, RankState, ROOT};
use super::seeded_init;
use super::shard_view::{Buffer, BufferView, UnitView};
use super::sharded_param::ShardedParam;
use super::storage::Unallocated;

use crate::config::{FsdpConfig, MixedPrecision};
use crate::error::{ConfigError, MisuseError};
use crate::error::{Error, Result};
use crate::model::{
    Activations, Layout, ParamInfo, Role, Shardable, ShardableModel, UnitCell, UnitHooks, VisitOrder, Visitor,
};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};
use fsdp_comm::Collectives;
use std::collections::HashMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

/// A model whose parameters are sharded over the ranks of a communicator.
///
/// Each rank wraps its own copy of the model. Afterwards the rank holds only its shard of
/// every parameter ([`Fsdp::parameters`], what the optimizer steps); [`Fsdp::forward`] and
/// the model's [`crate::Unit`]s gather parameters when they are needed and free them as
/// the strategy says, and [`Fsdp::backward`] returns the shard gradients averaged over
/// the ranks.
///
/// The wrapped model is reachable only where its parameters are gathered: inside
/// [`Fsdp::forward`], [`Fsdp::forward_inference`] and [`Fsdp::summon_full_params`].
/// [`Fsdp::into_inner`] hands back a plain model with the full trained parameters.
///
/// # Parameters kept past their scope
///
/// A layer's parameter tensor is the unit's gathered parameter: a clone or a view of it
/// taken inside one of those closures (returned, stored on the side, kept in a layer's
/// cache) shares its storage, which is released with the unit. Using such a tensor then
/// is an error, never a read of freed memory: every candle operation on it fails with a
/// dtype error naming `F8E8M0`, the storage type of a released tensor (as PyTorch FSDP
/// fails on a freed parameter's zero-sized storage). While the unit is gathered again the
/// tensor shows the current values; without sharding (`NO_SHARD`) the values stay in
/// memory and a kept tensor keeps the values of its last gather. To keep values, copy
/// them inside the closure (`Tensor::copy`), or use [`Fsdp::full_parameters`] or
/// [`Fsdp::into_inner`]. What a forward returns is the caller's either way: an output
/// that is a parameter or a view of one is copied before the unit is released.
pub struct Fsdp<M> {
    pub(super) model: M,
    pub(super) state: Arc<RankState>,
    buffers: Vec<Buffer>,
    ties: Vec<Tie>,
}

/// A second FQN under which the model reaches a trained parameter.
pub(crate) struct Tie {
    pub fqn: String,
    /// The FQN the parameter is sharded and saved under.
    pub target: String,
}

/// The initialisers a meta-built model recorded (by the placeholder handed out, and by
/// the placeholder's storage), and the seed to draw them with.
#[derive(Clone, Copy)]
struct Seeded<'a> {
    recorded: &'a HashMap<TensorId, MetaParam>,
    storages: &'a HashMap<usize, String>,
    seed: u64,
}

/// Where wrapping takes each tensor's first value from: drawn from its recorded
/// initialiser, or the value the model holds (from the group's first rank with
/// `sync_module_states`). Full values live one tensor at a time.
struct FirstValues<'a> {
    config: &'a FsdpConfig,
    seeded: Option<Seeded<'a>>,
}

impl FirstValues<'_> {
    fn recorded(&self, param: &ParamInfo) -> Option<(&MetaParam, u64)> {
        let seeded = self.seeded?;
        seeded.recorded.get(&param.tensor.id()).map(|meta| (meta, seeded.seed))
    }

    /// The value the model holds, the same on every rank of `group` when asked.
    fn held(&self, param: &ParamInfo, group: &dyn Collectives) -> Result<Tensor> {
        // A layer that holds a view of a placeholder (a transpose, a reshape) holds no
        // values and no initialiser of its own.
        if let Some(name) = self.seeded.and_then(|s| s.storages.get(&storage_address(&param.tensor))) {
            return Err(Error::Config(ConfigError::MetaView { fqn: param.fqn.clone(), placeholder: name.clone() }));
        }
        if self.config.sync_module_states && self.config.communicates_over(group.size()) {
            let flat = param.tensor.flatten_all()?.contiguous()?;
            let label = format!("initial value of `{}`", param.fqn);
            Ok(group.broadcast(&flat, 0, &label)?.wait()?.reshape(param.tensor.shape())?)
        } else {
            Ok(param.tensor.clone())
        }
    }

    /// The whole first value (a buffer, which every rank holds whole).
    fn full(&self, param: &ParamInfo, group: &dyn Collectives) -> Result<Tensor> {
        match self.recorded(param) {
            Some((meta, seed)) => {
                let numel = meta.shape.elem_count();
                let flat = seeded_init::draw(&meta.init, &meta.shape, &param.fqn, seed, 0..numel, meta.dtype)?;
                Ok(flat.reshape(meta.shape.clone())?.to_device(&meta.device)?)
            }
            None => self.held(param, group),
        }
    }

    /// Rank `rank`'s shard of the first value, split as `spec` says.
    fn shard(&self, param: &ParamInfo, group: &dyn Collectives, spec: ShardSpec, rank: usize) -> Result<Tensor> {
        match self.recorded(param) {
            Some((meta, seed)) => {
                let range = spec.real_range(rank);
                let real = seeded_init::draw(&meta.init, &meta.shape, &param.fqn, seed, range, meta.dtype)?;
                Ok(pad(&real, spec.shard_len)?.to_device(&meta.device)?)
            }
            None => Ok(spec.shard_of(&self.held(param, group)?, rank)?),
        }
    }
}

impl<M: ShardableModel> Fsdp<M> {
    /// Wraps `model` (this rank's copy) for sharded training over `comm`'s ranks. A
    /// collective: every rank of `comm` wraps at the same time, and wrapping fails on
    /// every rank when the ranks built different models.
    pub fn wrap(model: M, comm: Arc<dyn Collectives>, config: FsdpConfig) -> Result<Self> {
        Self::wrap_with_groups(model, comm, config, Vec::new())
    }

    /// As [`Fsdp::wrap`], with some units sharded over their own group of ranks instead
    /// of the world: `(unit name, group)`. A size-1 group keeps a unit whole and
    /// unreduced on its rank (a per-rank expert), like PyTorch FSDP on `new_group([rank])`.
    pub fn wrap_with_groups(
        model: M,
        comm: Arc<dyn Collectives>,
        config: FsdpConfig,
        unit_groups: Vec<(String, Arc<dyn Collectives>)>,
    ) -> Result<Self> {
        Self::wrap_from(model, comm, config, unit_groups, None)
    }

    /// Wraps a model built without values ([`MetaModel::build`]): each rank draws only its
    /// shards, from the initialiser each layer asked for, seeded by `seed` and the
    /// parameter's FQN. The values do not depend on the world size or the strategy, and
    /// no rank holds more than its shards plus the model's buffers (and the tensors the
    /// model made itself, which keep their values). To start from a checkpoint instead,
    /// follow with [`crate::checkpoint::load_pretrained`] or [`crate::checkpoint::load`].
    pub fn wrap_meta(meta: MetaModel<M>, comm: Arc<dyn Collectives>, config: FsdpConfig, seed: u64) -> Result<Self> {
        let MetaModel { model, params } = meta;
        let storages: HashMap<usize, String> =
            params.iter().map(|(t, p)| (storage_address(t), p.name.clone())).collect();
        let recorded: HashMap<TensorId, MetaParam> = params.iter().map(|(t, p)| (t.id(), p.clone())).collect();
        let seeded = Seeded { recorded: &recorded, storages: &storages, seed };
        let wrapped = Self::wrap_from(model, comm, config, Vec::new(), Some(seeded));
        // The placeholders' storages stay allocated until here: no other tensor can take
        // one of their addresses while wrapping compares them.
        drop(params);
        wrapped
    }

    fn wrap_from(
        model: M,
        comm: Arc<dyn Collectives>,
        config: FsdpConfig,
        unit_groups: Vec<(String, Arc<dyn Collectives>)>,
        seeded: Option<Seeded<'_>>,
    ) -> Result<Self> {
        let layout = Layout::of(&model)?;
        let frozen = layout.frozen_params(config.frozen.patterns())?;
        if config.communicates_over(comm.size()) {
            check_ranks_agree(comm.as_ref(), &layout)?;
        }
        let UnitComms { shards, replicas } = hybrid_groups(&comm, &config)?;
        let mut unit_comms: Vec<Arc<dyn Collectives>> = vec![shards; layout.units.len()];
        let mut unit_replicas = vec![replicas; layout.units.len()];
        for (name, group) in unit_groups {
            let index = layout.unit_named(&name).ok_or(Error::Config(ConfigError::UnknownUnit { name }))?;
            unit_comms[index] = group;
            unit_replicas[index] = None;
        }
        // Initial values are made equal over every rank that holds them: the whole world
        // under hybrid sharding, not only the shard group.
        let sync_over = |unit: usize| -> &dyn Collectives {
            if unit_replicas[unit].is_some() {
                comm.as_ref()
            } else {
                unit_comms[unit].as_ref()
            }
        };
        let sharded = config.strategy.shards();
        let first_values = FirstValues { config: &config, seeded };

        let build_groups = |sink: Weak<dyn GradSink>| -> Result<Vec<ParamGroup>> {
            layout
                .units
                .iter()
                .enumerate()
                .map(|(index, unit)| {
                    let trained: Vec<(&ParamInfo, bool)> = unit
                        .params
                        .iter()
                        .filter(|&&p| layout.params[p].role == Role::Parameter)
                        .map(|&p| (&layout.params[p], frozen[p]))
                        .collect();
                    let group = unit_comms[index].clone();
                    let (shard_rank, shard_world) = if sharded { (group.rank(), group.size()) } else { (0, 1) };
                    let params = trained
                        .iter()
                        .enumerate()
                        .map(|(i, &(p, frozen))| {
                            let spec = ShardSpec::new(p.tensor.elem_count(), shard_world);
                            let shard = first_values.shard(p, sync_over(index), spec, shard_rank)?;
                            let compute_dtype = check_precision(unit.display_name(), p, &config.mixed_precision)?;
                            let released = Unallocated {
                                shape: p.tensor.shape().clone(),
                                dtype: compute_dtype.unwrap_or(p.tensor.dtype()),
                            };
                            let node = GatheredParam { sink: sink.clone(), unit: index, param: i, released };
                            Ok(ShardedParam::new(p.fqn.clone(), spec, &shard, frozen, node)?)
                        })
                        .collect::<Result<Vec<_>>>()?;
                    let name = unit.display_name().to_string();
                    let comms = UnitComms { shards: group, replicas: unit_replicas[index].clone() };
                    let mut group = ParamGroup::new(index, name, params, comms, &config, index == ROOT);
                    // Only units holding no other unit: a recomputed forward runs no hooks.
                    let leaf = !layout.units.iter().any(|u| u.parent == Some(index));
                    group.checkpointable = index != ROOT && leaf;
                    // As with the configuration, a declared field checkpoints the units below
                    // it that hold no other unit.
                    let checkpointed = (config.activation_checkpointing || unit.checkpoint) && group.checkpointable;
                    group.checkpointed.store(checkpointed, Relaxed);
                    Ok(group)
                })
                .collect()
        };
        let state = RankState::new(comm.clone(), config, layout.forward_order.clone(), build_groups)?;

        // The model's layers now hold the gathered nodes and the buffers' first values.
        let mut replacement: HashMap<TensorId, Tensor> = HashMap::new();
        for param in layout.params.iter().filter(|p| p.role == Role::Buffer) {
            let value = first_values.full(param, sync_over(param.unit))?;
            replacement.insert(param.tensor.id(), value);
        }
        for (group, unit) in state.groups.iter().zip(&layout.units) {
            let trained = unit.params.iter().map(|&p| &layout.params[p]).filter(|p| p.role == Role::Parameter);
            for (param, info) in group.params.iter().zip(trained) {
                replacement.insert(info.tensor.id(), param.gathered.clone());
            }
        }
        let buffers = layout
            .params
            .iter()
            .filter(|p| p.role == Role::Buffer)
            .map(|p| Buffer { fqn: p.fqn.clone(), unit: p.unit, tensor: replacement[&p.tensor.id()].clone() })
            .collect();
        let ties = layout
            .ties
            .iter()
            .map(|t| Tie { fqn: t.fqn.clone(), target: layout.params[t.param].fqn.clone() })
            .collect();
        drop(layout);
        let model = model.map_tensors(&mut |t: Tensor| Ok(replacement.get(&t.id()).cloned().unwrap_or(t)))?;
        drop(replacement);

        let hooks: Arc<dyn UnitHooks> = state.clone();
        let mut installer = CellInstaller { hooks, next: 1, error: None };
        model.visit(&mut installer, VisitOrder::Declaration);
        if let Some(error) = installer.error {
            return Err(error);
        }
        state.release_initial()?;
        Ok(Self { model, state, buffers, ties })
    }
}

impl<M: Shardable> Fsdp<M> {
    /// Unwraps the model: the plain model (no unit wrapped any more) holding the full
    /// trained parameters, gathered one unit at a time, and the buffers. A collective:
    /// every rank calls it; each gets its own full copy.
    pub fn into_inner(self) -> Result<M> {
        self.check_between_steps("Fsdp::into_inner")?;
        let mut full: HashMap<TensorId, Tensor> = HashMap::new();
        for group in &self.state.groups {
            for (param, value) in group.params.iter().zip(group.full_values()?) {
                full.insert(param.gathered.id(), value);
            }
        }
        let Fsdp { model, state, .. } = self;
        drop(state);
        // A tied parameter is one gathered node at two places: both get the one value.
        Ok(model.map_tensors(&mut |t: Tensor| Ok(full.get(&t.id()).cloned().unwrap_or(t)))?)
    }
}

impl<M> Fsdp<M> {
    /// Runs the model's forward `f` as the root unit: the root's parameters are gathered
    /// first and kept until the end of backward, and the outputs are hooked (and cast to
    /// the mixed-precision policy's `output_dtype`).
    pub fn forward<R: Activations>(&self, f: impl FnOnce(&M) -> candle_core::Result<R>) -> Result<R> {
        self.state.pre_forward(ROOT)?;
        self.state.start_profile();
        let outputs = f(&self.model).map_err(|e| self.state.forward_failed(ROOT, e))?;
        let hooked = self.state.post_forward(ROOT, outputs.tensors())?;
        let cast = self.state.cast_outputs(hooked)?;
        self.state.finish_profile(&cast);
        Ok(outputs.with_tensors(cast)?)
    }

    /// [`Fsdp::forward`] on `inputs`, whose floating-point tensors are cast to the
    /// mixed-precision policy's `param_dtype` first (with `cast_forward_inputs`), as every
    /// unit's inputs are: the way to feed a root that computes on floating-point inputs.
    pub fn forward_with<I: Activations, R: Activations>(
        &self,
        inputs: I,
        f: impl FnOnce(&M, I) -> candle_core::Result<R>,
    ) -> Result<R> {
        let cast = self.state.cast_inputs(inputs.tensors())?;
        let inputs = inputs.with_tensors(cast)?;
        self.forward(|model| f(model, inputs))
    }

    /// Backpropagates `loss`; returns a `GradStore` holding, for every shard `Var` that
    /// received a gradient, that shard's gradient averaged over the ranks.
    ///
    /// One backward per forward: a second backward through the outputs of a forward whose
    /// backward already ran fails (as PyTorch refuses to backward through a freed graph).
    /// A backward with no training forward before it fails before any collective, so the
    /// ranks stay in step when every rank made the mistake (and under [`launch`](crate::launch)
    /// a rank that returns the error makes its peers fail at once, naming it). A loss that
    /// depends on none of the forward's outputs fails and aborts the communicator with the
    /// reason: the peers whose losses did reach their outputs wait in this step's
    /// reduce-scatters, which this rank will never issue, and fail at once instead.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        if !self.state.training_step_pending() {
            return Err(Error::Misuse(MisuseError::BackwardWithoutForward { rank: self.rank() }));
        }
        let mut grads = loss.backward()?;
        if !self.state.backward_reached() && !self.parameters().iter().any(|v| grads.get(v.as_tensor()).is_some()) {
            return Err(self.abort_world(Error::Misuse(MisuseError::LossReachesNoOutput { rank: self.rank() })));
        }
        self.insert_reduced(&mut grads)?;
        Ok(grads)
    }

    /// Fails every collective of this rank's world with `error`'s message, here and on
    /// the peers, and returns `error`.
    fn abort_world(&self, error: Error) -> Error {
        self.state.comm.abort(&error.to_string());
        error
    }

    pub(crate) fn insert_reduced(&self, grads: &mut GradStore) -> Result<()> {
        for (unit, param, grad) in self.state.finish_backward()? {
            grads.insert(self.state.groups[unit].params[param].shard.as_tensor(), grad);
        }
        Ok(())
    }

    /// Runs `f` for inference: units gather and free as in training, but no backward
    /// hook is attached, the outputs are detached, and every unit (the root too) is freed
    /// at the end, also when `f` fails or panics. candle has no grad mode, so the
    /// operations are still recorded while `f` runs; the record is dropped with the
    /// detached outputs. It may run between a training forward and its backward, which
    /// then gathers again what it needs. The outputs are the caller's: one that is a
    /// parameter (or a view of one) is copied before its unit is released.
    pub fn forward_inference<R: Activations>(&self, f: impl FnOnce(&M) -> candle_core::Result<R>) -> Result<R> {
        let pending = self.state.training_step_pending();
        self.state.enter_mode(ForwardMode::Inference, "Fsdp::forward_inference")?;
        let outputs = catch_unwind(AssertUnwindSafe(|| self.forward(f)));
        self.state.leave_mode();
        let finished = self.state.finish_inference(pending);
        match outputs {
            Err(panic) => resume_unwind(panic),
            Ok(outputs) => {
                let outputs = outputs?;
                finished?;
                Ok(outputs)
            }
        }
    }

    /// With `false`, backward passes keep each rank's unsharded gradients and add them up
    /// instead of reducing them (PyTorch's `no_sync`, FSDP2's
    /// `set_requires_gradient_sync`); the first backward with `true` again reduces the sum.
    /// Costs one unsharded copy of the gradients per rank while off.
    pub fn set_requires_gradient_sync(&self, sync: bool) {
        self.state.gradient_sync.store(sync, std::sync::atomic::Ordering::Relaxed);
    }

    /// Registers `hook` to run on parameter `fqn`'s shard and its reduced shard gradient
    /// each time backward produces that gradient, before `backward` returns (PyTorch's
    /// `register_post_accumulate_grad_hook` on a sharded parameter).
    pub fn register_post_accumulate_grad_hook(
        &self,
        fqn: &str,
        hook: impl FnMut(&Var, &Tensor) -> candle_core::Result<()> + Send + 'static,
    ) -> Result<()> {
        for unit in &self.state.groups {
            if let Some(param) = unit.params.iter().position(|p| p.fqn == fqn) {
                if unit.params[param].frozen {
                    let what = "a post-accumulate-grad hook".to_string();
                    return Err(Error::Config(ConfigError::FrozenParameter { fqn: fqn.to_string(), what }));
                }
                self.state.register_post_accumulate_hook(unit.index, param, Box::new(hook));
                return Ok(());
            }
        }
        Err(Error::Config(ConfigError::UnknownParameter { fqn: fqn.to_string() }))
    }

    /// This rank's shards of every trained parameter, in FQN-table order per unit: what
    /// an optimizer is given. Frozen parameters ([`FsdpConfig::frozen`]) are not among them.
    pub fn parameters(&self) -> Vec<Var> {
        self.named_parameters().into_iter().map(|(_, v)| v).collect()
    }

    /// [`Fsdp::parameters`] with each shard's FQN.
    pub fn named_parameters(&self) -> Vec<(String, Var)> {
        let params = self.state.groups.iter().flat_map(|g| &g.params);
        params.filter(|p| !p.frozen).map(|p| (p.fqn.clone(), p.shard.clone())).collect()
    }

    /// This rank's shards of the frozen parameters ([`FsdpConfig::frozen`]), with their
    /// FQNs: gathered and saved as the others, never trained. Plain tensors, not `Var`s,
    /// so that no optimizer can be given one.
    pub fn named_frozen_parameters(&self) -> Vec<(String, Tensor)> {
        let params = self.state.groups.iter().flat_map(|g| &g.params);
        params.filter(|p| p.frozen).map(|p| (p.fqn.clone(), p.shard.as_tensor().detach())).collect()
    }

    /// The full value of every parameter, frozen ones included, gathered from the shards.
    /// A collective: every rank must call it.
    pub fn full_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        self.full_parameters_where(|_| true)
    }

    /// The full values of the parameters whose FQN `keep` accepts (a model's adapters,
    /// say), gathered unit by unit: a unit holding none is not gathered, and no rank
    /// holds more than one unit's other values at a time. A collective: every rank calls
    /// it with the same `keep`.
    pub fn full_parameters_where(&self, keep: impl Fn(&str) -> bool) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for group in self.state.groups.iter().filter(|g| g.params.iter().any(|p| keep(&p.fqn))) {
            let values = group.params.iter().map(|p| p.fqn.clone()).zip(group.full_values()?);
            out.extend(values.filter(|(fqn, _)| keep(fqn)));
        }
        Ok(out)
    }

    /// Checkpoints the activations of exactly the units named (by the names `Fsdp::diagnostics().units()` lists),
    /// instead of all or none ([`FsdpConfig::activation_checkpointing`]): each keeps only
    /// its inputs after its forward and runs the forward again in backward. Refused for a
    /// name that is no unit, the root, or a unit holding other units; between steps only.
    pub fn checkpoint_units(&self, names: &[&str]) -> Result<()> {
        self.check_between_steps("Fsdp::checkpoint_units")?;
        for name in names {
            let group = self.groups().iter().find(|g| g.name == *name).ok_or_else(|| Error::Unit {
                rank: self.rank(),
                unit: name.to_string(),
                message: "the model has no unit of this name (Fsdp::diagnostics().units() lists them)".into(),
            })?;
            if !group.checkpointable {
                return Err(Error::Unit {
                    rank: self.rank(),
                    unit: name.to_string(),
                    message: "only a unit that holds no other unit, and not the root, can be checkpointed".into(),
                });
            }
        }
        for group in self.groups() {
            group.checkpointed.store(names.contains(&group.name.as_str()), Relaxed);
        }
        Ok(())
    }

    /// This rank's position in the communicator the model was wrapped over.
    pub fn rank(&self) -> usize {
        self.state.comm.rank()
    }

    /// The number of ranks in the communicator the model was wrapped over.
    pub fn world_size(&self) -> usize {
        self.state.comm.size()
    }

    /// The configuration the model was wrapped with.
    pub fn config(&self) -> &FsdpConfig {
        &self.state.config
    }

    /// Refuses `call` between a training forward and its backward.
    pub(crate) fn check_between_steps(&self, call: &'static str) -> Result<()> {
        if self.state.training_step_pending() {
            return Err(Error::Misuse(MisuseError::StepInProgress { rank: self.rank(), call }));
        }
        Ok(())
    }

    /// The units at run time, root first.
    pub(crate) fn groups(&self) -> &[ParamGroup] {
        &self.state.groups
    }

    /// The units as checkpointing sees them, in unit order.
    pub(crate) fn unit_views(&self) -> impl Iterator<Item = UnitView<'_>> {
        self.state.groups.iter().map(|group| UnitView::new(group, &self.buffers))
    }

    /// Every buffer, as checkpointing sees it.
    pub(crate) fn buffer_views(&self) -> impl Iterator<Item = BufferView<'_>> {
        self.buffers.iter().map(BufferView::new)
    }

    pub(crate) fn ties(&self) -> &[Tie] {
        &self.ties
    }

    /// The world's communicator.
    pub(crate) fn comm(&self) -> &Arc<dyn Collectives> {
        &self.state.comm
    }
}

/// This rank's shard group and replica group under hybrid sharding
/// ([`FsdpConfig::shard_group_size`]): groups of `size` consecutive ranks of `world`, and
/// the ranks at the same position in every group; without it (or with one group), the
/// world and no replicas. A collective over `world` (one small all-gather of the
/// members' global ranks, which the groups are named by).
fn hybrid_groups(world: &Arc<dyn Collectives>, config: &FsdpConfig) -> Result<UnitComms> {
    let plain = UnitComms { shards: world.clone(), replicas: None };
    let Some(size) = config.shard_group_size else {
        return Ok(plain);
    };
    let n = world.size();
    let refuse = |problem: String| {
        Err(Error::Config(ConfigError::BadShardGroup { rank: world.global_rank(), world: n, size, problem }))
    };
    if !config.strategy.shards() {
        return refuse("NO_SHARD shards nothing; hybrid sharding needs FULL_SHARD or SHARD_GRAD_OP".into());
    }
    if size == 0 || !n.is_multiple_of(size) {
        return refuse(format!("{n} ranks do not split into groups of {size}"));
    }
    if size == n {
        return Ok(plain);
    }
    let mine = Tensor::new(&[world.global_rank() as u32], &world.device())?;
    let globals = world.all_gather(&mine, "the global ranks of the world (hybrid sharding)")?.wait()?;
    let globals = globals.to_device(&candle_core::Device::Cpu)?.to_vec1::<u32>()?;
    let global = |rank: usize| globals[rank] as usize;
    let me = world.rank();
    let first = me / size * size;
    let shard_ranks: Vec<usize> = (first..first + size).map(global).collect();
    let replica_ranks: Vec<usize> = (me % size..n).step_by(size).map(global).collect();
    // Every rank makes its shard group first, then its replica group: the members of each
    // meet in the same order.
    let shards: Arc<dyn Collectives> = world.new_group(&shard_ranks)?.into();
    let replicas: Arc<dyn Collectives> = world.new_group(&replica_ranks)?.into();
    Ok(UnitComms { shards, replicas: Some(replicas) })
}

/// The dtype parameter `param` of unit `unit` is gathered and computed in, when the
/// policy casts it (`None` when it computes in its own dtype). A policy casts only
/// floating-point parameters, and only to a floating-point dtype.
fn check_precision(unit: &str, param: &ParamInfo, policy: &MixedPrecision) -> Result<Option<DType>> {
    let model = param.tensor.dtype();
    let casts = [policy.param_dtype, policy.reduce_dtype].into_iter().flatten().find(|&d| d != model);
    let Some(dtype) = casts else {
        return Ok(None);
    };
    let refuse = |problem: String| {
        Err(Error::Config(ConfigError::MixedPrecisionPolicy { unit: unit.to_string(), dtype, problem }))
    };
    if !dtype.is_float() {
        return refuse("only floating-point dtypes can be computed or reduced in".to_string());
    }
    if !model.is_float() {
        return refuse(format!("`{}` is {model:?}: integer parameters cannot be cast", param.fqn));
    }
    Ok(Some(policy.param_dtype_for(model)).filter(|&d| d != model))
}

/// Hands each `Unit` of the wrapped model its runtime, in declaration order (the order of
/// the layout's units).
struct CellInstaller {
    hooks: Arc<dyn UnitHooks>,
    next: usize,
    error: Option<Error>,
}

impl Visitor for CellInstaller {
    fn enter(&mut self, _name: &'static str) {}
    fn enter_index(&mut self, _index: usize) {}
    fn leave(&mut self) {}
    fn tensor(&mut self, _tensor: &Tensor, _role: Role) {}
    fn leave_unit(&mut self) {}

    fn enter_unit(&mut self, cell: &UnitCell) {
        if let Err(error) = cell.install(self.hooks.clone(), self.next) {
            self.error.get_or_insert(error);
        }
        self.next += 1;
    }
}
