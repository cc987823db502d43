//! A per-rank record of what the runtime did, for tests and for users who want to see
//! gathers, prefetches, frees and reductions in order. Each event is also emitted as a
//! `tracing` event.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Why a unit's parameters were gathered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnshardCause {
    /// For the unit's own forward.
    Forward,
    /// Ahead of the unit's forward, when an earlier unit's forward started
    /// ([`FsdpConfig::forward_prefetch`](crate::FsdpConfig#structfield.forward_prefetch)).
    ForwardPrefetch,
    /// For the unit's own backward.
    Backward,
    /// Ahead of the unit's backward, by another unit's backward prefetch
    /// ([`FsdpConfig::backward_prefetch`](crate::FsdpConfig#structfield.backward_prefetch)).
    BackwardPrefetch,
    /// [`crate::Fsdp::summon_full_params`].
    Summon,
}

impl UnshardCause {
    /// Gathered ahead of use rather than for it.
    pub fn is_prefetch(self) -> bool {
        matches!(self, Self::ForwardPrefetch | Self::BackwardPrefetch)
    }
}

/// One thing the runtime did on a rank, as [`crate::Diagnostics::trace`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceEvent {
    /// The unit's parameters were all-gathered.
    Unshard {
        /// The unit's name.
        unit: String,
        /// Why they were gathered.
        cause: UnshardCause,
    },
    /// The unit's gathered parameters were freed.
    Reshard {
        /// The unit's name.
        unit: String,
    },
    /// The gradient reached the unit's outputs.
    PreBackward {
        /// The unit's name.
        unit: String,
    },
    /// A backward prefetch decision (made at pre-backward under `BACKWARD_PRE`, at
    /// post-backward under `BACKWARD_POST`): the unit to prefetch, or `None`.
    BackwardPrefetch {
        /// The unit whose backward made the decision.
        unit: String,
        /// The unit to prefetch, or `None` when there is none.
        target: Option<String>,
    },
    /// The unit's gradients were reduced (`params` of them had gradients).
    ReduceGrads {
        /// The unit's name.
        unit: String,
        /// How many of the unit's parameters had gradients.
        params: usize,
    },
    /// The unit's backward is complete.
    PostBackward {
        /// The unit's name.
        unit: String,
    },
}

/// The most recent events, at most [`Trace::CAPACITY`]: a long run that never reads its
/// trace keeps a bounded window instead of growing without end.
#[derive(Default)]
pub(crate) struct Trace {
    events: Mutex<VecDeque<TraceEvent>>,
}

impl Trace {
    pub const CAPACITY: usize = 1 << 16;

    pub fn record(&self, event: TraceEvent) {
        tracing::debug!(?event, "fsdp");
        let mut events = self.events.lock().expect("trace lock");
        if events.len() == Self::CAPACITY {
            events.pop_front();
        }
        events.push_back(event);
    }

    /// The events kept, oldest first, leaving them in place.
    pub fn events(&self) -> Vec<TraceEvent> {
        self.events.lock().expect("trace lock").iter().cloned().collect()
    }

    /// The events kept, oldest first, clearing the record.
    pub fn take(&self) -> Vec<TraceEvent> {
        std::mem::take(&mut *self.events.lock().expect("trace lock")).into()
    }
}
