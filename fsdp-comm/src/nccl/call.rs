//! One NCCL collective on typed device buffers, and the tensor that adopts its output.

use super::libraries::describe_nccl;
use crate::collectives::ReduceOp;
use candle_core::cuda::cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda::cudarc::nccl::{result as nccl, sys, NcclType};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice};
use candle_core::{CudaStorage, CustomOp1, Layout, Shape};
use std::sync::{Arc, Mutex};

/// Which NCCL collective to run.
#[derive(Clone, Copy)]
pub(super) enum NcclCall {
    AllGather,
    ReduceScatter(sys::ncclRedOp_t),
    AllReduce(sys::ncclRedOp_t),
    Broadcast { root: i32 },
}

pub(super) fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
    }
}

/// A collective's arguments: elements `start..start + len` of the input storage into an
/// output of `out_len` elements.
pub(super) struct Transfer {
    pub start: usize,
    pub len: usize,
    pub out_len: usize,
    pub call: NcclCall,
}

/// A new, unwritten buffer of `len` elements (at least one: CUDA refuses empty
/// allocations) of `like`'s dtype, allocated on `stream`.
pub(super) fn alloc_output(like: &CudaStorage, stream: &Arc<CudaStream>, len: usize) -> Result<CudaStorage, String> {
    fn alloc<T: DeviceRepr + CudaDType>(
        like: &CudaStorage,
        stream: &Arc<CudaStream>,
        len: usize,
    ) -> Result<CudaStorage, String> {
        // SAFETY: the collective writes every element before anything reads it.
        let slice =
            unsafe { stream.alloc::<T>(len.max(1)) }.map_err(|e| format!("cannot allocate the output: {e:?}"))?;
        Ok(CudaStorage::wrap_cuda_slice(slice, like.device.clone()))
    }
    match &like.slice {
        CudaStorageSlice::U8(_) => alloc::<u8>(like, stream, len),
        CudaStorageSlice::U32(_) => alloc::<u32>(like, stream, len),
        CudaStorageSlice::I32(_) => alloc::<i32>(like, stream, len),
        CudaStorageSlice::I64(_) => alloc::<i64>(like, stream, len),
        CudaStorageSlice::BF16(_) => alloc::<half::bf16>(like, stream, len),
        CudaStorageSlice::F16(_) => alloc::<half::f16>(like, stream, len),
        CudaStorageSlice::F32(_) => alloc::<f32>(like, stream, len),
        CudaStorageSlice::F64(_) => alloc::<f64>(like, stream, len),
        _ => Err(format!("NCCL cannot move {:?} tensors", candle_core::backend::BackendStorage::dtype(like))),
    }
}

/// Runs `transfer` on `comm_stream`. The stream must already wait for the compute stream
/// (the input's writers and the output's allocation), and the compute stream must wait
/// for the call before the input is freed or the output read: cudarc's event tracking is
/// off on a rank's context (see the module above), so nothing orders them otherwise.
pub(super) fn run(
    comm: sys::ncclComm_t,
    comm_stream: &CudaStream,
    input: &CudaStorage,
    output: &mut CudaStorage,
    transfer: &Transfer,
) -> Result<(), String> {
    fn typed<T: DeviceRepr + NcclType + CudaDType>(
        comm: sys::ncclComm_t,
        stream: &CudaStream,
        input: &CudaStorage,
        output: &mut CudaStorage,
        t: &Transfer,
    ) -> Result<(), String> {
        let input = input.as_cuda_slice::<T>().map_err(|e| e.to_string())?.slice(t.start..t.start + t.len);
        let output = output.as_cuda_slice_mut::<T>().map_err(|e| e.to_string())?;
        let datatype = T::as_nccl_type();
        let (src, _record_read) = input.device_ptr(stream);
        let (dst, _record_write) = output.device_ptr_mut(stream);
        let (src, dst) = (src as *const std::ffi::c_void, dst as *mut std::ffi::c_void);
        let raw_stream = stream.cu_stream() as sys::cudaStream_t;
        // SAFETY: `src` and `dst` are live device buffers of the lengths given, ordered on
        // `stream`; the communicator is held by the caller for this one call.
        let status = unsafe {
            match t.call {
                NcclCall::AllGather => nccl::all_gather(src, dst, t.len, datatype, comm, raw_stream),
                NcclCall::ReduceScatter(op) => {
                    nccl::reduce_scatter(src, dst, t.out_len, datatype, op, comm, raw_stream)
                }
                NcclCall::AllReduce(op) => nccl::all_reduce(src, dst, t.len, datatype, op, comm, raw_stream),
                NcclCall::Broadcast { root } => nccl::broadcast(src, dst, t.len, datatype, root, comm, raw_stream),
            }
        };
        status.map(|_| ()).map_err(|e| describe_nccl(e.0))
    }
    match &input.slice {
        CudaStorageSlice::U8(_) => typed::<u8>(comm, comm_stream, input, output, transfer),
        CudaStorageSlice::U32(_) => typed::<u32>(comm, comm_stream, input, output, transfer),
        CudaStorageSlice::I32(_) => typed::<i32>(comm, comm_stream, input, output, transfer),
        CudaStorageSlice::I64(_) => typed::<i64>(comm, comm_stream, input, output, transfer),
        CudaStorageSlice::BF16(_) => typed::<half::bf16>(comm, comm_stream, input, output, transfer),
        CudaStorageSlice::F16(_) => typed::<half::f16>(comm, comm_stream, input, output, transfer),
        CudaStorageSlice::F32(_) => typed::<f32>(comm, comm_stream, input, output, transfer),
        CudaStorageSlice::F64(_) => typed::<f64>(comm, comm_stream, input, output, transfer),
        _ => Err(format!("NCCL cannot move {:?} tensors", candle_core::backend::BackendStorage::dtype(input))),
    }
}

/// Hands a storage made outside candle's ops to candle as a tensor.
pub(super) struct Adopt {
    storage: Mutex<Option<CudaStorage>>,
    shape: Shape,
}

impl Adopt {
    pub fn new(storage: CudaStorage, len: usize) -> Self {
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
