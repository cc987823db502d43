//! What the crate's custom ops need from candle's backends, written once for all of them:
//! each backend's storage type ([`OnBackend`]) and values computed with ordinary tensor
//! ops that a node's one forward hands to candle ([`BuiltValue`]), so no op needs
//! per-backend arithmetic.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CudaStorage, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

/// A candle backend's storage type, and how to find it inside a `Storage`.
pub(crate) trait OnBackend: BackendStorage<Device: BackendDevice<Storage = Self>> + Sized {
    /// The fewest elements the backend allocates: CUDA refuses zero-byte allocations.
    const SMALLEST: usize;

    fn pick(storage: &Storage) -> Option<&Self>;

    /// The storage of a released tensor (see the runtime's `storage` module): candle's
    /// `F8E8M0`, a storage type no tensor of the runtime has and for which candle has no
    /// arithmetic, holding as few bytes as the backend allocates.
    fn released(device: &Self::Device) -> Result<Self>;
}

impl OnBackend for CpuStorage {
    const SMALLEST: usize = 0;

    fn pick(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cpu(cpu) => Some(cpu),
            _ => None,
        }
    }

    fn released(_device: &Self::Device) -> Result<Self> {
        Ok(CpuStorage::F8E8M0(Vec::new()))
    }
}

impl OnBackend for CudaStorage {
    const SMALLEST: usize = 1;

    fn pick(storage: &Storage) -> Option<&Self> {
        match storage {
            Storage::Cuda(cuda) => Some(cuda),
            _ => None,
        }
    }

    #[cfg(feature = "cuda")]
    fn released(device: &Self::Device) -> Result<Self> {
        let slice = candle_core::cuda_backend::CudaStorageSlice::F8E8M0(device.alloc_zeros::<u8>(Self::SMALLEST)?);
        Ok(CudaStorage { slice, device: device.clone() })
    }

    #[cfg(not(feature = "cuda"))]
    fn released(device: &Self::Device) -> Result<Self> {
        device.zeros_impl(&Shape::from(Self::SMALLEST), candle_core::DType::F8E8M0)
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
/// hands it to candle.
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
