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
use common::{human_count, median, BigramTask, Rng, DTYPE};
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

fn llama_config(
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    seq: usize,
) -> LlamaConfig {
    LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        max_position_embeddings: seq,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        initializer_range: 0.02,
        ..LlamaConfig::default()
    }
}

fn setup(size: ModelSize, args: &Args) -> Setup {
    match size {
        ModelSize::Small => {
            Setup { name: "small", config: llama_config(512, 128, 344, 4, 4, 2, 64), batch: 16, seq_len: 64 }
        }
        ModelSize::Medium => {
            Setup { name: "medium", config: llama_config(1024, 256, 688, 6, 8, 4, 128), batch: 16, seq_len: 128 }
        }
        ModelSize::Large => Setup {
            name: "large",
            config: llama_config(
                args.large_vocab,
                args.large_hidden,
                args.large_intermediate,
                args.large_layers,
                args.large_heads,
                args.large_kv_heads,
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
        run_section(1, "environment: CUDA driver, NCCL, GPUs", environment);
    }
    if wanted(2) {
        run_section(2, "candle CUDA kernels load and match the CPU", kernels);
    }
    if wanted(3) {
        run_section(3, "NCCL collectives at world size 1 (launch_gpus)", |sec| collectives(sec, s));
    }
    if wanted(4) {
        run_section(4, "stream ordering: compute stream and NCCL's stream", |sec| stream_ordering(sec, s));
    }
    if wanted(5) {
        run_section(5, "CUDA storage swap and device memory", |sec| memory(sec, a, s));
    }
    if wanted(6) {
        run_section(6, "parity: FSDP world 1 (NCCL) vs plain candle, small Llama, AdamW", |sec| parity(sec, a, s));
    }
    if wanted(7) {
        run_section(7, "backward prefetch sequences on the GPU (PyTorch test check)", |sec| prefetch_sequences(sec, s));
    }
    if wanted(8) {
        run_section(8, "step time: plain candle vs FSDP world 1 (NCCL), f32", |sec| step_time(sec, a, s));
    }
    if wanted(9) {
        run_section(9, "fused ops: CUDA kernels against the CPU, their step time; released parameters", |sec| {
            fused_ops(sec, a, s)
        });
    }
    let all = print_summary(started);
    std::process::exit(if all { 0 } else { 1 });
}

// ---------------------------------------------------------------------------------------
// 1. Environment.

fn environment(sec: &Section) -> Result<()> {
    for var in ["CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "NCCL_DEBUG", "CUDA_COMPUTE_CAP"] {
        sec.info(format!("{var}={}", std::env::var(var).unwrap_or_else(|_| "(unset)".into())));
    }
    sec.info(format!("host CPU cores: {}", common::cores()));
    let loaded = check_libraries(0);
    sec.check(
        loaded.is_ok(),
        match &loaded {
            Ok(()) => "libcuda and libnccl load (candle_fsdp::dist::check_libraries)".to_string(),
            Err(e) => format!("libcuda and libnccl load: {e}"),
        },
    );
    loaded?;

    let mut driver: std::ffi::c_int = 0;
    // SAFETY: writes one int.
    unsafe { cu_sys::cuDriverGetVersion(&mut driver) }.result().explain("cuDriverGetVersion")?;
    sec.figure("CUDA driver API", format!("{}.{} ({driver})", driver / 1000, (driver % 1000) / 10));

    let code = nccl_result::get_nccl_version().explain("ncclGetVersion")?;
    let version = if code >= 10000 {
        format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, (code % 1000) / 100, code % 100)
    };
    sec.figure("NCCL", format!("{version} ({code})"));

    let count = gpu_count(0)?;
    sec.check(count >= 1, format!("GPUs visible: {count} (candle_fsdp::dist::gpu_count)"));
    for ordinal in 0..count {
        let ctx = CudaContext::new(ordinal).explain("CudaContext::new")?;
        let name = ctx.name().explain("cuDeviceGetName")?;
        let (major, minor) = ctx.compute_capability().explain("compute capability")?;
        let (free, total) = ctx.mem_get_info().explain("cuMemGetInfo")?;
        sec.figure(
            &format!("GPU {ordinal}"),
            format!(
                "{name}, compute capability {major}.{minor}, memory {} total, {} free, {} used (cuMemGetInfo)",
                mib(total as f64),
                mib(free as f64),
                mib((total - free) as f64)
            ),
        );
        if ordinal == 0 {
            sec.info(format!(
                "stream-ordered allocation (cuMemAllocAsync) supported: {}",
                if ctx.has_async_alloc() {
                    "yes: cudarc allocates from the device's pool and frees with cuMemFreeAsync"
                } else {
                    "no"
                }
            ));
            // SAFETY: the device handle comes from a live context.
            if let Ok(pool) = unsafe { cu_result::device::get_mem_pool(ctx.cu_device()) } {
                let mut threshold: u64 = 0;
                // SAFETY: a 64-bit attribute.
                let ok = unsafe {
                    cu_sys::cuMemPoolGetAttribute(
                        pool,
                        cu_sys::CUmemPool_attribute_enum::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                        &mut threshold as *mut u64 as *mut std::ffi::c_void,
                    )
                }
                .result()
                .is_ok();
                if ok {
                    sec.info(format!(
                        "memory pool release threshold: {threshold} bytes (0: freed memory goes back to the device at each synchronisation)"
                    ));
                }
            }
        }
    }
    sec.info(format!("candle f32 GEMM reduced precision (TF32): {}", candle_core::cuda::gemm_reduced_precision_f32()));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 2. Kernels.

type Op = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>>;

/// One kernel case: `f(a, b, ids)` computed on the CPU and on the GPU.
fn op(f: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + 'static) -> Op {
    Box::new(f)
}

fn kernels(sec: &Section) -> Result<()> {
    check_libraries(0)?;
    let dev = Device::new_cuda(0)?;
    let mut rng = Rng::new(2024);
    let a = randn_cpu(&mut rng, &[128, 256])?;
    let b = randn_cpu(&mut rng, &[256, 96])?;
    let ids = Tensor::new(&[3u32, 0, 127, 64, 5, 5, 99], &Device::Cpu)?;
    let f32_ones = |n: usize, d: &Device| Tensor::ones(n, DType::F32, d);
    let ops: Vec<(&str, f64, Op)> = vec![
        ("matmul 128x256 @ 256x96 (cuBLAS)", 1e-4, op(|a, b, _| a.matmul(b))),
        (
            "matmul with a transposed operand (x @ w.t(), as Linear)",
            1e-4,
            op(|a, b, _| a.matmul(&b.t()?.contiguous()?.t()?)),
        ),
        (
            "fused softmax_last_dim (candle-nn kernel)",
            1e-5,
            op(|a, b, _| candle_nn::ops::softmax_last_dim(&a.matmul(b)?)),
        ),
        (
            "softmax from primitives (candle_fsdp::models::softmax_last_dim)",
            1e-5,
            op(|a, b, _| candle_fsdp::models::softmax_last_dim(&a.matmul(b)?)),
        ),
        (
            "log_softmax (candle_fsdp::models::log_softmax_last_dim)",
            1e-4,
            op(|a, _, _| candle_fsdp::models::log_softmax_last_dim(a)),
        ),
        (
            "fused rms_norm (candle-nn kernel)",
            1e-4,
            op(move |a, _, _| candle_nn::ops::rms_norm(a, &f32_ones(256, a.device())?, 1e-5)),
        ),
        (
            "unary: silu, exp, tanh, sqrt(|x|), neg, sqr",
            1e-4,
            op(|a, _, _| {
                Tensor::cat(&[a.silu()?, (a * 0.1)?.exp()?, a.tanh()?, a.abs()?.sqrt()?, a.neg()?, a.sqr()?], 1)
            }),
        ),
        (
            "binary broadcast add / mul / div / sub / maximum",
            1e-4,
            op(|a, _, _| {
                let row = a.sum_keepdim(1)?;
                let col = a.mean_keepdim(0)?;
                Tensor::cat(
                    &[
                        a.broadcast_add(&row)?,
                        a.broadcast_mul(&col)?,
                        a.broadcast_div(&(row.abs()? + 1.0)?)?,
                        a.broadcast_sub(&col)?,
                        a.broadcast_maximum(&col)?,
                    ],
                    1,
                )
            }),
        ),
        (
            "reductions: sum, max, min, mean over a dimension",
            1e-4,
            op(|a, _, _| {
                Tensor::cat(&[a.sum_keepdim(1)?, a.max_keepdim(1)?, a.min_keepdim(1)?, a.mean_keepdim(1)?], 1)
            }),
        ),
        ("argmax (u32 output)", 0.0, op(|a, _, _| a.argmax_keepdim(1))),
        (
            "arg_sort_last_dim (sort kernel)",
            0.0,
            op(|a, _, _| a.narrow(1, 0, 64)?.contiguous()?.arg_sort_last_dim(true)),
        ),
        ("affine (2x + 1)", 1e-5, op(|a, _, _| a.affine(2.0, 1.0))),
        ("cast f32 -> bf16 -> f32", 1e-2, op(|a, _, _| a.to_dtype(DType::BF16)?.to_dtype(DType::F32))),
        ("cast f32 -> f16 -> f32", 1e-3, op(|a, _, _| a.to_dtype(DType::F16)?.to_dtype(DType::F32))),
        (
            "bf16 matmul (cuBLAS, bf16 in and out)",
            2e-2,
            op(|a, b, _| a.to_dtype(DType::BF16)?.matmul(&b.to_dtype(DType::BF16)?)?.to_dtype(DType::F32)),
        ),
        ("index_select of rows (u32 ids; the embedding lookup)", 0.0, op(|a, _, ids| a.index_select(ids, 0))),
        (
            "gather along the last dimension",
            0.0,
            op(|a, _, ids| {
                let idx = ids.narrow(0, 0, 4)?.reshape((1, 4))?.broadcast_as((128, 4))?.contiguous()?;
                a.gather(&idx, 1)
            }),
        ),
        ("where_cond / ge (relu by mask)", 0.0, op(|a, _, _| a.ge(0.0)?.where_cond(a, &a.zeros_like()?))),
        ("transpose + contiguous (strided copy)", 0.0, op(|a, _, _| a.t()?.contiguous())),
        ("cat along dim 1", 0.0, op(|a, _, _| Tensor::cat(&[a, a], 1))),
        (
            "rope_slow (the Llama model's rotary embedding)",
            1e-5,
            op(|a, _, _| {
                let x = a.reshape((1, 2, 64, 256))?.narrow(3, 0, 16)?.contiguous()?;
                let cos = a.narrow(0, 0, 64)?.narrow(1, 0, 8)?.cos()?.contiguous()?;
                let sin = a.narrow(0, 0, 64)?.narrow(1, 0, 8)?.sin()?.contiguous()?;
                candle_nn::rotary_emb::rope_slow(&x, &cos, &sin)
            }),
        ),
        (
            "fused rope (candle-nn kernel)",
            1e-5,
            op(|a, _, _| {
                let x = a.reshape((1, 2, 64, 256))?.narrow(3, 0, 16)?.contiguous()?;
                let cos = a.narrow(0, 0, 64)?.narrow(1, 0, 8)?.cos()?.contiguous()?;
                let sin = a.narrow(0, 0, 64)?.narrow(1, 0, 8)?.sin()?.contiguous()?;
                candle_nn::rotary_emb::rope(&x, &cos, &sin)
            }),
        ),
    ];
    let (ga, gb, gids) = (a.to_device(&dev)?, b.to_device(&dev)?, ids.to_device(&dev)?);
    for (name, tol, op) in &ops {
        let result = attempt(|| -> Result<(f64, f64)> {
            let cpu = op(&a, &b, &ids)?;
            let gpu = op(&ga, &gb, &gids)?;
            ensure!(gpu.device().is_cuda(), "the result is not on the GPU");
            ensure!(gpu.dtype() == cpu.dtype(), "dtype {:?} on the GPU, {:?} on the CPU", gpu.dtype(), cpu.dtype());
            Ok((max_abs_diff(&gpu, &cpu)?, max_abs(&cpu)?))
        });
        if let Some((diff, scale)) = sec.check_result(name, result) {
            let bound = tol * scale.max(1.0);
            sec.check(diff <= bound, format!("{name}: max |gpu - cpu| = {diff:.3e} (bound {bound:.1e})"));
        }
    }

    // A backward on the GPU against the CPU.
    let grads = attempt(|| -> Result<f64> {
        let grad_on = |dev: &Device| -> Result<Tensor> {
            let w = Var::from_tensor(&b.to_device(dev)?)?;
            let loss = a.to_device(dev)?.matmul(w.as_tensor())?.silu()?.sqr()?.mean_all()?;
            let grads = loss.backward()?;
            Ok(grads.get(w.as_tensor()).ok_or_else(|| anyhow!("no gradient"))?.clone())
        };
        let (g, c) = (grad_on(&dev)?, grad_on(&Device::Cpu)?);
        let diff = max_abs_diff(&g, &c)?;
        ensure!(diff <= 1e-4 * max_abs(&c)?.max(1e-6), "max |gpu - cpu| = {diff:.3e}");
        Ok(diff)
    });
    if let Some(diff) = sec.check_result("backward of mean(silu(a @ w)^2) on the GPU", grads) {
        sec.check(true, format!("backward of mean(silu(a @ w)^2): gradient max |gpu - cpu| = {diff:.3e}"));
    }

    // curand.
    let random = attempt(|| -> Result<(f64, f64)> {
        let r = Tensor::randn(0f32, 1f32, 1 << 20, &dev)?;
        let v = values(&r)?;
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        Ok((mean, var.sqrt()))
    });
    if let Some((mean, std)) = sec.check_result("randn on the GPU (cuRAND)", random) {
        sec.check(
            mean.abs() < 0.01 && (std - 1.0).abs() < 0.01,
            format!("randn on the GPU (cuRAND): mean {mean:.4}, std {std:.4}"),
        );
    }

    // f32 matmul throughput, for perspective.
    let speed = attempt(|| -> Result<(f64, f64)> {
        let n = 4096;
        let x = Tensor::randn(0f32, 1f32, (n, n), &dev)?;
        let y = Tensor::randn(0f32, 1f32, (n, n), &dev)?;
        let _ = x.matmul(&y)?;
        sync(&dev)?;
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let _z = x.matmul(&y)?;
            sync(&dev)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let m = median(&times);
        Ok((m, 2.0 * (n as f64).powi(3) / (m / 1e3) / 1e12))
    });
    if let Some((ms, tflops)) = sec.check_result("f32 matmul timing", speed) {
        sec.figure("candle f32 matmul 4096^3", format!("{ms:.2} ms median of 5, {tflops:.1} TFLOP/s"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 3. Collectives.

fn collectives(sec: &Section, settings: &Settings) -> Result<()> {
    on_gpu(settings.timeout, |ctx| {
        let dev = ctx.device.clone();
        let comm = ctx.comm.clone();
        sec.check(
            dev.is_cuda() && comm.size() == 1 && comm.rank() == 0 && comm.global_rank() == 0,
            format!("launch_gpus(world 1): rank 0 of 1 on {:?}", dev.location()),
        );
        let n = 1000;
        let base: Vec<f32> = (0..n).map(|i| ((i * 7) % 17) as f32 - 8.0).collect();
        let label = "gpu_check";
        let waited = |w: candle_fsdp::dist::Result<Work>| -> Result<Tensor> { Ok(w?.wait()?) };
        // The output must equal the input exactly (world size 1).
        let exact = |input: &Tensor, got: Result<Tensor>| -> Result<()> {
            let got = got?;
            ensure!(got.device().is_cuda(), "the output is not on the GPU");
            ensure!(got.dtype() == input.dtype(), "output dtype {:?}, input {:?}", got.dtype(), input.dtype());
            let (g, e) = (values(&got)?, values(input)?);
            ensure!(g.len() == e.len(), "{} output elements, expected {}", g.len(), e.len());
            let wrong = g.iter().zip(&e).filter(|(x, y)| x != y).count();
            ensure!(wrong == 0, "{wrong} of {} elements differ from the expected values", e.len());
            Ok(())
        };
        // One line per group of cases: PASS naming them all, or a FAIL per failing case.
        let report = |what: &str, len: usize, cases: Vec<(&str, Result<()>)>| {
            let names: Vec<&str> = cases.iter().map(|(n, _)| *n).collect();
            let failed: Vec<String> =
                cases.into_iter().filter_map(|(n, r)| r.err().map(|e| format!("{n}: {e:#}"))).collect();
            if failed.is_empty() {
                sec.check(true, format!("{what}: {} — {len} elements each, output == input exactly", names.join(", ")));
            }
            for f in failed {
                sec.check(false, format!("{what}: {f}"));
            }
        };
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let t = Tensor::new(base.as_slice(), &dev)?.to_dtype(dtype)?;
            report(
                &format!("{dtype:?}"),
                n,
                vec![
                    ("all_gather", exact(&t, waited(comm.all_gather(&t, label)))),
                    ("reduce_scatter Sum", exact(&t, waited(comm.reduce_scatter(&t, ReduceOp::Sum, label)))),
                    ("reduce_scatter Avg", exact(&t, waited(comm.reduce_scatter(&t, ReduceOp::Avg, label)))),
                    ("all_reduce Sum", exact(&t, waited(comm.all_reduce(&t, ReduceOp::Sum, label)))),
                    ("all_reduce Avg", exact(&t, waited(comm.all_reduce(&t, ReduceOp::Avg, label)))),
                    ("broadcast from rank 0", exact(&t, waited(comm.broadcast(&t, 0, label)))),
                ],
            );
        }
        let ints = Tensor::new((0..n as u32).map(|i| i * 3).collect::<Vec<_>>().as_slice(), &dev)?;
        report(
            "U32",
            n,
            vec![
                ("all_gather", exact(&ints, waited(comm.all_gather(&ints, label)))),
                ("broadcast from rank 0", exact(&ints, waited(comm.broadcast(&ints, 0, label)))),
            ],
        );
        let whole = Tensor::new(base.as_slice(), &dev)?;
        let slice = whole.narrow(0, 3, 500)?;
        report(
            "F32 input at a storage offset (narrow(0, 3, 500))",
            500,
            vec![
                ("all_gather", exact(&slice.copy()?, waited(comm.all_gather(&slice, label)))),
                ("all_reduce Sum", exact(&slice.copy()?, waited(comm.all_reduce(&slice, ReduceOp::Sum, label)))),
            ],
        );
        // The output is usable by later kernels on candle's stream.
        let used = attempt(|| -> Result<f64> {
            let g = comm.all_gather(&whole, label)?.wait()?;
            Ok((g * 2.0)?.sum_all()?.to_scalar::<f32>()? as f64)
        });
        let expected: f64 = base.iter().map(|&v| 2.0 * v as f64).sum();
        if let Some(v) = sec.check_result("a kernel reading an all_gather output", used) {
            sec.check(
                v == expected,
                format!("a kernel reading an all_gather output on candle's stream: sum {v} (expected {expected})"),
            );
        }

        let barrier = comm.barrier("gpu_check barrier");
        sec.check(
            barrier.is_ok(),
            format!("barrier: {}", barrier.map(|_| "ok".to_string()).unwrap_or_else(|e| e.to_string())),
        );

        let group = attempt(|| -> Result<(usize, usize, usize)> {
            let g = comm.new_group(&[0])?;
            let t = Tensor::new(base.as_slice(), &dev)?;
            let r = g.all_reduce(&t, ReduceOp::Sum, "gpu_check group")?.wait()?;
            ensure!(values(&r)? == values(&t)?, "all_reduce on the group changed the values");
            let again = comm.new_group(&[0])?;
            again.barrier("gpu_check group barrier")?;
            Ok((g.size(), g.rank(), g.global_rank()))
        });
        if let Some((size, rank, global)) = sec.check_result("new_group(&[0])", group) {
            sec.check(
                (size, rank, global) == (1, 0, 0),
                format!("new_group(&[0]) twice: size {size}, rank {rank}, global rank {global}; all_reduce on it exact; barrier ok"),
            );
        }

        let cpu = comm.all_gather(&Tensor::new(&[1f32, 2.0], &Device::Cpu)?, label);
        sec.check(
            matches!(&cpu, Err(e) if e.to_string().contains("not on a GPU")),
            format!(
                "a CPU input is refused with a clear error: {}",
                cpu.err().map(|e| e.to_string()).unwrap_or_else(|| "it was accepted".into())
            ),
        );

        // Bandwidth of a large all-gather at world 1 (a device-to-device copy by NCCL)
        // next to candle's own copy of the same tensor.
        let timing = attempt(|| -> Result<(f64, f64, f64)> {
            let len = 64 << 20;
            let big = Tensor::ones(len, DType::F32, &dev)?;
            let bytes = (len * 4) as f64;
            let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
                let _ = f()?;
                sync(&dev)?;
                let mut times = Vec::new();
                for _ in 0..5 {
                    let t = Instant::now();
                    let out = f()?;
                    sync(&dev)?;
                    times.push(t.elapsed().as_secs_f64());
                    drop(out);
                }
                Ok(median(&times))
            };
            let gather = time(&|| Ok(comm.all_gather(&big, label)?.wait()?))?;
            let reduce = time(&|| Ok(comm.all_reduce(&big, ReduceOp::Sum, label)?.wait()?))?;
            let copy = time(&|| Ok(big.copy()?))?;
            Ok((bytes / gather / 1e9, bytes / reduce / 1e9, bytes / copy / 1e9))
        });
        if let Some((g, r, c)) = sec.check_result("256 MiB collective timing", timing) {
            sec.figure(
                "NCCL world 1, 256 MiB f32",
                format!("all_gather {g:.0} GB/s, all_reduce {r:.0} GB/s; candle's device copy {c:.0} GB/s (bytes of the output per second, median of 5)"),
            );
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// 4. Stream ordering between candle's compute stream and NCCL's stream.

/// Values `x` after a chain of kernels that keeps the compute stream busy for many
/// milliseconds: a collective issued right after it must wait for all of it.
fn busy_chain(x: &Tensor, rounds: usize) -> Result<Tensor> {
    let mut y = x.clone();
    for _ in 0..rounds {
        y = (y.matmul(x)? / (x.dim(0)? as f64).sqrt())?.tanh()?;
    }
    Ok(y)
}

/// Element by element: `got` (read back now) against `expected`.
fn differing(got: &Tensor, expected: &[f64]) -> Result<usize> {
    let got = values(got)?;
    ensure!(got.len() == expected.len(), "{} elements, expected {}", got.len(), expected.len());
    Ok(got.iter().zip(expected).filter(|(a, b)| a != b).count())
}

fn stream_ordering(sec: &Section, settings: &Settings) -> Result<()> {
    on_gpu(settings.timeout, |ctx| {
        let dev = ctx.device.clone();
        let comm = ctx.comm.clone();
        let label = "gpu_check ordering";
        let side = 4096;

        // (1) An input written by a chain of kernels, handed straight to the collective:
        // the communication stream must wait for the kernels (cudarc records no write
        // event for a kernel's output).
        let written = attempt(|| -> Result<(usize, usize)> {
            let mut rng = Rng::stream(7, 1);
            let x = randn_cpu(&mut rng, &[side, side])?.to_device(&dev)?;
            sync(&dev)?;
            let chain = busy_chain(&x, 6)?.flatten_all()?;
            let gathered = comm.all_gather(&chain, label)?.wait()?;
            let reduced = comm.all_reduce(&busy_chain(&x, 6)?.flatten_all()?, ReduceOp::Sum, label)?.wait()?;
            sync(&dev)?;
            let expected = values(&chain)?;
            Ok((differing(&gathered, &expected)?, differing(&reduced, &expected)?))
        });
        if let Some((g, r)) = sec.check_result("an input written by a chain of kernels", written) {
            sec.check(
                g == 0 && r == 0,
                format!(
                    "an input written by 6 chained {side}x{side} matmuls and handed straight to all_gather / all_reduce: \
                     {g} / {r} of {} elements differ from the input",
                    side * side
                ),
            );
        }

        // (2) Collectives queued back to back (the communication stream busy), their
        // outputs read at once by candle's copies (`to_dtype`, `cat`), which wait on a
        // buffer's own stream only.
        let queued = attempt(|| -> Result<(usize, usize, usize)> {
            let len = 16 << 20;
            let inputs: Vec<Tensor> = (0..8)
                .map(|i| Ok(((Tensor::arange(0u32, len as u32, &dev)?.to_dtype(DType::F32)? * 1e-3)? + i as f64)?))
                .collect::<Result<_>>()?;
            sync(&dev)?;
            let outputs: Vec<Tensor> =
                inputs.iter().map(|t| Ok(comm.all_gather(t, label)?.wait()?)).collect::<Result<_>>()?;
            let as_f64: Vec<Tensor> = outputs.iter().map(|o| Ok(o.to_dtype(DType::F64)?)).collect::<Result<_>>()?;
            let joined = Tensor::cat(&outputs, 0)?;
            let (mut casts, mut cat) = (0, 0);
            let mut expected_all = Vec::with_capacity(8 * len);
            for (input, cast) in inputs.iter().zip(&as_f64) {
                let expected = values(input)?;
                casts += differing(cast, &expected)?;
                expected_all.extend(expected);
            }
            cat += differing(&joined, &expected_all)?;
            Ok((casts, cat, 8 * len))
        });
        if let Some((casts, cat, total)) = sec.check_result("outputs read at once", queued) {
            sec.check(
                casts == 0 && cat == 0,
                format!(
                    "8 all_gathers of 64 MiB queued back to back, outputs read at once: to_dtype {casts}, cat {cat} of {total} elements wrong"
                ),
            );
        }

        // (3) An output dropped while a reader is queued, its memory free for the next
        // collective's output: the reader must still see the first values.
        let reused = attempt(|| -> Result<usize> {
            let len = 32 << 20;
            let first = Tensor::ones(len, DType::F32, &dev)?;
            let second = (Tensor::ones(len, DType::F32, &dev)? * 2.0)?;
            let x = randn_cpu(&mut Rng::stream(7, 2), &[side, side])?.to_device(&dev)?;
            sync(&dev)?;
            let mut wrong = 0;
            for _ in 0..4 {
                // Keep the compute stream busy so the reader below stays queued.
                let busy = busy_chain(&x, 4)?;
                let gathered = comm.all_gather(&first, label)?.wait()?;
                let read = gathered.to_dtype(DType::F64)?;
                drop(gathered);
                let next = comm.all_gather(&second, label)?.wait()?;
                wrong += differing(&read, &vec![1.0; len])?;
                wrong += differing(&next, &vec![2.0; len])?;
                drop(busy);
            }
            Ok(wrong)
        });
        if let Some(wrong) = sec.check_result("an output dropped while read", reused) {
            sec.check(
                wrong == 0,
                format!("an all_gather output dropped with its reader queued, then a second all_gather: {wrong} elements wrong in 4 rounds"),
            );
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// 5. Memory.

fn memory(sec: &Section, args: &Args, settings: &Settings) -> Result<()> {
    let (hidden, units, rows) = (args.mem_hidden, args.mem_units, args.mem_rows);
    let tol = (args.mem_tol_mib * 1024.0 * 1024.0) as i64;
    sec.info(
        "cudarc allocates with cuMemAllocAsync from the device's stream-ordered pool and frees with cuMemFreeAsync: a freed \
         buffer goes back to the pool in stream order. Even with a release threshold of 0 the pool hands back to the \
         device only whole free chunks at a synchronisation and keeps the rest cached (as PyTorch's caching allocator \
         does), so every figure below is taken after candle's stream and the context are synchronised and the pool is \
         trimmed (cuMemPoolTrimTo 0): cuMemGetInfo then counts what is live, and `the trim released` is the cache.",
    );
    on_gpu(settings.timeout, |ctx| {
        let dev = ctx.device.clone();
        let m0 = mem(&dev)?;
        sec.info(format!("before the model: {}", m0.show()));
        // What the pool reserves for one live buffer of each size: its rounding shows in the
        // device figures below.
        let mut rounding = Vec::new();
        // The most any buffer was rounded up by: the device figures' granularity.
        let mut granule = 0i64;
        for bytes in [64 << 20, (64 << 20) + (64 << 10), 256 << 20, (256 << 20) + (64 << 10)] {
            let buffer = Tensor::zeros(bytes, DType::U8, &dev)?;
            let held = mem(&dev)?;
            drop(buffer);
            let reserved = held.pool_reserved.zip(m0.pool_reserved).map(|(h, b)| h as i64 - b as i64);
            granule = granule.max(held.used as i64 - m0.used as i64 - bytes as i64);
            rounding.push(format!(
                "{} -> device {}, pool reserved {}",
                mib(bytes as f64),
                signed_mib(held.used as i64 - m0.used as i64),
                reserved.map(signed_mib).unwrap_or_else(|| "n/a".into())
            ));
        }
        sec.info(format!("one live buffer of each size (after a trim): {}", rounding.join("; ")));
        let delta = |a: &Mem, b: &Mem| b.used as i64 - a.used as i64;
        let pool_delta = |a: &Mem, b: &Mem| match (a.pool_used, b.pool_used) {
            (Some(x), Some(y)) => Some(y as i64 - x as i64),
            _ => None,
        };
        let show_pool = |d: Option<i64>| d.map(signed_mib).unwrap_or_else(|| "n/a".into());

        // Build on the GPU, wrap, drop the VarMap: what stays is the shards.
        let var_map = VarMap::new();
        let model = BigModel::new(hidden, units, VarBuilder::from_varmap(&var_map, DType::F32, &dev))?;
        let layout = Layout::of(&model)?;
        let plan = Plan::new(&layout, PlanConfig::new(1, FsdpConfig::default().strategy(ShardingStrategy::FullShard)))?;
        drop(layout);
        let unit_bytes: Vec<(String, usize)> = plan.units.iter().map(|u| (u.name.clone(), u.gathered_bytes)).collect();
        let param_bytes: usize = unit_bytes.iter().map(|(_, b)| b).sum();
        let root_bytes = unit_bytes.iter().find(|(n, _)| !n.starts_with("blocks")).map_or(0, |(_, b)| *b);
        let block_bytes =
            unit_bytes.iter().filter(|(n, _)| n.starts_with("blocks")).map(|(_, b)| *b).max().unwrap_or(0);
        sec.info(format!(
            "model: {units} units x 4 Linear({hidden}, {hidden}) + root Linear({hidden}, {hidden}), f32: parameters {}; per unit gathered: {}; \
             planned gathered peak {}",
            mib(param_bytes as f64),
            unit_bytes.iter().map(|(n, b)| format!("{n} {}", mib(*b as f64))).collect::<Vec<_>>().join(", "),
            mib(plan.memory.gathered_peak as f64)
        ));
        let config = FsdpConfig { sync_module_states: false, ..FsdpConfig::default() };
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), config)?;
        drop(var_map);
        let m_wrap = mem(&dev)?;
        let d = delta(&m0, &m_wrap);
        sec.info(format!("after wrap (FULL_SHARD, world 1; VarMap dropped): {}", m_wrap.show()));
        sec.figure(
            "after wrap",
            format!(
                "{} on the device, pool {} (expected {}: the shards = all parameters at world 1; gathered copies released)",
                signed_mib(d),
                show_pool(pool_delta(&m0, &m_wrap)),
                signed_mib(param_bytes as i64)
            ),
        );
        sec.info(format!(
            "  device within {} MiB of the expectation: {}",
            args.mem_tol_mib,
            if (d - param_bytes as i64).abs() <= tol { "yes" } else { "no" }
        ));
        if let Some(p) = pool_delta(&m0, &m_wrap) {
            sec.check(
                (p - param_bytes as i64).abs() <= tol,
                format!(
                    "after wrap the pool's used bytes are the shards: {} (expected {})",
                    signed_mib(p),
                    signed_mib(param_bytes as i64)
                ),
            );
        }
        sec.check(
            fsdp.memory().gathered_bytes == 0,
            format!("the runtime's accounting after wrap: {} gathered", fsdp.memory().gathered_bytes),
        );

        let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW::default())?;
        let m_opt = mem(&dev)?;
        sec.info(format!(
            "after AdamW::new: {} ({} ; expected {}: two moments per parameter)",
            m_opt.show(),
            signed_mib(delta(&m_wrap, &m_opt)),
            signed_mib(2 * param_bytes as i64)
        ));

        let mut rng = Rng::new(5);
        let input = randn_cpu(&mut rng, &[rows, hidden])?.to_device(&dev)?;
        // One activation: `rows x hidden` f32. A unit's forward keeps 11 of them in candle's
        // graph: per Linear the matmul and the bias add, and three ReLUs.
        let act = rows * hidden * 4;
        // Warm-up: loads kernels and cuBLAS's workspace, which stay.
        drop(fsdp.forward_inference(|m| m.forward(&input))?);
        let m_before = mem(&dev)?;
        sec.info(format!("after a warm-up inference forward (kernels, cuBLAS workspace): {}", m_before.show()));

        // The inference forward, probed between units.
        let mut probes: Vec<(Mem, usize)> = Vec::new();
        let output = fsdp.forward_inference(|m| {
            let mut x = input.clone();
            for block in &m.blocks {
                x = block.forward(&x)?;
                let probe = mem(&dev).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
                probes.push((probe, fsdp.memory().gathered_bytes));
            }
            m.head.forward(&x)
        })?;
        drop(output);
        let m_after = mem(&dev)?;
        let mut previous = m_before;
        for (i, (probe, gathered)) in probes.iter().enumerate() {
            let growth = delta(&previous, probe);
            sec.info(format!(
                "  inside the inference forward, after unit blocks.{i}: {} since the previous point (root gathered {}, \
                 activations kept by candle's graph ~{} per unit; the unit itself {}), runtime accounting: {} gathered",
                signed_mib(growth),
                mib(root_bytes as f64),
                mib((11 * act) as f64),
                mib(block_bytes as f64),
                mib(*gathered as f64)
            ));
            sec.check(
                *gathered == root_bytes,
                format!(
                    "after unit blocks.{i}'s forward only the root is gathered (runtime accounting {})",
                    mib(*gathered as f64)
                ),
            );
            if i > 0 {
                sec.check(
                    growth < (block_bytes / 2) as i64,
                    format!(
                        "unit blocks.{i}'s gathered storage is released right after its forward: the device grew {} across it \
                         (the unit is {}; bound {})",
                        signed_mib(growth),
                        mib(block_bytes as f64),
                        mib((block_bytes / 2) as f64)
                    ),
                );
            }
            previous = *probe;
        }
        let d_inf = delta(&m_before, &m_after);
        sec.info(format!("after the inference forward (output dropped): {}", m_after.show()));
        sec.figure(
            "inference forward",
            format!("device {} after it, pool {}", signed_mib(d_inf), show_pool(pool_delta(&m_before, &m_after))),
        );
        sec.check(
            d_inf <= tol + granule,
            format!(
                "after forward_inference the device has not grown (cuMemGetInfo after the trim): {} (tolerance {} MiB + the \
                 pool's rounding {}; one unit is {})",
                signed_mib(d_inf),
                args.mem_tol_mib,
                signed_mib(granule),
                mib(block_bytes as f64)
            ),
        );
        if let Some(p) = pool_delta(&m_before, &m_after) {
            sec.check(
                p.abs() <= tol,
                format!("after forward_inference the pool's used bytes are back: {}", signed_mib(p)),
            );
        }
        sec.check(
            fsdp.memory().gathered_bytes == 0,
            "after forward_inference nothing is gathered (runtime accounting)",
        );

        // Training steps.
        let mut after_steps = Vec::new();
        for step in 1..=3 {
            fsdp.reset_memory_peak();
            let out = fsdp.forward(|m| m.forward(&input))?;
            let loss = out.sqr()?.mean_all()?;
            let m_fwd = mem(&dev)?;
            let grads = fsdp.backward(&loss)?;
            drop((out, loss));
            let m_bwd = mem(&dev)?;
            optimizer.step(&grads)?;
            drop(grads);
            let m_step = mem(&dev)?;
            let kept = delta(&m_after, &m_fwd);
            let expected_act = (units * 11 + 3) * act;
            sec.info(format!(
                "step {step}: after the training forward {} ({}: root gathered {} + activations kept for backward; expected \
                 activations ~{} = ({units} units x 11 + head 2 + square 1) x {rows}x{hidden} f32)",
                m_fwd.show(),
                signed_mib(kept),
                mib(root_bytes as f64),
                mib(expected_act as f64)
            ));
            sec.info(format!(
                "step {step}: after backward (graph dropped, shard gradients held) {} ({}; expected {} of gradients)",
                m_bwd.show(),
                signed_mib(delta(&m_after, &m_bwd)),
                signed_mib(param_bytes as i64)
            ));
            sec.info(format!(
                "step {step}: after the AdamW step (gradients dropped) {} ({} from the post-inference level; expected ~0)",
                m_step.show(),
                signed_mib(delta(&m_after, &m_step))
            ));
            sec.info(format!(
                "step {step}: gathered peak by the runtime's accounting {} (plan {})",
                mib(fsdp.memory().gathered_peak as f64),
                mib(plan.memory.gathered_peak as f64)
            ));
            if step == 1 {
                sec.figure(
                    "training step",
                    format!(
                        "forward keeps {} (root {} + activations, expected ~{}), backward leaves {} of gradients (expected {}), after the step {}",
                        signed_mib(kept),
                        mib(root_bytes as f64),
                        mib(expected_act as f64),
                        signed_mib(delta(&m_after, &m_bwd)),
                        mib(param_bytes as f64),
                        signed_mib(delta(&m_after, &m_step))
                    ),
                );
            }
            after_steps.push(m_step);
        }
        // Step 1 may still set up lazily (cuBLAS's backward workspaces); from step 2 on a step
        // must not grow the device. Which chunks a step leaves partly used varies, so the
        // device figure moves by the pool's rounding either way; the pool's used bytes are
        // exact.
        let leak = delta(&after_steps[1], &after_steps[2]);
        sec.check(
            leak <= tol + granule,
            format!(
                "no growth from training step 2 to step 3 on the device (cuMemGetInfo after the trim): {} (tolerance {} \
                 MiB + the pool's rounding {})",
                signed_mib(leak),
                args.mem_tol_mib,
                signed_mib(granule)
            ),
        );
        if let Some(p) = pool_delta(&after_steps[0], &after_steps[2]) {
            sec.check(
                p.abs() <= tol,
                format!("no growth of the pool's used bytes from step 1 to step 3: {}", signed_mib(p)),
            );
        }
        sec.check(fsdp.memory().gathered_bytes == 0, "after backward nothing is gathered (runtime accounting)");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// 6. Parity.

#[derive(Clone)]
struct Trained {
    losses: Vec<f64>,
    params: HashMap<String, Tensor>,
}

fn train_plain(
    config: &LlamaConfig,
    snapshot: &HashMap<String, Tensor>,
    batches: &[(Tensor, Tensor)],
    dev: &Device,
) -> Result<Trained> {
    let (model, var_map) = plain_llama(config, snapshot, dev)?;
    let mut optimizer = AdamW::new(var_map.all_vars(), ParamsAdamW { lr: LR, ..ParamsAdamW::default() })?;
    let mut losses = Vec::new();
    for (inputs, targets) in batches {
        let (inputs, targets) = (inputs.to_device(dev)?, targets.to_device(dev)?);
        let loss = common::next_token_loss(&model.forward(&inputs)?, &targets)?;
        optimizer.step(&loss.backward()?)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
    }
    let params = var_map
        .data()
        .lock()
        .map_err(|_| anyhow!("VarMap lock poisoned"))?
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    Ok(Trained { losses, params })
}

/// Plain candle with the recipe a mixed-precision policy follows: f32 master variables, a
/// `dtype` copy of them each step, the logits cast to f32 for the loss, the `dtype`
/// gradients cast to f32 for AdamW.
fn train_plain_mixed(
    config: &LlamaConfig,
    snapshot: &HashMap<String, Tensor>,
    batches: &[(Tensor, Tensor)],
    dev: &Device,
    dtype: DType,
) -> Result<Trained> {
    let (_, master_map) = plain_llama(config, snapshot, dev)?;
    let compute_map = VarMap::new();
    let model = Llama::new(config, VarBuilder::from_varmap(&compute_map, dtype, dev))?;
    let vars = |map: &VarMap| -> Result<HashMap<String, Var>> {
        Ok(map.data().lock().map_err(|_| anyhow!("VarMap lock poisoned"))?.clone())
    };
    let (master, compute) = (vars(&master_map)?, vars(&compute_map)?);
    let mut optimizer = AdamW::new(master_map.all_vars(), ParamsAdamW { lr: LR, ..ParamsAdamW::default() })?;
    let mut losses = Vec::new();
    for (inputs, targets) in batches {
        let (inputs, targets) = (inputs.to_device(dev)?, targets.to_device(dev)?);
        for (name, var) in &compute {
            var.set(&master[name].as_tensor().to_dtype(dtype)?)?;
        }
        let logits = model.forward(&inputs)?.to_dtype(DType::F32)?;
        let loss = common::next_token_loss(&logits, &targets)?;
        let grads = loss.backward()?;
        let mut master_grads = candle_core::backprop::GradStore::default();
        for (name, var) in &compute {
            if let Some(grad) = grads.get(var.as_tensor()) {
                master_grads.insert(master[name].as_tensor(), grad.to_dtype(DType::F32)?);
            }
        }
        optimizer.step(&master_grads)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
    }
    let params = master
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    Ok(Trained { losses, params })
}

/// The largest loss and parameter differences of `fsdp` from `plain`, and whether they are
/// all zero; an error past `rtol` (of each loss, of each tensor's largest magnitude).
fn compare(fsdp: &Trained, plain: &Trained, rtol: f64) -> Result<(f64, f64, bool)> {
    let loss_diff = fsdp.losses.iter().zip(&plain.losses).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    let loss_ok = fsdp.losses.iter().zip(&plain.losses).all(|(a, b)| (a - b).abs() <= rtol * b.abs());
    ensure!(
        fsdp.params.len() == plain.params.len(),
        "{} trained parameters under FSDP, {} in plain candle",
        fsdp.params.len(),
        plain.params.len()
    );
    let mut param_diff = 0.0f64;
    let mut params_ok = true;
    let mut identical = loss_diff == 0.0;
    for (fqn, value) in &fsdp.params {
        let reference = plain.params.get(fqn).ok_or_else(|| anyhow!("`{fqn}` is not a plain-candle variable"))?;
        let diff = max_abs_diff(value, reference)?;
        params_ok &= diff <= rtol * max_abs(reference)?;
        identical &= diff == 0.0;
        param_diff = param_diff.max(diff);
    }
    ensure!(
        loss_ok && params_ok && !param_diff.is_nan(),
        "max |loss diff| {loss_diff:.3e}, max |param diff| {param_diff:.3e}"
    );
    Ok((loss_diff, param_diff, identical))
}

fn train_fsdp(
    ctx: &RankContext,
    config: &LlamaConfig,
    fsdp_config: FsdpConfig,
    snapshot: &HashMap<String, Tensor>,
    batches: &[(Tensor, Tensor)],
) -> Result<Trained> {
    let model = Llama::new(config, VarBuilder::from_tensors(snapshot.clone(), DTYPE, &ctx.device))?;
    let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig { sync_module_states: false, ..fsdp_config })?;
    train_wrapped(fsdp, &ctx.device, batches)
}

/// Trains a wrapped Llama on `batches` with AdamW; its losses and full trained values.
fn train_wrapped(fsdp: Fsdp<Llama>, dev: &Device, batches: &[(Tensor, Tensor)]) -> Result<Trained> {
    let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW { lr: LR, ..ParamsAdamW::default() })?;
    let mut losses = Vec::new();
    for (inputs, targets) in batches {
        let (inputs, targets) = (inputs.to_device(dev)?, targets.to_device(dev)?);
        let logits = fsdp.forward(|m| m.forward(&inputs))?;
        let loss = common::next_token_loss(&logits, &targets)?;
        optimizer.step(&fsdp.backward(&loss)?)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
    }
    let params = fsdp
        .full_parameters()?
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    Ok(Trained { losses, params })
}

const LR: f64 = 1e-3;

fn parity(sec: &Section, args: &Args, settings: &Settings) -> Result<()> {
    let s = setup(ModelSize::Small, args);
    let (snapshot, numel) = llama_snapshot(&s.config)?;
    let task = BigramTask::new(s.config.vocab_size, 0.1, 7);
    let mut rng = Rng::new(11);
    let batches = (0..settings.parity_steps)
        .map(|_| task.batch(&mut rng, s.batch, s.seq_len, &Device::Cpu))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let rtol = args.parity_rtol;
    sec.info(format!(
        "{}; {} AdamW steps (lr {LR}, candle-nn defaults otherwise), the same snapshot and batches; tolerance: every loss \
         within {rtol:e}·|loss|, every parameter tensor within {rtol:e}·max|parameter|",
        describe(&s, numel),
        settings.parity_steps
    ));
    sec.info(
        "each configuration twice: with the world-1 shortcuts (a gather is a copy of the shard, the reduction hands the \
         gradient back unchanged: no collective in the step) and with every collective run through NCCL \
         (collectives_at_world_one: all-gather, copy-out, reduce-scatter, as on several GPUs); both should agree with \
         plain candle to the bit",
    );
    let strategies = [
        ("FULL_SHARD, backward prefetch BACKWARD_PRE (default)", FsdpConfig::default()),
        ("FULL_SHARD, BACKWARD_PRE + forward prefetch", FsdpConfig::default().forward_prefetch(true)),
        ("FULL_SHARD, BACKWARD_POST", FsdpConfig::default().backward_prefetch(BackwardPrefetch::Post)),
        ("FULL_SHARD, no backward prefetch", FsdpConfig::default().backward_prefetch(BackwardPrefetch::None)),
        ("SHARD_GRAD_OP", FsdpConfig::default().strategy(ShardingStrategy::ShardGradOp)),
        ("NO_SHARD", FsdpConfig::default().strategy(ShardingStrategy::NoShard)),
        ("FULL_SHARD, activation checkpointing", FsdpConfig::default().activation_checkpointing(true)),
    ];
    let configs: Vec<(String, FsdpConfig)> = strategies
        .iter()
        .flat_map(|(name, config)| {
            [
                (format!("{name}, shortcuts"), *config),
                (format!("{name}, collectives run"), config.collectives_at_world_one(true)),
            ]
        })
        .collect();
    on_gpu(settings.timeout, |ctx| {
        let plain = train_plain(&s.config, &snapshot, &batches, &ctx.device)?;
        sec.info(format!(
            "plain candle on the GPU: losses {}",
            plain.losses.iter().map(|l| format!("{l:.5}")).collect::<Vec<_>>().join(" ")
        ));
        let mut worst = (0.0f64, 0.0f64);
        for (name, config) in &configs {
            let outcome =
                attempt(|| compare(&train_fsdp(&ctx, &s.config, *config, &snapshot, &batches)?, &plain, rtol));
            if let Some((l, p, identical)) = sec.check_result(name, outcome) {
                worst = (worst.0.max(l), worst.1.max(p));
                sec.check(
                    true,
                    format!(
                        "{name}: max |loss diff| {l:.3e}, max |param diff| {p:.3e}{}",
                        if identical { " (bit-identical)" } else { "" }
                    ),
                );
            }
        }
        // A model built without values: the shards drawn on the CPU and moved to the GPU
        // hold what a CPU rank draws, and the model trains as plain candle does from them.
        let meta = attempt(|| -> Result<(f64, f64)> {
            const SEED: u64 = 5;
            let on_cpu = launch(LaunchOptions::new(1), |cpu| {
                let meta = MetaModel::build(DTYPE, &Device::Cpu, |vb| Llama::new(&s.config, vb))?;
                let fsdp = Fsdp::wrap_meta(meta, cpu.comm.clone(), FsdpConfig::default(), SEED)?;
                Ok(fsdp.full_parameters()?.into_iter().collect::<HashMap<String, Tensor>>())
            })?
            .remove(0);
            let meta = MetaModel::build(DTYPE, &ctx.device, |vb| Llama::new(&s.config, vb))?;
            let config = FsdpConfig::default().collectives_at_world_one(true);
            let fsdp = Fsdp::wrap_meta(meta, ctx.comm.clone(), config, SEED)?;
            let mut drawn_diff = 0.0f64;
            for (fqn, value) in fsdp.full_parameters()? {
                let cpu = on_cpu.get(&fqn).ok_or_else(|| anyhow!("`{fqn}` is not drawn on the CPU"))?;
                drawn_diff = drawn_diff.max(max_abs_diff(&value.to_device(&Device::Cpu)?, cpu)?);
            }
            ensure!(drawn_diff == 0.0, "the GPU's shards differ from the CPU's draw by up to {drawn_diff:.3e}");
            let trained = train_wrapped(fsdp, &ctx.device, &batches)?;
            let reference = train_plain(&s.config, &on_cpu, &batches, &ctx.device)?;
            let loss_diff = trained.losses.iter().zip(&reference.losses).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            let mut param_diff = 0.0f64;
            for (fqn, value) in &trained.params {
                param_diff = param_diff.max(max_abs_diff(value, &reference.params[fqn])?);
            }
            ensure!(
                trained.losses.iter().zip(&reference.losses).all(|(a, b)| (a - b).abs() <= rtol * b.abs()),
                "losses {:?} vs plain candle's {:?}",
                trained.losses,
                reference.losses
            );
            Ok((loss_diff, param_diff))
        });
        // Mixed precision through the same code as on CPU ranks: bf16 gathered and computed
        // over f32 master shards, against plain candle following the same recipe.
        let plain_bf16 = train_plain_mixed(&s.config, &snapshot, &batches, &ctx.device, DType::BF16)?;
        for dtype in [DType::BF16, DType::F16] {
            let policy = candle_fsdp::MixedPrecision::compute_in(dtype);
            let reference = match dtype {
                DType::BF16 => plain_bf16.clone(),
                _ => train_plain_mixed(&s.config, &snapshot, &batches, &ctx.device, dtype)?,
            };
            for collectives in [false, true] {
                let name = format!(
                    "FULL_SHARD, {dtype:?} compute over f32 master shards, reduce f32, {} vs plain candle's {dtype:?} recipe",
                    if collectives { "collectives run" } else { "shortcuts" }
                );
                let config = FsdpConfig::default().mixed_precision(policy).collectives_at_world_one(collectives);
                let outcome =
                    attempt(|| compare(&train_fsdp(&ctx, &s.config, config, &snapshot, &batches)?, &reference, rtol));
                if let Some((l, p, identical)) = sec.check_result(&name, outcome) {
                    sec.check(
                        true,
                        format!(
                            "{name}: max |loss diff| {l:.3e}, max |param diff| {p:.3e}{}",
                            if identical { " (bit-identical)" } else { "" }
                        ),
                    );
                }
            }
        }
        let lowered = plain_bf16.losses.iter().zip(&plain.losses).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        sec.info(format!(
            "bf16 recipe vs f32 on the GPU: losses differ by up to {lowered:.3e} (the recipe is in effect)"
        ));
        if let Some((l, p)) = sec.check_result("MetaModel + wrap_meta on the GPU", meta) {
            sec.check(
                true,
                format!(
                    "MetaModel + wrap_meta on the GPU: the same values as a CPU rank draws; after training, max |loss \
                     diff| {l:.3e}, max |param diff| {p:.3e} against plain candle from those values"
                ),
            );
        }
        sec.figure(
            "parity, 7 FSDP configurations x (shortcuts, collectives run) vs plain candle",
            format!(
                "max |loss diff| {:.3e}, max |param diff| {:.3e} after {} steps",
                worst.0, worst.1, settings.parity_steps
            ),
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// 7. Backward prefetch sequences (the port of tests/backward_prefetch.rs, on the GPU).

const NUM_ITERS: usize = 2;
fn prefetch_sequences(sec: &Section, settings: &Settings) -> Result<()> {
    let d_model = 64;
    let config: TransformerConfig = prefetch_test_fqns::prefetch_test_transformer_config(d_model, 8, 128);
    let var_map = VarMap::new();
    let _model = Transformer::new(&config, VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu))?;
    let snapshot = common::snapshot(&var_map)?;
    let mut rng = Rng::new(1);
    let src = randn_cpu(&mut rng, &[10, 1, d_model])?;
    let tgt = randn_cpu(&mut rng, &[20, 1, d_model])?;
    sec.info(
        "the PyTorch test's nn.Transformer (6 encoder + 6 decoder layers, each a unit; d_model 64, feed-forward 128 here), \
         SGD lr 1e-2 on model(src, tgt).sum(), two iterations; PyTorch's test expects 13 prefetch decisions per iteration under \
         BACKWARD_PRE (decoder.layers.5 .. 0, encoder.layers.5 .. 0, None) and under BACKWARD_POST (decoder.layers.4 .. 0, \
         encoder.layers.5 .. 0, None, None), none without backward prefetch",
    );
    on_gpu(settings.timeout, |ctx| {
        let dev = ctx.device.clone();
        let (src, tgt) = (src.to_device(&dev)?, tgt.to_device(&dev)?);
        for (mode, expected_len, begin) in
            [(BackwardPrefetch::None, 0, 0), (BackwardPrefetch::Pre, 13, 6), (BackwardPrefetch::Post, 13, 5)]
        {
            let recorded = attempt(|| -> Result<Vec<Vec<Option<String>>>> {
                let model = Transformer::new(&config, VarBuilder::from_tensors(snapshot.clone(), DType::F32, &dev))?;
                let fsdp = Fsdp::wrap(
                    model,
                    ctx.comm.clone(),
                    FsdpConfig { sync_module_states: false, ..FsdpConfig::default().backward_prefetch(mode) },
                )?;
                let mut optimizer = SGD::new(fsdp.parameters(), 1e-2)?;
                let mut per_iteration = Vec::new();
                for _ in 0..NUM_ITERS {
                    let loss = fsdp.forward(|m| m.forward(&src, &tgt))?.sum_all()?;
                    optimizer.step(&fsdp.backward(&loss)?)?;
                    per_iteration.push(
                        fsdp.take_trace()
                            .into_iter()
                            .filter_map(|e| match e {
                                TraceEvent::BackwardPrefetch { target, .. } => Some(target),
                                _ => None,
                            })
                            .collect(),
                    );
                }
                // The FQN lists of the units, for the PyTorch test's comparison.
                let units = fsdp.units();
                Ok(per_iteration
                    .into_iter()
                    .map(|it: Vec<Option<String>>| {
                        it.into_iter()
                            .map(|t| {
                                t.map(|name| {
                                    units.iter().find(|(n, _)| *n == name).map(|(_, f)| f.join(",")).unwrap_or(name)
                                })
                            })
                            .collect()
                    })
                    .collect())
            });
            let Some(recorded) = sec.check_result(format!("{mode}: training with the trace"), recorded) else {
                continue;
            };
            for (iteration, entries) in recorded.iter().enumerate() {
                let expected: Vec<Option<String>> = (0..expected_len)
                    .map(|k| prefetch_test_fqns::expected_prefetch_entry(k, begin).map(|f| f.join(",")))
                    .collect();
                let short = |e: &Option<String>| match e {
                    None => "None".to_string(),
                    Some(fqns) => fqns.split('.').take(3).collect::<Vec<_>>().join("."),
                };
                let shown = entries.iter().map(short).collect::<Vec<_>>().join(", ");
                let first_bad = entries.iter().zip(&expected).position(|(a, b)| a != b);
                let ok = entries.len() == expected.len() && first_bad.is_none();
                sec.check(
                    ok,
                    format!(
                        "{mode} iteration {}: {} decisions (expected {expected_len}){}: [{shown}]",
                        iteration + 1,
                        entries.len(),
                        match first_bad {
                            Some(k) => format!(
                                ", entry {k} is {} but PyTorch's test expects {}",
                                short(&entries[k]),
                                short(&expected[k])
                            ),
                            None => String::new(),
                        }
                    ),
                );
            }
        }

        // The prefetches are real gathers.
        let gathers = attempt(|| -> Result<Vec<String>> {
            let model = Transformer::new(&config, VarBuilder::from_tensors(snapshot.clone(), DType::F32, &dev))?;
            let fsdp =
                Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig { sync_module_states: false, ..FsdpConfig::default() })?;
            let loss = fsdp.forward(|m| m.forward(&src, &tgt))?.sum_all()?;
            fsdp.backward(&loss)?;
            Ok(fsdp
                .take_trace()
                .into_iter()
                .filter_map(|e| match e {
                    TraceEvent::Unshard { unit, cause: UnshardCause::BackwardPrefetch } => Some(unit),
                    _ => None,
                })
                .collect())
        });
        if let Some(units) = sec.check_result("BACKWARD_PRE gathers through prefetch", gathers) {
            let expected: Vec<String> = (0..6)
                .rev()
                .map(|i| format!("decoder.layers.{i}"))
                .chain((0..6).rev().map(|i| format!("encoder.layers.{i}")))
                .collect();
            sec.check(
                units == expected,
                format!("BACKWARD_PRE: units gathered by a backward prefetch, in order: [{}]", units.join(", ")),
            );
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// 8. Step time.

struct Timed {
    /// Milliseconds of each measured step.
    times: Vec<f64>,
    first_loss: f64,
    last_loss: f64,
    /// The pool's high-water mark of used bytes during the run.
    peak: Option<u64>,
}

impl Timed {
    fn merge(into: &mut Option<Timed>, run: Timed) {
        match into {
            None => *into = Some(run),
            Some(first) => {
                first.times.extend(run.times);
                first.peak = first.peak.max(run.peak);
            }
        }
    }
}

/// Trains `batches` on `dev`, timing each step after `warmup` (forward + loss + backward
/// + AdamW step, then a full device sync before the timer stops).
fn timed_steps(
    dev: &Device,
    batches: &[(Tensor, Tensor)],
    warmup: usize,
    mut step: impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Timed> {
    let batches =
        batches.iter().map(|(i, t)| Ok((i.to_device(dev)?, t.to_device(dev)?))).collect::<Result<Vec<_>>>()?;
    sync(dev)?;
    reset_pool_peak(dev);
    let (mut times, mut losses) = (Vec::new(), Vec::new());
    for (n, (inputs, targets)) in batches.iter().enumerate() {
        let started = Instant::now();
        let loss = step(inputs, targets)?;
        sync(dev)?;
        let elapsed = started.elapsed().as_secs_f64() * 1e3;
        if n >= warmup {
            times.push(elapsed);
        }
        losses.push(loss.to_scalar::<f32>()? as f64);
    }
    let peak = pool_attr(dev, cu_sys::CUmemPool_attribute_enum::CU_MEMPOOL_ATTR_USED_MEM_HIGH);
    Ok(Timed { times, first_loss: losses[0], last_loss: *losses.last().unwrap_or(&f64::NAN), peak })
}

fn time_plain(
    config: &LlamaConfig,
    snapshot: &HashMap<String, Tensor>,
    batches: &[(Tensor, Tensor)],
    warmup: usize,
    dev: &Device,
) -> Result<Timed> {
    let (model, var_map) = plain_llama(config, snapshot, dev)?;
    let mut optimizer = AdamW::new(var_map.all_vars(), ParamsAdamW { lr: LR, ..ParamsAdamW::default() })?;
    timed_steps(dev, batches, warmup, |inputs, targets| {
        let loss = model.loss(inputs, targets)?;
        optimizer.step(&loss.backward()?)?;
        Ok(loss)
    })
}

fn time_fsdp(
    ctx: &RankContext,
    config: &LlamaConfig,
    snapshot: &HashMap<String, Tensor>,
    batches: &[(Tensor, Tensor)],
    warmup: usize,
    fsdp_config: FsdpConfig,
) -> Result<Timed> {
    let dev = &ctx.device;
    let model = Llama::new(config, VarBuilder::from_tensors(snapshot.clone(), DTYPE, dev))?;
    let fsdp_config = FsdpConfig { sync_module_states: false, ..fsdp_config };
    let fsdp = Fsdp::wrap(model, ctx.comm.clone(), fsdp_config)?;
    let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW { lr: LR, ..ParamsAdamW::default() })?;
    timed_steps(dev, batches, warmup, |inputs, targets| {
        let loss = fsdp.forward(|m| m.loss(inputs, targets))?;
        optimizer.step(&fsdp.backward(&loss)?)?;
        Ok(loss)
    })
}

fn step_time(sec: &Section, args: &Args, settings: &Settings) -> Result<()> {
    let per_round = settings.steps.div_ceil(settings.rounds);
    let measured = per_round * settings.rounds;
    sec.info(format!("command: {}", command_line()));
    sec.info(format!(
        "step = forward + next-token loss + backward + AdamW step (lr {LR}, weight decay 0.01), f32, then candle's stream and \
         the context synchronised before the timer stops; {measured} measured steps per run in {} round(s) of {} warm-up + \
         {per_round} measured steps; the runs take turns each round, each from the same snapshot with the same batches",
        settings.rounds, settings.warmup
    ));
    sec.info(
        "(a) plain candle on a fresh CUDA device (a context with one stream: cudarc records no events); (a') plain candle \
         on the NCCL rank's device (its context also has NCCL's stream; the runtime turns cudarc's event tracking off \
         there, as it orders the two streams itself); (a'') the same with cudarc's event tracking turned back on for the \
         run (an event recorded at each use of each buffer), to size what the runtime saves; \
         (b) FSDP world 1 over NCCL, FULL_SHARD, BACKWARD_PRE, no forward prefetch: a gather is a copy of the shard and \
         no collective runs in the step, so (b)/(a) is the runtime's own overhead (copies, frees, hooks, events); \
         (c) the same with every collective run through NCCL (all-gather, copy-out, reduce-scatter, as on several GPUs); \
         (d) as (c) with mixed precision: bf16 gathered and computed over f32 master shards, gradients reduced in f32",
    );
    for &size in &settings.models {
        let s = setup(size, args);
        let result = attempt(|| -> Result<()> {
            let (snapshot, numel) = llama_snapshot(&s.config)?;
            out!("");
            sec.info(format!("  {}", describe(&s, numel)));
            let task = BigramTask::new(s.config.vocab_size, 0.1, 7);
            let mut rng = Rng::new(11);
            let batches = (0..settings.warmup + per_round)
                .map(|_| task.batch(&mut rng, s.batch, s.seq_len, &Device::Cpu))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let (a, a2, a3, b, c, d) = on_gpu(settings.timeout, |ctx| {
                let fresh = Device::new_cuda(0)?;
                let (mut a, mut a2, mut a3, mut b, mut c, mut d) = (None, None, None, None, None, None);
                let run_all = FsdpConfig::default().collectives_at_world_one(true);
                for round in 1..=settings.rounds {
                    eprintln!("  {} round {round}/{}: (a) plain, fresh device", s.name, settings.rounds);
                    Timed::merge(&mut a, time_plain(&s.config, &snapshot, &batches, settings.warmup, &fresh)?);
                    eprintln!("  {} round {round}/{}: (a') plain, NCCL rank's device", s.name, settings.rounds);
                    Timed::merge(&mut a2, time_plain(&s.config, &snapshot, &batches, settings.warmup, &ctx.device)?);
                    eprintln!(
                        "  {} round {round}/{}: (a'') plain, NCCL rank's device, events",
                        s.name, settings.rounds
                    );
                    let cuda = cuda_context(&ctx.device)?;
                    // SAFETY: turning tracking on only adds ordering.
                    unsafe { cuda.enable_event_tracking() };
                    let tracked = time_plain(&s.config, &snapshot, &batches, settings.warmup, &ctx.device);
                    // SAFETY: plain candle runs on candle's stream alone, and the buffers made
                    // in the run, which carry events, are all dropped with it.
                    unsafe { cuda.disable_event_tracking() };
                    Timed::merge(&mut a3, tracked?);
                    eprintln!("  {} round {round}/{}: (b) FSDP world 1", s.name, settings.rounds);
                    let plain_config = FsdpConfig::default();
                    Timed::merge(
                        &mut b,
                        time_fsdp(&ctx, &s.config, &snapshot, &batches, settings.warmup, plain_config)?,
                    );
                    eprintln!("  {} round {round}/{}: (c) FSDP world 1, collectives run", s.name, settings.rounds);
                    Timed::merge(&mut c, time_fsdp(&ctx, &s.config, &snapshot, &batches, settings.warmup, run_all)?);
                    eprintln!(
                        "  {} round {round}/{}: (d) FSDP world 1, collectives run, bf16",
                        s.name, settings.rounds
                    );
                    let bf16 = run_all.mixed_precision(candle_fsdp::MixedPrecision::compute_in(DType::BF16));
                    Timed::merge(&mut d, time_fsdp(&ctx, &s.config, &snapshot, &batches, settings.warmup, bf16)?);
                }
                let done = |t: Option<Timed>| t.ok_or_else(|| anyhow!("no round ran"));
                Ok((done(a)?, done(a2)?, done(a3)?, done(b)?, done(c)?, done(d)?))
            })?;
            let tokens = (s.batch * s.seq_len) as f64;
            let min = |t: &Timed| t.times.iter().copied().fold(f64::INFINITY, f64::min);
            let (base_med, base_min) = (median(&a.times), min(&a));
            sec.info(format!(
                "  {:<50} {:>10} {:>10} {:>9} {:>9} {:>12} {:>14}",
                "run", "median", "min", "x (a) med", "x (a) min", "tokens/s", "pool peak used"
            ));
            for (name, t) in [
                ("(a)  plain candle, fresh device", &a),
                ("(a') plain candle, NCCL rank's device", &a2),
                ("(a'') the same, cudarc event tracking on", &a3),
                ("(b)  FSDP world 1 (NCCL), FULL_SHARD", &b),
                ("(c)  FSDP world 1, FULL_SHARD, collectives run", &c),
                ("(d)  as (c), bf16 compute over f32 master shards", &d),
            ] {
                sec.info(format!(
                    "  {name:<50} {:>7.2} ms {:>7.2} ms {:>9.3} {:>9.3} {:>12.0} {:>14}",
                    median(&t.times),
                    min(t),
                    median(&t.times) / base_med,
                    min(t) / base_min,
                    tokens / (median(&t.times) / 1e3),
                    t.peak.map(|p| mib(p as f64)).unwrap_or_else(|| "n/a".into())
                ));
            }
            sec.info(format!(
                "  losses first / last: (a) {:.5} / {:.5}, (a') {:.5} / {:.5}, (b) {:.5} / {:.5}, (c) {:.5} / {:.5}",
                a.first_loss,
                a.last_loss,
                a2.first_loss,
                a2.last_loss,
                b.first_loss,
                b.last_loss,
                c.first_loss,
                c.last_loss
            ));
            let same = |t: &Timed| {
                (a.first_loss - t.first_loss).abs() <= 1e-4 * a.first_loss.abs()
                    && (a.last_loss - t.last_loss).abs() <= 1e-3 * a.last_loss.abs().max(1.0)
            };
            sec.check(
                same(&b) && same(&c),
                format!("{}: FSDP (b, c) and plain candle computed the same losses", s.name),
            );
            sec.check(
                (d.first_loss - a.first_loss).abs() <= 1e-2 * a.first_loss.abs() && d.last_loss.is_finite(),
                format!(
                    "{}: bf16 (d) starts at the f32 loss within 1%: {:.5} vs {:.5}, ends at {:.5} (f32 {:.5})",
                    s.name, d.first_loss, a.first_loss, d.last_loss, a.last_loss
                ),
            );
            sec.figure(
                &format!("step time {} ({} params, {}x{} tokens)", s.name, human_count(numel), s.batch, s.seq_len),
                format!(
                    "plain {:.2} ms median / {:.2} min; plain on the NCCL device {:.2} / {:.2} (with cudarc's event tracking {:.2} / {:.2}); FSDP {:.2} / {:.2}; FSDP/plain {:.3} by median, {:.3} by min; FSDP with collectives run {:.2} / {:.2}, /plain {:.3} by median; the same in bf16 {:.2} / {:.2}, /f32 FSDP {:.3} by median",
                    base_med,
                    base_min,
                    median(&a2.times),
                    min(&a2),
                    median(&a3.times),
                    min(&a3),
                    median(&b.times),
                    min(&b),
                    median(&b.times) / base_med,
                    min(&b) / base_min,
                    median(&c.times),
                    min(&c),
                    median(&c.times) / base_med,
                    median(&d.times),
                    min(&d),
                    median(&d.times) / median(&c.times)
                ),
            );
            Ok(())
        });
        sec.check_result(format!("timing of the {} model", s.name), result);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 9. The fused ops' CUDA kernels against their CPU implementations (themselves tested
// against the composed references), forward and every gradient, in f32 and bf16; and
// candle's operations on a released parameter of a CUDA model.

/// The output and the gradients of `sum(op(inputs) · dy)` with respect to `inputs`.
fn forward_and_grads(
    op: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    dy: &Tensor,
) -> Result<Vec<Tensor>> {
    let vars = inputs.iter().map(Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&tensors)?;
    let grads = (&y * dy.to_dtype(y.dtype())?.to_device(y.device())?)?.sum_all()?.backward()?;
    let mut out = vec![y.to_dtype(DType::F32)?.to_device(&Device::Cpu)?];
    for var in &vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            out.push(g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
        }
    }
    Ok(out)
}

type FusedOp = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;

fn fused_ops(sec: &Section, args: &Args, settings: &Settings) -> Result<()> {
    use candle_fsdp::ops;
    let dev = Device::new_cuda(0)?;
    let mut rng = Rng::new(77);
    let targets = Tensor::new(&[3u32, 0, 5, 7, 1, 6], &Device::Cpu)?;
    let t2 = targets.clone();
    let cases: Vec<(&str, Vec<Vec<usize>>, Vec<usize>, FusedOp)> = vec![
        ("rms_norm", vec![vec![6, 96], vec![96]], vec![6, 96], Box::new(|t| ops::rms_norm(&t[0], &t[1], 1e-5))),
        ("swiglu", vec![vec![6, 344], vec![6, 344]], vec![6, 344], Box::new(|t| ops::swiglu(&t[0], &t[1]))),
        ("linear", vec![vec![2, 3, 128], vec![344, 128]], vec![2, 3, 344], Box::new(|t| ops::linear(&t[0], &t[1]))),
        (
            "rope",
            vec![vec![2, 9, 4, 64], vec![9, 32]],
            vec![2, 9, 4, 64],
            Box::new(|t| ops::rope(&t[0], &t[1].cos()?, &t[1].sin()?)),
        ),
        (
            "causal_attention (GQA 4:2, head_dim 64, 70 rows)",
            vec![vec![2, 70, 4, 64], vec![2, 70, 2, 64], vec![2, 70, 2, 64]],
            vec![2, 70, 4, 64],
            Box::new(|t| ops::causal_attention(&t[0], &t[1], &t[2], 0.125)),
        ),
        (
            "causal_attention (head_dim 128)",
            vec![vec![1, 33, 8, 128], vec![1, 33, 1, 128], vec![1, 33, 1, 128]],
            vec![1, 33, 8, 128],
            Box::new(|t| ops::causal_attention(&t[0], &t[1], &t[2], 0.088)),
        ),
        (
            "cross_entropy",
            vec![vec![6, 8]],
            vec![],
            Box::new(move |t| ops::cross_entropy(&t[0], &targets.to_device(t[0].device())?)),
        ),
        (
            "linear_cross_entropy",
            vec![vec![6, 32], vec![8, 32]],
            vec![],
            Box::new(move |t| ops::linear_cross_entropy(&t[0], &t[1], &t2.to_device(t[0].device())?)),
        ),
    ];
    for (name, shapes, out_shape, op) in &cases {
        for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
            let inputs = shapes.iter().map(|s| randn_cpu(&mut rng, s)).collect::<Result<Vec<_>>>()?;
            let dy =
                if out_shape.is_empty() { Tensor::new(1.5f32, &Device::Cpu)? } else { randn_cpu(&mut rng, out_shape)? };
            let on = |device: &Device| -> Result<Vec<Tensor>> {
                let inputs = inputs
                    .iter()
                    .map(|t| t.to_dtype(dtype)?.to_device(device))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                forward_and_grads(op.as_ref(), &inputs, &dy)
            };
            let outcome = (|| -> Result<f64> {
                let (cpu, gpu) = (on(&Device::Cpu)?, on(&dev)?);
                ensure!(cpu.len() == gpu.len(), "{} gradients on the CPU, {} on the GPU", cpu.len() - 1, gpu.len() - 1);
                let mut worst = 0f64;
                for (c, g) in cpu.iter().zip(&gpu) {
                    worst = worst.max(max_abs_diff(g, c)? / max_abs(c)?.max(1e-2));
                }
                Ok(worst)
            })();
            if let Some(worst) = sec.check_result(format!("{name} {dtype:?}"), outcome) {
                sec.check(worst <= tolerance, format!("{name} {dtype:?}: forward and gradients within {worst:.2e} of the CPU (relative to scale; tolerance {tolerance:e})"));
            }
        }
    }
    // AdamW in place: three steps on the GPU, to the bit what candle-nn's AdamW computes.
    let outcome = (|| -> Result<bool> {
        let start = randn_cpu(&mut rng, &[4, 33])?.to_device(&dev)?;
        let theta = Var::from_tensor(&start)?;
        let reference = Var::from_tensor(&start)?;
        let params = ParamsAdamW { lr: 0.01, weight_decay: 0.1, ..ParamsAdamW::default() };
        let mut theirs = AdamW::new(vec![reference.clone()], params.clone())?;
        let mut ours = candle_fsdp::optim::AdamW::new(vec![theta.clone()], params)?;
        for _ in 0..3 {
            let g = randn_cpu(&mut rng, &[4, 33])?.to_device(&dev)?;
            ours.step(&(theta.as_tensor() * &g)?.sum_all()?.backward()?)?;
            theirs.step(&(reference.as_tensor() * &g)?.sum_all()?.backward()?)?;
        }
        Ok(values(theta.as_tensor())? == values(reference.as_tensor())?)
    })();
    if let Some(same) = sec.check_result("adamw_update", outcome) {
        sec.check(same, "adamw_update on the GPU: three steps bit-identical to candle-nn's AdamW");
    }
    // A parameter kept past summon_full_params on a CUDA model: candle refuses to use it.
    let outcome = on_gpu(Duration::from_secs(60), |ctx| {
        let model = Llama::new(
            &llama_config(64, 32, 48, 1, 4, 2, 16),
            VarBuilder::from_varmap(&VarMap::new(), DTYPE, &ctx.device),
        )?;
        let fsdp = candle_fsdp::Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let kept = fsdp.summon_full_params(|m| m.lm_head.weight.clone())?;
        let x = Tensor::ones((3, 32), DTYPE, &ctx.device)?;
        let tries: Vec<(&str, candle_core::Result<Tensor>)> = vec![
            ("matmul", x.matmul(&kept.t()?)),
            ("read", kept.to_device(&Device::Cpu).and_then(|t| t.flatten_all()?.to_vec1::<f32>().map(|_| t))),
            ("exp", kept.exp()),
            ("add", &kept + &kept),
            ("copy", kept.copy()),
            ("contiguous of a transpose", kept.t()?.contiguous()),
        ];
        Ok(tries.into_iter().map(|(what, r)| (what, r.is_err())).collect::<Vec<_>>())
    });
    if let Some(tries) = sec.check_result("released parameter on the GPU", outcome) {
        for (what, refused) in tries {
            sec.check(refused, format!("a released CUDA parameter: {what} is refused"));
        }
    }
    // A training step of plain candle on the composed kernels and on the fused ones.
    for &size in &settings.models {
        let s = setup(size, args);
        let outcome = (|| -> Result<(f64, f64)> {
            let (snapshot, numel) = llama_snapshot(&s.config)?;
            sec.info(describe(&s, numel));
            let task = BigramTask::new(s.config.vocab_size, 0.1, 7);
            let mut rng = Rng::new(11);
            let batches = (0..settings.warmup + settings.steps)
                .map(|_| task.batch(&mut rng, s.batch, s.seq_len, &Device::Cpu))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let run = |kernels| -> Result<Timed> {
                let config = LlamaConfig { kernels, ..s.config.clone() };
                time_plain(&config, &snapshot, &batches, settings.warmup, &dev)
            };
            let (composed, fused) = (run(Kernels::Composed)?, run(Kernels::Fused)?);
            Ok((median(&composed.times), median(&fused.times)))
        })();
        if let Some((composed, fused)) = sec.check_result(format!("{} step time", s.name), outcome) {
            sec.figure(
                &format!("step time {} plain candle, f32", s.name),
                format!("composed {composed:.2} ms, fused {fused:.2} ms: fused / composed {:.3}", fused / composed),
            );
        }
    }
    Ok(())
}
