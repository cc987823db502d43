//! safetensors files as checkpoints use them: a file read by element ranges with
//! positioned reads (a rank takes only the part of a tensor its shard covers; nothing is
//! memory-mapped, so a file changed underneath gives wrong bytes or an error, never
//! undefined behaviour), or read once whole to check it against its recorded checksum
//! while the ranges a rank needs are copied out; and a writer that streams tensors, one at
//! a time, into a file whose header is fixed up front (so a full model is written while
//! only one unit is gathered).

use crate::error::CheckpointError;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::View;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The longest header read (safetensors' own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One safetensors file, its header read and checked against the file's length.
pub(crate) struct TensorFile {
    path: PathBuf,
    rank: usize,
    file: File,
    /// Where the data section starts: the length field and the header.
    data_start: u64,
    header: Metadata,
}

impl TensorFile {
    /// Opens the file and reads its header: the tensors must lie back to back, each of
    /// its dtype's size times its element count, and end exactly where the file ends, so
    /// a truncated or extended file or a damaged header fails here, naming the file.
    pub fn open(path: &Path, rank: usize) -> Result<Self> {
        let fail =
            |problem: String| Error::Checkpoint(CheckpointError::CheckpointFile { rank, path: path.into(), problem });
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => fail("no such file".into()),
            _ => fail(e.to_string()),
        })?;
        let file_len = file.metadata().map_err(|e| fail(e.to_string()))?.len();
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0).map_err(|_| fail("not a safetensors file: shorter than its header".into()))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
            return Err(fail(format!(
                "not a safetensors file: a header of {header_len} bytes in a file of {file_len}"
            )));
        }
        let mut text = vec![0u8; header_len as usize];
        file.read_exact_at(&mut text, 8).map_err(|e| fail(e.to_string()))?;
        let header: Metadata =
            serde_json::from_slice(&text).map_err(|e| fail(format!("not a readable safetensors header ({e})")))?;
        let mut spans: Vec<(String, &TensorInfo)> = header.tensors().into_iter().collect();
        spans.sort_by_key(|(_, info)| info.data_offsets);
        let mut end = 0;
        for (name, info) in spans {
            let numel: usize = info.shape.iter().product();
            let (start, stop) = info.data_offsets;
            if start != end || stop < start || (stop - start) * 8 != numel * info.dtype.bitsize() {
                return Err(fail(format!(
                    "the header places `{name}` ({:?} {:?}) at bytes {start}..{stop}: not where its size puts it",
                    info.dtype, info.shape
                )));
            }
            end = stop;
        }
        if 8 + header_len + end as u64 != file_len {
            return Err(fail(format!(
                "{file_len} bytes, but its header describes {}: truncated or extended",
                8 + header_len + end as u64
            )));
        }
        Ok(Self { path: path.into(), rank, file, data_start: 8 + header_len, header })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> Vec<String> {
        self.header.tensors().into_keys().collect()
    }

    /// The header's free-form metadata (`__metadata__`).
    pub fn user_metadata(&self) -> Option<&HashMap<String, String>> {
        self.header.metadata().as_ref()
    }

    fn tensor_error(&self, fqn: &str, problem: String) -> Error {
        Error::Checkpoint(CheckpointError::CheckpointTensor {
            rank: self.rank,
            path: self.path.clone(),
            fqn: fqn.into(),
            problem,
        })
    }

    fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.header.info(name).ok_or_else(|| self.tensor_error(name, "not in this file".into()))
    }

    /// The dtype and shape of tensor `name`.
    pub fn info(&self, name: &str) -> Result<(DType, Vec<usize>)> {
        let info = self.tensor_info(name)?;
        let dtype = DType::try_from(info.dtype).map_err(|e| self.tensor_error(name, e.to_string()))?;
        Ok((dtype, info.shape.clone()))
    }

    /// Where elements `[start, start + len)` of tensor `name` lie in the file, in bytes,
    /// and the tensor's dtype.
    fn byte_range(&self, name: &str, start: usize, len: usize) -> Result<(u64, usize, DType)> {
        let (dtype, shape) = self.info(name)?;
        let numel: usize = shape.iter().product();
        if start + len > numel {
            let problem = format!("elements {start}..{} asked of a tensor of {numel}", start + len);
            return Err(self.tensor_error(name, problem));
        }
        let size = dtype.size_in_bytes();
        let offset = self.data_start + (self.tensor_info(name)?.data_offsets.0 + start * size) as u64;
        Ok((offset, len * size, dtype))
    }

    /// Elements `[start, start + len)` of tensor `name`, flattened, as a 1-D tensor of
    /// `dtype` (converted from the file's dtype when they differ).
    pub fn read_range(&self, name: &str, start: usize, len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let (file_dtype, _) = self.info(name)?;
        to_tensor(&self.read_bytes(name, start, len)?, file_dtype, dtype, device)
    }

    /// The bytes of elements `[start, start + len)` of tensor `name`.
    pub fn read_bytes(&self, name: &str, start: usize, len: usize) -> Result<Vec<u8>> {
        let (offset, bytes, _) = self.byte_range(name, start, len)?;
        let mut data = vec![0u8; bytes];
        self.file.read_exact_at(&mut data, offset).map_err(|e| self.tensor_error(name, e.to_string()))?;
        Ok(data)
    }

    /// Reads the whole file once and returns its CRC32C, handing `each` the bytes of
    /// every wanted range `(name, start, len)` of elements (by its index) as they pass:
    /// nothing is kept.
    pub fn checksum_with(&self, wanted: &[(String, usize, usize)], each: &mut dyn FnMut(usize, &[u8])) -> Result<u32> {
        let mut spans = Vec::with_capacity(wanted.len());
        for (name, start, len) in wanted {
            let (offset, bytes, dtype) = self.byte_range(name, *start, *len)?;
            spans.push((offset, bytes as u64, dtype.size_in_bytes() as u64));
        }
        let mut crc = 0u32;
        // A range's bytes cut at a chunk boundary mid-element wait here for the rest.
        let mut carry: Vec<Vec<u8>> = vec![Vec::new(); spans.len()];
        read_through(&self.file, |at, read| {
            crc = crc32c::crc32c_append(crc, read);
            let end = at + read.len() as u64;
            for (i, &(offset, bytes, size)) in spans.iter().enumerate() {
                let (lo, hi) = (offset.max(at), (offset + bytes).min(end));
                if lo >= hi {
                    continue;
                }
                let mut piece = &read[(lo - at) as usize..(hi - at) as usize];
                let (carried, size) = (&mut carry[i], size as usize);
                if !carried.is_empty() {
                    let need = (size - carried.len()).min(piece.len());
                    carried.extend_from_slice(&piece[..need]);
                    piece = &piece[need..];
                    if carried.len() == size {
                        each(i, carried);
                        carried.clear();
                    }
                }
                let whole = piece.len() / size * size;
                each(i, &piece[..whole]);
                carried.extend_from_slice(&piece[whole..]);
            }
        })
        .map_err(|e| {
            Error::Checkpoint(CheckpointError::CheckpointFile {
                rank: self.rank,
                path: self.path.clone(),
                problem: e.to_string(),
            })
        })?;
        Ok(crc)
    }
}

/// Bytes of `file_dtype` elements as a 1-D tensor of `dtype`.
pub(crate) fn to_tensor(bytes: &[u8], file_dtype: DType, dtype: DType, device: &Device) -> Result<Tensor> {
    let len = bytes.len() / file_dtype.size_in_bytes();
    let tensor = Tensor::from_raw_buffer(bytes, file_dtype, &[len], device)?;
    Ok(if file_dtype == dtype { tensor } else { tensor.to_dtype(dtype)? })
}

/// The CRC32C of a whole file.
pub(crate) fn file_checksum(path: &Path, rank: usize) -> Result<u32> {
    let io = |e: std::io::Error| {
        Error::Checkpoint(CheckpointError::CheckpointFile { rank, path: path.into(), problem: e.to_string() })
    };
    let mut crc = 0u32;
    read_through(&File::open(path).map_err(io)?, |_, read| crc = crc32c::crc32c_append(crc, read)).map_err(io)?;
    Ok(crc)
}

/// Reads `file` from its start to its end in chunks, handing each to `each` with its
/// offset.
fn read_through(file: &File, mut each: impl FnMut(u64, &[u8])) -> std::io::Result<()> {
    let mut chunk = vec![0u8; 4 << 20];
    let mut at = 0u64;
    loop {
        let n = file.read_at(&mut chunk, at)?;
        if n == 0 {
            return Ok(());
        }
        each(at, &chunk[..n]);
        at += n as u64;
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
        let io = |e: std::io::Error| {
            Error::Checkpoint(CheckpointError::CheckpointFile { rank: 0, path: path.into(), problem: e.to_string() })
        };
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
        let header = Metadata::new(Some(metadata), infos).map_err(|e| {
            Error::Checkpoint(CheckpointError::CheckpointFile {
                rank: 0,
                path: path.into(),
                problem: format!("header: {e}"),
            })
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
            return Err(Error::Checkpoint(CheckpointError::CheckpointTensor {
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
            }));
        }
        for piece in pieces {
            let bytes = View::data(&piece.contiguous()?).into_owned();
            self.out.write_all(&bytes).map_err(|e| {
                Error::Checkpoint(CheckpointError::CheckpointFile {
                    rank: 0,
                    path: self.temp.clone(),
                    problem: e.to_string(),
                })
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
        let io = |e: std::io::Error| {
            Error::Checkpoint(CheckpointError::CheckpointFile {
                rank: 0,
                path: self.temp.clone(),
                problem: e.to_string(),
            })
        };
        if !self.is_complete() {
            return Err(io(std::io::Error::other(format!("{} of {} tensors written", self.next, self.planned.len()))));
        }
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&self.temp, &self.path).map_err(io)?;
        Ok(self.path)
    }
}
