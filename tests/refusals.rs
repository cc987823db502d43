//! What the library refuses, on every rank and well within the timeout, with an error that
//! says what: ranks whose models differ in shapes, dtypes or names with equal counts, a
//! backward without a forward, a loss that reaches no forward output, a panic inside a
//! unit's collective (reported as the panic, not as its peers' aborts), and access to
//! the model only while its parameters are gathered.

use candle_core::{DType, Device, Module, Tensor};
use candle_fsdp::dist::Error as CommError;
use candle_fsdp::{launch, launch_each, Error, Fsdp, FsdpConfig, LaunchOptions, Shardable, Unit};
use candle_fsdp::{ConfigError, MisuseError};
use candle_nn::{Optimizer, SGD};
use fsdp_testkit::fsdp_test_models::NestedWrappedModule;
use std::time::{Duration, Instant};

const LR: f64 = 0.1;

use fsdp_testkit as common;

/// Long enough that finishing far below it shows a refusal did not wait for it.
const TIMEOUT: Duration = Duration::from_secs(20);
const FAST: Duration = Duration::from_secs(5);

fn options(world: usize) -> LaunchOptions {
    LaunchOptions::new(world).timeout(TIMEOUT)
}

fn input(rank: usize) -> Tensor {
    common::rand(1 + rank as u64, &[4, 8])
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[derive(Shardable)]
struct OneTensor {
    block: Unit<Weight>,
}

#[derive(Shardable)]
struct Weight {
    w: Tensor,
}

#[derive(Shardable)]
struct OneTensorRenamed {
    block: Unit<Gain>,
}

#[derive(Shardable)]
struct Gain {
    g: Tensor,
}

/// Rank 0 wraps `OneTensor { w: (2, 6) f32 }`; rank 1 the variant `case` names. Every
/// count (units, tensors, elements) agrees.
fn wrap_disagreeing(
    rank: usize,
    case: &str,
    comm: std::sync::Arc<dyn candle_fsdp::dist::Collectives>,
) -> candle_fsdp::Result<()> {
    let tensor = |shape: (usize, usize), dtype| Tensor::zeros(shape, dtype, &Device::Cpu);
    let config = FsdpConfig::default();
    match (rank, case) {
        (0, _) => Fsdp::wrap(OneTensor { block: Unit::new(Weight { w: tensor((2, 6), DType::F32)? }) }, comm, config)
            .map(drop),
        (_, "shape") => {
            Fsdp::wrap(OneTensor { block: Unit::new(Weight { w: tensor((6, 2), DType::F32)? }) }, comm, config)
                .map(drop)
        }
        (_, "dtype") => {
            Fsdp::wrap(OneTensor { block: Unit::new(Weight { w: tensor((2, 6), DType::F64)? }) }, comm, config)
                .map(drop)
        }
        (_, "name") => {
            Fsdp::wrap(OneTensorRenamed { block: Unit::new(Gain { g: tensor((2, 6), DType::F32)? }) }, comm, config)
                .map(drop)
        }
        _ => unreachable!(),
    }
}

#[test]
fn ranks_with_equal_counts_but_different_shapes_dtypes_or_names_are_refused() {
    for (case, rank0_says, rank1_says) in
        [("shape", "[2, 6]", "[6, 2]"), ("dtype", "F32", "F64"), ("name", "block.w", "block.g")]
    {
        let started = Instant::now();
        let outcomes = launch_each(options(2), |ctx| wrap_disagreeing(ctx.rank, case, ctx.comm.clone())).unwrap();
        assert!(started.elapsed() < FAST, "{case}: took {:?}", started.elapsed());
        for (rank, outcome) in outcomes.iter().enumerate() {
            match outcome {
                Err(error @ Error::Config(ConfigError::RanksDisagree { rank: r, .. })) if *r == rank => {
                    let message = error.to_string();
                    assert!(
                        message.contains(rank0_says) && message.contains(rank1_says),
                        "{case}, rank {rank}: the error shows both sides: {message}"
                    );
                }
                other => panic!("{case}, rank {rank}: expected RanksDisagree, got {other:?}"),
            }
        }
    }
}

#[test]
fn backward_without_a_forward_is_refused_and_the_ranks_stay_in_step() {
    let (_, _, snapshot) = common::build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let losses = launch(options(2), |ctx| {
        let (model, _, _) = common::build(Some(&snapshot), DType::F32, NestedWrappedModule::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let stray = input(ctx.rank).sum_all()?;
        match fsdp.backward(&stray) {
            Err(Error::Misuse(MisuseError::BackwardWithoutForward { rank })) => assert_eq!(rank, ctx.rank),
            other => panic!("rank {}: expected BackwardWithoutForward, got {other:?}", ctx.rank),
        }
        // No collective was issued: the ranks train on together.
        let loss = fsdp.forward(|m| m.forward(&input(ctx.rank)))?.sum_all()?;
        let grads = fsdp.backward(&loss)?;
        assert!(fsdp.parameters().iter().all(|p| grads.get(p.as_tensor()).is_some()));
        Ok(loss.to_scalar::<f32>()?)
    })
    .unwrap();
    assert_eq!(losses.len(), 2);
}

#[test]
fn a_loss_that_reaches_no_forward_output_is_refused_at_world_one() {
    let outcome = launch(options(1), |ctx| {
        let (model, _, _) = common::build(None, DType::F32, NestedWrappedModule::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let _out = fsdp.forward(|m| m.forward(&input(0)))?;
        fsdp.backward(&input(0).sum_all()?).map(drop)
    });
    assert!(matches!(outcome, Err(Error::Misuse(MisuseError::LossReachesNoOutput { rank: 0 }))), "{outcome:?}");
}

#[test]
fn a_loss_that_reaches_no_output_on_one_rank_fails_its_peers_at_once_naming_it() {
    let (_, _, snapshot) = common::build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let started = Instant::now();
    let outcomes = launch_each(options(3), |ctx| {
        let (model, _, _) = common::build(Some(&snapshot), DType::F32, NestedWrappedModule::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let out = fsdp.forward(|m| m.forward(&input(ctx.rank)))?;
        let loss = if ctx.rank == 2 { input(ctx.rank).sum_all()? } else { out.sum_all()? };
        fsdp.backward(&loss).map(drop)
    })
    .unwrap();
    assert!(started.elapsed() < FAST, "took {:?}", started.elapsed());
    assert!(
        matches!(outcomes[2], Err(Error::Misuse(MisuseError::LossReachesNoOutput { rank: 2 }))),
        "{:?}",
        outcomes[2]
    );
    for rank in [0, 1] {
        match &outcomes[rank] {
            Err(Error::Comm(CommError::CollectiveAborted { rank: r, reason, .. })) => {
                assert_eq!(*r, rank);
                assert!(reason.contains("rank 2") && reason.contains("reaches none"), "rank {rank}: {reason}");
            }
            other => panic!("rank {rank}: expected CollectiveAborted, got {other:?}"),
        }
    }
    // `launch` folds to the cause.
    let cause = launch(options(2), |ctx| {
        let (model, _, _) = common::build(Some(&snapshot), DType::F32, NestedWrappedModule::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let out = fsdp.forward(|m| m.forward(&input(ctx.rank)))?;
        let loss = if ctx.rank == 1 { input(ctx.rank).sum_all()? } else { out.sum_all()? };
        fsdp.backward(&loss).map(drop)
    })
    .unwrap_err();
    assert!(matches!(cause, Error::Misuse(MisuseError::LossReachesNoOutput { rank: 1 })), "{cause}");
}

/// Rank 1 panics inside its forward while rank 0 waits in the next unit's all-gather:
/// `launch` returns rank 1's panic, not rank 0's abort, although rank 0 comes first.
#[test]
fn launch_returns_the_panicking_rank_not_the_peer_it_aborted() {
    let (_, _, snapshot) = common::build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let started = Instant::now();
    let cause = launch(options(2), |ctx| {
        let (model, _, _) = common::build(Some(&snapshot), DType::F32, NestedWrappedModule::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let out = fsdp.forward(|m| {
            if ctx.rank == 1 {
                panic!("rank 1 breaks inside the model");
            }
            m.forward(&input(ctx.rank))
        })?;
        fsdp.backward(&out.sum_all()?).map(drop)
    })
    .unwrap_err();
    assert!(started.elapsed() < FAST, "took {:?}", started.elapsed());
    match cause {
        Error::RankPanicked { rank: 1, message } => {
            assert!(message.contains("breaks inside"), "{message}")
        }
        other => panic!("expected rank 1's panic, got {other}"),
    }
}

/// A plain single-process copy of `NestedWrappedModule` is the reference for what the
/// gathered model computes, and, trained one SGD step on both ranks' inputs, for what the
/// unwrapped model computes.
#[test]
fn the_model_is_reachable_only_with_full_parameters() {
    let (reference, _, snapshot) = common::build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let expected = reference.forward(&input(0)).unwrap();
    let results = launch(options(2), |ctx| {
        let (model, _, _) = common::build(Some(&snapshot), DType::F32, NestedWrappedModule::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        // Between steps the units are released; inside the scope they are gathered.
        let summoned = fsdp.summon_full_params(|m| m.forward(&input(0)))??;
        let full = fsdp.full_parameters()?;
        assert_eq!(fsdp.diagnostics().memory().gathered_bytes, 0, "the scope freed what it gathered");

        // Refused between a forward and its backward, and the step still completes.
        let out = fsdp.forward(|m| m.forward(&input(ctx.rank)))?;
        match fsdp.summon_full_params(|_| ()) {
            Err(Error::Misuse(MisuseError::StepInProgress { rank, .. })) => assert_eq!(rank, ctx.rank),
            other => panic!("rank {}: expected StepInProgress, got {other:?}", ctx.rank),
        }
        fsdp.backward(&out.sum_all()?)?;

        // A failing inference closure leaves training usable.
        let failed = fsdp.forward_inference(|_| -> candle_core::Result<Tensor> { candle_core::bail!("no input") });
        assert!(failed.is_err());
        let out = fsdp.forward(|m| m.forward(&input(ctx.rank)))?;
        let grads = fsdp.backward(&out.sum_all()?)?;
        SGD::new(fsdp.parameters(), LR)?.step(&grads)?;

        let plain = fsdp.into_inner()?;
        let unwrapped = plain.forward(&input(0))?;
        Ok((summoned, full, unwrapped))
    })
    .unwrap();
    // The same step in one process: the mean of the two ranks' losses, plain SGD.
    let (trained, var_map, _) = common::build(Some(&snapshot), DType::F32, NestedWrappedModule::new).unwrap();
    let loss = ((trained.forward(&input(0)).unwrap().sum_all().unwrap()
        + trained.forward(&input(1)).unwrap().sum_all().unwrap())
    .unwrap()
        / 2.0)
        .unwrap();
    SGD::new(var_map.all_vars(), LR).unwrap().backward_step(&loss).unwrap();
    let trained_output = trained.forward(&input(0)).unwrap();
    for (rank, (summoned, full, unwrapped)) in results.into_iter().enumerate() {
        common::assert_close(
            &summoned,
            &expected,
            common::F32_ATOL,
            common::F32_RTOL,
            &format!("rank {rank}: summoned forward"),
        );
        for (name, value) in &full {
            assert_eq!(values(value), values(&snapshot.0[name]), "rank {rank}: full value of {name}");
        }
        // The unwrapped model holds the trained values and runs without the runtime.
        common::assert_close(
            &unwrapped,
            &trained_output,
            common::F32_ATOL,
            common::F32_RTOL,
            &format!("rank {rank}: unwrapped forward"),
        );
    }
}

/// A rank's closure may use `?` on the caller's own errors (I/O, `anyhow`, the data
/// path's); the error comes back as it was, naming the rank, and the peers stop at once.
#[test]
fn a_rank_closure_brings_in_any_error_with_question_mark_naming_the_rank() {
    let started = Instant::now();
    let io = launch(options(2), |ctx| {
        if ctx.rank == 1 {
            std::fs::read("/nonexistent/candle-fsdp/file")?;
        }
        ctx.comm.barrier("after the read")?;
        Ok(())
    })
    .expect_err("rank 1 failed");
    assert!(started.elapsed() < FAST, "the peer waited for its timeout");
    assert!(matches!(&io, Error::InRank { rank: 1, source } if source.is::<std::io::Error>()), "{io:?}");
    assert!(io.to_string().starts_with("rank 1: "), "{io}");

    let from_anyhow = launch(options(1), |_| {
        Err(anyhow::anyhow!("the tokenizer is missing"))?;
        Ok(())
    })
    .expect_err("failed");
    assert_eq!(from_anyhow.to_string(), "rank 0: the tokenizer is missing");

    let data = launch(options(1), |_| {
        let tokens = candle_fsdp::data::TextTokenizer::Bytes.encode("ab")?;
        candle_fsdp::data::WindowSampler::new(tokens, 4, None)?;
        Ok(())
    })
    .expect_err("two tokens make no window");
    assert!(data.to_string().starts_with("rank 0: ") && data.to_string().contains("window"), "{data}");

    // Our own errors pass through `anyhow` and back unchanged.
    let ours = launch(options(1), |ctx| {
        let wrapped: anyhow::Error = Error::Misuse(MisuseError::BackwardWithoutForward { rank: ctx.rank }).into();
        Err(wrapped)?;
        Ok(())
    })
    .expect_err("failed");
    assert!(matches!(ours, Error::Misuse(MisuseError::BackwardWithoutForward { rank: 0 })), "{ours:?}");
}

/// Each thread rank runs on a CPU pool of its own: of its share of the cores (or what
/// the environment says), or of the count asked for.
#[test]
fn launch_runs_each_thread_rank_on_a_pool_of_its_own() {
    let cores = std::thread::available_parallelism().unwrap().get();
    let set = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0);
    let share = set("RAYON_NUM_THREADS").or_else(|| set("CANDLE_NUM_THREADS")).unwrap_or((cores / 2).max(1));
    assert_eq!(candle_fsdp::dist::cpu_threads_per_rank(2), share);
    // Inside its pool a rank runs on one of the pool's threads, so an op that needs one
    // thread runs where it is called.
    let pool = || Ok((rayon::current_num_threads(), rayon::current_thread_index().is_some()));
    assert_eq!(launch(options(2), |_| pool()).unwrap(), vec![(share, true); 2]);
    assert_eq!(launch(options(2).cpu_threads(3), |_| pool()).unwrap(), vec![(3, true); 2]);
    let outside = candle_fsdp::dist::run_on_cpu_threads(2, rayon::current_num_threads).unwrap();
    assert_eq!(outside, 2);
}
