//! Mixed precision: parameters gathered and computed in bf16 (or f16) over f32 master
//! shards, gradients reduced in f32 or bf16, and f16 loss scaling.
//!
//! The reference is written here with plain candle, in one process, following the same
//! recipe as data-parallel mixed precision: an f32 master copy of every parameter; per
//! step a bf16 copy of it; each rank's batch run through the bf16 copy (its f32 input
//! cast to bf16, its output cast to f32 before the loss); each batch's bf16 gradients
//! cast to the reduce dtype, summed over the batches in rank order and divided by their
//! number in the reduce dtype; the result cast to f32, clipped to a global L2 norm and
//! stepped by SGD with momentum on the master copy.
//!
//! Tolerance: FSDP runs the same candle operations on the same values, so the losses and
//! gradients agree to the bit; only the gradient norm is summed in another order (per
//! shard, then over ranks), which moves the clipping scale by an f64 rounding. Losses and
//! parameters must agree within 1e-6 absolute after 3 steps, norms within 1e-6
//! relative; each test prints the largest difference it saw.

use fsdp_testkit as common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor};
use candle_fsdp::optim::{SgdMomentum, SgdMomentumConfig};
use candle_fsdp::{
    launch, Fsdp, FsdpConfig, GradScalerConfig, LaunchOptions, MixedPrecision, Plan, PlanConfig, Shardable,
    ShardedGradScaler, ShardingStrategy, Unit,
};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use common::{build, Fault, FaultyCollectives, Snapshot};
use fsdp_testkit::fsdp_test_models::NestedWrappedModule;
use std::collections::BTreeMap;
use std::sync::Arc;

const STEPS: usize = 3;
const OPTIMIZER: SgdMomentumConfig = SgdMomentumConfig { lr: 1e-2, momentum: 0.9 };
const MAX_NORM: f64 = 0.5;
const TOLERANCE: f64 = 1e-6;

/// What a step computes in and reduces in; with `loss_scale`, f16's static scale.
#[derive(Clone, Copy, Debug)]
struct Recipe {
    compute: DType,
    reduce: DType,
    loss_scale: Option<f64>,
}

impl Recipe {
    fn policy(self) -> MixedPrecision {
        MixedPrecision::compute_in(self.compute).reduce_dtype(self.reduce)
    }
}

/// Rank `rank`'s input: `rand(4, 8)` seeded with `1 + rank`, as in the parity tests.
fn input(rank: usize) -> Tensor {
    common::rand(1 + rank as u64, &[4, 8])
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

struct Trained {
    losses: Vec<f64>,
    norms: Vec<f64>,
    params: BTreeMap<String, Tensor>,
}

fn vars(map: &VarMap) -> BTreeMap<String, candle_core::Var> {
    map.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The plain-candle reference of the module docs, on the batches of `world` ranks.
fn train_reference(snapshot: &Snapshot, world: usize, recipe: Recipe) -> Trained {
    let (_, master_map, _) = build(Some(snapshot), DType::F32, NestedWrappedModule::new).unwrap();
    let master = vars(&master_map);
    let compute_map = VarMap::new();
    let model = NestedWrappedModule::new(VarBuilder::from_varmap(&compute_map, recipe.compute, &Device::Cpu)).unwrap();
    let compute = vars(&compute_map);
    let mut opt = SgdMomentum::new(master.values().cloned().collect(), OPTIMIZER).unwrap();
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for _ in 0..STEPS {
        for (name, var) in &compute {
            var.set(&master[name].as_tensor().to_dtype(recipe.compute).unwrap()).unwrap();
        }
        let mut sums: BTreeMap<&String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0.0;
        for rank in 0..world {
            let out = model.forward(&input(rank).to_dtype(recipe.compute).unwrap()).unwrap();
            let loss = out.to_dtype(DType::F32).unwrap().sum_all().unwrap();
            loss_sum += scalar(&loss);
            let scaled = match recipe.loss_scale {
                Some(scale) => (&loss * scale).unwrap(),
                None => loss,
            };
            let grads = scaled.backward().unwrap();
            for (name, var) in &compute {
                let grad = grads.get(var.as_tensor()).unwrap().to_dtype(recipe.reduce).unwrap();
                let sum = match sums.remove(name) {
                    Some(sum) => (sum + grad).unwrap(),
                    None => grad,
                };
                sums.insert(name, sum);
            }
        }
        losses.push(loss_sum / world as f64);
        // FSDP divides only when it communicates: not on one rank.
        let mut grads: BTreeMap<&String, Tensor> = sums
            .into_iter()
            .map(|(name, sum)| {
                let mean = if world == 1 { sum } else { (sum / world as f64).unwrap() };
                let mean = mean.to_dtype(DType::F32).unwrap();
                let mean = match recipe.loss_scale {
                    Some(scale) => (mean * (1.0 / scale)).unwrap(),
                    None => mean,
                };
                (name, mean)
            })
            .collect();
        let norm = grads
            .values()
            .map(|g| scalar(&g.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap()))
            .sum::<f64>()
            .sqrt();
        norms.push(norm);
        let scale = MAX_NORM / (norm + 1e-6);
        let mut store = GradStore::default();
        for (name, grad) in grads.iter_mut() {
            if scale < 1.0 {
                *grad = (&*grad * scale).unwrap();
            }
            store.insert(master[*name].as_tensor(), grad.clone());
        }
        opt.step(&store).unwrap();
    }
    let params = master.into_iter().map(|(name, var)| (name, var.as_tensor().clone())).collect();
    Trained { losses, norms, params }
}

/// FSDP on `world` ranks under `config` with the recipe's policy.
fn train_fsdp(snapshot: &Snapshot, world: usize, recipe: Recipe, config: FsdpConfig) -> Vec<Trained> {
    launch(LaunchOptions::new(world), |ctx| {
        let (model, _, _) = build(Some(snapshot), DType::F32, NestedWrappedModule::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), config.mixed_precision(recipe.policy()))?;
        let mut opt = SgdMomentum::new(fsdp.parameters(), OPTIMIZER)?;
        let mut scaler = recipe
            .loss_scale
            .map(|scale| ShardedGradScaler::new(GradScalerConfig { init_scale: scale, ..Default::default() }))
            .transpose()?;
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        for _ in 0..STEPS {
            let loss = fsdp.forward_with(input(ctx.rank), |m, x| m.forward(&x))?.sum_all()?;
            assert_eq!(loss.dtype(), DType::F32, "the root's output is cast to output_dtype");
            losses.push(scalar(&loss));
            let mut grads = match &scaler {
                Some(scaler) => fsdp.backward(&scaler.scale_loss(&loss)?)?,
                None => fsdp.backward(&loss)?,
            };
            if let Some(scaler) = &mut scaler {
                assert!(scaler.unscale(&fsdp, &mut grads)?, "no overflow is expected");
            }
            for var in fsdp.parameters() {
                assert_eq!(grads.get(var.as_tensor()).unwrap().dtype(), DType::F32, "gradients land in f32");
            }
            norms.push(fsdp.clip_grad_norm(&mut grads, MAX_NORM, 2.0)?);
            match &mut scaler {
                Some(scaler) => assert!(scaler.step(&fsdp, &mut opt, &mut grads)?.stepped),
                None => opt.step(&grads)?,
            }
        }
        let params = fsdp.full_parameters()?.into_iter().collect();
        Ok(Trained { losses, norms, params })
    })
    .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    scalar(&d.abs().unwrap().flatten_all().unwrap().max(0).unwrap())
}

/// Every strategy at world sizes 1-4 against the reference; returns the largest
/// differences (loss, parameter, relative norm).
fn parity(recipe: Recipe) {
    let (_, _, snapshot) = build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let (mut worst_loss, mut worst_param, mut worst_norm) = (0f64, 0f64, 0f64);
    for world in 1..=4 {
        let reference = train_reference(&snapshot, world, recipe);
        // The recipe must matter, or agreeing with it would show nothing.
        let in_f32 = train_reference(&snapshot, world, Recipe { compute: DType::F32, reduce: DType::F32, ..recipe });
        let lowered = reference.losses.iter().zip(&in_f32.losses).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(lowered > 1e-4, "{recipe:?}, world {world}: the losses are within {lowered:e} of f32 training");
        for strategy in ShardingStrategy::ALL {
            let what = format!("{recipe:?}, world {world}, {strategy}");
            let ranks = train_fsdp(&snapshot, world, recipe, FsdpConfig::default().strategy(strategy));
            let losses = (0..STEPS).map(|s| ranks.iter().map(|r| r.losses[s]).sum::<f64>() / world as f64);
            for (step, (loss, expected)) in losses.zip(&reference.losses).enumerate() {
                let diff = (loss - expected).abs();
                assert!(diff <= TOLERANCE, "{what}: loss of step {step} is {loss}, the reference's {expected}");
                worst_loss = worst_loss.max(diff);
            }
            for (rank, trained) in ranks.iter().enumerate() {
                for (step, (norm, expected)) in trained.norms.iter().zip(&reference.norms).enumerate() {
                    let relative = (norm - expected).abs() / expected;
                    assert!(
                        relative <= TOLERANCE,
                        "{what}: rank {rank}'s norm of step {step} is {norm}, not {expected}"
                    );
                    worst_norm = worst_norm.max(relative);
                }
                assert_eq!(trained.params.len(), reference.params.len(), "{what}: parameters");
                for (name, value) in &trained.params {
                    assert_eq!(value.dtype(), DType::F32, "{what}: `{name}` is kept in f32");
                    let diff = max_abs_diff(value, &reference.params[name]);
                    assert!(diff <= TOLERANCE, "{what}: rank {rank}'s `{name}` is {diff:e} off the reference");
                    worst_param = worst_param.max(diff);
                }
            }
        }
    }
    eprintln!(
        "{recipe:?}: largest |loss error| {worst_loss:.3e}, |parameter error| {worst_param:.3e}, \
         relative norm error {worst_norm:.3e}"
    );
}

#[test]
fn bf16_compute_with_f32_reduction_matches_the_reference_at_world_1_to_4() {
    parity(Recipe { compute: DType::BF16, reduce: DType::F32, loss_scale: None });
}

#[test]
fn bf16_compute_with_bf16_reduction_matches_the_reference_at_world_1_to_4() {
    parity(Recipe { compute: DType::BF16, reduce: DType::BF16, loss_scale: None });
}

#[test]
fn f16_compute_with_a_loss_scale_matches_the_reference_at_world_1_to_4() {
    parity(Recipe { compute: DType::F16, reduce: DType::F32, loss_scale: Some(1024.0) });
}

/// One training step at world 2 under FULL_SHARD with `policy`: the bytes this rank's
/// all-gathers and reduce-scatters sent, and its peak of gathered bytes.
fn one_step_traffic(policy: MixedPrecision) -> (usize, usize, usize) {
    let (_, _, snapshot) = build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let ranks = launch(LaunchOptions::new(2), |ctx| {
        let (model, _, _) = build(Some(&snapshot), DType::F32, NestedWrappedModule::new)?;
        let comm = Arc::new(FaultyCollectives::new(ctx.comm.clone(), Fault::None));
        let fsdp = Fsdp::wrap(model, comm.clone(), FsdpConfig::default().mixed_precision(policy))?;
        let (gathers, reductions) = (comm.bytes("all_gather"), comm.bytes("reduce_scatter"));
        let loss = fsdp.forward_with(input(ctx.rank), |m, x| m.forward(&x))?.sum_all()?;
        fsdp.backward(&loss)?;
        Ok((
            comm.bytes("all_gather") - gathers,
            comm.bytes("reduce_scatter") - reductions,
            fsdp.diagnostics().memory().gathered_peak,
        ))
    })
    .unwrap();
    assert_eq!(ranks[0], ranks[1], "both ranks move and hold the same");
    ranks[0]
}

#[test]
fn bf16_gathers_move_and_hold_exactly_half_the_bytes_of_f32() {
    let (f32_gathers, f32_reductions, f32_peak) = one_step_traffic(MixedPrecision::default());
    let (gathers, reductions, peak) = one_step_traffic(MixedPrecision::compute_in(DType::BF16));
    let (_, bf16_reductions, _) = one_step_traffic(MixedPrecision::compute_in(DType::BF16).reduce_dtype(DType::BF16));
    eprintln!(
        "one step at world 2: all-gather {f32_gathers} B (f32) vs {gathers} B (bf16); reduce-scatter {f32_reductions} B \
         (f32), {reductions} B (reduce f32), {bf16_reductions} B (reduce bf16); gathered peak {f32_peak} B vs {peak} B"
    );
    assert!(f32_gathers > 0 && f32_reductions > 0);
    assert_eq!(2 * gathers, f32_gathers, "all-gather bytes under bf16");
    assert_eq!(reductions, f32_reductions, "reduce-scatter bytes with reduce_dtype f32");
    assert_eq!(2 * bf16_reductions, f32_reductions, "reduce-scatter bytes with reduce_dtype bf16");
    assert_eq!(2 * peak, f32_peak, "gathered peak of memory()");

    // The plan counts the same: gathered bytes and the all-gather's in bf16.
    let (model, _, _) = build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let layout = candle_fsdp::model::Layout::of(&model).unwrap();
    let plan = |policy| Plan::new(&layout, PlanConfig::new(2, FsdpConfig::default().mixed_precision(policy))).unwrap();
    let (full, half) = (plan(MixedPrecision::default()), plan(MixedPrecision::compute_in(DType::BF16)));
    assert_eq!(2 * half.memory.gathered_peak, full.memory.gathered_peak);
    assert_eq!(half.memory.params, full.memory.params, "the shards stay f32");
    for (f, h) in full.units.iter().zip(&half.units) {
        assert_eq!(
            (2 * h.gathered_bytes, 2 * h.collective_bytes),
            (f.gathered_bytes, f.collective_bytes),
            "{}",
            f.name
        );
        assert_eq!(h.reduce_bytes, f.reduce_bytes, "{}: reduced in f32", f.name);
    }
    assert_eq!(peak, half.memory.gathered_peak, "memory() and the plan agree on the gathered peak");
}

#[test]
fn an_overflow_on_one_rank_skips_the_step_on_every_rank_and_halves_the_scale() {
    let (_, _, snapshot) = build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let ranks = launch(LaunchOptions::new(2), |ctx| {
        let (model, _, _) = build(Some(&snapshot), DType::F32, NestedWrappedModule::new)?;
        let policy = MixedPrecision::compute_in(DType::F16);
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().mixed_precision(policy))?;
        let mut opt = SgdMomentum::new(fsdp.parameters(), OPTIMIZER)?;
        let mut scaler = ShardedGradScaler::new(GradScalerConfig { init_scale: 256.0, ..Default::default() })?;
        let mut outcomes = Vec::new();
        for step in 0..2 {
            let before: Vec<Tensor> =
                fsdp.parameters().iter().map(|v| v.as_tensor().copy()).collect::<Result<_, _>>()?;
            let loss = fsdp.forward_with(input(ctx.rank), |m, x| m.forward(&x))?.sum_all()?;
            let mut grads = fsdp.backward(&scaler.scale_loss(&loss)?)?;
            if step == 0 && ctx.rank == 1 {
                // One element of one shard gradient overflowed, on this rank only.
                let var = &fsdp.parameters()[0];
                let grad = grads.get(var.as_tensor()).unwrap();
                let poisoned = grad.slice_scatter0(&Tensor::new(&[f32::INFINITY], grad.device())?, 0)?;
                grads.insert(var.as_tensor(), poisoned);
            }
            let outcome = scaler.step(&fsdp, &mut opt, &mut grads)?;
            let unchanged = fsdp.parameters().iter().zip(&before).all(|(v, b)| max_abs_diff(v.as_tensor(), b) == 0.0);
            outcomes.push((outcome, unchanged));
        }
        Ok(outcomes)
    })
    .unwrap();
    for (rank, outcomes) in ranks.iter().enumerate() {
        let (skipped, skipped_unchanged) = outcomes[0];
        assert!(!skipped.stepped && skipped_unchanged, "rank {rank}: the overflowing step was taken");
        assert_eq!((skipped.scale, skipped.next_scale), (256.0, 128.0), "rank {rank}");
        let (stepped, stepped_unchanged) = outcomes[1];
        assert!(stepped.stepped && !stepped_unchanged, "rank {rank}: the next step was skipped too");
        assert_eq!((stepped.scale, stepped.next_scale), (128.0, 128.0), "rank {rank}");
    }
}

#[derive(Shardable)]
struct Counter {
    counts: Tensor,
}

#[derive(Shardable)]
struct CountingModel {
    block: Unit<Counter>,
}

#[test]
fn a_policy_the_model_cannot_follow_is_refused_naming_the_unit_and_dtype() {
    let errors = launch(LaunchOptions::new(1), |ctx| {
        let model = CountingModel { block: Unit::new(Counter { counts: Tensor::zeros(4, DType::U32, &Device::Cpu)? }) };
        let policy = MixedPrecision::compute_in(DType::BF16);
        let integer = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().mixed_precision(policy)).err();

        let (model, _, _) = build(None, DType::F32, NestedWrappedModule::new)?;
        let policy = MixedPrecision { param_dtype: Some(DType::U8), ..Default::default() };
        let not_float = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().mixed_precision(policy)).err();

        // A root fed f32 inputs past `forward_with`: its bf16 matmul gets an f32 operand.
        let (model, _, _) = build(None, DType::F32, NestedWrappedModule::new)?;
        let policy = MixedPrecision::compute_in(DType::BF16);
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().mixed_precision(policy))?;
        let x = input(0);
        let forward = fsdp.forward(|m| m.forward(&x)).err();
        Ok([integer, not_float, forward].map(|e| e.expect("refused").to_string()))
    })
    .unwrap();
    let [integer, not_float, forward] = &errors[0];
    assert!(
        integer.contains("unit `block`") && integer.contains("BF16") && integer.contains("`block.counts` is U32"),
        "{integer}"
    );
    assert!(not_float.contains("U8") && not_float.contains("floating-point"), "{not_float}");
    assert!(forward.contains("rank 0") && forward.contains("unit `<root>`") && forward.contains("BF16"), "{forward}");
}

#[test]
fn summon_writeback_keeps_full_precision_where_the_edit_changed_nothing() {
    let (_, _, snapshot) = build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let ranks = launch(LaunchOptions::new(2), |ctx| {
        let (model, _, _) = build(Some(&snapshot), DType::F32, NestedWrappedModule::new)?;
        let policy = MixedPrecision::compute_in(DType::BF16);
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().mixed_precision(policy))?;
        let options = candle_fsdp::SummonOptions { writeback: true, rank0_only: false };
        fsdp.summon_units(options, |_, params| {
            for (name, value) in params {
                if name == "module.3.bias" {
                    value.slice_set(&Tensor::new(&[0.25f32], &Device::Cpu)?.to_dtype(value.dtype())?, 0, 0)?;
                }
            }
            Ok::<_, candle_core::Error>(())
        })?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        Ok(fsdp.full_parameters()?.into_iter().collect::<BTreeMap<_, _>>())
    })
    .unwrap();
    let original: BTreeMap<String, Tensor> = snapshot.0.clone().into_iter().collect();
    for (name, value) in &ranks[0] {
        let expected = if name == "module.3.bias" {
            original[name].slice_scatter0(&Tensor::new(&[0.25f32], &Device::Cpu).unwrap(), 0).unwrap()
        } else {
            original[name].clone()
        };
        assert_eq!(max_abs_diff(value, &expected), 0.0, "`{name}` after the write-back");
    }
}
