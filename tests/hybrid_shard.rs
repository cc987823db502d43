//! Hybrid sharding (PyTorch's `HYBRID_SHARD` and `_HYBRID_SHARD_ZERO2`): parameters
//! sharded within groups of consecutive ranks and replicated across the groups.
//!
//! Parity with one process training the global batch, as `tests/parity.rs` checks plain
//! FSDP: at world 4 in shard groups of 2 (2 x 2), at world 6 in groups of 2 (2 x 3) and of
//! 3 (3 x 2), under FULL_SHARD and SHARD_GRAD_OP, every backward prefetch mode; SGD with
//! momentum, PyTorch's fp32 tolerances (the gradients are summed in another order: within
//! a group, then across groups). Then the bytes each rank sends, counted per collective,
//! against the plan's formula; the gradient norm; checkpoints across layouts; refusals.

use candle_fsdp::ConfigError;
use fsdp_testkit as common;

use candle_core::{DType, Device, Module, Tensor};
use candle_fsdp::checkpoint::{self, Checkpointer, Progress};
use candle_fsdp::optim::{SgdMomentum, SgdMomentumConfig};
use candle_fsdp::{
    launch, BackwardPrefetch, Error, Fsdp, FsdpConfig, LaunchOptions, Plan, PlanConfig, ShardableModel,
    ShardingStrategy,
};
use candle_nn::{Optimizer, VarBuilder};
use common::{assert_close, build, Fault, FaultyCollectives, Snapshot, F32_ATOL, F32_RTOL};
use fsdp_testkit::fsdp_test_models::{AlwaysWrapNestedWrappedModule, NestedWrappedModule};
use std::collections::BTreeMap;
use std::sync::Arc;

const STEPS: usize = 3;
const OPTIMIZER: SgdMomentumConfig = SgdMomentumConfig { lr: 1e-2, momentum: 0.9 };
/// (world size, shard group size).
const LAYOUTS: [(usize, usize); 3] = [(4, 2), (6, 2), (6, 3)];

fn input(rank: usize) -> Tensor {
    common::rand(1 + rank as u64, &[4, 8])
}

trait Model: ShardableModel + Module + Sized {
    fn construct(vb: VarBuilder) -> candle_core::Result<Self>;
}

impl Model for NestedWrappedModule {
    fn construct(vb: VarBuilder) -> candle_core::Result<Self> {
        NestedWrappedModule::new(vb)
    }
}

impl Model for AlwaysWrapNestedWrappedModule {
    fn construct(vb: VarBuilder) -> candle_core::Result<Self> {
        AlwaysWrapNestedWrappedModule::new(vb)
    }
}

struct Trained {
    losses: Vec<f64>,
    norms: Vec<f64>,
    params: BTreeMap<String, Tensor>,
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// One process on the global batch `(1/W) Σ_r loss_r`, with the gradient norm of each step.
fn train_reference<M: Model>(snapshot: &Snapshot, world: usize) -> Trained {
    let (model, var_map, _) = build(Some(snapshot), DType::F32, M::construct).unwrap();
    let mut opt = SgdMomentum::new(var_map.all_vars(), OPTIMIZER).unwrap();
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for _ in 0..STEPS {
        let global = Tensor::cat(&(0..world).map(input).collect::<Vec<_>>(), 0).unwrap();
        let loss = (model.forward(&global).unwrap().sum_all().unwrap() / world as f64).unwrap();
        losses.push(scalar(&loss));
        let grads = loss.backward().unwrap();
        let squares: f64 = var_map
            .all_vars()
            .iter()
            .map(|v| scalar(&grads.get(v.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap()))
            .sum();
        norms.push(squares.sqrt());
        opt.step(&grads).unwrap();
    }
    let params = var_map.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    Trained { losses, norms, params }
}

fn train_hybrid<M: Model>(snapshot: &Snapshot, world: usize, config: FsdpConfig) -> Vec<Trained> {
    launch(LaunchOptions::new(world), |ctx| {
        let (model, _, _) = build(Some(snapshot), DType::F32, M::construct)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), config)?;
        let mut opt = SgdMomentum::new(fsdp.parameters(), OPTIMIZER)?;
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        for _ in 0..STEPS {
            let x = input(ctx.rank);
            let loss = fsdp.forward(|m| m.forward(&x))?.sum_all()?;
            losses.push(scalar(&loss));
            let mut grads = fsdp.backward(&loss)?;
            // A limit no norm reaches: the norm is measured, nothing is scaled.
            norms.push(fsdp.clip_grad_norm(&mut grads, 1e9, 2.0)?);
            opt.step(&grads)?;
        }
        Ok(Trained { losses, norms, params: fsdp.full_parameters()?.into_iter().collect() })
    })
    .unwrap()
}

fn parity<M: Model>() {
    let (_, _, snapshot) = build(None, DType::F32, M::construct).unwrap();
    let (mut worst_param, mut worst_norm) = (0f64, 0f64);
    for (world, group) in LAYOUTS {
        let reference = train_reference::<M>(&snapshot, world);
        for strategy in [ShardingStrategy::FullShard, ShardingStrategy::ShardGradOp] {
            for prefetch in BackwardPrefetch::ALL {
                let what = format!("world {world} in groups of {group}, {strategy}, {prefetch}");
                let config = FsdpConfig::default().strategy(strategy).backward_prefetch(prefetch).hybrid_shard(group);
                let ranks = train_hybrid::<M>(&snapshot, world, config);
                for step in 0..STEPS {
                    let mean = ranks.iter().map(|r| r.losses[step]).sum::<f64>() / world as f64;
                    let (actual, expected) = (
                        Tensor::new(mean, &Device::Cpu).unwrap(),
                        Tensor::new(reference.losses[step], &Device::Cpu).unwrap(),
                    );
                    assert_close(&actual, &expected, F32_ATOL, F32_RTOL, &format!("{what}: loss of step {step}"));
                }
                for (rank, trained) in ranks.iter().enumerate() {
                    for (step, (norm, expected)) in trained.norms.iter().zip(&reference.norms).enumerate() {
                        let relative = (norm - expected).abs() / expected;
                        assert!(relative < 1e-6, "{what}: rank {rank}'s norm of step {step}: {norm} vs {expected}");
                        worst_norm = worst_norm.max(relative);
                    }
                    assert_eq!(trained.params.len(), reference.params.len(), "{what}");
                    for (name, value) in &trained.params {
                        let expected = &reference.params[name];
                        assert_close(value, expected, F32_ATOL, F32_RTOL, &format!("{what}: rank {rank}'s `{name}`"));
                        let diff =
                            scalar(&(value - expected).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap());
                        worst_param = worst_param.max(diff);
                    }
                }
            }
        }
    }
    eprintln!("hybrid sharding: largest |parameter error| {worst_param:.3e}, relative norm error {worst_norm:.3e}");
}

#[test]
fn nested_wrapped_module_matches_one_process_in_every_layout_strategy_and_prefetch_mode() {
    parity::<NestedWrappedModule>();
}

#[test]
fn always_wrap_nested_module_matches_one_process_in_every_layout_strategy_and_prefetch_mode() {
    parity::<AlwaysWrapNestedWrappedModule>();
}

/// Bytes one rank sent in one step, from the inputs of its collectives: ring all-gathers
/// and reduce-scatters within the shard group, ring all-reduces across the replicas. The
/// inputs themselves are first checked against what FSDP must move, from the parameter
/// sizes: every unit's shard (each parameter padded to a multiple of the group, f32)
/// gathered in forward, and again in backward under FULL_SHARD except the root's; the
/// unit's padded gradients reduce-scattered; the reduced shard all-reduced.
fn sent_in_one_step(world: usize, group: usize, strategy: ShardingStrategy) -> (usize, usize) {
    let (_, _, snapshot) = build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let ranks = launch(LaunchOptions::new(world), |ctx| {
        let (model, _, _) = build(Some(&snapshot), DType::F32, NestedWrappedModule::new)?;
        let comm = Arc::new(FaultyCollectives::new(ctx.comm.clone(), Fault::None));
        let config = FsdpConfig::default().strategy(strategy).hybrid_shard(group);
        let fsdp = Fsdp::wrap(model, comm.clone(), config)?;
        let before = [comm.bytes("all_gather"), comm.bytes("reduce_scatter"), comm.bytes("all_reduce")];
        let x = input(ctx.rank);
        fsdp.backward(&fsdp.forward(|m| m.forward(&x))?.sum_all()?)?;
        let after = [comm.bytes("all_gather"), comm.bytes("reduce_scatter"), comm.bytes("all_reduce")];
        let [gathered, scattered, reduced] = [0, 1, 2].map(|i| after[i] - before[i]);
        let shard_bytes: Vec<usize> = fsdp
            .diagnostics()
            .units()
            .iter()
            .map(|(_, fqns)| fqns.iter().map(|f| snapshot.0[f].elem_count().div_ceil(group) * 4).sum())
            .collect();
        let all: usize = shard_bytes.iter().sum();
        let regathered = if strategy == ShardingStrategy::FullShard { all - shard_bytes[0] } else { 0 };
        assert_eq!(gathered, all + regathered, "all-gather inputs");
        assert_eq!(scattered, all * group, "reduce-scatter inputs");
        assert_eq!(reduced, all, "all-reduce inputs across the replicas");
        let replicas = world / group;
        let within = gathered * (group - 1) + scattered * (group - 1) / group;
        Ok((within, 2 * reduced * (replicas - 1) / replicas))
    })
    .unwrap();
    assert!(ranks.iter().all(|r| *r == ranks[0]), "every rank sends as much: {ranks:?}");
    ranks[0]
}

#[test]
fn the_bytes_sent_within_and_across_groups_are_the_plans() {
    let (model, _, _) = build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let layout = candle_fsdp::model::Layout::of(&model).unwrap();
    for (world, group) in LAYOUTS {
        for strategy in [ShardingStrategy::FullShard, ShardingStrategy::ShardGradOp] {
            let config = FsdpConfig::default().strategy(strategy).hybrid_shard(group);
            let plan = Plan::new(&layout, PlanConfig::new(world, config)).unwrap();
            let (within, across) = sent_in_one_step(world, group, strategy);
            assert_eq!(within, plan.bytes_sent_per_step, "world {world} in groups of {group}, {strategy}: within");
            assert_eq!(
                across, plan.bytes_sent_across_groups_per_step,
                "world {world} in groups of {group}, {strategy}"
            );
            assert!(across > 0 && within > 0);
            // The shards are those of the group, not of the world.
            let flat = Plan::new(&layout, PlanConfig::new(group, FsdpConfig::default().strategy(strategy))).unwrap();
            assert_eq!(plan.memory.params, flat.memory.params, "a rank holds a group's shard");
        }
    }
    let text = Plan::new(&layout, PlanConfig::new(6, FsdpConfig::default().hybrid_shard(3))).unwrap().to_string();
    assert!(text.contains("within the shard group of 3 ranks") && text.contains("across the 2 replicas"), "{text}");
}

#[test]
fn a_hybrid_checkpoint_loads_into_another_layout() {
    let (_, _, snapshot) = build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let saved = launch(LaunchOptions::new(6), |ctx| {
        let (model, _, _) = build(Some(&snapshot), DType::F32, NestedWrappedModule::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().hybrid_shard(3))?;
        let mut opt = SgdMomentum::new(fsdp.parameters(), OPTIMIZER)?;
        let x = input(ctx.rank);
        opt.step(&fsdp.backward(&fsdp.forward(|m| m.forward(&x))?.sum_all()?)?)?;
        let progress = Progress { step: 1, scheduler: None, extras: serde_json::json!({}) };
        Checkpointer::new(dir.path()).save(&fsdp, Some(&opt), &progress)?;
        Ok(fsdp.full_parameters()?.into_iter().collect::<BTreeMap<_, _>>())
    })
    .unwrap();
    let path = dir.path().join("step-00000001");
    let metadata = checkpoint::read_metadata(&path).unwrap();
    // Each shard is saved once, by the first shard group (ranks 0-2).
    let first_group = ["rank-00000.safetensors", "rank-00001.safetensors", "rank-00002.safetensors"];
    for (fqn, entry) in &metadata.tensors {
        let files: Vec<&str> = entry.pieces.iter().map(|p| p.file.as_str()).collect();
        assert!(files.iter().all(|f| first_group.contains(f)), "{fqn}: {files:?}");
    }
    for (world, config) in [(2, FsdpConfig::default()), (4, FsdpConfig::default().hybrid_shard(2))] {
        let loaded = launch(LaunchOptions::new(world), |ctx| {
            let (model, _, _) = build(None, DType::F32, NestedWrappedModule::new)?;
            let fsdp = Fsdp::wrap(model, ctx.comm.clone(), config)?;
            let mut opt = SgdMomentum::new(fsdp.parameters(), OPTIMIZER)?;
            checkpoint::load(&fsdp, Some(&mut opt), &path)?;
            Ok(fsdp.full_parameters()?.into_iter().collect::<BTreeMap<_, _>>())
        })
        .unwrap();
        for (name, value) in &loaded[0] {
            assert_close(value, &saved[0][name], 0.0, 0.0, &format!("`{name}` loaded at world {world}"));
        }
    }
}

#[test]
fn a_shard_group_that_does_not_split_the_world_is_refused() {
    let errors = launch(LaunchOptions::new(4), |ctx| {
        let refused = |config: FsdpConfig| {
            let (model, _, _) = build(None, DType::F32, NestedWrappedModule::new).unwrap();
            Fsdp::wrap(model, ctx.comm.clone(), config).err().expect("refused")
        };
        Ok([
            refused(FsdpConfig::default().hybrid_shard(3)),
            refused(FsdpConfig::default().hybrid_shard(0)),
            refused(FsdpConfig::default().strategy(ShardingStrategy::NoShard).hybrid_shard(2)),
        ])
    })
    .unwrap();
    for (rank, [three, zero, no_shard]) in errors.iter().enumerate() {
        assert!(
            matches!(three, Error::Config(ConfigError::BadShardGroup { world: 4, size: 3, .. })),
            "rank {rank}: {three}"
        );
        assert!(three.to_string().contains("4 ranks do not split into groups of 3"), "{three}");
        assert!(matches!(zero, Error::Config(ConfigError::BadShardGroup { size: 0, .. })), "{zero}");
        assert!(no_shard.to_string().contains("NO_SHARD"), "{no_shard}");
    }
    let (model, _, _) = build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let layout = candle_fsdp::model::Layout::of(&model).unwrap();
    assert!(Plan::new(&layout, PlanConfig::new(4, FsdpConfig::default().hybrid_shard(3))).is_err());
}
