//! The thread backend of the collectives, through `launch` / `launch_each`: the results of
//! every operation at world sizes 1-4 against values computed here independently,
//! sub-groups, and the failure modes (a rank that never joins, a panicking rank, ranks
//! calling different operations, invalid arguments), each of which must end in an error
//! naming the cause instead of a hang.

use candle_core::{DType, Device, Tensor};
use candle_fsdp::dist::Collectives;
use candle_fsdp::dist::Error as CommError;
use candle_fsdp::dist::ReduceOp;
use candle_fsdp::dist::ThreadWorld;
use candle_fsdp::{launch, launch_each, Error, LaunchOptions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const WORLDS: [usize; 4] = [1, 2, 3, 4];

/// Failures must arrive well before this (a hang check, not a benchmark).
const PROMPT: Duration = Duration::from_secs(10);

fn tensor(values: &[f32]) -> Tensor {
    Tensor::from_slice(values, values.len(), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec1::<f32>().unwrap()
}

/// Rank `rank`'s contribution: `len` integers `100·rank + i + 1` (exact in f32).
fn input_values(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| (100 * rank + i + 1) as f32).collect()
}

fn input(rank: usize, len: usize) -> Tensor {
    tensor(&input_values(rank, len))
}

/// Element `i` of the sum over ranks `ranks` of their contributions.
fn sum_at(ranks: &[usize], len: usize, i: usize) -> f32 {
    ranks.iter().map(|&r| input_values(r, len)[i] as f64).sum::<f64>() as f32
}

/// Averages are sums times `1/n` in f32, so they may be one rounding off the exact quotient.
fn assert_avg(actual: &[f32], exact: &[f64], what: &str) {
    assert_eq!(actual.len(), exact.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(exact).enumerate() {
        assert!((*a as f64 - e).abs() <= 1e-6 * e.abs(), "{what}: element {i} is {a}, expected {e}");
    }
}

fn options(world: usize) -> LaunchOptions {
    LaunchOptions::new(world).timeout(Duration::from_secs(20))
}

// ---------------------------------------------------------------------------------------
// Results

#[test]
fn all_gather_concatenates_in_rank_order() {
    for world in WORLDS {
        let outputs = launch(options(world), |ctx| {
            assert_eq!((ctx.comm.rank(), ctx.comm.size(), ctx.comm.global_rank()), (ctx.rank, world, ctx.rank));
            Ok(values(&ctx.comm.all_gather(&input(ctx.rank, 3), "test")?.wait()?))
        })
        .unwrap();
        let expected: Vec<f32> = (0..world).flat_map(|r| input_values(r, 3)).collect();
        for (rank, output) in outputs.iter().enumerate() {
            assert_eq!(output, &expected, "world {world}, rank {rank}");
        }
    }
}

#[test]
fn reduce_scatter_sum_and_avg_give_each_rank_its_chunk() {
    for world in WORLDS {
        let chunk = 3;
        let len = world * chunk;
        let outputs = launch(options(world), |ctx| {
            let sum = ctx.comm.reduce_scatter(&input(ctx.rank, len), ReduceOp::Sum, "sum")?.wait()?;
            let avg = ctx.comm.reduce_scatter(&input(ctx.rank, len), ReduceOp::Avg, "avg")?.wait()?;
            Ok((values(&sum), values(&avg)))
        })
        .unwrap();
        let ranks: Vec<usize> = (0..world).collect();
        for (rank, (sum, avg)) in outputs.iter().enumerate() {
            let what = format!("world {world}, rank {rank}");
            let exact_sum: Vec<f32> = (0..chunk).map(|j| sum_at(&ranks, len, rank * chunk + j)).collect();
            assert_eq!(sum, &exact_sum, "{what}: reduce_scatter(Sum)");
            // Rank r's chunk j is the mean over q of 100q + r·chunk + j + 1.
            let exact_avg: Vec<f64> =
                (0..chunk).map(|j| 100.0 * (world - 1) as f64 / 2.0 + (rank * chunk + j + 1) as f64).collect();
            assert_avg(avg, &exact_avg, &format!("{what}: reduce_scatter(Avg)"));
        }
    }
}

#[test]
fn all_reduce_sum_and_avg() {
    for world in WORLDS {
        let len = 5;
        let outputs = launch(options(world), |ctx| {
            let sum = ctx.comm.all_reduce(&input(ctx.rank, len), ReduceOp::Sum, "sum")?.wait()?;
            let avg = ctx.comm.all_reduce(&input(ctx.rank, len), ReduceOp::Avg, "avg")?.wait()?;
            Ok((values(&sum), values(&avg)))
        })
        .unwrap();
        let ranks: Vec<usize> = (0..world).collect();
        let exact_sum: Vec<f32> = (0..len).map(|i| sum_at(&ranks, len, i)).collect();
        let exact_avg: Vec<f64> = (0..len).map(|i| 100.0 * (world - 1) as f64 / 2.0 + (i + 1) as f64).collect();
        for (rank, (sum, avg)) in outputs.iter().enumerate() {
            assert_eq!(sum, &exact_sum, "world {world}, rank {rank}: all_reduce(Sum)");
            assert_avg(avg, &exact_avg, &format!("world {world}, rank {rank}: all_reduce(Avg)"));
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    for world in WORLDS {
        let outputs = launch(options(world), |ctx| {
            (0..world)
                .map(|root| Ok(values(&ctx.comm.broadcast(&input(ctx.rank, 4), root, "test")?.wait()?)))
                .collect::<candle_fsdp::Result<Vec<_>>>()
        })
        .unwrap();
        for (rank, by_root) in outputs.iter().enumerate() {
            for (root, output) in by_root.iter().enumerate() {
                assert_eq!(output, &input_values(root, 4), "world {world}, rank {rank}, root {root}");
            }
        }
    }
}

#[test]
fn f64_tensors_keep_their_dtype() {
    for world in WORLDS {
        let outputs = launch(options(world), |ctx| {
            let x = input(ctx.rank, 2).to_dtype(DType::F64)?;
            let gathered = ctx.comm.all_gather(&x, "test")?.wait()?;
            let summed = ctx.comm.all_reduce(&x, ReduceOp::Sum, "test")?.wait()?;
            assert_eq!((gathered.dtype(), summed.dtype()), (DType::F64, DType::F64));
            Ok((gathered.to_vec1::<f64>()?, summed.to_vec1::<f64>()?))
        })
        .unwrap();
        let gathered: Vec<f64> = (0..world).flat_map(|r| input_values(r, 2)).map(f64::from).collect();
        let ranks: Vec<usize> = (0..world).collect();
        let summed: Vec<f64> = (0..2).map(|i| sum_at(&ranks, 2, i) as f64).collect();
        for output in outputs {
            assert_eq!(output, (gathered.clone(), summed.clone()), "world {world}");
        }
    }
}

#[test]
fn barrier_waits_for_every_rank() {
    for world in WORLDS {
        let arrived = AtomicUsize::new(0);
        let seen = launch(options(world), |ctx| {
            // Later ranks arrive later; nobody may leave before the last arrives.
            std::thread::sleep(Duration::from_millis(20 * ctx.rank as u64));
            arrived.fetch_add(1, Ordering::SeqCst);
            ctx.comm.barrier("test")?;
            Ok(arrived.load(Ordering::SeqCst))
        })
        .unwrap();
        assert_eq!(seen, vec![world; world], "world {world}: arrivals each rank saw after the barrier");
    }
}

#[test]
fn operations_are_issued_before_they_are_waited_on() {
    // Each rank issues three collectives, then waits on them in another order.
    for world in WORLDS {
        let outputs = launch(options(world), |ctx| {
            let gather = ctx.comm.all_gather(&input(ctx.rank, 2), "first")?;
            let reduce = ctx.comm.all_reduce(&input(ctx.rank, 2), ReduceOp::Sum, "second")?;
            let cast = ctx.comm.broadcast(&input(ctx.rank, 2), world - 1, "third")?;
            let (c, r, g) = (cast.wait()?, reduce.wait()?, gather.wait()?);
            Ok((values(&g), values(&r), values(&c)))
        })
        .unwrap();
        let ranks: Vec<usize> = (0..world).collect();
        let gathered: Vec<f32> = (0..world).flat_map(|r| input_values(r, 2)).collect();
        let summed: Vec<f32> = (0..2).map(|i| sum_at(&ranks, 2, i)).collect();
        for output in outputs {
            assert_eq!(output, (gathered.clone(), summed.clone(), input_values(world - 1, 2)), "world {world}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Sub-groups

#[test]
fn group_of_one_rank_returns_its_own_input() {
    for world in WORLDS {
        let outputs = launch(options(world), |ctx| {
            let group = ctx.comm.new_group(&[ctx.rank])?;
            assert_eq!((group.rank(), group.size(), group.global_rank()), (0, 1, ctx.rank));
            let x = input(ctx.rank, 4);
            let results = vec![
                values(&group.all_gather(&x, "one")?.wait()?),
                values(&group.reduce_scatter(&x, ReduceOp::Sum, "one")?.wait()?),
                values(&group.reduce_scatter(&x, ReduceOp::Avg, "one")?.wait()?),
                values(&group.all_reduce(&x, ReduceOp::Sum, "one")?.wait()?),
                values(&group.all_reduce(&x, ReduceOp::Avg, "one")?.wait()?),
                values(&group.broadcast(&x, 0, "one")?.wait()?),
            ];
            group.barrier("one")?;
            // An output is a buffer of its own: changing the input later leaves it be.
            let var = candle_core::Var::from_tensor(&x)?;
            let gathered = group.all_gather(var.as_tensor(), "one")?.wait()?;
            var.set(&(x.clone() * 0.0)?)?;
            assert_eq!(values(&gathered), input_values(ctx.rank, 4), "an all_gather output aliases its input");
            // The world group still works alongside.
            let world_sum = values(&ctx.comm.all_reduce(&x, ReduceOp::Sum, "world")?.wait()?);
            Ok((results, world_sum))
        })
        .unwrap();
        let ranks: Vec<usize> = (0..world).collect();
        let world_sum: Vec<f32> = (0..4).map(|i| sum_at(&ranks, 4, i)).collect();
        for (rank, (results, sum)) in outputs.iter().enumerate() {
            for (op, result) in results.iter().enumerate() {
                assert_eq!(result, &input_values(rank, 4), "world {world}, rank {rank}, operation {op}");
            }
            assert_eq!(sum, &world_sum, "world {world}, rank {rank}: world all_reduce");
        }
    }
}

#[test]
fn two_disjoint_pairs_at_world_four() {
    let outputs = launch(options(4), |ctx| {
        let pair: Vec<usize> = if ctx.rank < 2 { vec![0, 1] } else { vec![2, 3] };
        // Listed in descending order: the group orders its ranks ascending anyway.
        let listed: Vec<usize> = pair.iter().rev().copied().collect();
        let group = ctx.comm.new_group(&listed)?;
        assert_eq!((group.rank(), group.size(), group.global_rank()), (ctx.rank % 2, 2, ctx.rank));
        let x = input(ctx.rank, 4);
        let gathered = values(&group.all_gather(&x, "pair")?.wait()?);
        // A world collective between the pair's collectives.
        let world_sum = values(&ctx.comm.all_reduce(&x, ReduceOp::Sum, "world")?.wait()?);
        let summed = values(&group.all_reduce(&x, ReduceOp::Sum, "pair")?.wait()?);
        let scattered = values(&group.reduce_scatter(&x, ReduceOp::Sum, "pair")?.wait()?);
        let cast = values(&group.broadcast(&x, 1, "pair")?.wait()?);
        group.barrier("pair")?;
        Ok((pair, gathered, world_sum, summed, scattered, cast))
    })
    .unwrap();
    let all: Vec<usize> = (0..4).collect();
    for (rank, (pair, gathered, world_sum, summed, scattered, cast)) in outputs.into_iter().enumerate() {
        let what = format!("rank {rank} in pair {pair:?}");
        let expected: Vec<f32> = pair.iter().flat_map(|&r| input_values(r, 4)).collect();
        assert_eq!(gathered, expected, "{what}: all_gather");
        assert_eq!(world_sum, (0..4).map(|i| sum_at(&all, 4, i)).collect::<Vec<_>>(), "{what}: world all_reduce");
        assert_eq!(summed, (0..4).map(|i| sum_at(&pair, 4, i)).collect::<Vec<_>>(), "{what}: all_reduce");
        let chunk = (rank % 2) * 2;
        assert_eq!(
            scattered,
            (chunk..chunk + 2).map(|i| sum_at(&pair, 4, i)).collect::<Vec<_>>(),
            "{what}: reduce_scatter"
        );
        assert_eq!(cast, input_values(pair[1], 4), "{what}: broadcast from the pair's rank 1");
    }
}

#[test]
fn two_groups_over_the_same_ranks_do_not_mix() {
    // Both ranks create two groups over {0, 1}, then issue one all_reduce on each in
    // opposite orders: each result comes from its own group's calls only.
    let outputs = launch(options(2), |ctx| {
        let first = ctx.comm.new_group(&[0, 1])?;
        let second = ctx.comm.new_group(&[0, 1])?;
        let a = tensor(&[1.0 + ctx.rank as f32]);
        let b = tensor(&[10.0 * (1.0 + ctx.rank as f32)]);
        let (on_first, on_second) = if ctx.rank == 0 {
            let w1 = first.all_reduce(&a, ReduceOp::Sum, "first")?;
            let w2 = second.all_reduce(&b, ReduceOp::Sum, "second")?;
            (w1, w2)
        } else {
            let w2 = second.all_reduce(&b, ReduceOp::Sum, "second")?;
            let w1 = first.all_reduce(&a, ReduceOp::Sum, "first")?;
            (w1, w2)
        };
        Ok((values(&on_first.wait()?), values(&on_second.wait()?)))
    })
    .unwrap();
    assert_eq!(outputs, vec![(vec![3.0], vec![30.0]); 2]);
}

#[test]
fn new_group_refuses_groups_without_the_caller_or_with_unknown_ranks() {
    let outcomes = launch(options(2), |ctx| {
        let without_me = ctx.comm.new_group(&[1 - ctx.rank]).err();
        let unknown = ctx.comm.new_group(&[ctx.rank, 2]).err();
        Ok((without_me.map(|e| e.to_string()), unknown.map(|e| e.to_string())))
    })
    .unwrap();
    for (rank, (without_me, unknown)) in outcomes.into_iter().enumerate() {
        let without_me = without_me.unwrap_or_else(|| panic!("rank {rank}: a group without it was accepted"));
        assert!(without_me.contains(&format!("rank {rank} is not a member")), "{without_me}");
        let unknown = unknown.unwrap_or_else(|| panic!("rank {rank}: a group naming rank 2 of 2 was accepted"));
        assert!(unknown.contains("names rank 2"), "{unknown}");
    }
}

// ---------------------------------------------------------------------------------------
// Failures

#[test]
fn rank_that_never_joins_times_out_naming_it() {
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let outcomes = launch_each(LaunchOptions::new(2).timeout(timeout), |ctx| {
        if ctx.rank == 1 {
            return Ok(()); // never joins
        }
        ctx.comm.all_reduce(&input(ctx.rank, 4), ReduceOp::Sum, "unit `a.b`")?.wait()?;
        Ok(())
    })
    .unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed < PROMPT, "the timeout took {elapsed:?}");
    assert!(elapsed >= timeout, "rank 0 gave up after {elapsed:?}, before its timeout of {timeout:?}");
    assert!(outcomes[1].is_ok(), "rank 1 returned early without error");
    match &outcomes[0] {
        Err(Error::Comm(CommError::CollectiveTimeout { rank: 0, missing, op, label, timeout: t })) => {
            assert_eq!(missing, &vec![1], "missing ranks");
            assert_eq!((op.as_str(), label.as_str(), *t), ("all_reduce", "unit `a.b`", timeout));
        }
        other => panic!("rank 0: expected a CollectiveTimeout, got {other:?}"),
    }
    let message = outcomes[0].as_ref().unwrap_err().to_string();
    assert!(message.contains("[1] never joined"), "{message}");

    // `launch` reports the same failure.
    let error = launch(LaunchOptions::new(2).timeout(timeout), |ctx| {
        if ctx.rank == 0 {
            ctx.comm.barrier("late barrier")?;
        }
        Ok(())
    })
    .unwrap_err();
    assert!(
        matches!(&error, Error::Comm(CommError::CollectiveTimeout { rank: 0, missing, .. }) if missing == &vec![1]),
        "{error:?}"
    );
}

#[test]
fn missing_rank_in_a_world_of_three_fails_every_waiting_rank_promptly() {
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let outcomes = launch_each(LaunchOptions::new(3).timeout(timeout), |ctx| {
        if ctx.rank == 1 {
            return Ok(());
        }
        ctx.comm.all_gather(&input(ctx.rank, 2), "test")?.wait()?;
        Ok(())
    })
    .unwrap();
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
    assert!(outcomes[1].is_ok());
    for rank in [0, 2] {
        // The first rank to time out aborts the world; the other may see that abort.
        match &outcomes[rank] {
            Err(Error::Comm(CommError::CollectiveTimeout { rank: r, missing, .. })) => {
                assert_eq!((*r, missing), (rank, &vec![1]))
            }
            Err(Error::Comm(CommError::CollectiveAborted { rank: r, reason, .. })) => {
                assert_eq!(*r, rank);
                assert!(reason.contains("[1] never joined"), "rank {rank}: {reason}");
            }
            other => panic!("rank {rank}: expected a timeout naming rank 1, got {other:?}"),
        }
    }
    assert!(
        outcomes.iter().any(|o| matches!(o, Err(Error::Comm(CommError::CollectiveTimeout { .. })))),
        "at least one rank reports the timeout itself"
    );
}

#[test]
fn panicking_rank_aborts_the_others_promptly() {
    // The default 60 s timeout: the others must be woken by the abort, not time out.
    let started = Instant::now();
    let outcomes = launch_each(LaunchOptions::new(3), |ctx| {
        if ctx.rank == 1 {
            std::thread::sleep(Duration::from_millis(50)); // let the others wait first
            panic!("rank one blew up");
        }
        ctx.comm.all_reduce(&input(ctx.rank, 2), ReduceOp::Sum, "unit `x`")?.wait()?;
        Ok(())
    })
    .unwrap();
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
    match &outcomes[1] {
        Err(Error::RankPanicked { rank: 1, message }) => {
            assert!(message.contains("rank one blew up"), "{message}")
        }
        other => panic!("rank 1: expected RankPanicked, got {other:?}"),
    }
    for rank in [0, 2] {
        match &outcomes[rank] {
            Err(Error::Comm(CommError::CollectiveAborted { rank: r, op, label, reason })) => {
                assert_eq!((*r, op.as_str(), label.as_str()), (rank, "all_reduce", "unit `x`"));
                assert!(reason.contains("rank 1"), "rank {rank}: the reason does not name rank 1: {reason}");
            }
            other => panic!("rank {rank}: expected CollectiveAborted, got {other:?}"),
        }
    }

    // `launch` returns the panic itself, not one of the aborts it caused.
    let started = Instant::now();
    let error = launch(LaunchOptions::new(3), |ctx| {
        if ctx.rank == 2 {
            panic!("rank two blew up");
        }
        ctx.comm.barrier("test")?;
        Ok(())
    })
    .unwrap_err();
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
    match error {
        Error::RankPanicked { rank: 2, message } => {
            assert!(message.contains("rank two blew up"), "{message}")
        }
        other => panic!("expected RankPanicked for rank 2, got {other:?}"),
    }
}

/// Runs a two-rank world in which the ranks' collectives disagree; both must get
/// `CollectiveMismatch` promptly.
fn assert_mismatch(
    what: &str,
    call: impl Fn(&dyn Collectives, usize) -> candle_fsdp::Result<Tensor> + Sync,
) -> Vec<String> {
    let started = Instant::now();
    let outcomes = launch_each(LaunchOptions::new(2), |ctx| call(ctx.comm.as_ref(), ctx.rank)).unwrap();
    assert!(started.elapsed() < PROMPT, "{what}: took {:?}", started.elapsed());
    outcomes
        .into_iter()
        .enumerate()
        .map(|(rank, outcome)| match outcome {
            Err(error @ Error::Comm(CommError::CollectiveMismatch { .. })) => {
                let Error::Comm(CommError::CollectiveMismatch { rank: r, .. }) = &error else { unreachable!() };
                assert_eq!(*r, rank, "{what}: the error names the wrong rank: {error}");
                error.to_string()
            }
            other => panic!("{what}: rank {rank}: expected CollectiveMismatch, got {other:?}"),
        })
        .collect()
}

#[test]
fn different_operations_are_a_mismatch_on_both_ranks() {
    for first in [0, 1] {
        // `first` issues before the other rank, so both orders of arrival are covered.
        let messages = assert_mismatch(&format!("rank {first} first"), |comm, rank| {
            if rank != first {
                std::thread::sleep(Duration::from_millis(50));
            }
            if rank == 0 {
                Ok(comm.all_gather(&input(rank, 4), "gather")?.wait()?)
            } else {
                Ok(comm.all_reduce(&input(rank, 4), ReduceOp::Sum, "reduce")?.wait()?)
            }
        });
        for message in &messages {
            assert!(message.contains("all_gather") && message.contains("all_reduce"), "{message}");
        }
    }
}

#[test]
fn different_lengths_are_a_mismatch_on_both_ranks() {
    for first in [0, 1] {
        let messages = assert_mismatch(&format!("rank {first} first"), |comm, rank| {
            if rank != first {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(comm.all_reduce(&input(rank, 4 + 2 * rank), ReduceOp::Sum, "reduce")?.wait()?)
        });
        for message in &messages {
            assert!(message.contains("of 4 ") && message.contains("of 6 "), "{message}");
        }
    }
}

#[test]
fn world_of_zero_ranks_and_ranks_outside_the_world_are_refused() {
    assert!(matches!(ThreadWorld::new(0, Duration::from_secs(1)), Err(CommError::EmptyWorld)));
    assert!(matches!(launch(LaunchOptions::new(0), |_| Ok(())), Err(Error::Comm(CommError::EmptyWorld))));
    let world = ThreadWorld::new(2, Duration::from_secs(1)).unwrap();
    assert_eq!(world.size(), 2);
    assert!(world.communicator(1).is_ok());
    for rank in [2, 3, 100] {
        match world.communicator(rank) {
            Err(CommError::NoSuchRank { rank: refused, world_size }) => {
                assert_eq!((refused, world_size), (rank, 2))
            }
            Err(other) => panic!("rank {rank}: expected NoSuchRank, got {other:?}"),
            Ok(_) => panic!("rank {rank}: a communicator outside a world of 2 was created"),
        }
    }
}

#[test]
fn reduce_scatter_of_indivisible_length_is_refused() {
    for world in [2, 3, 4] {
        let outcomes = launch(options(world), |ctx| {
            let len = world + 1;
            let refused = match ctx.comm.reduce_scatter(&input(ctx.rank, len), ReduceOp::Avg, "odd") {
                Err(error @ CommError::CollectiveArgument { .. }) => error.to_string(),
                Err(other) => panic!("rank {}: expected a CollectiveArgument error, got {other:?}", ctx.rank),
                Ok(_) => panic!("rank {}: {len} elements were accepted for {world} ranks", ctx.rank),
            };
            // The refused call left the communicator in step: the next collective works.
            let sum = values(&ctx.comm.all_reduce(&tensor(&[1.0]), ReduceOp::Sum, "after")?.wait()?);
            Ok((refused, sum))
        })
        .unwrap();
        for (rank, (message, sum)) in outcomes.into_iter().enumerate() {
            assert!(message.contains(&format!("{} elements", world + 1)), "world {world}, rank {rank}: {message}");
            assert_eq!(sum, vec![world as f32], "world {world}, rank {rank}");
        }
    }
}

#[test]
fn broadcast_from_a_root_outside_the_group_is_refused() {
    let outcomes = launch(options(2), |ctx| Ok(ctx.comm.broadcast(&input(ctx.rank, 2), 2, "test").is_err())).unwrap();
    assert_eq!(outcomes, vec![true, true]);
}
