//! The GPU backend (feature `cuda`): NCCL collectives through candle's own cudarc.
//!
//! **Streams.** Each communicator has a communication stream of its own, next to candle's
//! compute stream. Ordering between the two is by CUDA events, which cudarc records and
//! waits on for every buffer once a context has a second stream: the collective waits for
//! the kernels that wrote its input, and a kernel that reads the output waits for the
//! collective. Nothing else waits. A prefetched all-gather therefore runs beside the
//! previous unit's compute, and a reduce-scatter beside the next unit's backward.
//! [`Work::wait`] does not block the host: it hands back the output, whose readers are
//! ordered after the collective on the GPU. The input is kept until the collective is
//! complete, so freeing it never makes the compute stream wait for communication.
//!
//! **No hangs.** A collective whose peer never comes would stall the GPU for ever, and
//! the host with it at its next synchronisation. A watchdog thread polls each collective's
//! completion event; when one is not complete within the timeout, or NCCL reports an
//! asynchronous error, it aborts the communicator (`ncclCommAbort` may be called from
//! another thread), which ends the stalled kernels. The abort reason, naming the rank, the
//! operation and the unit, is the error of every later call on that communicator.
//!
//! **Set-up.** Communicators are created from a unique id that the group's first rank
//! publishes in the rendezvous [`Store`]; a barrier in the store before `ncclCommInitRank`
//! makes sure every member arrived (NCCL's own initialisation would wait without limit).
//! Sub-groups are new communicators made the same way.

use super::collectives::{check_root, check_split, group_members, Collectives, OpKind, Pending, ReduceOp, Work};
use super::store::Store;
use crate::error::{Error, Result};
use candle_core::cuda::cudarc::driver::{CudaContext, CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda::cudarc::nccl::{result as nccl, sys, NcclType};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice};
use candle_core::{CudaDevice, CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

/// How often the watchdog looks at the collectives in flight.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(5);

/// Fails with a clear error when the CUDA driver or NCCL cannot be loaded. cudarc loads
/// them on first use and panics when it cannot; this asks first, once per process.
pub fn check_libraries(rank: usize) -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED.get_or_init(probe_libraries).clone().map_err(|message| Error::Rank { rank, message })
}

fn probe_libraries() -> std::result::Result<(), String> {
    let loaded =
        |what: &str, probe: &dyn Fn() -> std::result::Result<(), String>| match catch_unwind(AssertUnwindSafe(probe)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(format!("{what}: {message}")),
            Err(_) => Err(format!(
                "{what} could not be loaded; install it or put its folder on LD_LIBRARY_PATH \
                 (NCCL is looked up as libnccl.so)"
            )),
        };
    // The panic that reports a missing library is expected here: keep its message and
    // backtrace off stderr while asking.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = loaded("the CUDA driver (libcuda)", &|| {
        candle_core::cuda::cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e:?}"))
    })
    .and_then(|()| loaded("NCCL (libnccl)", &|| nccl::get_nccl_version().map(|_| ()).map_err(|e| describe_nccl(e.0))));
    std::panic::set_hook(hook);
    outcome
}

/// The number of GPUs this process sees.
pub fn gpu_count(rank: usize) -> Result<usize> {
    check_libraries(rank)?;
    candle_core::cuda::cudarc::driver::result::device::get_count()
        .map(|n| n as usize)
        .map_err(|e| Error::Rank { rank, message: format!("cannot count the GPUs: {e:?}") })
}

fn describe_nccl(code: sys::ncclResult_t) -> String {
    // SAFETY: NCCL returns a pointer to a static, NUL-terminated string.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(code)) };
    format!("NCCL error {code:?}: {}", text.to_string_lossy())
}

/// A raw NCCL communicator. NCCL lets one thread use a communicator at a time and any
/// thread abort it; [`CommHandle`] serialises the uses behind its mutex.
struct RawComm(sys::ncclComm_t);

// SAFETY: the pointer is only used under `CommHandle::raw`'s lock (or, for the abort, after
// being taken out of it), which NCCL's threading rules allow.
unsafe impl Send for RawComm {}

/// The communicator and why it was aborted, shared with the watchdog.
struct CommHandle {
    raw: Mutex<Option<RawComm>>,
    failure: Mutex<Option<String>>,
}

impl CommHandle {
    fn lock(&self) -> MutexGuard<'_, Option<RawComm>> {
        self.raw.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Aborts the communicator once; the first reason sticks.
    fn abort(&self, reason: String) {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(reason);
        if let Some(raw) = self.lock().take() {
            // SAFETY: the communicator was taken out of the handle, so nobody uses it again.
            unsafe {
                let _ = nccl::comm_abort(raw.0);
            }
        }
    }

    /// An error NCCL recorded asynchronously (a peer failed, the network broke), if any.
    fn async_error(&self) -> Option<String> {
        let raw = self.lock();
        let raw = raw.as_ref()?;
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator, used under the lock.
        let status = unsafe { sys::ncclCommGetAsyncError(raw.0, &mut state) };
        match (status, state) {
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess) => None,
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclInProgress) => None,
            (sys::ncclResult_t::ncclSuccess, error) => Some(describe_nccl(error)),
            (error, _) => Some(describe_nccl(error)),
        }
    }
}

impl Drop for CommHandle {
    fn drop(&mut self) {
        if let Some(raw) = self.lock().take() {
            // SAFETY: the last owner; `NcclComm::drop` waited for the stream first.
            unsafe {
                let _ = nccl::comm_destroy(raw.0);
            }
        }
    }
}

/// A collective on the GPU that the watchdog waits for.
struct InFlight {
    done: CudaEvent,
    /// The collective's input, released here once the collective is complete. Dropping it
    /// earlier would make its stream (the compute stream) wait for the collective: cudarc
    /// orders a buffer's free after its last use, and that wait would end the overlap.
    _input: Tensor,
    context: Arc<CudaContext>,
    deadline: Instant,
    handle: Weak<CommHandle>,
    /// "rank 3: all_gather for unit `layers.2`".
    what: String,
}

/// The thread that aborts communicators whose collectives overrun their timeout.
struct Watchdog {
    state: Arc<WatchdogState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct WatchdogState {
    in_flight: Mutex<Vec<InFlight>>,
    comms: Mutex<Vec<Weak<CommHandle>>>,
    stop: AtomicBool,
}

impl Watchdog {
    fn start(timeout: Duration) -> Result<Self> {
        let state = Arc::new(WatchdogState::default());
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || shared.run(timeout))
            .map_err(|e| Error::Rank { rank: 0, message: format!("cannot start the NCCL watchdog thread: {e}") })?;
        Ok(Self { state, thread: Some(thread) })
    }

    fn watch(&self, entry: InFlight) {
        self.state.in_flight.lock().unwrap_or_else(|p| p.into_inner()).push(entry);
    }

    fn register(&self, comm: &Arc<CommHandle>) {
        self.state.comms.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(comm));
    }
}

impl WatchdogState {
    fn run(&self, timeout: Duration) {
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(WATCHDOG_PERIOD);
            let now = Instant::now();
            let mut overdue = Vec::new();
            self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).retain(|entry| {
                let Some(handle) = entry.handle.upgrade() else {
                    return false;
                };
                if entry.context.bind_to_thread().is_err() {
                    return true;
                }
                match entry.done.try_is_complete() {
                    Ok(true) => false,
                    Ok(false) if now < entry.deadline => true,
                    Ok(false) => {
                        overdue.push((handle, format!("{} did not complete within {timeout:?}", entry.what)));
                        false
                    }
                    Err(e) => {
                        overdue.push((handle, format!("{} failed on the GPU: {e:?}", entry.what)));
                        false
                    }
                }
            });
            self.comms.lock().unwrap_or_else(|p| p.into_inner()).retain(|comm| {
                let Some(handle) = comm.upgrade() else {
                    return false;
                };
                if let Some(error) = handle.async_error() {
                    overdue.push((handle, error));
                }
                true
            });
            for (handle, reason) in overdue {
                tracing::error!(target: "candle_fsdp::nccl", "{reason}; aborting the communicator");
                handle.abort(format!("{reason}; the communicator was aborted so that no rank hangs"));
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

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

/// One rank's NCCL communicator over one group of ranks.
pub struct NcclComm {
    world: Arc<NcclWorld>,
    handle: Arc<CommHandle>,
    device: CudaDevice,
    /// The communication stream.
    stream: Arc<CudaStream>,
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
    pub fn world(device: &CudaDevice, store: Store, rank: usize, world_size: usize, timeout: Duration) -> Result<Self> {
        check_libraries(rank)?;
        let world = Arc::new(NcclWorld {
            store,
            timeout,
            watchdog: Watchdog::start(timeout)?,
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
        device
            .cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| fail(format!("cannot make the GPU current: {e:?}")))?;
        world.store.barrier(&format!("{key}/init"), group.len(), world.timeout)?;
        let stream = device
            .cuda_stream()
            .context()
            .new_stream()
            .map_err(|e| fail(format!("cannot create the communication stream: {e:?}")))?;
        let mut raw = std::mem::MaybeUninit::uninit();
        // SAFETY: `raw` is written by NCCL on success and only read then.
        let raw = unsafe {
            nccl::comm_init_rank(raw.as_mut_ptr(), group.len() as i32, id, rank as i32)
                .map_err(|e| fail(format!("ncclCommInitRank for {key}: {}", describe_nccl(e.0))))?;
            raw.assume_init()
        };
        let handle = Arc::new(CommHandle { raw: Mutex::new(Some(RawComm(raw))), failure: Mutex::default() });
        world.watchdog.register(&handle);
        Ok(Self { world, handle, device, stream, group, rank, key, barriers: AtomicU64::new(0) })
    }

    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    fn global(&self) -> usize {
        self.group[self.rank]
    }

    fn aborted(&self, kind: OpKind, label: &str, reason: String) -> Error {
        Error::CollectiveAborted { rank: self.global(), op: kind.to_string(), label: label.to_string(), reason }
    }

    /// Runs one NCCL call on the communication stream: `call(comm, input, output)` with the
    /// output allocated on that stream, then hands the completion to the watchdog.
    fn issue(&self, kind: OpKind, input: &Tensor, out_len: usize, label: &str, call: NcclCall) -> Result<Work> {
        if let Some(reason) = self.handle.failure() {
            return Err(self.aborted(kind, label, reason));
        }
        let issued = {
            // The input's storage lock is released before the output is adopted below
            // (a second read lock on one thread can deadlock behind a waiting writer).
            let (storage, layout) = input.storage_and_layout();
            let candle_core::Storage::Cuda(storage) = &*storage else {
                return Err(Error::Rank {
                    rank: self.global(),
                    message: format!("{kind} for {label}: the input is on {:?}, not on a GPU", input.device()),
                });
            };
            if !layout.is_contiguous() || !input.device().same_device(&Device::Cuda(self.device.clone())) {
                return Err(Error::Rank {
                    rank: self.global(),
                    message: format!("{kind} for {label}: the input must be contiguous and on this rank's GPU"),
                });
            }
            // NCCL works on the calling thread's current device.
            if let Err(e) = self.stream.context().bind_to_thread() {
                return Err(self.nccl_failed(kind, label, format!("cannot make the GPU current: {e:?}")));
            }
            let raw = self.handle.lock();
            raw.as_ref().map(|raw| {
                let call = IssuedCall {
                    comm: raw.0,
                    stream: &self.stream,
                    start: layout.start_offset(),
                    len: input.elem_count(),
                    out_len,
                    call,
                };
                dispatch(storage, &call)
            })
        };
        // Errors are handled with the communicator unlocked: failing aborts it.
        let output = match issued {
            Some(Ok(output)) => output,
            Some(Err(message)) => return Err(self.nccl_failed(kind, label, message)),
            None => return Err(self.aborted(kind, label, self.handle.failure().unwrap_or_default())),
        };
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| self.nccl_failed(kind, label, format!("cannot record the completion event: {e:?}")))?;
        self.world.watchdog.watch(InFlight {
            done,
            _input: input.clone(),
            context: self.stream.context().clone(),
            deadline: Instant::now() + self.world.timeout,
            handle: Arc::downgrade(&self.handle),
            what: format!("rank {}: {kind} for {label}", self.global()),
        });
        let output = input.apply_op1_no_bwd(&Adopt::new(output, out_len))?;
        Ok(Work::new(NcclPending {
            handle: self.handle.clone(),
            output,
            kind,
            label: label.to_string(),
            rank: self.global(),
        }))
    }

    /// An NCCL call that failed when issued: aborted, so the peers do not wait for it.
    fn nccl_failed(&self, kind: OpKind, label: &str, message: String) -> Error {
        let reason = format!("rank {}: {kind} for {label}: {message}", self.global());
        self.handle.abort(reason.clone());
        self.aborted(kind, label, reason)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Destroying a communicator with work in flight is undefined: wait (with a limit)
        // for the stream, and abort instead when it does not drain.
        let drained = self.stream.record_event(None).ok().is_some_and(|event| {
            let deadline = Instant::now() + self.world.timeout;
            loop {
                match event.try_is_complete() {
                    Ok(true) => break true,
                    Ok(false) if Instant::now() < deadline => std::thread::sleep(WATCHDOG_PERIOD),
                    _ => break false,
                }
            }
        });
        if !drained {
            self.handle
                .abort(format!("rank {}: the communicator was dropped with work that did not finish", self.global()));
        }
    }
}

/// Which NCCL collective to run.
#[derive(Clone, Copy)]
enum NcclCall {
    AllGather,
    ReduceScatter(sys::ncclRedOp_t),
    AllReduce(sys::ncclRedOp_t),
    Broadcast { root: i32 },
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
    }
}

struct IssuedCall<'a> {
    comm: sys::ncclComm_t,
    stream: &'a Arc<CudaStream>,
    start: usize,
    len: usize,
    out_len: usize,
    call: NcclCall,
}

impl IssuedCall<'_> {
    /// Runs the call on elements `start..start + len` of `input` into a new buffer of
    /// `out_len` elements allocated on the communication stream.
    fn run<T: DeviceRepr + NcclType + CudaDType>(
        &self,
        storage: &CudaStorage,
    ) -> std::result::Result<CudaStorage, String> {
        let input = storage.as_cuda_slice::<T>().map_err(|e| e.to_string())?;
        let input = input.slice(self.start..self.start + self.len);
        // SAFETY: every element is written by the collective before anything reads it
        // (readers are ordered after it by the buffer's write event).
        let mut output = unsafe { self.stream.alloc::<T>(self.out_len.max(1)) }.map_err(|e| format!("{e:?}"))?;
        let datatype = T::as_nccl_type();
        let status = {
            let (src, _read) = input.device_ptr(self.stream);
            let (dst, _write) = output.device_ptr_mut(self.stream);
            let (src, dst) = (src as *const std::ffi::c_void, dst as *mut std::ffi::c_void);
            let stream = self.stream.cu_stream() as sys::cudaStream_t;
            // SAFETY: `src` and `dst` are live device buffers of the right lengths, both
            // ordered on `stream` by the guards above; the communicator is locked.
            unsafe {
                match self.call {
                    NcclCall::AllGather => nccl::all_gather(src, dst, self.len, datatype, self.comm, stream),
                    NcclCall::ReduceScatter(op) => {
                        nccl::reduce_scatter(src, dst, self.out_len, datatype, op, self.comm, stream)
                    }
                    NcclCall::AllReduce(op) => nccl::all_reduce(src, dst, self.len, datatype, op, self.comm, stream),
                    NcclCall::Broadcast { root } => {
                        nccl::broadcast(src, dst, self.len, datatype, root, self.comm, stream)
                    }
                }
            }
        };
        status.map_err(|e| describe_nccl(e.0))?;
        Ok(CudaStorage::wrap_cuda_slice(output, storage.device.clone()))
    }
}

/// Runs `call` with the element type of `storage`.
fn dispatch(storage: &CudaStorage, call: &IssuedCall) -> std::result::Result<CudaStorage, String> {
    match &storage.slice {
        CudaStorageSlice::U8(_) => call.run::<u8>(storage),
        CudaStorageSlice::U32(_) => call.run::<u32>(storage),
        CudaStorageSlice::I32(_) => call.run::<i32>(storage),
        CudaStorageSlice::I64(_) => call.run::<i64>(storage),
        CudaStorageSlice::BF16(_) => call.run::<half::bf16>(storage),
        CudaStorageSlice::F16(_) => call.run::<half::f16>(storage),
        CudaStorageSlice::F32(_) => call.run::<f32>(storage),
        CudaStorageSlice::F64(_) => call.run::<f64>(storage),
        _ => Err(format!("NCCL cannot move {:?} tensors", candle_core::backend::BackendStorage::dtype(storage))),
    }
}

/// Hands a storage made outside candle's ops to candle as a tensor.
struct Adopt {
    storage: Mutex<Option<CudaStorage>>,
    shape: Shape,
}

impl Adopt {
    fn new(storage: CudaStorage, len: usize) -> Self {
        Self { storage: Mutex::new(Some(storage)), shape: Shape::from(len) }
    }
}

impl CustomOp1 for Adopt {
    fn name(&self) -> &'static str {
        "fsdp-nccl-output"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("an NCCL output is adopted on its GPU only")
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        match self.storage.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(storage) => Ok((storage, self.shape.clone())),
            None => candle_core::bail!("an NCCL output is adopted once"),
        }
    }
}

/// A collective issued on the communication stream.
struct NcclPending {
    handle: Arc<CommHandle>,
    output: Tensor,
    kind: OpKind,
    label: String,
    rank: usize,
}

impl Pending for NcclPending {
    fn wait(self: Box<Self>) -> Result<Tensor> {
        // Stream-ordered: readers of the output wait for the collective on the GPU.
        match self.handle.failure() {
            Some(reason) => {
                Err(Error::CollectiveAborted { rank: self.rank, op: self.kind.to_string(), label: self.label, reason })
            }
            None => Ok(self.output),
        }
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
        if let Some(reason) = self.handle.failure() {
            return Err(self.aborted(OpKind::Barrier, label, reason));
        }
        let n = self.barriers.fetch_add(1, Ordering::Relaxed);
        self.world.store.barrier(&format!("{}/barrier/{n}", self.key), self.size(), self.world.timeout)
    }

    /// Aborts this rank's communicator. NCCL cannot tell the peers: they fail when
    /// their watchdog's timeout passes.
    fn abort(&self, reason: &str) {
        self.handle.abort(reason.to_string());
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
