//! How candle-fsdp's ranks meet and talk; knows no model.
//!
//! [`Collectives`] is what a group of ranks offers over flat tensors (all-gather,
//! reduce-scatter, all-reduce, broadcast, barrier, sub-groups, abort). Its backends:
//! [`ThreadComm`] for ranks as threads of one process, [`TcpComm`] for ranks as processes on
//! CPUs (like PyTorch's gloo), and `NcclComm` (feature `cuda`) for GPUs. Processes meet
//! through a [`Store`] served by rank 0 ([`Rendezvous`], reading torchrun's [`DistEnv`] or
//! a launcher's own variables), or under torchrun through the c10d store its agent serves
//! ([`AgentStore`]); a [`ProcessGroup`] is one process's rank, handing out the same
//! [`RankContext`] a thread rank gets. A failing process leaves its error for torchrun with
//! [`record_error`]. Every error is an [`Error`] naming the rank and the operation.

#![warn(missing_docs)]

mod c10d_store;
mod collectives;
mod elastic_error_file;
mod error;
mod launcher_env;
#[cfg(feature = "cuda")]
mod nccl;
mod process_group;
mod rank_context;
mod rendezvous;
mod store;
mod tcp;
mod threads;

pub use collectives::{Collectives, OpKind, Pending, ReduceOp, Work};
pub use elastic_error_file::{record_error, write_error_file};
pub use error::{Error, Result};
#[cfg(feature = "cuda")]
pub use nccl::{check_libraries, gpu_count, NcclComm};
pub use process_group::{Backend, ProcessGroup};
pub use rank_context::RankContext;
pub use rendezvous::{AgentStore, DistEnv, Rendezvous};
pub use store::{Store, StoreServer};
pub use tcp::TcpComm;
pub use threads::{ThreadComm, ThreadWorld};
