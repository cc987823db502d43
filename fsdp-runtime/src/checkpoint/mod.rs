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
//! Sees the model through the runtime's views of its units (each parameter's name, shape,
//! dtype and this rank's range, to read or fill), and the ranks through the collectives.

mod commit;
mod hf;
mod metadata;
mod sharded;
mod tensor_files;

pub use hf::{
    check_export_dir, export_hf, load_pretrained, load_pretrained_part, ExportOptions, HfIndex, HfIndexMetadata,
};
pub use metadata::{CheckpointMetadata, FileEntry, OptimizerEntry, Piece, Progress, TensorEntry, TensorKind};
pub use sharded::{load, load_with, read_metadata, Checkpointer, LoadOptions, Resumed};

use crate::error::CheckpointError;
use crate::error::{Error, Result};
use crate::Fsdp;
use candle_core::{DType, Device, Tensor};

/// The device this rank's tensors live on (for the small tensors of the rank agreement).
fn device_of<M>(fsdp: &Fsdp<M>) -> Device {
    let shard = fsdp.unit_views().flat_map(|u| u.params()).next().map(|p| p.device().clone());
    let buffer = fsdp.buffer_views().next().map(|b| b.device().clone());
    shard.or(buffer).unwrap_or(Device::Cpu)
}

/// Refuses models with a unit sharded over its own group: its value differs between
/// groups, and a checkpoint keeps one value per FQN.
fn check_world_sharded<M>(fsdp: &Fsdp<M>, what: &str) -> Result<()> {
    match fsdp.unit_views().find(|unit| !unit.spans_world(fsdp.world_size())) {
        None => Ok(()),
        Some(unit) => Err(Error::Checkpoint(CheckpointError::CheckpointUnsupported {
            rank: fsdp.rank(),
            what: format!(
                "{what} of unit `{}`, which is sharded over a group of {} ranks",
                unit.name(),
                unit.group_size()
            ),
            why: "its values differ between groups, and a checkpoint keeps one value per FQN".into(),
        })),
    }
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
