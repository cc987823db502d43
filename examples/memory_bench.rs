//! Per-rank memory of a training run, one process per rank, next to the plan's prediction:
//! the peak while the model is built, while it is wrapped, during the training steps, and
//! what stays allocated between steps. Run by `examples/memory_bench.sh`, which starts it
//! under `fsdp-run` at several world sizes, with the model built whole on every rank
//! (`--init full`, then `Fsdp::wrap`) and built without values (`--init meta`, then
//! `Fsdp::wrap_meta`).
//!
//! Figures are counted by this program's allocator (every process is one rank, so they
//! are per rank): the most bytes allocated at once during a phase, and the bytes allocated
//! at its end. The prediction is the plan's `total_peak`: ZeRO-3's model state,
//! `(4 + 4 + 8) B/param / N` for f32 parameters, gradients and AdamW's two moments, plus
//! the largest gathered units in flight (`gathered_peak`) and the full gradients awaiting
//! their reduction (`unreduced_grads_peak`: the root's, which span the whole backward, and
//! the running unit's); plus this run's activations, which the plan does not know: they
//! are measured here as the growth of the forward before backward starts.
//!
//! ```text
//! cargo build --release --example memory_bench && cargo build --release -p fsdp-run
//! examples/memory_bench.sh
//! ```

mod common;

use anyhow::Context;
use candle_core::{Device, Tensor};
use candle_fsdp::models::llama::Llama;
use candle_fsdp::optim::{AdamW, ParamsAdamW};
use candle_fsdp::{Backend, Fsdp, FsdpConfig, MetaModel, Plan, PlanConfig, ProcessGroup};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use clap::{Parser, ValueEnum};
use common::counting_allocator::{allocated, peak, reset_peak, CountingAllocator};
use common::{BigramTask, Rng, DTYPE};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Init {
    /// Every rank builds the whole model (candle-nn's initialisers), then `Fsdp::wrap`.
    Full,
    /// `MetaModel::build`, then `Fsdp::wrap_meta`: each rank draws only its shards.
    Meta,
}

/// One rank's memory per phase of a Llama training run (start it under `fsdp-run`).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[arg(long, value_enum, default_value_t = Init::Meta)]
    init: Init,
    #[arg(long, default_value_t = 768)]
    hidden: usize,
    #[arg(long, default_value_t = 12)]
    layers: usize,
    #[arg(long, default_value_t = 2048)]
    intermediate: usize,
    #[arg(long, default_value_t = 12)]
    heads: usize,
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Tokens per rank and step.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    #[arg(long, default_value_t = 3)]
    steps: usize,
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Starts a phase: its peak is measured from here.
fn start_phase() {
    reset_peak();
}

fn mib(bytes: f64) -> String {
    format!("{:.0} MiB", bytes / (1024.0 * 1024.0))
}

/// One rank's figures, in bytes above the baseline before the model.
#[derive(Default)]
struct Figures {
    construction: usize,
    wrap: usize,
    step_peak: usize,
    /// The peaks of the step's parts: forward and loss, backward, optimizer step.
    forward_peak: usize,
    backward_peak: usize,
    optimizer_peak: usize,
    between_steps: usize,
    activations: usize,
    /// The peak resident set of the process (`VmHWM`), absolute.
    resident_peak: usize,
}

impl Figures {
    fn to_vec(&self) -> Vec<f64> {
        [
            self.construction,
            self.wrap,
            self.step_peak,
            self.between_steps,
            self.activations,
            self.resident_peak,
            self.forward_peak,
            self.backward_peak,
            self.optimizer_peak,
        ]
        .map(|b| b as f64)
        .to_vec()
    }
}

fn resident_peak() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if std::env::var_os("RANK").is_none() {
        anyhow::bail!("start this under fsdp-run (see examples/memory_bench.sh): it measures one process per rank");
    }
    let group = ProcessGroup::from_env(Backend::Tcp, Duration::from_secs(600))?;
    let ctx = group.context();
    let config = common::llama_presets::llama(
        args.vocab,
        args.hidden,
        args.intermediate,
        args.layers,
        (args.heads, args.heads),
        args.tokens.max(64),
    );
    let fsdp_config = FsdpConfig::default();
    let base = allocated();
    let mut figures = Figures::default();

    // Construction and wrapping.
    start_phase();
    let (fsdp, plan) = match args.init {
        Init::Full => {
            let var_map = VarMap::new();
            let model = Llama::new(&config, VarBuilder::from_varmap(&var_map, DTYPE, &Device::Cpu))?;
            figures.construction = peak() - base;
            let plan =
                Plan::new(&candle_fsdp::model::Layout::of(&model)?, PlanConfig::new(ctx.world_size, fsdp_config))?;
            start_phase();
            let fsdp = Fsdp::wrap(model, ctx.comm.clone(), fsdp_config)?;
            drop(var_map);
            (fsdp, plan)
        }
        Init::Meta => {
            let meta = MetaModel::build(DTYPE, &Device::Cpu, |vb| Llama::new(&config, vb))?;
            figures.construction = peak() - base;
            let plan = Plan::new(&meta.layout()?, PlanConfig::new(ctx.world_size, fsdp_config))?;
            start_phase();
            (Fsdp::wrap_meta(meta, ctx.comm.clone(), fsdp_config, 1)?, plan)
        }
    };
    figures.wrap = peak() - base;

    // Training steps.
    let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW::default())?;
    let task = BigramTask::new(args.vocab, 0.1, 1);
    let mut rng = Rng::stream(1, ctx.rank as u64);
    for step in 0..args.steps {
        let (inputs, targets) = task.batch(&mut rng, 1, args.tokens, &Device::Cpu)?;
        let before_forward = allocated();
        start_phase();
        let logits = fsdp.forward(|m| m.forward(&inputs))?;
        let loss = common::next_token_loss(&logits, &targets)?;
        figures.forward_peak = figures.forward_peak.max(peak() - base);
        // What the forward keeps for backward, beyond the root's gathered parameters.
        let kept = allocated().saturating_sub(before_forward).saturating_sub(plan.units[0].gathered_bytes);
        figures.activations = figures.activations.max(kept);
        start_phase();
        let grads = fsdp.backward(&loss)?;
        drop((loss, logits));
        figures.backward_peak = figures.backward_peak.max(peak() - base);
        start_phase();
        optimizer.step(&grads)?;
        figures.optimizer_peak = figures.optimizer_peak.max(peak() - base);
        drop(grads);
        if step + 1 == args.steps {
            figures.between_steps = allocated() - base;
        }
    }
    figures.step_peak = figures.forward_peak.max(figures.backward_peak).max(figures.optimizer_peak);
    figures.resident_peak = resident_peak();

    // Rank 0 prints every rank's figures.
    let mine = Tensor::new(figures.to_vec(), &Device::Cpu)?;
    let all = ctx.comm.all_gather(&mine, "memory figures")?.wait()?.reshape((ctx.world_size, 9))?.to_vec2::<f64>()?;
    if ctx.rank == 0 {
        let params = plan.unsharded_memory.params;
        let state = plan.memory.params + plan.memory.grads + plan.memory.optimizer;
        let worst = |i: usize| all.iter().map(|r| r[i]).fold(0.0, f64::max);
        let predicted = plan.memory.total_peak() + worst(4) as usize;
        println!(
            "{:<5} {:>5} {:>11} {:>11} {:>11} {:>11} {:>13} {:>11} {:>8} {:>11}",
            "init", "world", "build", "wrap", "between", "step peak", "ZeRO-3 state", "predicted", "ratio", "resident"
        );
        println!(
            "{:<5} {:>5} {:>11} {:>11} {:>11} {:>11} {:>13} {:>11} {:>8.2} {:>11}",
            format!("{:?}", args.init).to_lowercase(),
            ctx.world_size,
            mib(worst(0)),
            mib(worst(1)),
            mib(worst(3)),
            mib(worst(2)),
            mib(state as f64),
            mib(predicted as f64),
            worst(2) / predicted as f64,
            mib(worst(5)),
        );
        println!(
            "      model {} params ({} f32); predicted = state + gathered peak {} + unreduced gradients {} + \
             activations {} (measured); step peaks: forward {}, backward {}, optimizer {}",
            params / 4,
            mib(params as f64),
            mib(plan.memory.gathered_peak as f64),
            mib(plan.memory.unreduced_grads_peak as f64),
            mib(worst(4)),
            mib(worst(6)),
            mib(worst(7)),
            mib(worst(8))
        );
    }
    group.finish().context("leaving the process group")?;
    Ok(())
}
