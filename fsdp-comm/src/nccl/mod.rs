//! The GPU backend (feature `cuda`): NCCL collectives through candle's own cudarc.
//!
//! **Streams.** candle runs a rank's kernels on the thread's compute stream (CUDA's
//! per-thread default stream); each communicator has a communication stream of its own.
//! cudarc's per-buffer events would not order them (candle's kernels record no write
//! event for their outputs, and candle's copies wait on a buffer's *own* stream only), so
//! the ordering is explicit, on the rank's thread:
//!
//! - before each call the communication stream waits for everything queued on the
//!   compute stream (the kernels that wrote the input, the output's allocation);
//! - the output is allocated on the compute stream, so candle's readers of it and its
//!   free are queued on the stream that runs compute;
//! - [`Work::wait`] makes the compute stream wait for the call's completion (it does not
//!   block the host) and only then drops the input, whose free is so ordered after the
//!   call too; a collective dropped without a wait does the same before it frees.
//!
//! With every crossing ordered by hand, cudarc's own event tracking is turned off for the
//! rank's context when its first communication stream is made: once a context has two
//! streams, cudarc would otherwise record an event at every use of every buffer, which on
//! an H200 made plain candle training steps 30-40% slower. The rule this relies on: on a
//! rank's context, only this module touches a buffer from a stream other than candle's.
//!
//! **No hangs.** A collective whose peer never comes would stall the GPU for ever, and
//! the host with it at its next synchronisation. The watchdog watches each collective
//! from before its NCCL call (which can block on the host while it connects to peers)
//! until its completion event; when one overruns the timeout, or NCCL reports an
//! asynchronous error, it aborts the communicator, which ends the stalled call. The abort
//! reason, naming the rank, the operation and the unit, is the error of every later call
//! on that communicator.
//!
//! **Set-up.** Communicators are created from a unique id that the group's first rank
//! publishes in the rendezvous [`Store`]; a barrier in the store before `ncclCommInitRank`
//! makes sure every member arrived (NCCL's own initialisation would wait without limit).
//! Sub-groups are new communicators made the same way.

mod call;
mod communicator;
mod event;
mod libraries;
mod watchdog;

pub use libraries::{check_libraries, gpu_count};

use super::collectives::{check_root, check_split, group_members, Collectives, OpKind, Pending, ReduceOp, Work};
use super::store::Store;
use crate::error::{Error, Result};
use call::{alloc_output, nccl_op, Adopt, NcclCall, Transfer};
use candle_core::cuda::cudarc::driver::CudaStream;
use candle_core::cuda::cudarc::nccl::{result as nccl, sys};
use candle_core::{CudaDevice, Device, Tensor};
use communicator::Communicator;
use event::{make_current, Event};
use libraries::describe_nccl;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use watchdog::{Watchdog, WATCHDOG_PERIOD};

/// What the communicators of one process share: the store, the timeout, the watchdog, and
/// how many groups over each rank list have been made.
struct NcclWorld {
    store: Store,
    timeout: Duration,
    watchdog: Watchdog,
    /// The number of ranks in the world.
    size: usize,
    groups_created: Mutex<HashMap<Arc<[usize]>, u64>>,
}

/// One rank's NCCL communicator over one group of ranks. Used from the thread that
/// drives the rank's GPU (candle's compute stream is that thread's own).
pub struct NcclComm {
    world: Arc<NcclWorld>,
    communicator: Arc<Communicator>,
    device: CudaDevice,
    /// The communication stream.
    stream: Arc<CudaStream>,
    /// Recorded on the compute stream before each call, waited on by the communication
    /// stream (reused: a wait captures the event's state when it is issued).
    compute_done: Event,
    /// The group's global ranks.
    group: Arc<[usize]>,
    /// This rank's position in `group`.
    rank: usize,
    /// The store key prefix of this communicator.
    key: String,
    barriers: AtomicU64,
}

impl NcclComm {
    /// The communicator over all `world_size` ranks, for the rank `rank` driving `device`.
    /// Every rank calls this with a client of the same store, once per store: the unique
    /// id lives under a fixed key. Sub-groups come from [`Collectives::new_group`].
    ///
    /// This turns cudarc's event tracking off for `device`'s context (the communicator
    /// orders its stream against candle's itself): code that uses a buffer of that context
    /// on a stream of its own must order it with events itself.
    pub fn world(device: &CudaDevice, store: Store, rank: usize, world_size: usize, timeout: Duration) -> Result<Self> {
        check_libraries(rank)?;
        let world = Arc::new(NcclWorld {
            store,
            timeout,
            watchdog: Watchdog::start(rank, timeout)?,
            size: world_size,
            groups_created: Mutex::default(),
        });
        let group: Arc<[usize]> = (0..world_size).collect();
        Self::create(world, device.clone(), group, rank, "nccl/world".to_string())
    }

    fn create(
        world: Arc<NcclWorld>,
        device: CudaDevice,
        group: Arc<[usize]>,
        global_rank: usize,
        key: String,
    ) -> Result<Self> {
        let rank = group.iter().position(|&r| r == global_rank).ok_or_else(|| Error::BadGroup {
            rank: global_rank,
            ranks: group.to_vec(),
            problem: "this rank is not a member".into(),
        })?;
        let fail = |message: String| Error::Rank { rank: global_rank, message };
        let id_key = format!("{key}/id");
        let id =
            if rank == 0 {
                let id = nccl::get_uniqueid().map_err(|e| fail(format!("ncclGetUniqueId: {}", describe_nccl(e.0))))?;
                let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
                world.store.set(&id_key, &bytes)?;
                id
            } else {
                let bytes = world.store.get(&id_key, world.timeout)?;
                let internal: [std::ffi::c_char; 128] =
                    bytes.iter().map(|&b| b as std::ffi::c_char).collect::<Vec<_>>().try_into().map_err(|_| {
                        fail(format!("the NCCL id under `{id_key}` has {} bytes, not 128", bytes.len()))
                    })?;
                sys::ncclUniqueId { internal }
            };
        // NCCL's initialisation waits without a limit for every member: meet first.
        // It also works on the calling thread's current device.
        let context = device.cuda_stream().context().clone();
        make_current(&context).map_err(|e| fail(format!("cannot make the GPU current: {e:?}")))?;
        world.store.barrier(&format!("{key}/init"), group.len(), world.timeout)?;
        // SAFETY: the crossings between the compute and the communication streams are all
        // ordered by this module's events (see the module documentation); candle itself uses
        // the one compute stream.
        unsafe { context.disable_event_tracking() };
        let stream =
            context.new_stream().map_err(|e| fail(format!("cannot create the communication stream: {e:?}")))?;
        let compute_done = Event::new(&context).map_err(|e| fail(format!("cannot create a CUDA event: {e:?}")))?;
        let mut raw = std::mem::MaybeUninit::uninit();
        // SAFETY: `raw` is written by NCCL on success and only read then.
        let raw = unsafe {
            nccl::comm_init_rank(raw.as_mut_ptr(), group.len() as i32, id, rank as i32)
                .map_err(|e| fail(format!("ncclCommInitRank for {key}: {}", describe_nccl(e.0))))?;
            raw.assume_init()
        };
        let communicator = Arc::new(Communicator::new(raw));
        world.watchdog.register(&communicator);
        Ok(Self { world, communicator, device, stream, compute_done, group, rank, key, barriers: AtomicU64::new(0) })
    }

    /// The GPU this rank drives.
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    fn global(&self) -> usize {
        self.group[self.rank]
    }

    fn aborted(&self, kind: OpKind, label: &str, reason: String) -> Error {
        Error::CollectiveAborted { rank: self.global(), op: kind.to_string(), label: label.to_string(), reason }
    }

    /// A failure before any NCCL call was made (a CUDA error, a bad input): this rank's
    /// error, and the communicator stays usable.
    fn refused(&self, kind: OpKind, label: &str, message: impl std::fmt::Display) -> Error {
        Error::Rank { rank: self.global(), message: format!("{kind} for {label}: {message}") }
    }

    /// An NCCL call that failed when issued: the communicator is aborted, so that the
    /// peers do not wait for it.
    fn nccl_failed(&self, kind: OpKind, label: &str, message: String) -> Error {
        let reason = format!("rank {}: {kind} for {label}: {message}", self.global());
        self.communicator.abort(reason.clone());
        self.aborted(kind, label, reason)
    }

    /// Runs one NCCL call on the communication stream, ordered against the compute
    /// stream as the module documentation says, watched from before the call.
    fn issue(&self, kind: OpKind, input: &Tensor, out_len: usize, label: &str, call: NcclCall) -> Result<Work> {
        if let Some(reason) = self.communicator.failure() {
            return Err(self.aborted(kind, label, reason));
        }
        if !input.device().is_cuda() {
            return Err(self.refused(kind, label, format!("the input is on {:?}, not on a GPU", input.device())));
        }
        if !input.device().same_device(&Device::Cuda(self.device.clone())) {
            return Err(self.refused(
                kind,
                label,
                format!("the input is on {:?}, not on this rank's GPU", input.device()),
            ));
        }
        let context = self.stream.context();
        // NCCL and the events work on the calling thread's current context.
        make_current(context).map_err(|e| self.refused(kind, label, format!("cannot make the GPU current: {e:?}")))?;
        let compute = self.device.cuda_stream();
        let (output, done) = {
            // The input's storage lock is released before the output is adopted below
            // (a second read lock on one thread can deadlock behind a waiting writer).
            let (storage, layout) = input.storage_and_layout();
            let candle_core::Storage::Cuda(storage) = &*storage else {
                return Err(self.refused(kind, label, "the input is not a CUDA tensor"));
            };
            if !layout.is_contiguous() {
                return Err(self.refused(kind, label, "the input must be contiguous"));
            }
            let transfer = Transfer { start: layout.start_offset(), len: input.elem_count(), out_len, call };
            // The output lives on the compute stream (its readers and its free order there).
            let mut output = alloc_output(storage, &compute, out_len).map_err(|e| self.refused(kind, label, e))?;
            // The communication stream waits for the compute stream: the kernels that
            // wrote the input (no write event of theirs exists) and the output's allocation.
            self.compute_done
                .record(compute.cu_stream())
                .and_then(|()| self.compute_done.make_wait(self.stream.cu_stream()))
                .map_err(|e| self.refused(kind, label, format!("cannot order the streams: {e:?}")))?;
            let what = format!("rank {}: {kind} for {label}", self.global());
            let watched = self.world.watchdog.watch(what, &self.communicator, self.world.timeout);
            let called = self.communicator.call(|comm| call::run(comm, &self.stream, storage, &mut output, &transfer));
            let done = match called {
                None => {
                    watched.ended();
                    return Err(self.aborted(kind, label, self.communicator.failure().unwrap_or_default()));
                }
                Some(Err(message)) => {
                    watched.ended();
                    return Err(self.nccl_failed(kind, label, message));
                }
                Some(Ok(())) => {
                    Event::new(context).and_then(|done| done.record(self.stream.cu_stream()).map(|()| done))
                }
            };
            match done {
                Ok(done) => {
                    let done = Arc::new(done);
                    watched.queued(done.clone());
                    (output, done)
                }
                Err(e) => {
                    watched.ended();
                    // Nothing orders the output's free after the call NCCL accepted: keep it.
                    std::mem::forget(output);
                    return Err(self.nccl_failed(kind, label, format!("cannot record the completion event: {e:?}")));
                }
            }
        };
        let output = input.apply_op1_no_bwd(&Adopt::new(output, out_len))?;
        Ok(Work::new(NcclPending {
            communicator: self.communicator.clone(),
            compute,
            done,
            input: input.clone(),
            output,
            kind,
            label: label.to_string(),
            rank: self.global(),
            ordered: false,
        }))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Destroying a communicator with work in flight is undefined: wait (with a limit)
        // for the stream, and abort instead when it does not drain.
        let context = self.stream.context();
        let drained =
            Event::new(context).and_then(|e| e.record(self.stream.cu_stream()).map(|()| e)).is_ok_and(|event| {
                let deadline = Instant::now() + self.world.timeout;
                loop {
                    match event.is_complete() {
                        Ok(true) => break true,
                        Ok(false) if Instant::now() < deadline => std::thread::sleep(WATCHDOG_PERIOD),
                        _ => break false,
                    }
                }
            });
        if !drained {
            self.communicator
                .abort(format!("rank {}: the communicator was dropped with work that did not finish", self.global()));
        }
    }
}

/// A collective issued on the communication stream.
struct NcclPending {
    communicator: Arc<Communicator>,
    /// The issuing thread's compute stream.
    compute: Arc<CudaStream>,
    /// Complete when the collective is.
    done: Arc<Event>,
    /// Kept until the compute stream waits for the collective: its free is then ordered
    /// after the call without stalling the compute stream earlier.
    input: Tensor,
    output: Tensor,
    kind: OpKind,
    label: String,
    rank: usize,
    /// Whether the compute stream already waits for the collective.
    ordered: bool,
}

impl NcclPending {
    /// Makes every later kernel of the compute stream, and every free queued on it, run
    /// after the collective; the host goes on.
    fn order_compute_after(&mut self) -> Result<(), String> {
        if !self.ordered {
            self.done
                .make_wait(self.compute.cu_stream())
                .map_err(|e| format!("cannot make the compute stream wait for the collective: {e:?}"))?;
            self.ordered = true;
        }
        Ok(())
    }
}

impl Drop for NcclPending {
    /// A collective dropped unwaited (an error on the way, a prefetch never used) still
    /// reads its input and writes its output: their frees must come after it.
    fn drop(&mut self) {
        if let Err(reason) = self.order_compute_after() {
            // The memory could be handed out again while NCCL still writes it: keep it.
            tracing::error!(rank = self.rank, op = %self.kind, label = %self.label, "{reason}; its buffers are leaked");
            std::mem::forget(self.input.clone());
            std::mem::forget(self.output.clone());
        }
    }
}

impl Pending for NcclPending {
    fn wait(mut self: Box<Self>) -> Result<Tensor> {
        let fail = |this: &Self, reason: String| Error::CollectiveAborted {
            rank: this.rank,
            op: this.kind.to_string(),
            label: this.label.clone(),
            reason,
        };
        if let Some(reason) = self.communicator.failure() {
            return Err(fail(&self, reason));
        }
        if let Err(reason) = self.order_compute_after() {
            return Err(fail(&self, reason));
        }
        // The input is freed with `self`, behind the wait.
        Ok(self.output.clone())
    }
}

impl Collectives for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.len()
    }

    fn global_rank(&self) -> usize {
        self.global()
    }

    fn device(&self) -> Device {
        Device::Cuda(self.device.clone())
    }

    fn all_gather(&self, input: &Tensor, label: &str) -> Result<Work> {
        let len = input.elem_count();
        self.issue(OpKind::AllGather, input, len * self.size(), label, NcclCall::AllGather)
    }

    fn reduce_scatter(&self, input: &Tensor, op: ReduceOp, label: &str) -> Result<Work> {
        let len = input.elem_count();
        check_split(self.global(), self.size(), len, label)?;
        self.issue(OpKind::ReduceScatter(op), input, len / self.size(), label, NcclCall::ReduceScatter(nccl_op(op)))
    }

    fn all_reduce(&self, input: &Tensor, op: ReduceOp, label: &str) -> Result<Work> {
        self.issue(OpKind::AllReduce(op), input, input.elem_count(), label, NcclCall::AllReduce(nccl_op(op)))
    }

    fn broadcast(&self, input: &Tensor, root: usize, label: &str) -> Result<Work> {
        check_root(self.global(), self.size(), root, label)?;
        let kind = OpKind::Broadcast { root };
        self.issue(kind, input, input.elem_count(), label, NcclCall::Broadcast { root: root as i32 })
    }

    fn barrier(&self, label: &str) -> Result<()> {
        if let Some(reason) = self.communicator.failure() {
            return Err(self.aborted(OpKind::Barrier, label, reason));
        }
        let n = self.barriers.fetch_add(1, Ordering::Relaxed);
        self.world.store.barrier(&format!("{}/barrier/{n}", self.key), self.size(), self.world.timeout)
    }

    /// Aborts this rank's communicator. NCCL cannot tell the peers: they fail when
    /// their watchdog's timeout passes.
    fn abort(&self, reason: &str) {
        self.communicator.abort(reason.to_string());
    }

    fn new_group(&self, global_ranks: &[usize]) -> Result<Box<dyn Collectives>> {
        let ranks = group_members(global_ranks, self.global(), self.world.size)?;
        let instance = {
            let mut created = self.world.groups_created.lock().unwrap_or_else(|p| p.into_inner());
            let count = created.entry(ranks.clone()).or_default();
            *count += 1;
            *count
        };
        let names: Vec<String> = ranks.iter().map(usize::to_string).collect();
        let key = format!("nccl/group/{}/{instance}", names.join(","));
        let comm = Self::create(self.world.clone(), self.device.clone(), ranks, self.global(), key)?;
        Ok(Box::new(comm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_ops_map_to_nccl() {
        assert_eq!(nccl_op(ReduceOp::Sum), sys::ncclRedOp_t::ncclSum);
        assert_eq!(nccl_op(ReduceOp::Avg), sys::ncclRedOp_t::ncclAvg);
    }
}
