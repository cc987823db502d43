//! Scoped full parameters: what `summon_units` and `summon_full_params_with` show equals
//! the values the model was built from; an edit written back trains on exactly as the same edit in one
//! process does (under every strategy, at 2 and 3 ranks); `rank0_only` runs on rank 0
//! alone; what cannot work is refused, not hung.

use candle_fsdp::MisuseError;
use fsdp_testkit as common;

use candle_core::{DType, Module, Tensor};
use candle_fsdp::{launch, Error, Fsdp, FsdpConfig, LaunchOptions, RankContext, ShardingStrategy, SummonOptions};
use candle_nn::{Optimizer, SGD};
use common::fsdp_test_models::NestedWrappedModule as Nested;
use common::{build, Snapshot};
use std::collections::BTreeMap;

const LR: f64 = 0.1;

fn input(rank: usize) -> Tensor {
    common::rand(1 + rank as u64, &[4, 8])
}

/// This rank's `NestedWrappedModule`, built from `snapshot` and wrapped.
fn wrapped(ctx: &RankContext, snapshot: &Snapshot, config: FsdpConfig) -> candle_fsdp::Result<Fsdp<Nested>> {
    let (model, _, _) = build(Some(snapshot), DType::F32, Nested::new)?;
    Fsdp::wrap(model, ctx.comm.clone(), config)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

/// Halves a tensor in place, as a user's edit of the full values.
fn halve(t: &Tensor) {
    t.slice_set(&(t * 0.5).unwrap(), 0, 0).unwrap();
}

/// The root unit's parameters: the whole-model edit reaches only these (a `Unit`'s
/// layers are reached through `run` only).
const ROOT: [&str; 2] = ["module.0.", "module.3."];

/// One process: the parameters `edited` picks halved, then an SGD step on the global
/// batch of `world`.
fn reference(snapshot: &Snapshot, world: usize, edited: impl Fn(&str) -> bool) -> BTreeMap<String, Tensor> {
    let (model, var_map, _) = build(Some(snapshot), DType::F32, Nested::new).unwrap();
    let vars = var_map.data().lock().unwrap().clone();
    for (name, var) in &vars {
        if edited(name) {
            var.set(&(var.as_tensor() * 0.5).unwrap()).unwrap();
        }
    }
    let inputs: Vec<Tensor> = (0..world).map(input).collect();
    let loss = (model.forward(&Tensor::cat(&inputs, 0).unwrap()).unwrap().sum_all().unwrap() / world as f64).unwrap();
    SGD::new(vars.values().cloned().collect(), LR).unwrap().step(&loss.backward().unwrap()).unwrap();
    vars.into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect()
}

#[test]
fn an_edit_written_back_trains_on_as_in_one_process() {
    let (_, _, snapshot) = build(None, DType::F32, Nested::new).unwrap();
    let writeback = SummonOptions { writeback: true, ..SummonOptions::default() };
    for world in [2, 3] {
        let every = reference(&snapshot, world, |_| true);
        let root = reference(&snapshot, world, |name| ROOT.iter().any(|p| name.starts_with(p)));
        for strategy in ShardingStrategy::ALL {
            for by_unit in [true, false] {
                let expected = if by_unit { &every } else { &root };
                let what =
                    format!("{world} ranks, {strategy}, {}", if by_unit { "unit by unit" } else { "whole model" });
                let ranks = launch(LaunchOptions::new(world), |ctx| {
                    let fsdp = wrapped(&ctx, &snapshot, FsdpConfig::default().strategy(strategy))?;
                    if by_unit {
                        fsdp.summon_units(writeback, |_, params| params.iter().for_each(|(_, t)| halve(t)))?;
                    } else {
                        fsdp.summon_full_params_with(writeback, |m| {
                            for linear in [&m.module.0, &m.module.3] {
                                halve(linear.weight());
                                halve(linear.bias().unwrap());
                            }
                        })?;
                    }
                    let x = input(ctx.rank);
                    let loss = fsdp.forward(|m| m.forward(&x))?.sum_all()?;
                    SGD::new(fsdp.parameters(), LR)?.step(&fsdp.backward(&loss)?)?;
                    Ok(fsdp.full_parameters()?.into_iter().collect::<BTreeMap<_, _>>())
                })
                .unwrap();
                for (rank, params) in ranks.iter().enumerate() {
                    for (fqn, value) in params {
                        common::assert_close(
                            value,
                            &expected[fqn],
                            1e-6,
                            1e-5,
                            &format!("{what}: rank {rank}'s `{fqn}`"),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn what_is_shown_equals_the_values_wrapped_and_rank0_only_runs_on_rank_0() {
    let (_, _, snapshot) = build(None, DType::F32, Nested::new).unwrap();
    let ranks = launch(LaunchOptions::new(2), |ctx| {
        let fsdp = wrapped(&ctx, &snapshot, FsdpConfig::default())?;
        let shown: Vec<(String, Vec<u32>)> = fsdp
            .summon_units(SummonOptions::default(), |_, params| {
                params.iter().map(|(fqn, t)| (fqn.clone(), bits(t))).collect::<Vec<_>>()
            })?
            .into_iter()
            .flatten()
            .collect();
        let rank0_only = SummonOptions { rank0_only: true, ..SummonOptions::default() };
        let ran = fsdp.summon_full_params_with(rank0_only, |m| bits(m.module.3.weight()))?;
        Ok((shown, ran))
    })
    .unwrap();
    // Untrained, the full values are the snapshot every rank was built from.
    for (rank, (shown, ran)) in ranks.iter().enumerate() {
        assert_eq!(shown.len(), snapshot.0.len(), "rank {rank}: every parameter shown once");
        for (fqn, value) in shown {
            assert_eq!(value, &bits(&snapshot.0[fqn]), "rank {rank}: `{fqn}`");
        }
        assert_eq!(ran.as_ref(), (rank == 0).then(|| bits(&snapshot.0["module.3.weight"])).as_ref(), "rank {rank}");
    }
}

#[test]
fn what_cannot_work_is_refused() {
    let (_, _, snapshot) = build(None, DType::F32, Nested::new).unwrap();
    let messages = launch(LaunchOptions::new(2), |ctx| {
        let fsdp = wrapped(&ctx, &snapshot, FsdpConfig::default())?;
        let both = SummonOptions { writeback: true, rank0_only: true };
        let refused = fsdp.summon_units(both, |_, _| ()).unwrap_err().to_string();
        // Between a forward and its backward: an error on every rank, no hang.
        let x = input(ctx.rank);
        let loss = fsdp.forward(|m| m.forward(&x))?.sum_all()?;
        let mid_step = fsdp.summon_units(SummonOptions::default(), |_, _| ()).unwrap_err();
        assert!(matches!(mid_step, Error::Misuse(MisuseError::StepInProgress { .. })), "{mid_step}");
        fsdp.backward(&loss)?;
        Ok(refused)
    })
    .unwrap();
    assert!(messages.iter().all(|m| m.contains("rank0_only cannot write back")), "{messages:?}");
}
