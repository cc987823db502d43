//! What makes a save safe to interrupt: every rank learns whether all the others got
//! through a stage before the next begins, and files and directories are synced before
//! the one rename that makes a checkpoint visible.

use crate::error::CheckpointError;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use fsdp_comm::Collectives;
use std::fs::File;
use std::path::Path;

/// Ends a stage of a collective save or load: every rank reports whether its `outcome`
/// is a success. A rank whose own work failed returns its error; the others return
/// [`CheckpointError::CheckpointPeerFailed`] naming the ranks that failed. So no rank goes on to the
/// next stage (or into training) while another has given up, and none waits for it.
pub(crate) fn all_ranks_ok<T>(
    comm: &dyn Collectives,
    device: &Device,
    outcome: Result<T>,
    stage: &str,
    kept_previous: bool,
) -> Result<T> {
    let flag = Tensor::new(&[u8::from(outcome.is_ok()) as f32], device)?;
    let flags = comm.all_gather(&flag, stage).and_then(|work| work.wait());
    let value = outcome?;
    let flags = flags?.to_vec1::<f32>()?;
    let failed: Vec<usize> = flags.iter().enumerate().filter(|(_, &ok)| ok == 0.0).map(|(r, _)| r).collect();
    if failed.is_empty() {
        return Ok(value);
    }
    Err(Error::Checkpoint(CheckpointError::CheckpointPeerFailed {
        rank: comm.global_rank(),
        stage: stage.to_string(),
        failed,
        kept_previous,
    }))
}

/// Makes `path`'s content (a file) or its entries (a directory) durable.
pub(crate) fn sync(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

/// The error of an I/O operation on `path` by `rank`.
pub(crate) fn io_error(rank: usize, path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| {
        Error::Checkpoint(CheckpointError::CheckpointFile { rank, path: path.to_path_buf(), problem: e.to_string() })
    }
}

/// Writes `value` as JSON to `path` and syncs it.
pub(crate) fn write_json(rank: usize, path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| io_error(rank, path)(std::io::Error::other(e)))?;
    std::fs::write(path, text).map_err(io_error(rank, path))?;
    sync(path).map_err(io_error(rank, path))
}

/// Reads the JSON file `path` into a `T`, naming the file in the error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(rank: usize, path: &Path) -> Result<T> {
    let text = std::fs::read(path).map_err(io_error(rank, path))?;
    serde_json::from_slice(&text).map_err(|e| {
        Error::Checkpoint(CheckpointError::CheckpointFile {
            rank,
            path: path.to_path_buf(),
            problem: format!("not valid JSON for this file's format: {e}"),
        })
    })
}
