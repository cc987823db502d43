//! [`Diagnostics`]: what a wrapped model tells about its run, apart from training it —
//! the trace of gathers, frees and reductions, the gathered memory, the activation
//! profile, the backward hooks alive, the units.

use super::{ActivationProfile, Fsdp, MemoryStats, TraceEvent};
use std::sync::atomic::Ordering::Relaxed;

/// What a wrapped model tells about its run: `fsdp.diagnostics()`.
pub struct Diagnostics<'a, M> {
    fsdp: &'a Fsdp<M>,
}

impl<M> Fsdp<M> {
    /// The model's trace, memory figures, activation profile and units.
    pub fn diagnostics(&self) -> Diagnostics<'_, M> {
        Diagnostics { fsdp: self }
    }
}

impl<M> Diagnostics<'_, M> {
    /// The most recent events on this rank (at most 65,536), oldest first, leaving them in
    /// place.
    pub fn trace(&self) -> Vec<TraceEvent> {
        self.fsdp.state.recorders.trace.events()
    }

    /// As [`Diagnostics::trace`], and clears the record.
    pub fn take_trace(&self) -> Vec<TraceEvent> {
        self.fsdp.state.recorders.trace.take()
    }

    /// This rank's gathered parameter bytes, now and at their peak.
    pub fn memory(&self) -> MemoryStats {
        self.fsdp.state.recorders.memory.stats()
    }

    /// Starts a new [`MemoryStats::gathered_peak`] from the bytes gathered now.
    pub fn reset_memory_peak(&self) {
        self.fsdp.state.recorders.memory.reset_peak()
    }

    /// With `true`, every training forward measures what each unit keeps for the
    /// backward ([`Diagnostics::activation_profile`]). It walks the autograd graph at the
    /// end of every unit: turn it on for a step to plan with, not for a whole run.
    pub fn set_activation_profiling(&self, on: bool) {
        self.fsdp.state.profiling.store(on, Relaxed);
    }

    /// What the last profiled training forward kept for its backward, unit by unit (the
    /// root first): the tensors each unit's forward added to the autograd graph, views
    /// and the gathered parameters left out. `None` before any profiled forward.
    pub fn activation_profile(&self) -> Option<ActivationProfile> {
        self.fsdp.state.last_profile.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many backward hooks the graphs of earlier forwards still hold: one per hooked
    /// output tensor of each unit's forward, gone when those outputs are dropped.
    pub fn live_backward_hooks(&self) -> usize {
        self.fsdp.state.live_hooks.load(Relaxed)
    }

    /// The units' names and their trained parameters' FQNs, root first.
    pub fn units(&self) -> Vec<(String, Vec<String>)> {
        let groups = self.fsdp.groups();
        groups.iter().map(|u| (u.name.clone(), u.params.iter().map(|p| p.fqn.clone()).collect())).collect()
    }
}

/// The methods' earlier places, kept so that code written for them still builds, with a
/// warning that names the new one.
#[doc(hidden)]
impl<M> Fsdp<M> {
    #[deprecated(note = "use `fsdp.diagnostics().trace()`")]
    pub fn trace(&self) -> Vec<TraceEvent> {
        self.diagnostics().trace()
    }

    #[deprecated(note = "use `fsdp.diagnostics().take_trace()`")]
    pub fn take_trace(&self) -> Vec<TraceEvent> {
        self.diagnostics().take_trace()
    }

    #[deprecated(note = "use `fsdp.diagnostics().memory()`")]
    pub fn memory(&self) -> MemoryStats {
        self.diagnostics().memory()
    }

    #[deprecated(note = "use `fsdp.diagnostics().reset_memory_peak()`")]
    pub fn reset_memory_peak(&self) {
        self.diagnostics().reset_memory_peak()
    }

    #[deprecated(note = "use `fsdp.diagnostics().set_activation_profiling(on)`")]
    pub fn set_activation_profiling(&self, on: bool) {
        self.diagnostics().set_activation_profiling(on)
    }

    #[deprecated(note = "use `fsdp.diagnostics().activation_profile()`")]
    pub fn activation_profile(&self) -> Option<ActivationProfile> {
        self.diagnostics().activation_profile()
    }

    #[deprecated(note = "use `fsdp.diagnostics().live_backward_hooks()`")]
    pub fn live_backward_hooks(&self) -> usize {
        self.diagnostics().live_backward_hooks()
    }

    #[deprecated(note = "use `fsdp.diagnostics().units()`")]
    pub fn units(&self) -> Vec<(String, Vec<String>)> {
        self.diagnostics().units()
    }
}
