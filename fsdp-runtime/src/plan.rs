//! The sharding plan: a model's [`Layout`] plus a world size and a strategy give each unit's
//! shard layout, the per-rank memory for parameters, gradients and optimizer state, the
//! peak of gathered parameters, and the bytes each rank sends per training step.
//!
//! Every figure is computed from the model's tensors; nothing is estimated from names.

use crate::config::{BackwardPrefetch, FsdpConfig, ShardingStrategy};
use crate::error::ConfigError;
use crate::error::{Error, Result};
use crate::model::{Layout, Role};
use crate::runtime::{backward_prefetch_target, forward_prefetch_target, ActivationProfile, UnitActivations};
use std::fmt;

/// What the plan is computed for: the wrap's [`FsdpConfig`] at a world size.
#[derive(Clone, Copy, Debug)]
pub struct PlanConfig {
    /// The number of ranks the model is sharded over.
    pub world_size: usize,
    /// The configuration the model is wrapped with (strategy, prefetch, mixed precision).
    pub fsdp: FsdpConfig,
    /// Optimizer state tensors per parameter, each the parameter's size (AdamW: 2, SGD with
    /// momentum: 1, plain SGD: 0).
    pub optimizer_states: usize,
}

impl PlanConfig {
    /// `fsdp` at `world_size` ranks, with AdamW's two states per parameter.
    pub fn new(world_size: usize, fsdp: FsdpConfig) -> Self {
        Self { world_size, fsdp, optimizer_states: 2 }
    }

    /// Sets the number of optimizer state tensors per parameter.
    pub fn optimizer_states(mut self, states: usize) -> Self {
        self.optimizer_states = states;
        self
    }
}

/// One unit of the plan.
#[derive(Clone, Debug)]
pub struct UnitPlan {
    /// The unit's name: its FQN, or `<root>`.
    pub name: String,
    /// The FQNs of the unit's tensors (parameters and buffers), in flat-parameter order.
    pub fqns: Vec<String>,
    /// Parameter elements (buffers excluded, frozen parameters included), unpadded.
    pub numel: usize,
    /// Of `numel`, the elements of frozen parameters ([`FsdpConfig::frozen`]): gathered,
    /// but without gradients, reductions or optimizer state.
    pub frozen_numel: usize,
    /// Bytes of the unit's parameters when gathered, in the compute dtype (the
    /// mixed-precision policy's `param_dtype`).
    pub gathered_bytes: usize,
    /// Bytes of the unit's full gradients before their reduction (trained parameters
    /// only): in the compute dtype as autograd makes them, or in the reduce dtype where
    /// that is wider.
    pub unreduced_grad_bytes: usize,
    /// Bytes one all-gather of the unit moves, in the compute dtype: each parameter padded
    /// to a multiple of the world size.
    pub collective_bytes: usize,
    /// Bytes one reduction of the unit's gradients moves, in the reduce dtype.
    pub reduce_bytes: usize,
    /// Bytes of this rank's shard of the unit's parameters.
    pub shard_bytes: usize,
    /// Bytes of this rank's shard of the unit's trained parameters: what its gradient
    /// shards and each optimizer state take.
    pub trained_shard_bytes: usize,
    /// Bytes of the unit's buffers, replicated on every rank.
    pub buffer_bytes: usize,
}

/// Per-rank figures of one training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankMemory {
    /// Persistent parameter storage (shards, or full replicas without sharding), buffers included.
    pub params: usize,
    /// Bytes of this rank's gradient shards, in the parameters' dtype (none for frozen ones).
    pub grads: usize,
    /// Bytes of this rank's optimizer state: `optimizer_states` times the trained
    /// parameter shards.
    pub optimizer: usize,
    /// The most gathered (unsharded) parameter bytes alive at once, beyond `params`.
    pub gathered_peak: usize,
    /// The most full gradient bytes alive at once before their reduction, beyond `grads`:
    /// a unit's full gradients live from the first one autograd hands over to the unit's
    /// reduction, so the root's span the whole backward. Zero where no reduction runs (one
    /// rank, no collectives): the full gradients then are the shards' own.
    pub unreduced_grads_peak: usize,
}

impl RankMemory {
    /// What the state and the units in flight need at once; the activations, which depend
    /// on the inputs, come on top.
    pub fn total_peak(&self) -> usize {
        self.params + self.grads + self.optimizer + self.gathered_peak + self.unreduced_grads_peak
    }
}

/// A model's sharding plan.
#[derive(Clone, Debug)]
pub struct Plan {
    /// What the plan was computed for.
    pub config: PlanConfig,
    /// Every unit, the root first, in the layout's order.
    pub units: Vec<UnitPlan>,
    /// Unit names in pre-forward order.
    pub forward_order: Vec<String>,
    /// `(unit, prefetch target)` in pre-backward order.
    pub backward_prefetch: Vec<(String, Option<String>)>,
    /// What each rank needs under this configuration.
    pub memory: RankMemory,
    /// What one rank holding the whole model would need (world size 1, no sharding).
    pub unsharded_memory: RankMemory,
    /// Bytes each rank sends in one step's collectives within its shard group (the whole
    /// world without hybrid sharding; ring algorithms).
    pub bytes_sent_per_step: usize,
    /// Bytes each rank sends in one step's all-reduces across the replicas under hybrid
    /// sharding (0 without).
    pub bytes_sent_across_groups_per_step: usize,
    /// Activations each unit's forward keeps for the backward, per rank, when given
    /// ([`Plan::with_activations`]); empty otherwise, as the layout alone cannot tell.
    pub activations: Vec<UnitActivations>,
}

impl PlanConfig {
    /// How many ranks a unit is sharded over: the shard group under hybrid sharding, else
    /// the world. An invalid group size fails as wrapping does.
    pub fn shard_group_size(&self) -> Result<usize> {
        let world = self.world_size;
        match self.fsdp.shard_group_size {
            None => Ok(world),
            Some(size) if size > 0 && world.is_multiple_of(size) && self.fsdp.strategy.shards() => Ok(size),
            Some(size) => Err(Error::Config(ConfigError::BadShardGroup {
                rank: 0,
                world,
                size,
                problem: "the group size must divide the world, under FULL_SHARD or SHARD_GRAD_OP".into(),
            })),
        }
    }
}

impl Plan {
    /// The plan of the model `layout` describes under `config`; fails with
    /// `Error::Comm(dist::Error::EmptyWorld)` for a world size of 0.
    pub fn new(layout: &Layout, config: PlanConfig) -> Result<Self> {
        if config.world_size == 0 {
            return Err(fsdp_comm::Error::EmptyWorld.into());
        }
        // Parameters split over the shard group; the rest of the world holds replicas.
        let world = config.shard_group_size()?;
        let shards = config.fsdp.strategy.shards();
        let frozen = layout.frozen_params(config.fsdp.frozen.patterns())?;
        let units: Vec<UnitPlan> = layout
            .units
            .iter()
            .enumerate()
            .map(|(index, unit)| {
                let mut plan = UnitPlan {
                    name: unit.display_name().to_string(),
                    fqns: layout.unit_fqns(index).into_iter().map(String::from).collect(),
                    numel: 0,
                    frozen_numel: 0,
                    gathered_bytes: 0,
                    unreduced_grad_bytes: 0,
                    collective_bytes: 0,
                    reduce_bytes: 0,
                    shard_bytes: 0,
                    trained_shard_bytes: 0,
                    buffer_bytes: 0,
                };
                for &p in &unit.params {
                    let param = &layout.params[p];
                    let numel = param.tensor.elem_count();
                    let size = param.tensor.dtype().size_in_bytes();
                    match param.role {
                        Role::Buffer => plan.buffer_bytes += numel * size,
                        Role::Parameter => {
                            let policy = &config.fsdp.mixed_precision;
                            let dtype = param.tensor.dtype();
                            let compute = policy.param_dtype_for(dtype).size_in_bytes();
                            let reduce = policy.reduce_dtype_for(dtype).size_in_bytes();
                            plan.numel += numel;
                            let shard = if shards { numel.div_ceil(world) } else { numel };
                            let moved = if shards { shard * world } else { numel };
                            plan.shard_bytes += shard * size;
                            plan.gathered_bytes += numel * compute;
                            plan.collective_bytes += moved * compute;
                            if frozen[p] {
                                plan.frozen_numel += numel;
                            } else {
                                plan.trained_shard_bytes += shard * size;
                                plan.unreduced_grad_bytes += numel * compute.max(reduce);
                                plan.reduce_bytes += moved * reduce;
                            }
                        }
                    }
                }
                plan
            })
            .collect();

        let memory = rank_memory(layout, &units, &config);
        let unsharded_memory = single_process_memory(layout, &frozen, config.optimizer_states);
        let forward_order = layout.forward_order.iter().map(|&u| units[u].name.clone()).collect();
        let backward_prefetch = layout
            .backward_order()
            .map(|u| {
                let target = backward_prefetch_target(&layout.post_forward_order, u).map(|t| units[t].name.clone());
                (units[u].name.clone(), target)
            })
            .collect();
        let bytes_sent_per_step = bytes_sent(&units, &config, world);
        let bytes_sent_across_groups_per_step = bytes_sent_across_groups(&units, &config, world);
        Ok(Self {
            config,
            units,
            forward_order,
            backward_prefetch,
            memory,
            unsharded_memory,
            bytes_sent_per_step,
            bytes_sent_across_groups_per_step,
            activations: Vec::new(),
        })
    }

    /// The plan with activations predicted from `profile` (what a profiled step kept,
    /// [`crate::Diagnostics::activation_profile`]) scaled by `scale`: activations grow with the
    /// sequences per rank, so a profile taken with one sequence per rank, scaled by the
    /// batch, predicts the batch (at the same sequence length, as attention grows faster).
    pub fn with_activations(mut self, profile: &ActivationProfile, scale: f64) -> Self {
        self.activations = profile
            .units
            .iter()
            .map(|u| UnitActivations { unit: u.unit.clone(), bytes: (u.bytes as f64 * scale).round() as usize })
            .collect();
        self
    }

    /// The activations all units keep at the end of the forward, per rank (0 unless
    /// [`Plan::with_activations`] gave them).
    pub fn activation_bytes(&self) -> usize {
        self.activations.iter().map(|u| u.bytes).sum()
    }
}

/// One process holding the whole model: no shards, no gathering.
fn single_process_memory(layout: &Layout, frozen: &[bool], optimizer_states: usize) -> RankMemory {
    let bytes = |keep: &dyn Fn(usize) -> bool| -> usize {
        let tensors = layout.params.iter().enumerate().filter(|&(i, _)| keep(i));
        tensors.map(|(_, p)| p.tensor.elem_count() * p.tensor.dtype().size_in_bytes()).sum()
    };
    let is_param = |i: usize| layout.params[i].role == Role::Parameter;
    let trained = bytes(&|i| is_param(i) && !frozen[i]);
    RankMemory {
        params: bytes(&|_| true),
        grads: trained,
        optimizer: trained * optimizer_states,
        gathered_peak: 0,
        unreduced_grads_peak: 0,
    }
}

fn rank_memory(layout: &Layout, units: &[UnitPlan], config: &PlanConfig) -> RankMemory {
    let shard: usize = units.iter().map(|u| u.shard_bytes).sum();
    let trained_shard: usize = units.iter().map(|u| u.trained_shard_bytes).sum();
    let buffers: usize = units.iter().map(|u| u.buffer_bytes).sum();
    let gathered_peak = match config.fsdp.strategy {
        ShardingStrategy::NoShard => 0,
        ShardingStrategy::ShardGradOp => units.iter().map(|u| u.gathered_bytes).sum(),
        ShardingStrategy::FullShard => full_shard_gathered_peak(layout, units, config),
    };
    let unreduced_grads_peak = if config.fsdp.communicates_over(config.world_size) {
        let grads = |u: &UnitPlan| u.unreduced_grad_bytes;
        layout.backward_order().map(|u| alive_with(layout, units, u, None, grads)).max().unwrap_or(0)
    } else {
        0
    };
    RankMemory {
        params: shard + buffers,
        grads: trained_shard,
        optimizer: trained_shard * config.optimizer_states,
        gathered_peak,
        unreduced_grads_peak,
    }
}

/// The `bytes` of unit `unit`, its enclosing units (their forward or backward is still in
/// progress), the root (kept from forward to the end of backward) and `prefetched`.
fn alive_with(
    layout: &Layout,
    units: &[UnitPlan],
    unit: usize,
    prefetched: Option<usize>,
    bytes: impl Fn(&UnitPlan) -> usize,
) -> usize {
    let mut alive = vec![0];
    let mut next = Some(unit);
    while let Some(u) = next {
        alive.push(u);
        next = layout.units[u].parent;
    }
    alive.extend(prefetched);
    alive.sort_unstable();
    alive.dedup();
    alive.iter().map(|&u| bytes(&units[u])).sum()
}

/// The largest set of gathered units alive at once under FULL_SHARD: a running unit with
/// its enclosing units and the root, and the unit prefetched alongside it.
fn full_shard_gathered_peak(layout: &Layout, units: &[UnitPlan], config: &PlanConfig) -> usize {
    let alive_with =
        |unit: usize, prefetched: Option<usize>| alive_with(layout, units, unit, prefetched, |u| u.gathered_bytes);
    let forward = layout.forward_order.iter().map(|&u| {
        let target =
            if config.fsdp.forward_prefetch { forward_prefetch_target(&layout.forward_order, u) } else { None };
        alive_with(u, target)
    });
    let backward = layout.backward_order().map(|u| {
        let target = match config.fsdp.backward_prefetch {
            BackwardPrefetch::Pre => backward_prefetch_target(&layout.post_forward_order, u),
            BackwardPrefetch::None | BackwardPrefetch::Post => None,
        };
        alive_with(u, target)
    });
    forward.chain(backward).max().unwrap_or(0)
}

/// Per-rank bytes sent by ring collectives within a group of `world` ranks: an
/// all-gather or reduce-scatter of `n` bytes sends `n (w-1)/w`, an all-reduce twice that.
fn bytes_sent(units: &[UnitPlan], config: &PlanConfig, world: usize) -> usize {
    let ring = |bytes: usize| bytes * (world - 1) / world;
    let gathered: usize = units.iter().map(|u| u.collective_bytes).sum();
    let reduced: usize = units.iter().map(|u| u.reduce_bytes).sum();
    let root = units[0].collective_bytes;
    match config.fsdp.strategy {
        // Forward gathers every unit; backward gathers all but the root again; gradients
        // are reduce-scattered.
        ShardingStrategy::FullShard => ring(gathered) + ring(gathered - root) + ring(reduced),
        ShardingStrategy::ShardGradOp => ring(gathered) + ring(reduced),
        ShardingStrategy::NoShard => 2 * ring(reduced),
    }
}

/// Per-rank bytes sent by the ring all-reduces across the `world_size / group` replicas
/// under hybrid sharding: each unit's reduced shard, `2 n (r-1)/r`.
fn bytes_sent_across_groups(units: &[UnitPlan], config: &PlanConfig, group: usize) -> usize {
    let replicas = config.world_size / group;
    let shards: usize = units.iter().map(|u| u.reduce_bytes / group).sum();
    2 * shards * (replicas - 1) / replicas
}

/// A byte count that displays in binary units, for humans: `Bytes(1536)` is `1.50 KiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub usize);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        // Through `pad`, so widths and alignment in format strings apply.
        if unit == 0 {
            f.pad(&format!("{} B", self.0))
        } else {
            f.pad(&format!("{value:.2} {}", UNITS[unit]))
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "world size {}, strategy {}, backward prefetch {}, forward prefetch {}, {} optimizer state(s) per trained parameter",
            c.world_size,
            c.fsdp.strategy,
            c.fsdp.backward_prefetch,
            if c.fsdp.forward_prefetch { "on" } else { "off" },
            c.optimizer_states
        )?;
        let policy = &c.fsdp.mixed_precision;
        if policy.is_active() {
            let name =
                |d: Option<candle_core::DType>| d.map_or("the model's dtype".to_string(), |d| d.as_str().to_string());
            writeln!(
                f,
                "mixed precision: gathered in {}, reduced in {}, outputs in {}",
                name(policy.param_dtype),
                name(policy.reduce_dtype.or(policy.param_dtype)),
                name(policy.output_dtype)
            )?;
        }
        writeln!(f, "\nunits ({}):", self.units.len())?;
        for unit in &self.units {
            writeln!(
                f,
                "  {:<28} {:>10} params  gathered {:>11}  shard/rank {:>11}  buffers {:>9}{}",
                unit.name,
                unit.numel,
                Bytes(unit.gathered_bytes),
                Bytes(unit.shard_bytes),
                Bytes(unit.buffer_bytes),
                match unit.frozen_numel {
                    0 => String::new(),
                    n if n == unit.numel => "  frozen".to_string(),
                    n => format!("  {n} frozen"),
                }
            )?;
            for fqn in &unit.fqns {
                writeln!(f, "      {fqn}")?;
            }
        }
        writeln!(f, "\nforward order: {}", self.forward_order.join(" -> "))?;
        writeln!(f, "backward order (unit => prefetch target):")?;
        for (unit, target) in &self.backward_prefetch {
            writeln!(f, "  {unit} => {}", target.as_deref().unwrap_or("none"))?;
        }
        let row = |f: &mut fmt::Formatter<'_>, name: &str, sharded: usize, single: usize| {
            let ratio = if single == 0 { 0.0 } else { sharded as f64 / single as f64 };
            writeln!(f, "  {name:<16} {:>12}   {:>12}   {ratio:>6.3}", Bytes(sharded), Bytes(single))
        };
        writeln!(f, "\nper-rank memory      this plan    one process    ratio")?;
        row(f, "parameters", self.memory.params, self.unsharded_memory.params)?;
        row(f, "gradients", self.memory.grads, self.unsharded_memory.grads)?;
        row(f, "optimizer state", self.memory.optimizer, self.unsharded_memory.optimizer)?;
        row(f, "gathered peak", self.memory.gathered_peak, self.unsharded_memory.gathered_peak)?;
        row(f, "unreduced grads", self.memory.unreduced_grads_peak, self.unsharded_memory.unreduced_grads_peak)?;
        row(f, "total peak", self.memory.total_peak(), self.unsharded_memory.total_peak())?;
        if !self.activations.is_empty() {
            writeln!(f, "\nactivations kept for the backward, per rank (from a profiled step):")?;
            for unit in &self.activations {
                writeln!(f, "  {:<28} {:>12}", unit.unit, Bytes(unit.bytes))?;
            }
            writeln!(f, "  {:<28} {:>12}", "all units", Bytes(self.activation_bytes()))?;
        }
        writeln!(f, "\nbytes sent per rank per step: {}", Bytes(self.bytes_sent_per_step))?;
        if let Some(group) = c.fsdp.shard_group_size.filter(|&g| g < c.world_size) {
            writeln!(
                f,
                "  hybrid sharding: within the shard group of {group} ranks {}, across the {} replicas {}",
                Bytes(self.bytes_sent_per_step),
                c.world_size / group,
                Bytes(self.bytes_sent_across_groups_per_step)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_show_in_binary_units_and_honour_widths() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(1536).to_string(), "1.50 KiB");
        assert_eq!(Bytes(3 << 30).to_string(), "3.00 GiB");
        assert_eq!(format!("[{:>10}]", Bytes(1024)), "[  1.00 KiB]");
    }
}
