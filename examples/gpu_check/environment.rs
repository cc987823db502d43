//! 1. Environment.

use super::*;

pub(super) fn environment(sec: &Section) -> Result<()> {
    for var in ["CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "NCCL_DEBUG", "CUDA_COMPUTE_CAP"] {
        sec.info(format!("{var}={}", std::env::var(var).unwrap_or_else(|_| "(unset)".into())));
    }
    sec.info(format!("host CPU cores: {}", common::cores()));
    let loaded = check_libraries(0);
    sec.check(
        loaded.is_ok(),
        match &loaded {
            Ok(()) => "libcuda and libnccl load (candle_fsdp::dist::check_libraries)".to_string(),
            Err(e) => format!("libcuda and libnccl load: {e}"),
        },
    );
    loaded?;

    let mut driver: std::ffi::c_int = 0;
    // SAFETY: writes one int.
    unsafe { cu_sys::cuDriverGetVersion(&mut driver) }.result().explain("cuDriverGetVersion")?;
    sec.figure("CUDA driver API", format!("{}.{} ({driver})", driver / 1000, (driver % 1000) / 10));

    let code = nccl_result::get_nccl_version().explain("ncclGetVersion")?;
    let version = if code >= 10000 {
        format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, (code % 1000) / 100, code % 100)
    };
    sec.figure("NCCL", format!("{version} ({code})"));

    let count = gpu_count(0)?;
    sec.check(count >= 1, format!("GPUs visible: {count} (candle_fsdp::dist::gpu_count)"));
    for ordinal in 0..count {
        let ctx = CudaContext::new(ordinal).explain("CudaContext::new")?;
        let name = ctx.name().explain("cuDeviceGetName")?;
        let (major, minor) = ctx.compute_capability().explain("compute capability")?;
        let (free, total) = ctx.mem_get_info().explain("cuMemGetInfo")?;
        sec.figure(
            &format!("GPU {ordinal}"),
            format!(
                "{name}, compute capability {major}.{minor}, memory {} total, {} free, {} used (cuMemGetInfo)",
                mib(total as f64),
                mib(free as f64),
                mib((total - free) as f64)
            ),
        );
        if ordinal == 0 {
            sec.info(format!(
                "stream-ordered allocation (cuMemAllocAsync) supported: {}",
                if ctx.has_async_alloc() {
                    "yes: cudarc allocates from the device's pool and frees with cuMemFreeAsync"
                } else {
                    "no"
                }
            ));
            // SAFETY: the device handle comes from a live context.
            if let Ok(pool) = unsafe { cu_result::device::get_mem_pool(ctx.cu_device()) } {
                let mut threshold: u64 = 0;
                // SAFETY: a 64-bit attribute.
                let ok = unsafe {
                    cu_sys::cuMemPoolGetAttribute(
                        pool,
                        cu_sys::CUmemPool_attribute_enum::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                        &mut threshold as *mut u64 as *mut std::ffi::c_void,
                    )
                }
                .result()
                .is_ok();
                if ok {
                    sec.info(format!(
                        "memory pool release threshold: {threshold} bytes (0: freed memory goes back to the device at each synchronisation)"
                    ));
                }
            }
        }
    }
    sec.info(format!("candle f32 GEMM reduced precision (TF32): {}", candle_core::cuda::gemm_reduced_precision_f32()));
    Ok(())
}
