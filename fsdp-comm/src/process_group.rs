//! One rank of a job made of several processes: the torchrun environment contract
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), the rendezvous,
//! and the communicator of the chosen backend. `fsdp-run`, `srun` or `mpirun` can start
//! the processes, on one node or several (torchrun not yet: its agent hosts the store).

use super::collectives::Collectives;
use super::rendezvous::{DistEnv, Rendezvous};
use super::tcp::TcpComm;
#[cfg(feature = "cuda")]
use crate::error::Error;
use crate::error::Result;
use crate::rank_context::RankContext;
use candle_core::Device;
use std::sync::Arc;
use std::time::Duration;

/// How the processes communicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors over TCP between the processes.
    Tcp,
    /// One GPU per process (`LOCAL_RANK` picks it) and NCCL collectives.
    #[cfg(feature = "cuda")]
    Nccl,
}

/// This process's rank in the job, and the rendezvous that keeps the job's store alive
/// (rank 0 serves it).
pub struct ProcessGroup {
    context: RankContext,
    rendezvous: Rendezvous,
    timeout: Duration,
}

impl ProcessGroup {
    /// Joins the job the environment describes. `timeout` bounds the rendezvous and every
    /// collective.
    pub fn from_env(backend: Backend, timeout: Duration) -> Result<Self> {
        Self::join(DistEnv::from_env()?, backend, timeout)
    }

    /// Joins the job `env` describes: meets the other processes at the store (rank 0
    /// serves it) and connects the `backend`'s communicator. `timeout` bounds the rendezvous
    /// and every collective.
    pub fn join(env: DistEnv, backend: Backend, timeout: Duration) -> Result<Self> {
        let rank = env.rank;
        let device = match backend {
            Backend::Tcp => Device::Cpu,
            #[cfg(feature = "cuda")]
            Backend::Nccl => local_gpu(&env)?,
        };
        let rendezvous = Rendezvous::join(env, timeout)?;
        let world_size = rendezvous.env.world_size;
        let comm: Arc<dyn Collectives> = match (&device, backend) {
            (_, Backend::Tcp) => Arc::new(TcpComm::connect(&rendezvous.store, rank, world_size, timeout)?),
            #[cfg(feature = "cuda")]
            (Device::Cuda(cuda), Backend::Nccl) => {
                Arc::new(super::nccl::NcclComm::world(cuda, rendezvous.store.clone(), rank, world_size, timeout)?)
            }
            #[cfg(feature = "cuda")]
            (_, Backend::Nccl) => unreachable!("local_gpu returns a CUDA device"),
        };
        Ok(Self { context: RankContext { rank, world_size, comm, device }, rendezvous, timeout })
    }

    /// What the training code of this rank needs (the same as a thread rank receives).
    pub fn context(&self) -> RankContext {
        self.context.clone()
    }

    /// The launch environment this process joined with.
    pub fn env(&self) -> &DistEnv {
        &self.rendezvous.env
    }

    /// Waits for every rank, then lets rank 0 stop serving the store. Call it at the end,
    /// after the last collective, so rank 0 does not leave while others still need it.
    pub fn finish(self) -> Result<()> {
        let Self { context, rendezvous, timeout } = self;
        drop(context);
        rendezvous.finish(timeout)
    }
}

/// The GPU `LOCAL_RANK` names, with clear errors when CUDA or NCCL cannot be loaded or
/// when the node has fewer GPUs than local ranks.
#[cfg(feature = "cuda")]
fn local_gpu(env: &DistEnv) -> Result<Device> {
    let gpus = super::nccl::gpu_count(env.rank)?;
    if env.local_world_size > gpus || env.local_rank >= gpus {
        return Err(Error::Rank {
            rank: env.rank,
            message: format!(
                "{} local ranks (LOCAL_RANK {}), but this node has {gpus} GPU(s) visible",
                env.local_world_size, env.local_rank
            ),
        });
    }
    Ok(Device::new_cuda(env.local_rank)?)
}
