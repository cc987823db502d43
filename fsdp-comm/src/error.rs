//! Errors of the communication layer. Each names the rank and, for a collective, the
//! operation and what it was for (the caller's label: a unit, a checkpoint stage).

use std::time::Duration;

/// An error of ranks meeting or talking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A world (or a plan) of zero ranks was asked for.
    #[error("a world needs at least one rank")]
    EmptyWorld,

    /// A rank number is not below the world size.
    #[error("rank {rank} does not exist in a world of {world_size} ranks")]
    NoSuchRank {
        /// The rank asked for.
        rank: usize,
        /// The number of ranks in the world.
        world_size: usize,
    },

    /// Some ranks did not join a collective (or the connection of the TCP mesh) within
    /// the timeout.
    #[error("rank {rank}: {op} for {label} timed out after {timeout:?}; rank(s) {missing:?} never joined")]
    CollectiveTimeout {
        /// The global rank that waited.
        rank: usize,
        /// The operation (e.g. "all_gather").
        op: String,
        /// What the operation was for (e.g. "unit `layers.1`").
        label: String,
        /// How long the rank waited.
        timeout: Duration,
        /// The ranks that never joined.
        missing: Vec<usize>,
    },

    /// A collective failed because the world was aborted (a rank gave up, or a
    /// connection to a peer broke).
    #[error("rank {rank}: {op} for {label} was aborted: {reason}")]
    CollectiveAborted {
        /// The global rank.
        rank: usize,
        /// The operation.
        op: String,
        /// What the operation was for.
        label: String,
        /// Why the world was aborted.
        reason: String,
    },

    /// The ranks issued different collectives at the same point (another operation,
    /// length or dtype).
    #[error("rank {rank}: {op} for {label} does not match {other}")]
    CollectiveMismatch {
        /// The global rank.
        rank: usize,
        /// This rank's operation, with its length and dtype.
        op: String,
        /// What this rank's operation was for.
        label: String,
        /// The other rank's call that it does not match.
        other: String,
    },

    /// A collective's arguments cannot work (e.g. a reduce-scatter input that does not
    /// split evenly over the group, a broadcast root outside the group).
    #[error("rank {rank}: {op} for {label}: {problem}")]
    CollectiveArgument {
        /// The global rank.
        rank: usize,
        /// The operation.
        op: String,
        /// What the operation was for.
        label: String,
        /// What is wrong with the arguments.
        problem: String,
    },

    /// A sub-group's member list is invalid: the calling rank is not in it, or it names
    /// a rank outside the world.
    #[error("rank {rank}: group {ranks:?}: {problem}")]
    BadGroup {
        /// The global rank.
        rank: usize,
        /// The group's members, as given.
        ranks: Vec<usize>,
        /// What is wrong with them.
        problem: String,
    },

    /// A GPU launch asked for more ranks than there are visible GPUs.
    #[error("rank {rank}: {wanted} GPU(s) needed, but {visible} are visible")]
    NotEnoughGpus {
        /// The rank that checked (0: the launching thread).
        rank: usize,
        /// The number of GPUs needed (one per rank).
        wanted: usize,
        /// The number of GPUs visible.
        visible: usize,
    },

    /// Processes could not meet through the store: binding it, connecting to it, or a
    /// request to it failed.
    #[error("rank {rank}: rendezvous at {addr}: {message}")]
    Rendezvous {
        /// The global rank.
        rank: usize,
        /// The address of the store, as bound or connected to.
        addr: String,
        /// What went wrong.
        message: String,
    },

    /// The launcher's environment variables are missing or inconsistent.
    #[error(
        "the launch environment (torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, \
         MASTER_PORT) is not usable: {}",
        problems.join("; ")
    )]
    LaunchEnv {
        /// Every missing or invalid variable, one entry each.
        problems: Vec<String>,
    },

    /// A failure of one rank that no more specific variant describes (a thread that could
    /// not start, a host the TCP backend cannot serve, a NCCL library that cannot load).
    #[error("rank {rank}: {message}")]
    Rank {
        /// The global rank.
        rank: usize,
        /// What went wrong.
        message: String,
    },

    /// An error of candle itself (a device error, a dtype without a NCCL type, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An I/O error of a connection or a file, with its context in the message.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The result type of the communication layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;
