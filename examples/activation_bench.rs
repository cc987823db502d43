//! What activation checkpointing saves, and what it costs: the main job's Llama trained on
//! thread ranks at world sizes 1, 2 and 4, with and without
//! `FsdpConfig::activation_checkpointing`, side by side in one run; and what the fused
//! kernels save over the composed ones (`--kernels`), whose attention keeps the scores and
//! their softmax for the backward.
//!
//! Memory comes from a counting allocator (the whole process, so all ranks; divided by the
//! world size): the bytes alive at the end of the forward beyond those before it, less the
//! gathered parameters FSDP keeps (the root's), are the activations the backward will
//! need; the peak during the backward beyond the level before the forward is what the
//! backward adds at most (activations, gathered parameters, gradients). Step time is the
//! median over the measured steps, forward + backward + AdamW. Next to them, the plan's
//! prediction: a step profiled with one sequence per rank (`Diagnostics::activation_profile`),
//! scaled to the batch by `Plan::with_activations`.
//!
//! ```text
//! cargo run --release --example activation_bench
//! cargo run --release --example activation_bench -- --seq-len 256 --batch-size 4 --steps 4
//! cargo run --release --example activation_bench -- --kernels --seq-len 2048 --batch-size 1 --worlds 1
//! ```

mod common;

use candle_core::Device;
use candle_fsdp::models::llama::{Llama, LlamaConfig};
use candle_fsdp::models::Kernels;
use candle_fsdp::optim::{AdamW, ParamsAdamW};
use candle_fsdp::{launch, Bytes, Fsdp, FsdpConfig, LaunchOptions, MetaModel, Plan, PlanConfig};
use candle_nn::Optimizer;
use clap::Parser;
use common::counting_allocator::{allocated, peak, reset_peak, CountingAllocator};
use common::{median, ms, BigramTask, Rng, DTYPE};
use std::time::Instant;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Activation memory and step time with and without activation checkpointing.
#[derive(Parser, Debug)]
struct Args {
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Sequences per rank and step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Measured steps per run (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// World sizes to run.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4])]
    worlds: Vec<usize>,
    /// Compare the fused kernels with the composed ones instead (no checkpointing).
    #[arg(long)]
    kernels: bool,
}

/// Per rank: activations alive at the end of the forward, the backward's peak above the
/// level before the forward, and the median step time in ms.
struct Measured {
    /// The plan's prediction from a profiled step with one sequence per rank.
    predicted: usize,
    activations: usize,
    backward_peak: usize,
    step_ms: f64,
}

fn measure(args: &Args, world: usize, checkpointing: bool, kernels: Kernels) -> anyhow::Result<Measured> {
    let config = LlamaConfig { kernels, ..common::llama_presets::main_job(128, args.seq_len) };
    let task = BigramTask::new(config.vocab_size, 0.1, 3);
    let fsdp_config = FsdpConfig::default().activation_checkpointing(checkpointing);
    let runs = launch(LaunchOptions::new(world), |ctx| {
        let meta = MetaModel::build(DTYPE, &Device::Cpu, |vb| Llama::new(&config, vb))?;
        let fsdp = Fsdp::wrap_meta(meta, ctx.comm.clone(), fsdp_config, 1)?;
        let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW { lr: 1e-3, ..ParamsAdamW::default() })?;
        // The plan's prediction: one profiled step with one sequence per rank, scaled.
        fsdp.diagnostics().set_activation_profiling(true);
        let (ids, targets) = task.batch(&mut Rng::stream(5, ctx.rank as u64), 1, args.seq_len, &Device::Cpu)?;
        let loss = fsdp.forward(|m| m.loss(&ids, &targets))?;
        drop(fsdp.backward(&loss)?);
        fsdp.diagnostics().set_activation_profiling(false);
        let profile = fsdp.diagnostics().activation_profile().expect("a profiled step");
        let layout = MetaModel::build(DTYPE, &Device::Cpu, |vb| Llama::new(&config, vb))?.layout()?;
        let plan = Plan::new(&layout, PlanConfig::new(world, fsdp_config))?;
        let predicted = plan.with_activations(&profile, args.batch_size as f64).activation_bytes();
        let (mut times, mut activations, mut backward_peak) = (Vec::new(), 0, 0);
        for step in 0..=args.steps {
            let mut rng = Rng::stream(7, ((step as u64) << 8) | ctx.rank as u64);
            let (ids, targets) = task.batch(&mut rng, args.batch_size, args.seq_len, &Device::Cpu)?;
            // Every rank at the same point before each reading of the (process-wide) counters.
            ctx.comm.barrier("before the forward")?;
            let before = reset_peak();
            ctx.comm.barrier("counters reset")?;
            let started = Instant::now();
            let loss = fsdp.forward(|m| m.loss(&ids, &targets))?;
            ctx.comm.barrier("after the forward")?;
            let after_forward = allocated();
            let kept = fsdp.diagnostics().memory().gathered_bytes;
            ctx.comm.barrier("forward read")?;
            let grads = fsdp.backward(&loss)?;
            ctx.comm.barrier("after the backward")?;
            let highest = peak();
            optimizer.step(&grads)?;
            let elapsed = started.elapsed();
            if step > 0 {
                times.push(ms(elapsed));
                activations = (after_forward.saturating_sub(before) / world).saturating_sub(kept);
                backward_peak = highest.saturating_sub(before) / world;
            }
        }
        Ok(Measured { predicted, activations, backward_peak, step_ms: median(&times) })
    })?;
    Ok(runs.into_iter().next().expect("rank 0"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = common::llama_presets::main_job(128, args.seq_len);
    println!(
        "Llama of the main job ({} layers, hidden {}), {} x {} tokens per rank, FULL_SHARD, f32; {} measured steps",
        config.num_hidden_layers, config.hidden_size, args.batch_size, args.seq_len, args.steps
    );
    if args.kernels {
        return compare_kernels(&args);
    }
    let mut predictions = Vec::new();
    print_header(("plain", "ckpt"));
    for &world in &args.worlds {
        let plain = measure(&args, world, false, Kernels::Fused)?;
        let checkpointed = measure(&args, world, true, Kernels::Fused)?;
        print_row(world, &plain, &checkpointed);
        predictions.push((world, plain, checkpointed));
    }
    print_footer("checkpointed / plain");
    println!("the plan's prediction (a step profiled with 1 sequence per rank, x {}):", args.batch_size);
    for (world, plain, checkpointed) in &predictions {
        let row = |m: &Measured| {
            let ratio = m.predicted as f64 / m.activations.max(1) as f64;
            format!("{} predicted, {} measured ({ratio:.3})", Bytes(m.predicted), Bytes(m.activations))
        };
        println!("  world {world}: plain {}; checkpointed {}", row(plain), row(checkpointed));
    }
    Ok(())
}

/// Activations and step time on the composed kernels against the fused ones.
fn compare_kernels(args: &Args) -> anyhow::Result<()> {
    print_header(("composed", "fused"));
    for &world in &args.worlds {
        let composed = measure(args, world, false, Kernels::Composed)?;
        let fused = measure(args, world, false, Kernels::Fused)?;
        print_row(world, &composed, &fused);
    }
    print_footer("fused / composed");
    Ok(())
}

/// The header of a table setting a baseline run (`names.0`) against another (`names.1`).
fn print_header(names: (&str, &str)) {
    let column = |what: &str, name: &str| format!("{what} ({name})");
    println!(
        "  {:<7} {:>22} {:>22} {:>8} {:>24} {:>24} {:>10}",
        "world",
        column("activations", names.0),
        column("activations", names.1),
        "ratio",
        column("backward peak", names.0),
        column("backward peak", names.1),
        "step time"
    );
}

fn print_row(world: usize, base: &Measured, other: &Measured) {
    println!(
        "  {:<7} {:>22} {:>22} {:>8.3} {:>24} {:>24} {:>9.2}x",
        world,
        Bytes(base.activations).to_string(),
        Bytes(other.activations).to_string(),
        other.activations as f64 / base.activations.max(1) as f64,
        Bytes(base.backward_peak).to_string(),
        Bytes(other.backward_peak).to_string(),
        other.step_ms / base.step_ms
    );
}

fn print_footer(step_time: &str) {
    println!(
        "  (per rank; activations: bytes alive at the end of the forward less the gathered parameters kept; backward \
         peak: above the level before the forward; step time: {step_time}, medians)"
    );
}
