//! The CPU backend: N ranks as threads of one process, meeting in shared memory.
//!
//! Each collective call deposits the rank's contribution in a slot keyed by the group and
//! the call's sequence number, and waiting blocks (with a deadline) until every rank of the
//! group has deposited. A rank that fails, panics or times out aborts the world, so every
//! other rank's pending and future calls fail at once with an error naming the cause
//! instead of waiting for a peer that will never come.

use super::collectives::{checked_issue, group_members, Collectives, OpKind, Pending, ReduceOp, Work};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The shared meeting point of all ranks of one thread world.
pub struct ThreadWorld {
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    slots: HashMap<SlotKey, Slot>,
    aborted: Option<String>,
    /// How many groups of each rank set each global rank has created, so that two groups
    /// over the same ranks never share slots.
    groups_created: HashMap<(usize, Arc<[usize]>), u64>,
}

/// A group (its ranks and which instance of a group over them) and a call number.
type SlotKey = (Arc<[usize]>, u64, u64);

/// One collective call in progress.
struct Slot {
    kind: OpKind,
    len: usize,
    dtype: Option<DType>,
    label: String,
    first_rank: usize,
    contributions: Vec<Option<Tensor>>,
    arrived: Vec<bool>,
    departed: usize,
    /// A later call that did not match this one: what it was, e.g. "rank 1's all_reduce of
    /// 4 F32 elements for unit `x`". The ranks already waiting here report it.
    mismatch: Option<String>,
}

/// A call for messages: "all_reduce of 4 F32 elements", or "barrier".
fn describe(kind: OpKind, len: usize, dtype: Option<DType>) -> String {
    match dtype {
        Some(dtype) => format!("{kind} of {len} {dtype:?} elements"),
        None => kind.to_string(),
    }
}

impl ThreadWorld {
    /// A world of `size` ranks whose collectives wait at most `timeout` for their peers.
    pub fn new(size: usize, timeout: Duration) -> Result<Self> {
        if size == 0 {
            return Err(Error::EmptyWorld);
        }
        Ok(Self { shared: Arc::new(Shared { size, timeout, state: Mutex::default(), changed: Condvar::new() }) })
    }

    /// The number of ranks in the world.
    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// Rank `rank`'s handle to the group of all ranks.
    pub fn communicator(&self, rank: usize) -> Result<ThreadComm> {
        if rank >= self.shared.size {
            return Err(Error::NoSuchRank { rank, world_size: self.shared.size });
        }
        let group: Arc<[usize]> = (0..self.shared.size).collect();
        Ok(ThreadComm::new(self.shared.clone(), group, 0, rank))
    }

    /// Fails every pending and future collective with `reason`. The first reason sticks.
    pub fn abort(&self, reason: String) {
        self.shared.abort(reason);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking rank never holds this lock while running user code, so the state is
        // consistent even if the mutex was poisoned.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn abort(&self, reason: String) {
        let mut state = self.lock();
        state.aborted.get_or_insert(reason);
        self.changed.notify_all();
    }
}

/// One rank's handle to one group of a [`ThreadWorld`].
pub struct ThreadComm {
    shared: Arc<Shared>,
    /// The group's global ranks, ascending.
    group: Arc<[usize]>,
    /// Which group over these ranks this is: 0 for the world, then one per `new_group`.
    instance: u64,
    /// This rank's position in `group`.
    rank: usize,
    next_call: AtomicU64,
}

impl ThreadComm {
    fn new(shared: Arc<Shared>, group: Arc<[usize]>, instance: u64, global_rank: usize) -> Self {
        let rank = group.iter().position(|&r| r == global_rank).expect("member of its group");
        Self { shared, group, instance, rank, next_call: AtomicU64::new(0) }
    }

    fn issue(&self, kind: OpKind, input: Option<&Tensor>, label: &str) -> Result<Work> {
        let global_rank = self.group[self.rank];
        let (len, dtype) = match input {
            Some(t) => (t.elem_count(), Some(t.dtype())),
            None => (0, None),
        };
        let call = self.next_call.fetch_add(1, Ordering::Relaxed);
        let key = (self.group.clone(), self.instance, call);
        let mut state = self.shared.lock();
        if let Some(reason) = &state.aborted {
            return Err(Error::CollectiveAborted {
                rank: global_rank,
                op: kind.to_string(),
                label: label.to_string(),
                reason: reason.clone(),
            });
        }
        let size = self.group.len();
        let slot = state.slots.entry(key.clone()).or_insert_with(|| Slot {
            kind,
            len,
            dtype,
            label: label.to_string(),
            first_rank: global_rank,
            contributions: vec![None; size],
            arrived: vec![false; size],
            departed: 0,
            mismatch: None,
        });
        if slot.kind != kind || slot.len != len || slot.dtype != dtype {
            let op = describe(kind, len, dtype);
            let error = Error::CollectiveMismatch {
                rank: global_rank,
                op: op.clone(),
                label: label.to_string(),
                other: format!(
                    "rank {}'s {} for {}",
                    slot.first_rank,
                    describe(slot.kind, slot.len, slot.dtype),
                    slot.label
                ),
            };
            // The ranks that already joined this call fail with the mismatch too, not
            // with the abort it causes.
            slot.mismatch.get_or_insert(format!("rank {global_rank}'s {op} for {label}"));
            drop(state);
            self.shared.abort(error.to_string());
            return Err(error);
        }
        slot.contributions[self.rank] = input.cloned();
        slot.arrived[self.rank] = true;
        self.shared.changed.notify_all();
        drop(state);
        Ok(Work::new(ThreadPending {
            shared: self.shared.clone(),
            key,
            rank: self.rank,
            global_rank,
            kind,
            label: label.to_string(),
        }))
    }
}

struct ThreadPending {
    shared: Arc<Shared>,
    key: SlotKey,
    rank: usize,
    global_rank: usize,
    kind: OpKind,
    label: String,
}

impl ThreadPending {
    /// Waits for every rank of the group; returns all contributions in rank order.
    fn collect(&self) -> Result<Vec<Option<Tensor>>> {
        let deadline = Instant::now() + self.shared.timeout;
        let mut state = self.shared.lock();
        loop {
            let slot = state.slots.get(&self.key).expect("a slot lives until every rank departed");
            if let Some(other) = &slot.mismatch {
                return Err(Error::CollectiveMismatch {
                    rank: self.global_rank,
                    op: describe(slot.kind, slot.len, slot.dtype),
                    label: self.label.clone(),
                    other: other.clone(),
                });
            }
            // A call every rank joined is complete, whatever happened since: its result
            // is there to take.
            if slot.arrived.iter().all(|&a| a) {
                break;
            }
            if let Some(reason) = &state.aborted {
                return Err(Error::CollectiveAborted {
                    rank: self.global_rank,
                    op: self.kind.to_string(),
                    label: self.label.clone(),
                    reason: reason.clone(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                let missing =
                    slot.arrived.iter().enumerate().filter(|(_, a)| !**a).map(|(r, _)| self.key.0[r]).collect();
                let error = Error::CollectiveTimeout {
                    rank: self.global_rank,
                    op: self.kind.to_string(),
                    label: self.label.clone(),
                    timeout: self.shared.timeout,
                    missing,
                };
                state.aborted.get_or_insert(error.to_string());
                self.shared.changed.notify_all();
                return Err(error);
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        let slot = state.slots.get_mut(&self.key).expect("checked above");
        let contributions = slot.contributions.clone();
        slot.departed += 1;
        if slot.departed == slot.arrived.len() {
            state.slots.remove(&self.key);
        }
        Ok(contributions)
    }
}

fn present(contributions: &[Option<Tensor>]) -> Vec<&Tensor> {
    contributions.iter().map(|c| c.as_ref().expect("every data collective carries a tensor")).collect()
}

/// Sums in rank order, so every rank computes bit-identical results.
fn reduce(parts: &[Tensor], op: ReduceOp) -> candle_core::Result<Tensor> {
    let mut total = parts[0].clone();
    for part in &parts[1..] {
        total = (total + part)?;
    }
    match op {
        ReduceOp::Sum => Ok(total),
        ReduceOp::Avg => total / parts.len() as f64,
    }
}

impl Pending for ThreadPending {
    fn wait(self: Box<Self>) -> Result<Tensor> {
        let contributions = self.collect()?;
        let result = match self.kind {
            OpKind::AllGather => Tensor::cat(&present(&contributions), 0)?,
            OpKind::ReduceScatter(op) => {
                let inputs = present(&contributions);
                let chunk = inputs[0].elem_count() / inputs.len();
                let parts: Vec<Tensor> =
                    inputs.iter().map(|t| t.narrow(0, self.rank * chunk, chunk)).collect::<candle_core::Result<_>>()?;
                reduce(&parts, op)?.contiguous()?
            }
            OpKind::AllReduce(op) => {
                let parts: Vec<Tensor> = present(&contributions).into_iter().cloned().collect();
                reduce(&parts, op)?
            }
            OpKind::Broadcast { root } => present(&contributions)[root].copy()?,
            OpKind::Barrier => Tensor::zeros(0, DType::F32, &candle_core::Device::Cpu)?,
        };
        Ok(result)
    }
}

impl Collectives for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.len()
    }

    fn global_rank(&self) -> usize {
        self.group[self.rank]
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn all_gather(&self, input: &Tensor, label: &str) -> Result<Work> {
        let kind = OpKind::AllGather;
        checked_issue(self, kind, input, label, || self.issue(kind, Some(input), label))
    }

    fn reduce_scatter(&self, input: &Tensor, op: ReduceOp, label: &str) -> Result<Work> {
        let kind = OpKind::ReduceScatter(op);
        checked_issue(self, kind, input, label, || self.issue(kind, Some(input), label))
    }

    fn all_reduce(&self, input: &Tensor, op: ReduceOp, label: &str) -> Result<Work> {
        let kind = OpKind::AllReduce(op);
        checked_issue(self, kind, input, label, || self.issue(kind, Some(input), label))
    }

    fn broadcast(&self, input: &Tensor, root: usize, label: &str) -> Result<Work> {
        let kind = OpKind::Broadcast { root };
        checked_issue(self, kind, input, label, || self.issue(kind, Some(input), label))
    }

    fn barrier(&self, label: &str) -> Result<()> {
        if self.size() > 1 {
            self.issue(OpKind::Barrier, None, label)?.wait()?;
        }
        Ok(())
    }

    fn abort(&self, reason: &str) {
        self.shared.abort(reason.to_string());
    }

    fn new_group(&self, global_ranks: &[usize]) -> Result<Box<dyn Collectives>> {
        let me = self.global_rank();
        let ranks = group_members(global_ranks, me, self.shared.size)?;
        let instance = {
            let mut state = self.shared.lock();
            let count = state.groups_created.entry((me, ranks.clone())).or_insert(0);
            *count += 1;
            *count
        };
        Ok(Box::new(ThreadComm::new(self.shared.clone(), ranks, instance, me)))
    }
}
