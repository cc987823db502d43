//! safetensors files as checkpoints use them: a memory-mapped file read by element
//! ranges (a rank takes only the part of a tensor its shard covers), and a writer that
//! streams tensors, one at a time, into a file whose header is fixed up front (so a full
//! model is written while only one unit is gathered).

use crate::error::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::View;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One safetensors file, memory-mapped. The file must not change while it is open.
pub(crate) struct MappedFile {
    path: PathBuf,
    rank: usize,
    tensors: MmapedSafetensors,
}

impl MappedFile {
    /// Opens and validates the header (offsets, sizes, the file's length), so a truncated
    /// file or a corrupted header fails here, naming the file.
    pub fn open(path: &Path, rank: usize) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::CheckpointFile { rank, path: path.into(), problem: "no such file".into() });
        }
        // SAFETY: the mapping is only read; the caller keeps the file unchanged while open.
        let tensors = unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::CheckpointFile {
            rank,
            path: path.into(),
            problem: format!("not a readable safetensors file ({e})"),
        })?;
        Ok(Self { path: path.into(), rank, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> Vec<String> {
        self.tensors.tensors().into_iter().map(|(name, _)| name).collect()
    }

    fn tensor_error(&self, fqn: &str, problem: String) -> Error {
        Error::CheckpointTensor { rank: self.rank, path: self.path.clone(), fqn: fqn.into(), problem }
    }

    /// The dtype and shape of tensor `name`.
    pub fn info(&self, name: &str) -> Result<(DType, Vec<usize>)> {
        let view = self.tensors.get(name).map_err(|_| self.tensor_error(name, "not in this file".into()))?;
        let dtype = DType::try_from(view.dtype()).map_err(|e| self.tensor_error(name, e.to_string()))?;
        Ok((dtype, view.shape().to_vec()))
    }

    /// Elements `[start, start + len)` of tensor `name`, flattened, as a 1-D tensor of
    /// `dtype` (converted from the file's dtype when they differ).
    pub fn read_range(&self, name: &str, start: usize, len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let (file_dtype, shape) = self.info(name)?;
        let numel: usize = shape.iter().product();
        if start + len > numel {
            let problem = format!("elements {start}..{} asked of a tensor of {numel}", start + len);
            return Err(self.tensor_error(name, problem));
        }
        let view = self.tensors.get(name)?;
        let size = file_dtype.size_in_bytes();
        let bytes = &view.data()[start * size..(start + len) * size];
        let tensor = Tensor::from_raw_buffer(bytes, file_dtype, &[len], device)?;
        Ok(if file_dtype == dtype { tensor } else { tensor.to_dtype(dtype)? })
    }
}

/// The dtype, shape and byte size of a tensor to be written.
#[derive(Clone, Debug)]
pub(crate) struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

/// Writes a safetensors file tensor by tensor, in the planned order, into a temporary
/// name beside the final one; [`StreamingWriter::finish`] syncs it and renames it into
/// place, so a reader never sees a partial file under the final name.
pub(crate) struct StreamingWriter {
    path: PathBuf,
    temp: PathBuf,
    out: BufWriter<File>,
    planned: Vec<PlannedTensor>,
    next: usize,
}

impl StreamingWriter {
    /// Creates the file and writes its header (safetensors' own `Metadata`, serialized
    /// by the crate), laying the tensors out in `planned` order.
    pub fn create(path: &Path, planned: Vec<PlannedTensor>, metadata: HashMap<String, String>) -> Result<Self> {
        let io = |e: std::io::Error| Error::CheckpointFile { rank: 0, path: path.into(), problem: e.to_string() };
        let mut offset = 0;
        let infos = planned
            .iter()
            .map(|t| {
                let info = TensorInfo {
                    dtype: t.dtype.into(),
                    shape: t.shape.clone(),
                    data_offsets: (offset, offset + t.bytes()),
                };
                offset += t.bytes();
                (t.name.clone(), info)
            })
            .collect();
        let header = Metadata::new(Some(metadata), infos).map_err(|e| Error::CheckpointFile {
            rank: 0,
            path: path.into(),
            problem: format!("header: {e}"),
        })?;
        let mut header = serde_json::to_vec(&header).map_err(|e| io(std::io::Error::other(e)))?;
        // The format pads the header with spaces to a multiple of 8 bytes.
        header.resize(header.len().next_multiple_of(8), b' ');
        let temp = path.with_extension("safetensors.partial");
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&temp).map_err(io)?);
        out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
        out.write_all(&header).map_err(io)?;
        Ok(Self { path: path.into(), temp, out, planned, next: 0 })
    }

    /// Appends the next planned tensor, `name` of shape `shape`, whose elements in order
    /// are those of `pieces` (1-D, of the planned dtype): one piece's bytes are copied at
    /// a time, so a tensor is written out of a larger buffer without a copy of it whole.
    pub fn write_pieces(&mut self, name: &str, shape: &[usize], pieces: &[Tensor]) -> Result<()> {
        let planned = &self.planned[self.next];
        let dtype = pieces.first().map_or(planned.dtype, |p| p.dtype());
        let numel: usize = pieces.iter().map(|p| p.elem_count()).sum();
        let uniform = pieces.iter().all(|p| p.dtype() == dtype && p.rank() == 1);
        let fits = uniform && numel == shape.iter().product::<usize>();
        if planned.name != name || planned.dtype != dtype || planned.shape != shape || !fits {
            return Err(Error::CheckpointTensor {
                rank: 0,
                path: self.path.clone(),
                fqn: name.into(),
                problem: format!(
                    "written out of plan: {dtype:?} {shape:?} ({numel} elements in {} pieces) where `{}` {:?} {:?} \
                     was planned",
                    pieces.len(),
                    planned.name,
                    planned.dtype,
                    planned.shape
                ),
            });
        }
        for piece in pieces {
            let bytes = View::data(&piece.contiguous()?).into_owned();
            self.out.write_all(&bytes).map_err(|e| Error::CheckpointFile {
                rank: 0,
                path: self.temp.clone(),
                problem: e.to_string(),
            })?;
        }
        self.next += 1;
        Ok(())
    }

    /// Whether every planned tensor has been written.
    pub fn is_complete(&self) -> bool {
        self.next == self.planned.len()
    }

    /// Flushes, syncs and renames the file into place.
    pub fn finish(self) -> Result<PathBuf> {
        let io = |e: std::io::Error| Error::CheckpointFile { rank: 0, path: self.temp.clone(), problem: e.to_string() };
        if !self.is_complete() {
            return Err(io(std::io::Error::other(format!("{} of {} tensors written", self.next, self.planned.len()))));
        }
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&self.temp, &self.path).map_err(io)?;
        Ok(self.path)
    }
}
