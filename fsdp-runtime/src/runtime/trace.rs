//! A per-rank record of what the runtime did, for tests and for users who want to see
//! gathers, prefetches, frees and reductions in order. Each event is also emitted as a
//! `tracing` event.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Why a unit's parameters were gathered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnshardCause {
    Forward,
    ForwardPrefetch,
    Backward,
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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceEvent {
    /// The unit's parameters were all-gathered.
    Unshard { unit: String, cause: UnshardCause },
    /// The unit's gathered parameters were freed.
    Reshard { unit: String },
    /// The gradient reached the unit's outputs.
    PreBackward { unit: String },
    /// A backward prefetch decision (made at pre-backward under `BACKWARD_PRE`, at
    /// post-backward under `BACKWARD_POST`): the unit to prefetch, or `None`.
    BackwardPrefetch { unit: String, target: Option<String> },
    /// The unit's gradients were reduced (`params` of them had gradients).
    ReduceGrads { unit: String, params: usize },
    /// The unit's backward is complete.
    PostBackward { unit: String },
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
