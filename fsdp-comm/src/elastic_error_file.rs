//! torchrun's error file: a worker that fails writes its error where the elastic agent
//! says (`TORCHELASTIC_ERROR_FILE`), in the JSON form the agent reads, so that torchrun's
//! "Root Cause" names the rank and this library's own message rather than only an exit
//! code.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes `message` (of rank `rank`) to the file `TORCHELASTIC_ERROR_FILE` names, if it
/// is set; returns the path written. Call it when a launched process fails, before it
/// exits with a non-zero status.
pub fn record_error(rank: usize, message: &str) -> std::io::Result<Option<PathBuf>> {
    let Some(path) = std::env::var_os("TORCHELASTIC_ERROR_FILE") else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    write_error_file(&path, rank, message)?;
    Ok(Some(path))
}

/// Writes the error file at `path`: `{"message": {"message": ..., "extraInfo":
/// {"py_callstack": ..., "timestamp": "<seconds>"}}}`, the shape PyTorch's own workers
/// write (the agent requires the timestamp, as a string of an integer, and shows the
/// call stack field).
pub fn write_error_file(path: &Path, rank: usize, message: &str) -> std::io::Result<()> {
    let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let text = format!("candle-fsdp rank {rank}: {message}");
    let json = serde_json::json!({
        "message": {
            "message": text,
            "extraInfo": { "py_callstack": text, "timestamp": timestamp.to_string() },
        }
    });
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(&json).map_err(std::io::Error::other)?)
}
