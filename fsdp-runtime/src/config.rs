//! How a model is sharded and run: [`FsdpConfig`] and the policies it is made of, small
//! value types like PyTorch's `ShardingStrategy` and `BackwardPrefetch`.

use crate::error::ConfigError;
use crate::error::{Error, Result};
use candle_core::DType;
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
    /// Every strategy: the names [`FromStr`] accepts, in the order its error lists them.
    pub const ALL: [ShardingStrategy; 3] = [Self::FullShard, Self::ShardGradOp, Self::NoShard];

    /// The spelling on command lines and in messages (`full-shard`, `shard-grad-op`,
    /// `no-shard`), which `Display` writes and [`FromStr`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Self::FullShard => "full-shard",
            Self::ShardGradOp => "shard-grad-op",
            Self::NoShard => "no-shard",
        }
    }

    /// Whether parameters are split over the ranks (all but `NoShard`).
    pub fn shards(self) -> bool {
        self != Self::NoShard
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
    /// Every mode: the names [`FromStr`] accepts, in the order its error lists them.
    pub const ALL: [BackwardPrefetch; 3] = [Self::None, Self::Pre, Self::Post];

    /// The spelling on command lines and in messages (`none`, `backward-pre`,
    /// `backward-post`), which `Display` writes and [`FromStr`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Pre => "backward-pre",
            Self::Post => "backward-post",
        }
    }
}

/// `Display` and `FromStr` through the policy's `name` and `ALL`, so command lines and
/// messages use one spelling.
macro_rules! named_policy {
    ($policy:ident, $what:literal) => {
        impl fmt::Display for $policy {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $policy {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                Self::ALL.into_iter().find(|policy| policy.name() == s).ok_or_else(|| {
                    Error::Config(ConfigError::UnknownOption {
                        what: $what,
                        value: s.to_string(),
                        expected: Self::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
                    })
                })
            }
        }
    };
}

named_policy!(ShardingStrategy, "sharding strategy");
named_policy!(BackwardPrefetch, "backward prefetch");

/// What to do when units run forward in another order than the static one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderCheck {
    /// Log a warning for the first mismatch of each step (prefetching then targets the
    /// wrong unit: correct results, wasted memory).
    Warn,
    /// Fail the forward with an error naming both units.
    Strict,
}

/// Which dtypes the units compute and communicate in (FSDP2's `MixedPrecisionPolicy`).
///
/// The shards, their gradients and the optimizer state stay in the model's dtype (the
/// master weights, usually f32). Each shard is cast to `param_dtype` before its
/// all-gather, so the gather moves and the forward and backward compute in that dtype;
/// the full gradients are cast to `reduce_dtype` for their reduction and land on the
/// shards in the model's dtype. `None` keeps the model's dtype (for `reduce_dtype`:
/// `param_dtype`'s, as in FSDP2). The model's own constants (masks, rotary tables) are
/// not cast: a model meant for mixed precision casts them to its activations' dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MixedPrecision {
    /// What parameters are gathered and computed in.
    pub param_dtype: Option<DType>,
    /// What gradients are reduced in.
    pub reduce_dtype: Option<DType>,
    /// What the root's floating-point outputs are cast to.
    pub output_dtype: Option<DType>,
    /// Cast the floating-point inputs of every unit (and of [`crate::Fsdp::forward_with`])
    /// to `param_dtype`.
    pub cast_forward_inputs: bool,
}

impl Default for MixedPrecision {
    /// Everything in the model's dtype.
    fn default() -> Self {
        Self { param_dtype: None, reduce_dtype: None, output_dtype: None, cast_forward_inputs: true }
    }
}

impl MixedPrecision {
    /// Computes in `param_dtype` and reduces gradients in f32, with the root's outputs in
    /// f32: the recipe of most large-model training (torchtitan's default for bf16).
    pub fn compute_in(param_dtype: DType) -> Self {
        Self {
            param_dtype: Some(param_dtype),
            reduce_dtype: Some(DType::F32),
            output_dtype: Some(DType::F32),
            cast_forward_inputs: true,
        }
    }

    /// Sets `reduce_dtype` to `dtype`.
    pub fn reduce_dtype(mut self, dtype: DType) -> Self {
        self.reduce_dtype = Some(dtype);
        self
    }

    /// The dtype a unit whose parameters are `model` computes in (integer parameters are
    /// never cast: wrapping refuses a policy for them).
    pub fn param_dtype_for(&self, model: DType) -> DType {
        if model.is_float() {
            self.param_dtype.unwrap_or(model)
        } else {
            model
        }
    }

    /// The dtype a unit whose parameters are `model` reduces its gradients in.
    pub fn reduce_dtype_for(&self, model: DType) -> DType {
        if model.is_float() {
            self.reduce_dtype.unwrap_or(self.param_dtype_for(model))
        } else {
            model
        }
    }

    /// Whether any dtype differs from the model's.
    pub fn is_active(&self) -> bool {
        self.param_dtype.is_some() || self.reduce_dtype.is_some() || self.output_dtype.is_some()
    }
}

/// FQN patterns of frozen parameters ([`FsdpConfig::frozen`]). Each distinct set is
/// stored once for the life of the process, where a `Copy` configuration can point to it:
/// so [`FsdpConfig`] stays `Copy`, and a rank's closure can wrap with it on every rank. A
/// run makes a handful of configurations, so what is kept is a few strings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrozenPatterns(&'static [String]);

impl FrozenPatterns {
    /// The set of `patterns`, in order.
    pub fn new<S: Into<String>>(patterns: impl IntoIterator<Item = S>) -> Self {
        static SETS: std::sync::Mutex<Vec<&'static [String]>> = std::sync::Mutex::new(Vec::new());
        let patterns: Vec<String> = patterns.into_iter().map(Into::into).collect();
        if patterns.is_empty() {
            return Self::default();
        }
        let mut sets = SETS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(&known) = sets.iter().find(|&&known| known == patterns.as_slice()) {
            return Self(known);
        }
        let stored: &'static [String] = Box::leak(patterns.into_boxed_slice());
        sets.push(stored);
        Self(stored)
    }

    /// The patterns, in the order given.
    pub fn patterns(&self) -> &'static [String] {
        self.0
    }
}

/// The options of [`crate::Fsdp::wrap`].
#[derive(Clone, Copy, Debug)]
pub struct FsdpConfig {
    /// How parameters are split over the ranks; default [`ShardingStrategy::FullShard`].
    pub strategy: ShardingStrategy,
    /// Which unit the backward pass gathers ahead; default [`BackwardPrefetch::Pre`].
    pub backward_prefetch: BackwardPrefetch,
    /// Gather the next unit of the static forward order when a unit's forward starts.
    pub forward_prefetch: bool,
    /// At most this many units gathered ahead of use at once; further prefetches wait
    /// for the unit's own turn.
    pub max_prefetch_in_flight: usize,
    /// What a forward out of the static unit order does; default [`OrderCheck::Warn`].
    pub order_check: OrderCheck,
    /// Broadcast rank 0's parameters and buffers at wrap time, so ranks that built their
    /// models differently still start from the same state.
    pub sync_module_states: bool,
    /// The dtypes units compute and reduce in; the default keeps the model's dtype.
    pub mixed_precision: MixedPrecision,
    /// Hybrid sharding (PyTorch's `HYBRID_SHARD`, FSDP2's 2-D mesh): parameters are
    /// sharded within groups of this many consecutive ranks (a node, say) and replicated
    /// across the groups; gradients are reduce-scattered within a group, then averaged
    /// across the replicas by one all-reduce. With `SHARD_GRAD_OP` this is
    /// `_HYBRID_SHARD_ZERO2`. `None`, or the world size: one group, plain FSDP.
    pub shard_group_size: Option<usize>,
    /// Checkpoint the activations of every unit that holds no other unit (the root
    /// excepted): its forward keeps only its inputs, and its backward runs the forward
    /// again. Such units are called through `Module::forward` or [`crate::Unit::run_fn`].
    pub activation_checkpointing: bool,
    /// Run every collective even over a group of one rank, where it is skipped otherwise
    /// (a gather is then a copy of the shard, a reduction the gradient itself): one GPU
    /// then exercises the path of several (all-gather, copy-out, reduce-scatter). Same
    /// results; for checking the communication path.
    #[doc(hidden)]
    pub collectives_at_world_one: bool,
    /// FQN patterns of the parameters that are not trained (PyTorch's
    /// `requires_grad=False`): `*` stands for any run of characters, dots included, and
    /// `?` for one; a pattern starting with `!` keeps what it matches trained, and the
    /// last pattern that matches a parameter decides (`["*", "!*.lora_?.weight"]`). A frozen parameter is sharded and gathered as any other, but autograd
    /// computes no gradient for it, it is never reduced, and it is not among
    /// [`crate::Fsdp::parameters`], so an optimizer keeps no state for it. A pattern that
    /// matches no parameter is refused at wrap time.
    pub frozen: FrozenPatterns,
}

impl Default for FsdpConfig {
    fn default() -> Self {
        Self {
            strategy: ShardingStrategy::FullShard,
            backward_prefetch: BackwardPrefetch::Pre,
            forward_prefetch: false,
            max_prefetch_in_flight: 2,
            order_check: OrderCheck::Warn,
            sync_module_states: true,
            mixed_precision: MixedPrecision::default(),
            shard_group_size: None,
            activation_checkpointing: false,
            collectives_at_world_one: false,
            frozen: FrozenPatterns::default(),
        }
    }
}

impl FsdpConfig {
    /// Sets the `strategy` field.
    pub fn strategy(mut self, strategy: ShardingStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Sets the `backward_prefetch` field.
    pub fn backward_prefetch(mut self, mode: BackwardPrefetch) -> Self {
        self.backward_prefetch = mode;
        self
    }

    /// Sets the `forward_prefetch` field.
    pub fn forward_prefetch(mut self, on: bool) -> Self {
        self.forward_prefetch = on;
        self
    }

    /// Sets the `order_check` field.
    pub fn order_check(mut self, check: OrderCheck) -> Self {
        self.order_check = check;
        self
    }

    /// Sets the `mixed_precision` field.
    pub fn mixed_precision(mut self, policy: MixedPrecision) -> Self {
        self.mixed_precision = policy;
        self
    }

    /// Shards within groups of `ranks` consecutive ranks and replicates across them
    /// ([`FsdpConfig::shard_group_size`]).
    pub fn hybrid_shard(mut self, ranks: usize) -> Self {
        self.shard_group_size = Some(ranks);
        self
    }

    /// Sets [`FsdpConfig::activation_checkpointing`].
    pub fn activation_checkpointing(mut self, on: bool) -> Self {
        self.activation_checkpointing = on;
        self
    }

    /// Adds FQN patterns to [`FsdpConfig::frozen`].
    pub fn freeze<S: Into<String>>(mut self, patterns: impl IntoIterator<Item = S>) -> Self {
        let added = patterns.into_iter().map(Into::into);
        self.frozen = FrozenPatterns::new(self.frozen.patterns().iter().cloned().chain(added));
        self
    }

    #[doc(hidden)]
    pub fn collectives_at_world_one(mut self, on: bool) -> Self {
        self.collectives_at_world_one = on;
        self
    }

    /// Whether a group of `size` ranks runs its collectives: always with peers, over one
    /// rank only with `collectives_at_world_one`.
    pub(crate) fn communicates_over(&self, size: usize) -> bool {
        size > 1 || self.collectives_at_world_one
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_their_own_names_and_refuse_others() {
        for strategy in ShardingStrategy::ALL {
            assert_eq!(strategy.to_string().parse::<ShardingStrategy>().unwrap(), strategy);
        }
        for mode in BackwardPrefetch::ALL {
            assert_eq!(mode.to_string().parse::<BackwardPrefetch>().unwrap(), mode);
        }
        let error = "zero-3".parse::<ShardingStrategy>().unwrap_err().to_string();
        assert_eq!(error, "unknown sharding strategy `zero-3` (expected one of: full-shard, shard-grad-op, no-shard)");
    }
}
