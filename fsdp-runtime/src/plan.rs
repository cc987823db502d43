//! The sharding plan: a model's [`Layout`] plus a world size and a strategy give each unit's
//! shard layout, the per-rank memory for parameters, gradients and optimizer state, the
//! peak of gathered parameters, and the bytes each rank sends per training step.
//!
//! Every figure is computed from the model's tensors; nothing is estimated from names.

use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::schema::Role;
use std::fmt;
use std::str::FromStr;

/// How parameters are distributed over ranks (PyTorch's `ShardingStrategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShardingStrategy {
    /// ZeRO-3: parameters, gradients and optimizer state sharded; gathered parameters
    /// freed after each unit's forward and gathered again for its backward.
    FullShard,
    /// ZeRO-2: as `FullShard`, but gathered parameters stay from forward to backward.
    ShardGradOp,
    /// DDP: every rank holds everything; gradients are all-reduced.
    NoShard,
}

impl ShardingStrategy {
    pub const ALL: [ShardingStrategy; 3] = [Self::FullShard, Self::ShardGradOp, Self::NoShard];

    pub fn name(self) -> &'static str {
        match self {
            Self::FullShard => "full-shard",
            Self::ShardGradOp => "shard-grad-op",
            Self::NoShard => "no-shard",
        }
    }
}

impl fmt::Display for ShardingStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ShardingStrategy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|strategy| strategy.name() == s).ok_or_else(|| {
            let known: Vec<_> = Self::ALL.iter().map(|s| s.name()).collect();
            Error::Config(format!("unknown sharding strategy `{s}` (expected one of: {})", known.join(", ")))
        })
    }
}

/// Which gathered unit the backward pass requests ahead of time (PyTorch's `BackwardPrefetch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackwardPrefetch {
    /// No prefetch: each unit is gathered when its backward starts.
    None,
    /// Gather the next unit before computing the current unit's gradients.
    Pre,
    /// Gather the next unit after the current unit's gradients are computed and freed.
    Post,
}

impl BackwardPrefetch {
    pub const ALL: [BackwardPrefetch; 3] = [Self::None, Self::Pre, Self::Post];

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Pre => "backward-pre",
            Self::Post => "backward-post",
        }
    }
}

impl fmt::Display for BackwardPrefetch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackwardPrefetch {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|mode| mode.name() == s).ok_or_else(|| {
            let known: Vec<_> = Self::ALL.iter().map(|m| m.name()).collect();
            Error::Config(format!("unknown backward prefetch `{s}` (expected one of: {})", known.join(", ")))
        })
    }
}

/// What the plan is computed for.
#[derive(Clone, Copy, Debug)]
pub struct PlanConfig {
    pub world_size: usize,
    pub strategy: ShardingStrategy,
    pub backward_prefetch: BackwardPrefetch,
    pub forward_prefetch: bool,
    /// Optimizer state tensors per parameter, each the parameter's size (AdamW: 2, SGD with
    /// momentum: 1, plain SGD: 0).
    pub optimizer_states: usize,
}

impl PlanConfig {
    pub fn new(world_size: usize, strategy: ShardingStrategy) -> Self {
        Self {
            world_size,
            strategy,
            backward_prefetch: BackwardPrefetch::Pre,
            forward_prefetch: false,
            optimizer_states: 2,
        }
    }
}

/// One unit of the plan.
#[derive(Clone, Debug)]
pub struct UnitPlan {
    pub name: String,
    pub fqns: Vec<String>,
    /// Trained elements (buffers excluded), unpadded.
    pub numel: usize,
    /// Bytes of the unit's trained parameters when gathered.
    pub gathered_bytes: usize,
    /// Bytes one all-gather or reduce-scatter of the unit moves: each parameter padded to
    /// a multiple of the world size.
    pub collective_bytes: usize,
    /// Bytes of this rank's shard of the unit's trained parameters.
    pub shard_bytes: usize,
    /// Bytes of the unit's buffers, replicated on every rank.
    pub buffer_bytes: usize,
}

/// Per-rank figures of one training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankMemory {
    /// Persistent parameter storage (shards, or full replicas without sharding), buffers included.
    pub params: usize,
    pub grads: usize,
    pub optimizer: usize,
    /// The most gathered (unsharded) parameter bytes alive at once, beyond `params`.
    pub gathered_peak: usize,
}

impl RankMemory {
    pub fn total_peak(&self) -> usize {
        self.params + self.grads + self.optimizer + self.gathered_peak
    }
}

/// A model's sharding plan.
#[derive(Clone, Debug)]
pub struct Plan {
    pub config: PlanConfig,
    pub units: Vec<UnitPlan>,
    /// Unit names in pre-forward order.
    pub forward_order: Vec<String>,
    /// `(unit, prefetch target)` in pre-backward order.
    pub backward_prefetch: Vec<(String, Option<String>)>,
    pub memory: RankMemory,
    /// What one rank holding the whole model would need (world size 1, no sharding).
    pub unsharded_memory: RankMemory,
    /// Bytes each rank sends in one step's collectives (ring algorithms).
    pub bytes_sent_per_step: usize,
}

impl Plan {
    pub fn new(layout: &Layout, config: PlanConfig) -> Result<Self> {
        let world = config.world_size;
        if world == 0 {
            return Err(Error::Config("world size must be at least 1".into()));
        }
        let shards = config.strategy != ShardingStrategy::NoShard;
        let units: Vec<UnitPlan> = layout
            .units
            .iter()
            .enumerate()
            .map(|(index, unit)| {
                let mut plan = UnitPlan {
                    name: unit.display_name().to_string(),
                    fqns: layout.unit_fqns(index).into_iter().map(String::from).collect(),
                    numel: 0,
                    gathered_bytes: 0,
                    collective_bytes: 0,
                    shard_bytes: 0,
                    buffer_bytes: 0,
                };
                for &p in &unit.params {
                    let param = &layout.params[p];
                    let numel = param.tensor.elem_count();
                    let size = param.tensor.dtype().size_in_bytes();
                    match param.role {
                        Role::Buffer => plan.buffer_bytes += numel * size,
                        Role::Parameter => {
                            plan.numel += numel;
                            let shard = if shards { numel.div_ceil(world) } else { numel };
                            plan.shard_bytes += shard * size;
                            plan.gathered_bytes += numel * size;
                            plan.collective_bytes += if shards { shard * world * size } else { numel * size };
                        }
                    }
                }
                plan
            })
            .collect();

        let memory = rank_memory(layout, &units, &config);
        let unsharded_memory = single_process_memory(layout, config.optimizer_states);
        let forward_order = layout.forward_order.iter().map(|&u| units[u].name.clone()).collect();
        let backward_prefetch = layout
            .backward_order()
            .map(|u| {
                let target = layout.backward_prefetch_target(u).map(|t| units[t].name.clone());
                (units[u].name.clone(), target)
            })
            .collect();
        let bytes_sent_per_step = bytes_sent(&units, &config);
        Ok(Self { config, units, forward_order, backward_prefetch, memory, unsharded_memory, bytes_sent_per_step })
    }
}

/// One process holding the whole model: no shards, no gathering.
fn single_process_memory(layout: &Layout, optimizer_states: usize) -> RankMemory {
    let bytes = |role: Role| -> usize {
        layout
            .params
            .iter()
            .filter(|p| p.role == role)
            .map(|p| p.tensor.elem_count() * p.tensor.dtype().size_in_bytes())
            .sum()
    };
    let trained = bytes(Role::Parameter);
    RankMemory {
        params: trained + bytes(Role::Buffer),
        grads: trained,
        optimizer: trained * optimizer_states,
        gathered_peak: 0,
    }
}

fn rank_memory(layout: &Layout, units: &[UnitPlan], config: &PlanConfig) -> RankMemory {
    let shard: usize = units.iter().map(|u| u.shard_bytes).sum();
    let buffers: usize = units.iter().map(|u| u.buffer_bytes).sum();
    let gathered_peak = match config.strategy {
        ShardingStrategy::NoShard => 0,
        ShardingStrategy::ShardGradOp => units.iter().map(|u| u.gathered_bytes).sum(),
        ShardingStrategy::FullShard => full_shard_gathered_peak(layout, units, config),
    };
    RankMemory { params: shard + buffers, grads: shard, optimizer: shard * config.optimizer_states, gathered_peak }
}

/// The largest set of gathered units alive at once under FULL_SHARD: a running unit, its
/// enclosing units (their forward is still in progress), the root (kept from forward to the
/// end of backward), and the unit prefetched alongside it.
fn full_shard_gathered_peak(layout: &Layout, units: &[UnitPlan], config: &PlanConfig) -> usize {
    let alive_with = |unit: usize, prefetched: Option<usize>| -> usize {
        let mut alive = vec![0];
        let mut next = Some(unit);
        while let Some(u) = next {
            alive.push(u);
            next = layout.units[u].parent;
        }
        alive.extend(prefetched);
        alive.sort_unstable();
        alive.dedup();
        alive.iter().map(|&u| units[u].gathered_bytes).sum()
    };
    let forward = layout.forward_order.iter().map(|&u| {
        let target = if config.forward_prefetch { layout.forward_prefetch_target(u) } else { None };
        alive_with(u, target)
    });
    let backward = layout.backward_order().map(|u| {
        let target = match config.backward_prefetch {
            BackwardPrefetch::Pre => layout.backward_prefetch_target(u),
            BackwardPrefetch::None | BackwardPrefetch::Post => None,
        };
        alive_with(u, target)
    });
    forward.chain(backward).max().unwrap_or(0)
}

/// Per-rank bytes sent by ring collectives: an all-gather or reduce-scatter of `n` bytes
/// sends `n (w-1)/w`, an all-reduce twice that.
fn bytes_sent(units: &[UnitPlan], config: &PlanConfig) -> usize {
    let world = config.world_size;
    let ring = |bytes: usize| bytes * (world - 1) / world;
    let all: usize = units.iter().map(|u| u.collective_bytes).sum();
    let root = units[0].collective_bytes;
    match config.strategy {
        // Forward gathers every unit; backward gathers all but the root again; gradients
        // are reduce-scattered.
        ShardingStrategy::FullShard => ring(all) + ring(all - root) + ring(all),
        ShardingStrategy::ShardGradOp => ring(all) + ring(all),
        ShardingStrategy::NoShard => 2 * ring(all),
    }
}

/// Bytes in binary units, for humans.
pub fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "world size {}, strategy {}, backward prefetch {}, forward prefetch {}, {} optimizer state(s) per parameter",
            c.world_size,
            c.strategy,
            c.backward_prefetch,
            if c.forward_prefetch { "on" } else { "off" },
            c.optimizer_states
        )?;
        writeln!(f, "\nunits ({}):", self.units.len())?;
        for unit in &self.units {
            writeln!(
                f,
                "  {:<28} {:>10} params  gathered {:>11}  shard/rank {:>11}  buffers {:>9}",
                unit.name,
                unit.numel,
                human_bytes(unit.gathered_bytes),
                human_bytes(unit.shard_bytes),
                human_bytes(unit.buffer_bytes)
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
            writeln!(f, "  {name:<16} {:>12}   {:>12}   {ratio:>6.3}", human_bytes(sharded), human_bytes(single))
        };
        writeln!(f, "\nper-rank memory      this plan    one process    ratio")?;
        row(f, "parameters", self.memory.params, self.unsharded_memory.params)?;
        row(f, "gradients", self.memory.grads, self.unsharded_memory.grads)?;
        row(f, "optimizer state", self.memory.optimizer, self.unsharded_memory.optimizer)?;
        row(f, "gathered peak", self.memory.gathered_peak, self.unsharded_memory.gathered_peak)?;
        row(f, "total peak", self.memory.total_peak(), self.unsharded_memory.total_peak())?;
        writeln!(f, "\nbytes sent per rank per step: {}", human_bytes(self.bytes_sent_per_step))
    }
}
