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

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, InplaceOp1, Layout, Result, Shape, Storage, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The CPU storage behind `tensor`, copied, contiguous and starting at offset 0.
pub(crate) fn cpu_storage(tensor: &Tensor) -> Result<CpuStorage> {
    // `copy` would keep the layout (and the whole underlying buffer); this compacts.
    let tensor = tensor.flatten_all()?.force_contiguous()?;
    let (storage, _) = tensor.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(cpu.clone()),
        _ => candle_core::bail!("candle-fsdp runs on CPU ranks only in this build; got a {:?} tensor", tensor.device()),
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
    pub initial: Mutex<Option<(CpuStorage, Shape)>>,
}

impl CustomOp1 for GatheredParam {
    fn name(&self) -> &'static str {
        "fsdp-gathered-param"
    }

    fn cpu_fwd(&self, _shard: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.initial.lock().expect("op state").take() {
            Some(initial) => Ok(initial),
            None => candle_core::bail!("a gathered parameter node is created once and never recomputed"),
        }
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
        let zero = cpu_storage(&Tensor::zeros((), storage.dtype(), &Device::Cpu)?)?;
        Ok((zero, Shape::from(())))
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

/// An empty CPU storage of `dtype`.
fn empty_storage(dtype: DType) -> Result<CpuStorage> {
    cpu_storage(&Tensor::zeros(0, dtype, &Device::Cpu)?)
}

/// Releases a tensor's storage in place. Reading the tensor before a [`Fill`] fails.
pub(crate) struct Free;

impl InplaceOp1 for Free {
    fn name(&self) -> &'static str {
        "fsdp-free"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> Result<()> {
        *storage = empty_storage(storage.dtype())?;
        Ok(())
    }
}

/// Puts data back into a tensor's storage in place: the concatenation of element ranges
/// `(start, len)` of `source` (a contiguous tensor), copied once, straight from the
/// collective's output or the shard into the new storage.
pub(crate) struct Fill {
    pub source: Tensor,
    pub ranges: Vec<(usize, usize)>,
}

impl InplaceOp1 for Fill {
    fn name(&self) -> &'static str {
        "fsdp-fill"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _layout: &Layout) -> Result<()> {
        let (source, source_layout) = self.source.storage_and_layout();
        let (Storage::Cpu(source), true) = (&*source, source_layout.is_contiguous()) else {
            candle_core::bail!("fill: the source must be a contiguous CPU tensor");
        };
        let base = source_layout.start_offset();
        let total: usize = self.ranges.iter().map(|(_, len)| len).sum();
        macro_rules! concat {
            ($values:expr, $variant:ident) => {{
                let mut out = Vec::with_capacity(total);
                for &(start, len) in &self.ranges {
                    out.extend_from_slice(&$values[base + start..base + start + len]);
                }
                CpuStorage::$variant(out)
            }};
        }
        let filled = match source {
            CpuStorage::U8(v) => concat!(v, U8),
            CpuStorage::U32(v) => concat!(v, U32),
            CpuStorage::I16(v) => concat!(v, I16),
            CpuStorage::I32(v) => concat!(v, I32),
            CpuStorage::I64(v) => concat!(v, I64),
            CpuStorage::BF16(v) => concat!(v, BF16),
            CpuStorage::F16(v) => concat!(v, F16),
            CpuStorage::F32(v) => concat!(v, F32),
            CpuStorage::F64(v) => concat!(v, F64),
            CpuStorage::F8E4M3(v) => concat!(v, F8E4M3),
            other => candle_core::bail!("fill: {:?} parameters are not supported", other.dtype()),
        };
        if filled.dtype() != storage.dtype() {
            candle_core::bail!("fill: {:?} data into a {:?} tensor", filled.dtype(), storage.dtype());
        }
        *storage = filled;
        Ok(())
    }
}
