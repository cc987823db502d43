//! Sharded checkpoints: each rank saves and loads only its own shards, and a checkpoint
//! written at one world size and strategy loads at any other.
//!
//! A checkpoint is a directory `step-00000042/` holding `rank-0000r.safetensors` per rank
//! (the rank's pieces of every parameter and optimizer slot; rank 0's also the buffers)
//! and `metadata.json`. It is written as `.step-00000042.partial/` and renamed only after
//! every rank has written and synced its file and rank 0 the metadata.

use super::commit::{all_ranks_ok, io_error, read_json, sync, write_json};
use super::metadata::{
    rank_file, slot_key, CheckpointMetadata, OptimizerEntry, Piece, Progress, TensorEntry, TensorKind, FORMAT,
    METADATA_FILE, VERSION,
};
use super::tensor_files::MappedFile;
use super::{capped, check_world_sharded, device_of, restore_buffer, shard_of};
use crate::error::{Error, Result};
use crate::optim::{OptimizerState, OptimizerStateDict, VarState};
use crate::runtime::ParamGroup;
use crate::Fsdp;
use candle_core::{DType, Device, Tensor, TensorId};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const STEP_PREFIX: &str = "step-";

/// Saves sharded checkpoints into one directory, `step-<step>/` each, keeping the last
/// `k` if asked.
#[derive(Clone, Debug)]
pub struct Checkpointer {
    dir: PathBuf,
    keep_last: Option<usize>,
}

impl Checkpointer {
    /// A checkpointer saving under `dir`, keeping every checkpoint (see
    /// [`Checkpointer::keep_last`]).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), keep_last: None }
    }

    /// After each save, removes all but the newest `k` checkpoints.
    ///
    /// # Panics
    /// If `k` is 0.
    pub fn keep_last(mut self, k: usize) -> Self {
        assert!(k > 0, "Checkpointer::keep_last: keep at least one checkpoint");
        self.keep_last = Some(k);
        self
    }

    /// The directory that holds the `step-<step>/` checkpoints.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of the checkpoint of step `step`.
    pub fn step_dir(&self, step: u64) -> PathBuf {
        self.dir.join(format!("{STEP_PREFIX}{step:08}"))
    }

    /// The complete checkpoints in the directory (those with a metadata file), oldest first.
    pub fn checkpoints(&self) -> Result<Vec<(u64, PathBuf)>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(0, &self.dir)(e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let path = entry.map_err(io_error(0, &self.dir))?.path();
            let step = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix(STEP_PREFIX));
            if let Some(step) = step.and_then(|s| s.parse::<u64>().ok()) {
                if path.join(METADATA_FILE).is_file() {
                    found.push((step, path));
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// The newest complete checkpoint, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        Ok(self.checkpoints()?.pop().map(|(_, path)| path))
    }

    /// Saves the model's shards, the optimizer's state (if given) and `progress` as the
    /// checkpoint of step `progress.step`; returns its directory. A collective: every rank
    /// calls it, between steps. When any rank fails, every rank returns an error (the
    /// failing rank its own, the others one naming it), no new checkpoint is visible, and
    /// the earlier ones are untouched; a checkpoint of the same step is replaced only by a
    /// complete one.
    pub fn save<M>(
        &self,
        fsdp: &Fsdp<M>,
        optimizer: Option<&dyn OptimizerState>,
        progress: &Progress,
    ) -> Result<PathBuf> {
        let rank = fsdp.rank();
        let comm = fsdp.comm().as_ref();
        let device = device_of(fsdp);
        let temp = self.dir.join(format!(".{STEP_PREFIX}{:08}.partial", progress.step));
        let _span = tracing::info_span!("checkpoint_save", rank, step = progress.step).entered();

        let prepared = (|| {
            fsdp.check_between_steps("Checkpointer::save")?;
            check_world_sharded(fsdp, "a sharded checkpoint")?;
            let contents = RankContents::collect(fsdp, optimizer)?;
            if rank == 0 {
                prepare_partial_dir(&self.dir, &temp)?;
            }
            Ok(contents)
        })();
        let contents = all_ranks_ok(comm, &device, prepared, "checkpoint save (preparing)", true)?;

        let written = contents.write(&temp.join(rank_file(rank)), rank);
        all_ranks_ok(comm, &device, written, "checkpoint save (writing the rank files)", true)?;

        let final_dir = self.step_dir(progress.step);
        let committed = if rank == 0 { self.commit(fsdp, &contents, progress, &temp, &final_dir) } else { Ok(()) };
        all_ranks_ok(comm, &device, committed, "checkpoint save (committing)", true)?;
        Ok(final_dir)
    }

    /// Rank 0's last stage: describes the checkpoint, makes it visible, prunes old ones.
    fn commit<M>(
        &self,
        fsdp: &Fsdp<M>,
        contents: &RankContents,
        progress: &Progress,
        temp: &Path,
        final_dir: &Path,
    ) -> Result<()> {
        let mut files = BTreeMap::new();
        for rank in 0..fsdp.world_size() {
            let path = temp.join(rank_file(rank));
            let bytes = std::fs::metadata(&path).map_err(io_error(0, &path))?.len();
            files.insert(rank_file(rank), bytes);
        }
        let metadata = CheckpointMetadata {
            format: FORMAT.into(),
            version: VERSION,
            world_size: fsdp.world_size(),
            strategy: fsdp.config().strategy.name().into(),
            progress: progress.clone(),
            files,
            tensors: tensor_entries(fsdp),
            optimizer: contents.optimizer.clone(),
        };
        write_json(0, &temp.join(METADATA_FILE), &metadata)?;
        sync(temp).map_err(io_error(0, temp))?;
        // A checkpoint of the same step is moved aside, not deleted, until the new one is
        // in place.
        let replaced = final_dir.with_extension("replaced");
        let had_old = final_dir.exists();
        if had_old {
            std::fs::rename(final_dir, &replaced).map_err(io_error(0, final_dir))?;
        }
        std::fs::rename(temp, final_dir).map_err(io_error(0, final_dir))?;
        sync(&self.dir).map_err(io_error(0, &self.dir))?;
        if had_old {
            std::fs::remove_dir_all(&replaced).map_err(io_error(0, &replaced))?;
        }
        if let Some(keep) = self.keep_last {
            let all = self.checkpoints()?;
            for (_, old) in &all[..all.len().saturating_sub(keep)] {
                std::fs::remove_dir_all(old).map_err(io_error(0, old))?;
            }
        }
        Ok(())
    }
}

/// Creates the checkpoint directory and an empty `.partial` directory, removing what an
/// interrupted save of the same step left.
fn prepare_partial_dir(dir: &Path, temp: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_error(0, dir))?;
    if temp.exists() {
        std::fs::remove_dir_all(temp).map_err(io_error(0, temp))?;
    }
    std::fs::create_dir(temp).map_err(io_error(0, temp))
}

/// What one rank writes: its pieces of the parameters and optimizer slots (rank 0 also
/// the buffers), and what rank 0 records of the optimizer.
struct RankContents {
    tensors: Vec<(String, Tensor)>,
    optimizer: Option<OptimizerEntry>,
}

/// The elements of a parameter's flattened value that this rank saves: its shard without
/// the padding. Without sharding every rank holds everything, and rank 0 saves it.
fn saved_len(group: &ParamGroup, param: usize, rank: usize) -> usize {
    if (group.shard_world == 1 && rank != 0) || group.replica_rank() != 0 {
        return 0;
    }
    group.params[param].spec.real_len(group.shard_rank())
}

impl RankContents {
    fn collect<M>(fsdp: &Fsdp<M>, optimizer: Option<&dyn OptimizerState>) -> Result<Self> {
        let rank = fsdp.rank();
        let mut tensors = Vec::new();
        let mut owner: HashMap<TensorId, (&str, usize)> = HashMap::new();
        for group in fsdp.groups() {
            for (i, param) in group.params.iter().enumerate() {
                let len = saved_len(group, i, rank);
                owner.insert(param.shard.id(), (&param.fqn, len));
                if len > 0 {
                    tensors.push((param.fqn.clone(), param.shard.as_tensor().narrow(0, 0, len)?));
                }
            }
        }
        if rank == 0 {
            tensors.extend(fsdp.buffers().iter().map(|b| (b.fqn.clone(), b.tensor.clone())));
        }
        let optimizer = match optimizer {
            None => None,
            Some(optimizer) => {
                let state = optimizer.export_state()?;
                let mut slots = BTreeMap::new();
                for VarState { var, slots: values } in &state.vars {
                    let Some(&(fqn, len)) = owner.get(&var.id()) else {
                        return Err(Error::Rank {
                            rank,
                            message: format!(
                                "the optimizer steps a {:?} variable that is no parameter shard of this model; \
                                 build it from `Fsdp::parameters()`",
                                var.shape()
                            ),
                        });
                    };
                    slots.insert(fqn.to_string(), values.keys().cloned().collect());
                    for (slot, value) in values {
                        if value.dims() != var.dims() {
                            return Err(Error::Rank {
                                rank,
                                message: format!(
                                    "optimizer slot `{slot}` of `{fqn}` is {:?}, its shard {:?}",
                                    value.dims(),
                                    var.dims()
                                ),
                            });
                        }
                        if len > 0 {
                            tensors.push((slot_key(slot, fqn), value.narrow(0, 0, len)?));
                        }
                    }
                }
                Some(OptimizerEntry { scalars: state.scalars, slots })
            }
        };
        Ok(Self { tensors, optimizer })
    }

    /// Writes the rank file and syncs it.
    fn write(&self, path: &Path, rank: usize) -> Result<()> {
        let metadata = HashMap::from([("format".to_string(), FORMAT.to_string())]);
        let tensors = self.tensors.iter().map(|(name, tensor)| (name.as_str(), tensor));
        safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|e| Error::CheckpointFile {
            rank,
            path: path.into(),
            problem: e.to_string(),
        })?;
        sync(path).map_err(io_error(rank, path))
    }
}

/// Every parameter and buffer with the pieces the ranks saved.
fn tensor_entries<M>(fsdp: &Fsdp<M>) -> BTreeMap<String, TensorEntry> {
    let mut entries = BTreeMap::new();
    for group in fsdp.groups() {
        for param in &group.params {
            let shard_len = param.spec.shard_len;
            let pieces = (0..group.shard_world)
                .map(|r| Piece { file: rank_file(r), start: r * shard_len, len: param.spec.real_len(r) })
                .filter(|piece| piece.len > 0)
                .collect();
            let entry = TensorEntry {
                kind: TensorKind::Parameter,
                dtype: param.shard.dtype().into(),
                shape: param.shape.dims().to_vec(),
                pieces,
            };
            entries.insert(param.fqn.clone(), entry);
        }
    }
    for buffer in fsdp.buffers() {
        let numel = buffer.tensor.elem_count();
        let entry = TensorEntry {
            kind: TensorKind::Buffer,
            dtype: buffer.tensor.dtype().into(),
            shape: buffer.tensor.dims().to_vec(),
            pieces: vec![Piece { file: rank_file(0), start: 0, len: numel }],
        };
        entries.insert(buffer.fqn.clone(), entry);
    }
    entries
}

/// Reads and checks a checkpoint's `metadata.json`: the format, and that every file it
/// lists is there at its recorded size.
pub fn read_metadata(dir: &Path) -> Result<CheckpointMetadata> {
    read_metadata_on(0, dir)
}

fn read_metadata_on(rank: usize, dir: &Path) -> Result<CheckpointMetadata> {
    let fail = |path: &Path, problem: String| Error::CheckpointFile { rank, path: path.into(), problem };
    if !dir.is_dir() {
        return Err(fail(dir, "no such checkpoint directory".into()));
    }
    let path = dir.join(METADATA_FILE);
    if !path.is_file() {
        return Err(fail(
            dir,
            format!("no {METADATA_FILE}: not a complete checkpoint (an interrupted save leaves none)"),
        ));
    }
    let metadata: CheckpointMetadata = read_json(rank, &path)?;
    if metadata.format != FORMAT || metadata.version != VERSION {
        let found = format!("{} version {}", metadata.format, metadata.version);
        return Err(fail(&path, format!("written as {found}; this build reads {FORMAT} version {VERSION}")));
    }
    for (name, &bytes) in &metadata.files {
        let file = dir.join(name);
        match std::fs::metadata(&file) {
            Err(_) => return Err(fail(&file, "missing: the checkpoint is incomplete".into())),
            Ok(found) if found.len() != bytes => {
                let problem = format!("{} bytes, but the metadata records {bytes}: truncated or replaced", found.len());
                return Err(fail(&file, problem));
            }
            Ok(_) => {}
        }
    }
    Ok(metadata)
}

/// Loads a sharded checkpoint into a wrapped model (and `optimizer`, built over its
/// [`Fsdp::parameters`]), at any world size and strategy; returns the saved
/// [`Progress`]. A collective: every rank calls it, between steps. Everything is checked
/// (the model's FQNs, shapes and dtypes against the metadata, every file's header and
/// every piece this rank needs) before any value changes; when a rank fails, every rank
/// returns an error.
pub fn load<M>(fsdp: &Fsdp<M>, optimizer: Option<&mut dyn OptimizerState>, dir: &Path) -> Result<Progress> {
    let _span = tracing::info_span!("checkpoint_load", rank = fsdp.rank()).entered();
    let loaded = load_on_rank(fsdp, optimizer, dir);
    all_ranks_ok(fsdp.comm().as_ref(), &device_of(fsdp), loaded, "checkpoint load", false)
}

fn load_on_rank<M>(fsdp: &Fsdp<M>, optimizer: Option<&mut dyn OptimizerState>, dir: &Path) -> Result<Progress> {
    let rank = fsdp.rank();
    fsdp.check_between_steps("checkpoint::load")?;
    check_world_sharded(fsdp, "a sharded checkpoint")?;
    let metadata = read_metadata_on(rank, dir)?;
    let metadata_path = dir.join(METADATA_FILE);
    check_fits(fsdp, &metadata, &metadata_path)?;
    let saved_optimizer = match (&optimizer, &metadata.optimizer) {
        (Some(_), None) => {
            let problems = vec!["the checkpoint holds no optimizer state, but an optimizer was given".into()];
            return Err(Error::CheckpointMismatch { rank, path: metadata_path, problems });
        }
        (Some(_), Some(saved)) => Some(saved),
        (None, _) => None,
    };
    let files = RankFiles::open(dir, &metadata, rank, device_of(fsdp))?;

    // Everything this rank will read is checked before anything is set.
    for group in fsdp.groups() {
        for param in &group.params {
            let entry = &metadata.tensors[&param.fqn];
            files.check_pieces(&param.fqn, &param.fqn, entry)?;
            if let Some(saved) = saved_optimizer {
                for slot in saved.slots.get(&param.fqn).into_iter().flatten() {
                    files.check_pieces(&param.fqn, &slot_key(slot, &param.fqn), entry)?;
                }
            }
        }
    }
    for buffer in fsdp.buffers() {
        files.check_pieces(&buffer.fqn, &buffer.fqn, &metadata.tensors[&buffer.fqn])?;
    }

    for group in fsdp.groups() {
        for (i, param) in group.params.iter().enumerate() {
            let entry = &metadata.tensors[&param.fqn];
            let shard = shard_of(group, i, |start, len, dtype| files.read(&param.fqn, entry, start, len, dtype))?;
            param.shard.set(&shard)?;
        }
    }
    for buffer in fsdp.buffers() {
        let entry = &metadata.tensors[&buffer.fqn];
        let flat = files.read(&buffer.fqn, entry, 0, buffer.tensor.elem_count(), buffer.tensor.dtype())?;
        restore_buffer(buffer, flat)?;
    }
    if let (Some(optimizer), Some(saved)) = (optimizer, saved_optimizer) {
        load_optimizer(fsdp, optimizer, saved, &metadata, &files, &metadata_path)?;
    }
    Ok(metadata.progress)
}

/// Restores the optimizer one variable at a time (the trait takes any subset), so at
/// most one parameter's slots are held beside the optimizer's own.
fn load_optimizer<M>(
    fsdp: &Fsdp<M>,
    optimizer: &mut dyn OptimizerState,
    saved: &OptimizerEntry,
    metadata: &CheckpointMetadata,
    files: &RankFiles,
    metadata_path: &Path,
) -> Result<()> {
    let rank = fsdp.rank();
    let by_var: HashMap<TensorId, (&ParamGroup, usize)> = fsdp
        .groups()
        .iter()
        .flat_map(|g| g.params.iter().enumerate().map(move |(i, p)| (p.shard.id(), (g, i))))
        .collect();
    let vars: Vec<_> = optimizer.export_state()?.vars.into_iter().map(|v| v.var).collect();
    for var in vars {
        let Some(&(group, i)) = by_var.get(&var.id()) else {
            return Err(Error::Rank {
                rank,
                message: format!(
                    "the optimizer steps a {:?} variable that is no parameter shard of this model",
                    var.shape()
                ),
            });
        };
        let fqn = &group.params[i].fqn;
        let names = saved.slots.get(fqn).ok_or_else(|| Error::CheckpointMismatch {
            rank,
            path: metadata_path.into(),
            problems: vec![format!("no optimizer state for `{fqn}`")],
        })?;
        let entry = &metadata.tensors[fqn];
        let mut slots = BTreeMap::new();
        for name in names {
            let key = slot_key(name, fqn);
            // A slot is cut as its parameter is.
            let slot = shard_of(group, i, |start, len, dtype| files.read(&key, entry, start, len, dtype))?;
            slots.insert(name.clone(), slot);
        }
        let state = OptimizerStateDict { vars: vec![VarState { var, slots }], scalars: saved.scalars.clone() };
        optimizer.import_state(state).map_err(|e| Error::CheckpointTensor {
            rank,
            path: metadata_path.into(),
            fqn: fqn.clone(),
            problem: format!("the optimizer refused its saved state: {e}"),
        })?;
    }
    Ok(())
}

/// Lists every way the model and the checkpoint disagree.
fn check_fits<M>(fsdp: &Fsdp<M>, metadata: &CheckpointMetadata, path: &Path) -> Result<()> {
    let mut model: BTreeMap<&str, (TensorKind, DType, &[usize])> = BTreeMap::new();
    for group in fsdp.groups() {
        for param in &group.params {
            model.insert(&param.fqn, (TensorKind::Parameter, param.shard.dtype(), param.shape.dims()));
        }
    }
    for buffer in fsdp.buffers() {
        model.insert(&buffer.fqn, (TensorKind::Buffer, buffer.tensor.dtype(), buffer.tensor.dims()));
    }
    let mut problems = Vec::new();
    for (fqn, (kind, dtype, shape)) in &model {
        let Some(entry) = metadata.tensors.get(*fqn) else {
            problems.push(format!("`{fqn}`: in the model, not in the checkpoint"));
            continue;
        };
        if entry.kind != *kind {
            problems.push(format!("`{fqn}`: a {kind:?} in the model, a {:?} in the checkpoint", entry.kind));
        }
        if entry.shape != *shape {
            problems.push(format!("`{fqn}`: shape {shape:?} in the model, {:?} in the checkpoint", entry.shape));
        }
        if safetensors::Dtype::from(*dtype) != entry.dtype {
            problems.push(format!("`{fqn}`: dtype {dtype:?} in the model, {:?} in the checkpoint", entry.dtype));
        }
    }
    for fqn in metadata.tensors.keys().filter(|f| !model.contains_key(f.as_str())) {
        problems.push(format!("`{fqn}`: in the checkpoint, not in the model"));
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::CheckpointMismatch { rank: fsdp.rank(), path: path.into(), problems: capped(problems) })
}

/// The rank files of a checkpoint, opened (headers validated) as needed.
struct RankFiles {
    dir: PathBuf,
    files: HashMap<String, MappedFile>,
    rank: usize,
    device: Device,
}

impl RankFiles {
    fn open(dir: &Path, metadata: &CheckpointMetadata, rank: usize, device: Device) -> Result<Self> {
        let files = metadata
            .files
            .keys()
            .map(|name| Ok((name.clone(), MappedFile::open(&dir.join(name), rank)?)))
            .collect::<Result<_>>()?;
        Ok(Self { dir: dir.into(), files, rank, device })
    }

    fn file(&self, fqn: &str, name: &str) -> Result<&MappedFile> {
        self.files.get(name).ok_or_else(|| Error::CheckpointTensor {
            rank: self.rank,
            path: name.into(),
            fqn: fqn.into(),
            problem: "a piece names a file the metadata does not list".into(),
        })
    }

    /// Every piece of `key` is in its file, 1-D, of its recorded length and dtype, and
    /// the pieces cover the value exactly once.
    fn check_pieces(&self, fqn: &str, key: &str, entry: &TensorEntry) -> Result<()> {
        let numel: usize = entry.shape.iter().product();
        let mut pieces = entry.pieces.clone();
        pieces.sort_by_key(|p| p.start);
        let mut next = 0;
        for piece in &pieces {
            let file = self.file(fqn, &piece.file)?;
            let (dtype, shape) = file.info(key)?;
            let fail = |problem: String| Error::CheckpointTensor {
                rank: self.rank,
                path: file.path().into(),
                fqn: key.into(),
                problem,
            };
            if shape != [piece.len] || safetensors::Dtype::from(dtype) != entry.dtype {
                return Err(fail(format!(
                    "the piece is {dtype:?} {shape:?}, the metadata records {:?} [{}]",
                    entry.dtype, piece.len
                )));
            }
            if piece.start != next {
                return Err(fail(format!("pieces leave a gap or overlap at element {next}")));
            }
            next += piece.len;
        }
        if next != numel {
            return Err(Error::CheckpointTensor {
                rank: self.rank,
                path: self.dir.join(METADATA_FILE),
                fqn: key.into(),
                problem: format!("pieces cover {next} of {numel} elements"),
            });
        }
        Ok(())
    }

    /// Elements `[start, start + len)` of `key`'s flattened value, from the pieces that
    /// hold them.
    fn read(&self, key: &str, entry: &TensorEntry, start: usize, len: usize, dtype: DType) -> Result<Tensor> {
        let end = start + len;
        let mut parts = Vec::new();
        for piece in &entry.pieces {
            let (lo, hi) = (start.max(piece.start), end.min(piece.start + piece.len));
            if lo < hi {
                let file = self.file(key, &piece.file)?;
                parts.push((lo, file.read_range(key, lo - piece.start, hi - lo, dtype, &self.device)?));
            }
        }
        parts.sort_by_key(|(lo, _)| *lo);
        let parts: Vec<Tensor> = parts.into_iter().map(|(_, t)| t).collect();
        Ok(Tensor::cat(&parts, 0)?)
    }
}
