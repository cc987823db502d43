//! In-place storage swaps that release and restore a gathered parameter's memory while
//! every tensor and graph node referring to it stays valid: [`Free`] and [`Fill`].

use crate::backend::OnBackend;
use candle_core::backend::{BackendDevice, BackendStorage};
#[cfg(test)]
use candle_core::Storage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, InplaceOp1, Layout, Result, Shape, Tensor};

/// The storage of a released tensor: as few elements as the backend allocates (none on
/// CPU, one on CUDA, which refuses zero-byte allocations).
pub(crate) fn released<S: OnBackend>(device: &S::Device, dtype: DType) -> Result<S> {
    device.zeros_impl(&Shape::from(S::SMALLEST), dtype)
}

/// Releases a tensor's storage in place. Reading the tensor before a [`Fill`] fails on
/// CPU. cudarc frees the old buffer in stream order, after the kernels that read it.
pub(crate) struct Free;

impl InplaceOp1 for Free {
    fn name(&self) -> &'static str {
        "fsdp-free"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> Result<()> {
        *storage = released(storage.device(), storage.dtype())?;
        Ok(())
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, _layout: &Layout) -> Result<()> {
        *storage = released(storage.device(), storage.dtype())?;
        Ok(())
    }
}

/// A tensor of `shape` and `dtype` that starts out released (applied to any tensor on the
/// wanted device): the placeholder of a parameter that has no values yet, or the gathered
/// node of a shard, which may be in another dtype than the shard (mixed precision).
pub(crate) struct Unallocated {
    pub shape: Shape,
    pub dtype: DType,
}

impl CustomOp1 for Unallocated {
    fn name(&self) -> &'static str {
        "fsdp-unallocated"
    }

    fn cpu_fwd(&self, like: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((released(like.device(), self.dtype)?, self.shape.clone()))
    }

    fn cuda_fwd(&self, like: &CudaStorage, _layout: &Layout) -> Result<(CudaStorage, Shape)> {
        Ok((released(like.device(), self.dtype)?, self.shape.clone()))
    }
}

/// Puts data back into a tensor's storage in place: the concatenation of element ranges
/// `(start, len)` of `source` (a contiguous tensor), copied once, straight from the
/// collective's output or the shard into the new storage. Ranges that repeat with one
/// length and one stride (a parameter's piece of every rank's shard) are one strided copy.
pub(crate) struct Fill {
    pub source: Tensor,
    pub ranges: Vec<(usize, usize)>,
}

impl Fill {
    fn fill<S: OnBackend>(&self, storage: &mut S) -> Result<()> {
        let (source, source_layout) = self.source.storage_and_layout();
        let (Some(source), true) = (S::pick(&source), source_layout.is_contiguous()) else {
            candle_core::bail!("fill: the source must be a contiguous tensor on the parameter's device");
        };
        if source.dtype() != storage.dtype() {
            candle_core::bail!("fill: {:?} data into a {:?} tensor", source.dtype(), storage.dtype());
        }
        let base = source_layout.start_offset();
        let total: usize = self.ranges.iter().map(|(_, len)| len).sum();
        // Every element is written by the copies below before anyone reads it.
        let mut filled =
            unsafe { storage.device().alloc_uninit(&Shape::from(total.max(S::SMALLEST)), storage.dtype())? };
        let mut written = 0;
        for run in strided_runs(&self.ranges) {
            source.copy2d(&mut filled, run.count, run.len, run.stride, run.len, base + run.start, written)?;
            written += run.count * run.len;
        }
        *storage = filled;
        Ok(())
    }
}

/// `count` ranges of `len` elements, the first at `start`, each `stride` after the last.
#[derive(Debug, PartialEq)]
struct StridedRun {
    start: usize,
    len: usize,
    stride: usize,
    count: usize,
}

/// Groups consecutive ranges of equal length and equal spacing; empty ranges copy nothing.
fn strided_runs(ranges: &[(usize, usize)]) -> Vec<StridedRun> {
    let mut runs: Vec<StridedRun> = Vec::new();
    for &(start, len) in ranges.iter().filter(|(_, len)| *len > 0) {
        if let Some(run) = runs.last_mut() {
            let next = run.start + run.count * run.stride;
            let spacing_fits = run.count == 1 || start == next;
            if run.len == len && start > run.start && spacing_fits {
                if run.count == 1 {
                    run.stride = start - run.start;
                }
                run.count += 1;
                continue;
            }
        }
        runs.push(StridedRun { start, len, stride: len, count: 1 });
    }
    runs
}

impl InplaceOp1 for Fill {
    fn name(&self) -> &'static str {
        "fsdp-fill"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> Result<()> {
        self.fill(storage)
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, _layout: &Layout) -> Result<()> {
        self.fill(storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_ranges_at_one_stride_are_one_run() {
        let runs = strided_runs(&[(0, 4), (10, 4), (20, 4), (30, 2)]);
        assert_eq!(
            runs,
            vec![
                StridedRun { start: 0, len: 4, stride: 10, count: 3 },
                StridedRun { start: 30, len: 2, stride: 2, count: 1 }
            ]
        );
        let runs = strided_runs(&[(0, 4), (10, 4), (25, 4)]);
        assert_eq!(runs.len(), 2, "a change of spacing starts a new run: {runs:?}");
        assert_eq!(strided_runs(&[(0, 0), (7, 0)]), vec![], "a parameter of no elements copies nothing");
    }

    #[test]
    fn fill_concatenates_the_ranges() -> Result<()> {
        let source = Tensor::arange(0f32, 40., &candle_core::Device::Cpu)?;
        let target = Tensor::zeros(10, candle_core::DType::F32, &candle_core::Device::Cpu)?;
        target.inplace_op1(&Fill { source, ranges: vec![(0, 3), (10, 3), (20, 3), (35, 1)] })?;
        assert_eq!(target.to_vec1::<f32>()?, [0., 1., 2., 10., 11., 12., 20., 21., 22., 35.]);
        target.inplace_op1(&Free)?;
        let (storage, _) = target.storage_and_layout();
        assert!(matches!(&*storage, Storage::Cpu(cpu) if cpu.as_slice::<f32>()?.is_empty()));
        Ok(())
    }
}
