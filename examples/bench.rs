//! Benchmarks one training step (forward + backward + AdamW step) of a Llama model, in one
//! run, three ways on the same model, dtype (f32), weights, and global batches:
//!
//! - (a) plain candle on one thread, the whole global batch, no FSDP;
//! - (b) FSDP at world size 1 on the whole global batch: FSDP's own overhead;
//! - (c) FSDP at world size 2, each rank on half of the global batch: data parallelism on
//!   two CPU ranks (threads).
//!
//! A fourth, reference run (a/2) trains plain candle on one rank's half of each batch: the
//! time (c) would take if two ranks scaled perfectly. The runs take turns in rounds (a,
//! a/2, b, c, a, a/2, ...), each from the same initial weights, so that load from other
//! processes spreads over all of them.
//!
//! It prints the median (and minimum) step times and their ratios to (a), each rank's
//! model-state memory (parameters or shards, gradients, AdamW state, gathered peak) next to
//! (a)'s, and the losses of the runs, which must agree (same data, same arithmetic up to
//! rounding).
//!
//! ```text
//! cargo run --release --example bench
//! cargo run --release --example bench -- --model medium --steps 10
//! ```

mod common;

use anyhow::{ensure, Context};
use candle_core::{Device, Tensor};
use candle_fsdp::dist::ReduceOp;
use candle_fsdp::models::llama::{Llama, LlamaConfig};
use candle_fsdp::models::Kernels;
use candle_fsdp::optim::{AdamW, ParamsAdamW};
use candle_fsdp::{launch, Bytes, Fsdp, FsdpConfig, LaunchOptions, ShardingStrategy};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use clap::{Parser, ValueEnum};
use common::{llama_presets, median, ms, BigramTask, Precision, Rng, DTYPE};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Benchmark a training step: plain candle vs FSDP at world size 1 and 2 (CPU ranks).
///
/// Same model, f32, same weights and the same global batches in all three runs; (c) splits
/// each global batch over its two ranks. Step = forward + backward + AdamW step.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Model size: `small` (hidden 128, 4 layers, vocab 512; global batch 16 x 64 tokens),
    /// `medium` (hidden 256, 6 layers, vocab 1024; global batch 16 x 128 tokens) or `train`
    /// (the main job's: hidden 128, 4 layers, vocab 128; 8 x 32 tokens).
    #[arg(long, value_enum, default_value_t = ModelSize::Small)]
    model: ModelSize,

    /// Measured steps per run, in total over the rounds (the median is reported).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,

    /// Warm-up steps per run and round, not measured.
    #[arg(long, default_value_t = 3)]
    warmup: u64,

    /// Rounds: the runs take turns (a, a/2, b, c, a, a/2, ...), each round measuring its
    /// share of --steps from a fresh start, so that load from other processes on the
    /// machine spreads over the three runs instead of hitting one.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,

    /// Sharding strategy of the FSDP runs: `full-shard`, `shard-grad-op` or `no-shard`.
    #[arg(long, default_value = "full-shard", value_parser = common::parse_strategy)]
    strategy: ShardingStrategy,

    /// CPU threads of each run's pool (each rank's, under FSDP). Default 1: (a) and (b)
    /// then run on one core and (c) on two, one per rank. With more, (a) and (b) use
    /// candle's intra-op parallelism, and each of (c)'s two ranks gets that many threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    candle_threads: u64,

    /// Also time (c) with these mixed-precision recipes (e.g. `bf16,f16`), in the same
    /// rounds, against (c) in f32.
    #[arg(long, value_enum, value_delimiter = ',')]
    precisions: Vec<Precision>,

    /// Also print every measured step time of every run.
    #[arg(long)]
    verbose: bool,

    /// The kernels the model runs on: `fused` (candle_fsdp::ops) or `composed` (chains
    /// of candle's primitives).
    #[arg(long, value_enum, default_value_t = KernelsArg::Fused)]
    kernels: KernelsArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum KernelsArg {
    Fused,
    Composed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ModelSize {
    Small,
    Medium,
    /// The main job's model and one rank's batch (8 x 32 tokens).
    Train,
}

/// The model and the global batch of a size.
struct Setup {
    config: LlamaConfig,
    batch: usize,
    seq_len: usize,
}

impl ModelSize {
    fn setup(self) -> Setup {
        let (config, batch, seq_len) = match self {
            Self::Small => (llama_presets::small(), 16, 64),
            Self::Medium => (llama_presets::medium(), 16, 128),
            Self::Train => (llama_presets::main_job(128, 32), 8, 32),
        };
        Setup { config, batch, seq_len }
    }
}

const LR: f64 = 1e-3;

/// One rank's (or the plain run's) measurements.
#[derive(Clone, Debug)]
struct RankRun {
    /// Per measured step.
    times: Vec<Duration>,
    /// Global loss at the first and the last step (before their updates).
    first_loss: f64,
    last_loss: f64,
    param_bytes: usize,
    grad_bytes: usize,
    /// AdamW allocates two moments of every variable it steps.
    optimizer_bytes: usize,
    gathered_peak: usize,
}

impl RankRun {
    /// The figures of one rank's run: its step times, the loss of every step, the bytes
    /// of the variables it stepped and of their last gradients, its gathered peak.
    fn new(times: Vec<Duration>, losses: &[f64], param_bytes: usize, grad_bytes: usize, gathered_peak: usize) -> Self {
        Self {
            times,
            first_loss: losses[0],
            last_loss: *losses.last().expect("a step"),
            param_bytes,
            grad_bytes,
            optimizer_bytes: 2 * param_bytes,
            gathered_peak,
        }
    }
}

impl RankRun {
    fn total(&self) -> usize {
        self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.gathered_peak
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = common::configure_cpu_threads(Some(args.candle_threads as usize), 1);
    let mut setup = args.model.setup();
    setup.config.kernels = match args.kernels {
        KernelsArg::Fused => Kernels::Fused,
        KernelsArg::Composed => Kernels::Composed,
    };
    let (warmup, rounds) = (args.warmup as usize, args.rounds as usize);
    let per_round = (args.steps as usize).div_ceil(rounds);
    let steps = per_round * rounds;
    let device = Device::Cpu;

    // One set of weights and one sequence of global batches for all three runs.
    let var_map = VarMap::new();
    let model = Llama::new(&setup.config, VarBuilder::from_varmap(&var_map, DTYPE, &device))?;
    let snapshot = common::snapshot(&var_map)?;
    drop((model, var_map));
    let numel = common::numel(snapshot.values());
    let task = BigramTask::new(setup.config.vocab_size, 0.1, 7);
    let mut rng = Rng::new(11);
    let batches = (0..warmup + per_round)
        .map(|_| task.batch(&mut rng, setup.batch, setup.seq_len, &device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    // Rank 0's half of every global batch, for the reference run (a/2).
    let half_batches = batches
        .iter()
        .map(|(i, t)| Ok((i.narrow(0, 0, setup.batch / 2)?, t.narrow(0, 0, setup.batch / 2)?)))
        .collect::<candle_core::Result<Vec<_>>>()?;

    println!("model {:?}: {}", args.model, common::describe_llama(&setup.config, numel));
    println!(
        "global batch {} x {} tokens; {steps} measured steps per run, in {rounds} round(s) of {warmup} warm-up + {per_round} measured steps;\nFSDP strategy {}; AdamW lr {LR}",
        setup.batch, setup.seq_len, args.strategy
    );
    println!(
        "machine: {} cores, {threads} candle thread(s) per op; load average before: {}",
        common::cores(),
        load_average()
    );

    let (mut plain, mut one, mut two): (Option<RankRun>, Option<Vec<RankRun>>, Option<Vec<RankRun>>) =
        (None, None, None);
    let mut half = None;
    let mut mixed: Vec<Option<Vec<RankRun>>> = vec![None; args.precisions.len()];
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}: (a) plain candle ...");
        merge(&mut plain, on_pool(threads, || run_plain(&setup.config, &snapshot, &batches, warmup))?);
        eprintln!("round {round}/{rounds}: (a/2) plain candle, half batch ...");
        merge(&mut half, on_pool(threads, || run_plain(&setup.config, &snapshot, &half_batches, warmup))?);
        eprintln!("round {round}/{rounds}: (b) FSDP, world size 1 ...");
        let f32 = Precision::F32;
        merge_ranks(&mut one, run_fsdp(1, threads, args.strategy, f32, &setup.config, &snapshot, &batches, warmup)?);
        eprintln!("round {round}/{rounds}: (c) FSDP, world size 2 ...");
        merge_ranks(&mut two, run_fsdp(2, threads, args.strategy, f32, &setup.config, &snapshot, &batches, warmup)?);
        for (runs, &precision) in mixed.iter_mut().zip(&args.precisions) {
            eprintln!("round {round}/{rounds}: (c) FSDP, world size 2, {precision} ...");
            merge_ranks(
                runs,
                run_fsdp(2, threads, args.strategy, precision, &setup.config, &snapshot, &batches, warmup)?,
            );
        }
    }
    let (plain, one, two) = (plain.expect("a round"), one.expect("a round"), two.expect("a round"));
    let half = half.expect("a round");
    if args.verbose {
        let list = |times: &[Duration]| times.iter().map(|&d| format!("{:.0}", ms(d))).collect::<Vec<_>>().join(" ");
        println!("\nstep times (ms), in order:");
        println!("  (a)   {}", list(&plain.times));
        println!("  (b)   {}", list(&one[0].times));
        println!("  (c)   rank 0: {}", list(&two[0].times));
        println!("        rank 1: {}", list(&two[1].times));
        println!("  (a/2) {}", list(&half.times));
    }

    let median_ms = |times: &[Duration]| median(&times.iter().map(|&d| ms(d)).collect::<Vec<_>>());
    let min_ms = |times: &[Duration]| times.iter().map(|&d| ms(d)).fold(f64::INFINITY, f64::min);
    // A world's step ends when its slowest rank's does.
    let world_times = |ranks: &[RankRun]| -> Vec<Duration> {
        (0..ranks[0].times.len()).map(|i| ranks.iter().map(|r| r.times[i]).max().expect("a rank")).collect()
    };
    let (ta, tb, tc) = (plain.times.clone(), world_times(&one), world_times(&two));
    let base = median_ms(&ta);
    let per_rank = setup.batch / 2;

    println!("\nstep time (forward + backward + AdamW step), median and min of {steps} measured steps:");
    let base_min = min_ms(&ta);
    println!("  {:<52} {:>10} {:>10}   {:>13} {:>10}", "run", "median", "min", "ratio: median", "min");
    let row = |name: String, times: &[Duration]| {
        let (m, least) = (median_ms(times), min_ms(times));
        println!("  {name:<52} {m:>7.1} ms {least:>7.1} ms   {:>13.3} {:>10.3}", m / base, least / base_min);
    };
    row(format!("(a) plain candle (no FSDP), batch {}", setup.batch), &ta);
    row(format!("(b) FSDP world size 1, batch {}", setup.batch), &tb);
    row(format!("(c) FSDP world size 2, 2 ranks x batch {per_rank}"), &tc);
    row(format!("(a/2) plain candle, batch {per_rank} [reference]"), &half.times);
    println!(
        "  (c) speed-up over (a): {:.2}x by medians, {:.2}x by minima; (b) overhead over (a): {:+.1}% by medians, {:+.1}% by minima",
        base / median_ms(&tc),
        base_min / min_ms(&tc),
        (median_ms(&tb) / base - 1.0) * 100.0,
        (min_ms(&tb) / base_min - 1.0) * 100.0
    );
    println!(
        "  (a/2) is one rank's share of the work without FSDP: the time (c) would take with perfect scaling; \
         (c)/(a/2) = {:.2} by medians, {:.2} by minima",
        median_ms(&tc) / median_ms(&half.times),
        min_ms(&tc) / min_ms(&half.times)
    );

    for (runs, precision) in mixed.iter().zip(&args.precisions) {
        let runs = runs.as_ref().expect("a round");
        let tm = world_times(runs);
        println!(
            "  (c) in {precision}: {:.1} ms median, {:.1} ms min; x (c) in f32 {:.3} by median, {:.3} by min; gathered peak {} \
             (f32: {}); loss first / last {:.5} / {:.5}",
            median_ms(&tm),
            min_ms(&tm),
            median_ms(&tm) / median_ms(&tc),
            min_ms(&tm) / min_ms(&tc),
            Bytes(runs[0].gathered_peak),
            Bytes(two[0].gathered_peak),
            runs[0].first_loss,
            runs[0].last_loss
        );
    }

    println!(
        "\nmodel-state memory per rank (bytes of the actual tensors; AdamW state = its 2 moments per stepped element):"
    );
    println!(
        "  {:<18} {:>11} {:>11} {:>11} {:>14} {:>11} {:>12}",
        "", "parameters", "gradients", "AdamW", "gathered peak", "total", "ratio to (a)"
    );
    let mem_row = |name: &str, r: &RankRun| {
        println!(
            "  {name:<18} {:>11} {:>11} {:>11} {:>14} {:>11} {:>12.3}",
            Bytes(r.param_bytes),
            Bytes(r.grad_bytes),
            Bytes(r.optimizer_bytes),
            Bytes(r.gathered_peak),
            Bytes(r.total()),
            r.total() as f64 / plain.total() as f64
        );
    };
    mem_row("(a) one process", &plain);
    mem_row("(b) rank 0", &one[0]);
    mem_row("(c) rank 0", &two[0]);
    mem_row("(c) rank 1", &two[1]);
    println!(
        "  gathered peak: full-size parameters alive at once while units are gathered (none in (a), which holds its \
         parameters whole);\n  at world size 1 every gather is a copy of the (whole) shards, so (b) holds more than (a)."
    );

    println!("\nloss (same weights, same batches): first step / last step");
    println!("  (a) {:.5} / {:.5}", plain.first_loss, plain.last_loss);
    println!("  (b) {:.5} / {:.5}", one[0].first_loss, one[0].last_loss);
    println!("  (c) {:.5} / {:.5}", two[0].first_loss, two[0].last_loss);
    for (name, run) in [("(b)", &one[0]), ("(c)", &two[0])] {
        ensure!(
            (run.first_loss - plain.first_loss).abs() < 1e-3 && (run.last_loss - plain.last_loss).abs() < 2e-2,
            "{name} computed other losses than (a): {} / {} vs {} / {}",
            run.first_loss,
            run.last_loss,
            plain.first_loss,
            plain.last_loss
        );
    }

    println!(
        "\nnotes: this machine has {} cores. (c) runs its two ranks as two threads, one per core, each with {threads} candle \
         thread(s),\n       so (c)/(a) is a parallel-speedup measurement (data parallelism with FSDP's gathers and \
         reductions in the way);\n       (b) runs the whole FSDP machinery on one rank with nothing to parallelise, so \
         (b)/(a) isolates FSDP's own overhead.\n       load average after: {}",
        common::cores(),
        load_average()
    );
    Ok(())
}

/// Appends a later round's step times; every round starts from the same weights and sees
/// the same batches, so its losses and memory equal the first round's.
fn merge(into: &mut Option<RankRun>, run: RankRun) {
    match into {
        None => *into = Some(run),
        Some(first) => first.times.extend(run.times),
    }
}

fn merge_ranks(into: &mut Option<Vec<RankRun>>, runs: Vec<RankRun>) {
    match into {
        None => *into = Some(runs),
        Some(first) => first.iter_mut().zip(runs).for_each(|(f, r)| f.times.extend(r.times)),
    }
}

/// Runs `f` on a CPU pool of `threads` threads, as each FSDP rank runs on its own, so that
/// (a) and the ranks of (b) and (c) run under the same conditions.
fn on_pool<R: Send>(threads: usize, f: impl FnOnce() -> anyhow::Result<R> + Send) -> anyhow::Result<R> {
    candle_fsdp::dist::run_on_cpu_threads(threads, f)?
}

/// (a): the model trained directly, no FSDP.
fn run_plain(
    config: &LlamaConfig,
    snapshot: &HashMap<String, Tensor>,
    batches: &[(Tensor, Tensor)],
    warmup: usize,
) -> anyhow::Result<RankRun> {
    let var_map = VarMap::new();
    let model = Llama::new(config, VarBuilder::from_varmap(&var_map, DTYPE, &Device::Cpu))?;
    for (name, var) in var_map.data().lock().expect("VarMap lock").iter() {
        var.set(snapshot.get(name).with_context(|| format!("`{name}` missing from the snapshot"))?)?;
    }
    let vars = var_map.all_vars();
    let mut optimizer = AdamW::new(vars.clone(), ParamsAdamW { lr: LR, ..ParamsAdamW::default() })?;
    let (mut times, mut losses, mut grad_bytes) = (Vec::new(), Vec::new(), 0);
    for (step, (inputs, targets)) in batches.iter().enumerate() {
        let started = Instant::now();
        let loss = model.loss(inputs, targets)?;
        let grads = loss.backward()?;
        optimizer.step(&grads)?;
        let elapsed = started.elapsed();
        if step >= warmup {
            times.push(elapsed);
        }
        losses.push(loss.to_scalar::<f32>()? as f64);
        grad_bytes = common::tensor_bytes(vars.iter().filter_map(|v| grads.get(v.as_tensor())));
    }
    Ok(RankRun::new(times, &losses, common::var_bytes(&vars), grad_bytes, 0))
}

/// (b) and (c): FSDP over `world` CPU ranks of `threads` threads each, rank `r` on its
/// slice of every global batch.
#[allow(clippy::too_many_arguments)]
fn run_fsdp(
    world: usize,
    threads: usize,
    strategy: ShardingStrategy,
    precision: Precision,
    config: &LlamaConfig,
    snapshot: &HashMap<String, Tensor>,
    batches: &[(Tensor, Tensor)],
    warmup: usize,
) -> anyhow::Result<Vec<RankRun>> {
    let runs = launch(LaunchOptions::new(world).cpu_threads(threads), |ctx| {
        let model = Llama::new(config, VarBuilder::from_tensors(snapshot.clone(), DTYPE, &Device::Cpu))?;
        let fsdp_config = FsdpConfig {
            sync_module_states: false,
            ..FsdpConfig::default().strategy(strategy).mixed_precision(precision.policy())
        };
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), fsdp_config)?;
        let mut scaler = precision.grad_scaler()?;
        let shards = fsdp.parameters();
        let mut optimizer = AdamW::new(shards.clone(), ParamsAdamW { lr: LR, ..ParamsAdamW::default() })?;
        let (mut times, mut losses, mut grad_bytes) = (Vec::new(), Vec::new(), 0);
        for (step, (inputs, targets)) in batches.iter().enumerate() {
            let rows = inputs.dim(0)? / world;
            let inputs = inputs.narrow(0, ctx.rank * rows, rows)?;
            let targets = targets.narrow(0, ctx.rank * rows, rows)?;
            ctx.comm.barrier("step start")?;
            let started = Instant::now();
            let loss = fsdp.forward(|model| model.loss(&inputs, &targets))?;
            let grads = match &mut scaler {
                Some(scaler) => {
                    let mut grads = fsdp.backward(&scaler.scale_loss(&loss)?)?;
                    scaler.step(&fsdp, &mut optimizer, &mut grads)?;
                    grads
                }
                None => {
                    let grads = fsdp.backward(&loss)?;
                    optimizer.step(&grads)?;
                    grads
                }
            };
            let elapsed = started.elapsed();
            if step >= warmup {
                times.push(elapsed);
            }
            let global = ctx.comm.all_reduce(&loss.detach().reshape(1)?, ReduceOp::Avg, "loss")?.wait()?;
            losses.push(global.to_vec1::<f32>()?[0] as f64);
            grad_bytes = common::tensor_bytes(shards.iter().filter_map(|v| grads.get(v.as_tensor())));
        }
        Ok(RankRun::new(
            times,
            &losses,
            common::var_bytes(&shards),
            grad_bytes,
            fsdp.diagnostics().memory().gathered_peak,
        ))
    })?;
    Ok(runs)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
