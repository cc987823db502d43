//! A per-rank record of what the runtime did, for tests and for users who want to see
//! gathers, prefetches, frees and reductions in order. Each event is also emitted as a
//! `tracing` event.

use std::sync::Mutex;

/// Why a unit's parameters were gathered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnshardCause {
    Forward,
    ForwardPrefetch,
    Backward,
    BackwardPrefetch,
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

#[derive(Default)]
pub struct Trace {
    events: Mutex<Vec<TraceEvent>>,
}

impl Trace {
    pub fn record(&self, event: TraceEvent) {
        tracing::debug!(?event, "fsdp");
        self.events.lock().expect("trace lock").push(event);
    }

    /// The events so far, leaving them in place.
    pub fn events(&self) -> Vec<TraceEvent> {
        self.events.lock().expect("trace lock").clone()
    }

    /// The events so far, clearing the record.
    pub fn take(&self) -> Vec<TraceEvent> {
        std::mem::take(&mut *self.events.lock().expect("trace lock"))
    }
}
