//! Frozen parameters (PyTorch's `requires_grad_(False)` before wrapping, here
//! `FsdpConfig::freeze`): trained under FSDP against a single-process candle reference
//! whose optimizer is given only the parameters that are not frozen.
//!
//! The frozen sets are chosen so that every case a unit can be in appears: a whole unit
//! frozen between trained ones (its input tracks gradients, its parameters produce none),
//! a unit mixing frozen and trained parameters, a frozen parameter used with a unit's
//! second input (the decoder's cross-attention on the encoder's memory), a tied parameter
//! frozen at both its FQNs, and frozen parameters of the root. The reference lists its
//! frozen `VarMap` entries by name, not through the patterns.
//!
//! Checked at worlds 1-3 under every sharding strategy, with and without activation
//! checkpointing: every loss and every parameter against the reference (PyTorch's fp32
//! tolerances); frozen parameters unchanged to the bit; the bytes each rank reduces per
//! step against the trained parameters' padded sizes, by hand; the frozen unit freed as
//! soon as the backward has passed its input, before the backward of the unit that fed it.

use crate::parity::ParityModel;
use candle_core::{DType, Tensor, Var};
use candle_fsdp::optim::{SgdMomentum, SgdMomentumConfig};
use candle_fsdp::{
    launch, ConfigError, Error, Fsdp, FsdpConfig, LaunchOptions, Plan, PlanConfig, ShardingStrategy, TraceEvent,
};
use candle_nn::Optimizer;
use fsdp_testkit::fsdp_test_models::{NestedWrappedModule, TransformerWithSharedParams};
use fsdp_testkit::{assert_close, build, Fault, FaultyCollectives, Snapshot, F32_ATOL, F32_RTOL};
use std::collections::BTreeMap;
use std::sync::Arc;

const STEPS: usize = 3;
const OPTIMIZER: SgdMomentumConfig = SgdMomentumConfig { lr: 1e-2, momentum: 0.9 };

/// A parity model with parameters to freeze.
trait FreezeCase: ParityModel {
    /// What the FSDP run is configured with.
    const PATTERNS: &'static [&'static str];
    /// The `VarMap` entries those patterns freeze, by name (the reference's list).
    fn is_frozen(name: &str) -> bool;
    /// A unit all of whose parameters are frozen, and the unit whose output is its input.
    const FROZEN_UNIT: (&'static str, &'static str);
}

impl FreezeCase for NestedWrappedModule {
    const PATTERNS: &'static [&'static str] = &["module.2.*", "module.1.0.weight", "module.3.bias"];
    fn is_frozen(name: &str) -> bool {
        matches!(name, "module.2.weight" | "module.2.bias" | "module.1.0.weight" | "module.3.bias")
    }
    const FROZEN_UNIT: (&'static str, &'static str) = ("module.2", "module.1.0");
}

impl FreezeCase for TransformerWithSharedParams {
    const PATTERNS: &'static [&'static str] = &[
        "output_proj.weight",
        "transformer.encoder.layers.1.*",
        "transformer.decoder.layers.0.multihead_attn.*",
        "transformer.decoder.layers.1.linear?.weight",
    ];
    fn is_frozen(name: &str) -> bool {
        name == "embed_tokens.weight"
            || name.starts_with("transformer.encoder.layers.1.")
            || name.starts_with("transformer.decoder.layers.0.multihead_attn.")
            || matches!(
                name,
                "transformer.decoder.layers.1.linear1.weight" | "transformer.decoder.layers.1.linear2.weight"
            )
    }
    const FROZEN_UNIT: (&'static str, &'static str) = ("transformer.encoder.layers.1", "transformer.encoder.layers.0");
}

struct Trained {
    losses: Vec<f64>,
    params: BTreeMap<String, Tensor>,
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// The `VarMap`'s parameters (buffers left out) and the ones of them the reference trains.
fn reference_vars<M: FreezeCase>(var_map: &candle_nn::VarMap) -> (BTreeMap<String, Var>, Vec<Var>) {
    let data = var_map.data().lock().unwrap();
    let params: BTreeMap<String, Var> = data
        .iter()
        .filter(|(name, _)| !M::BUFFERS.contains(&name.as_str()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let trained = params.iter().filter(|(name, _)| !M::is_frozen(name)).map(|(_, v)| v.clone()).collect();
    (params, trained)
}

fn train_reference<M: FreezeCase>(snapshot: &Snapshot, world: usize) -> Trained {
    let (model, var_map, _) = build(Some(snapshot), DType::F32, M::construct).unwrap();
    let (params, trained) = reference_vars::<M>(&var_map);
    assert!(params.keys().any(|n| M::is_frozen(n)) && trained.len() < params.len());
    let mut opt = SgdMomentum::new(trained, OPTIMIZER).unwrap();
    let mut losses = Vec::new();
    for _ in 0..STEPS {
        let loss = model.reference_loss(world).unwrap();
        losses.push(scalar(&loss));
        opt.step(&loss.backward().unwrap()).unwrap();
    }
    Trained { losses, params: params.into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect() }
}

/// What a rank saw besides its training results.
struct RankRun {
    trained: Trained,
    /// Bytes this rank's reductions took as input during the training steps.
    reduced_bytes: usize,
    frozen_fqns: Vec<String>,
    trained_fqns: Vec<String>,
    trace: Vec<TraceEvent>,
}

fn train_fsdp<M: FreezeCase>(snapshot: &Snapshot, world: usize, config: FsdpConfig) -> Vec<RankRun> {
    launch(LaunchOptions::new(world), |ctx| {
        let counting = Arc::new(FaultyCollectives::new(ctx.comm.clone(), Fault::None));
        let (model, _, _) = build(Some(snapshot), DType::F32, M::construct)?;
        let fsdp = Fsdp::wrap(model, counting.clone(), config.freeze(M::PATTERNS.iter().copied()))?;
        let reduce_op = if config.strategy.shards() { "reduce_scatter" } else { "all_reduce" };
        let before = counting.bytes(reduce_op);
        let mut opt = SgdMomentum::new(fsdp.parameters(), OPTIMIZER)?;
        fsdp.diagnostics().take_trace();
        let mut losses = Vec::new();
        let mut trace = Vec::new();
        for _ in 0..STEPS {
            let loss = M::fsdp_loss(&fsdp, ctx.rank)?;
            losses.push(scalar(&loss));
            let grads = fsdp.backward(&loss)?;
            for (fqn, var) in fsdp.named_parameters() {
                assert!(grads.get(var.as_tensor()).is_some(), "rank {}: trained `{fqn}` got no gradient", ctx.rank);
            }
            opt.step(&grads)?;
            trace = fsdp.diagnostics().take_trace();
        }
        let reduced_bytes = counting.bytes(reduce_op) - before;
        let params = fsdp.full_parameters()?.into_iter().collect();
        Ok(RankRun {
            trained: Trained { losses, params },
            reduced_bytes,
            frozen_fqns: fsdp.named_frozen_parameters().into_iter().map(|(n, _)| n).collect(),
            trained_fqns: fsdp.named_parameters().into_iter().map(|(n, _)| n).collect(),
            trace,
        })
    })
    .unwrap()
}

/// Bytes one step reduces per rank, by hand: every trained parameter padded to a multiple
/// of the world size when sharded (f32).
fn expected_reduced_bytes<M: FreezeCase>(snapshot: &Snapshot, world: usize, strategy: ShardingStrategy) -> usize {
    let (_, var_map, _) = build(Some(snapshot), DType::F32, M::construct).unwrap();
    let (_, trained) = reference_vars::<M>(&var_map);
    let padded = |n: usize| if strategy.shards() { n.div_ceil(world) * world } else { n };
    trained.iter().map(|v| padded(v.elem_count()) * 4).sum::<usize>() * STEPS
}

fn position(trace: &[TraceEvent], wanted: impl Fn(&TraceEvent) -> bool, what: &str) -> usize {
    trace.iter().position(wanted).unwrap_or_else(|| panic!("the last step's trace has no {what}: {trace:?}"))
}

fn frozen_parity<M: FreezeCase>(world: usize) {
    let (_, _, snapshot) = build(None, DType::F32, M::construct).unwrap();
    let reference = train_reference::<M>(&snapshot, world);
    let mut configs = Vec::new();
    for strategy in ShardingStrategy::ALL {
        configs.push(FsdpConfig::default().strategy(strategy));
    }
    configs.push(FsdpConfig::default().activation_checkpointing(true));
    for config in configs {
        let what = format!(
            "{} on {world} rank(s), {}{}",
            M::NAME,
            config.strategy.name(),
            if config.activation_checkpointing { ", checkpointed" } else { "" }
        );
        let runs = train_fsdp::<M>(&snapshot, world, config);
        for step in 0..STEPS {
            let average = runs.iter().map(|r| r.trained.losses[step]).sum::<f64>() / world as f64;
            let (actual, expected) = (
                Tensor::new(average, &candle_core::Device::Cpu).unwrap(),
                Tensor::new(reference.losses[step], &candle_core::Device::Cpu).unwrap(),
            );
            assert_close(&actual, &expected, F32_ATOL, F32_RTOL, &format!("{what}: loss of step {}", step + 1));
        }
        for (rank, run) in runs.iter().enumerate() {
            assert_eq!(
                run.trained.params.keys().collect::<Vec<_>>(),
                reference.params.keys().collect::<Vec<_>>(),
                "{what}: rank {rank}'s full parameters"
            );
            for (name, value) in &run.trained.params {
                let expected = &reference.params[name];
                assert_close(value, expected, F32_ATOL, F32_RTOL, &format!("{what}: rank {rank}'s `{name}`"));
                if M::is_frozen(name) {
                    let start = snapshot.0[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(
                        value.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        start,
                        "{what}: frozen `{name}` changed"
                    );
                }
            }
            let mut frozen_expected: Vec<&String> = reference.params.keys().filter(|n| M::is_frozen(n)).collect();
            frozen_expected.sort();
            let mut frozen: Vec<&String> = run.frozen_fqns.iter().collect();
            frozen.sort();
            assert_eq!(frozen, frozen_expected, "{what}: rank {rank}'s frozen parameters");
            assert!(
                run.trained_fqns.iter().all(|n| !M::is_frozen(n)),
                "{what}: a frozen parameter is offered for training"
            );
            assert_eq!(run.trained_fqns.len() + frozen.len(), reference.params.len());

            if world > 1 {
                let expected = expected_reduced_bytes::<M>(&snapshot, world, config.strategy);
                assert_eq!(run.reduced_bytes, expected, "{what}: rank {rank}'s reduced bytes");
            }
            let (frozen_unit, feeder) = M::FROZEN_UNIT;
            let trace = &run.trace;
            assert!(
                !trace.iter().any(|e| matches!(e, TraceEvent::ReduceGrads { unit, .. } if unit == frozen_unit)),
                "{what}: the frozen unit `{frozen_unit}` was reduced"
            );
            let freed = position(
                trace,
                |e| matches!(e, TraceEvent::PostBackward { unit } if unit == frozen_unit),
                "post-backward of the frozen unit",
            );
            let next = position(
                trace,
                |e| matches!(e, TraceEvent::PreBackward { unit } if unit == feeder),
                "pre-backward of the unit feeding it",
            );
            assert!(
                freed < next,
                "{what}: `{frozen_unit}` is released only after `{feeder}`'s backward started: {trace:?}"
            );
        }
    }
}

#[test]
fn frozen_nested_wrapped_world_1() {
    frozen_parity::<NestedWrappedModule>(1);
}

#[test]
fn frozen_nested_wrapped_world_2() {
    frozen_parity::<NestedWrappedModule>(2);
}

#[test]
fn frozen_nested_wrapped_world_3() {
    frozen_parity::<NestedWrappedModule>(3);
}

#[test]
fn frozen_transformer_world_1() {
    frozen_parity::<TransformerWithSharedParams>(1);
}

#[test]
fn frozen_transformer_world_2() {
    frozen_parity::<TransformerWithSharedParams>(2);
}

#[test]
fn frozen_transformer_world_3() {
    frozen_parity::<TransformerWithSharedParams>(3);
}

/// The plan counts no gradient and no optimizer state for frozen parameters: checked
/// against the trained parameters' shard sizes, by hand.
#[test]
fn the_plan_counts_no_gradients_or_optimizer_state_for_frozen_parameters() {
    let world = 2;
    let (model, var_map, _) = build(None, DType::F32, TransformerWithSharedParams::construct).unwrap();
    let (params, trained) = reference_vars::<TransformerWithSharedParams>(&var_map);
    let shard = |v: &Var| v.elem_count().div_ceil(world) * 4;
    let trained_bytes: usize = trained.iter().map(shard).sum();
    let all_bytes: usize = params.values().map(shard).sum();
    let layout = candle_fsdp::model::Layout::of(&model).unwrap();
    let config = FsdpConfig::default().freeze(TransformerWithSharedParams::PATTERNS.iter().copied());
    let plan = Plan::new(&layout, PlanConfig::new(world, config)).unwrap();
    assert_eq!(plan.memory.grads, trained_bytes);
    assert_eq!(plan.memory.optimizer, 2 * trained_bytes);
    let unfrozen = Plan::new(&layout, PlanConfig::new(world, FsdpConfig::default())).unwrap();
    assert_eq!(unfrozen.memory.grads, all_bytes);
    assert_eq!(plan.memory.params, unfrozen.memory.params, "frozen parameters are still stored, sharded");
    let unit = plan.units.iter().find(|u| u.name == "transformer.encoder.layers.1").unwrap();
    assert_eq!((unit.frozen_numel, unit.reduce_bytes, unit.unreduced_grad_bytes), (unit.numel, 0, 0));
    assert!(plan.to_string().contains("frozen"), "the printed plan marks frozen units:\n{plan}");
}

#[test]
fn a_pattern_that_freezes_nothing_and_a_hook_on_a_frozen_parameter_are_refused() {
    let (model, _, _) = build(None, DType::F32, NestedWrappedModule::construct).unwrap();
    let layout = candle_fsdp::model::Layout::of(&model).unwrap();
    let config = FsdpConfig::default().freeze(["module.2.*", "module.9.*"]);
    let refused = |e: Error| matches!(e, Error::Config(ConfigError::PatternMatchesNothing { ref pattern, .. }) if pattern == "module.9.*");
    assert!(refused(Plan::new(&layout, PlanConfig::new(1, config)).unwrap_err()));
    let error = launch(LaunchOptions::new(1), |ctx| {
        let (model, _, _) = build(None, DType::F32, NestedWrappedModule::construct)?;
        Fsdp::wrap(model, ctx.comm.clone(), config).map(|_| ())
    })
    .unwrap_err();
    assert!(error.to_string().contains("`module.9.*` selecting frozen parameters matches nothing"), "{error}");

    launch(LaunchOptions::new(1), |ctx| {
        let (model, _, _) = build(None, DType::F32, NestedWrappedModule::construct)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().freeze(["module.2.weight"]))?;
        let error = fsdp.register_post_accumulate_grad_hook("module.2.weight", |_, _| Ok(())).unwrap_err();
        assert!(
            matches!(error, Error::Config(ConfigError::FrozenParameter { ref fqn, .. }) if fqn == "module.2.weight")
        );
        fsdp.register_post_accumulate_grad_hook("module.2.bias", |_, _| Ok(()))?;
        Ok(())
    })
    .unwrap();
}

/// LoRA's shape: a bf16 base weight, frozen (declared on the model), and an f32 low-rank
/// update, trained, in one unit: `base(x) + 2 up(down(x))`.
#[derive(Debug, candle_fsdp::Shardable)]
struct AdaptedLinear {
    #[fsdp(frozen)]
    base: candle_nn::Linear,
    down: candle_nn::Linear,
    up: candle_nn::Linear,
}

impl candle_core::Module for AdaptedLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let base = self.base.forward(&x.to_dtype(DType::BF16)?)?.to_dtype(DType::F32)?;
        base + (self.up.forward(&self.down.forward(x)?)? * 2.0)?
    }
}

#[derive(Debug, candle_fsdp::Shardable)]
struct AdaptedStack {
    layers: Vec<candle_fsdp::Unit<AdaptedLinear>>,
    head: candle_nn::Linear,
}

const ADAPTED_DIM: usize = 8;
const ADAPTED_LAYERS: usize = 3;

impl AdaptedStack {
    /// The model from seeded values; with `vars`, each trained weight is a `Var` (returned
    /// with its FQN) and each base weight a constant, as a plain candle run would hold them.
    fn new(vars: bool) -> (Self, Vec<(String, Var)>) {
        let mut trained = Vec::new();
        let mut weight = |fqn: String, seed: u64, shape: &[usize], dtype: DType| {
            let value = (fsdp_testkit::randn(seed, shape) * 0.3).unwrap().to_dtype(dtype).unwrap();
            if vars && dtype == DType::F32 {
                let var = Var::from_tensor(&value).unwrap();
                trained.push((fqn, var.clone()));
                var.as_tensor().clone()
            } else {
                value
            }
        };
        let layers = (0..ADAPTED_LAYERS as u64)
            .map(|i| {
                let linear = |w: Tensor| candle_nn::Linear::new(w, None);
                candle_fsdp::Unit::new(AdaptedLinear {
                    base: linear(weight(format!("layers.{i}.base.weight"), 10 * i, &[8, 8], DType::BF16)),
                    down: linear(weight(format!("layers.{i}.down.weight"), 10 * i + 1, &[2, 8], DType::F32)),
                    up: linear(weight(format!("layers.{i}.up.weight"), 10 * i + 2, &[8, 2], DType::F32)),
                })
            })
            .collect();
        let head = candle_nn::Linear::new(weight("head.weight".into(), 99, &[4, ADAPTED_DIM], DType::F32), None);
        (Self { layers, head }, trained)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        use candle_core::Module;
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x)?.tanh()?;
        }
        self.head.forward(&x)
    }

    fn loss(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(x)?.sqr()?.sum_all()
    }
}

fn adapted_input(rank: usize) -> Tensor {
    fsdp_testkit::rand(50 + rank as u64, &[3, ADAPTED_DIM])
}

/// One unit holding a frozen bf16 base (frozen by the model's `#[fsdp(frozen)]`) and
/// trained f32 adapters: each dtype is gathered in a collective of its own (so the
/// adapters keep every f32 bit) and only the adapters are reduced, against plain candle
/// training the adapters and the head.
#[test]
fn a_unit_mixing_a_frozen_bf16_base_and_trained_f32_adapters() {
    let initial_bases: Vec<Tensor> =
        AdaptedStack::new(false).0.layers.into_iter().map(|u| u.into_inner().unwrap().base.weight().clone()).collect();
    for world in 1..=3 {
        let (reference, trained) = AdaptedStack::new(true);
        let mut opt = SgdMomentum::new(trained.iter().map(|(_, v)| v.clone()).collect(), OPTIMIZER).unwrap();
        let mut expected_losses = Vec::new();
        for _ in 0..STEPS {
            // Each rank's batch through its own forward and backward, the gradients averaged
            // after: the bf16 base rounds what passes through it, so a batch of every rank's
            // rows, or a loss scaled by 1/3 before the backward, would round differently.
            let losses: Vec<Tensor> = (0..world).map(|r| reference.loss(&adapted_input(r)).unwrap()).collect();
            expected_losses.push(losses.iter().map(scalar).sum::<f64>() / world as f64);
            let per_rank: Vec<_> = losses.iter().map(|l| l.backward().unwrap()).collect();
            let mut grads = losses[0].backward().unwrap();
            for (_, var) in &trained {
                let parts: Vec<Tensor> = per_rank.iter().map(|g| g.get(var.as_tensor()).unwrap().clone()).collect();
                let mean = (Tensor::stack(&parts, 0).unwrap().sum(0).unwrap() / world as f64).unwrap();
                grads.insert(var.as_tensor(), mean);
            }
            opt.step(&grads).unwrap();
        }
        for strategy in ShardingStrategy::ALL {
            let what = format!("world {world}, {}", strategy.name());
            let runs = launch(LaunchOptions::new(world), |ctx| {
                let counting = Arc::new(FaultyCollectives::new(ctx.comm.clone(), Fault::None));
                let config = FsdpConfig::default().strategy(strategy);
                let fsdp = Fsdp::wrap(AdaptedStack::new(false).0, counting.clone(), config)?;
                let mut opt = SgdMomentum::new(fsdp.parameters(), OPTIMIZER)?;
                let mut losses = Vec::new();
                let mut gathers_per_step = 0;
                for _ in 0..STEPS {
                    let before = counting.calls("all_gather");
                    let loss = fsdp.forward(|m| m.loss(&adapted_input(ctx.rank)))?;
                    losses.push(scalar(&loss));
                    opt.step(&fsdp.backward(&loss)?)?;
                    gathers_per_step = counting.calls("all_gather") - before;
                }
                Ok((losses, fsdp.full_parameters()?, gathers_per_step))
            })
            .unwrap();
            for (step, expected) in expected_losses.iter().enumerate() {
                let average = runs.iter().map(|r| r.0[step]).sum::<f64>() / world as f64;
                assert!((average - expected).abs() <= 1e-6 * expected.abs(), "{what}: loss {average} vs {expected}");
            }
            for (rank, (_, params, gathers)) in runs.iter().enumerate() {
                if world > 1 && strategy == ShardingStrategy::FullShard {
                    // Forward: each layer in two dtypes and the root; backward: the layers again.
                    assert_eq!(*gathers, 2 * (2 * ADAPTED_LAYERS) + 1, "{what}: rank {rank}'s all-gathers per step");
                }
                let by_fqn: BTreeMap<&str, &Tensor> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
                for (fqn, var) in &trained {
                    assert_close(
                        by_fqn[fqn.as_str()],
                        var.as_tensor(),
                        F32_ATOL,
                        F32_RTOL,
                        &format!("{what}: rank {rank}'s `{fqn}`"),
                    );
                }
                for (i, initial) in initial_bases.iter().enumerate() {
                    let fqn = format!("layers.{i}.base.weight");
                    let base = by_fqn[fqn.as_str()];
                    assert_eq!(base.dtype(), DType::BF16, "{what}: `{fqn}` keeps its dtype");
                    let start = initial.to_dtype(DType::F32).unwrap();
                    assert_eq!(
                        base.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        start.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        "{what}: frozen `{fqn}` changed"
                    );
                }
            }
        }
    }
}

/// A parameter declared frozen on the model is frozen without a pattern, and a `!`
/// pattern keeps one trained after all.
#[test]
fn frozen_declared_on_the_model_and_patterns_on_top_of_it() {
    let (model, _) = AdaptedStack::new(false);
    let layout = candle_fsdp::model::Layout::of(&model).unwrap();
    let frozen = |patterns: &[&str]| -> Vec<String> {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        let flags = layout.frozen_params(&patterns).unwrap();
        layout.params.iter().zip(flags).filter(|(_, f)| *f).map(|(p, _)| p.fqn.clone()).collect()
    };
    assert_eq!(frozen(&[]), ["layers.0.base.weight", "layers.1.base.weight", "layers.2.base.weight"]);
    assert_eq!(frozen(&["!layers.1.base.weight"]), ["layers.0.base.weight", "layers.2.base.weight"]);
    assert_eq!(
        frozen(&["head.*"]),
        ["layers.0.base.weight", "layers.1.base.weight", "layers.2.base.weight", "head.weight"]
    );
}

/// Frozen parameters through a checkpoint: saved with the model (the optimizer's momentum
/// only for the trained ones), loaded into a fresh wrap at the same world size (to the bit)
/// and at others, another strategy and hybrid sharding (within rounding, since a mean over
/// 3 ranks rounds differently): the run continues like one that never stopped. SGD with
/// momentum, since Adam turns a rounding-sized gradient (the key bias's, zero in exact
/// arithmetic) into a full-size step.
#[test]
fn frozen_parameters_checkpoint_and_resume_at_another_world_size() {
    use candle_fsdp::checkpoint::{self, Checkpointer, Progress};
    let (_, _, snapshot) = build(None, DType::F32, TransformerWithSharedParams::construct).unwrap();
    let patterns = <TransformerWithSharedParams as FreezeCase>::PATTERNS;
    let run = |world: usize, config: FsdpConfig, steps: std::ops::Range<usize>, dir: &std::path::Path| {
        launch(LaunchOptions::new(world), |ctx| {
            let (model, _, _) = build(Some(&snapshot), DType::F32, TransformerWithSharedParams::construct)?;
            let fsdp = Fsdp::wrap(model, ctx.comm.clone(), config.freeze(patterns.iter().copied()))?;
            let mut opt = SgdMomentum::new(fsdp.parameters(), OPTIMIZER)?;
            if steps.start > 0 {
                checkpoint::load(&fsdp, Some(&mut opt), &dir.join(format!("step-{:08}", steps.start)))?;
            }
            for _ in steps.clone() {
                let loss = TransformerWithSharedParams::fsdp_loss(&fsdp, ctx.rank)?;
                opt.step(&fsdp.backward(&loss)?)?;
            }
            if steps.start == 0 {
                let progress = Progress { step: steps.end as u64, ..Progress::default() };
                Checkpointer::new(dir).save(&fsdp, Some(&opt), &progress)?;
            }
            fsdp.full_parameters()
        })
        .unwrap()
        .remove(0)
    };
    let (straight_dir, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let straight = run(2, FsdpConfig::default(), 0..4, straight_dir.path());
    run(2, FsdpConfig::default(), 0..2, dir.path());
    let saved = checkpoint::read_metadata(&dir.path().join("step-00000002")).unwrap();
    // AdamW's state is kept for the trained parameters only.
    let with_state: Vec<&String> = saved.optimizer.as_ref().unwrap().slots.keys().collect();
    let frozen = <TransformerWithSharedParams as FreezeCase>::is_frozen;
    assert!(!with_state.is_empty() && with_state.iter().all(|fqn| !frozen(fqn)), "{with_state:?}");
    for (world, config) in [
        (2, FsdpConfig::default()),
        (3, FsdpConfig::default().strategy(ShardingStrategy::ShardGradOp)),
        (4, FsdpConfig::default().hybrid_shard(2)),
    ] {
        let resumed = run(world, config, 2..4, dir.path());
        for ((fqn, a), (_, b)) in straight.iter().zip(&resumed) {
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            if world == 2 {
                assert_eq!(worst, 0.0, "world 2: `{fqn}` is not the uninterrupted run's to the bit");
            }
            assert!(worst <= 1e-6, "world {world}: `{fqn}` differs by {worst} from the run that never stopped");
        }
    }
}
