//! Benchmarks checkpoints on CPU ranks (threads of this process), in one run: a sharded
//! save (parameters and AdamW state), its load with and without checking the files'
//! checksums, a Hugging Face export, and a pretrained
//! load of that export, each next to a plain write (or read) of the same bytes by every
//! rank at once in the same run, and each with the extra peak resident memory it took.
//!
//! The peak is counted by this program's allocator: the most bytes allocated at once during
//! the operation over the bytes allocated before it (resident-memory figures would count
//! the page cache, and miss memory the heap reuses). The ranks
//! are threads of one process, so the figure is the sum over ranks, and the per-rank
//! figure is that sum divided by the world size. It is compared with the goal of at most
//! one unit's full size beyond the shards per rank.
//!
//! ```text
//! cargo run --release --example checkpoint_bench
//! cargo run --release --example checkpoint_bench -- --world-size 4 --hidden 768 --layers 12
//! ```

mod common;

use anyhow::{ensure, Context};
use candle_core::Device;
use candle_fsdp::checkpoint::{self, Checkpointer, ExportOptions, LoadOptions, Progress};
use candle_fsdp::dist::Collectives;
use candle_fsdp::model::Layout;
use candle_fsdp::models::llama::Llama;
use candle_fsdp::optim::{AdamW, ParamsAdamW};
use candle_fsdp::{launch, Bytes, Fsdp, FsdpConfig, LaunchOptions, Plan, PlanConfig};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use clap::Parser;
use common::counting_allocator::{peak, reset_peak, CountingAllocator};
use common::{BigramTask, Rng, DTYPE};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Sharded save and load, Hugging Face export and pretrained load: throughput per rank
/// against a plain write or read of the same bytes, and the extra peak memory of each.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// CPU ranks (threads).
    #[arg(long, default_value_t = 2, value_parser = common::parse_world_size)]
    world_size: usize,
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    #[arg(long, default_value_t = 8)]
    layers: usize,
    #[arg(long, default_value_t = 1376)]
    intermediate: usize,
    #[arg(long, default_value_t = 8000)]
    vocab: usize,
    /// Where the files go [default: a temporary folder, removed afterwards].
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// What one operation took on one rank.
#[derive(Clone, Copy, Default)]
struct Timing {
    seconds: f64,
    bytes: usize,
}

/// Times `f` on every rank at once: the ranks meet (a barrier of the ranks' collectives,
/// with their timeout) before and after; rank 0 measures the process's extra peak
/// resident memory over the whole operation.
struct Meeting<'a> {
    comm: &'a dyn Collectives,
}

impl Meeting<'_> {
    fn run<T>(&self, rank: usize, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64, Option<usize>)> {
        self.comm.barrier("benchmark: before measuring")?;
        let before = if rank == 0 { Some(reset_peak()) } else { None };
        self.comm.barrier("benchmark: start")?;
        let started = Instant::now();
        let out = f();
        let seconds = started.elapsed().as_secs_f64();
        self.comm.barrier("benchmark: end")?;
        let extra = before.map(|before| peak().saturating_sub(before));
        Ok((out?, seconds, extra))
    }
}

/// Writes `bytes` bytes to `path` and syncs them, as a checkpoint file is written.
fn plain_write(path: &Path, bytes: usize) -> anyhow::Result<()> {
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        file.write_all(&chunk[..n])?;
        left -= n;
    }
    file.sync_all()?;
    Ok(())
}

fn plain_read(path: &Path) -> anyhow::Result<usize> {
    let mut file = std::fs::File::open(path)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok(total);
        }
        total += n;
    }
}

fn file_bytes(dir: &Path) -> anyhow::Result<usize> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        total += entry?.metadata()?.len() as usize;
    }
    Ok(total)
}

/// Per operation: every rank's timing, rank 0's extra peak, and the plain transfer's.
struct Row {
    name: &'static str,
    ranks: Vec<Timing>,
    plain: Vec<Timing>,
    extra_peak: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let world = args.world_size;
    let config = common::llama_presets::llama(args.vocab, args.hidden, args.intermediate, args.layers, (8, 4), 64);
    let temp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;

    let var_map = VarMap::new();
    let model = Llama::new(&config, VarBuilder::from_varmap(&var_map, DTYPE, &Device::Cpu))?;
    let plan = Plan::new(&Layout::of(&model)?, PlanConfig::new(world, FsdpConfig::default()).optimizer_states(2))?;
    let largest_unit = plan.units.iter().map(|u| u.gathered_bytes).max().unwrap_or(0);
    let numel: usize = plan.units.iter().map(|u| u.numel).sum();
    drop(model);
    let snapshot = common::snapshot(&var_map)?;
    drop(var_map);
    println!(
        "Llama {} parameters ({} in f32), {world} ranks; largest unit {}; per rank: shards {}, AdamW state {}",
        common::human_count(numel),
        Bytes(numel * 4),
        Bytes(largest_unit),
        Bytes(plan.memory.params),
        Bytes(plan.memory.optimizer)
    );

    let task = BigramTask::new(config.vocab_size, 0.1, 7);
    let checkpointer = Checkpointer::new(dir.join("sharded")).keep_last(1);
    let export_dir = dir.join("export");
    let plain_dir = dir.join("plain");
    std::fs::create_dir_all(&plain_dir)?;

    let reports = launch(LaunchOptions::new(world), |ctx| {
        let rank = ctx.rank;
        let meeting = Meeting { comm: ctx.comm.as_ref() };
        let step = || -> anyhow::Result<Vec<Row>> {
            let model = Llama::new(&config, VarBuilder::from_tensors(snapshot.clone(), DTYPE, &Device::Cpu))?;
            let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
            let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW::default())?;
            let (inputs, targets) = task.batch(&mut Rng::stream(1, rank as u64), 2, 32, &Device::Cpu)?;
            let logits = fsdp.forward(|m| m.forward(&inputs))?;
            optimizer.step(&fsdp.backward(&common::next_token_loss(&logits, &targets)?)?)?;

            let mut rows = Vec::new();
            let progress = Progress { step: 1, scheduler: None, extras: serde_json::Value::Null };
            let mut row = |name,
                           op: &mut dyn FnMut() -> anyhow::Result<usize>,
                           plain: &mut dyn FnMut(usize) -> anyhow::Result<()>|
             -> anyhow::Result<()> {
                let (bytes, seconds, extra) = meeting.run(rank, &mut *op)?;
                let (_, plain_seconds, _) = meeting.run(rank, || plain(bytes))?;
                rows.push(Row {
                    name,
                    ranks: vec![Timing { seconds, bytes }],
                    plain: vec![Timing { seconds: plain_seconds, bytes }],
                    extra_peak: extra.unwrap_or(0),
                });
                Ok(())
            };
            let plain_file = plain_dir.join(format!("rank-{rank}.bin"));
            let saved = std::cell::RefCell::new(PathBuf::new());
            row(
                "sharded save (params + AdamW)",
                &mut || {
                    let path = checkpointer.save(&fsdp, Some(&optimizer), &progress)?;
                    let mine = std::fs::read_dir(&path)?
                        .filter_map(|e| e.ok())
                        .find(|e| e.file_name().to_string_lossy().starts_with(&format!("rank-{rank:05}.")))
                        .context("this rank's file in the checkpoint")?;
                    *saved.borrow_mut() = path;
                    Ok(mine.metadata()?.len() as usize)
                },
                &mut |bytes| plain_write(&plain_file, bytes),
            )?;
            for (name, verify_checksums) in [("sharded load", true), ("sharded load, checksums not checked", false)] {
                let options = LoadOptions { verify_checksums, ..LoadOptions::default() };
                row(
                    name,
                    &mut || {
                        checkpoint::load_with(&fsdp, Some(&mut optimizer), &saved.borrow(), &options)?;
                        Ok(std::fs::metadata(plain_file.as_path())?.len() as usize)
                    },
                    &mut |_| plain_read(&plain_file).map(|_| ()),
                )?;
            }
            row(
                "Hugging Face export (rank 0 writes)",
                &mut || {
                    checkpoint::export_hf(&fsdp, &export_dir, &ExportOptions::default())?;
                    if rank == 0 {
                        file_bytes(&export_dir)
                    } else {
                        Ok(0)
                    }
                },
                &mut |bytes| plain_write(&plain_file, bytes),
            )?;
            row(
                "pretrained load (each rank its ranges)",
                &mut || {
                    checkpoint::load_pretrained(&fsdp, &export_dir.join("model.safetensors"))?;
                    Ok(plan.memory.params)
                },
                &mut |bytes| {
                    let mut file = std::fs::File::open(export_dir.join("model.safetensors"))?;
                    let mut buffer = vec![0u8; bytes];
                    file.read_exact(&mut buffer)?;
                    Ok(())
                },
            )?;
            Ok(rows)
        };
        step().map_err(|e| candle_fsdp::Error::Rank { rank, message: format!("{e:#}") })
    })?;

    // Fold the ranks' rows: rank 0's peak, every rank's times.
    let mut rows: Vec<Row> = Vec::new();
    for (rank, report) in reports.into_iter().enumerate() {
        for (i, row) in report.into_iter().enumerate() {
            if rank == 0 {
                rows.push(row);
            } else {
                rows[i].ranks.extend(row.ranks);
                rows[i].plain.extend(row.plain);
            }
        }
    }
    println!(
        "\n{:<40} {:>11} {:>9} {:>10} {:>10} {:>7} {:>14} {:>14}",
        "operation", "bytes/rank", "time", "MB/s/rank", "plain MB/s", "ratio", "extra peak", "per rank"
    );
    let mut worst_per_rank = 0;
    for row in &rows {
        let slowest = row.ranks.iter().map(|t| t.seconds).fold(0.0, f64::max);
        let plain_slowest = row.plain.iter().map(|t| t.seconds).fold(0.0, f64::max);
        let bytes = row.ranks.iter().map(|t| t.bytes).max().unwrap_or(0);
        let rate = bytes as f64 / slowest / 1e6;
        let plain_rate = bytes as f64 / plain_slowest / 1e6;
        let per_rank = row.extra_peak / world;
        worst_per_rank = worst_per_rank.max(per_rank);
        println!(
            "{:<40} {:>11} {:>7.3} s {:>10.0} {:>10.0} {:>7.2} {:>14} {:>14}",
            row.name,
            Bytes(bytes).to_string(),
            slowest,
            rate,
            plain_rate,
            rate / plain_rate,
            Bytes(row.extra_peak).to_string(),
            Bytes(per_rank).to_string()
        );
    }
    println!(
        "\nratio: the operation's throughput over a plain write (or read) of the same bytes per rank, all ranks at once, \
         in this run; extra peak: the most bytes allocated at once during the operation over those allocated before, \
         all ranks together"
    );
    println!(
        "goal: at most one unit's full size ({}) beyond the shards per rank; worst measured {} per rank: {}",
        Bytes(largest_unit),
        Bytes(worst_per_rank),
        if worst_per_rank <= largest_unit { "met" } else { "NOT met" }
    );
    let slowest = |name: &str| {
        let row = rows.iter().find(|r| r.name == name).expect("ran");
        row.ranks.iter().map(|t| t.seconds).fold(0.0, f64::max)
    };
    let (checked, unchecked) = (slowest("sharded load"), slowest("sharded load, checksums not checked"));
    println!(
        "checksums: the load that checks every file's CRC32C took {:+.1}% over the one that does not (goal: at most +10%)",
        100.0 * (checked / unchecked - 1.0)
    );
    ensure!(rows.len() == 5, "every operation ran");
    Ok(())
}
