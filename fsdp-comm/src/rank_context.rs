//! What one rank is handed, whether it runs as a thread or as a process.

use crate::collectives::Collectives;
use candle_core::Device;
use std::sync::Arc;

/// What a rank's closure receives.
#[derive(Clone)]
pub struct RankContext {
    /// This rank, in `0..world_size`.
    pub rank: usize,
    /// The number of ranks.
    pub world_size: usize,
    /// This rank's communicator over all ranks, for wrapping a model (`Fsdp::wrap`).
    pub comm: Arc<dyn Collectives>,
    /// Where this rank's tensors live: the CPU for thread ranks, its GPU under NCCL.
    pub device: Device,
}
