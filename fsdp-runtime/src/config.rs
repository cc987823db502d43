//! How a model is sharded and run.

pub use crate::plan::{BackwardPrefetch, ShardingStrategy};

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
}
