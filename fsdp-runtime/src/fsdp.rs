//! [`Fsdp`]: a model wrapped for fully sharded data parallel training on one rank.

use crate::activations::Activations;
use crate::collectives::Collectives;
use crate::config::{FsdpConfig, ShardingStrategy};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::memory::MemoryStats;
use crate::ops::GradSink;
use crate::param::{flat_shards, unflatten_gathered, ShardedParam};
use crate::pipeline::DeferredGradSink;
use crate::schema::{Role, VisitOrder, Visitor};
use crate::sharded_unit::ShardedUnit;
use crate::state::{RankState, ROOT};
use crate::table::ShardableModel;
use crate::trace::TraceEvent;
use crate::unit::UnitCell;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// A model whose parameters are sharded over the ranks of a communicator.
///
/// Each rank wraps its own copy of the model. Afterwards the rank holds only its shard of
/// every parameter ([`Fsdp::parameters`], what the optimizer steps); [`Fsdp::forward`] and
/// the model's [`crate::Unit`]s gather parameters when they are needed and free them as
/// the strategy says, and [`Fsdp::backward`] returns the shard gradients averaged over
/// the ranks.
pub struct Fsdp<M> {
    model: M,
    state: Arc<RankState>,
}

impl<M: ShardableModel> Fsdp<M> {
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
        let layout = Layout::of(&model)?;
        check_ranks_agree(comm.as_ref(), &layout)?;
        let mut unit_comms: Vec<Arc<dyn Collectives>> = vec![comm.clone(); layout.units.len()];
        for (name, group) in unit_groups {
            let index = layout.unit_named(&name).ok_or_else(|| {
                Error::Config(format!("a group is given for unit `{name}`, but the model has no such unit"))
            })?;
            unit_comms[index] = group;
        }
        let sharded = config.strategy != ShardingStrategy::NoShard;

        // Every rank starts from its group's first rank's values when asked to.
        let mut values: HashMap<TensorId, Tensor> = HashMap::new();
        for param in &layout.params {
            let group = &unit_comms[param.unit];
            let value = if config.sync_module_states && group.size() > 1 {
                let flat = param.tensor.flatten_all()?.contiguous()?;
                let label = format!("initial value of `{}`", param.fqn);
                group.broadcast(&flat, 0, &label)?.wait()?.reshape(param.tensor.shape())?
            } else {
                param.tensor.clone()
            };
            values.insert(param.tensor.id(), value);
        }

        let build_units = |sink: Weak<dyn GradSink>| -> Result<Vec<ShardedUnit>> {
            layout
                .units
                .iter()
                .enumerate()
                .map(|(index, unit)| {
                    let trained: Vec<_> =
                        unit.params.iter().map(|&p| &layout.params[p]).filter(|p| p.role == Role::Parameter).collect();
                    if let Some(other) = trained.iter().find(|p| p.tensor.dtype() != trained[0].tensor.dtype()) {
                        return Err(Error::Config(format!(
                            "unit `{}` mixes dtypes: `{}` is {:?}, `{}` is {:?}; one unit is gathered in one collective",
                            unit.display_name(),
                            trained[0].fqn,
                            trained[0].tensor.dtype(),
                            other.fqn,
                            other.tensor.dtype()
                        )));
                    }
                    let group = unit_comms[index].clone();
                    let (shard_rank, shard_world) = if sharded { (group.rank(), group.size()) } else { (0, 1) };
                    let params = trained
                        .iter()
                        .enumerate()
                        .map(|(i, p)| {
                            let full = &values[&p.tensor.id()];
                            Ok(ShardedParam::new(p.fqn.clone(), full, shard_rank, shard_world, sink.clone(), index, i)?)
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Ok(ShardedUnit::new(index, unit.display_name().to_string(), params, group, shard_world))
                })
                .collect()
        };
        let state = RankState::new(comm, config, layout.forward_order.clone(), build_units)?;

        // The model's layers now hold the gathered nodes (and the synced buffers).
        let mut replacement: HashMap<TensorId, Tensor> = values;
        for unit in &state.units {
            for (param, info) in unit.params.iter().zip(layout.units[unit.index].params.iter().map(|&p| &layout.params[p]).filter(|p| p.role == Role::Parameter)) {
                replacement.insert(info.tensor.id(), param.gathered.clone());
            }
        }
        drop(layout);
        let model = model.map_tensors(&mut |t: Tensor| Ok(replacement.get(&t.id()).cloned().unwrap_or(t)))?;
        drop(replacement);

        let mut installer = CellInstaller { state: state.clone(), next: 1, error: None };
        model.visit(&mut installer, VisitOrder::Declaration);
        if let Some(error) = installer.error {
            return Err(error);
        }
        state.release_initial()?;
        Ok(Self { model, state })
    }
}

impl<M> Fsdp<M> {
    /// Runs the model's forward `f` as the root unit: the root's parameters are gathered
    /// first and kept until the end of backward, and the outputs are hooked.
    pub fn forward<R: Activations>(&self, f: impl FnOnce(&M) -> candle_core::Result<R>) -> Result<R> {
        self.state.pre_forward(ROOT)?;
        let outputs = f(&self.model)?;
        self.state.post_forward(ROOT, outputs)
    }

    /// Backpropagates `loss`; returns a `GradStore` holding, for every shard `Var` that
    /// received a gradient, that shard's gradient averaged over the ranks.
    ///
    /// One backward per forward: a second backward through the outputs of a forward whose
    /// backward already ran fails (as PyTorch refuses to backward through a freed graph).
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        self.insert_reduced(&mut grads)?;
        Ok(grads)
    }

    /// Ends a backward run outside [`Fsdp::backward`] (a pipeline stage's
    /// `stage_backward`, or `stage_backward_input` + `stage_backward_weight`): reduces what
    /// is left, resets the step, and returns the shard gradients.
    pub fn finish_backward(&self) -> Result<GradStore> {
        let mut grads = GradStore::default();
        self.insert_reduced(&mut grads)?;
        Ok(grads)
    }

    /// Ends a pipeline stage's input pass (`stage_backward_input`): frees the gathered
    /// parameters, which the weight pass does not read. Units whose weight gradients were
    /// deferred are reduced when `stage_backward_weight` delivers them, through
    /// [`Fsdp::deferred_grad_sink`].
    pub fn finish_input_pass(&self) -> Result<()> {
        self.state.finish_input_pass()
    }

    /// The receiver of deferred weight gradients for this model's parameters: give it to
    /// the stage's `StageContext::set_grad_sink`. A unit's gradients are reduced as soon
    /// as the weight pass has delivered the last of them.
    pub fn deferred_grad_sink(&self) -> Arc<dyn DeferredGradSink> {
        self.state.clone()
    }

    fn insert_reduced(&self, grads: &mut GradStore) -> Result<()> {
        for (unit, param, grad) in self.state.finish_backward()? {
            grads.insert(self.state.units[unit].params[param].shard.as_tensor(), grad);
        }
        Ok(())
    }

    /// Runs `f` for inference: units gather and free as in training, but no backward
    /// hook is attached, the outputs are detached, and every unit (the root too) is freed
    /// at the end. candle has no grad mode, so the operations are still recorded while `f`
    /// runs; the record is dropped with the detached outputs. It may run between a
    /// training forward and its backward, which then gathers again what it needs.
    pub fn forward_inference<R: Activations>(&self, f: impl FnOnce(&M) -> candle_core::Result<R>) -> Result<R> {
        use std::sync::atomic::Ordering;
        let pending = self.state.training_step_pending();
        self.state.inference.store(true, Ordering::Relaxed);
        let outputs = self.forward(f);
        self.state.inference.store(false, Ordering::Relaxed);
        let outputs = outputs?;
        self.state.finish_inference(pending)?;
        Ok(outputs)
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
        for unit in &self.state.units {
            if let Some(param) = unit.params.iter().position(|p| p.fqn == fqn) {
                self.state.register_post_accumulate_hook(unit.index, param, Box::new(hook));
                return Ok(());
            }
        }
        Err(Error::Config(format!("no trained parameter is named `{fqn}`")))
    }

    /// How many backward hooks the graphs of earlier forwards still hold: one per hooked
    /// output tensor of each unit's forward, gone when those outputs are dropped.
    pub fn live_backward_hooks(&self) -> usize {
        self.state.live_hooks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This rank's shards of every trained parameter, in FQN-table order per unit.
    pub fn parameters(&self) -> Vec<Var> {
        self.named_parameters().into_iter().map(|(_, v)| v).collect()
    }

    pub fn named_parameters(&self) -> Vec<(String, Var)> {
        self.state
            .units
            .iter()
            .flat_map(|u| u.params.iter().map(|p| (p.fqn.clone(), p.shard.clone())))
            .collect()
    }

    /// The full value of every trained parameter, gathered from the shards. A collective:
    /// every rank must call it.
    pub fn full_parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for unit in &self.state.units {
            if unit.params.is_empty() {
                continue;
            }
            let flat = flat_shards(&unit.params)?;
            let gathered = if unit.shard_world == 1 {
                flat
            } else {
                unit.comm.all_gather(&flat, &format!("full parameters of {}", unit.label()))?.wait()?
            };
            let values = unflatten_gathered(&unit.params, &gathered, unit.shard_world)?;
            out.extend(unit.params.iter().map(|p| p.fqn.clone()).zip(values));
        }
        Ok(out)
    }

    /// The units' names and their trained parameters' FQNs, root first.
    pub fn units(&self) -> Vec<(String, Vec<String>)> {
        self.state
            .units
            .iter()
            .map(|u| (u.name.clone(), u.params.iter().map(|p| p.fqn.clone()).collect()))
            .collect()
    }

    pub fn trace(&self) -> Vec<TraceEvent> {
        self.state.trace.events()
    }

    pub fn take_trace(&self) -> Vec<TraceEvent> {
        self.state.trace.take()
    }

    pub fn memory(&self) -> MemoryStats {
        self.state.memory.stats()
    }

    pub fn reset_memory_peak(&self) {
        self.state.memory.reset_peak()
    }

    pub fn rank(&self) -> usize {
        self.state.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.state.comm.size()
    }

    pub fn config(&self) -> &FsdpConfig {
        &self.state.config
    }

    /// The wrapped model, for reading its structure. Never run it outside
    /// [`Fsdp::forward`]: the root's parameters are only gathered there, and a freed
    /// parameter keeps its shape over released storage, which candle's CPU kernels read
    /// without a bounds check.
    pub fn model(&self) -> &M {
        &self.model
    }
}

/// Refuses to wrap when the ranks disagree on the world size or on the model's shape: a
/// mismatch would otherwise surface later as a failed or mismatched collective.
fn check_ranks_agree(comm: &dyn Collectives, layout: &Layout) -> Result<()> {
    let trained = layout.params.iter().filter(|p| p.role == Role::Parameter);
    let facts = [
        comm.size() as f64,
        layout.units.len() as f64,
        trained.clone().count() as f64,
        trained.map(|p| p.tensor.elem_count()).sum::<usize>() as f64,
    ];
    // On the parameters' device: a GPU backend moves device buffers only.
    let device = layout.params.first().map_or(candle_core::Device::Cpu, |p| p.tensor.device().clone());
    let mine = Tensor::new(&facts, &device)?;
    let all = comm.all_gather(&mine, "the wrap-time check that all ranks agree")?.wait()?.to_vec1::<f64>()?;
    let describe = |f: &[f64]| {
        format!("world size {}, {} units, {} parameters, {} elements", f[0], f[1], f[2], f[3])
    };
    for (rank, theirs) in all.chunks(facts.len()).enumerate() {
        if theirs != all[..facts.len()].as_ref() {
            return Err(Error::Rank {
                rank: comm.global_rank(),
                message: format!(
                    "ranks disagree before wrapping: group rank 0 has {} but group rank {rank} has {}",
                    describe(&all[..facts.len()]),
                    describe(theirs)
                ),
            });
        }
    }
    Ok(())
}

/// Hands each `Unit` of the wrapped model its runtime, in declaration order (the order of
/// the layout's units).
struct CellInstaller {
    state: Arc<RankState>,
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
        if let Err(error) = cell.install(self.state.clone(), self.next) {
            self.error.get_or_insert(error);
        }
        self.next += 1;
    }
}
