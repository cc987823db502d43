//! With the `cuda` feature, compiles `kernels/fused_ops.cu` to PTX with nvcc, for the
//! compute capability in `CUDA_COMPUTE_CAP` (default 90: H100, H200), into `OUT_DIR`,
//! where `src/cuda.rs` embeds it. Without the feature nothing is built.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels/fused_ops.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("fused_ops.ptx");
    let capability = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let capability = capability.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let status = Command::new("nvcc")
        .args(["--ptx", &format!("-arch=compute_{capability}"), "-O3", "-std=c++17", "kernels/fused_ops.cu", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("the `cuda` feature builds its kernels with nvcc, which did not start ({e}): put a CUDA compiler on PATH"));
    assert!(status.success(), "nvcc could not compile kernels/fused_ops.cu");
}
