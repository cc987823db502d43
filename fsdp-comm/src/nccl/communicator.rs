//! [`Communicator`]: one raw NCCL communicator, used by its rank's thread and aborted by
//! any thread.

use super::libraries::describe_nccl;
use candle_core::cuda::cudarc::nccl::{result as nccl, sys};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Mutex, MutexGuard};

/// An NCCL communicator and why it was aborted.
///
/// NCCL lets one thread at a time issue calls on a communicator and any thread abort it;
/// an abort ends the communicator's kernels on the GPU and makes a call blocked on the
/// host (a first collective setting up its connections to a peer that never comes)
/// return. So the two paths take different locks: `calls` serialises the rank's calls
/// and may be held for as long as NCCL blocks; `lifecycle` (abort, the asynchronous
/// error poll, destroy) is never held across a collective, so the watchdog always gets it.
pub(super) struct Communicator {
    /// Null once aborted or destroyed.
    raw: AtomicPtr<sys::ncclComm>,
    calls: Mutex<()>,
    lifecycle: Mutex<()>,
    failure: Mutex<Option<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Communicator {
    pub fn new(raw: sys::ncclComm_t) -> Self {
        Self {
            raw: AtomicPtr::new(raw),
            calls: Mutex::default(),
            lifecycle: Mutex::default(),
            failure: Mutex::default(),
        }
    }

    /// Why the communicator was aborted, if it was.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

    /// Runs `call` with the communicator, one call at a time; `None` once aborted.
    pub fn call<R>(&self, call: impl FnOnce(sys::ncclComm_t) -> R) -> Option<R> {
        let _one_at_a_time = lock(&self.calls);
        let raw = self.raw.load(Ordering::Acquire);
        (!raw.is_null()).then(|| call(raw))
    }

    /// Aborts the communicator once; the first reason sticks. Does not wait for a call
    /// in progress: the abort is what ends it.
    pub fn abort(&self, reason: String) {
        lock(&self.failure).get_or_insert(reason);
        let _lifecycle = lock(&self.lifecycle);
        let raw = self.raw.swap(ptr::null_mut(), Ordering::AcqRel);
        if !raw.is_null() {
            // SAFETY: taken out of the handle, so no new call starts on it; a call in
            // progress on the rank's thread is ended by this abort (NCCL's fault model).
            unsafe {
                let _ = nccl::comm_abort(raw);
            }
        }
    }

    /// An error NCCL recorded asynchronously (a peer failed, the network broke), if any.
    pub fn async_error(&self) -> Option<String> {
        let _lifecycle = lock(&self.lifecycle);
        let raw = self.raw.load(Ordering::Acquire);
        if raw.is_null() {
            return None;
        }
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator (abort and destroy wait for `lifecycle`); NCCL
        // allows this query beside a call on another thread.
        let status = unsafe { sys::ncclCommGetAsyncError(raw, &mut state) };
        match (status, state) {
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess) => None,
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclInProgress) => None,
            (sys::ncclResult_t::ncclSuccess, error) => Some(describe_nccl(error)),
            (error, _) => Some(describe_nccl(error)),
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        let raw = self.raw.swap(ptr::null_mut(), Ordering::AcqRel);
        if !raw.is_null() {
            // SAFETY: the last owner; `NcclComm::drop` waited for the stream first.
            unsafe {
                let _ = nccl::comm_destroy(raw);
            }
        }
    }
}
