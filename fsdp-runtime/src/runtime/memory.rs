//! Per-rank accounting of gathered (unsharded) parameter bytes.

use std::sync::Mutex;

/// What [`crate::Diagnostics::memory`] reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Gathered parameter bytes alive now.
    pub gathered_bytes: usize,
    /// The most gathered parameter bytes alive at once since the last reset.
    pub gathered_peak: usize,
}

/// Counts gathered bytes as units are gathered and freed.
#[derive(Default)]
pub(crate) struct MemoryTracker {
    stats: Mutex<MemoryStats>,
}

impl MemoryTracker {
    pub fn allocated(&self, bytes: usize) {
        let mut stats = self.stats.lock().expect("memory lock");
        stats.gathered_bytes += bytes;
        stats.gathered_peak = stats.gathered_peak.max(stats.gathered_bytes);
    }

    pub fn freed(&self, bytes: usize) {
        let mut stats = self.stats.lock().expect("memory lock");
        stats.gathered_bytes -= bytes;
    }

    pub fn stats(&self) -> MemoryStats {
        *self.stats.lock().expect("memory lock")
    }

    /// Starts a new high-water mark from what is alive now.
    pub fn reset_peak(&self) {
        let mut stats = self.stats.lock().expect("memory lock");
        stats.gathered_peak = stats.gathered_bytes;
    }
}
