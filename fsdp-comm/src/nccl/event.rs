//! CUDA events and context binding through the driver's own calls.
//!
//! cudarc's safe wrappers make the context current with `bind_to_thread`, which first
//! *takes* any error cudarc stored for the context (`record_err`, from an earlier
//! asynchronous free, say). On the watchdog thread that would swallow an error meant for
//! the rank's thread, and at the start of a collective it would blame the collective for
//! something that happened before. These calls leave the stored error where it is, for
//! candle's next operation to report.

use candle_core::cuda::cudarc::driver::{result, sys, CudaContext, DriverError};
use std::sync::Arc;

/// Makes `context` current on this thread without touching its stored error.
pub(super) fn make_current(context: &CudaContext) -> Result<(), DriverError> {
    // SAFETY: the context is alive (borrowed) and belongs to this process.
    unsafe { result::ctx::set_current(context.cu_ctx()) }
}

/// A CUDA event (no timing) of one context.
pub(super) struct Event {
    raw: sys::CUevent,
    context: Arc<CudaContext>,
}

// SAFETY: CUDA events may be recorded, waited on, queried and destroyed from any thread.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    pub fn new(context: &Arc<CudaContext>) -> Result<Self, DriverError> {
        make_current(context)?;
        let raw = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?;
        Ok(Self { raw, context: context.clone() })
    }

    /// Captures the work queued on `stream` so far.
    pub fn record(&self, stream: sys::CUstream) -> Result<(), DriverError> {
        // SAFETY: a live event, and a stream of the same context (the caller's).
        unsafe { result::event::record(self.raw, stream) }
    }

    /// Makes `stream` wait, on the GPU, for the work this event captured.
    pub fn make_wait(&self, stream: sys::CUstream) -> Result<(), DriverError> {
        // SAFETY: a live event and stream of the same context.
        unsafe { result::stream::wait_event(stream, self.raw, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
    }

    /// Whether the captured work is complete; an error the GPU reported for it otherwise.
    pub fn is_complete(&self) -> Result<bool, DriverError> {
        make_current(&self.context)?;
        // SAFETY: a live event.
        match unsafe { result::event::query(self.raw) } {
            Ok(()) => Ok(true),
            Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(error) => Err(error),
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // Destroying an event whose work is pending is allowed: CUDA releases it when done.
        if make_current(&self.context).is_ok() {
            // SAFETY: the last use of this event.
            let _ = unsafe { result::event::destroy(self.raw) };
        }
    }
}
