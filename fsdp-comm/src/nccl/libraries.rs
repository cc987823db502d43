//! Whether the CUDA driver and NCCL can be loaded, asked before cudarc would panic.

use crate::error::{Error, Result};
use candle_core::cuda::cudarc::nccl::{result as nccl, sys};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

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

pub(super) fn describe_nccl(code: sys::ncclResult_t) -> String {
    // SAFETY: NCCL returns a pointer to a static, NUL-terminated string.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(code)) };
    format!("NCCL error {code:?}: {}", text.to_string_lossy())
}
