//! Trains a small Llama-style language model with fully sharded data parallelism.
//!
//! Ranks are, by default, threads of this process on the CPU. Started by a launcher
//! (`fsdp-run`, `srun`, `mpirun`: `RANK`/`WORLD_SIZE`/`MASTER_ADDR`... or the launcher's
//! own variables set), this process is one rank: the CPU ranks talk over TCP, or with
//! `--device cuda` each process drives the GPU `LOCAL_RANK` names and talks through NCCL. `--device cuda` without a launcher runs one
//! thread per GPU of this machine.
//!
//! The data is a synthetic but learnable token stream: each token is followed by a fixed
//! successor (a random permutation of the vocabulary) with probability 0.9 and by a
//! random token otherwise, so a model that learns the rule gets well below `ln(vocab)`.
//! Every rank draws its own batches (from a stream fixed by the seed, the step and the
//! rank); the gradients are averaged over the ranks by the reduce-scatter of FSDP, so one
//! step trains on `world_size × batch_size` sequences.
//!
//! No rank builds the whole model: it is built without values (`MetaModel`) and each rank
//! draws its shards from the seed, so the model depends on `--seed` only, not on the world
//! size.
//!
//! With `--save-dir` the run keeps sharded checkpoints (every `--save-every` steps and at
//! the end) and `--resume` continues from the newest, at any world size and strategy;
//! `--export` writes the trained model in the Hugging Face layout.
//!
//! ```text
//! cargo run --release --example train
//! cargo run --release --example train -- --world-size 4 --strategy shard-grad-op --steps 100
//! cargo build --release --example train && target/release/fsdp-run --nproc-per-node 2 -- target/release/examples/train
//! cargo run --release --example train -- --steps 40 --save-dir ckpt --save-every 20
//! cargo run --release --example train -- --steps 60 --save-dir ckpt --resume --world-size 3 --export model
//! ```

mod common;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use candle_fsdp::checkpoint::{self, Checkpointer, ExportOptions, LoadOptions, Progress, Resumed};
use candle_fsdp::data::{TextCorpus, TextTokenizer, WindowSampler};
use candle_fsdp::dist::DistEnv;
use candle_fsdp::dist::ReduceOp;
use candle_fsdp::model::Role;
use candle_fsdp::models::llama::{Llama, LlamaConfig};
use candle_fsdp::models::lora::LoraConfig;
use candle_fsdp::models::{peft, Kernels};
use candle_fsdp::optim::{AdamW, ParamsAdamW, WarmupCosine};
use candle_fsdp::{launch, Bytes, Fsdp, LaunchOptions, MetaModel, Plan, PlanConfig, RankContext};
use candle_fsdp::{Backend, ProcessGroup};
use candle_nn::Optimizer;
use clap::Parser;
use common::{human_count, median, ms, BigramTask, Rng, DTYPE};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Train a small Llama language model with FSDP: CPU ranks as threads of this process by
/// default; one rank per process when started by `fsdp-run`, `srun` or `mpirun`.
///
/// The model learns a synthetic token stream (a fixed random successor for every token,
/// 10% noise). Each rank trains on its own batches; FSDP averages the gradients over the
/// ranks, shards parameters, gradients and AdamW state, and gathers each decoder layer only
/// while it runs.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    fsdp: common::FsdpArgs,

    /// Optimizer steps.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,

    /// AdamW learning rate (the peak of a `--warmup-steps` / cosine schedule).
    #[arg(long, default_value_t = 1e-2)]
    lr: f64,

    /// Raise the learning rate linearly from 0 over this many steps, then decay it along a
    /// half cosine to `--min-lr` at the last step. 0 with no `--min-lr`: a constant rate.
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,

    /// The rate the cosine decay ends at (with `--warmup-steps`; default: lr / 10).
    #[arg(long)]
    min_lr: Option<f64>,

    /// Micro-batches per optimizer step: the gradients of the first ones are summed on each
    /// rank without communication, the last one's backward reduces the sum.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    grad_accum: u64,

    /// Write one JSON line per step (step, loss, evaluation loss, learning rate, step time,
    /// tokens per second, MFU, gradient norm, loss scale, gathered peak and resident
    /// memory) to this file (rank 0).
    #[arg(long)]
    metrics: Option<PathBuf>,

    /// Scale the gradients so that the whole model's L2 norm is at most this, before each
    /// AdamW step (the norm is logged).
    #[arg(long)]
    max_grad_norm: Option<f64>,

    /// Sequences per rank and step.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,

    /// Tokens per sequence (the model's context length).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    seq_len: u64,

    /// Seed of the synthetic language and of the ranks' batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// CPU threads of each rank's own pool, which its candle ops split over. Default:
    /// available cores / ranks in this process, at least 1 (or RAYON_NUM_THREADS if set):
    /// more threads than cores per rank oversubscribe the cores and slow every rank down.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    candle_threads: Option<u64>,

    /// Print the loss every this many steps (besides the progress bar).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    log_every: u64,

    /// `cpu`, or `cuda` (NCCL; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,

    /// The longest the rendezvous or any collective waits for the other ranks.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_secs: u64,

    /// Keep sharded checkpoints (parameters, AdamW state, step) in this directory.
    #[arg(long)]
    save_dir: Option<PathBuf>,

    /// Save a checkpoint every this many steps (and after the last step).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    save_every: u64,

    /// Checkpoints kept in `--save-dir`; older ones are removed.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    keep_last: u64,

    /// Continue from the newest checkpoint in `--save-dir` (at any world size and strategy),
    /// up to `--steps` steps in all; without one, start afresh.
    #[arg(long, requires = "save_dir")]
    resume: bool,

    /// After training, write the model in the Hugging Face layout (`model.safetensors`) here;
    /// with `--lora`, the adapters alone in PEFT's (`adapter_model.safetensors`).
    #[arg(long)]
    export: Option<PathBuf>,

    /// Start from this Hugging Face Llama (a folder with `config.json` and its weights): its
    /// sizes replace the main job's, and its vocabulary must hold the data's.
    #[arg(long)]
    from_pretrained: Option<PathBuf>,

    /// Train LoRA adapters of this rank on the projections `--lora-targets` names, and
    /// nothing else.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    lora: Option<u64>,

    /// The projections that get adapters (PEFT's `target_modules`).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj", requires = "lora")]
    lora_targets: Vec<String>,

    /// The adapters' `lora_alpha` (the update is scaled by alpha / rank).
    #[arg(long, default_value_t = 16.0, requires = "lora")]
    lora_alpha: f64,

    /// With `--lora`, after training also merge the adapters into the base and write the
    /// plain model in the Hugging Face layout here.
    #[arg(long, requires = "lora")]
    export_merged: Option<PathBuf>,

    /// Train on this UTF-8 text (a file, or a folder whose files are read in name order)
    /// instead of the synthetic stream.
    #[arg(long)]
    data: Option<PathBuf>,

    /// A Hugging Face `tokenizer.json` for `--data` (the vocabulary follows it); default:
    /// bytes, a vocabulary of 256.
    #[arg(long, requires = "data")]
    tokenizer: Option<PathBuf>,

    /// The share of `--data`'s tokens, from its end, held out for the evaluation loss.
    #[arg(long, default_value_t = 0.05)]
    eval_fraction: f64,

    /// Compute the evaluation loss every this many steps (and after the last); 0: never.
    #[arg(long, default_value_t = 20)]
    eval_every: u64,

    /// Batches of `--batch-size` windows each rank evaluates each time.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    eval_batches: u64,

    /// At the end, draw the training and evaluation losses into this PNG (rank 0).
    #[arg(long)]
    plot: Option<PathBuf>,

    /// The kernels the model runs on: `fused` (candle_fsdp::ops: one pass forward and one
    /// backward per op, attention without S x S scores) or `composed` (chains of candle's
    /// primitives, the reference).
    #[arg(long, value_enum, default_value_t = KernelsArg::Fused)]
    kernels: KernelsArg,

    /// What a step whose loss or gradient norm is NaN or infinite does: `stop` the run
    /// (before its update: the parameters and the checkpoints stay as they were), or
    /// `skip` its update and go on.
    #[arg(long, value_enum, default_value_t = NonFinite::Stop)]
    on_non_finite: NonFinite,

    /// One rank's peak FLOP/s, in TFLOP/s, for the model FLOPs utilisation (MFU); default:
    /// measured on f32 matmuls at the start.
    #[arg(long)]
    peak_tflops: Option<f64>,
}

/// `--kernels`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum KernelsArg {
    Fused,
    Composed,
}

/// What a step with a NaN or infinite loss or gradient norm does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum NonFinite {
    /// End the run with an error naming the step.
    Stop,
    /// Skip the step's update (on every rank) and go on.
    Skip,
}

/// What the model trains on.
enum Data {
    /// The synthetic successor stream.
    Synthetic(BigramTask),
    /// Windows of a tokenized text, and its held-out tail.
    Text { train: WindowSampler, eval: Option<WindowSampler>, fingerprint: String },
}

impl Data {
    fn load(args: &Args) -> anyhow::Result<(Self, usize, String)> {
        let Some(path) = &args.data else {
            let task = BigramTask::new(VOCAB, NOISE, args.seed);
            let about = format!(
                "successor rule with {:.0}% noise; loss of a model that knows nothing ln({VOCAB}) = {:.3}, of the ideal \
                 model {:.3}",
                NOISE * 100.0,
                (VOCAB as f64).ln(),
                task.entropy()
            );
            return Ok((Self::Synthetic(task), VOCAB, about));
        };
        let tokenizer = match &args.tokenizer {
            Some(file) => TextTokenizer::from_file(file)?,
            None => TextTokenizer::Bytes,
        };
        let corpus = TextCorpus::load(path, &tokenizer, args.eval_fraction)?;
        let seq_len = args.seq_len as usize;
        let train = WindowSampler::new(corpus.train.clone(), seq_len, Some(args.seed))?;
        let eval =
            (!corpus.eval.is_empty()).then(|| WindowSampler::new(corpus.eval.clone(), seq_len, None)).transpose()?;
        let about = format!(
            "{} ({} file(s)), {}: {} training tokens ({} windows of {}), {} held out; knowing nothing: ln({}) = {:.3}",
            path.display(),
            corpus.files.len(),
            tokenizer.describe(),
            corpus.train.len(),
            train.windows(),
            seq_len + 1,
            corpus.eval.len(),
            tokenizer.vocab_size(),
            (tokenizer.vocab_size() as f64).ln()
        );
        let fingerprint = corpus.fingerprint();
        Ok((Self::Text { train, eval, fingerprint }, tokenizer.vocab_size(), about))
    }
}

/// How the ranks of this run are started.
enum Ranks {
    /// Threads of this process on the CPU.
    CpuThreads,
    /// Threads of this process, one per GPU.
    #[cfg(feature = "cuda")]
    GpuThreads,
    /// This process is one rank of a launched job.
    Process(Box<ProcessGroup>),
}

/// Vocabulary of the synthetic language.
const VOCAB: usize = 128;
/// Probability that a token is followed by a random token instead of its successor.
const NOISE: f64 = 0.1;

/// What a rank hands back after training.
struct RankReport {
    rank: usize,
    /// The step this run started after (0, or the step of the checkpoint it resumed).
    resumed_at: usize,
    /// The global loss (average over ranks) of every step, before its update.
    losses: Vec<f64>,
    step_times: Vec<Duration>,
    /// Elements and bytes of this rank's parameter shards (what the optimizer steps).
    shard_numel: usize,
    shard_bytes: usize,
    /// Bytes of the shard gradients of the last step, from the actual tensors.
    grad_bytes: usize,
    /// AdamW keeps two moments the size of every parameter it steps.
    optimizer_bytes: usize,
    gathered_peak: usize,
    /// Steps skipped because the f16 gradients overflowed.
    skipped_steps: usize,
    /// The evaluation losses, by step.
    eval_losses: Vec<(usize, f64)>,
    /// Model FLOPs utilisation by the median step, against `peak_flops` per rank.
    mfu: f64,
    peak_flops: f64,
}

fn main() -> std::process::ExitCode {
    let Err(error) = run() else {
        return std::process::ExitCode::SUCCESS;
    };
    // Under torchrun, its "Root Cause" then shows this rank's error.
    if let Some(env) = DistEnv::is_set().then(DistEnv::from_env).and_then(|env| env.ok()) {
        if let Err(e) = candle_fsdp::dist::record_error(env.rank, &format!("{error:#}")) {
            eprintln!("could not write TORCHELASTIC_ERROR_FILE: {e}");
        }
    }
    // The causes, one per line; a backtrace only when RUST_BACKTRACE asks for one.
    eprintln!("error: {error:#}");
    if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
        eprintln!("{}", error.backtrace());
    }
    std::process::ExitCode::FAILURE
}

/// Checks every path the run will write, before anything trains: a failure after the
/// last step would lose the run.
fn check_outputs(args: &Args, config: &LlamaConfig) -> anyhow::Result<()> {
    for (flag, file) in [("--plot", &args.plot), ("--metrics", &args.metrics)] {
        let Some(file) = file else { continue };
        if file.is_dir() {
            bail!("{flag} {}: is a folder, not a file", file.display());
        }
        let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if !parent.is_dir() {
            bail!("{flag} {}: the folder {} does not exist", file.display(), parent.display());
        }
    }
    if let Some(dir) = &args.save_dir {
        if dir.exists() && !dir.is_dir() {
            bail!("--save-dir {}: is a file, not a folder", dir.display());
        }
    }
    if let Some(dir) = &args.export {
        let options = match &config.lora {
            Some(lora) => peft::adapter_export_options(lora),
            None => export_options(config),
        };
        checkpoint::check_export_dir(dir, &options).with_context(|| format!("--export {}", dir.display()))?;
    }
    if let Some(dir) = &args.export_merged {
        checkpoint::check_export_dir(dir, &export_options(config))
            .with_context(|| format!("--export-merged {}", dir.display()))?;
    }
    Ok(())
}

/// The wrap's configuration: with `--lora`, everything but the adapters frozen.
fn fsdp_config(args: &Args) -> candle_fsdp::FsdpConfig {
    let config = args.fsdp.fsdp_config();
    if args.lora.is_some() {
        config.freeze(LoraConfig::FROZEN)
    } else {
        config
    }
}

/// The model: the main job's Llama, or `--from-pretrained`'s, with `--lora`'s adapters.
fn model_config(args: &Args, vocab: usize, kernels: Kernels) -> anyhow::Result<LlamaConfig> {
    let mut config = match &args.from_pretrained {
        None => common::llama_presets::main_job(vocab, args.seq_len as usize),
        Some(dir) => {
            let config = LlamaConfig::from_hf_file(&dir.join("config.json"))
                .with_context(|| format!("--from-pretrained {}", dir.display()))?;
            if config.vocab_size < vocab {
                bail!(
                    "--from-pretrained {}: its vocabulary of {} tokens cannot hold the data's {vocab}",
                    dir.display(),
                    config.vocab_size
                );
            }
            if config.max_position_embeddings < args.seq_len as usize {
                bail!(
                    "--seq-len {}: --from-pretrained {} takes sequences of at most {}",
                    args.seq_len,
                    dir.display(),
                    config.max_position_embeddings
                );
            }
            config
        }
    };
    config.kernels = kernels;
    config.lora = args.lora.map(|r| LoraConfig::new(r as usize, args.lora_alpha, args.lora_targets.clone()));
    Ok(config)
}

/// The export: the weights, and the model's `config.json` with them.
fn export_options(config: &LlamaConfig) -> ExportOptions {
    ExportOptions { files: vec![("config.json".into(), config.to_hf_json().into_bytes())], ..ExportOptions::default() }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    // The runtime's warnings (and more with RUST_LOG=candle_fsdp=debug / fsdp_runtime=debug).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let launched = DistEnv::is_set().then(DistEnv::from_env).transpose()?;
    // Ranks in this process share its cores.
    let local_ranks = launched.as_ref().map_or(args.fsdp.world_size, |env| env.local_world_size.max(1));
    let candle_threads = common::configure_cpu_threads(args.candle_threads.map(|n| n as usize), local_ranks);
    if launched.is_none() && args.fsdp.world_size > 64 {
        bail!("--world-size {}: this example runs at most 64 ranks as threads", args.fsdp.world_size);
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr must be a positive number, got {}", args.lr);
    }
    let timeout = Duration::from_secs(args.timeout_secs);
    let ranks = match (launched, args.device.as_str()) {
        (Some(env), "cpu") => Ranks::Process(Box::new(ProcessGroup::join(env, Backend::Tcp, timeout)?)),
        #[cfg(feature = "cuda")]
        (Some(env), _) => Ranks::Process(Box::new(ProcessGroup::join(env, Backend::Nccl, timeout)?)),
        (None, "cpu") => Ranks::CpuThreads,
        #[cfg(feature = "cuda")]
        (None, _) => Ranks::GpuThreads,
        #[cfg(not(feature = "cuda"))]
        (_, device) => {
            bail!("--device {device}: this binary was built without the `cuda` feature (cargo build --features cuda)")
        }
    };
    let (world, printer) = match &ranks {
        Ranks::Process(group) => (group.env().world_size, group.env().rank == 0),
        _ => (args.fsdp.world_size, true),
    };
    let (steps, batch, seq_len) = (args.steps as usize, args.batch_size as usize, args.seq_len as usize);
    let (data, vocab, about_data) = Data::load(&args)?;
    let kernels = match args.kernels {
        KernelsArg::Fused => Kernels::Fused,
        KernelsArg::Composed => Kernels::Composed,
    };
    let config = model_config(&args, vocab, kernels)?;
    check_outputs(&args, &config)?;

    // The plan needs the shapes only: a model built without values.
    let layout = MetaModel::build(DTYPE, &Device::Cpu, |vb| Llama::new(&config, vb))?.layout()?;
    let plan = Plan::new(&layout, PlanConfig::new(world, fsdp_config(&args)).optimizer_states(2))?;
    let full_numel: usize =
        layout.params.iter().filter(|p| p.role == Role::Parameter).map(|p| p.tensor.elem_count()).sum();
    let full_bytes = full_numel * DTYPE.size_in_bytes();
    drop(layout);

    let say = |line: String| {
        if printer {
            println!("{line}");
        }
    };
    say(format!(
        "model: {}; FSDP units: {} decoder layers + the root",
        common::describe_llama(&config, full_numel),
        config.num_hidden_layers
    ));
    let how = match &ranks {
        Ranks::CpuThreads => "CPU ranks as threads".to_string(),
        #[cfg(feature = "cuda")]
        Ranks::GpuThreads => "one thread per GPU, NCCL".to_string(),
        Ranks::Process(_) => {
            format!("one process per rank, {}", if args.device == "cpu" { "CPU over TCP" } else { "GPU with NCCL" })
        }
    };
    say(format!(
        "fsdp:  world size {world} ({how}; {} cores, {candle_threads} candle thread(s) per op), {}, backward prefetch {}, forward prefetch {}, precision {}",
        common::cores(),
        args.fsdp.strategy,
        args.fsdp.backward_prefetch,
        if args.fsdp.forward_prefetch { "on" } else { "off" },
        args.fsdp.precision
    ));
    if let Some(group) = args.fsdp.shard_group_size {
        say(format!("       hybrid sharding: shard groups of {group} ranks, {} replicas", world / group.max(1)));
    }
    let schedule = if args.warmup_steps > 0 || args.min_lr.is_some() {
        format!(
            "peak lr {}, {} warm-up steps, cosine to {}",
            args.lr,
            args.warmup_steps,
            // Rounded to 12 decimals: lr / 10 prints as 0.001, not 0.0010000000000000002.
            (args.min_lr.unwrap_or(args.lr / 10.0) * 1e12).round() / 1e12
        )
    } else {
        format!("lr {}", args.lr)
    };
    let micro = args.grad_accum as usize;
    say(format!(
        "train: {steps} steps of AdamW ({schedule}), {micro} x {batch} sequences x {seq_len} tokens per rank \
         ({} tokens per step globally)",
        world * micro * batch * seq_len
    ));
    say(format!("data:  {about_data}\n"));

    let started = Instant::now();
    let train = |ctx: RankContext| train_rank(ctx, &args, &config, &data);
    let options = LaunchOptions::new(world).timeout(timeout).cpu_threads(candle_threads);
    let reports = match ranks {
        Ranks::CpuThreads => launch(options, train).context("training failed")?,
        #[cfg(feature = "cuda")]
        Ranks::GpuThreads => candle_fsdp::dist::launch_gpus(options, train).context("training failed")?,
        Ranks::Process(group) => {
            let ctx = group.context();
            // A CPU rank runs on a pool of its own threads; a GPU rank stays on the thread
            // its device is bound to.
            let mine = if ctx.device.is_cpu() {
                candle_fsdp::dist::run_on_cpu_threads(candle_threads, || train(ctx.clone()))?
            } else {
                train(ctx.clone())
            };
            let mine = mine.context("training failed")?;
            let reports = gather_reports(&ctx, mine)?;
            group.finish()?;
            if !printer {
                return Ok(());
            }
            reports
        }
    };
    let wall = started.elapsed();

    let losses = &reports[0].losses;
    let resumed_at = reports[0].resumed_at;
    if losses.is_empty() {
        println!("\nnothing to train: the checkpoint is at step {resumed_at} of {steps}");
        return Ok(());
    }
    let (start, end) = (losses[0], losses[losses.len() - 1]);
    let tail = &losses[losses.len().saturating_sub(5)..];
    let tail_mean = tail.iter().sum::<f64>() / tail.len() as f64;
    let times: Vec<f64> = reports[0].step_times.iter().map(|&d| ms(d)).collect();
    let step_median = median(&times);
    println!("\nloss: start {start:.4}, end {end:.4} (mean of the last {} steps {tail_mean:.4})", tail.len());
    println!(
        "time: {:.2} s in all; step (forward + backward + AdamW) median {step_median:.1} ms, first {:.1} ms; {:.0} tokens/s",
        wall.as_secs_f64(),
        times[0],
        (world * batch * seq_len * args.grad_accum as usize) as f64 / (step_median / 1e3)
    );

    println!(
        "MFU: {:.2}% by the median step ({:.2e} model FLOPs per token; peak {:.2} TFLOP/s per rank, {})",
        100.0 * reports[0].mfu,
        common::llama_flops_per_token(&config, full_numel, seq_len),
        reports[0].peak_flops / 1e12,
        if args.peak_tflops.is_some() { "given" } else { "measured on f32 matmuls" }
    );
    if let Some(path) = &args.plot {
        let train: Vec<(usize, f64)> = losses.iter().enumerate().map(|(i, &l)| (resumed_at + i + 1, l)).collect();
        let title = format!("{} parameters, world size {world}, {}", human_count(full_numel), args.fsdp.precision);
        common::loss_plot::draw(path, &title, &train, &reports[0].eval_losses)?;
        println!("plot: {}", path.display());
    }
    if reports[0].skipped_steps > 0 {
        println!("f16: {} step(s) skipped because the gradients overflowed", reports[0].skipped_steps);
    }
    print_memory(&reports, full_bytes, plan.unsharded_memory.grads, plan.memory.gathered_peak);

    // On the synthetic stream, what the loss should reach is known: say how far it got
    // (a report on the demo, not a verdict on the run).
    if let Data::Synthetic(task) = &data {
        let knowing_nothing = (vocab as f64).ln();
        let fell = knowing_nothing - tail_mean;
        println!(
            "\n{}: the loss is {tail_mean:.3} (knowing nothing: ln({vocab}) = {knowing_nothing:.3}; the ideal: {:.3})",
            if fell > 0.5 { "learned" } else { "not learned yet" },
            task.entropy()
        );
    }
    Ok(())
}

/// Trains one rank.
fn train_rank(ctx: RankContext, args: &Args, config: &LlamaConfig, data: &Data) -> candle_fsdp::Result<RankReport> {
    let device = ctx.device.clone();
    let (steps, batch, seq_len) = (args.steps as usize, args.batch_size as usize, args.seq_len as usize);
    // Every rank draws its shards from the seed: the same model at any world size.
    let meta = MetaModel::build(DTYPE, &device, |vb| Llama::new(config, vb))?;
    let model_numel: usize = meta.parameters().iter().map(|(_, shape, _)| shape.elem_count()).sum();
    let fsdp = Fsdp::wrap_meta(meta, ctx.comm.clone(), fsdp_config(args), args.seed)?;
    if let Some(dir) = &args.from_pretrained {
        // The base from the checkpoint; adapters start as drawn (B zero: the pretrained model).
        checkpoint::load_pretrained_part(&fsdp, dir, &|fqn| !peft::is_adapter(fqn), &|fqn| fqn.to_string())?;
    }
    let shards = fsdp.parameters();
    // Frozen shards (with --lora) are stored as any other, without gradients or state.
    let frozen: Vec<Tensor> = fsdp.named_frozen_parameters().into_iter().map(|(_, t)| t).collect();
    let shard_numel: usize = shards.iter().map(|v| v.elem_count()).chain(frozen.iter().map(Tensor::elem_count)).sum();
    let trained_bytes = common::var_bytes(&shards);
    let shard_bytes = trained_bytes + common::tensor_bytes(frozen.iter());
    let mut optimizer = AdamW::new(shards.clone(), ParamsAdamW { lr: args.lr, ..ParamsAdamW::default() })?;
    let checkpointer = args.save_dir.as_ref().map(|dir| Checkpointer::new(dir).keep_last(args.keep_last as usize));
    if let Some(checkpointer) = &checkpointer {
        // Locked for this job, and cleaned, before any step.
        checkpointer.prepare(&fsdp)?;
    }
    // A function of the step alone: a resumed run gets the uninterrupted run's rates.
    let schedule = (args.warmup_steps > 0 || args.min_lr.is_some()).then(|| WarmupCosine {
        peak_lr: args.lr,
        warmup_steps: args.warmup_steps as usize,
        total_steps: steps,
        min_lr: args.min_lr.unwrap_or(args.lr / 10.0),
    });
    let resumed = match (&checkpointer, args.resume) {
        (Some(checkpointer), true) => resume(&fsdp, &mut optimizer, checkpointer, args, schedule, data)?,
        _ => ResumePoint::default(),
    };
    let (resumed_at, mut data_position) = (resumed.step, resumed.data_position);

    let progress = if ctx.rank == 0 {
        let bar = ProgressBar::new(steps as u64);
        bar.set_position(resumed_at.min(steps) as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} steps  loss {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };

    let mut metrics = match (&args.metrics, ctx.rank) {
        (Some(path), 0) => Some(std::fs::File::create(path).map_err(|e| candle_fsdp::Error::Rank {
            rank: 0,
            message: format!("cannot create the metrics file {}: {e}", path.display()),
        })?),
        _ => None,
    };
    let micro_batches = args.grad_accum as usize;
    // Model FLOPs utilisation: the model's FLOPs per step over what the ranks could do.
    let peak_flops = match args.peak_tflops {
        Some(tflops) => tflops * 1e12,
        None => {
            let mine = Tensor::new(&[common::measured_peak_flops(&device)? as f32], &device)?;
            ctx.comm.all_reduce(&mine, ReduceOp::Avg, "measured peak FLOP/s")?.wait()?.to_vec1::<f32>()?[0] as f64
        }
    };
    let step_flops = common::llama_flops_per_token(config, model_numel, seq_len)
        * (ctx.world_size * micro_batches * batch * seq_len) as f64;
    let mfu = |step_ms: f64| step_flops / (step_ms / 1e3) / (peak_flops * ctx.world_size as f64);
    // f16's loss scale continues from the checkpoint, so a resumed run scales as the
    // uninterrupted one would.
    let mut scaler = args.fsdp.precision.grad_scaler()?;
    if let (Some(scaler), Some(state)) = (&mut scaler, resumed.loss_scale) {
        scaler.restore(state)?;
    }
    let mut skipped_steps = 0;
    let mut losses = Vec::with_capacity(steps);
    let mut eval_losses = Vec::new();
    let mut step_times = Vec::with_capacity(steps);
    let mut grad_bytes = 0;
    for step in resumed_at + 1..=steps {
        if let Some(schedule) = &schedule {
            schedule.apply(step - 1, &mut optimizer);
        }
        let started = Instant::now();
        // The mean over the micro-batches: each backward adds its share, the last reduces.
        let mut step_loss = 0.0;
        let mut grads = None;
        for micro in 0..micro_batches {
            // The batch depends on the seed, the step, the micro-batch and the rank only, so
            // a resumed run draws what the uninterrupted run would have.
            let (inputs, targets) = match data {
                Data::Synthetic(task) => {
                    let stream = ((step as u64) << 24) | ((micro as u64) << 16) | ctx.rank as u64;
                    task.batch(&mut Rng::stream(args.seed, stream), batch, seq_len, &device)?
                }
                Data::Text { train, .. } => train.rank_batch(data_position, ctx.rank, batch, &device)?,
            };
            // The step reads `world · batch` windows per micro-batch, whatever the world size.
            data_position += (ctx.world_size * batch) as u64;
            let last = micro + 1 == micro_batches;
            fsdp.set_requires_gradient_sync(last);
            let loss = (fsdp.forward(|model| model.loss(&inputs, &targets))? / micro_batches as f64)?;
            let micro_grads = match &scaler {
                Some(scaler) => fsdp.backward(&scaler.scale_loss(&loss)?)?,
                None => fsdp.backward(&loss)?,
            };
            step_loss += loss.to_scalar::<f32>()? as f64;
            grads = last.then_some(micro_grads);
        }
        let mut grads = grads.expect("the last micro-batch reduces the gradients");
        let mine = Tensor::new(&[step_loss as f32], &device)?;
        let global = ctx.comm.all_reduce(&mine, ReduceOp::Avg, "loss")?.wait()?;
        let global = global.to_vec1::<f32>()?[0] as f64;
        losses.push(global);
        // The scaled gradients are divided before the norm is taken; a step whose
        // gradients overflowed on any rank is skipped on every rank.
        let finite = match &mut scaler {
            Some(scaler) => scaler.unscale(&fsdp, &mut grads)?,
            None => true,
        };
        // The norm is taken (and clipped to --max-grad-norm) every step: a NaN or an
        // infinity anywhere shows in it, on every rank alike.
        let grad_norm = if finite {
            match fsdp.clip_grad_norm(&mut grads, args.max_grad_norm.unwrap_or(f64::INFINITY), 2.0) {
                Ok(norm) => Some(norm),
                Err(candle_fsdp::Error::NonFiniteGradNorm { norm, .. }) => Some(norm),
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let diverged = !global.is_finite() || grad_norm.is_some_and(|n| !n.is_finite());
        if diverged {
            let what =
                format!("step {step}: the loss is {global}, the gradient norm {}", grad_norm.unwrap_or(f64::NAN));
            if args.on_non_finite == NonFinite::Stop {
                return Err(candle_fsdp::Error::Rank {
                    rank: ctx.rank,
                    message: format!(
                        "{what}: stopped before its update (the parameters and checkpoints are those of step {}; \
                         --on-non-finite skip would skip such steps)",
                        step - 1
                    ),
                });
            }
            skipped_steps += 1;
            if ctx.rank == 0 {
                progress.suspend(|| println!("{what}: update skipped"));
            }
        } else {
            match &mut scaler {
                Some(scaler) => {
                    let outcome = scaler.step(&fsdp, &mut optimizer, &mut grads)?;
                    if !outcome.stepped {
                        skipped_steps += 1;
                        if ctx.rank == 0 {
                            let scale = outcome.next_scale;
                            progress.suspend(|| {
                                println!(
                                    "step {step:>4}: gradients overflowed in f16, step skipped, loss scale now {scale}"
                                )
                            });
                        }
                    }
                }
                None => optimizer.step(&grads)?,
            }
        }
        let step_time = started.elapsed();
        step_times.push(step_time);
        grad_bytes = common::tensor_bytes(shards.iter().filter_map(|v| grads.get(v.as_tensor())));

        let eval_loss = match data {
            Data::Text { eval: Some(eval), .. }
                if args.eval_every > 0 && (step % args.eval_every as usize == 0 || step == steps) =>
            {
                let loss = evaluate(&fsdp, &ctx, eval, args.eval_batches as usize, batch)?;
                eval_losses.push((step, loss));
                Some(loss)
            }
            _ => None,
        };
        if let Some(file) = &mut metrics {
            let tokens = (ctx.world_size * batch * seq_len * micro_batches) as f64;
            let line = serde_json::json!({
                "step": step,
                "loss": global,
                "lr": optimizer.learning_rate(),
                "step_ms": ms(step_time),
                "tokens_per_s": tokens / step_time.as_secs_f64(),
                "grad_norm": grad_norm,
                "loss_scale": scaler.as_ref().map(|s| s.scale()),
                "eval_loss": eval_loss,
                "mfu": mfu(ms(step_time)),
                "gathered_peak_bytes": fsdp.diagnostics().memory().gathered_peak,
                "resident_bytes": common::resident_bytes(),
            });
            writeln!(file, "{line}").map_err(|e| candle_fsdp::Error::Rank {
                rank: 0,
                message: format!("cannot write the metrics file: {e}"),
            })?;
        }
        let tokens_per_s = (ctx.world_size * batch * seq_len * micro_batches) as f64 / step_time.as_secs_f64();
        progress.set_message(format!(
            "{global:.4}  {tokens_per_s:.0} tok/s  MFU {:.1}%  gathered peak {}",
            100.0 * mfu(ms(step_time)),
            Bytes(fsdp.diagnostics().memory().gathered_peak)
        ));
        progress.inc(1);
        if ctx.rank == 0 && (step == 1 || step % args.log_every as usize == 0 || step == steps) {
            let norm = grad_norm.map(|n| format!("  grad norm {n:.4}")).unwrap_or_default();
            let eval = eval_loss.map(|l| format!("  eval loss {l:.4}")).unwrap_or_default();
            progress.suspend(|| println!("step {step:>4}/{steps}  loss {global:.4}{norm}{eval}"));
        }
        if let Some(checkpointer) = &checkpointer {
            if step % args.save_every as usize == 0 || step == steps {
                let scheduler = schedule.map(|s| serde_json::to_value(s).expect("plain numbers"));
                let mut extras = match data {
                    Data::Synthetic(_) => serde_json::json!({ "seed": args.seed }),
                    Data::Text { fingerprint, .. } => serde_json::json!({
                        "seed": args.seed,
                        "data": { "position": data_position, "fingerprint": fingerprint },
                    }),
                };
                if let Some(scaler) = &scaler {
                    let (scale, good_steps) = scaler.state();
                    extras["loss_scale"] = serde_json::json!({ "scale": scale, "good_steps": good_steps });
                }
                extras["flags"] = training_flags(args);
                let saved = Progress { step: step as u64, scheduler, extras };
                let path = checkpointer.save(&fsdp, Some(&optimizer), &saved)?;
                if ctx.rank == 0 {
                    progress.suspend(|| println!("saved {}", path.display()));
                }
            }
        }
    }
    progress.finish();
    let say_exported = |files: Vec<PathBuf>| {
        if ctx.rank == 0 {
            println!("exported {}", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "));
        }
    };
    if let Some(dir) = &args.export {
        match &config.lora {
            Some(lora) => say_exported(peft::save_adapters(&fsdp, dir, lora)?),
            None => say_exported(checkpoint::export_hf(&fsdp, dir, &export_options(config))?),
        }
    }
    if let (Some(dir), Some(lora)) = (&args.export_merged, &config.lora) {
        peft::merge_adapters(&fsdp, lora)?;
        let plain = LlamaConfig { lora: None, ..config.clone() };
        say_exported(peft::export_merged(&fsdp, dir, &export_options(&plain))?);
    }

    let step_median_mfu =
        if step_times.is_empty() { 0.0 } else { mfu(median(&step_times.iter().map(|&d| ms(d)).collect::<Vec<_>>())) };
    Ok(RankReport {
        rank: ctx.rank,
        resumed_at,
        losses,
        step_times,
        shard_numel,
        shard_bytes,
        grad_bytes,
        optimizer_bytes: 2 * trained_bytes,
        gathered_peak: fsdp.diagnostics().memory().gathered_peak,
        skipped_steps,
        eval_losses,
        mfu: step_median_mfu,
        peak_flops,
    })
}

/// The mean next-token loss over `batches` batches of `batch` held-out windows per rank
/// (rank `r` reads windows `r, r + world, ...`, from the start of the held-out tail, again
/// from its start if it has fewer), averaged over the ranks. Every rank runs as many
/// forwards, so their gathers stay in step.
fn evaluate(
    fsdp: &Fsdp<Llama>,
    ctx: &RankContext,
    eval: &WindowSampler,
    batches: usize,
    batch: usize,
) -> candle_fsdp::Result<f64> {
    let mut sum = 0.0;
    for b in 0..batches {
        let first = (b * batch * ctx.world_size + ctx.rank) as u64;
        let (inputs, targets) = eval.batch(first, ctx.world_size as u64, batch, &ctx.device)?;
        sum += fsdp.forward_inference(|model| model.loss(&inputs, &targets))?.to_scalar::<f32>()? as f64;
    }
    let mine = Tensor::new(&[(sum / batches as f64) as f32], &ctx.device)?;
    let mean = ctx.comm.all_reduce(&mine, ReduceOp::Avg, "evaluation loss")?.wait()?;
    Ok(mean.to_vec1::<f32>()?[0] as f64)
}

/// The flags a resumed run may change, as the checkpoint records them.
fn training_flags(args: &Args) -> serde_json::Value {
    serde_json::json!({
        "lr": args.lr,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "max_grad_norm": args.max_grad_norm,
        "precision": args.fsdp.precision.to_string(),
        "on_non_finite": format!("{:?}", args.on_non_finite).to_lowercase(),
    })
}

/// Where a resumed run continues: the step, the data's position, f16's loss scale.
#[derive(Default)]
struct ResumePoint {
    step: usize,
    data_position: u64,
    loss_scale: Option<(f64, usize)>,
}

/// Loads the newest checkpoint of `checkpointer` that passes its checks (an older one
/// when the newest is damaged, with a warning), if there is one. A checkpoint trained
/// with another seed, data or learning-rate schedule is refused: the resumed run would
/// not be the run it continues. A flag changed since the checkpoint (the learning rate,
/// the batch size, ...) is applied, and said.
fn resume(
    fsdp: &Fsdp<Llama>,
    optimizer: &mut AdamW,
    checkpointer: &Checkpointer,
    args: &Args,
    schedule: Option<WarmupCosine>,
    data: &Data,
) -> candle_fsdp::Result<ResumePoint> {
    let loaded = checkpointer.load_latest(fsdp, Some(&mut *optimizer), &LoadOptions::default())?;
    let Some(Resumed { dir: path, progress: restored, .. }) = loaded else {
        if fsdp.rank() == 0 {
            println!("no checkpoint in {}: starting afresh", checkpointer.dir().display());
        }
        return Ok(ResumePoint::default());
    };
    let refuse = |message: String| candle_fsdp::Error::Rank { rank: fsdp.rank(), message };
    if restored.extras["seed"] != serde_json::json!(args.seed) {
        let saved = &restored.extras["seed"];
        return Err(refuse(format!("{} was trained with --seed {saved}, not {}", path.display(), args.seed)));
    }
    let saved: Option<WarmupCosine> = restored.scheduler.as_ref().and_then(|v| serde_json::from_value(v.clone()).ok());
    if saved != schedule {
        return Err(refuse(format!(
            "{} was trained with the learning-rate schedule {saved:?}, this run asks for {schedule:?} \
             (a schedule depends on --steps: resume with the flags of the run it continues)",
            path.display()
        )));
    }
    let saved_data = &restored.extras["data"];
    let data_position = match data {
        Data::Synthetic(_) if saved_data.is_null() => 0,
        Data::Text { fingerprint, .. } if saved_data["fingerprint"] == serde_json::json!(fingerprint) => {
            saved_data["position"].as_u64().unwrap_or(0)
        }
        _ => {
            let saved = if saved_data.is_null() {
                "the synthetic stream".to_string()
            } else {
                saved_data["fingerprint"].to_string()
            };
            return Err(refuse(format!("{} was trained on other data ({saved}), not on this run's", path.display())));
        }
    };
    // The optimizer came back with the checkpoint's rate; a constant rate given now wins
    // (a schedule sets the rate every step anyway).
    if schedule.is_none() {
        optimizer.set_learning_rate(args.lr);
    }
    let flags = training_flags(args);
    let changed: Vec<String> = flags
        .as_object()
        .expect("an object")
        .iter()
        .filter(|(name, now)| restored.extras["flags"].get(name.as_str()).is_some_and(|then| then != *now))
        .map(|(name, now)| format!("--{} {} -> {now}", name.replace('_', "-"), restored.extras["flags"][name]))
        .collect();
    if fsdp.rank() == 0 {
        println!(
            "resumed {} at step {} (saved by {} ranks){}",
            path.display(),
            restored.step,
            checkpoint::read_metadata(&path)?.world_size,
            if data_position > 0 { format!(", the data at window {data_position}") } else { String::new() }
        );
        if !changed.is_empty() {
            println!("changed since the checkpoint, and applied: {}", changed.join(", "));
        }
    }
    let saved_scale = &restored.extras["loss_scale"];
    let loss_scale = saved_scale["scale"].as_f64().zip(saved_scale["good_steps"].as_u64().map(|g| g as usize));
    Ok(ResumePoint { step: restored.step as usize, data_position, loss_scale })
}

/// Every rank's memory figures on every rank, so rank 0 can print the table; the losses and
/// step times are rank 0's own (the losses are global already).
fn gather_reports(ctx: &RankContext, mine: RankReport) -> anyhow::Result<Vec<RankReport>> {
    let figures = [mine.shard_numel, mine.shard_bytes, mine.grad_bytes, mine.optimizer_bytes, mine.gathered_peak];
    let figures: Vec<f64> = figures.iter().map(|&n| n as f64).collect();
    let all = ctx.comm.all_gather(&Tensor::new(figures.as_slice(), &ctx.device)?, "the memory report")?.wait()?;
    let all = all.to_vec1::<f64>()?;
    Ok(all
        .chunks(figures.len())
        .enumerate()
        .map(|(rank, f)| RankReport {
            rank,
            resumed_at: mine.resumed_at,
            losses: mine.losses.clone(),
            step_times: mine.step_times.clone(),
            shard_numel: f[0] as usize,
            shard_bytes: f[1] as usize,
            grad_bytes: f[2] as usize,
            optimizer_bytes: f[3] as usize,
            gathered_peak: f[4] as usize,
            skipped_steps: mine.skipped_steps,
            eval_losses: mine.eval_losses.clone(),
            mfu: mine.mfu,
            peak_flops: mine.peak_flops,
        })
        .collect())
}

/// `full_bytes` of parameters, `trained_bytes` of them trained (all but what `--lora` freezes).
fn print_memory(reports: &[RankReport], full_bytes: usize, trained_bytes: usize, planned_peak: usize) {
    println!("\nmodel-state memory per rank (activations not counted):");
    println!(
        "  {:<22} {:>12} {:>12} {:>12} {:>14} {:>12} {:>7}",
        "", "param shards", "gradients", "AdamW state", "gathered peak", "total", "ratio"
    );
    let single_total = full_bytes + 3 * trained_bytes;
    for r in reports {
        let total = r.shard_bytes + r.grad_bytes + r.optimizer_bytes + r.gathered_peak;
        println!(
            "  {:<22} {:>12} {:>12} {:>12} {:>14} {:>12} {:>7.3}",
            format!("rank {} ({} elems)", r.rank, human_count(r.shard_numel)),
            Bytes(r.shard_bytes),
            Bytes(r.grad_bytes),
            Bytes(r.optimizer_bytes),
            Bytes(r.gathered_peak),
            Bytes(total),
            total as f64 / single_total as f64
        );
    }
    println!(
        "  {:<22} {:>12} {:>12} {:>12} {:>14} {:>12} {:>7.3}",
        "one process, no FSDP",
        Bytes(full_bytes),
        Bytes(trained_bytes),
        Bytes(2 * trained_bytes),
        "-",
        Bytes(single_total),
        1.0
    );
    println!(
        "  (gathered peak: the most full-size parameters alive at once while units are gathered; the plan predicted {})",
        Bytes(planned_peak)
    );
}
