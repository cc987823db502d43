//! [`Collectives`]: what the runtime needs from a group of ranks, the narrow trait behind
//! which every backend sits, and the argument checks all backends share.
//!
//! Every operation is issued first and waited on later ([`Work`]), so a backend with its
//! own communication stream (NCCL) can overlap it with compute. Every wait has a timeout,
//! and every error names the rank, the operation and what it was for (the unit).

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::fmt;
use std::sync::Arc;

/// How a reduction combines the ranks' contributions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// The element-wise sum.
    Sum,
    /// The sum divided by the group size.
    Avg,
}

/// The kind of a collective, for matching calls across ranks and for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Every rank receives all ranks' inputs, concatenated in rank order.
    AllGather,
    /// Every rank receives its chunk of the reduced inputs.
    ReduceScatter(ReduceOp),
    /// Every rank receives the whole reduced input.
    AllReduce(ReduceOp),
    /// Every rank receives the input of rank `root`.
    Broadcast {
        /// The sending rank's position in the group.
        root: usize,
    },
    /// No data: every rank waits until all have arrived.
    Barrier,
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpKind::AllGather => f.write_str("all_gather"),
            OpKind::ReduceScatter(_) => f.write_str("reduce_scatter"),
            OpKind::AllReduce(_) => f.write_str("all_reduce"),
            OpKind::Broadcast { root } => write!(f, "broadcast from rank {root}"),
            OpKind::Barrier => f.write_str("barrier"),
        }
    }
}

/// A collective that has been issued and not yet waited on.
pub trait Pending: Send {
    /// Blocks until every rank of the group has joined (or the timeout passes) and
    /// returns this rank's result.
    fn wait(self: Box<Self>) -> Result<Tensor>;
}

/// The handle to an issued collective.
pub struct Work(Box<dyn Pending>);

impl Work {
    /// Wraps a backend's pending collective.
    pub fn new(pending: impl Pending + 'static) -> Self {
        Work(Box::new(pending))
    }

    /// Waits for the collective to complete and returns this rank's result (see
    /// [`Pending::wait`]).
    pub fn wait(self) -> Result<Tensor> {
        self.0.wait()
    }
}

/// A collective that is complete when issued: over a group of one rank, every collective
/// hands back (a copy of) its input.
struct Ready(Tensor);

impl Pending for Ready {
    fn wait(self: Box<Self>) -> Result<Tensor> {
        Ok(self.0)
    }
}

/// A data collective of a message-passing backend (threads, TCP): the argument checks
/// every backend makes, then `issue`, except over a group of one rank, where the call is
/// complete at once.
pub(crate) fn checked_issue(
    comm: &dyn Collectives,
    kind: OpKind,
    input: &Tensor,
    label: &str,
    issue: impl FnOnce() -> Result<Work>,
) -> Result<Work> {
    match kind {
        OpKind::ReduceScatter(_) => check_split(comm.global_rank(), comm.size(), input.elem_count(), label)?,
        OpKind::Broadcast { root } => check_root(comm.global_rank(), comm.size(), root, label)?,
        _ => {}
    }
    if comm.size() == 1 {
        // A copy, as every backend's output is a buffer of its own (NCCL's always is): an
        // output that aliased its input would change when the input does (a shard the
        // optimizer steps).
        return Ok(Work::new(Ready(input.copy()?)));
    }
    issue()
}

// The argument checks every backend makes, so that a bad call reads the same on all.

/// A reduce-scatter input must split evenly over the group.
pub(crate) fn check_split(global_rank: usize, size: usize, len: usize, label: &str) -> Result<()> {
    if len.is_multiple_of(size) {
        return Ok(());
    }
    Err(Error::CollectiveArgument {
        rank: global_rank,
        op: OpKind::ReduceScatter(ReduceOp::Sum).to_string(),
        label: label.to_string(),
        problem: format!("{len} elements do not split over {size} ranks"),
    })
}

/// A broadcast's root must be in the group.
pub(crate) fn check_root(global_rank: usize, size: usize, root: usize, label: &str) -> Result<()> {
    if root < size {
        return Ok(());
    }
    Err(Error::CollectiveArgument {
        rank: global_rank,
        op: OpKind::Broadcast { root }.to_string(),
        label: label.to_string(),
        problem: format!("the root is not in a group of {size}"),
    })
}

/// A new group's members, ascending and without repeats; `me` must be one of them and
/// every member a rank of the world.
pub(crate) fn group_members(global_ranks: &[usize], me: usize, world: usize) -> Result<Arc<[usize]>> {
    let mut ranks = global_ranks.to_vec();
    ranks.sort_unstable();
    ranks.dedup();
    let problem = if !ranks.contains(&me) {
        format!("rank {me} is not a member")
    } else if let Some(&bad) = ranks.iter().find(|&&r| r >= world) {
        format!("names rank {bad}, but the world has {world} ranks")
    } else {
        return Ok(ranks.into());
    };
    Err(Error::BadGroup { rank: me, ranks, problem })
}

/// One rank's view of a group of ranks.
///
/// Inputs are 1-D contiguous tensors. `label` says what the operation is for (e.g.
/// "unit `encoder.layers.3`") and appears in every error about it.
pub trait Collectives: Send + Sync {
    /// This rank's position in the group.
    fn rank(&self) -> usize;
    /// The number of ranks in the group.
    fn size(&self) -> usize;
    /// The rank's global rank (its position in the whole world), for messages.
    fn global_rank(&self) -> usize;
    /// Where the tensors this backend moves live.
    fn device(&self) -> Device;

    /// Concatenates every rank's `input` (all the same length) in rank order.
    fn all_gather(&self, input: &Tensor, label: &str) -> Result<Work>;
    /// Reduces every rank's `input` (length divisible by the group size) and returns this
    /// rank's contiguous chunk of the result.
    fn reduce_scatter(&self, input: &Tensor, op: ReduceOp, label: &str) -> Result<Work>;
    /// Reduces every rank's `input` (all the same length); every rank receives the whole
    /// result.
    fn all_reduce(&self, input: &Tensor, op: ReduceOp, label: &str) -> Result<Work>;
    /// Every rank receives `root`'s `input`.
    fn broadcast(&self, input: &Tensor, root: usize, label: &str) -> Result<Work>;
    /// Returns once every rank of the group has called it; fails after the timeout.
    fn barrier(&self, label: &str) -> Result<()>;

    /// The sub-group of the listed global ranks. Every listed rank must make the same
    /// call; this rank must be among them.
    fn new_group(&self, global_ranks: &[usize]) -> Result<Box<dyn Collectives>>;

    /// Fails every pending and future collective of this rank's world with `reason`: the
    /// way a rank that cannot go on (its own work failed) keeps its peers from waiting
    /// for it. Backends that can reach the peers (threads, TCP) fail theirs at once; the
    /// first reason sticks.
    fn abort(&self, reason: &str);
}
