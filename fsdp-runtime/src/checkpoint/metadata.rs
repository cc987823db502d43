//! The metadata file of a sharded checkpoint (`metadata.json`): what was saved, by whom,
//! and where each FQN's elements lie, so that any number of ranks under any strategy can
//! cut their shards out of it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub(crate) const FORMAT: &str = "candle-fsdp-sharded";
pub(crate) const VERSION: u32 = 1;
pub(crate) const METADATA_FILE: &str = "metadata.json";

/// Where training stood when a checkpoint was saved: what a resumed run needs beside the
/// weights and the optimizer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
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
pub struct CheckpointMetadata {
    /// Always `candle-fsdp-sharded`.
    pub format: String,
    /// The format's version (currently 1); a load refuses any other.
    pub version: u32,
    /// The world size and strategy the checkpoint was written with.
    pub world_size: usize,
    /// The [`crate::ShardingStrategy`]'s name (e.g. `full-shard`).
    pub strategy: String,
    /// Where training stood at the save.
    pub progress: Progress,
    /// Every file of the checkpoint with its size in bytes: a missing or truncated file
    /// is found before anything is read.
    pub files: BTreeMap<String, u64>,
    /// Every parameter and buffer, by FQN.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The optimizer's state, if one was saved: its scalars, and per FQN the names of its
    /// per-parameter slots, stored beside the parameter's pieces.
    pub optimizer: Option<OptimizerEntry>,
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
