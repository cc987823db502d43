//! The metadata file of a sharded checkpoint (`metadata.json`): what was saved, by whom,
//! and where each FQN's elements lie, so that any number of ranks under any strategy can
//! cut their shards out of it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub(crate) const FORMAT: &str = "candle-fsdp-sharded";
/// 2: files recorded with their checksums, rank files carrying the checkpoint's identity.
pub(crate) const VERSION: u32 = 2;
pub(crate) const METADATA_FILE: &str = "metadata.json";

/// The keys of a rank file's safetensors header metadata: which checkpoint, step, rank
/// and world size wrote it, and where each of its pieces starts in its value.
pub(crate) mod header {
    pub const FORMAT: &str = "format";
    pub const CHECKPOINT: &str = "checkpoint_id";
    pub const STEP: &str = "step";
    pub const RANK: &str = "rank";
    pub const WORLD_SIZE: &str = "world_size";
    /// A JSON object: tensor key to the first element of the value it holds.
    pub const STARTS: &str = "starts";
}

/// Where training stood when a checkpoint was saved: what a resumed run needs beside the
/// weights and the optimizer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    /// Optimizer steps taken.
    pub step: u64,
    /// A learning-rate scheduler's state (e.g. a serialized [`crate::optim::StepLr`]).
    pub scheduler: Option<serde_json::Value>,
    /// Anything else the program keeps: the data position, the RNG seed, …
    pub extras: serde_json::Value,
}

/// The content of `metadata.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMetadata {
    /// Always `candle-fsdp-sharded`.
    pub format: String,
    /// The format's version (currently 2); a load refuses any other.
    pub version: u32,
    /// Drawn by rank 0 for this save and written into every rank file's header, so that
    /// a file of another checkpoint is recognised.
    pub checkpoint_id: String,
    /// The world size and strategy the checkpoint was written with.
    pub world_size: usize,
    /// The [`crate::ShardingStrategy`]'s name (e.g. `full-shard`).
    pub strategy: String,
    /// Where training stood at the save.
    pub progress: Progress,
    /// Every file of the checkpoint with its size and checksum: a missing, truncated,
    /// damaged or replaced file is found before any of its values is used.
    pub files: BTreeMap<String, FileEntry>,
    /// Every parameter and buffer, by FQN.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The optimizer's state, if one was saved: its scalars, and per FQN the names of its
    /// per-parameter slots, stored beside the parameter's pieces.
    pub optimizer: Option<OptimizerEntry>,
}

/// One file of a checkpoint as it was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Its size in bytes.
    pub bytes: u64,
    /// The CRC32C of its bytes.
    pub crc32c: u32,
}

/// Whether a checkpointed tensor is a trained parameter or a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorKind {
    /// A trained parameter, stored as the pieces of the ranks' shards.
    Parameter,
    /// A buffer (not trained), stored whole in rank 0's file.
    Buffer,
}

/// One FQN: its full shape and dtype, and the pieces of its flattened elements.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// Parameter or buffer.
    pub kind: TensorKind,
    /// The dtype the elements are stored in.
    pub dtype: safetensors::Dtype,
    /// The full (unsharded) shape.
    pub shape: Vec<usize>,
    /// Disjoint ranges of the flattened value that together cover it.
    pub pieces: Vec<Piece>,
}

/// Elements `[start, start + len)` of a flattened value, stored in `file` as a 1-D tensor
/// under the FQN (the parameter) or under `optimizer/{slot}/{fqn}` (an optimizer slot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Piece {
    /// The file's name in the checkpoint directory (`rank-00000.safetensors`, ...).
    pub file: String,
    /// The first element's index in the flattened value.
    pub start: usize,
    /// The number of elements.
    pub len: usize,
}

/// The optimizer's part of the metadata (see [`crate::optim::OptimizerStateDict`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerEntry {
    /// State shared by all variables (the step count, the learning rate), by name.
    pub scalars: BTreeMap<String, f64>,
    /// Per parameter FQN, the names of its optimizer slots (`exp_avg`, ...), each stored
    /// in pieces like the parameter.
    pub slots: BTreeMap<String, Vec<String>>,
}

/// The key of an optimizer slot's piece in a rank file.
pub(crate) fn slot_key(slot: &str, fqn: &str) -> String {
    format!("optimizer/{slot}/{fqn}")
}

/// The file rank `rank` writes.
pub(crate) fn rank_file(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// The rank that writes file `name`, if it is a rank file.
pub(crate) fn rank_of_file(name: &str) -> Option<usize> {
    name.strip_prefix("rank-")?.strip_suffix(".safetensors")?.parse().ok()
}
