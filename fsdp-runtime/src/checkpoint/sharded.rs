//! Sharded checkpoints: each rank saves and loads only its own shards, and a checkpoint
//! written at one world size and strategy loads at any other.
//!
//! A checkpoint is a directory `step-00000042/` holding `rank-0000r.safetensors` per rank
//! (the rank's pieces of every parameter and optimizer slot; rank 0's also the buffers)
//! and `metadata.json`. It is written as `.step-00000042.partial/` and renamed only after
//! every rank has written and synced its file and rank 0 the metadata. The metadata
//! records every file's size and CRC32C; each rank file's header names the checkpoint (an
//! id drawn for the save), the step, the rank and the world size that wrote it, and where
//! each of its pieces starts. A load checks all of it before any value is set, so a file
//! swapped, replaced by another step's or damaged is refused, naming the file.

use super::commit::{all_ranks_ok, io_error, read_json, sync, write_json};
use super::metadata::{
    header, rank_file, rank_of_file, slot_key, CheckpointMetadata, FileEntry, OptimizerEntry, Piece, Progress,
    TensorEntry, TensorKind, FORMAT, METADATA_FILE, VERSION,
};
use super::tensor_files::{file_checksum, TensorFile};
use super::{all_finite, capped, check_world_sharded, device_of};
use crate::error::CheckpointError;
use crate::error::{Error, Result};
use crate::optim::{OptimizerState, OptimizerStateDict, VarState};
use crate::runtime::ParamView;
use crate::Fsdp;
use candle_core::{DType, Device, Tensor, TensorId};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const STEP_PREFIX: &str = "step-";
/// The file rank 0 holds locked while it saves into a directory.
const LOCK_FILE: &str = ".lock";

/// Saves sharded checkpoints into one directory, `step-<step>/` each, keeping the last
/// `k` if asked. Rank 0 locks the directory at its first save (or
/// [`Checkpointer::prepare`]) for as long as the checkpointer lives, so two jobs never
/// write into one directory.
#[derive(Clone, Debug)]
pub struct Checkpointer {
    dir: PathBuf,
    keep_last: Option<usize>,
    /// Rank 0's lock on the directory, once taken.
    lock: Arc<Mutex<Option<File>>>,
}

/// What [`Checkpointer::load_latest`] resumed from.
#[derive(Debug)]
pub struct Resumed {
    /// The checkpoint loaded.
    pub dir: PathBuf,
    /// Where training stood when it was saved.
    pub progress: Progress,
    /// Newer checkpoints that failed their checks and were passed over, with why.
    pub skipped: Vec<(PathBuf, String)>,
}

/// How [`load_with`] and [`Checkpointer::load_latest`] check what they load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Check every file read against the CRC32C its metadata records (each file is read
    /// once, whole). On by default.
    pub verify_checksums: bool,
    /// Accept NaN or infinite values in the parameters and optimizer state. Off by
    /// default: a checkpoint holding one is refused, naming the tensor.
    pub allow_non_finite: bool,
    /// [`Checkpointer::load_latest`]: when the newest checkpoint fails its checks (a file
    /// damaged, missing or not its own), say so and load the newest one that passes. On
    /// by default.
    pub fall_back: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { verify_checksums: true, allow_non_finite: false, fall_back: true }
    }
}

impl Checkpointer {
    /// A checkpointer saving under `dir`, keeping every checkpoint (see
    /// [`Checkpointer::keep_last`]).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), keep_last: None, lock: Arc::default() }
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

    /// The complete checkpoints in the directory (those with a metadata file), oldest
    /// first. A checkpoint being pruned is renamed before anything of it is removed, so
    /// it is never listed half removed.
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

    /// The newest complete checkpoint, if any (not checked: see
    /// [`Checkpointer::load_latest`]).
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        Ok(self.checkpoints()?.pop().map(|(_, path)| path))
    }

    /// Gets the directory ready for saving, before training spends time that a late
    /// failure would lose: creates it, locks it for this job (rank 0) and removes what
    /// crashed saves and prunes left. A collective; [`Checkpointer::save`] does it if
    /// nobody did.
    pub fn prepare<M>(&self, fsdp: &Fsdp<M>) -> Result<()> {
        let prepared = if fsdp.rank() == 0 { self.lock_and_clean() } else { Ok(()) };
        all_ranks_ok(fsdp.comm().as_ref(), &device_of(fsdp), prepared, "checkpoint directory", true)
    }

    /// Rank 0: creates and locks the directory (once), then removes leftovers.
    fn lock_and_clean(&self) -> Result<()> {
        let mut lock = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if lock.is_none() {
            *lock = Some(lock_dir(&self.dir)?);
        }
        remove_leftovers(&self.dir)
    }

    /// Loads the newest checkpoint that passes its checks (see [`load_with`]): when a
    /// newer one fails because a file is damaged, missing or not its own, a warning names
    /// it and why, and the next older is tried (unless `options.fall_back` is off). A
    /// checkpoint that does not fit the model is an error, never passed over. `None` when
    /// the directory holds no checkpoint. A collective.
    pub fn load_latest<M>(
        &self,
        fsdp: &Fsdp<M>,
        mut optimizer: Option<&mut dyn OptimizerState>,
        options: &LoadOptions,
    ) -> Result<Option<Resumed>> {
        let mut skipped: Vec<(PathBuf, String)> = Vec::new();
        for (_, dir) in self.checkpoints()?.into_iter().rev() {
            let reborrowed = optimizer.as_mut().map(|o| &mut **o as &mut dyn OptimizerState);
            let error = match load_with(fsdp, reborrowed, &dir, options) {
                Ok(progress) => return Ok(Some(Resumed { dir, progress, skipped })),
                Err(error) => error,
            };
            if !options.fall_back || !all_ranks_damaged(fsdp, &error)? {
                return Err(error);
            }
            // Said by the ranks that found the problem (their peers only know that they did).
            if !matches!(error, Error::Checkpoint(CheckpointError::CheckpointPeerFailed { .. })) {
                eprintln!("warning: {} failed its checks and is passed over: {error}", dir.display());
            }
            skipped.push((dir, error.to_string()));
        }
        match skipped.first() {
            None => Ok(None),
            Some((newest, why)) => Err(Error::Checkpoint(CheckpointError::CheckpointFile {
                rank: fsdp.rank(),
                path: self.dir.clone(),
                problem: format!(
                    "none of its {} checkpoints passes its checks (the newest, {}: {why})",
                    skipped.len(),
                    newest.display()
                ),
            })),
        }
    }

    /// Saves the model's shards, the optimizer's state (if given) and `progress` as the
    /// checkpoint of step `progress.step`; returns its directory. A collective: every rank
    /// calls it, between steps. Refused when a parameter or optimizer value is NaN or
    /// infinite, so a diverged run never replaces good checkpoints. When any rank fails,
    /// every rank returns an error (the failing rank its own, the others one naming it),
    /// no new checkpoint is visible, and the earlier ones are untouched; a checkpoint of
    /// the same step is replaced only by a complete one.
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
            contents.check_finite(rank, progress.step)?;
            if rank == 0 {
                self.lock_and_clean()?;
                std::fs::create_dir(&temp).map_err(io_error(0, &temp))?;
            }
            Ok(contents)
        })();
        let contents = all_ranks_ok(comm, &device, prepared, "checkpoint save (preparing)", true)?;
        let identity = Identity {
            checkpoint_id: checkpoint_id(fsdp, progress.step)?,
            step: progress.step,
            rank,
            world_size: fsdp.world_size(),
        };

        let path = temp.join(rank_file(rank));
        let written = contents.write(&path, &identity).and_then(|()| {
            let bytes = std::fs::metadata(&path).map_err(io_error(rank, &path))?.len();
            Ok(FileEntry { bytes, crc32c: file_checksum(&path, rank)? })
        });
        let written = all_ranks_ok(comm, &device, written, "checkpoint save (writing the rank files)", true)?;
        let files = gather_file_entries(fsdp, written)?;

        let final_dir = self.step_dir(progress.step);
        let committed = if rank == 0 {
            let metadata = CheckpointMetadata {
                format: FORMAT.into(),
                version: VERSION,
                checkpoint_id: identity.checkpoint_id.clone(),
                world_size: fsdp.world_size(),
                strategy: fsdp.config().strategy.name().into(),
                progress: progress.clone(),
                files,
                tensors: tensor_entries(fsdp),
                optimizer: contents.optimizer.clone(),
            };
            self.commit(&metadata, &temp, &final_dir)
        } else {
            Ok(())
        };
        all_ranks_ok(comm, &device, committed, "checkpoint save (committing)", true)?;
        Ok(final_dir)
    }

    /// Rank 0's last stage: describes the checkpoint, makes it visible, prunes old ones.
    fn commit(&self, metadata: &CheckpointMetadata, temp: &Path, final_dir: &Path) -> Result<()> {
        write_json(0, &temp.join(METADATA_FILE), metadata)?;
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
            for (step, old) in &all[..all.len().saturating_sub(keep)] {
                // Renamed first: a prune cut short leaves no checkpoint that looks complete.
                let going = self.dir.join(format!(".{STEP_PREFIX}{step:08}.pruning"));
                std::fs::rename(old, &going).map_err(io_error(0, old))?;
                std::fs::remove_dir_all(&going).map_err(io_error(0, &going))?;
            }
        }
        Ok(())
    }
}

/// Creates `dir` and takes its lock file's exclusive lock, which the operating system
/// drops when the process ends, however it ends.
fn lock_dir(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir).map_err(io_error(0, dir))?;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_error(0, &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(Error::Checkpoint(CheckpointError::CheckpointFile {
                rank: 0,
                path: dir.into(),
                problem: format!("another job saves into this directory ({}): give each run its own", holder.trim()),
            }));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_error(0, &path)(e)),
    }
    let holder = format!("process {}", std::process::id());
    file.set_len(0).and_then(|()| file.write_all_at(holder.as_bytes(), 0)).map_err(io_error(0, &path))?;
    Ok(file)
}

/// Removes what interrupted saves (`.step-N.partial`), prunes (`.step-N.pruning`) and
/// replacements (`step-N.replaced`) left in `dir`.
fn remove_leftovers(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io_error(0, dir))? {
        let path = entry.map_err(io_error(0, dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let hidden = name.strip_prefix('.').and_then(|n| n.strip_prefix(STEP_PREFIX));
        let leftover = hidden.is_some_and(|n| n.ends_with(".partial") || n.ends_with(".pruning"))
            || (name.starts_with(STEP_PREFIX) && name.ends_with(".replaced"));
        if leftover && path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(io_error(0, &path))?;
        }
    }
    Ok(())
}

/// An id for one save, the same on every rank: drawn by rank 0 (the time, the process
/// and the step through a randomly keyed hash) and broadcast.
fn checkpoint_id<M>(fsdp: &Fsdp<M>, step: u64) -> Result<String> {
    use std::hash::BuildHasher;
    let random = std::collections::hash_map::RandomState::new();
    let drawn = random.hash_one((std::time::SystemTime::now(), std::process::id(), step));
    let drawn = Tensor::new(&[drawn as i64], &device_of(fsdp))?;
    let id = fsdp.comm().broadcast(&drawn, 0, "checkpoint id")?.wait()?.to_vec1::<i64>()?[0];
    Ok(format!("{:016x}", id as u64))
}

/// Every rank's file entry, on every rank, in rank order.
fn gather_file_entries<M>(fsdp: &Fsdp<M>, mine: FileEntry) -> Result<BTreeMap<String, FileEntry>> {
    let mine = Tensor::new(&[mine.bytes as i64, mine.crc32c as i64], &device_of(fsdp))?;
    let all = fsdp.comm().all_gather(&mine, "checkpoint file checksums")?.wait()?.to_vec1::<i64>()?;
    Ok(all
        .chunks(2)
        .enumerate()
        .map(|(rank, e)| (rank_file(rank), FileEntry { bytes: e[0] as u64, crc32c: e[1] as u32 }))
        .collect())
}

/// Whether `error` (this rank's outcome of a load) and every other rank's are about the
/// checkpoint's files (damaged, missing, not its own), not about the model: only then is
/// an older checkpoint worth trying. A collective.
fn all_ranks_damaged<M>(fsdp: &Fsdp<M>, error: &Error) -> Result<bool> {
    let damaged = matches!(
        error,
        Error::Checkpoint(CheckpointError::CheckpointFile { .. })
            | Error::Checkpoint(CheckpointError::CheckpointTensor { .. })
            | Error::Checkpoint(CheckpointError::CheckpointPeerFailed { .. })
    );
    let flag = Tensor::new(&[f32::from(u8::from(damaged))], &device_of(fsdp))?;
    let flags = fsdp.comm().all_gather(&flag, "checkpoint load outcome")?.wait()?.to_vec1::<f32>()?;
    Ok(flags.iter().all(|&f| f == 1.0))
}

/// What wrote a rank file, as its header records it.
#[derive(Debug, PartialEq)]
struct Identity {
    checkpoint_id: String,
    step: u64,
    rank: usize,
    world_size: usize,
}

/// What one rank writes: its pieces of the parameters and optimizer slots (rank 0 also
/// the buffers), each with the element of its value it starts at, and what rank 0
/// records of the optimizer.
struct RankContents {
    tensors: Vec<(String, usize, Tensor)>,
    optimizer: Option<OptimizerEntry>,
}

impl RankContents {
    fn collect<M>(fsdp: &Fsdp<M>, optimizer: Option<&dyn OptimizerState>) -> Result<Self> {
        let rank = fsdp.rank();
        let mut tensors = Vec::new();
        let mut owner: HashMap<TensorId, (&str, usize, usize)> = HashMap::new();
        for param in fsdp.unit_views().flat_map(|unit| unit.params()) {
            let (len, start) = (param.saved_len(rank), param.range().start);
            owner.insert(param.var_id(), (param.fqn(), start, len));
            if len > 0 {
                tensors.push((param.fqn().to_string(), start, param.values()?));
            }
        }
        if rank == 0 {
            tensors.extend(fsdp.buffer_views().map(|b| (b.fqn().to_string(), 0, b.values().clone())));
        }
        let optimizer = match optimizer {
            None => None,
            Some(optimizer) => {
                let state = optimizer.export_state()?;
                let mut slots = BTreeMap::new();
                for VarState { var, slots: values } in &state.vars {
                    let Some(&(fqn, start, len)) = owner.get(&var.id()) else {
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
                            tensors.push((slot_key(slot, fqn), start, value.narrow(0, 0, len)?));
                        }
                    }
                }
                Some(OptimizerEntry { scalars: state.scalars, slots })
            }
        };
        Ok(Self { tensors, optimizer })
    }

    /// Refuses to save a NaN or infinite value.
    fn check_finite(&self, rank: usize, step: u64) -> Result<()> {
        for (key, _, tensor) in &self.tensors {
            if tensor.dtype().is_float() && !all_finite(tensor)? {
                return Err(Error::Rank {
                    rank,
                    message: format!(
                        "`{key}` holds NaN or infinite values at step {step}: no checkpoint is written from them"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Writes the rank file, its header naming what wrote it, and syncs it.
    fn write(&self, path: &Path, identity: &Identity) -> Result<()> {
        let starts: BTreeMap<&str, usize> = self.tensors.iter().map(|(key, start, _)| (key.as_str(), *start)).collect();
        let metadata = HashMap::from([
            (header::FORMAT.to_string(), FORMAT.to_string()),
            (header::CHECKPOINT.to_string(), identity.checkpoint_id.clone()),
            (header::STEP.to_string(), identity.step.to_string()),
            (header::RANK.to_string(), identity.rank.to_string()),
            (header::WORLD_SIZE.to_string(), identity.world_size.to_string()),
            (header::STARTS.to_string(), serde_json::to_string(&starts).expect("names and numbers")),
        ]);
        let tensors = self.tensors.iter().map(|(name, _, tensor)| (name.as_str(), tensor));
        safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|e| {
            Error::Checkpoint(CheckpointError::CheckpointFile {
                rank: identity.rank,
                path: path.into(),
                problem: e.to_string(),
            })
        })?;
        sync(path).map_err(io_error(identity.rank, path))
    }
}

/// Every parameter and buffer with the pieces the ranks saved.
fn tensor_entries<M>(fsdp: &Fsdp<M>) -> BTreeMap<String, TensorEntry> {
    let mut entries = BTreeMap::new();
    for param in fsdp.unit_views().flat_map(|unit| unit.params()) {
        let pieces = param
            .pieces()
            .map(|(r, range)| Piece { file: rank_file(r), start: range.start, len: range.len() })
            .collect();
        let entry = TensorEntry {
            kind: TensorKind::Parameter,
            dtype: param.dtype().into(),
            shape: param.shape().to_vec(),
            pieces,
        };
        entries.insert(param.fqn().to_string(), entry);
    }
    for buffer in fsdp.buffer_views() {
        let numel = buffer.values().elem_count();
        let entry = TensorEntry {
            kind: TensorKind::Buffer,
            dtype: buffer.dtype().into(),
            shape: buffer.shape().to_vec(),
            pieces: vec![Piece { file: rank_file(0), start: 0, len: numel }],
        };
        entries.insert(buffer.fqn().to_string(), entry);
    }
    entries
}

/// Reads and checks a checkpoint's `metadata.json`: the format, and that every file it
/// lists is there at its recorded size.
pub fn read_metadata(dir: &Path) -> Result<CheckpointMetadata> {
    read_metadata_on(0, dir)
}

fn read_metadata_on(rank: usize, dir: &Path) -> Result<CheckpointMetadata> {
    let fail = |path: &Path, problem: String| {
        Error::Checkpoint(CheckpointError::CheckpointFile { rank, path: path.into(), problem })
    };
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
    // The format and version first: another version's other fields are no error of their own.
    let head: serde_json::Value = read_json(rank, &path)?;
    let (format, version) = (&head["format"], &head["version"]);
    if format != FORMAT || version != VERSION {
        let found = format!("{format} version {version}");
        return Err(fail(&path, format!("written as {found}; this build reads {FORMAT} version {VERSION}")));
    }
    let metadata: CheckpointMetadata = read_json(rank, &path)?;
    for (name, entry) in &metadata.files {
        let file = dir.join(name);
        match std::fs::metadata(&file) {
            Err(_) => return Err(fail(&file, "missing: the checkpoint is incomplete".into())),
            Ok(found) if found.len() != entry.bytes => {
                // Another checkpoint's file says whose it is; a cut one only its size.
                let other = TensorFile::open(&file, rank).ok().and_then(|f| check_identity(&f, name, &metadata).err());
                let problem = other.unwrap_or_else(|| {
                    format!("{} bytes, but the metadata records {}: truncated or replaced", found.len(), entry.bytes)
                });
                return Err(fail(&file, problem));
            }
            Ok(_) => {}
        }
    }
    Ok(metadata)
}

/// [`load_with`] with the default checks.
pub fn load<M>(fsdp: &Fsdp<M>, optimizer: Option<&mut dyn OptimizerState>, dir: &Path) -> Result<Progress> {
    load_with(fsdp, optimizer, dir, &LoadOptions::default())
}

/// Loads a sharded checkpoint into a wrapped model (and `optimizer`, built over its
/// [`Fsdp::parameters`]), at any world size and strategy; returns the saved
/// [`Progress`]. A collective: every rank calls it, between steps. Everything is checked
/// on every rank before any rank sets a value: the model's FQNs, shapes and dtypes
/// against the metadata; every file a rank reads against its recorded size and checksum
/// and its header against the checkpoint (its id, step, rank and world size, and where
/// each piece starts); every value read for being finite (as `options` say). When a rank
/// fails, every rank returns an error and keeps the values it had.
pub fn load_with<M>(
    fsdp: &Fsdp<M>,
    optimizer: Option<&mut dyn OptimizerState>,
    dir: &Path,
    options: &LoadOptions,
) -> Result<Progress> {
    let _span = tracing::info_span!("checkpoint_load", rank = fsdp.rank()).entered();
    let (comm, device) = (fsdp.comm().as_ref(), device_of(fsdp));
    let checked = read_checked(fsdp, optimizer.is_some(), dir, options);
    let checked = all_ranks_ok(comm, &device, checked, "checkpoint load (checking)", false)?;
    let applied = apply(fsdp, optimizer, checked);
    all_ranks_ok(comm, &device, applied, "checkpoint load", false)
}

/// A checkpoint a rank has checked, its values not read yet.
struct Checked {
    metadata: CheckpointMetadata,
    metadata_path: PathBuf,
    sources: Sources,
}

fn read_checked<M>(fsdp: &Fsdp<M>, with_optimizer: bool, dir: &Path, options: &LoadOptions) -> Result<Checked> {
    let rank = fsdp.rank();
    fsdp.check_between_steps("checkpoint::load")?;
    check_world_sharded(fsdp, "a sharded checkpoint")?;
    let metadata = read_metadata_on(rank, dir)?;
    let metadata_path = dir.join(METADATA_FILE);
    check_fits(fsdp, &metadata, &metadata_path)?;
    if with_optimizer && metadata.optimizer.is_none() {
        let problems = vec!["the checkpoint holds no optimizer state, but an optimizer was given".into()];
        return Err(Error::Checkpoint(CheckpointError::CheckpointMismatch { rank, path: metadata_path, problems }));
    }
    let saved_optimizer = metadata.optimizer.as_ref().filter(|_| with_optimizer);

    // What this rank reads: its shard's range of every parameter (and of its optimizer
    // slots, cut as it is) and every buffer whole.
    let mut wanted = Wanted::default();
    for param in fsdp.unit_views().flat_map(|unit| unit.params()) {
        let entry = &metadata.tensors[param.fqn()];
        let range = param.range();
        wanted.add(param.fqn(), entry, range.clone());
        if let Some(saved) = saved_optimizer {
            for slot in saved.slots.get(param.fqn()).into_iter().flatten() {
                wanted.add(&slot_key(slot, param.fqn()), entry, range.clone());
            }
        }
    }
    for buffer in fsdp.buffer_views() {
        wanted.add(buffer.fqn(), &metadata.tensors[buffer.fqn()], 0..buffer.values().elem_count());
    }
    for (key, entry) in &wanted.entries {
        check_coverage(rank, &metadata_path, key, entry)?;
    }
    let sources = wanted.check(dir, &metadata, rank, device_of(fsdp), options)?;
    Ok(Checked { metadata, metadata_path, sources })
}

/// Sets the model's (and the optimizer's) values from what every rank has checked, one
/// tensor at a time: no more than one tensor's new values are held beside the old ones.
fn apply<M>(fsdp: &Fsdp<M>, optimizer: Option<&mut dyn OptimizerState>, checked: Checked) -> Result<Progress> {
    let Checked { metadata, metadata_path, sources } = checked;
    for param in fsdp.unit_views().flat_map(|unit| unit.params()) {
        param.fill(|start, len, dtype| sources.range(param.fqn(), start, len, dtype))?;
    }
    for buffer in fsdp.buffer_views() {
        buffer.fill(sources.range(buffer.fqn(), 0, buffer.values().elem_count(), buffer.dtype())?)?;
    }
    if let (Some(optimizer), Some(saved)) = (optimizer, &metadata.optimizer) {
        load_optimizer(fsdp, optimizer, saved, &sources, &metadata_path)?;
    }
    Ok(metadata.progress)
}

/// The pieces a rank reads, by file.
#[derive(Default)]
struct Wanted {
    /// Per file: (tensor key, the piece, the element range of its value wanted).
    by_file: BTreeMap<String, Vec<(String, Piece, std::ops::Range<usize>)>>,
    /// Per tensor key, its entry (slots share their parameter's).
    entries: BTreeMap<String, TensorEntry>,
}

impl Wanted {
    /// Elements `range` of `key`'s value, stored in the pieces of `entry`.
    fn add(&mut self, key: &str, entry: &TensorEntry, range: std::ops::Range<usize>) {
        self.entries.insert(key.to_string(), entry.clone());
        for piece in &entry.pieces {
            let (lo, hi) = (range.start.max(piece.start), range.end.min(piece.start + piece.len));
            if lo < hi {
                self.by_file.entry(piece.file.clone()).or_default().push((key.to_string(), piece.clone(), lo..hi));
            }
        }
    }

    /// Checks every file this rank reads, one at a time, keeping none of its values:
    /// the checksum over the whole file (read once), the header's identity and piece
    /// offsets, each piece's dtype and length, and that the values wanted are finite.
    fn check(
        self,
        dir: &Path,
        metadata: &CheckpointMetadata,
        rank: usize,
        device: Device,
        options: &LoadOptions,
    ) -> Result<Sources> {
        let mut sources = Sources { rank, device, files: BTreeMap::new(), parts: BTreeMap::new() };
        for (name, parts) in self.by_file {
            let path = dir.join(&name);
            let fail = |problem: String| {
                Error::Checkpoint(CheckpointError::CheckpointFile { rank, path: path.clone(), problem })
            };
            let Some(recorded) = metadata.files.get(&name) else {
                return Err(fail("a piece names this file, which the metadata does not list".into()));
            };
            let file = TensorFile::open(&path, rank)?;
            let ranges: Vec<(String, usize, usize)> =
                parts.iter().map(|(key, piece, range)| (key.clone(), range.start - piece.start, range.len())).collect();
            // The values wanted, checked for NaN and infinities as they stream past.
            let mut non_finite: Option<String> = None;
            let mut check_values = |i: usize, bytes: &[u8]| {
                let key = &parts[i].0;
                if non_finite.is_none() && !options.allow_non_finite && !finite_bytes(&file, key, bytes) {
                    non_finite = Some(key.clone());
                }
            };
            // The checksum first: a damaged file is said to be damaged, whatever part of
            // it the damage hit; a whole other file is named by its own header.
            if options.verify_checksums {
                let crc = file.checksum_with(&ranges, &mut check_values)?;
                if crc != recorded.crc32c {
                    check_identity(&file, &name, metadata).map_err(&fail)?;
                    return Err(fail(format!(
                        "its CRC32C is {crc:08x}, the metadata records {:08x}: the file is damaged or not this \
                         checkpoint's",
                        recorded.crc32c
                    )));
                }
            } else if !options.allow_non_finite {
                for (i, (key, start, len)) in ranges.iter().enumerate() {
                    check_values(i, &file.read_bytes(key, *start, *len)?);
                }
            }
            check_identity(&file, &name, metadata).map_err(&fail)?;
            let starts: BTreeMap<String, usize> = file
                .user_metadata()
                .and_then(|m| m.get(header::STARTS))
                .and_then(|s| serde_json::from_str(s).ok())
                .ok_or_else(|| fail("its header does not say where its pieces start".into()))?;
            for (key, piece, _) in &parts {
                let entry = &self.entries[key];
                let (dtype, shape) = file.info(key)?;
                let piece_fail = |problem: String| {
                    Error::Checkpoint(CheckpointError::CheckpointTensor {
                        rank,
                        path: path.clone(),
                        fqn: key.clone(),
                        problem,
                    })
                };
                if shape != [piece.len] || safetensors::Dtype::from(dtype) != entry.dtype {
                    return Err(piece_fail(format!(
                        "the piece is {dtype:?} {shape:?}, the metadata records {:?} [{}]",
                        entry.dtype, piece.len
                    )));
                }
                if starts.get(key) != Some(&piece.start) {
                    return Err(piece_fail(format!(
                        "the metadata places this file's piece at element {}, its header at {}",
                        piece.start,
                        starts.get(key).map_or("none".into(), |s| s.to_string())
                    )));
                }
            }
            if let Some(key) = non_finite {
                return Err(Error::Checkpoint(CheckpointError::CheckpointTensor {
                    rank,
                    path: path.clone(),
                    fqn: key,
                    problem: "holds NaN or infinite values (LoadOptions::allow_non_finite loads them)".into(),
                }));
            }
            for (key, piece, range) in parts {
                sources.parts.entry(key).or_default().push((range.start, name.clone(), range.start - piece.start));
            }
            sources.files.insert(name, file);
        }
        Ok(sources)
    }
}

/// Whether the bytes of `key`'s elements hold only finite values (integers always do).
fn finite_bytes(file: &TensorFile, key: &str, bytes: &[u8]) -> bool {
    // An IEEE value is NaN or infinite exactly when its exponent bits are all ones; no
    // early exit, so the loop vectorizes.
    fn all<const N: usize>(bytes: &[u8], exponent: u64) -> bool {
        let any_bad = bytes.chunks_exact(N).fold(false, |bad, c| {
            let mut word = [0u8; 8];
            word[..N].copy_from_slice(c);
            bad | (u64::from_le_bytes(word) & exponent == exponent)
        });
        !any_bad
    }
    match file.info(key).map(|(dtype, _)| dtype) {
        Ok(DType::F32) => all::<4>(bytes, 0x7f80_0000),
        Ok(DType::F16) => all::<2>(bytes, 0x7c00),
        Ok(DType::BF16) => all::<2>(bytes, 0x7f80),
        Ok(DType::F64) => all::<8>(bytes, 0x7ff0_0000_0000_0000),
        _ => true,
    }
}

/// The checked files a rank reads its values from, and where each value's wanted
/// elements are: by tensor key, (first element, file, element offset in its piece).
struct Sources {
    rank: usize,
    device: Device,
    files: BTreeMap<String, TensorFile>,
    parts: BTreeMap<String, Vec<(usize, String, usize)>>,
}

impl Sources {
    /// Elements `[start, start + len)` of `key`'s value as `dtype`, read from the pieces
    /// that hold them.
    fn range(&self, key: &str, start: usize, len: usize, dtype: DType) -> Result<Tensor> {
        let mut parts: Vec<&(usize, String, usize)> = self.parts.get(key).into_iter().flatten().collect();
        parts.sort_by_key(|(at, _, _)| *at);
        let mut read = Vec::with_capacity(parts.len());
        let mut next = start;
        for (at, file, offset) in parts {
            let take = (start + len).saturating_sub(*at).min(len);
            if *at != next || take == 0 {
                break;
            }
            let file = &self.files[file];
            let available = file.info(key)?.1.iter().product::<usize>() - offset;
            let count = take.min(available);
            read.push(file.read_range(key, *offset, count, dtype, &self.device)?);
            next += count;
        }
        if next != start + len {
            let message = format!("`{key}`: elements {next}..{} were not checked and read", start + len);
            return Err(Error::Rank { rank: self.rank, message });
        }
        Ok(if read.len() == 1 { read.pop().expect("one") } else { Tensor::cat(&read, 0)? })
    }
}

/// Whether rank file `name`'s header names the checkpoint `metadata` describes, and the
/// rank and world size its name and the metadata say; the problem otherwise.
fn check_identity(file: &TensorFile, name: &str, metadata: &CheckpointMetadata) -> std::result::Result<(), String> {
    let Some(head) = file.user_metadata().filter(|m| m.get(header::FORMAT).is_some_and(|f| f == FORMAT)) else {
        return Err("its header does not name a candle-fsdp checkpoint".into());
    };
    let field = |key: &str| head.get(key).cloned().unwrap_or_else(|| "none".into());
    let expected = [
        (header::CHECKPOINT, metadata.checkpoint_id.clone(), "checkpoint"),
        (header::STEP, metadata.progress.step.to_string(), "step"),
        (header::RANK, rank_of_file(name).map_or("none".into(), |r| r.to_string()), "rank"),
        (header::WORLD_SIZE, metadata.world_size.to_string(), "world size"),
    ];
    let differences: Vec<String> = expected
        .iter()
        .filter(|(key, want, _)| field(key) != *want)
        .map(|(key, want, what)| format!("{what} {} where this checkpoint has {want}", field(key)))
        .collect();
    if differences.is_empty() {
        return Ok(());
    }
    Err(format!(
        "not this checkpoint's file: written for {}, rank {} of {}, step {} ({})",
        field(header::CHECKPOINT),
        field(header::RANK),
        field(header::WORLD_SIZE),
        field(header::STEP),
        differences.join(", ")
    ))
}

/// The pieces of a value cover it exactly once (from the metadata alone).
fn check_coverage(rank: usize, metadata_path: &Path, key: &str, entry: &TensorEntry) -> Result<()> {
    let numel: usize = entry.shape.iter().product();
    let mut pieces = entry.pieces.clone();
    pieces.sort_by_key(|p| p.start);
    let mut next = 0;
    for piece in &pieces {
        if piece.start != next {
            return Err(Error::Checkpoint(CheckpointError::CheckpointTensor {
                rank,
                path: metadata_path.into(),
                fqn: key.into(),
                problem: format!("pieces leave a gap or overlap at element {next}"),
            }));
        }
        next += piece.len;
    }
    if next != numel {
        return Err(Error::Checkpoint(CheckpointError::CheckpointTensor {
            rank,
            path: metadata_path.into(),
            fqn: key.into(),
            problem: format!("pieces cover {next} of {numel} elements"),
        }));
    }
    Ok(())
}

/// Restores the optimizer one variable at a time (the trait takes any subset), so at
/// most one parameter's slots are held beside the optimizer's own.
fn load_optimizer<M>(
    fsdp: &Fsdp<M>,
    optimizer: &mut dyn OptimizerState,
    saved: &OptimizerEntry,
    sources: &Sources,
    metadata_path: &Path,
) -> Result<()> {
    let rank = fsdp.rank();
    let by_var: HashMap<TensorId, ParamView> =
        fsdp.unit_views().flat_map(|unit| unit.params()).map(|param| (param.var_id(), param)).collect();
    let vars: Vec<_> = optimizer.export_state()?.vars.into_iter().map(|v| v.var).collect();
    for var in vars {
        let Some(param) = by_var.get(&var.id()) else {
            return Err(Error::Rank {
                rank,
                message: format!(
                    "the optimizer steps a {:?} variable that is no parameter shard of this model",
                    var.shape()
                ),
            });
        };
        let fqn = param.fqn();
        let names = saved.slots.get(fqn).ok_or_else(|| {
            Error::Checkpoint(CheckpointError::CheckpointMismatch {
                rank,
                path: metadata_path.into(),
                problems: vec![format!("no optimizer state for `{fqn}`")],
            })
        })?;
        let mut slots = BTreeMap::new();
        for name in names {
            let key = slot_key(name, fqn);
            // A slot is cut as its parameter is.
            let slot = param.cut(|start, len, dtype| sources.range(&key, start, len, dtype))?;
            slots.insert(name.clone(), slot);
        }
        let state = OptimizerStateDict { vars: vec![VarState { var, slots }], scalars: saved.scalars.clone() };
        optimizer.import_state(state).map_err(|e| {
            Error::Checkpoint(CheckpointError::CheckpointTensor {
                rank,
                path: metadata_path.into(),
                fqn: fqn.to_string(),
                problem: format!("the optimizer refused its saved state: {e}"),
            })
        })?;
    }
    Ok(())
}

/// Lists every way the model and the checkpoint disagree.
fn check_fits<M>(fsdp: &Fsdp<M>, metadata: &CheckpointMetadata, path: &Path) -> Result<()> {
    let mut model: BTreeMap<&str, (TensorKind, DType, &[usize])> = BTreeMap::new();
    for param in fsdp.unit_views().flat_map(|unit| unit.params()) {
        model.insert(param.fqn(), (TensorKind::Parameter, param.dtype(), param.shape()));
    }
    for buffer in fsdp.buffer_views() {
        model.insert(buffer.fqn(), (TensorKind::Buffer, buffer.dtype(), buffer.shape()));
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
    Err(Error::Checkpoint(CheckpointError::CheckpointMismatch {
        rank: fsdp.rank(),
        path: path.into(),
        problems: capped(problems),
    }))
}
