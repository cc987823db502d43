//! How a model is sharded and run: [`FsdpConfig`] and the policies it is made of, small
//! value types like PyTorch's `ShardingStrategy` and `BackwardPrefetch`.

use crate::error::{Error, Result};
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
    pub const ALL: [BackwardPrefetch; 3] = [Self::None, Self::Pre, Self::Post];

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
                Self::ALL.into_iter().find(|policy| policy.name() == s).ok_or_else(|| Error::UnknownOption {
                    what: $what,
                    value: s.to_string(),
                    expected: Self::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
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

/// The options of [`crate::Fsdp::wrap`].
#[derive(Clone, Copy, Debug)]
pub struct FsdpConfig {
    pub strategy: ShardingStrategy,
    pub backward_prefetch: BackwardPrefetch,
    /// Gather the next unit of the static forward order when a unit's forward starts.
    pub forward_prefetch: bool,
    /// At most this many units gathered ahead of use at once; further prefetches wait
    /// for the unit's own turn.
    pub max_prefetch_in_flight: usize,
    pub order_check: OrderCheck,
    /// Broadcast rank 0's parameters and buffers at wrap time, so ranks that built their
    /// models differently still start from the same state.
    pub sync_module_states: bool,
    /// Run every collective even over a group of one rank, where it is skipped otherwise
    /// (a gather is then a copy of the shard, a reduction the gradient itself): one GPU
    /// then exercises the path of several (all-gather, copy-out, reduce-scatter). Same
    /// results; for checking the communication path.
    #[doc(hidden)]
    pub collectives_at_world_one: bool,
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
            collectives_at_world_one: false,
        }
    }
}

impl FsdpConfig {
    pub fn strategy(mut self, strategy: ShardingStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    pub fn backward_prefetch(mut self, mode: BackwardPrefetch) -> Self {
        self.backward_prefetch = mode;
        self
    }

    pub fn forward_prefetch(mut self, on: bool) -> Self {
        self.forward_prefetch = on;
        self
    }

    pub fn order_check(mut self, check: OrderCheck) -> Self {
        self.order_check = check;
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
