//! In-place storage swaps that release and restore a gathered parameter's memory while
//! every tensor and graph node referring to it stays valid: [`Free`] and [`Fill`].
//!
//! A released tensor keeps its shape and dtype, but its storage is candle's `F8E8M0`
//! with no data ([`OnBackend::released`]). Whoever kept the tensor (a clone or a view
//! taken inside a closure, a graph node) shares that storage, and candle checks a
//! storage's own type before it touches the data: every operation on a released tensor
//! fails with a dtype error (`unsupported dtype F8E8M0`, `dtype mismatch ... F8E8M0`)
//! instead of reading past the end of an emptied buffer. `tests/released_params.rs`
//! runs candle's operations on released parameters to hold candle to that.

use crate::backend::OnBackend;
use candle_core::backend::{BackendDevice, BackendStorage};
#[cfg(test)]
use candle_core::Storage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, InplaceOp1, Layout, Result, Shape, Tensor};

/// Releases a tensor's storage in place (see the module docs). cudarc frees the old
/// buffer in stream order, after the kernels that read it.
pub(crate) struct Free;

impl InplaceOp1 for Free {
    fn name(&self) -> &'static str {
        "fsdp-free"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> Result<()> {
        *storage = CpuStorage::released(storage.device())?;
        Ok(())
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, _layout: &Layout) -> Result<()> {
        *storage = CudaStorage::released(storage.device())?;
        Ok(())
    }
}

/// A tensor of `shape` and `dtype` that holds no values (applied to any tensor on the
/// wanted device): the placeholder of a parameter that has no values yet, or the gathered
/// node of a shard, which may be in another dtype than the shard (mixed precision). The
/// op's output is an empty storage of `dtype`, which gives the tensor its dtype;
/// [`released`] turns it into a released tensor before anyone else sees it.
pub(crate) struct Unallocated {
    pub shape: Shape,
    pub dtype: DType,
}

impl Unallocated {
    fn empty<S: OnBackend>(&self, like: &S) -> Result<(S, Shape)> {
        Ok((like.device().zeros_impl(&Shape::from(S::SMALLEST), self.dtype)?, self.shape.clone()))
    }
}

impl CustomOp1 for Unallocated {
    fn name(&self) -> &'static str {
        "fsdp-unallocated"
    }

    fn cpu_fwd(&self, like: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.empty(like)
    }

    fn cuda_fwd(&self, like: &CudaStorage, _layout: &Layout) -> Result<(CudaStorage, Shape)> {
        self.empty(like)
    }
}

/// `tensor`, just made by [`Unallocated`], released.
pub(crate) fn released(tensor: Tensor) -> Result<Tensor> {
    tensor.inplace_op1(&Free)?;
    Ok(tensor)
}

/// Puts data back into a tensor's storage in place: the concatenation of element ranges
/// `(start, len)` of `source` (a contiguous tensor), copied once, straight from the
/// collective's output or the shard into the new storage. Ranges that repeat with one
/// length and one stride (a parameter's piece of every rank's shard) are one strided copy.
pub(crate) struct Fill {
    pub source: Tensor,
    pub ranges: Vec<(usize, usize)>,
    /// The filled tensor's dtype (its storage, released, has none to compare with).
    pub dtype: DType,
}

impl Fill {
    /// Fills the storage of a tensor of `layout` (contiguous, from its start).
    fn fill<S: OnBackend>(&self, storage: &mut S, layout: &Layout) -> Result<()> {
        let (source, source_layout) = self.source.storage_and_layout();
        let (Some(source), true) = (S::pick(&source), source_layout.is_contiguous()) else {
            candle_core::bail!("fill: the source must be a contiguous tensor on the parameter's device");
        };
        if source.dtype() != self.dtype {
            candle_core::bail!("fill: {:?} data into a {:?} tensor", source.dtype(), self.dtype);
        }
        let base = source_layout.start_offset();
        let total: usize = self.ranges.iter().map(|(_, len)| len).sum();
        let source_len = source_layout.shape().elem_count();
        if total != layout.shape().elem_count() || layout.start_offset() != 0 {
            candle_core::bail!("fill: {total} elements for a tensor of {:?}", layout.shape());
        }
        if let Some((start, len)) = self.ranges.iter().find(|&&(start, len)| start + len > source_len) {
            candle_core::bail!("fill: elements {start}..{} of a source of {source_len}", start + len);
        }
        // SAFETY: the storage is only read through the tensor, whose `total` elements (checked
        // above) the copies below write, from ranges inside the source (checked above),
        // before the storage is handed over; an error drops it unread. The `SMALLEST`
        // elements allocated for an empty tensor are never read.
        let mut filled = unsafe { storage.device().alloc_uninit(&Shape::from(total.max(S::SMALLEST)), self.dtype)? };
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

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        self.fill(storage, layout)
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
        self.fill(storage, layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fill_that_would_leave_elements_unwritten_or_read_past_its_source_is_refused() -> Result<()> {
        let source = Tensor::arange(0f32, 6., &candle_core::Device::Cpu)?;
        let target = Tensor::zeros(4, DType::F32, &candle_core::Device::Cpu)?;
        let fill = |ranges: Vec<(usize, usize)>| Fill { source: source.clone(), ranges, dtype: DType::F32 };
        assert!(target.inplace_op1(&fill(vec![(0, 3)])).is_err(), "3 of 4 elements");
        assert!(target.inplace_op1(&fill(vec![(0, 2), (5, 2)])).is_err(), "past the source");
        target.inplace_op1(&fill(vec![(4, 2), (0, 2)]))?;
        assert_eq!(target.to_vec1::<f32>()?, [4., 5., 0., 1.]);
        Ok(())
    }

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
        let ranges = vec![(0, 3), (10, 3), (20, 3), (35, 1)];
        target.inplace_op1(&Fill { source: source.clone(), ranges: ranges.clone(), dtype: DType::F32 })?;
        assert_eq!(target.to_vec1::<f32>()?, [0., 1., 2., 10., 11., 12., 20., 21., 22., 35.]);
        target.inplace_op1(&Free)?;
        {
            let (storage, _) = target.storage_and_layout();
            assert!(matches!(&*storage, Storage::Cpu(CpuStorage::F8E8M0(bytes)) if bytes.is_empty()));
        }
        assert_eq!(target.dtype(), DType::F32, "a released tensor keeps its dtype");
        assert!(target.to_vec1::<f32>().is_err(), "reading a released tensor is an error");
        let wrong = Fill { source, ranges, dtype: DType::F16 };
        assert!(target.inplace_op1(&wrong).is_err(), "f32 data into an f16 tensor is refused");
        Ok(())
    }
}
