//! How ranks meet and talk: the communication crate (`fsdp-comm`: collectives over
//! threads, TCP and NCCL, the store, rendezvous, launcher environments, process groups),
//! and how this runtime starts ranks as threads of one process and gives each its CPU
//! threads.

#[allow(deprecated)]
pub use crate::launch::share_cpu_cores;
pub use crate::launch::{cpu_threads_per_rank, run_on_cpu_threads, RANK_STACK_SIZE};
#[cfg(feature = "cuda")]
pub use crate::launch::{launch_gpus, launch_gpus_each};
pub use fsdp_comm::*;
