//! How ranks meet and talk; knows no model.
//!
//! [`Collectives`] is what the runtime needs from a group of ranks (all-gather,
//! reduce-scatter, all-reduce, broadcast, barrier, sub-groups, abort). Its backends:
//! [`ThreadComm`] for ranks as threads of one process, [`TcpComm`] for ranks as processes on
//! CPUs (like PyTorch's gloo), and `NcclComm` (feature `cuda`) for GPUs. Processes meet
//! through a [`Store`] served by rank 0 ([`Rendezvous`], reading torchrun's [`DistEnv`]),
//! or under torchrun through the c10d store its agent serves ([`AgentStore`]); a failing
//! process leaves its error for torchrun with [`record_error`].
//! At the crate root, [`crate::ProcessGroup`] is one process's rank and [`crate::launch`]
//! runs ranks as threads.

mod c10d_store;
mod collectives;
mod elastic_error_file;
pub(crate) mod launch;
mod launcher_env;
#[cfg(feature = "cuda")]
mod nccl;
pub(crate) mod process_group;
mod rendezvous;
mod store;
mod tcp;
mod threads;

pub use collectives::{Collectives, OpKind, Pending, ReduceOp, Work};
pub use elastic_error_file::{record_error, write_error_file};
#[allow(deprecated)]
pub use launch::share_cpu_cores;
pub use launch::{cpu_threads_per_rank, run_on_cpu_threads, RANK_STACK_SIZE};
#[cfg(feature = "cuda")]
pub use launch::{launch_gpus, launch_gpus_each};
#[cfg(feature = "cuda")]
pub use nccl::{check_libraries, gpu_count, NcclComm};
pub use rendezvous::{AgentStore, DistEnv, Rendezvous};
pub use store::{Store, StoreServer};
pub use tcp::TcpComm;
pub use threads::{ThreadComm, ThreadWorld};
