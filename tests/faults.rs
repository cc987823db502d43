//! Faults end with errors on every rank, never a hang: a rank that panics mid-step, a rank
//! that never joins a collective, ranks that built different models, and a forward that
//! runs units out of the static order under the strict check.

use candle_core::{DType, Module, Tensor};
use candle_fsdp::dist::Error as CommError;
use candle_fsdp::{launch, launch_each, Error, Fsdp, FsdpConfig, LaunchOptions, OrderCheck, Shardable, Unit};
use candle_nn::Linear;
use fsdp_testkit::fsdp_test_models::NestedWrappedModule;
use std::time::{Duration, Instant};

use fsdp_testkit as common;

const TIMEOUT: Duration = Duration::from_millis(500);

fn input(rank: usize) -> Tensor {
    common::rand(1 + rank as u64, &[4, 8])
}

#[test]
fn a_rank_panicking_mid_step_fails_every_rank_at_once() {
    let (_, _, snapshot) = common::build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let started = Instant::now();
    let outcomes = launch_each(LaunchOptions::new(3).timeout(Duration::from_secs(30)), |ctx| {
        let (model, _, _) = common::build(Some(&snapshot), DType::F32, NestedWrappedModule::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        for step in 0..3 {
            let out = fsdp.forward(|m| {
                if ctx.rank == 1 && step == 1 {
                    panic!("injected fault in rank 1's forward");
                }
                m.forward(&input(ctx.rank))
            })?;
            fsdp.backward(&out.sum_all()?)?;
        }
        Ok(())
    })
    .unwrap();
    // The others were waiting for rank 1 in a collective: they fail as soon as it panics,
    // long before the 30 s timeout.
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    match &outcomes[1] {
        Err(Error::RankPanicked { rank: 1, message }) => {
            assert!(message.contains("injected fault"))
        }
        other => panic!("rank 1: {other:?}"),
    }
    for rank in [0, 2] {
        let error = outcomes[rank].as_ref().expect_err("the others must fail").to_string();
        assert!(error.contains(&format!("rank {rank}")), "{error}");
        assert!(error.contains("rank 1 failed") && error.contains("injected fault"), "{error}");
        assert!(error.contains("unit `"), "the error names the unit: {error}");
    }
    // `launch` reports the cause, not the aborts it triggered.
    let cause = launch(LaunchOptions::new(2), |ctx| -> candle_fsdp::Result<()> {
        if ctx.rank == 0 {
            panic!("rank 0 gives up");
        }
        Ok(ctx.comm.barrier("a barrier rank 0 never reaches")?)
    })
    .unwrap_err();
    assert!(matches!(cause, Error::RankPanicked { rank: 0, .. }), "{cause}");
}

#[test]
fn a_rank_that_never_joins_times_out_on_the_others() {
    let (_, _, snapshot) = common::build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let started = Instant::now();
    let outcomes = launch_each(LaunchOptions::new(2).timeout(TIMEOUT), |ctx| {
        let (model, _, _) = common::build(Some(&snapshot), DType::F32, NestedWrappedModule::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        if ctx.rank == 1 {
            return Ok(()); // leaves without running the step
        }
        let out = fsdp.forward(|m| m.forward(&input(ctx.rank)))?;
        fsdp.backward(&out.sum_all()?)?;
        Ok(())
    })
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(outcomes[1].is_ok());
    match &outcomes[0] {
        Err(Error::Comm(CommError::CollectiveTimeout { rank: 0, op, label, missing, .. })) => {
            assert_eq!(op, "all_gather");
            assert_eq!(label, "unit `<root>`");
            assert_eq!(missing, &vec![1]);
        }
        other => panic!("rank 0: {other:?}"),
    }
}

/// Rank 1's model has an extra layer: the wrap-time check refuses it on both ranks.
#[test]
fn ranks_with_different_models_are_refused_at_wrap() {
    #[derive(Shardable)]
    struct Stack {
        layers: Vec<Unit<Linear>>,
    }
    let outcomes = launch_each(LaunchOptions::new(2).timeout(TIMEOUT), |ctx| {
        let (model, _, _) = common::build(None, DType::F32, |vb| {
            let layers = (0..2 + ctx.rank)
                .map(|i| candle_nn::linear(4, 4, vb.pp(format!("layers.{i}"))).map(Unit::new))
                .collect::<candle_core::Result<_>>()?;
            Ok(Stack { layers })
        })?;
        Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default()).map(|_| ())
    })
    .unwrap();
    for (rank, outcome) in outcomes.iter().enumerate() {
        let error = outcome.as_ref().expect_err("must be refused").to_string();
        assert!(error.contains("the ranks built different models"), "rank {rank}: {error}");
        assert!(error.contains("3 units") && error.contains("4 units"), "rank {rank}: {error}");
    }
    let world_of_zero = launch(LaunchOptions::new(0), |_| Ok(()));
    assert!(matches!(world_of_zero, Err(Error::Comm(CommError::EmptyWorld))));
}

/// Two units declared `a`, `b` but run `b`, `a`.
#[derive(Shardable)]
struct Swapped {
    a: Unit<Linear>,
    b: Unit<Linear>,
}

impl Module for Swapped {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.a.forward(&self.b.forward(x)?)
    }
}

fn swapped(vb: candle_nn::VarBuilder) -> candle_core::Result<Swapped> {
    Ok(Swapped {
        a: Unit::new(candle_nn::linear(4, 4, vb.pp("a"))?),
        b: Unit::new(candle_nn::linear(4, 4, vb.pp("b"))?),
    })
}

#[test]
fn out_of_order_forward_is_an_error_under_the_strict_check() {
    let (_, _, snapshot) = common::build(None, DType::F32, swapped).unwrap();
    let outcomes = launch_each(LaunchOptions::new(2).timeout(TIMEOUT), |ctx| {
        let (model, _, _) = common::build(Some(&snapshot), DType::F32, swapped)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().order_check(OrderCheck::Strict))?;
        fsdp.forward(|m| m.forward(&common::rand(0, &[2, 4]))).map(|_| ())
    })
    .unwrap();
    for (rank, outcome) in outcomes.iter().enumerate() {
        let error = outcome.as_ref().expect_err("strict order check").to_string();
        assert!(error.contains("unit `b`") && error.contains("`a`"), "rank {rank}: {error}");
    }
}

/// Under the default warning the step runs to the end with the right output.
#[test]
fn out_of_order_forward_still_runs_under_the_warning() {
    let (reference, _, snapshot) = common::build(None, DType::F32, swapped).unwrap();
    let x = common::rand(0, &[2, 4]);
    let ref_out = reference.forward(&x).unwrap();
    let outs = launch(LaunchOptions::new(2).timeout(Duration::from_secs(30)), |ctx| {
        let (model, _, _) = common::build(Some(&snapshot), DType::F32, swapped)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let out = fsdp.forward(|m| m.forward(&x))?;
        fsdp.backward(&out.sum_all()?)?;
        Ok(out.detach())
    })
    .unwrap();
    for out in outs {
        common::assert_close(&out, &ref_out, common::F32_ATOL, common::F32_RTOL, "output");
    }
}

/// A unit given an input it does not use: the runtime ties every input into the first for
/// ordering, and candle's backward requires a gradient for each tracked tensor it reaches,
/// so the tie itself must supply one.
#[derive(Shardable)]
struct IgnoresSecondInput {
    first: Unit<Linear>,
    second: Unit<Linear>,
}

#[test]
fn a_unit_input_used_only_for_ordering_does_not_break_backward() {
    let ctor = |vb: candle_nn::VarBuilder| -> candle_core::Result<IgnoresSecondInput> {
        Ok(IgnoresSecondInput {
            first: Unit::new(candle_nn::linear(4, 4, vb.pp("first"))?),
            second: Unit::new(candle_nn::linear(4, 4, vb.pp("second"))?),
        })
    };
    let (_, _, snapshot) = common::build(None, DType::F32, ctor).unwrap();
    launch(LaunchOptions::new(2).timeout(Duration::from_secs(30)), |ctx| {
        let (model, _, _) = common::build(Some(&snapshot), DType::F32, ctor)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let x = common::rand(ctx.rank as u64, &[2, 4]);
        let out = fsdp.forward(|m| {
            let unused = m.first.forward(&x)?;
            // `second` receives `unused` but computes from `x` alone.
            m.second.run((x.clone(), unused), |layer, (x, _unused)| layer.forward(&x))
        })?;
        let grads = fsdp.backward(&out.sum_all()?)?;
        let (_, second_weight) = fsdp.named_parameters().into_iter().find(|(n, _)| n == "second.weight").unwrap();
        assert!(grads.get(second_weight.as_tensor()).is_some());
        Ok(())
    })
    .unwrap();
}
