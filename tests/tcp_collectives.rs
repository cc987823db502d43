//! The TCP backend of the collectives: ranks run as threads of this process, but each has
//! its own store client and `TcpComm`, so they talk over a real TCP mesh on loopback.
//!
//! Results are checked against values computed here and, bit for bit, against the thread
//! backend on the same random inputs (world sizes 1-4, lengths up to a few MB, every dtype
//! that travels); then sub-groups, the failure modes (ranks calling different operations, a
//! rank that never calls or never connects, a rank that drops its communicator) and FSDP
//! training over TCP against training over the thread backend.

use fsdp_testkit as common;

use candle_core::{DType, Device, Tensor};
use candle_fsdp::dist::Collectives;
use candle_fsdp::dist::ReduceOp;
use candle_fsdp::dist::TcpComm;
use candle_fsdp::dist::ThreadWorld;
use candle_fsdp::dist::{Error as CommError, Result as CommResult, Store, StoreServer};
use candle_fsdp::optim::{SgdMomentum, SgdMomentumConfig};
use candle_fsdp::{launch, Fsdp, FsdpConfig, LaunchOptions};
use candle_nn::Optimizer;
use fsdp_testkit::fsdp_test_models::NestedWrappedModule;
use std::collections::BTreeMap;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Long enough never to fire in a passing test.
const TIMEOUT: Duration = Duration::from_secs(20);
/// Failures must arrive well before this after their cause.
const PROMPT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------
// Running ranks

/// Runs `f(rank, store address)` on `world` threads next to a fresh store server.
fn spawn_ranks<R: Send>(world: usize, f: impl Fn(usize, &str) -> R + Sync) -> Vec<R> {
    let server = StoreServer::bind("127.0.0.1:0").expect("bind a store");
    let addr = server.local_addr().to_string();
    let (f, addr) = (&f, addr.as_str());
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .stack_size(64 << 20)
                    .spawn_scoped(scope, move || f(rank, addr))
                    .expect("spawn a rank")
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
    })
}

fn connect(rank: usize, world: usize, addr: &str, timeout: Duration) -> CommResult<TcpComm> {
    let store = Store::connect(addr, rank, TIMEOUT)?;
    TcpComm::connect(&store, rank, world, timeout)
}

/// Runs `f` on `world` ranks over TCP.
fn on_tcp<R: Send>(world: usize, f: impl Fn(usize, Arc<dyn Collectives>) -> R + Sync) -> Vec<R> {
    spawn_ranks(world, |rank, addr| {
        let comm: Arc<dyn Collectives> = Arc::new(connect(rank, world, addr, TIMEOUT).expect("connect"));
        f(rank, comm)
    })
}

/// Runs `f` on `world` ranks over the thread backend.
fn on_threads<R: Send>(world: usize, f: impl Fn(usize, Arc<dyn Collectives>) -> R + Sync) -> Vec<R> {
    let threads = ThreadWorld::new(world, TIMEOUT).unwrap();
    let comms: Vec<Arc<dyn Collectives>> =
        (0..world).map(|r| Arc::new(threads.communicator(r).unwrap()) as Arc<dyn Collectives>).collect();
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                std::thread::Builder::new()
                    .stack_size(64 << 20)
                    .spawn_scoped(scope, move || f(rank, comm))
                    .expect("spawn a rank")
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
    })
}

// ---------------------------------------------------------------------------------------
// Values

/// A tensor's dtype, shape and the exact bits of its elements (as f64, which holds every
/// value of the dtypes used here exactly, the sign of zero included).
fn bits(t: &Tensor) -> (DType, Vec<usize>, Vec<u64>) {
    let values = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    (t.dtype(), t.dims().to_vec(), values.into_iter().map(f64::to_bits).collect())
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_vec1::<f32>().unwrap()
}

/// Rank `rank`'s random input of world `world`.
fn random_input(world: usize, rank: usize, len: usize) -> Tensor {
    common::randn((1000 * world + rank) as u64, &[len])
}

/// Every operation once (broadcast from every root), on both backends' terms.
fn all_operations(comm: &dyn Collectives, input: &Tensor) -> CommResult<Vec<Tensor>> {
    let mut outputs = vec![
        comm.all_gather(input, "all_gather")?.wait()?,
        comm.reduce_scatter(input, ReduceOp::Sum, "reduce_scatter sum")?.wait()?,
        comm.reduce_scatter(input, ReduceOp::Avg, "reduce_scatter avg")?.wait()?,
        comm.all_reduce(input, ReduceOp::Sum, "all_reduce sum")?.wait()?,
        comm.all_reduce(input, ReduceOp::Avg, "all_reduce avg")?.wait()?,
    ];
    for root in 0..comm.size() {
        outputs.push(comm.broadcast(input, root, "broadcast")?.wait()?);
    }
    comm.barrier("barrier")?;
    Ok(outputs)
}

/// The elementwise sum in rank order in f32, as a reduction must compute it.
fn f32_sum(parts: &[Vec<f32>]) -> Vec<f32> {
    let mut total = parts[0].clone();
    for part in &parts[1..] {
        // Indexed loops: this file is built without optimizations, and the large cases
        // run over millions of elements.
        let mut i = 0;
        while i < total.len() {
            total[i] += part[i];
            i += 1;
        }
    }
    total
}

/// candle's `tensor / n`: a multiplication by `1/n` rounded to f32, plus zero.
fn f32_avg(sum: &[f32], n: usize) -> Vec<f32> {
    let scale = (1.0 / n as f64) as f32;
    let mut avg = sum.to_vec();
    let mut i = 0;
    while i < avg.len() {
        avg[i] = avg[i] * scale + 0.0;
        i += 1;
    }
    avg
}

fn assert_same_bits(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let mut i = 0;
    while i < actual.len() {
        if actual[i].to_bits() != expected[i].to_bits() {
            panic!("{what}: element {i} is {} but expected {}", actual[i], expected[i]);
        }
        i += 1;
    }
}

// ---------------------------------------------------------------------------------------
// Results

#[test]
fn results_match_hand_computed_values_and_the_thread_backend() {
    for world in 1..=4 {
        // The last length gives every rank a 3 MB input, which an all-gather sends to every
        // peer while receiving theirs.
        for len in [world, 13 * world, 3 << 18] {
            let chunk = len / world;
            let inputs: Vec<Tensor> = (0..world).map(|r| random_input(world, r, len)).collect();
            let values: Vec<Vec<f32>> = inputs.iter().map(f32s).collect();
            let run = |rank: usize, comm: Arc<dyn Collectives>| all_operations(comm.as_ref(), &inputs[rank]).unwrap();
            let tcp = on_tcp(world, run);
            let threads = on_threads(world, run);

            let sum = f32_sum(&values);
            let avg = f32_avg(&sum, world);
            let gathered: Vec<f32> = values.concat();
            for rank in 0..world {
                let what = |op: &str| format!("world {world}, length {len}, rank {rank}: {op}");
                let out = &tcp[rank];
                assert_eq!(out.len(), 5 + world);
                assert_same_bits(&f32s(&out[0]), &gathered, &what("all_gather"));
                let mine = rank * chunk..(rank + 1) * chunk;
                assert_same_bits(&f32s(&out[1]), &sum[mine.clone()], &what("reduce_scatter(Sum)"));
                assert_same_bits(&f32s(&out[2]), &avg[mine], &what("reduce_scatter(Avg)"));
                assert_same_bits(&f32s(&out[3]), &sum, &what("all_reduce(Sum)"));
                assert_same_bits(&f32s(&out[4]), &avg, &what("all_reduce(Avg)"));
                for root in 0..world {
                    assert_same_bits(&f32s(&out[5 + root]), &values[root], &what(&format!("broadcast from {root}")));
                }
                for (i, (t, r)) in out.iter().zip(&threads[rank]).enumerate() {
                    assert_eq!((t.dtype(), t.dims()), (r.dtype(), r.dims()), "{}", what(&format!("output {i}")));
                    assert_same_bits(&f32s(t), &f32s(r), &what(&format!("output {i} against the thread backend")));
                }
            }
        }
    }
}

#[test]
fn every_dtype_travels_bit_exactly() {
    let world = 3;
    let len = 6;
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16, DType::U8, DType::U32, DType::I64] {
        // Small integers, so that integer sums cannot overflow; fractions for the floats.
        let input = |rank: usize| {
            let values: Vec<f32> = (0..len).map(|i| ((7 * rank + i) % 50) as f32).collect();
            let t = Tensor::from_vec(values, len, &Device::Cpu).unwrap();
            let t = if dtype.is_float() { (t / 3.0).unwrap() } else { t };
            t.to_dtype(dtype).unwrap()
        };
        let run = |rank: usize, comm: Arc<dyn Collectives>| all_operations(comm.as_ref(), &input(rank)).unwrap();
        let tcp = on_tcp(world, run);
        let threads = on_threads(world, run);
        for rank in 0..world {
            for (i, (t, r)) in tcp[rank].iter().zip(&threads[rank]).enumerate() {
                assert_eq!(t.dtype(), dtype, "{dtype:?}, rank {rank}, output {i}: dtype");
                assert!(bits(t) == bits(r), "{dtype:?}, rank {rank}: output {i} differs from the thread backend's");
            }
            let gathered: Vec<u64> = (0..world).flat_map(|r| bits(&input(r)).2).collect();
            assert_eq!(bits(&tcp[rank][0]).2, gathered, "{dtype:?}, rank {rank}: all_gather");
        }
    }
}

#[test]
fn sub_groups_keep_their_messages_apart() {
    let world = 4;
    // Rank `r` of group `g` contributes `[10g + r]`; two groups over {0, 1} run at once and
    // are issued in opposite orders on their two ranks.
    let script = |rank: usize, comm: Arc<dyn Collectives>| -> Vec<(usize, usize, usize, Vec<f32>)> {
        let x = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        let mut out = Vec::new();
        let pair = comm.new_group(if rank < 2 { &[0, 1] } else { &[3, 2] }).unwrap();
        let odd_even = comm.new_group(if rank.is_multiple_of(2) { &[0, 2] } else { &[1, 3] }).unwrap();
        for g in [&pair, &odd_even] {
            let r = g.all_reduce(&x((10 * g.size() + g.global_rank()) as f32), ReduceOp::Sum, "sum").unwrap();
            out.push((g.rank(), g.size(), g.global_rank(), f32s(&r.wait().unwrap())));
        }
        if rank < 2 {
            let first = comm.new_group(&[0, 1]).unwrap();
            let second = comm.new_group(&[1, 0]).unwrap();
            let issue = |g: &dyn Collectives, v: f32| g.all_gather(&x(v), "gather").unwrap();
            let (a, b) = if rank == 0 {
                let a = issue(first.as_ref(), 1.0);
                (a, issue(second.as_ref(), 2.0))
            } else {
                let b = issue(second.as_ref(), 20.0);
                (issue(first.as_ref(), 10.0), b)
            };
            out.push((first.rank(), first.size(), first.global_rank(), f32s(&a.wait().unwrap())));
            out.push((second.rank(), second.size(), second.global_rank(), f32s(&b.wait().unwrap())));
        }
        comm.barrier("end").unwrap();
        out
    };
    let tcp = on_tcp(world, script);
    assert_eq!(tcp, on_threads(world, script));
    assert_eq!(
        tcp[0],
        vec![(0, 2, 0, vec![41.0]), (0, 2, 0, vec![42.0]), (0, 2, 0, vec![1.0, 10.0]), (0, 2, 0, vec![2.0, 20.0])]
    );
    assert_eq!(tcp[3], vec![(1, 2, 3, vec![45.0]), (1, 2, 3, vec![44.0])]);
}

// ---------------------------------------------------------------------------------------
// Failures

/// Every rank's error, after ranks `0..world` ran `f`; panics if one succeeded.
fn errors_of(results: Vec<CommResult<Tensor>>) -> Vec<CommError> {
    results.into_iter().enumerate().map(|(r, res)| res.err().unwrap_or_else(|| panic!("rank {r} succeeded"))).collect()
}

#[test]
fn ranks_calling_different_operations_get_a_mismatch() {
    type Call = fn(&dyn Collectives, usize) -> CommResult<Tensor>;
    let cases: [(&str, Call, Call, &str); 3] = [
        (
            "operation",
            |c, r| c.all_gather(&Tensor::new(&[r as f32; 4], &Device::Cpu)?, "unit `a`")?.wait(),
            |c, r| c.reduce_scatter(&Tensor::new(&[r as f32; 4], &Device::Cpu)?, ReduceOp::Sum, "unit `b`")?.wait(),
            "reduce_scatter of 4 F32 elements for unit `b`",
        ),
        (
            "length",
            |c, r| c.all_reduce(&Tensor::new(&[r as f32; 4], &Device::Cpu)?, ReduceOp::Sum, "unit `a`")?.wait(),
            |c, r| c.all_reduce(&Tensor::new(&[r as f32; 6], &Device::Cpu)?, ReduceOp::Sum, "unit `a`")?.wait(),
            "all_reduce of 6 F32 elements",
        ),
        (
            "dtype",
            |c, r| c.all_reduce(&Tensor::new(&[r as f32; 4], &Device::Cpu)?, ReduceOp::Sum, "unit `a`")?.wait(),
            |c, r| c.all_reduce(&Tensor::new(&[r as f64; 4], &Device::Cpu)?, ReduceOp::Sum, "unit `a`")?.wait(),
            "all_reduce of 4 F64 elements",
        ),
    ];
    for (what, first, second, seen_by_rank_0) in cases {
        let started = Instant::now();
        let results =
            on_tcp(2, |rank, comm| if rank == 0 { first(comm.as_ref(), 0) } else { second(comm.as_ref(), 1) });
        for (rank, error) in errors_of(results).into_iter().enumerate() {
            match &error {
                CommError::CollectiveMismatch { rank: r, other, .. } => {
                    assert_eq!(*r, rank, "{what}: {error}");
                    assert!(other.starts_with(&format!("rank {}'s", 1 - rank)), "{what}: {error}");
                    if rank == 0 {
                        assert!(other.contains(seen_by_rank_0), "{what}: {error}");
                    }
                }
                _ => panic!("{what}: rank {rank}: expected a mismatch, got: {error}"),
            }
        }
        assert!(started.elapsed() < PROMPT, "{what}: took {:?}", started.elapsed());
    }
}

#[test]
fn a_rank_that_never_calls_is_named_by_the_timeout() {
    let timeout = Duration::from_millis(800);
    let (done, wait_done) = mpsc::channel::<()>();
    let wait_done = std::sync::Mutex::new(wait_done);
    let started = Instant::now();
    let results = spawn_ranks(3, |rank, addr| {
        let comm = connect(rank, 3, addr, timeout)?;
        if rank == 2 {
            // Stays connected but never calls, until both others have failed.
            let waiter = wait_done.lock().unwrap();
            for _ in 0..2 {
                waiter.recv_timeout(TIMEOUT).expect("the others finish");
            }
            return Ok(Tensor::zeros(1, DType::F32, &Device::Cpu)?);
        }
        let result = comm.all_gather(&Tensor::new(&[1f32], &Device::Cpu)?, "unit `x`")?.wait();
        done.send(()).unwrap();
        result
    });
    let elapsed = started.elapsed();
    let errors = errors_of(results.into_iter().take(2).collect());
    let mut timeouts = 0;
    for error in &errors {
        match error {
            CommError::CollectiveTimeout { missing, op, label, .. } => {
                assert_eq!((missing.as_slice(), op.as_str(), label.as_str()), (&[2][..], "all_gather", "unit `x`"));
                timeouts += 1;
            }
            // The rank that timed out first aborts the other.
            CommError::CollectiveAborted { reason, .. } => {
                assert!(reason.contains("rank(s) [2] never joined"), "{error}")
            }
            _ => panic!("unexpected error: {error}"),
        }
    }
    assert!(timeouts >= 1, "{errors:?}");
    assert!(elapsed < timeout + PROMPT, "took {elapsed:?}");
}

#[test]
fn a_rank_that_never_connects_is_named_by_connect() {
    let timeout = Duration::from_millis(800);
    let started = Instant::now();
    let results = spawn_ranks(3, |rank, addr| if rank == 2 { None } else { Some(connect(rank, 3, addr, timeout)) });
    let elapsed = started.elapsed();
    for (rank, result) in results.into_iter().take(2).enumerate() {
        match result.unwrap() {
            Err(CommError::CollectiveTimeout { rank: r, op, missing, .. }) => {
                assert_eq!((r, op.as_str(), missing), (rank, "connect", vec![2]))
            }
            Err(error) => panic!("rank {rank}: expected a timeout, got: {error}"),
            Ok(_) => panic!("rank {rank} connected to a missing rank"),
        }
    }
    assert!(elapsed < timeout + PROMPT, "took {elapsed:?}");
}

#[test]
fn a_rank_that_drops_its_comm_aborts_the_others_promptly() {
    let (dropped, wait_dropped) = mpsc::channel::<()>();
    let wait_dropped = std::sync::Mutex::new(wait_dropped);
    let started = Instant::now();
    let results = spawn_ranks(3, |rank, addr| {
        let comm = connect(rank, 3, addr, TIMEOUT).expect("connect");
        let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        match rank {
            // Already waiting when rank 2 leaves.
            0 => Some((comm.all_gather(&x, "unit `pending`").unwrap().wait(), Instant::now())),
            // Calls only after rank 2 left.
            1 => {
                wait_dropped.lock().unwrap().recv_timeout(TIMEOUT).expect("rank 2 drops");
                Some((comm.all_gather(&x, "unit `later`").and_then(|w| w.wait()), Instant::now()))
            }
            _ => {
                std::thread::sleep(Duration::from_millis(200));
                drop(comm);
                dropped.send(()).unwrap();
                None
            }
        }
    });
    for (rank, result) in results.into_iter().take(2).enumerate() {
        let (result, at) = result.unwrap();
        match result {
            Err(error @ CommError::CollectiveAborted { .. }) => {
                assert!(error.to_string().contains("rank 2 closed its connection"), "rank {rank}: {error}")
            }
            Err(error) => panic!("rank {rank}: expected an abort, got: {error}"),
            Ok(_) => panic!("rank {rank}: the all_gather succeeded without rank 2"),
        }
        // Far sooner than the 20 s timeout.
        let elapsed = at - started;
        assert!(elapsed < PROMPT, "rank {rank} failed after {elapsed:?}");
    }
}

#[test]
fn a_finished_rank_does_not_break_groups_without_it() {
    let results = spawn_ranks(3, |rank, addr| {
        let comm = connect(rank, 3, addr, TIMEOUT).expect("connect");
        comm.barrier("start").unwrap();
        if rank == 2 {
            return None; // drops its communicator and leaves
        }
        std::thread::sleep(Duration::from_millis(200));
        let pair = comm.new_group(&[0, 1]).unwrap();
        let x = Tensor::new(&[rank as f32 + 1.0], &Device::Cpu).unwrap();
        let sum = pair.all_reduce(&x, ReduceOp::Sum, "pair").unwrap().wait().unwrap();
        let world = comm.all_reduce(&x, ReduceOp::Sum, "world").and_then(|w| w.wait());
        Some((f32s(&sum), world.is_err()))
    });
    assert_eq!(results, vec![Some((vec![3.0], true)), Some((vec![3.0], true)), None]);
}

// ---------------------------------------------------------------------------------------
// FSDP over TCP

const STEPS: usize = 3;

/// Every step's loss and the trained full parameters, as bits.
type Trained = (Vec<u64>, BTreeMap<String, (DType, Vec<usize>, Vec<u64>)>);

fn train(snapshot: &common::Snapshot, rank: usize, comm: Arc<dyn Collectives>) -> candle_fsdp::Result<Trained> {
    let (model, _, _) = common::build(Some(snapshot), DType::F32, NestedWrappedModule::new)?;
    let fsdp = Fsdp::wrap(model, comm, FsdpConfig::default())?;
    let mut opt = SgdMomentum::new(fsdp.parameters(), SgdMomentumConfig { lr: 1e-2, momentum: 0.9 })?;
    let x = common::rand(1 + rank as u64, &[4, 8]);
    let mut losses = Vec::new();
    for _ in 0..STEPS {
        let loss = fsdp.forward(|m| candle_core::Module::forward(m, &x))?.sum_all()?;
        losses.push(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?.to_bits());
        opt.step(&fsdp.backward(&loss)?)?;
    }
    let params = fsdp.full_parameters()?.into_iter().map(|(name, value)| (name, bits(&value))).collect();
    Ok((losses, params))
}

#[test]
fn fsdp_training_over_tcp_matches_the_thread_backend() {
    let (_, _, snapshot) = common::build(None, DType::F32, NestedWrappedModule::new).unwrap();
    let over_threads =
        launch(LaunchOptions::new(2).timeout(TIMEOUT), |ctx| train(&snapshot, ctx.rank, ctx.comm)).unwrap();
    let over_tcp = on_tcp(2, |rank, comm| train(&snapshot, rank, comm).unwrap());
    assert!(!over_tcp[0].1.is_empty());
    for rank in 0..2 {
        assert_eq!(over_tcp[rank].0, over_threads[rank].0, "rank {rank}: losses");
        for (name, value) in &over_threads[rank].1 {
            assert!(over_tcp[rank].1.get(name) == Some(value), "rank {rank}: parameter `{name}` differs");
        }
        assert_eq!(over_tcp[rank].1.len(), over_threads[rank].1.len());
    }
}
