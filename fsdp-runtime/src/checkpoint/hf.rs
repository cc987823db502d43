//! Full models in the Hugging Face layout: `model.safetensors`, or above a size limit
//! `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`
//! (`metadata.total_size`, `weight_map`), under the model's FQNs.

use super::commit::{all_ranks_ok, io_error, read_json, sync, write_json};
use super::tensor_files::{PlannedTensor, StreamingWriter, TensorFile};
use super::{capped, check_world_sharded, device_of};
use crate::error::{CheckpointError, ConfigError};
use crate::error::{Error, Result};
use crate::fqn_patterns::select;
use crate::Fsdp;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const MODEL_STEM: &str = "model";
const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// `model.safetensors.index.json`, as Hugging Face writes and reads it. Read by
/// allow-list: a key not below is refused by name.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HfIndex {
    /// The index's `metadata` object.
    pub metadata: HfIndexMetadata,
    /// FQN to the file that holds it.
    pub weight_map: BTreeMap<String, String>,
}

/// The `metadata` object of `model.safetensors.index.json`; every figure given is checked
/// against the files when they are loaded.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HfIndexMetadata {
    /// Bytes of tensor data over all files.
    pub total_size: u64,
    /// Elements over all tensors (transformers 5 writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_parameters: Option<u64>,
    /// Each file's size in bytes (written by [`export_hf`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub file_sizes: BTreeMap<String, u64>,
}

/// How [`export_hf`] writes.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Above this many bytes of tensor data the model is split into several files
    /// (Hugging Face's `max_shard_size`); a tensor larger than the limit gets a file of
    /// its own.
    pub max_file_bytes: u64,
    /// The dtype floating-point tensors are written in (`None`: as trained).
    pub dtype: Option<DType>,
    /// Other files of the export, by name (a `config.json`, a tokenizer), written beside
    /// the weights and made visible with them.
    pub files: Vec<(String, Vec<u8>)>,
    /// FQN patterns of the tensors written, as [`crate::FsdpConfig::frozen`]'s (`*`, `?`,
    /// `!` to leave out; the last match decides); empty: every tensor. A pattern that
    /// matches nothing is refused.
    pub tensors: Vec<String>,
    /// Put before every FQN in the files (PEFT's `base_model.model.`).
    pub name_prefix: String,
    /// The weights files' stem: `{stem}.safetensors`, or `{stem}-0000i-of-0000n.safetensors`
    /// with `{stem}.safetensors.index.json` (`model`; PEFT's `adapter_model`).
    pub weights_stem: String,
}

impl Default for ExportOptions {
    /// One file up to 5 GB, Hugging Face's default, in the trained dtype, no other files.
    fn default() -> Self {
        Self {
            max_file_bytes: 5_000_000_000,
            dtype: None,
            files: Vec::new(),
            tensors: Vec::new(),
            name_prefix: String::new(),
            weights_stem: MODEL_STEM.to_string(),
        }
    }
}

impl ExportOptions {
    fn single_file(&self) -> String {
        format!("{}.safetensors", self.weights_stem)
    }

    fn index_file(&self) -> String {
        format!("{}.safetensors.index.json", self.weights_stem)
    }
}

/// Whether `name` is a file an export writes (the weights, the index) or one of
/// `options.files`.
fn is_export_file(name: &str, options: &ExportOptions) -> bool {
    name == options.single_file()
        || name == options.index_file()
        || (name.strip_prefix(options.weights_stem.as_str()).is_some_and(|rest| rest.starts_with('-'))
            && name.contains("-of-")
            && name.ends_with(".safetensors"))
        || options.files.iter().any(|(n, _)| n == name)
}

/// Checks that an export can go to `dir`, before anything is gathered or trained: `dir`
/// is a new path or an earlier export (nothing in it but what an export writes, which
/// the new one replaces whole), and its parent folder exists or can be made.
pub fn check_export_dir(dir: &Path, options: &ExportOptions) -> Result<()> {
    let fail =
        |problem: String| Error::Checkpoint(CheckpointError::CheckpointFile { rank: 0, path: dir.into(), problem });
    if dir.file_name().is_none() {
        return Err(fail("an export needs a folder of its own, with a name".into()));
    }
    if let Some((name, _)) = options.files.iter().find(|(n, _)| n.contains('/') || n.is_empty()) {
        return Err(fail(format!("`{name}` is not a file name")));
    }
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = export_parent(dir);
            std::fs::create_dir_all(&parent).map_err(io_error(0, &parent))?;
            Ok(())
        }
        Err(e) => Err(io_error(0, dir)(e)),
        Ok(meta) if !meta.is_dir() => Err(fail("exists and is not a folder".into())),
        Ok(_) => {
            for entry in std::fs::read_dir(dir).map_err(io_error(0, dir))? {
                let name = entry.map_err(io_error(0, dir))?.file_name();
                let name = name.to_string_lossy();
                if !is_export_file(&name, options) {
                    return Err(fail(format!(
                        "holds `{name}`, which is no part of an export and would be lost when the export \
                         replaces the folder: export into a new or an export's folder"
                    )));
                }
            }
            Ok(())
        }
    }
}

/// The folder `dir` is in.
fn export_parent(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A sibling of `dir` named `.{dir's name}.{what}`.
fn beside(dir: &Path, what: &str) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    export_parent(dir).join(format!(".{name}.{what}"))
}

/// One tensor of the export, in the order it is gathered and written.
struct Exported {
    planned: PlannedTensor,
    /// The model's FQN of it (`planned.name` is the name in the file).
    fqn: String,
    /// Index into the files.
    file: usize,
}

/// Writes the full model (every trained parameter and buffer, under its FQN; a tied
/// parameter under its first FQN only, as Hugging Face saves tied weights) into `dir` in
/// the Hugging Face layout; returns the files written. A collective: every rank calls it
/// between steps; units are gathered one at a time, so no rank holds more than one
/// unit's full values beyond its shards, and rank 0 streams them to disk, with
/// `options.files`. The export is whole or absent: everything is written and synced in a
/// folder beside `dir` (`.{name}.partial`), which then takes `dir`'s place in one rename
/// (an earlier export there is replaced only then); an export cut short leaves nothing
/// under `dir`'s name. `dir` must be new or an earlier export ([`check_export_dir`]).
pub fn export_hf<M>(fsdp: &Fsdp<M>, dir: &Path, options: &ExportOptions) -> Result<Vec<PathBuf>> {
    let rank = fsdp.rank();
    let comm = fsdp.comm().as_ref();
    let device = device_of(fsdp);
    let staging = beside(dir, "partial");
    let prepared = (|| {
        fsdp.check_between_steps("checkpoint::export_hf")?;
        check_world_sharded(fsdp, "an export")?;
        if rank == 0 {
            check_export_dir(dir, options)?;
            if staging.exists() {
                std::fs::remove_dir_all(&staging).map_err(io_error(0, &staging))?;
            }
            std::fs::create_dir(&staging).map_err(io_error(0, &staging))?;
        }
        Ok(())
    })();
    all_ranks_ok(comm, &device, prepared, "export (preparing)", true)?;

    let planned = plan_files(fsdp, options);
    let (exported, names) = all_ranks_ok(comm, &device, planned, "export (planning)", true)?;
    let cast = |t: &Tensor| -> Result<Tensor> {
        Ok(match options.dtype {
            Some(dtype) if t.dtype().is_float() => t.to_dtype(dtype)?,
            _ => t.clone(),
        })
    };
    let cast_all = |pieces: &[Tensor]| pieces.iter().map(cast).collect::<Result<Vec<_>>>();
    let mut writer =
        FileSequence { dir: &staging, names: &names, exported: &exported, next: 0, open: None, done: Vec::new() };
    // Rank 0 keeps gathering after a write error, so its peers are not left waiting in a
    // collective; the error is reported at the end.
    let mut write_error: Option<Error> = None;
    // The name in the file of each FQN the export writes.
    let file_names: HashMap<&str, &str> = exported.iter().map(|e| (e.fqn.as_str(), e.planned.name.as_str())).collect();
    for unit in fsdp.unit_views() {
        let fqns = unit.params().map(|p| p.fqn().to_string()).chain(unit.buffers().map(|b| b.fqn().to_string()));
        if !fqns.into_iter().any(|fqn| file_names.contains_key(fqn.as_str())) {
            // Nothing of it is written: every rank skips the same units.
            continue;
        }
        // Written out of the gathered buffer piece by piece: no second copy of the unit.
        let values = unit.gather_full_values()?;
        if rank != 0 || write_error.is_some() {
            continue;
        }
        let params = unit.params().zip(values).map(|(p, pieces)| Ok((p.fqn(), p.shape(), pieces)));
        let buffers = unit.buffers().map(|b| Ok((b.fqn(), b.shape(), vec![b.values().flatten_all()?])));
        for tensor in params.chain(buffers) {
            let written = tensor.and_then(|(fqn, shape, pieces)| match file_names.get(fqn) {
                Some(name) => writer.write(name, shape, &cast_all(&pieces)?),
                None => Ok(()),
            });
            if let Err(e) = written {
                write_error = Some(e);
                break;
            }
        }
    }
    let finished = if rank != 0 {
        Ok(())
    } else {
        let written = match write_error {
            Some(e) => Err(e),
            None => writer.finish(&exported, options).and_then(|()| put_in_place(&staging, dir)),
        };
        if written.is_err() {
            // Nothing half written stays; the earlier export, if any, is untouched.
            let _ = std::fs::remove_dir_all(&staging);
        }
        written
    };
    all_ranks_ok(comm, &device, finished, "export (writing)", true)?;
    let mut files: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    if names.len() > 1 {
        files.push(dir.join(options.index_file()));
    }
    files.extend(options.files.iter().map(|(n, _)| dir.join(n)));
    Ok(files)
}

/// Makes the complete, synced `staging` folder the export `dir`: an earlier export is
/// moved aside first and removed once the new one is in place.
fn put_in_place(staging: &Path, dir: &Path) -> Result<()> {
    let parent = export_parent(dir);
    let replaced = beside(dir, "replaced");
    if replaced.exists() {
        std::fs::remove_dir_all(&replaced).map_err(io_error(0, &replaced))?;
    }
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &replaced).map_err(io_error(0, dir))?;
    }
    std::fs::rename(staging, dir).map_err(io_error(0, dir))?;
    sync(&parent).map_err(io_error(0, &parent))?;
    if had_old {
        std::fs::remove_dir_all(&replaced).map_err(io_error(0, &replaced))?;
    }
    Ok(())
}

/// The tensors `options.tensors` selects, in unit order (a unit's parameters, then its
/// buffers), and the files they go to, split at `max_file_bytes`.
fn plan_files<M>(fsdp: &Fsdp<M>, options: &ExportOptions) -> Result<(Vec<Exported>, Vec<String>)> {
    let exported_dtype = |dtype: DType| match options.dtype {
        Some(to) if dtype.is_float() => to,
        _ => dtype,
    };
    let mut planned = Vec::new();
    for unit in fsdp.unit_views() {
        for param in unit.params() {
            planned.push((param.fqn().to_string(), exported_dtype(param.dtype()), param.shape().to_vec()));
        }
        for buffer in unit.buffers() {
            planned.push((buffer.fqn().to_string(), exported_dtype(buffer.dtype()), buffer.shape().to_vec()));
        }
    }
    if !options.tensors.is_empty() {
        let candidates: Vec<Vec<&str>> = planned.iter().map(|(fqn, _, _)| vec![fqn.as_str()]).collect();
        let selected = select(&options.tensors, &candidates, vec![false; candidates.len()]).map_err(|pattern| {
            Error::Config(ConfigError::PatternMatchesNothing { pattern, selecting: "the tensors of an export" })
        })?;
        let mut keep = selected.into_iter();
        planned.retain(|_| keep.next().expect("one flag per tensor"));
    }
    let mut exported = Vec::with_capacity(planned.len());
    let (mut file, mut in_file) = (0, 0u64);
    for (fqn, dtype, shape) in planned {
        let tensor = PlannedTensor { name: format!("{}{fqn}", options.name_prefix), dtype, shape };
        let bytes = tensor.bytes() as u64;
        if in_file > 0 && in_file + bytes > options.max_file_bytes {
            file += 1;
            in_file = 0;
        }
        in_file += bytes;
        exported.push(Exported { planned: tensor, fqn, file });
    }
    let count = exported.last().map_or(1, |e| e.file + 1);
    let names = if count == 1 {
        vec![options.single_file()]
    } else {
        (1..=count).map(|i| format!("{}-{i:05}-of-{count:05}.safetensors", options.weights_stem)).collect()
    };
    Ok((exported, names))
}

/// Rank 0's writer: opens each file when its first tensor comes, closes it after its last.
struct FileSequence<'a> {
    dir: &'a Path,
    names: &'a [String],
    exported: &'a [Exported],
    /// The next tensor in plan order.
    next: usize,
    open: Option<StreamingWriter>,
    done: Vec<PathBuf>,
}

impl FileSequence<'_> {
    fn write(&mut self, fqn: &str, shape: &[usize], pieces: &[Tensor]) -> Result<()> {
        let file = self.exported[self.next].file;
        if self.open.is_none() {
            let planned = self.exported.iter().filter(|e| e.file == file).map(|e| e.planned.clone()).collect();
            let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
            self.open = Some(StreamingWriter::create(&self.dir.join(&self.names[file]), planned, metadata)?);
        }
        let writer = self.open.as_mut().expect("opened above");
        writer.write_pieces(fqn, shape, pieces)?;
        self.next += 1;
        if writer.is_complete() {
            self.done.push(self.open.take().expect("open").finish()?);
        }
        Ok(())
    }

    /// Writes the index (several files) and `options.files` into the folder, and syncs it.
    fn finish(self, exported: &[Exported], options: &ExportOptions) -> Result<()> {
        debug_assert!(self.open.is_none() && self.next == exported.len());
        if self.names.len() > 1 {
            let weight_map = exported
                .iter()
                .map(|e| (e.planned.name.clone(), self.names[e.file].clone()))
                .collect::<BTreeMap<_, _>>();
            let total_size = exported.iter().map(|e| e.planned.bytes() as u64).sum();
            let total_parameters = exported.iter().map(|e| e.planned.shape.iter().product::<usize>() as u64).sum();
            let mut file_sizes = BTreeMap::new();
            for path in &self.done {
                let bytes = std::fs::metadata(path).map_err(io_error(0, path))?.len();
                let name = path.file_name().expect("a file").to_string_lossy().into_owned();
                file_sizes.insert(name, bytes);
            }
            let metadata = HfIndexMetadata { total_size, total_parameters: Some(total_parameters), file_sizes };
            write_json(0, &self.dir.join(options.index_file()), &HfIndex { metadata, weight_map })?;
        }
        for (name, bytes) in &options.files {
            let path = self.dir.join(name);
            std::fs::write(&path, bytes).map_err(io_error(0, &path))?;
            sync(&path).map_err(io_error(0, &path))?;
        }
        sync(self.dir).map_err(io_error(0, self.dir))
    }
}

/// The sizes an index records against the files: each file's length, the bytes and the
/// elements of all tensors.
fn check_index_figures(index: &HfIndex, index_path: &Path, files: &[TensorFile], rank: usize) -> Result<()> {
    let fail =
        |problem: String| Error::Checkpoint(CheckpointError::CheckpointFile { rank, path: index_path.into(), problem });
    for (name, &bytes) in &index.metadata.file_sizes {
        let path = index_path.with_file_name(name);
        let found = std::fs::metadata(&path).map_err(io_error(rank, &path))?.len();
        if found != bytes {
            return Err(Error::Checkpoint(CheckpointError::CheckpointFile {
                rank,
                path,
                problem: format!("{found} bytes, but the index records {bytes}: truncated or replaced"),
            }));
        }
    }
    let (mut total_size, mut total_parameters) = (0u64, 0u64);
    for file in files {
        for name in file.names() {
            let (dtype, shape) = file.info(&name)?;
            let numel = shape.iter().product::<usize>() as u64;
            total_parameters += numel;
            total_size += numel * dtype.size_in_bytes() as u64;
        }
    }
    if index.metadata.total_size != total_size {
        return Err(fail(format!(
            "records {} bytes of tensors, the files hold {total_size}",
            index.metadata.total_size
        )));
    }
    if let Some(recorded) = index.metadata.total_parameters.filter(|&n| n != total_parameters) {
        return Err(fail(format!("records {recorded} elements, the files hold {total_parameters}")));
    }
    Ok(())
}

/// Where each FQN of a Hugging Face checkpoint is: the files of an index, or one file.
struct HfCheckpoint {
    files: Vec<TensorFile>,
    /// FQN to index into `files`.
    routing: BTreeMap<String, usize>,
}

impl HfCheckpoint {
    /// `path`: a directory holding `model.safetensors.index.json` or `model.safetensors`,
    /// an index file, or one `.safetensors` file.
    fn open(path: &Path, rank: usize) -> Result<Self> {
        let index = if path.is_dir() {
            let index = path.join(INDEX_FILE);
            if index.is_file() {
                Some(index)
            } else if path.join(SINGLE_FILE).is_file() {
                return Self::single(&path.join(SINGLE_FILE), rank);
            } else {
                let problem = format!("holds neither {INDEX_FILE} nor {SINGLE_FILE}");
                return Err(Error::Checkpoint(CheckpointError::CheckpointFile { rank, path: path.into(), problem }));
            }
        } else if path.extension().is_some_and(|e| e == "json") {
            Some(path.to_path_buf())
        } else {
            None
        };
        let Some(index_path) = index else {
            return Self::single(path, rank);
        };
        let index: HfIndex = read_json(rank, &index_path)?;
        let base = index_path.parent().unwrap_or(Path::new("."));
        let mut names: Vec<&String> = index.weight_map.values().collect();
        names.sort();
        names.dedup();
        let files = names.iter().map(|n| TensorFile::open(&base.join(n), rank)).collect::<Result<Vec<_>>>()?;
        check_index_figures(&index, &index_path, &files, rank)?;
        let mut routing = BTreeMap::new();
        for (fqn, file) in &index.weight_map {
            let at = names.iter().position(|n| *n == file).expect("listed above");
            if !files[at].names().contains(fqn) {
                return Err(Error::Checkpoint(CheckpointError::CheckpointTensor {
                    rank,
                    path: files[at].path().into(),
                    fqn: fqn.clone(),
                    problem: format!(
                        "the index {} places it here, but the file does not hold it",
                        index_path.display()
                    ),
                }));
            }
            routing.insert(fqn.clone(), at);
        }
        Ok(Self { files, routing })
    }

    fn single(path: &Path, rank: usize) -> Result<Self> {
        let file = TensorFile::open(path, rank)?;
        let routing = file.names().into_iter().map(|n| (n, 0)).collect();
        Ok(Self { files: vec![file], routing })
    }

    fn file(&self, fqn: &str) -> &TensorFile {
        &self.files[self.routing[fqn]]
    }
}

/// Sets a wrapped model's values from a Hugging Face checkpoint (`path`: a directory
/// holding `model.safetensors.index.json` or `model.safetensors`, an index file, or one
/// `.safetensors` file): each rank reads from the files only the ranges of its
/// own shards (and the buffers), converting floating-point dtypes to the model's. Every
/// FQN of the model must be in the checkpoint with its shape, and nothing else (a tied
/// parameter's second FQN may be absent); the whole checkpoint is checked before any
/// value changes. A collective: every rank calls it; when one fails, all fail.
pub fn load_pretrained<M>(fsdp: &Fsdp<M>, path: &Path) -> Result<()> {
    load_pretrained_part(fsdp, path, &|_| true, &|fqn| fqn.to_string())
}

/// [`load_pretrained`] for a checkpoint that holds part of the model under names of its
/// own: a base model without the adapters trained on it, or the adapters alone under
/// PEFT's names. `holds` says which of the model's FQNs the checkpoint covers (each of
/// them must be there, and nothing else), `name` what the checkpoint calls one; the
/// model's other tensors keep their values.
pub fn load_pretrained_part<M>(
    fsdp: &Fsdp<M>,
    path: &Path,
    holds: &dyn Fn(&str) -> bool,
    name: &dyn Fn(&str) -> String,
) -> Result<()> {
    let (comm, device) = (fsdp.comm().as_ref(), device_of(fsdp));
    let checked = check_pretrained(fsdp, path, holds, name);
    // Every rank has checked the checkpoint against its model before any rank sets a
    // value; then each reads and sets one tensor at a time.
    let checkpoint = all_ranks_ok(comm, &device, checked, "loading pretrained weights (checking)", false)?;
    let set = (|| {
        for param in fsdp.unit_views().flat_map(|unit| unit.params()).filter(|p| holds(p.fqn())) {
            let key = name(param.fqn());
            let file = checkpoint.file(&key);
            param.fill(|start, len, dtype| file.read_range(&key, start, len, dtype, &device))?;
        }
        for buffer in fsdp.buffer_views().filter(|b| holds(b.fqn())) {
            let key = name(buffer.fqn());
            let (numel, file) = (buffer.values().elem_count(), checkpoint.file(&key));
            buffer.fill(file.read_range(&key, 0, numel, buffer.dtype(), &device)?)?;
        }
        Ok(())
    })();
    all_ranks_ok(comm, &device, set, "loading pretrained weights", false)
}

/// The checkpoint, opened (every file's header read and its length checked) and checked
/// against the model: every FQN it `holds` there (by its `name`) with its shape, nothing
/// else.
fn check_pretrained<M>(
    fsdp: &Fsdp<M>,
    path: &Path,
    holds: &dyn Fn(&str) -> bool,
    name: &dyn Fn(&str) -> String,
) -> Result<HfCheckpoint> {
    let rank = fsdp.rank();
    fsdp.check_between_steps("checkpoint::load_pretrained")?;
    check_world_sharded(fsdp, "loading pretrained weights")?;
    let checkpoint = HfCheckpoint::open(path, rank)?;

    let mut expected: Vec<(&str, String, DType, &[usize])> = Vec::new();
    let params = fsdp.unit_views().flat_map(|unit| unit.params());
    expected.extend(
        params
            .map(|p| (p.fqn(), p.dtype(), p.shape()))
            .filter(|(f, _, _)| holds(f))
            .map(|(f, d, s)| (f, name(f), d, s)),
    );
    let buffers = fsdp.buffer_views().map(|b| (b.fqn(), b.dtype(), b.shape()));
    expected.extend(buffers.filter(|(f, _, _)| holds(f)).map(|(f, d, s)| (f, name(f), d, s)));
    let mut problems = Vec::new();
    for (fqn, key, dtype, shape) in &expected {
        let shown = if key == fqn { format!("`{fqn}`") } else { format!("`{key}` (the model's `{fqn}`)") };
        if !checkpoint.routing.contains_key(key) {
            problems.push(format!("{shown}: in the model, not in the checkpoint"));
            continue;
        }
        let (file_dtype, file_shape) = checkpoint.file(key).info(key)?;
        if file_shape != *shape {
            problems.push(format!("{shown}: shape {shape:?} in the model, {file_shape:?} in the checkpoint"));
        }
        if file_dtype != *dtype && !(file_dtype.is_float() && dtype.is_float()) {
            problems.push(format!("{shown}: dtype {dtype:?} in the model, {file_dtype:?} in the checkpoint"));
        }
    }
    for key in checkpoint.routing.keys().filter(|k| !expected.iter().any(|(_, e, _, _)| e == *k)) {
        match fsdp.ties().iter().find(|t| holds(&t.fqn) && name(&t.fqn) == *key) {
            Some(tie) => problems.push(format!(
                "`{key}`: this model ties it to `{}`, so the checkpoint must not hold it separately",
                tie.target
            )),
            None => problems.push(format!("`{key}`: in the checkpoint, not in the model")),
        }
    }
    if !problems.is_empty() {
        return Err(Error::Checkpoint(CheckpointError::CheckpointMismatch {
            rank,
            path: path.into(),
            problems: capped(problems),
        }));
    }
    Ok(checkpoint)
}
