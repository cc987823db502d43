//! The candle custom ops through which the runtime takes part in autograd.
//!
//! - [`GatheredParam`]: the node a unit's full (gathered) parameter hangs from. Its input is
//!   the rank's shard `Var`; in backward it receives the parameter's complete gradient
//!   (every use in the step summed by candle) and hands it to the unit, which reduces all
//!   its parameters' gradients in one collective. It returns no gradient itself, so full
//!   gradients never reach the `GradStore`.
//! - [`BackwardHook`]: a zero scalar computed from a tensor and added to it. Because it
//!   consumes the tensor, candle's topological walk runs its backward before any op that
//!   produced the tensor: on a unit's outputs that is the unit's pre-backward point.
//! - [`Free`] and [`Fill`]: in-place storage swaps that release and restore a gathered
//!   parameter's memory while every tensor and graph node referring to it stays valid.
//!
//! Every op is written once over candle's backend traits and runs on the CPU and on CUDA.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, InplaceOp1, Layout, Result, Shape, Storage, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A candle backend's storage type, and how to find it inside a `Storage`.
pub(crate) trait OnBackend: BackendStorage<Device: BackendDevice<Storage = Self>> + Sized {
    fn pick(storage: &Storage) -> Option<&Self>;
}

impl OnBackend for CpuStorage {
    fn pick(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cpu(cpu) => Some(cpu),
            _ => None,
        }
    }
}

impl OnBackend for CudaStorage {
    fn pick(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cuda(cuda) => Some(cuda),
            _ => None,
        }
    }
}

/// A copy of `tensor`'s data as backend storage `S`, contiguous and starting at offset 0.
fn owned_storage<S: OnBackend>(tensor: &Tensor) -> Result<S> {
    // `copy` would keep the layout (and the whole underlying buffer); this compacts.
    let tensor = tensor.flatten_all()?.force_contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    match S::pick(&storage) {
        Some(storage) => storage.try_clone(layout),
        None => candle_core::bail!("candle-fsdp: a {:?} tensor where the op runs on another device", tensor.device()),
    }
}

/// A value computed with ordinary tensor ops when a node is built; the node's one forward
/// hands it to candle. Ops built this way need no per-backend arithmetic.
pub(crate) struct BuiltValue {
    what: &'static str,
    value: Mutex<Option<Tensor>>,
}

impl BuiltValue {
    pub fn new(what: &'static str, value: Tensor) -> Self {
        Self { what, value: Mutex::new(Some(value)) }
    }

    /// The value's storage and shape; a second call fails (nodes are never recomputed).
    pub fn take<S: OnBackend>(&self) -> Result<(S, Shape)> {
        match self.value.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(value) => Ok((owned_storage(&value)?, value.shape().clone())),
            None => candle_core::bail!("{}: the node is created once and never recomputed", self.what),
        }
    }
}

/// Called by the ops when autograd reaches them.
pub(crate) trait GradSink: Send + Sync {
    /// The complete gradient of parameter `param` of unit `unit`.
    fn deposit(&self, unit: usize, param: usize, grad: &Tensor) -> Result<()>;
    /// The gradient reached unit `unit`'s outputs, hooked by the forward of step
    /// `generation`: its backward is about to start.
    fn pre_backward(&self, unit: usize, generation: u64) -> Result<()>;
}

/// See the module docs. `initial` is the full value the node starts with (consumed by the
/// one forward that creates the node); later values arrive through [`Fill`].
pub(crate) struct GatheredParam {
    pub sink: std::sync::Weak<dyn GradSink>,
    pub unit: usize,
    pub param: usize,
    pub initial: BuiltValue,
}

impl CustomOp1 for GatheredParam {
    fn name(&self) -> &'static str {
        "fsdp-gathered-param"
    }

    fn cpu_fwd(&self, _shard: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.initial.take()
    }

    fn cuda_fwd(&self, _shard: &CudaStorage, _layout: &Layout) -> Result<(CudaStorage, Shape)> {
        self.initial.take()
    }

    fn bwd(&self, _shard: &Tensor, _full: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if let Some(sink) = self.sink.upgrade() {
            sink.deposit(self.unit, self.param, grad)?;
        }
        Ok(None)
    }
}

/// See the module docs. Without a sink the node only orders the backward walk (it ties
/// a tensor into another one's history, see `RankState::bind_inputs`).
pub(crate) struct BackwardHook {
    pub sink: Option<std::sync::Weak<dyn GradSink>>,
    pub unit: usize,
    /// The step whose forward attached the hook (see `RankState::generation`).
    pub generation: u64,
    /// Counts the hook as live until the graph holding it is dropped.
    pub _live: Option<LiveHook>,
}

/// Increments a counter while alive: the runtime can tell how many backward hooks the
/// graphs still hold (none once the outputs of a step are dropped).
pub(crate) struct LiveHook(Arc<AtomicUsize>);

impl LiveHook {
    pub fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for LiveHook {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl CustomOp1 for BackwardHook {
    fn name(&self) -> &'static str {
        "fsdp-backward-hook"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        zero_scalar(storage)
    }

    fn cuda_fwd(&self, storage: &CudaStorage, _layout: &Layout) -> Result<(CudaStorage, Shape)> {
        zero_scalar(storage)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        match &self.sink {
            Some(sink) => {
                if let Some(sink) = sink.upgrade() {
                    sink.pre_backward(self.unit, self.generation)?;
                }
                // A hooked output also feeds the add that carries its real gradient.
                Ok(None)
            }
            // An anchored input may have no other consumer, and candle's walk requires a
            // gradient for every tracked node it reaches.
            None => Ok(Some(arg.zeros_like()?)),
        }
    }
}

fn zero_scalar<S: OnBackend>(like: &S) -> Result<(S, Shape)> {
    let shape = Shape::from(());
    Ok((like.device().zeros_impl(&shape, like.dtype())?, shape))
}

/// Releases a tensor's storage in place. Reading the tensor before a [`Fill`] fails on
/// CPU. On CUDA the storage becomes a one-element placeholder (a zero-byte allocation is
/// not valid there); cudarc frees the old buffer in stream order, after the kernels that
/// read it.
pub(crate) struct Free;

impl Free {
    fn release<S: OnBackend>(storage: &mut S, placeholder_len: usize) -> Result<()> {
        *storage = storage.device().zeros_impl(&Shape::from(placeholder_len), storage.dtype())?;
        Ok(())
    }
}

impl InplaceOp1 for Free {
    fn name(&self) -> &'static str {
        "fsdp-free"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> Result<()> {
        Free::release(storage, 0)
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, _layout: &Layout) -> Result<()> {
        Free::release(storage, 1)
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
        let mut filled = unsafe { storage.device().alloc_uninit(&Shape::from(total), storage.dtype())? };
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

/// Groups consecutive ranges of equal length and equal spacing.
fn strided_runs(ranges: &[(usize, usize)]) -> Vec<StridedRun> {
    let mut runs: Vec<StridedRun> = Vec::new();
    for &(start, len) in ranges {
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
            vec![StridedRun { start: 0, len: 4, stride: 10, count: 3 }, StridedRun { start: 30, len: 2, stride: 2, count: 1 }]
        );
        let runs = strided_runs(&[(0, 4), (10, 4), (25, 4)]);
        assert_eq!(runs.len(), 2, "a change of spacing starts a new run: {runs:?}");
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
