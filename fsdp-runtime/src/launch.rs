//! Runs one closure per rank, each on its own thread with its own communicator, and joins
//! them. A rank that returns an error or panics aborts the world, so the others fail fast
//! with an error naming it rather than waiting out their timeouts.
//!
//! The CPU kernels (candle's matmuls and reductions, the fused ops) split their work over
//! the rayon pool they are called from. Each thread rank runs on a pool of its own, with
//! its share of the cores: its ops split over its threads and no other rank's, and an op on
//! a one-thread pool runs where it is called instead of being handed to another thread.
//! Measured on 2 cores, a 2-rank step of the bench's model took 60 ms with one thread per
//! rank in the process-wide pool and 34 ms with one pool per rank. candle's elementwise
//! kernels use a process-wide pool of their own, which candle sizes once from
//! `CANDLE_NUM_THREADS` (else the physical cores): a program running several ranks sets it
//! to the per-rank share in its environment (`fsdp-run` does for its children); this
//! library never changes the environment, which is not safe while other threads run.

use crate::error::{Error, Result};
use candle_core::Device;
use fsdp_comm::{Collectives, RankContext, ThreadWorld};
use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

/// How to start the ranks.
#[derive(Clone, Copy, Debug)]
pub struct LaunchOptions {
    /// How many ranks to start, one thread each.
    pub world_size: usize,
    /// The longest any collective waits for its peers.
    pub timeout: Duration,
    /// Stack size of each rank's thread. candle's backward walks the graph recursively,
    /// so deep models need more than the default 2 MiB.
    pub stack_size: usize,
    /// The threads of each CPU rank's own pool (see [`run_on_cpu_threads`]); `None`: its
    /// share of the cores, [`cpu_threads_per_rank`].
    pub cpu_threads: Option<usize>,
}

/// The stack of a rank's threads: candle's backward walks the graph recursively, so deep
/// models need more than the default 2 MiB.
pub const RANK_STACK_SIZE: usize = 256 << 20;

impl LaunchOptions {
    /// `world_size` ranks with a 60 s collective timeout, a 256 MiB stack per rank and
    /// each CPU rank's share of the cores.
    pub fn new(world_size: usize) -> Self {
        Self { world_size, timeout: Duration::from_secs(60), stack_size: RANK_STACK_SIZE, cpu_threads: None }
    }

    /// Sets the threads of each CPU rank's pool.
    pub fn cpu_threads(mut self, threads: usize) -> Self {
        self.cpu_threads = Some(threads);
        self
    }

    /// Sets the longest any collective waits for its peers.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// How many CPU threads each of `ranks` ranks of this process gets: `RAYON_NUM_THREADS`
/// (or `CANDLE_NUM_THREADS`) when the environment sets one, else the available cores
/// divided by `ranks`, at least 1. More threads than cores per rank oversubscribe the
/// cores, as candle's kernels spin-wait.
pub fn cpu_threads_per_rank(ranks: usize) -> usize {
    let set = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0);
    set("RAYON_NUM_THREADS").or_else(|| set("CANDLE_NUM_THREADS")).unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / ranks.max(1)).max(1)
    })
}

/// Runs `f` on a CPU thread pool of its own with `threads` threads (stacks of
/// [`RANK_STACK_SIZE`]), and returns what it returns: candle's CPU kernels called inside
/// split their work over those threads only. A process that is one rank runs its training
/// so (with [`cpu_threads_per_rank`] of its node's local ranks); [`launch`] does it for
/// each thread rank. A panic in `f` resumes in the caller.
pub fn run_on_cpu_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .stack_size(RANK_STACK_SIZE)
        .thread_name(|i| format!("cpu-{i}"))
        .build()
        .map_err(|e| Error::CpuThreads { threads, message: e.to_string() })?;
    Ok(pool.install(f))
}

/// Sizes the process-wide CPU pool to this process's share of the cores.
#[deprecated(
    since = "0.1.0",
    note = "it set environment variables; run each rank on a pool of its own: `run_on_cpu_threads(cpu_threads_per_rank(ranks), ..)` (`launch` does it for thread ranks)"
)]
pub fn share_cpu_cores(ranks: usize) -> usize {
    let threads = cpu_threads_per_rank(ranks);
    // Refused once the pool exists; the count asked for is still the rank's share.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).stack_size(RANK_STACK_SIZE).build_global();
    threads
}

/// Runs `f` on every rank and returns each rank's own result, in rank order.
pub fn launch_each<R, F>(options: LaunchOptions, f: F) -> Result<Vec<Result<R>>>
where
    R: Send,
    F: Fn(RankContext) -> Result<R> + Sync,
{
    let threads = options.cpu_threads.unwrap_or_else(|| cpu_threads_per_rank(options.world_size));
    let world = ThreadWorld::new(options.world_size, options.timeout)?;
    let connect = |rank| {
        let comm: Arc<dyn Collectives> = Arc::new(world.communicator(rank)?);
        Ok(RankContext { rank, world_size: options.world_size, comm, device: Device::Cpu })
    };
    run_rank_threads(options, Some(threads), connect, |reason| world.abort(reason), f)
}

/// One thread per rank: `connect` makes the rank's context on its own thread (NCCL
/// communicators are set up by all ranks at once, each on the thread that will use it),
/// then `f` runs, on a pool of `cpu_threads` threads of the rank's own when given (CPU
/// ranks; a GPU rank stays on its thread, which its device is bound to). A failing or
/// panicking rank calls `abort` so its peers fail fast.
fn run_rank_threads<R, F>(
    options: LaunchOptions,
    cpu_threads: Option<usize>,
    connect: impl Fn(usize) -> Result<RankContext> + Sync,
    abort: impl Fn(String) + Sync,
    f: F,
) -> Result<Vec<Result<R>>>
where
    R: Send,
    F: Fn(RankContext) -> Result<R> + Sync,
{
    let (connect, abort, f) = (&connect, &abort, &f);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..options.world_size)
            .map(|rank| {
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .stack_size(options.stack_size)
                    .spawn_scoped(scope, move || {
                        let run = || f(connect(rank)?);
                        let run = || match cpu_threads {
                            Some(threads) => run_on_cpu_threads(threads, run)?,
                            None => run(),
                        };
                        let outcome = match catch_unwind(AssertUnwindSafe(run)) {
                            Ok(Err(Error::External(source))) => Err(Error::InRank { rank, source }),
                            Ok(result) => result,
                            Err(payload) => Err(Error::RankPanicked { rank, message: panic_message(payload) }),
                        };
                        if let Err(error) = &outcome {
                            abort(format!("rank {rank} failed: {error}"));
                        }
                        outcome
                    })
                    .map_err(|e| Error::Rank { rank, message: format!("could not start its thread: {e}") })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, handle)| {
                let handle = handle?;
                handle
                    .join()
                    .unwrap_or_else(|payload| Err(Error::RankPanicked { rank, message: panic_message(payload) }))
            })
            .map(Ok)
            .collect()
    })
}

/// Runs `f` on GPUs `0..world_size` of this machine, one thread and one NCCL communicator
/// per GPU, all in this process, and returns each rank's own result. The ranks meet
/// through a store on a free loopback port. A failing rank's peers fail at their next
/// collective's timeout (NCCL has no cross-thread wake-up short of aborting, which the
/// watchdog does).
#[cfg(feature = "cuda")]
pub fn launch_gpus_each<R, F>(options: LaunchOptions, f: F) -> Result<Vec<Result<R>>>
where
    R: Send,
    F: Fn(RankContext) -> Result<R> + Sync,
{
    use fsdp_comm::{gpu_count, NcclComm, Store, StoreServer};
    let gpus = gpu_count(0)?;
    if gpus < options.world_size {
        return Err(fsdp_comm::Error::NotEnoughGpus { rank: 0, wanted: options.world_size, visible: gpus }.into());
    }
    let server = StoreServer::bind("127.0.0.1:0")?;
    let addr = server.local_addr().to_string();
    let connect = |rank| {
        let store = Store::connect(&addr, rank, options.timeout)?;
        let device = Device::new_cuda(rank)?;
        let Device::Cuda(cuda) = &device else { unreachable!("new_cuda returns a CUDA device") };
        let comm: Arc<dyn Collectives> =
            Arc::new(NcclComm::world(cuda, store, rank, options.world_size, options.timeout)?);
        Ok(RankContext { rank, world_size: options.world_size, comm, device })
    };
    let outcomes = run_rank_threads(options, None, connect, |reason| tracing::error!("{reason}"), f);
    drop(server);
    outcomes
}

/// Runs `f` on every rank; all results in rank order, or the error that caused the
/// failure (a rank's own error before the aborts it triggered on the others).
pub fn launch<R, F>(options: LaunchOptions, f: F) -> Result<Vec<R>>
where
    R: Send,
    F: Fn(RankContext) -> Result<R> + Sync,
{
    all_or_cause(launch_each(options, f)?)
}

/// [`launch_gpus_each`], folded like [`launch`].
#[cfg(feature = "cuda")]
pub fn launch_gpus<R, F>(options: LaunchOptions, f: F) -> Result<Vec<R>>
where
    R: Send,
    F: Fn(RankContext) -> Result<R> + Sync,
{
    all_or_cause(launch_gpus_each(options, f)?)
}

/// Every rank's result, or the error that caused the failure: a rank's own error before
/// the aborts it triggered on the others.
fn all_or_cause<R>(outcomes: Vec<Result<R>>) -> Result<Vec<R>> {
    if outcomes.iter().all(|o| o.is_ok()) {
        return Ok(outcomes.into_iter().map(|o| o.expect("checked")).collect());
    }
    let mut errors: Vec<Error> = outcomes.into_iter().filter_map(|o| o.err()).collect();
    let cause =
        errors.iter().position(|e| !matches!(e, Error::Comm(fsdp_comm::Error::CollectiveAborted { .. }))).unwrap_or(0);
    Err(errors.swap_remove(cause))
}

pub(crate) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}
