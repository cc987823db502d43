//! Keeping a training run: sharded checkpoints to resume (at any world size and
//! strategy), and full models in the Hugging Face layout to export and to start from.
//!
//! - [`Checkpointer::save`] / [`load`]: every rank writes its own shards of the
//!   parameters and of the optimizer state, and rank 0 one `metadata.json` that says where
//!   each FQN's elements lie; any number of ranks can load it, each reading only the
//!   ranges its new shards cover. A checkpoint becomes visible by one rename after every
//!   rank has written and synced its file, so an interrupted save never leaves a
//!   directory that loads, and the previous checkpoint stays.
//! - [`export_hf`]: the full state dict as `model.safetensors` (or
//!   `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`), gathered one
//!   unit at a time and written by rank 0.
//! - [`load_pretrained`]: a wrapped model's values from such a checkpoint, each rank
//!   reading only the ranges of its shards from the files.
//!
//! Uses `runtime` (the units and their shards) and `dist` (the agreement between ranks).

mod commit;
mod hf;
mod metadata;
mod sharded;
mod tensor_files;

pub use hf::{check_export_dir, export_hf, load_pretrained, ExportOptions, HfIndex, HfIndexMetadata};
pub use metadata::{CheckpointMetadata, FileEntry, OptimizerEntry, Piece, Progress, TensorEntry, TensorKind};
pub use sharded::{load, load_with, read_metadata, Checkpointer, LoadOptions, Resumed};

use crate::error::{Error, Result};
use crate::runtime::{pad, Buffer, Fill, ParamGroup};
use crate::Fsdp;
use candle_core::{DType, Device, Tensor};

/// The device this rank's tensors live on (for the small tensors of the rank agreement).
fn device_of<M>(fsdp: &Fsdp<M>) -> Device {
    let shard = fsdp.groups().iter().flat_map(|g| g.params.first()).next().map(|p| p.shard.device().clone());
    let buffer = fsdp.buffers().first().map(|b| b.tensor.device().clone());
    shard.or(buffer).unwrap_or(Device::Cpu)
}

/// Refuses models with a unit sharded over its own group: its value differs between
/// groups, and a checkpoint keeps one value per FQN.
fn check_world_sharded<M>(fsdp: &Fsdp<M>, what: &str) -> Result<()> {
    // Under hybrid sharding a unit's shard group and its replicas span the world.
    match fsdp.groups().iter().find(|g| g.comm.size() * g.replica_count() != fsdp.world_size()) {
        None => Ok(()),
        Some(group) => Err(Error::CheckpointUnsupported {
            rank: fsdp.rank(),
            what: format!(
                "{what} of unit `{}`, which is sharded over a group of {} ranks",
                group.name,
                group.comm.size()
            ),
            why: "its values differ between groups, and a checkpoint keeps one value per FQN".into(),
        }),
    }
}

/// This rank's shard of parameter `param` of `group` (or of a tensor cut like it, an
/// optimizer slot), from the full value's flattened elements, of which `read(start,
/// len, dtype)` returns a range; the padding is zero, as at wrap time.
fn shard_of(
    group: &ParamGroup,
    param: usize,
    read: impl FnOnce(usize, usize, DType) -> Result<Tensor>,
) -> Result<Tensor> {
    let param = &group.params[param];
    let range = param.spec.real_range(group.shard_rank());
    let dtype = param.shard.dtype();
    let values = if range.is_empty() {
        Tensor::zeros(0, dtype, param.shard.device())?
    } else {
        read(range.start, range.len(), dtype)?
    };
    Ok(pad(&values, param.spec.shard_len)?)
}

/// Overwrites a buffer, in place (the layers hold it), with `flat`, its full value's
/// flattened elements.
fn restore_buffer(buffer: &Buffer, flat: Tensor) -> Result<()> {
    let numel = buffer.tensor.elem_count();
    let dtype = buffer.tensor.dtype();
    let flat = flat.to_dtype(dtype)?.contiguous()?;
    buffer.tensor.inplace_op1(&Fill { source: flat, ranges: vec![(0, numel)], dtype })?;
    Ok(())
}

/// Whether every element of a floating-point tensor is finite: `x · 0` is 0 for a finite
/// `x` and NaN otherwise, and a sum of zeros never overflows.
fn all_finite(tensor: &Tensor) -> Result<bool> {
    let zeros = tensor.to_dtype(DType::F32)?.affine(0.0, 0.0)?;
    Ok(zeros.sum_all()?.to_scalar::<f32>()?.is_finite())
}

/// At most this many problems are listed in one error; the rest are counted.
const MAX_LISTED: usize = 20;

fn capped(mut problems: Vec<String>) -> Vec<String> {
    if problems.len() > MAX_LISTED {
        let more = problems.len() - MAX_LISTED;
        problems.truncate(MAX_LISTED);
        problems.push(format!("... and {more} more"));
    }
    problems
}
