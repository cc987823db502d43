//! The candle custom ops through which the runtime takes part in autograd.
//!
//! - [`GatheredParam`]: the node a unit's full (gathered) parameter hangs from. Its input is
//!   the rank's shard `Var`; in backward it receives the parameter's complete gradient
//!   (every use in the step summed by candle) and hands it to the unit, which reduces all
//!   its parameters' gradients in one collective. It returns no gradient itself, so full
//!   gradients never reach the `GradStore`.
//! - [`BackwardHook`]: a zero scalar computed from a tensor and added to it. Because it
//!   consumes the tensor, candle's topological walk runs its backward before any op that
//!   produced the tensor: on a unit's outputs that is the unit's pre-backward point. And
//!   because the sum replaces the tensor, the walk runs it only after every op that
//!   consumed the sum: on a unit's inputs, after the unit's own backward (FSDP2's
//!   post-backward hook on a module's inputs). Parameter gradients cannot tell that for
//!   frozen parameters, which have none.

use super::storage::Unallocated;
use crate::backend::OnBackend;
use candle_core::backend::BackendDevice;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Called by the ops when autograd reaches them.
pub(crate) trait GradSink: Send + Sync {
    /// The complete gradient of parameter `param` of unit `unit`.
    fn deposit(&self, unit: usize, param: usize, grad: &Tensor) -> Result<()>;
    /// The gradient reached unit `unit`'s outputs, hooked by the forward of step
    /// `generation`: its backward is about to start.
    fn pre_backward(&self, unit: usize, generation: u64) -> Result<()>;
    /// The backward passed one of unit `unit`'s inputs, hooked by the forward of step
    /// `generation`: nothing computed from that input within the unit is left.
    fn input_passed(&self, unit: usize, generation: u64) -> Result<()>;
}

/// Where a [`BackwardHook`] sits, and so what its backward tells the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HookPoint {
    /// On a unit's output: its backward starts.
    Output,
    /// On a unit's input: the backward of what the unit computed from it is done.
    Input,
}

/// See the module docs. The node starts out released, with the full parameter's shape
/// (`released`); its values arrive through [`super::storage::Fill`].
pub(crate) struct GatheredParam {
    pub sink: std::sync::Weak<dyn GradSink>,
    pub unit: usize,
    pub param: usize,
    pub released: Unallocated,
}

impl CustomOp1 for GatheredParam {
    fn name(&self) -> &'static str {
        "fsdp-gathered-param"
    }

    fn cpu_fwd(&self, shard: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.released.cpu_fwd(shard, layout)
    }

    fn cuda_fwd(&self, shard: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        self.released.cuda_fwd(shard, layout)
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
    pub point: HookPoint,
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
                    match self.point {
                        HookPoint::Output => sink.pre_backward(self.unit, self.generation)?,
                        HookPoint::Input => sink.input_passed(self.unit, self.generation)?,
                    }
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
