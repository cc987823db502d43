//! Checkpoints against independent references: a resumed run against the same run
//! uninterrupted (bit for bit at the same world size and strategy, within fp32 tolerance
//! at another), every world size 1..=4 saved and loaded at every other, a Hugging Face
//! export loaded by candle-nn's own `VarBuilder` into the plain model, and every kind of
//! bad input refused with an error naming the file and the FQN, leaving the previous
//! checkpoint loadable.

use candle_core::{DType, Device, Module, Tensor};
use candle_fsdp::checkpoint::{self, Checkpointer, ExportOptions, HfIndex, Progress};
use candle_fsdp::optim::{AdamW, OptimizerState, OptimizerStateDict, ParamsAdamW, SgdMomentum, SgdMomentumConfig};
use candle_fsdp::{launch, launch_each, Error, Fsdp, FsdpConfig, LaunchOptions, Shardable, ShardingStrategy, Unit};
use candle_fsdp::{CheckpointError, MisuseError};
use candle_nn::{Init, Linear, Optimizer, VarBuilder};
use fsdp_testkit::{self as common, Fault, FaultyCollectives, Snapshot};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The global batch: divisible by every world size tested, so each rank takes an equal slice.
const BATCH: usize = 12;

#[derive(Shardable)]
struct Net {
    input: Linear,
    blocks: Vec<Unit<Block>>,
    head: Linear,
    /// Not trained: exercises the buffers' path through every format.
    #[fsdp(buffer)]
    shift: Tensor,
}

#[derive(Shardable)]
struct Block {
    fc: Linear,
}

/// Sizes chosen so that no parameter splits evenly over 3 or 4 ranks.
#[derive(Clone, Copy)]
struct Dims {
    hidden: usize,
    blocks: usize,
}

const DIMS: Dims = Dims { hidden: 7, blocks: 2 };

impl Net {
    fn new(dims: Dims, shift: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        let blocks = (0..dims.blocks)
            .map(|i| {
                Ok(Unit::new(Block {
                    fc: candle_nn::linear(dims.hidden, dims.hidden, vb.pp("blocks").pp(i).pp("fc"))?,
                }))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            input: candle_nn::linear(5, dims.hidden, vb.pp("input"))?,
            blocks,
            head: candle_nn::linear(dims.hidden, 3, vb.pp("head"))?,
            shift: vb.get_with_hints(3, "shift", Init::Const(shift))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.input.forward(x)?.tanh()?;
        for block in &self.blocks {
            h = block.run(h, |b, h| b.fc.forward(&h)?.tanh()? + &h)?;
        }
        self.head.forward(&h)?.broadcast_add(&self.shift)
    }
}

/// One model's values, shared by every rank's copy.
fn snapshot(dims: Dims) -> Snapshot {
    common::build(None, DType::F32, |vb| Net::new(dims, 0.25, vb)).unwrap().2
}

fn net(snapshot: &Snapshot, dims: Dims, dtype: DType) -> Net {
    common::build(Some(snapshot), dtype, |vb| Net::new(dims, 0.25, vb)).unwrap().0
}

/// A model with other values (and another buffer) than `snapshot`'s, for loads to overwrite.
fn other_net(dims: Dims) -> Net {
    common::build(None, DType::F32, |vb| Net::new(dims, -3.0, vb)).unwrap().0
}

fn options(world: usize) -> LaunchOptions {
    LaunchOptions::new(world).timeout(Duration::from_secs(30))
}

fn config(strategy: ShardingStrategy) -> FsdpConfig {
    FsdpConfig { strategy, ..FsdpConfig::default() }
}

/// Step `step`'s slice of the global batch for `rank` of `world`.
fn batch(step: usize, rank: usize, world: usize) -> (Tensor, Tensor) {
    let rows = BATCH / world;
    let x = common::randn(100 + step as u64, &[BATCH, 5]).narrow(0, rank * rows, rows).unwrap();
    let y = common::randn(200 + step as u64, &[BATCH, 3]).narrow(0, rank * rows, rows).unwrap();
    (x, y)
}

/// What the tests train with: any optimizer whose state can be saved.
trait Trainer: OptimizerState {
    fn step_grads(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()>;
}

impl<T: Optimizer + OptimizerState> Trainer for T {
    fn step_grads(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        self.step(grads)
    }
}

#[derive(Clone, Copy, Debug)]
enum Opt {
    AdamW,
    Sgd,
}

fn optimizer(kind: Opt, fsdp: &Fsdp<Net>) -> Box<dyn Trainer> {
    let vars = fsdp.parameters();
    match kind {
        Opt::AdamW => {
            let params = ParamsAdamW { lr: 0.01, weight_decay: 0.1, ..ParamsAdamW::default() };
            Box::new(AdamW::new(vars, params).unwrap())
        }
        Opt::Sgd => Box::new(SgdMomentum::new(vars, SgdMomentumConfig { lr: 0.05, momentum: 0.9 }).unwrap()),
    }
}

fn train(fsdp: &Fsdp<Net>, opt: &mut dyn Trainer, steps: std::ops::Range<usize>) -> candle_fsdp::Result<()> {
    for step in steps {
        let (x, y) = batch(step, fsdp.rank(), fsdp.world_size());
        let out = fsdp.forward(|m| m.forward(&x))?;
        let loss = (out - y)?.sqr()?.mean_all()?;
        let grads = fsdp.backward(&loss)?;
        opt.step_grads(&grads)?;
    }
    Ok(())
}

type Values = HashMap<String, Vec<f32>>;

/// Every trained parameter's full value (gathered by all ranks, read on rank 0).
fn full_values(fsdp: &Fsdp<Net>) -> candle_fsdp::Result<Values> {
    let full = fsdp.full_parameters()?;
    Ok(full.into_iter().map(|(fqn, t)| (fqn, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect())
}

/// `steps` steps at `world` ranks from `snapshot`, uninterrupted.
fn uninterrupted(snapshot: &Snapshot, kind: Opt, world: usize, strategy: ShardingStrategy, steps: usize) -> Values {
    let per_rank = launch(options(world), |ctx| {
        let fsdp = Fsdp::wrap(net(snapshot, DIMS, DType::F32), ctx.comm.clone(), config(strategy))?;
        let mut opt = optimizer(kind, &fsdp);
        train(&fsdp, opt.as_mut(), 0..steps)?;
        full_values(&fsdp)
    })
    .unwrap();
    per_rank.into_iter().next().unwrap()
}

/// `k` steps at `(n, n_strategy)`, a save, then fresh ranks at `(m, m_strategy)` built
/// with other values load it and take the remaining `steps - k`.
#[allow(clippy::too_many_arguments)]
fn resumed(
    snapshot: &Snapshot,
    kind: Opt,
    dir: &Path,
    (n, n_strategy): (usize, ShardingStrategy),
    (m, m_strategy): (usize, ShardingStrategy),
    k: usize,
    steps: usize,
) -> Values {
    let checkpointer = Checkpointer::new(dir);
    let progress = Progress { step: k as u64, scheduler: None, extras: serde_json::json!({ "next_batch": k }) };
    launch(options(n), |ctx| {
        let fsdp = Fsdp::wrap(net(snapshot, DIMS, DType::F32), ctx.comm.clone(), config(n_strategy))?;
        let mut opt = optimizer(kind, &fsdp);
        train(&fsdp, opt.as_mut(), 0..k)?;
        checkpointer.save(&fsdp, Some(opt.as_ref()), &progress)
    })
    .unwrap();
    let path = checkpointer.latest().unwrap().expect("a checkpoint was saved");
    let per_rank = launch(options(m), |ctx| {
        let fsdp = Fsdp::wrap(other_net(DIMS), ctx.comm.clone(), config(m_strategy))?;
        let mut opt = optimizer(kind, &fsdp);
        let restored = checkpoint::load(&fsdp, Some(opt.as_mut()), &path)?;
        assert_eq!(restored, progress);
        let next = restored.extras["next_batch"].as_u64().unwrap() as usize;
        train(&fsdp, opt.as_mut(), next..steps)?;
        full_values(&fsdp)
    })
    .unwrap();
    per_rank.into_iter().next().unwrap()
}

fn assert_values_close(actual: &Values, expected: &Values, exact: bool, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}");
    for (fqn, want) in expected {
        let got = &actual[fqn];
        if exact {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(got), bits(want), "{what}: `{fqn}` differs");
        } else {
            let t = |v: &Vec<f32>| Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
            common::assert_close(&t(got), &t(want), RESHARD_ATOL, RESHARD_RTOL, &format!("{what}: `{fqn}`"));
        }
    }
}

/// A resume at another world size sums the gradients in another order, so values agree
/// to fp32 rounding, amplified a little by AdamW's normalisation.
const RESHARD_ATOL: f64 = 1e-6;
const RESHARD_RTOL: f64 = 1e-5;

#[test]
fn a_resume_at_the_same_world_size_and_strategy_is_bit_identical() {
    let snapshot = snapshot(DIMS);
    for kind in [Opt::AdamW, Opt::Sgd] {
        for world in [1, 2, 3] {
            for strategy in ShardingStrategy::ALL {
                let dir = tempfile::tempdir().unwrap();
                let what = format!("{kind:?}, world {world}, {strategy}");
                let reference = uninterrupted(&snapshot, kind, world, strategy, 5);
                let resumed = resumed(&snapshot, kind, dir.path(), (world, strategy), (world, strategy), 2, 5);
                assert_values_close(&resumed, &reference, true, &what);
            }
        }
    }
}

#[test]
fn a_checkpoint_saved_at_any_world_size_resumes_at_any_other() {
    let snapshot = snapshot(DIMS);
    for n in 1..=4 {
        let strategy = ShardingStrategy::ALL[n % 3];
        let reference = uninterrupted(&snapshot, Opt::AdamW, n, strategy, 4);
        for m in 1..=4 {
            let dir = tempfile::tempdir().unwrap();
            let load_strategy = ShardingStrategy::ALL[(n + m) % 3];
            let resumed = resumed(&snapshot, Opt::AdamW, dir.path(), (n, strategy), (m, load_strategy), 2, 4);
            let what = format!("saved at {n} ranks ({strategy}), resumed at {m} ({load_strategy})");
            assert_values_close(&resumed, &reference, n == m, &what);
        }
    }
}

#[test]
fn a_checkpoint_resumes_under_every_strategy_with_both_optimizers() {
    let snapshot = snapshot(DIMS);
    for kind in [Opt::AdamW, Opt::Sgd] {
        for saved in ShardingStrategy::ALL {
            let reference = uninterrupted(&snapshot, kind, 2, saved, 4);
            for loaded in ShardingStrategy::ALL {
                let dir = tempfile::tempdir().unwrap();
                let resumed = resumed(&snapshot, kind, dir.path(), (2, saved), (3, loaded), 2, 4);
                let what = format!("{kind:?}: saved at 2 ranks ({saved}), resumed at 3 ({loaded})");
                assert_values_close(&resumed, &reference, false, &what);
            }
        }
    }
}

/// Saves at `world` ranks after one step; returns the checkpoint's directory.
fn save_one(snapshot: &Snapshot, dir: &Path, world: usize, step: u64) -> std::path::PathBuf {
    let progress = Progress { step, ..Progress::default() };
    let paths = launch(options(world), |ctx| {
        let fsdp = Fsdp::wrap(net(snapshot, DIMS, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
        let mut opt = optimizer(Opt::AdamW, &fsdp);
        train(&fsdp, opt.as_mut(), 0..1)?;
        Checkpointer::new(dir).save(&fsdp, Some(opt.as_ref()), &progress)
    })
    .unwrap();
    paths[0].clone()
}

/// Loads `path` at `world` ranks into `build()`'s model; every rank's result.
fn load_each(world: usize, path: &Path, build: impl Fn() -> Net + Sync) -> Vec<candle_fsdp::Result<()>> {
    launch_each(options(world), |ctx| {
        let fsdp = Fsdp::wrap(build(), ctx.comm.clone(), FsdpConfig::default())?;
        let mut opt = optimizer(Opt::AdamW, &fsdp);
        checkpoint::load(&fsdp, Some(opt.as_mut()), path).map(drop)
    })
    .unwrap()
}

/// Every rank failed, and one rank's own message (the rank that found the problem; the
/// others name it) contains each of `needles`.
fn assert_all_fail(results: &[candle_fsdp::Result<()>], needles: &[&str]) {
    for (rank, result) in results.iter().enumerate() {
        assert!(result.is_err(), "rank {rank} loaded a bad checkpoint");
    }
    let messages: Vec<String> = results.iter().map(|r| r.as_ref().unwrap_err().to_string()).collect();
    assert!(
        messages.iter().any(|m| needles.iter().all(|n| m.contains(n))),
        "no rank's error holds all of {needles:?}: {messages:#?}"
    );
}

#[test]
fn a_checkpoint_of_another_model_is_refused_naming_every_difference() {
    let snapshot = snapshot(DIMS);
    let dir = tempfile::tempdir().unwrap();
    let path = save_one(&snapshot, dir.path(), 2, 1);
    let more = Dims { blocks: 3, ..DIMS };
    let results = load_each(2, &path, || other_net(more));
    assert_all_fail(&results, &["metadata.json", "`blocks.2.fc.weight`: in the model, not in the checkpoint"]);
    let fewer = Dims { blocks: 1, ..DIMS };
    let results = load_each(2, &path, || other_net(fewer));
    assert_all_fail(&results, &["`blocks.1.fc.bias`: in the checkpoint, not in the model"]);
    let wider = Dims { hidden: 8, ..DIMS };
    let results = load_each(3, &path, || other_net(wider));
    assert_all_fail(&results, &["`input.weight`: shape [8, 5] in the model, [7, 5] in the checkpoint"]);
    let results = load_each(1, &path, || common::build(None, DType::F64, |vb| Net::new(DIMS, 0.0, vb)).unwrap().0);
    assert_all_fail(&results, &["`head.bias`: dtype F64 in the model, F32 in the checkpoint"]);
}

#[test]
fn damaged_and_incomplete_checkpoints_are_refused_naming_the_file() {
    let snapshot = snapshot(DIMS);
    let damage = |how: &dyn Fn(&Path), needles: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let path = save_one(&snapshot, dir.path(), 2, 1);
        how(&path);
        let results = load_each(3, &path, || other_net(DIMS));
        assert_all_fail(&results, needles);
    };
    // A truncated rank file.
    damage(
        &|p| {
            let file = p.join("rank-00001.safetensors");
            let len = std::fs::metadata(&file).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len - 10).unwrap();
        },
        &["rank-00001.safetensors", "truncated"],
    );
    // A corrupted header, same size.
    damage(
        &|p| {
            let file = p.join("rank-00000.safetensors");
            let mut bytes = std::fs::read(&file).unwrap();
            bytes[8..16].copy_from_slice(b"garbage!");
            std::fs::write(&file, bytes).unwrap();
        },
        &["rank-00000.safetensors", "not a readable safetensors header"],
    );
    // A rank file missing.
    damage(
        &|p| std::fs::remove_file(p.join("rank-00001.safetensors")).unwrap(),
        &["rank-00001.safetensors", "missing"],
    );
    // No metadata: what an interrupted save leaves.
    damage(&|p| std::fs::remove_file(p.join("metadata.json")).unwrap(), &["not a complete checkpoint"]);
    // Metadata that does not parse.
    damage(
        &|p| std::fs::write(p.join("metadata.json"), b"{\"format\": 3").unwrap(),
        &["metadata.json", "not valid JSON"],
    );
}

#[test]
fn the_metadata_of_another_model_is_refused() {
    let snapshot = snapshot(DIMS);
    let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let path = save_one(&snapshot, ours.path(), 2, 1);
    let bigger = Dims { blocks: 3, hidden: 9 };
    let other = common::build(None, DType::F32, |vb| Net::new(bigger, 0.0, vb)).unwrap().2;
    let progress = Progress { step: 1, ..Progress::default() };
    let other_path = launch(options(2), |ctx| {
        let fsdp = Fsdp::wrap(net(&other, bigger, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
        Checkpointer::new(theirs.path()).save(&fsdp, None, &progress)
    })
    .unwrap()[0]
        .clone();
    std::fs::copy(other_path.join("metadata.json"), path.join("metadata.json")).unwrap();
    let results = load_each(2, &path, || other_net(DIMS));
    assert_all_fail(&results, &["rank-0000", "not this checkpoint's file"]);
}

/// An optimizer whose state cannot be exported on one rank: a rank failing mid-save.
struct FailingOnRank {
    inner: AdamW,
    fail: bool,
}

impl OptimizerState for FailingOnRank {
    fn export_state(&self) -> candle_core::Result<OptimizerStateDict> {
        if self.fail {
            candle_core::bail!("the optimizer's state is on a device that went away")
        }
        self.inner.export_state()
    }
    fn import_state(&mut self, state: OptimizerStateDict) -> candle_core::Result<()> {
        self.inner.import_state(state)
    }
}

#[test]
fn a_rank_failing_during_a_save_fails_every_rank_and_keeps_the_previous_checkpoint() {
    let snapshot = snapshot(DIMS);
    let dir = tempfile::tempdir().unwrap();
    let first = save_one(&snapshot, dir.path(), 2, 1);
    let checkpointer = Checkpointer::new(dir.path());

    // Rank 1's optimizer fails before anything is written.
    let results = launch_each(options(2), |ctx| {
        let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
        let params = ParamsAdamW::default();
        let opt = FailingOnRank { inner: AdamW::new(fsdp.parameters(), params)?, fail: ctx.rank == 1 };
        checkpointer.save(&fsdp, Some(&opt), &Progress { step: 2, ..Progress::default() })
    })
    .unwrap();
    let own = results[1].as_ref().unwrap_err().to_string();
    assert!(own.contains("went away"), "{own}");
    match &results[0] {
        Err(Error::Checkpoint(CheckpointError::CheckpointPeerFailed {
            rank: 0, failed, kept_previous: true, ..
        })) => assert_eq!(failed, &[1]),
        other => panic!("rank 0 should name rank 1: {other:?}"),
    }

    // Rank 1 dies after writing its file, before the checkpoint is committed.
    let results = launch_each(options(2), |ctx| {
        let comm: Arc<dyn candle_fsdp::dist::Collectives> = if ctx.rank == 1 {
            Arc::new(FaultyCollectives::new(ctx.comm.clone(), Fault::PanicAt("writing the rank files")))
        } else {
            ctx.comm.clone()
        };
        let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), comm, FsdpConfig::default())?;
        let opt = optimizer(Opt::AdamW, &fsdp);
        checkpointer.save(&fsdp, Some(opt.as_ref()), &Progress { step: 3, ..Progress::default() })
    })
    .unwrap();
    assert!(matches!(results[1], Err(Error::RankPanicked { rank: 1, .. })), "{:?}", results[1].as_ref().err());
    assert!(results[0].is_err(), "rank 0 must not report a save rank 1 did not finish");

    // Neither failed save is visible; the partial directory does not load; the first does.
    assert_eq!(checkpointer.checkpoints().unwrap(), vec![(1, first.clone())]);
    let partial = dir.path().join(".step-00000003.partial");
    assert!(partial.join("rank-00000.safetensors").is_file(), "rank 0 wrote its file before rank 1 died");
    assert_all_fail(&load_each(2, &partial, || other_net(DIMS)), &["not a complete checkpoint"]);
    for result in load_each(2, &first, || other_net(DIMS)) {
        result.unwrap();
    }
}

#[test]
fn only_the_last_k_checkpoints_are_kept_and_a_save_mid_step_is_refused() {
    let snapshot = snapshot(DIMS);
    let dir = tempfile::tempdir().unwrap();
    let checkpointer = Checkpointer::new(dir.path()).keep_last(2);
    launch(options(2), |ctx| {
        let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
        let mut opt = optimizer(Opt::Sgd, &fsdp);
        for step in 1..=4 {
            train(&fsdp, opt.as_mut(), step - 1..step)?;
            checkpointer.save(&fsdp, Some(opt.as_ref()), &Progress { step: step as u64, ..Progress::default() })?;
        }
        let (x, _) = batch(0, ctx.rank, 2);
        let _out = fsdp.forward(|m| m.forward(&x))?;
        match checkpointer.save(&fsdp, None, &Progress::default()) {
            Err(Error::Misuse(MisuseError::StepInProgress { .. })) => Ok(()),
            other => panic!("a save between forward and backward: {other:?}"),
        }
    })
    .unwrap();
    let steps: Vec<u64> = checkpointer.checkpoints().unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [3, 4]);
}

/// Trains 2 steps at `world` ranks, exports; returns rank 0's inference output on a fixed
/// input and the exported files.
fn train_and_export(
    snapshot: &Snapshot,
    dir: &Path,
    world: usize,
    export: &ExportOptions,
) -> (Tensor, Vec<std::path::PathBuf>) {
    let x = common::randn(7, &[4, 5]);
    let results = launch(options(world), |ctx| {
        let fsdp = Fsdp::wrap(net(snapshot, DIMS, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
        let mut opt = optimizer(Opt::AdamW, &fsdp);
        train(&fsdp, opt.as_mut(), 0..2)?;
        let files = checkpoint::export_hf(&fsdp, dir, export)?;
        let out = fsdp.forward_inference(|m| m.forward(&x))?;
        Ok((out, files))
    })
    .unwrap();
    results.into_iter().next().unwrap()
}

/// The plain model built by candle-nn's `VarBuilder` from the exported files.
fn plain_from(files: &[std::path::PathBuf], dtype: DType) -> Net {
    // SAFETY: the mapped files belong to this test and nothing writes them while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, &Device::Cpu) }.unwrap();
    Net::new(DIMS, 0.0, vb).unwrap()
}

#[test]
fn an_export_loads_into_the_plain_model_with_equal_outputs() {
    let snapshot = snapshot(DIMS);
    let dir = tempfile::tempdir().unwrap();
    let (fsdp_out, files) = train_and_export(&snapshot, dir.path(), 3, &ExportOptions::default());
    assert_eq!(files, [dir.path().join("model.safetensors")]);
    let plain = plain_from(&files, DType::F32).forward(&common::randn(7, &[4, 5])).unwrap();
    common::assert_close(&plain, &fsdp_out, 0.0, 0.0, "plain model from the export");
    // Parameters and the buffer, each once, under the model's FQNs.
    let names = candle_core::safetensors::load(&files[0], &Device::Cpu).unwrap();
    let mut names: Vec<String> = names.into_keys().collect();
    names.sort();
    let expected = ["blocks.0.fc.bias", "blocks.0.fc.weight", "blocks.1.fc.bias", "blocks.1.fc.weight"];
    let expected: Vec<&str> =
        expected.into_iter().chain(["head.bias", "head.weight", "input.bias", "input.weight", "shift"]).collect();
    assert_eq!(names, expected);
}

#[test]
fn a_large_export_is_split_with_a_hugging_face_index() {
    let snapshot = snapshot(DIMS);
    let dir = tempfile::tempdir().unwrap();
    // Every tensor is at most 7 * 7 * 4 = 196 bytes; 200 bytes per file splits the model.
    let split = ExportOptions { max_file_bytes: 200, ..ExportOptions::default() };
    let (fsdp_out, mut files) = train_and_export(&snapshot, dir.path(), 2, &split);
    assert_eq!(files.pop(), Some(dir.path().join("model.safetensors.index.json")));
    assert!(files.len() > 2, "{files:?}");
    let count = files.len();
    for (i, file) in files.iter().enumerate() {
        assert_eq!(
            file.file_name().unwrap().to_str().unwrap(),
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        );
    }
    let index: HfIndex =
        serde_json::from_slice(&std::fs::read(dir.path().join("model.safetensors.index.json")).unwrap()).unwrap();
    let params = 7 * 5 + 7 + DIMS.blocks * (7 * 7 + 7) + 3 * 7 + 3 + 3;
    assert_eq!(index.metadata.total_size, 4 * params as u64);
    assert_eq!(index.weight_map.len(), 9);
    for (fqn, file) in &index.weight_map {
        let held = candle_core::safetensors::load(dir.path().join(file), &Device::Cpu).unwrap();
        assert!(held.contains_key(fqn), "{file} lacks {fqn}");
    }
    let plain = plain_from(&files, DType::F32).forward(&common::randn(7, &[4, 5])).unwrap();
    common::assert_close(&plain, &fsdp_out, 0.0, 0.0, "plain model from the split export");

    // Exporting again as one file leaves no stale index or pieces behind.
    let (_, files) = train_and_export(&snapshot, dir.path(), 2, &ExportOptions::default());
    let mut left: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, ["model.safetensors"]);
    assert_eq!(files.len(), 1);
}

#[test]
fn an_export_in_bf16_holds_the_rounded_values() {
    let snapshot = snapshot(DIMS);
    let (f32_dir, bf16_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train_and_export(&snapshot, f32_dir.path(), 2, &ExportOptions::default());
    let bf16 = ExportOptions { dtype: Some(DType::BF16), ..ExportOptions::default() };
    train_and_export(&snapshot, bf16_dir.path(), 2, &bf16);
    let full = candle_core::safetensors::load(f32_dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let half = candle_core::safetensors::load(bf16_dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    for (fqn, value) in &full {
        assert_eq!(half[fqn].dtype(), DType::BF16, "{fqn}");
        let rounded = value.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        common::assert_close(&half[fqn].to_dtype(DType::F32).unwrap(), &rounded, 0.0, 0.0, fqn);
    }
}

/// Loads the export in `dir` into fresh models with other values at `world` ranks and
/// returns rank 0's inference output.
fn pretrained_output(dir: &Path, world: usize, strategy: ShardingStrategy) -> candle_fsdp::Result<Tensor> {
    let x = common::randn(7, &[4, 5]);
    let outputs = launch(options(world), |ctx| {
        let fsdp = Fsdp::wrap(other_net(DIMS), ctx.comm.clone(), config(strategy))?;
        checkpoint::load_pretrained(&fsdp, dir)?;
        fsdp.forward_inference(|m| m.forward(&x))
    })?;
    Ok(outputs.into_iter().next().unwrap())
}

#[test]
fn pretrained_weights_load_at_any_world_size_from_one_file_or_an_index() {
    let snapshot = snapshot(DIMS);
    let (single, split) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (expected, _) = train_and_export(&snapshot, single.path(), 2, &ExportOptions::default());
    train_and_export(&snapshot, split.path(), 2, &ExportOptions { max_file_bytes: 200, ..ExportOptions::default() });
    for (world, strategy) in
        [(1, ShardingStrategy::NoShard), (3, ShardingStrategy::FullShard), (4, ShardingStrategy::ShardGradOp)]
    {
        for dir in [single.path(), split.path()] {
            let out = pretrained_output(dir, world, strategy).unwrap();
            common::assert_close(&out, &expected, 0.0, 0.0, &format!("world {world}, {}", dir.display()));
        }
    }
    // A file given directly, and bf16 weights into an f32 model.
    let bf16 = tempfile::tempdir().unwrap();
    train_and_export(
        &snapshot,
        bf16.path(),
        2,
        &ExportOptions { dtype: Some(DType::BF16), ..ExportOptions::default() },
    );
    let out = pretrained_output(&bf16.path().join("model.safetensors"), 2, ShardingStrategy::FullShard).unwrap();
    let plain =
        plain_from(&[bf16.path().join("model.safetensors")], DType::F32).forward(&common::randn(7, &[4, 5])).unwrap();
    common::assert_close(&out, &plain, 0.0, 0.0, "bf16 weights in an f32 model");
}

#[test]
fn pretrained_weights_that_do_not_fit_are_refused_naming_file_and_fqn() {
    let snapshot = snapshot(DIMS);
    let dir = tempfile::tempdir().unwrap();
    train_and_export(&snapshot, dir.path(), 2, &ExportOptions::default());
    let file = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let refused = |tensors: &HashMap<String, Tensor>, needles: &[&str]| {
        let bad = tempfile::tempdir().unwrap();
        candle_core::safetensors::save(tensors, bad.path().join("model.safetensors")).unwrap();
        let message = pretrained_output(bad.path(), 2, ShardingStrategy::FullShard).unwrap_err().to_string();
        for needle in needles {
            assert!(message.contains(needle), "`{needle}` is not in: {message}");
        }
    };
    let head = tensors.remove("head.weight").unwrap();
    refused(&tensors, &["`head.weight`: in the model, not in the checkpoint"]);
    tensors.insert("head.weight".into(), head.t().unwrap().contiguous().unwrap());
    refused(&tensors, &["`head.weight`: shape [3, 7] in the model, [7, 3] in the checkpoint"]);
    tensors.insert("head.weight".into(), head);
    tensors.insert("lm_head.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    refused(&tensors, &["`lm_head.weight`: in the checkpoint, not in the model"]);

    // A truncated file, and an index naming a file that is not there.
    let truncated = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(truncated.path().join("model.safetensors"), &bytes[..bytes.len() - 4]).unwrap();
    let message = pretrained_output(truncated.path(), 2, ShardingStrategy::FullShard).unwrap_err().to_string();
    assert!(message.contains("model.safetensors") && message.contains("truncated"), "{message}");
    let split = tempfile::tempdir().unwrap();
    let (_, files) = train_and_export(
        &snapshot,
        split.path(),
        2,
        &ExportOptions { max_file_bytes: 200, ..ExportOptions::default() },
    );
    std::fs::remove_file(&files[1]).unwrap();
    let gone = files[1].file_name().unwrap().to_str().unwrap();
    let message = pretrained_output(split.path(), 2, ShardingStrategy::FullShard).unwrap_err().to_string();
    assert!(message.contains(gone) && message.contains("no such file"), "{message}");
}

#[test]
fn the_scheduler_state_and_the_callers_extras_come_back_at_another_world_size() {
    use candle_fsdp::optim::StepLr;
    let snapshot = snapshot(DIMS);
    let dir = tempfile::tempdir().unwrap();
    // A scheduler three epochs in: its learning rate has been cut once.
    let progress = launch(options(2), |ctx| {
        let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
        let mut opt = SgdMomentum::new(fsdp.parameters(), SgdMomentumConfig { lr: 0.05, momentum: 0.9 })?;
        let mut scheduler = StepLr::new(2, 0.5);
        for _ in 0..3 {
            scheduler.step(&mut opt);
        }
        let progress = Progress {
            step: 3,
            scheduler: Some(serde_json::to_value(scheduler).unwrap()),
            extras: serde_json::json!({ "data_position": 1234, "seed": 7 }),
        };
        Checkpointer::new(dir.path()).save(&fsdp, Some(&opt), &progress)?;
        Ok((progress, opt.learning_rate()))
    })
    .unwrap();
    let (saved, lr_saved) = progress[0].clone();
    let path = Checkpointer::new(dir.path()).latest().unwrap().expect("a checkpoint");
    let restored = launch(options(3), |ctx| {
        let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
        let mut opt = SgdMomentum::new(fsdp.parameters(), SgdMomentumConfig { lr: 0.05, momentum: 0.9 })?;
        let progress = checkpoint::load(&fsdp, Some(&mut opt), &path)?;
        let mut scheduler: StepLr = serde_json::from_value(progress.scheduler.clone().unwrap()).unwrap();
        // The restored scheduler sets the optimizer's rate where the saved run had it.
        scheduler.step(&mut opt);
        Ok((progress, opt.learning_rate()))
    })
    .unwrap();
    for (rank, (progress, lr)) in restored.into_iter().enumerate() {
        assert_eq!(progress.step, 3, "rank {rank}");
        assert_eq!(progress.extras, saved.extras, "rank {rank}");
        assert_eq!(progress.scheduler, saved.scheduler, "rank {rank}");
        // Epoch 4 of a step-2 schedule: 0.05 · 0.5².
        assert_eq!((lr_saved, lr), (0.025, 0.0125), "rank {rank}");
    }
}

/// What a launcher's restart does (torchrun `--max-restarts`): one rank dies mid-run,
/// between two checkpoints; the whole job runs again with the same code, resumes from the
/// newest checkpoint, and ends with the parameters of a run that was never interrupted,
/// bit for bit (same world size).
#[test]
fn a_job_restarted_after_a_rank_died_mid_run_ends_where_the_uninterrupted_run_ends() {
    const STEPS: usize = 9;
    const SAVE_EVERY: usize = 3;
    const DIES_AT: usize = 7;
    let snapshot = snapshot(DIMS);
    let (world, strategy) = (2, ShardingStrategy::FullShard);
    let reference = uninterrupted(&snapshot, Opt::AdamW, world, strategy, STEPS);
    let dir = tempfile::tempdir().unwrap();
    let checkpointer = Checkpointer::new(dir.path()).keep_last(2);
    // The job's code, the same in every attempt: resume if a checkpoint exists, train,
    // save every few steps. `crash` makes rank 1 die at one step of the first attempt.
    let job = |crash: bool| {
        launch(options(world), |ctx| {
            let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), ctx.comm.clone(), config(strategy))?;
            let mut opt = optimizer(Opt::AdamW, &fsdp);
            let start = match checkpointer.latest()? {
                Some(path) => checkpoint::load(&fsdp, Some(opt.as_mut()), &path)?.step as usize,
                None => 0,
            };
            for step in start..STEPS {
                if crash && step == DIES_AT && ctx.rank == 1 {
                    panic!("rank 1 killed at step {step}");
                }
                train(&fsdp, opt.as_mut(), step..step + 1)?;
                if (step + 1) % SAVE_EVERY == 0 {
                    let progress = Progress { step: step as u64 + 1, scheduler: None, extras: serde_json::json!({}) };
                    checkpointer.save(&fsdp, Some(opt.as_ref()), &progress)?;
                }
            }
            Ok((start, full_values(&fsdp)?))
        })
    };
    let first = job(true).expect_err("the first attempt dies");
    assert!(first.to_string().contains("rank 1 killed at step 7"), "{first}");
    let second = job(false).unwrap();
    let (start, values) = &second[0];
    assert_eq!(*start, 6, "the restart resumes from the last checkpoint before the death");
    assert_values_close(values, &reference, true, "after the restart");
}

/// Where tensor `key`'s bytes lie in the safetensors file `path`.
fn tensor_bytes_at(path: &Path, key: &str) -> std::ops::Range<usize> {
    let bytes = std::fs::read(path).unwrap();
    let (n, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let (start, end) = header.info(key).unwrap().data_offsets;
    8 + n + start..8 + n + end
}

/// Rewrites `file` of checkpoint `dir` with `edit`, and records its new size and
/// checksum in the metadata, as a save that wrote those bytes would have.
fn rewrite_consistently(dir: &Path, file: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join(file);
    let mut bytes = std::fs::read(&path).unwrap();
    edit(&mut bytes);
    std::fs::write(&path, &bytes).unwrap();
    let metadata_path = dir.join("metadata.json");
    let mut metadata: serde_json::Value = serde_json::from_slice(&std::fs::read(&metadata_path).unwrap()).unwrap();
    metadata["files"][file] = serde_json::json!({ "bytes": bytes.len(), "crc32c": crc32c::crc32c(&bytes) });
    std::fs::write(&metadata_path, serde_json::to_vec(&metadata).unwrap()).unwrap();
}

#[test]
fn files_that_are_not_the_checkpoints_own_are_refused_before_any_value_is_set() {
    let snapshot = snapshot(DIMS);
    // Two checkpoints of one run, steps 1 and 2, at 2 ranks.
    let saved = tempfile::tempdir().unwrap();
    launch(options(2), |ctx| {
        let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
        let mut opt = optimizer(Opt::AdamW, &fsdp);
        let checkpointer = Checkpointer::new(saved.path());
        for step in 1..=2 {
            train(&fsdp, opt.as_mut(), step - 1..step)?;
            checkpointer.save(&fsdp, Some(opt.as_ref()), &Progress { step: step as u64, ..Progress::default() })?;
        }
        Ok(())
    })
    .unwrap();
    let step2 = saved.path().join("step-00000002");
    let damage = |how: &dyn Fn(&Path), needles: &[&str]| {
        let copy = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&step2).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
        how(copy.path());
        // Loaded at the same world size (each rank reads its own file) and at another.
        for world in [2, 3] {
            assert_all_fail(&load_each(world, copy.path(), || other_net(DIMS)), needles);
        }
    };
    let (rank0, rank1) = ("rank-00000.safetensors", "rank-00001.safetensors");
    // The two rank files swapped.
    damage(
        &|p| {
            std::fs::rename(p.join(rank0), p.join("swap")).unwrap();
            std::fs::rename(p.join(rank1), p.join(rank0)).unwrap();
            std::fs::rename(p.join("swap"), p.join(rank1)).unwrap();
        },
        &["rank-0000", "not this checkpoint's file"],
    );
    // Rank 1's file replaced by its file of step 1 (the same size).
    damage(
        &|p| {
            std::fs::copy(saved.path().join("step-00000001").join(rank1), p.join(rank1)).unwrap();
        },
        &["rank-00001.safetensors", "step 1 where this checkpoint has 2"],
    );
    // Two pieces' files swapped in the metadata (with their lengths, which the files
    // would give away otherwise): each file's piece is placed where the other's starts.
    damage(
        &|p| {
            let path = p.join("metadata.json");
            let mut metadata: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let pieces = &mut metadata["tensors"]["blocks.0.fc.weight"]["pieces"];
            for key in ["file", "len"] {
                let first = pieces[0][key].clone();
                pieces[0][key] = pieces[1][key].clone();
                pieces[1][key] = first;
            }
            pieces[1]["start"] = pieces[0]["len"].clone();
            std::fs::write(&path, serde_json::to_vec(&metadata).unwrap()).unwrap();
        },
        &["blocks.0.fc.weight", "places this file's piece at element"],
    );
    // A byte flipped inside a parameter, and inside an optimizer moment.
    for key in ["blocks.1.fc.weight", "optimizer/exp_avg_sq/head.weight"] {
        damage(
            &|p| {
                let path = p.join(rank1);
                let at = tensor_bytes_at(&path, key).start + 1;
                let mut bytes = std::fs::read(&path).unwrap();
                bytes[at] ^= 0x10;
                std::fs::write(&path, bytes).unwrap();
            },
            &["rank-00001.safetensors", "CRC32C", "damaged"],
        );
    }
    // A NaN in a parameter, with a checksum that matches it: refused unless asked for.
    let with_nan = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&step2).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), with_nan.path().join(entry.file_name())).unwrap();
    }
    rewrite_consistently(with_nan.path(), rank0, |bytes| {
        let at = tensor_bytes_at(&with_nan.path().join(rank0), "input.weight").start;
        bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert_all_fail(&load_each(2, with_nan.path(), || other_net(DIMS)), &["input.weight", "NaN"]);
    let allowed = launch(options(2), |ctx| {
        let fsdp = Fsdp::wrap(other_net(DIMS), ctx.comm.clone(), FsdpConfig::default())?;
        let options = checkpoint::LoadOptions { allow_non_finite: true, ..checkpoint::LoadOptions::default() };
        checkpoint::load_with(&fsdp, None, with_nan.path(), &options)?;
        let values = fsdp.full_parameters()?;
        Ok(values.into_iter().find(|(fqn, _)| fqn == "input.weight").unwrap().1)
    })
    .unwrap();
    assert!(allowed[0].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0].is_nan());

    // Nothing was set by a refused load: the model keeps the values it was built with.
    let results = launch_each(options(2), |ctx| {
        let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
        let before = fsdp.full_parameters()?;
        assert!(checkpoint::load(&fsdp, None, with_nan.path()).is_err());
        let after = fsdp.full_parameters()?;
        for ((fqn, a), (_, b)) in before.iter().zip(&after) {
            common::assert_close(b, a, 0.0, 0.0, &format!("`{fqn}` after a refused load"));
        }
        Ok(())
    })
    .unwrap();
    results.into_iter().for_each(|r| r.unwrap());
}

#[test]
fn a_restart_passes_over_a_damaged_newest_checkpoint_and_a_diverged_run_saves_nothing() {
    let snapshot = snapshot(DIMS);
    let dir = tempfile::tempdir().unwrap();
    let checkpointer = Checkpointer::new(dir.path()).keep_last(1);
    // Step 1 saved; step 2's parameters turn NaN (a diverged run): its save is refused on
    // every rank, and with --keep-last 1 step 1 stays.
    let results = launch_each(options(2), |ctx| {
        let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
        let mut opt = optimizer(Opt::AdamW, &fsdp);
        train(&fsdp, opt.as_mut(), 0..1)?;
        checkpointer.save(&fsdp, Some(opt.as_ref()), &Progress { step: 1, ..Progress::default() })?;
        let shard = &fsdp.parameters()[0];
        shard.set(&(shard.as_tensor() * f64::NAN)?)?;
        checkpointer.save(&fsdp, Some(opt.as_ref()), &Progress { step: 2, ..Progress::default() }).map(drop)
    })
    .unwrap();
    let own = results[0].as_ref().unwrap_err().to_string();
    assert!(own.contains("NaN or infinite values at step 2") && own.contains("no checkpoint is written"), "{own}");
    assert!(results[1].is_err());
    assert_eq!(checkpointer.checkpoints().unwrap().iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1]);
    drop(checkpointer);

    // A newer checkpoint, then damaged: the restart says so and resumes at step 1.
    let second = Checkpointer::new(dir.path());
    launch(options(2), |ctx| {
        let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
        let opt = optimizer(Opt::AdamW, &fsdp);
        second.save(&fsdp, Some(opt.as_ref()), &Progress { step: 5, ..Progress::default() }).map(drop)
    })
    .unwrap();
    drop(second);
    let newest = dir.path().join("step-00000005").join("rank-00001.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 1;
    std::fs::write(&newest, bytes).unwrap();
    for fall_back in [true, false] {
        let results = launch_each(options(2), |ctx| {
            let fsdp = Fsdp::wrap(other_net(DIMS), ctx.comm.clone(), FsdpConfig::default())?;
            let mut opt = optimizer(Opt::AdamW, &fsdp);
            let options = checkpoint::LoadOptions { fall_back, ..checkpoint::LoadOptions::default() };
            Checkpointer::new(dir.path()).load_latest(&fsdp, Some(opt.as_mut()), &options)
        })
        .unwrap();
        for (rank, result) in results.into_iter().enumerate() {
            match (fall_back, result) {
                (true, Ok(Some(resumed))) => {
                    assert_eq!(resumed.progress.step, 1);
                    assert_eq!(resumed.skipped.len(), 1);
                    // Rank 1 read the damaged file; rank 0 names rank 1.
                    let why = &resumed.skipped[0].1;
                    assert!(why.contains(if rank == 1 { "CRC32C" } else { "rank(s) [1]" }), "{why}");
                }
                (false, Err(_)) => {}
                (fall_back, other) => panic!("fall_back {fall_back}: {other:?}"),
            }
        }
    }
}

#[test]
fn leftovers_of_cut_short_saves_and_prunes_are_never_listed_and_are_cleaned() {
    let snapshot = snapshot(DIMS);
    let dir = tempfile::tempdir().unwrap();
    let path = save_one(&snapshot, dir.path(), 2, 1);
    // A prune cut short after its rename, and a save cut short: neither is listed.
    let pruning = dir.path().join(".step-00000001.pruning");
    std::fs::create_dir(&pruning).unwrap();
    std::fs::copy(path.join("metadata.json"), pruning.join("metadata.json")).unwrap();
    let partial = dir.path().join(".step-00000007.partial");
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join("rank-00000.safetensors"), b"half").unwrap();
    let checkpointer = Checkpointer::new(dir.path()).keep_last(1);
    assert_eq!(checkpointer.checkpoints().unwrap(), vec![(1, path.clone())]);
    // The next save removes them, and prunes step 1 by renaming it first.
    launch(options(2), |ctx| {
        let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
        checkpointer.save(&fsdp, None, &Progress { step: 2, ..Progress::default() }).map(drop)
    })
    .unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, [".lock", "step-00000002"]);
}

#[test]
fn a_save_directory_belongs_to_one_job_at_a_time() {
    let snapshot = snapshot(DIMS);
    let dir = tempfile::tempdir().unwrap();
    let prepare = |checkpointer: &Checkpointer| {
        launch(options(1), |ctx| {
            let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
            checkpointer.prepare(&fsdp)
        })
    };
    let first = Checkpointer::new(dir.path());
    prepare(&first).unwrap();
    let second = Checkpointer::new(dir.path());
    let error = prepare(&second).unwrap_err().to_string();
    assert!(error.contains("another job saves into this directory") && error.contains("process"), "{error}");
    // The lock goes with the first job's checkpointer.
    drop(first);
    prepare(&second).unwrap();
    // A file where the directory should be is found before any step.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    assert!(prepare(&Checkpointer::new(&file)).is_err());
}

#[test]
fn an_export_cut_short_at_any_file_leaves_the_earlier_export_whole() {
    let snapshot = snapshot(DIMS);
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("model");
    let split = ExportOptions {
        max_file_bytes: 200,
        files: vec![("config.json".into(), b"{\"first\": true}".to_vec())],
        ..ExportOptions::default()
    };
    let (_, files) = train_and_export(&snapshot, &export, 2, &split);
    let read_all = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut all: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
            .collect();
        all.sort();
        all
    };
    let first = read_all(&export);
    assert_eq!(first.len(), files.len(), "weights, index and config.json: {files:?}");
    // Rank 0, the writer, dies while gathering each unit in turn, and once while writing
    // the last file: the first export is there as it was, nothing else under its name.
    let later = ExportOptions { files: vec![("config.json".into(), b"{\"first\": false}".to_vec())], ..split.clone() };
    for unit in ["<root>", "blocks.0", "blocks.1"] {
        let label: &'static str = Box::leak(format!("full parameters of unit `{unit}`").into_boxed_str());
        let results = launch_each(options(2), |ctx| {
            let comm: Arc<dyn candle_fsdp::dist::Collectives> = if ctx.rank == 0 {
                Arc::new(FaultyCollectives::new(ctx.comm.clone(), Fault::PanicAt(label)))
            } else {
                ctx.comm.clone()
            };
            let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), comm, FsdpConfig::default())?;
            checkpoint::export_hf(&fsdp, &export, &later).map(drop)
        })
        .unwrap();
        assert!(results.iter().all(|r| r.is_err()), "{unit}");
        assert_eq!(read_all(&export), first, "the export after one cut short at unit {unit}");
    }
    // A folder holding other files is refused before anything is gathered.
    std::fs::write(export.join("notes.txt"), b"mine").unwrap();
    let error = launch(options(2), |ctx| {
        let fsdp = Fsdp::wrap(net(&snapshot, DIMS, DType::F32), ctx.comm.clone(), FsdpConfig::default())?;
        checkpoint::export_hf(&fsdp, &export, &later).map(drop)
    })
    .unwrap_err()
    .to_string();
    assert!(error.contains("notes.txt") && error.contains("would be lost"), "{error}");
    std::fs::remove_file(export.join("notes.txt")).unwrap();
    // A complete export replaces the earlier one whole, leaving nothing beside it.
    train_and_export(&snapshot, &export, 2, &later);
    assert_eq!(std::fs::read(export.join("config.json")).unwrap(), b"{\"first\": false}");
    let beside: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(beside, ["model"]);
}
