//! Values a forward computes for its backward (a fused op's gradients, computed while its
//! inputs are at hand), kept as backend storage and handed to autograd as tensors later.
//!
//! A custom op returns one storage; a second result is stashed here and turned into a
//! tensor in `bwd` by [`Stash::take`], an op whose forward returns the stashed storage.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// One stashed storage, by backend.
pub(crate) enum Stored {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::CudaStorage),
}

/// A storage and its shape, filled by a forward, taken once by its backward.
#[derive(Default)]
pub(crate) struct Stash(Mutex<Option<(Stored, Shape)>>);

impl Stash {
    pub fn put(&self, stored: Stored, shape: Shape) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((stored, shape));
    }

    /// The stashed value as a tensor on `like`'s device; an error when there is none (a
    /// second backward through the same forward).
    pub fn take(&self, op: &str, like: &Tensor) -> Result<Tensor> {
        like.apply_op1_no_bwd(&Take { op, stash: self })
    }
}

struct Take<'a> {
    op: &'a str,
    stash: &'a Stash,
}

impl Take<'_> {
    fn stored(&self) -> Result<(Stored, Shape)> {
        self.stash.0.lock().unwrap_or_else(|p| p.into_inner()).take().ok_or_else(|| {
            crate::op_error(self.op, "its backward ran twice for one forward: the stored gradients are spent".into())
        })
    }
}

impl CustomOp1 for Take<'_> {
    fn name(&self) -> &'static str {
        "fused-stash"
    }

    fn cpu_fwd(&self, _like: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.stored()? {
            (Stored::Cpu(storage), shape) => Ok((storage, shape)),
            #[cfg(feature = "cuda")]
            _ => Err(crate::op_error(self.op, "the stored gradients are on another device".into())),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _like: &candle_core::CudaStorage,
        _layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match self.stored()? {
            (Stored::Cuda(storage), shape) => Ok((storage, shape)),
            _ => Err(crate::op_error(self.op, "the stored gradients are on another device".into())),
        }
    }
}
