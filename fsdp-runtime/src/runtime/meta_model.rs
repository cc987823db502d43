//! [`MetaModel`]: a model built with its parameters' shapes but without their values
//! (PyTorch's meta device), so that [`Fsdp::wrap_meta`](super::Fsdp::wrap_meta) can
//! materialise only each rank's shards and no rank ever holds the whole model.
//!
//! The model is built through a `VarBuilder` whose backend hands out placeholders: tensors
//! of the requested shape and dtype whose storage is released, as a sharded parameter's is
//! between its gathers. The backend records each placeholder's name and initialiser (the
//! `Init` hint candle-nn's layers pass: Kaiming for a linear weight, a uniform bound for
//! its bias, ones for a norm), from which wrapping draws the values.

use super::storage::{released, Unallocated};
use crate::error::ConfigError;
use crate::error::{Error, Result};
use crate::launch::panic_message;
use crate::model::{Layout, ShardableModel};
use candle_core::{DType, Device, Shape, Storage, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

/// A model whose parameters have shapes but no values yet. It cannot run: the only way to
/// use it is [`Fsdp::wrap_meta`](super::Fsdp::wrap_meta), which materialises the shards.
pub struct MetaModel<M> {
    pub(super) model: M,
    /// What the builder recorded, with the placeholder it handed out, in the order the
    /// model asked. The placeholders are kept: a layer may hold a view of one, which
    /// wrapping recognises by the storage they share.
    pub(super) params: Vec<(Tensor, MetaParam)>,
}

/// One tensor the model asked its `VarBuilder` for.
#[derive(Clone, Debug)]
pub(crate) struct MetaParam {
    /// The name the model asked for (its `VarBuilder` path).
    pub name: String,
    pub shape: Shape,
    pub init: Init,
    pub dtype: DType,
    /// Where the values go when they are materialised.
    pub device: Device,
}

impl<M> MetaModel<M> {
    /// Builds a model with `build` (a constructor taking a `VarBuilder`, such as a
    /// candle-nn layer's) without allocating its parameters. Each tensor's values come
    /// later from the initialiser its layer asked for, or from a checkpoint.
    ///
    /// The placeholders live on the CPU with no elements, whatever `device` says
    /// (`device` is where the shards will be made): a constructor that reads a
    /// parameter's values cannot work before the values exist, and fails here with an
    /// error naming the last parameter it was given.
    pub fn build(
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
    ) -> Result<Self> {
        let backend = MetaBackend::default();
        let made = backend.made.clone();
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let built = catch_unwind(AssertUnwindSafe(|| build(vb)));
        let made = std::mem::take(&mut *made.lock().unwrap_or_else(|p| p.into_inner()));
        let failure = |message: String| {
            Error::Config(ConfigError::MetaBuild { last: made.last().map(|(p, _)| p.name.clone()), message })
        };
        let model = match built {
            Ok(Ok(model)) => model,
            Ok(Err(error)) => return Err(failure(error.to_string())),
            Err(panic) => return Err(failure(format!("the constructor panicked: {}", panic_message(panic)))),
        };
        let params = made.into_iter().map(|(param, tensor)| (tensor, param)).collect();
        Ok(Self { model, params })
    }

    /// The tensors the model asked for, in the order it asked: names, shapes and dtypes.
    pub fn parameters(&self) -> Vec<(String, Shape, DType)> {
        self.params.iter().map(|(_, p)| (p.name.clone(), p.shape.clone(), p.dtype)).collect()
    }
}

impl<M: ShardableModel> MetaModel<M> {
    /// The model's layout (units, FQNs, shapes, dtypes): enough for a [`crate::Plan`]
    /// before any value exists.
    pub fn layout(&self) -> Result<Layout> {
        Layout::of(&self.model)
    }
}

/// The `VarBuilder` backend: placeholders, recorded in the order they are made.
#[derive(Default)]
struct MetaBackend {
    made: Arc<Mutex<Vec<(MetaParam, Tensor)>>>,
}

impl SimpleBackend for MetaBackend {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        // A name asked for twice is one tensor, as with a `VarMap`.
        if let Some((param, tensor)) = made.iter().find(|(p, _)| p.name == name) {
            if param.shape != shape || param.dtype != dtype {
                candle_core::bail!(
                    "`{name}` is asked for as {shape:?} {dtype:?}, but was made as {:?} {:?}",
                    param.shape,
                    param.dtype
                );
            }
            return Ok(tensor.clone());
        }
        let unallocated = Unallocated { shape: shape.clone(), dtype };
        let tensor = released(Tensor::zeros((), dtype, &Device::Cpu)?.apply_op1_no_bwd(&unallocated)?)?;
        let param = MetaParam { name: name.to_string(), shape, init, dtype, device: dev.clone() };
        made.push((param, tensor.clone()));
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!(
            "`{name}` is asked for without a shape (VarBuilder::get_unchecked): a model built without values \
             must give every tensor's shape"
        )
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.made.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|(p, _)| p.name == name)
    }
}

/// Where a tensor's storage lives: a tensor and its views (`t()`, `reshape`, `narrow`)
/// share it.
pub(crate) fn storage_address(tensor: &Tensor) -> usize {
    let (storage, _) = tensor.storage_and_layout();
    &*storage as *const Storage as usize
}
