//! `Fsdp::clip_grad_norm` against plain candle on the global batch: the norm of the whole
//! model's gradients (p = 1, 2 and infinity), each element counted once whatever the world
//! size and strategy, and the gradients scaled by `max_norm / (norm + 1e-6)` (an SGD step
//! after clipping trains the same parameters); a non-finite norm is an error on every rank.

use fsdp_testkit as common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Module, Tensor, Var};
use candle_fsdp::{launch, Error, Fsdp, FsdpConfig, LaunchOptions, ShardingStrategy};
use candle_nn::{Optimizer, VarBuilder, SGD};
use common::fsdp_test_models::AlwaysWrapNestedWrappedModule as Wrapped;
use common::fsdp_test_models::NestedWrappedModule as Nested;
use common::{build, Snapshot};
use std::collections::BTreeMap;

const NORMS: [f64; 3] = [1.0, 2.0, f64::INFINITY];
const LR: f64 = 0.1;

fn input(rank: usize) -> Tensor {
    common::rand(1 + rank as u64, &[4, 8])
}

/// p-norm of all `values` together.
fn norm(values: &[f64], p: f64) -> f64 {
    if p.is_infinite() {
        values.iter().fold(0.0, |m, v| m.max(v.abs()))
    } else {
        values.iter().map(|v| v.abs().powf(p)).sum::<f64>().powf(1.0 / p)
    }
}

/// What the reference computes: the norms of the global batch's gradients, and the
/// parameters after clipping to half the 2-norm and one SGD step.
struct Reference {
    norms: Vec<f64>,
    params: BTreeMap<String, Tensor>,
}

fn reference<M: Module>(
    snapshot: &Snapshot,
    world: usize,
    ctor: fn(VarBuilder) -> candle_core::Result<M>,
) -> Reference {
    let (model, var_map, _) = build(Some(snapshot), DType::F32, ctor).unwrap();
    let inputs: Vec<Tensor> = (0..world).map(input).collect();
    let loss = (model.forward(&Tensor::cat(&inputs, 0).unwrap()).unwrap().sum_all().unwrap() / world as f64).unwrap();
    let grads = loss.backward().unwrap();
    let vars: Vec<(String, Var)> = var_map.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut all = Vec::new();
    for (_, var) in &vars {
        let grad = grads.get(var.as_tensor()).expect("every parameter has a gradient");
        all.extend(grad.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap());
    }
    let norms: Vec<f64> = NORMS.iter().map(|&p| norm(&all, p)).collect();
    let scale = (norms[1] / 2.0) / (norms[1] + 1e-6);
    let mut clipped = GradStore::default();
    for (_, var) in &vars {
        clipped.insert(var.as_tensor(), (grads.get(var.as_tensor()).unwrap() * scale).unwrap());
    }
    SGD::new(vars.iter().map(|(_, v)| v.clone()).collect(), LR).unwrap().step(&clipped).unwrap();
    Reference { norms, params: vars.into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect() }
}

/// Under FSDP: the three norms (p = 1 and infinity with a limit that scales nothing, then
/// p = 2 clipped to half), one SGD step, the full parameters.
fn under_fsdp<M: Module + candle_fsdp::ShardableModel>(
    snapshot: &Snapshot,
    world: usize,
    strategy: ShardingStrategy,
    ctor: fn(VarBuilder) -> candle_core::Result<M>,
) -> Vec<(Vec<f64>, BTreeMap<String, Tensor>)> {
    launch(LaunchOptions::new(world), |ctx| {
        let (model, _, _) = build(Some(snapshot), DType::F32, ctor)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().strategy(strategy))?;
        let x = input(ctx.rank);
        let loss = fsdp.forward(|m| m.forward(&x))?.sum_all()?;
        let mut grads = fsdp.backward(&loss)?;
        // A limit no norm reaches scales nothing.
        let mut norms = Vec::new();
        for p in NORMS {
            norms.push(fsdp.clip_grad_norm(&mut grads, f64::INFINITY, p)?);
        }
        // Clipped to half its 2-norm; the norm returned is the one before scaling.
        let l2 = fsdp.clip_grad_norm(&mut grads, norms[1] / 2.0, 2.0)?;
        assert_eq!(l2, norms[1], "rank {}: unscaled gradients changed their norm", ctx.rank);
        SGD::new(fsdp.parameters(), LR)?.step(&grads)?;
        Ok((norms, fsdp.full_parameters()?.into_iter().collect()))
    })
    .unwrap()
}

fn check<M: Module + candle_fsdp::ShardableModel>(name: &str, ctor: fn(VarBuilder) -> candle_core::Result<M>) {
    let (_, _, snapshot) = build(None, DType::F32, ctor).unwrap();
    let mut worst = 0f64;
    for world in 1..=4 {
        let expected = reference(&snapshot, world, ctor);
        for strategy in ShardingStrategy::ALL {
            let what = format!("{name}, {world} rank(s), {strategy}");
            for (rank, (norms, params)) in under_fsdp(&snapshot, world, strategy, ctor).into_iter().enumerate() {
                for ((got, want), p) in norms.iter().zip(&expected.norms).zip(NORMS) {
                    let relative = (got - want).abs() / want;
                    worst = worst.max(relative);
                    assert!(relative <= 1e-6, "{what}: rank {rank}'s {p}-norm {got} against {want}");
                }
                for (fqn, value) in &params {
                    common::assert_close(value, &expected.params[fqn], 1e-6, 1e-5, &format!("{what}: `{fqn}`"));
                }
            }
        }
    }
    eprintln!("{name}: largest relative norm error {worst:.2e}");
}

#[test]
fn the_norm_counts_every_element_once_and_clipping_scales_like_plain_candle() {
    check("NestedWrappedModule", Nested::new);
    check("AlwaysWrapNestedWrappedModule", Wrapped::new);
}

#[test]
fn a_non_finite_norm_is_an_error_on_every_rank_and_scales_nothing() {
    let (_, _, snapshot) = build(None, DType::F32, Nested::new).unwrap();
    let results = candle_fsdp::launch_each(LaunchOptions::new(2), |ctx| {
        let (model, _, _) = build(Some(&snapshot), DType::F32, Nested::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let x = input(ctx.rank);
        // Rank 1's loss is NaN: the averaged gradients are NaN on every rank's shard.
        let scale = if ctx.rank == 1 { f64::NAN } else { 1.0 };
        let loss = (fsdp.forward(|m| m.forward(&x))?.sum_all()? * scale)?;
        let mut grads = fsdp.backward(&loss)?;
        let before: Vec<Vec<f32>> = fsdp
            .parameters()
            .iter()
            .filter_map(|v| grads.get(v.as_tensor()).map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
        let outcome = fsdp.clip_grad_norm(&mut grads, 1.0, 2.0);
        let after: Vec<Vec<f32>> = fsdp
            .parameters()
            .iter()
            .filter_map(|v| grads.get(v.as_tensor()).map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
        let unchanged = before.len() == after.len()
            && before.iter().zip(&after).all(|(b, a)| b.iter().zip(a).all(|(x, y)| x.to_bits() == y.to_bits()));
        Ok((outcome, unchanged))
    })
    .unwrap();
    for (rank, result) in results.into_iter().enumerate() {
        let (outcome, unchanged) = result.unwrap();
        let error = outcome.expect_err("a NaN norm is an error");
        let message = error.to_string();
        let Error::NonFiniteGradNorm { rank: r, norm, parameters, .. } = error else {
            panic!("rank {rank}: expected NonFiniteGradNorm, got {message}")
        };
        assert_eq!(r, rank);
        assert!(norm.is_nan(), "rank {rank}: norm {norm}");
        // The first parameter in layout order (the root unit's first) leads.
        assert!(parameters.first().is_some_and(|p| p.starts_with("`module.0.weight`")), "{parameters:?}");
        assert!(message.contains("the gradient of `module.0.weight`"), "{message}");
        assert!(unchanged, "rank {rank}: a refused clip changed the gradients");
    }
    let refused = launch(LaunchOptions::new(1), |ctx| {
        let (model, _, _) = build(Some(&snapshot), DType::F32, Nested::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let mut grads = GradStore::default();
        Ok(fsdp.clip_grad_norm(&mut grads, 1.0, 0.5).unwrap_err().to_string())
    })
    .unwrap();
    assert!(refused[0].contains("norm_type must be at least 1"), "{}", refused[0]);
}

/// One rank's shard gradient holds one non-finite element; the other rank's are finite:
/// both ranks get the error (the other naming no parameter of its own), and neither
/// scales its gradients, which a clip to 1e-3 would otherwise change.
#[test]
fn a_non_finite_element_on_one_rank_stops_the_clip_on_every_rank() {
    let (_, _, snapshot) = build(None, DType::F32, Nested::new).unwrap();
    for (norm_type, poison) in [(2.0, f32::INFINITY), (f64::INFINITY, f32::NAN)] {
        let results = candle_fsdp::launch_each(LaunchOptions::new(2), |ctx| {
            let (model, _, _) = build(Some(&snapshot), DType::F32, Nested::new)?;
            let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
            let x = input(ctx.rank);
            let mut grads = fsdp.backward(&fsdp.forward(|m| m.forward(&x))?.sum_all()?)?;
            let first = fsdp.parameters()[0].clone();
            if ctx.rank == 1 {
                let mut values = grads.get(first.as_tensor()).unwrap().to_vec1::<f32>()?;
                values[0] = poison;
                grads.insert(first.as_tensor(), Tensor::new(values.as_slice(), &candle_core::Device::Cpu)?);
            }
            let bits = |grads: &GradStore| -> Vec<Vec<u32>> {
                fsdp.parameters()
                    .iter()
                    .filter_map(|v| grads.get(v.as_tensor()))
                    .map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect())
                    .collect()
            };
            let before = bits(&grads);
            let outcome = fsdp.clip_grad_norm(&mut grads, 1e-3, norm_type);
            Ok((outcome, before == bits(&grads)))
        })
        .unwrap();
        for (rank, result) in results.into_iter().enumerate() {
            let (outcome, unchanged) = result.unwrap();
            match outcome {
                Err(Error::NonFiniteGradNorm { parameters, .. }) => {
                    let expected: &[&str] = if rank == 1 { &["`module.0.weight` (unit `<root>`)"] } else { &[] };
                    assert_eq!(parameters, expected, "p = {norm_type}, rank {rank}");
                }
                other => panic!("p = {norm_type}, rank {rank}: expected NonFiniteGradNorm, got {other:?}"),
            }
            assert!(unchanged, "p = {norm_type}, rank {rank}: a refused clip changed the gradients");
        }
    }
}
