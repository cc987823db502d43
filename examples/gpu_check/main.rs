//! The GPU check: one run that exercises the CUDA/NCCL path of candle-fsdp on one GPU and
//! prints every figure, section by section, each with PASS/FAIL lines.
//!
//! 1. Environment: libcuda and libnccl load (`check_libraries`), driver and NCCL versions,
//!    the GPUs with their names, compute capabilities and memory.
//! 2. Kernels: candle's CUDA kernels (PTX built for sm_90a) load on this driver and agree
//!    with the CPU (matmul, softmax, norms, casts, indexing, reductions, a backward, curand).
//! 3. NCCL collectives at world size 1 through `launch_gpus`: all-gather, reduce-scatter
//!    (Sum, Avg), all-reduce, broadcast, barrier and `new_group(&[0])` in f32, bf16, f16,
//!    f64 and u32, an input at a storage offset, a CPU input refused, and the bandwidth
//!    of a 256 MiB all-gather next to a plain device copy.
//! 4. Stream ordering between candle's compute stream and NCCL's stream, which world size
//!    1 shows as plainly as eight GPUs would: an input written by a long chain of kernels
//!    handed straight to a collective; collectives queued back to back, their outputs read
//!    at once by `to_dtype` and `cat`; an output dropped with its reader queued and its
//!    memory free for the next collective; each compared element by element.
//! 5. CUDA storage swap and device memory (`cuMemGetInfo` and the stream-ordered pool's
//!    counters) around wrap, an inference forward (must come back to the post-wrap level),
//!    a training forward, backward and AdamW step, against the expected byte counts.
//! 6. Parity: the small Llama trained with AdamW under FSDP (world 1, NCCL) against plain
//!    candle on the same GPU, same snapshot and batches, in six FSDP configurations, each
//!    with the world-1 shortcuts and with every collective run (`collectives_at_world_one`:
//!    all-gather, copy-out, reduce-scatter through NCCL, as on several GPUs); and a model
//!    built without values, whose GPU shards must hold a CPU rank's draw.
//! 7. The PyTorch test's backward-prefetch sequences (tests/backward_prefetch.rs) on the GPU.
//! 8. Step time: plain candle against FSDP world 1 (shortcuts, and every collective run)
//!    for the bench's small and medium Llama and a larger one, side by side in one run.
//!
//! Each section runs on a thread of its own and catches its own errors and panics, so a
//! failure in one does not hide the others. The exit status is 1 when any check failed,
//! 3 when the deadline (`--deadline-secs`) cut the run short.
//!
//! Build it with `cargo build --release --features cuda --example gpu_check` where a CUDA
//! compiler is; on the GPU machine run `examples/gpu_check.sh PATH/TO/gpu_check [--quick]`,
//! which finds NCCL and runs the sections that can hang first. With `$OUT` set, the whole
//! output is also written under `$OUT`.

#[path = "../common/mod.rs"]
mod common;

#[allow(dead_code)]
use fsdp_testkit::prefetch_test_fqns;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::cuda::cudarc::driver::{result as cu_result, sys as cu_sys, CudaContext};
use candle_core::cuda::cudarc::nccl::result as nccl_result;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_fsdp::dist::launch_gpus_each;
use candle_fsdp::dist::{check_libraries, gpu_count};
use candle_fsdp::dist::{ReduceOp, Work};
use candle_fsdp::model::Layout;
use candle_fsdp::models::llama::{Llama, LlamaConfig};
use candle_fsdp::models::transformer::{Transformer, TransformerConfig};
use candle_fsdp::models::Kernels;
use candle_fsdp::{
    launch, BackwardPrefetch, Fsdp, FsdpConfig, LaunchOptions, MetaModel, Plan, PlanConfig, RankContext, Shardable,
    ShardingStrategy, TraceEvent, Unit, UnshardCause,
};
use candle_nn::{AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap, SGD};
use clap::{Parser, ValueEnum};
use common::{human_count, llama_presets, median, BigramTask, Rng, DTYPE};
use std::collections::HashMap;
use std::fmt::Display;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Checks the CUDA/NCCL path of candle-fsdp on this machine's GPU and prints every figure.
///
/// Sections: 1 environment, 2 kernels, 3 NCCL collectives, 4 stream ordering, 5 storage
/// swap and memory, 6 parity with plain candle, 7 backward-prefetch sequences, 8 step time.
/// Exit status 1 if any check fails.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A shorter run: 6 measured steps in 1 round, 3 parity steps, timing models small
    /// and medium only (unless --models is given).
    #[arg(long)]
    quick: bool,

    /// Sections to run, comma-separated (1-9); all by default.
    #[arg(long, value_delimiter = ',')]
    sections: Vec<u32>,

    /// Measured training steps per timing run, in total over the rounds [default: 20;
    /// 6 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,

    /// Warm-up steps per timing run and round, not measured [default: 3; 2 with --quick].
    #[arg(long)]
    warmup: Option<u64>,

    /// Rounds of the timing section: the runs take turns (plain, plain on the NCCL
    /// rank's device, FSDP, plain, ...) [default: 2; 1 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: Option<u64>,

    /// Timing models, comma-separated [default: small,medium,large; small,medium with
    /// --quick].
    #[arg(long, value_delimiter = ',', value_enum)]
    models: Vec<ModelSize>,

    /// The large timing model: sequences per step.
    #[arg(long, default_value_t = 8)]
    large_batch: usize,
    /// The large timing model: tokens per sequence.
    #[arg(long, default_value_t = 512)]
    large_seq: usize,
    /// The large timing model: hidden size.
    #[arg(long, default_value_t = 1024)]
    large_hidden: usize,
    /// The large timing model: decoder layers.
    #[arg(long, default_value_t = 8)]
    large_layers: usize,
    /// The large timing model: MLP size.
    #[arg(long, default_value_t = 2816)]
    large_intermediate: usize,
    /// The large timing model: vocabulary.
    #[arg(long, default_value_t = 32000)]
    large_vocab: usize,
    /// The large timing model: attention heads.
    #[arg(long, default_value_t = 16)]
    large_heads: usize,
    /// The large timing model: key/value heads.
    #[arg(long, default_value_t = 8)]
    large_kv_heads: usize,

    /// Training steps of each parity run [default: 5; 3 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    parity_steps: Option<u64>,

    /// Parity tolerance, relative: every loss within rtol·|loss|, every parameter tensor
    /// within rtol·max|parameter|.
    #[arg(long, default_value_t = 1e-4)]
    parity_rtol: f64,

    /// Memory section: width of the square Linear layers (4 per unit).
    #[arg(long, default_value_t = 4096)]
    mem_hidden: usize,
    /// Memory section: number of units (each 4 Linear layers).
    #[arg(long, default_value_t = 2)]
    mem_units: usize,
    /// Memory section: rows of the input (kept small, so that a unit's parameters dwarf
    /// its activations).
    #[arg(long, default_value_t = 256)]
    mem_rows: usize,
    /// Memory section: tolerance of the memory comparisons, MiB.
    #[arg(long, default_value_t = 16.0)]
    mem_tol_mib: f64,

    /// The longest an NCCL collective or the rendezvous may take.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,

    /// Ends the run (with the summary so far, exit status 3) after this many seconds.
    #[arg(long, default_value_t = 570)]
    deadline_secs: u64,

    /// Also write the output to this file [default: $OUT/gpu_check.log when $OUT is set].
    #[arg(long)]
    log: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModelSize {
    Small,
    Medium,
    Large,
}

/// The resolved run settings.
struct Settings {
    steps: usize,
    warmup: usize,
    rounds: usize,
    parity_steps: usize,
    models: Vec<ModelSize>,
    timeout: Duration,
}

impl Settings {
    fn of(args: &Args) -> Self {
        let q = args.quick;
        let models = if !args.models.is_empty() {
            args.models.clone()
        } else if q {
            vec![ModelSize::Small, ModelSize::Medium]
        } else {
            vec![ModelSize::Small, ModelSize::Medium, ModelSize::Large]
        };
        Self {
            steps: args.steps.unwrap_or(if q { 6 } else { 20 }) as usize,
            warmup: args.warmup.unwrap_or(if q { 2 } else { 3 }) as usize,
            rounds: args.rounds.unwrap_or(if q { 1 } else { 2 }) as usize,
            parity_steps: args.parity_steps.unwrap_or(if q { 3 } else { 5 }) as usize,
            models,
            timeout: Duration::from_secs(args.timeout_secs),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Output: stdout, and the log file when there is one.

static LOG: Mutex<Option<std::fs::File>> = Mutex::new(None);

fn emit(line: &str) {
    println!("{line}");
    if let Some(file) = LOG.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        let _ = writeln!(file, "{line}");
        let _ = file.flush();
    }
}

macro_rules! out {
    ($($t:tt)*) => { emit(&format!($($t)*)) };
}

/// One section's checks and figures. Shared by reference with rank closures, so every
/// method takes `&self`.
#[derive(Default)]
struct Section {
    checks: AtomicUsize,
    failures: AtomicUsize,
    /// Key figures, repeated in the summary.
    figures: Mutex<Vec<String>>,
}

impl Section {
    /// Records a check; prints `PASS what` or `FAIL what`. Returns `ok`.
    fn check(&self, ok: bool, what: impl Display) -> bool {
        self.checks.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        out!("  {} {what}", if ok { "PASS" } else { "FAIL" });
        ok
    }

    /// A check whose outcome is an error: FAIL with the error's chain.
    fn check_result<T>(&self, what: impl Display, result: Result<T>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                self.check(false, format!("{what}: {e:#}"));
                None
            }
        }
    }

    fn info(&self, what: impl Display) {
        out!("       {what}");
    }

    /// A key figure: printed now and repeated in the summary.
    fn figure(&self, key: &str, value: impl Display) {
        let line = format!("{key}: {value}");
        out!("  ---> {line}");
        self.figures.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }
}

struct SectionResult {
    number: u32,
    title: &'static str,
    checks: usize,
    failures: usize,
    /// The error or panic that ended the section early.
    aborted: Option<String>,
    figures: Vec<String>,
    seconds: f64,
}

impl SectionResult {
    fn passed(&self) -> bool {
        self.failures == 0 && self.aborted.is_none()
    }
}

static RESULTS: Mutex<Vec<SectionResult>> = Mutex::new(Vec::new());
static CURRENT: Mutex<Option<(u32, &'static str)>> = Mutex::new(None);

/// Runs one section on a thread of its own (candle's backward recurses; the ranks get
/// 256 MiB stacks too), catching its errors and panics.
fn run_section(number: u32, title: &'static str, body: impl FnOnce(&Section) -> Result<()> + Send) {
    out!("\n==== {number}. {title} ====");
    *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = Some((number, title));
    let started = Instant::now();
    let section = Section::default();
    let outcome = std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("section-{number}"))
            .stack_size(LaunchOptions::new(1).stack_size)
            .spawn_scoped(scope, || catch_unwind(AssertUnwindSafe(|| body(&section))));
        match handle {
            Err(e) => Err(format!("could not start the section's thread: {e}")),
            Ok(handle) => match handle.join() {
                Ok(Ok(Ok(()))) => Ok(()),
                Ok(Ok(Err(e))) => Err(format!("error: {e:#}")),
                Ok(Err(payload)) | Err(payload) => Err(format!("panic: {}", panic_text(payload))),
            },
        }
    });
    let aborted = outcome.err();
    if let Some(reason) = &aborted {
        out!("  FAIL section ended early: {reason}");
    }
    let result = SectionResult {
        number,
        title,
        checks: section.checks.load(Ordering::Relaxed),
        failures: section.failures.load(Ordering::Relaxed),
        aborted,
        figures: std::mem::take(&mut *section.figures.lock().unwrap_or_else(|p| p.into_inner())),
        seconds: started.elapsed().as_secs_f64(),
    };
    out!(
        "---- section {number}: {} ({} checks, {} failed{}) in {:.1} s",
        if result.passed() { "PASS" } else { "FAIL" },
        result.checks,
        result.failures,
        if result.aborted.is_some() { ", ended early" } else { "" },
        result.seconds
    );
    RESULTS.lock().unwrap_or_else(|p| p.into_inner()).push(result);
    *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// Prints the summary of the sections run so far; true when all passed.
fn print_summary(started: Instant) -> bool {
    let results = RESULTS.lock().unwrap_or_else(|p| p.into_inner());
    out!("\n==================== SUMMARY ====================");
    out!("command: {}", command_line());
    for r in results.iter() {
        let status = if r.passed() { "PASS" } else { "FAIL" };
        out!(
            "{status}  {}. {} — {} checks, {} failed{} ({:.1} s)",
            r.number,
            r.title,
            r.checks,
            r.failures,
            r.aborted.as_ref().map(|a| format!(", ended early: {a}")).unwrap_or_default(),
            r.seconds
        );
        for f in &r.figures {
            out!("        {f}");
        }
    }
    let all = results.iter().all(|r| r.passed());
    out!(
        "overall: {} ({} section(s), {:.1} s in all)",
        if all { "PASS" } else { "FAIL" },
        results.len(),
        started.elapsed().as_secs_f64()
    );
    all
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------
// Small helpers.

/// Turns an error type that is only `Debug` into an anyhow error saying what failed.
trait Explain<T> {
    fn explain(self, what: &str) -> Result<T>;
}

impl<T, E: std::fmt::Debug> Explain<T> for std::result::Result<T, E> {
    fn explain(self, what: &str) -> Result<T> {
        self.map_err(|e| anyhow!("{what}: {e:?}"))
    }
}

/// Runs `f`: a block whose `?` ends only the block, not the section.
fn attempt<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    f()
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn signed_mib(bytes: i64) -> String {
    format!("{:+.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(values(t)?.iter().fold(0.0, |m, v| m.max(v.abs())))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    ensure!(a.shape() == b.shape(), "shapes differ: {:?} vs {:?}", a.shape(), b.shape());
    let (a, b) = (values(a)?, values(b)?);
    Ok(a.iter().zip(&b).fold(0.0, |m, (x, y)| if x.is_nan() || y.is_nan() { f64::NAN } else { m.max((x - y).abs()) }))
}

/// Standard normal values from the examples' deterministic generator, on the CPU.
fn randn_cpu(rng: &mut Rng, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2) = (rng.unit().max(1e-12), rng.unit());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn cuda_context(dev: &Device) -> Result<std::sync::Arc<CudaContext>> {
    match dev {
        Device::Cuda(cuda) => Ok(cuda.cuda_stream().context().clone()),
        other => bail!("expected a CUDA device, got {other:?}"),
    }
}

/// Waits for candle's stream, then for every stream of the context (NCCL's too).
fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    cuda_context(dev)?.synchronize().explain("cuCtxSynchronize")
}

/// Device memory as the driver and the stream-ordered pool see it, after a full sync and
/// after the pool is trimmed: the pool keeps freed memory cached even with a release
/// threshold of 0 (it hands back only whole free chunks at a sync), so `cuMemGetInfo` alone
/// would count the cache as if it were live.
#[derive(Clone, Copy, Debug)]
struct Mem {
    /// `total - free` from cuMemGetInfo after the trim: everything on the device, this
    /// process's context, cuBLAS workspaces and loaded modules included.
    used: usize,
    /// Bytes of the pool that cudarc's cuMemAllocAsync allocations are using now.
    pool_used: Option<u64>,
    /// Bytes the pool holds from the device after the trim (used, or free but in a chunk
    /// that is partly used).
    pool_reserved: Option<u64>,
    /// Bytes the pool held but no allocation used, handed back by the trim.
    pool_cached: Option<u64>,
}

impl Mem {
    fn show(&self) -> String {
        let pool = |v: Option<u64>| v.map(|b| mib(b as f64)).unwrap_or_else(|| "n/a".into());
        format!(
            "device used {} (pool: used {}, reserved {}; the trim released {} of cache)",
            mib(self.used as f64),
            pool(self.pool_used),
            pool(self.pool_reserved),
            pool(self.pool_cached)
        )
    }
}

fn mem(dev: &Device) -> Result<Mem> {
    use cu_sys::CUmemPool_attribute_enum::{CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, CU_MEMPOOL_ATTR_USED_MEM_CURRENT};
    sync(dev)?;
    let reserved_before = pool_attr(dev, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT);
    if let Some(pool) = mem_pool(dev) {
        // SAFETY: a pool of a live context; every stream is synchronised, so nothing freed
        // is still in flight.
        unsafe { cu_sys::cuMemPoolTrimTo(pool, 0) }.result().explain("cuMemPoolTrimTo")?;
    }
    let ctx = cuda_context(dev)?;
    let (free, total) = ctx.mem_get_info().explain("cuMemGetInfo")?;
    let pool_reserved = pool_attr(dev, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT);
    Ok(Mem {
        used: total - free,
        pool_used: pool_attr(dev, CU_MEMPOOL_ATTR_USED_MEM_CURRENT),
        pool_reserved,
        pool_cached: reserved_before.zip(pool_reserved).map(|(before, after)| before.saturating_sub(after)),
    })
}

fn mem_pool(dev: &Device) -> Option<cu_sys::CUmemoryPool> {
    let ctx = cuda_context(dev).ok()?;
    ctx.bind_to_thread().ok()?;
    // SAFETY: the device handle comes from a live context.
    unsafe { cu_result::device::get_mem_pool(ctx.cu_device()).ok() }
}

fn pool_attr(dev: &Device, attr: cu_sys::CUmemPool_attribute_enum) -> Option<u64> {
    let pool = mem_pool(dev)?;
    let mut value: u64 = 0;
    // SAFETY: the attributes asked for are all 64-bit values.
    let status = unsafe { cu_sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut std::ffi::c_void) };
    status.result().ok().map(|_| value)
}

/// Starts a new high-water mark of the pool's used bytes.
fn reset_pool_peak(dev: &Device) {
    if let Some(pool) = mem_pool(dev) {
        let mut zero: u64 = 0;
        // SAFETY: resetting the high-water mark takes a 64-bit zero.
        let _ = unsafe {
            cu_sys::cuMemPoolSetAttribute(
                pool,
                cu_sys::CUmemPool_attribute_enum::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut std::ffi::c_void,
            )
        };
    }
}

/// Runs `f` as the one rank of an NCCL world of size 1 on GPU 0 (`launch_gpus`).
fn on_gpu<R: Send>(timeout: Duration, f: impl Fn(RankContext) -> Result<R> + Sync) -> Result<R> {
    let outcomes = launch_gpus_each(LaunchOptions::new(1).timeout(timeout), |ctx| {
        let rank = ctx.rank;
        f(ctx).map_err(|e| candle_fsdp::Error::Rank { rank, message: format!("{e:#}") })
    })
    .context("launch_gpus_each")?;
    let outcome = outcomes.into_iter().next().ok_or_else(|| anyhow!("launch_gpus returned no rank"))?;
    Ok(outcome?)
}

// ---------------------------------------------------------------------------------------
// Models.

/// The bench's configurations plus a larger one.
struct Setup {
    name: &'static str,
    config: LlamaConfig,
    batch: usize,
    seq_len: usize,
}

fn setup(size: ModelSize, args: &Args) -> Setup {
    match size {
        ModelSize::Small => Setup { name: "small", config: llama_presets::small(), batch: 16, seq_len: 64 },
        ModelSize::Medium => Setup { name: "medium", config: llama_presets::medium(), batch: 16, seq_len: 128 },
        ModelSize::Large => Setup {
            name: "large",
            config: llama_presets::llama(
                args.large_vocab,
                args.large_hidden,
                args.large_intermediate,
                args.large_layers,
                (args.large_heads, args.large_kv_heads),
                args.large_seq,
            ),
            batch: args.large_batch,
            seq_len: args.large_seq,
        },
    }
}

fn describe(s: &Setup, numel: usize) -> String {
    format!("{}: {}; batch {} x {} tokens", s.name, common::describe_llama(&s.config, numel), s.batch, s.seq_len)
}

/// Builds the model once on the CPU: the snapshot every run starts from, and its size.
fn llama_snapshot(config: &LlamaConfig) -> Result<(HashMap<String, Tensor>, usize)> {
    let var_map = VarMap::new();
    let _model = Llama::new(config, VarBuilder::from_varmap(&var_map, DTYPE, &Device::Cpu))?;
    let snapshot = common::snapshot(&var_map)?;
    let numel = common::numel(snapshot.values());
    Ok((snapshot, numel))
}

/// A plain (unwrapped) Llama on `dev` whose variables hold the snapshot's values.
fn plain_llama(config: &LlamaConfig, snapshot: &HashMap<String, Tensor>, dev: &Device) -> Result<(Llama, VarMap)> {
    let var_map = VarMap::new();
    {
        let mut data = var_map.data().lock().map_err(|_| anyhow!("VarMap lock poisoned"))?;
        for (name, value) in snapshot {
            data.insert(name.clone(), Var::from_tensor(&value.to_device(dev)?)?);
        }
    }
    let model = Llama::new(config, VarBuilder::from_varmap(&var_map, DTYPE, dev))?;
    Ok((model, var_map))
}

/// The memory section's model: units of four square Linear layers, and a root Linear.
#[derive(Shardable)]
struct BigBlock {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
    fc4: Linear,
}

impl Module for BigBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.fc1.forward(x)?.relu()?;
        let x = self.fc2.forward(&x)?.relu()?;
        let x = self.fc3.forward(&x)?.relu()?;
        self.fc4.forward(&x)
    }
}

#[derive(Shardable)]
struct BigModel {
    blocks: Vec<Unit<BigBlock>>,
    head: Linear,
}

impl BigModel {
    fn new(hidden: usize, units: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let lin = |vb: VarBuilder| candle_nn::linear(hidden, hidden, vb);
        let blocks = (0..units)
            .map(|i| {
                let vb = vb.pp("blocks").pp(i);
                Ok(Unit::new(BigBlock {
                    fc1: lin(vb.pp("fc1"))?,
                    fc2: lin(vb.pp("fc2"))?,
                    fc3: lin(vb.pp("fc3"))?,
                    fc4: lin(vb.pp("fc4"))?,
                }))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { blocks, head: lin(vb.pp("head"))? })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        self.head.forward(&x)
    }
}

// ---------------------------------------------------------------------------------------

fn main() {
    let args = Args::parse();
    // Panics are caught (by the sections, by launch_gpus, by check_libraries) and reported
    // in the output; print one short line for each instead of a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        let short: String = text.chars().take(300).collect();
        eprintln!(
            "[panic in thread {} at {}: {short}{}]",
            std::thread::current().name().unwrap_or("?"),
            info.location().map(|l| l.to_string()).unwrap_or_default(),
            if text.chars().count() > 300 { " ..." } else { "" }
        );
    }));
    let log =
        args.log.clone().or_else(|| std::env::var_os("OUT").map(|o| std::path::PathBuf::from(o).join("gpu_check.log")));
    if let Some(path) = &log {
        match std::fs::File::create(path) {
            Ok(file) => *LOG.lock().unwrap_or_else(|p| p.into_inner()) = Some(file),
            Err(e) => eprintln!("gpu_check: cannot write the log {}: {e}", path.display()),
        }
    }
    let settings = Settings::of(&args);
    let started = Instant::now();
    out!("candle-fsdp GPU check");
    out!("command: {}", command_line());
    if let Some(path) = &log {
        out!("log: {}", path.display());
    }
    out!(
        "settings: timing {} measured steps in {} round(s) after {} warm-up steps per round, models {:?}; parity {} steps, rtol {:e}; \
         memory {} units x 4 Linear({h}, {h}) + root Linear({h}, {h}), {} input rows, tolerance {} MiB; NCCL timeout {} s; deadline {} s",
        settings.steps,
        settings.rounds,
        settings.warmup,
        settings.models,
        settings.parity_steps,
        args.parity_rtol,
        args.mem_units,
        args.mem_rows,
        args.mem_tol_mib,
        args.timeout_secs,
        args.deadline_secs,
        h = args.mem_hidden,
    );

    // The deadline: print what there is and end, rather than being killed silently.
    let deadline = Duration::from_secs(args.deadline_secs);
    std::thread::spawn(move || {
        std::thread::sleep(deadline);
        let current = *CURRENT.lock().unwrap_or_else(|p| p.into_inner());
        out!(
            "\nDEADLINE: {} s passed{}; the run ends here (--deadline-secs)",
            deadline.as_secs(),
            current.map(|(n, t)| format!(" during section {n} ({t})")).unwrap_or_default()
        );
        print_summary(started);
        std::process::exit(3);
    });

    let wanted = |n: u32| args.sections.is_empty() || args.sections.contains(&n);
    let (a, s) = (&args, &settings);
    if wanted(1) {
        run_section(1, "environment: CUDA driver, NCCL, GPUs", environment::environment);
    }
    if wanted(2) {
        run_section(2, "candle CUDA kernels load and match the CPU", kernels::kernels);
    }
    if wanted(3) {
        run_section(3, "NCCL collectives at world size 1 (launch_gpus)", |sec| collectives::collectives(sec, s));
    }
    if wanted(4) {
        run_section(4, "stream ordering: compute stream and NCCL's stream", |sec| {
            stream_ordering::stream_ordering(sec, s)
        });
    }
    if wanted(5) {
        run_section(5, "CUDA storage swap and device memory", |sec| memory::memory(sec, a, s));
    }
    if wanted(6) {
        run_section(6, "parity: FSDP world 1 (NCCL) vs plain candle, small Llama, AdamW", |sec| {
            parity::parity(sec, a, s)
        });
    }
    if wanted(7) {
        run_section(7, "backward prefetch sequences on the GPU (PyTorch test check)", |sec| {
            prefetch_sequences::prefetch_sequences(sec, s)
        });
    }
    if wanted(8) {
        run_section(8, "step time: plain candle vs FSDP world 1 (NCCL), f32", |sec| step_time::step_time(sec, a, s));
    }
    if wanted(9) {
        run_section(9, "fused ops: CUDA kernels against the CPU, their step time; released parameters", |sec| {
            fused_ops::fused_ops(sec, a, s)
        });
    }
    let all = print_summary(started);
    std::process::exit(if all { 0 } else { 1 });
}

/// The AdamW learning rate of the parity and step-time runs.
const LR: f64 = 1e-3;

// The sections, each in its own file (after the macros above, which they use).
mod collectives;
mod environment;
mod fused_ops;
mod kernels;
mod memory;
mod parity;
mod prefetch_sequences;
mod step_time;
mod stream_ordering;
