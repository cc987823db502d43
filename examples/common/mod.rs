//! Helpers shared by the examples: a seedable random number generator, a synthetic but
//! learnable token stream, the next-token loss, and small formatting utilities.
//!
//! (Each example includes this module with `mod common;`; not every example uses every
//! item.)
#![allow(dead_code)]

pub mod counting_allocator;
pub mod llama_presets;
pub mod loss_plot;

use candle_core::{DType, Device, Tensor, Var};
use candle_fsdp::models::log_softmax_last_dim;
use candle_fsdp::Bytes;
use std::collections::HashMap;
use std::str::FromStr;

/// SplitMix64: a tiny deterministic generator (candle's CPU RNG cannot be seeded, and the
/// examples must produce the same data on every run).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// An independent stream per `(seed, stream)` pair, e.g. one per rank.
    pub fn stream(seed: u64, stream: u64) -> Self {
        let mut base = Self(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        Self(base.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A synthetic language: every token is followed by a fixed successor (a random
/// permutation of the vocabulary, drawn once from the seed) with probability
/// `1 - noise`, and by a uniformly random token otherwise. A model that learns the
/// permutation reaches [`BigramTask::entropy`] nats per token; one that knows nothing is at
/// `ln(vocab)`.
#[derive(Clone, Debug)]
pub struct BigramTask {
    pub vocab: usize,
    pub noise: f64,
    successor: Vec<u32>,
}

impl BigramTask {
    pub fn new(vocab: usize, noise: f64, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut successor: Vec<u32> = (0..vocab as u32).collect();
        for i in (1..vocab).rev() {
            successor.swap(i, rng.below(i + 1));
        }
        Self { vocab, noise, successor }
    }

    /// The token the rule puts after `token`.
    pub fn successor_of(&self, token: u32) -> u32 {
        self.successor[token as usize]
    }

    /// The loss of the ideal predictor (the entropy of the next token), in nats.
    pub fn entropy(&self) -> f64 {
        let v = self.vocab as f64;
        let other = self.noise / v;
        let right = 1.0 - self.noise + other;
        let mut h = -right * right.ln();
        if other > 0.0 {
            h -= (v - 1.0) * other * other.ln();
        }
        h
    }

    /// `batch` sequences of `seq_len + 1` tokens, split into inputs `(batch, seq_len)` and
    /// next-token targets `(batch, seq_len)` (u32).
    pub fn batch(
        &self,
        rng: &mut Rng,
        batch: usize,
        seq_len: usize,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let mut tokens = Vec::with_capacity(batch * (seq_len + 1));
        for _ in 0..batch {
            let mut token = rng.below(self.vocab) as u32;
            tokens.push(token);
            for _ in 0..seq_len {
                token =
                    if rng.unit() < self.noise { rng.below(self.vocab) as u32 } else { self.successor[token as usize] };
                tokens.push(token);
            }
        }
        let all = Tensor::from_vec(tokens, (batch, seq_len + 1), device)?;
        Ok((all.narrow(1, 0, seq_len)?.contiguous()?, all.narrow(1, 1, seq_len)?.contiguous()?))
    }
}

/// Mean next-token cross-entropy of `logits` `(batch, seq, vocab)` against `targets`
/// `(batch, seq)`: the negative mean of the targets' log-probabilities. Built from
/// differentiable ops only (candle-nn's fused softmax has no backward).
pub fn next_token_loss(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    let log_probs = log_softmax_last_dim(&logits.reshape((b * s, v))?)?;
    let picked = log_probs.gather(&targets.reshape((b * s, 1))?, 1)?;
    picked.mean_all()?.neg()
}

/// Independent copies of a `VarMap`'s values, by name: what every rank builds its model
/// from, so all ranks (and the single-process baseline) start from the same weights.
pub fn snapshot(var_map: &candle_nn::VarMap) -> candle_core::Result<HashMap<String, Tensor>> {
    let vars = var_map.data().lock().expect("VarMap lock poisoned");
    vars.iter().map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?))).collect()
}

/// Bytes held by the tensors.
pub fn tensor_bytes<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> usize {
    tensors.into_iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
}

pub fn var_bytes(vars: &[Var]) -> usize {
    tensor_bytes(vars.iter().map(|v| v.as_tensor()))
}

/// Total element count of the tensors.
pub fn numel<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> usize {
    tensors.into_iter().map(|t| t.elem_count()).sum()
}

/// One line on a Llama model: its shape and its size in parameters and bytes (`DTYPE`).
pub fn describe_llama(c: &candle_fsdp::models::llama::LlamaConfig, numel: usize) -> String {
    format!(
        "Llama, vocab {}, hidden {}, {} layers, {} heads / {} kv heads, MLP {}: {} parameters ({}, {:?})",
        c.vocab_size,
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        human_count(numel),
        Bytes(numel * DTYPE.size_in_bytes()),
        DTYPE
    )
}

/// Model FLOPs of one trained token of a Llama (forward and backward): `6 N` for the
/// matmuls of its `N` parameters outside the input embedding (a lookup), plus
/// `12 · layers · hidden · seq_len` for the attention scores and their weighted sum (PaLM's
/// count, as model FLOPs utilisation uses it).
pub fn llama_flops_per_token(c: &candle_fsdp::models::llama::LlamaConfig, numel: usize, seq_len: usize) -> f64 {
    let matmul_params = numel - c.vocab_size * c.hidden_size;
    6.0 * matmul_params as f64 + 12.0 * (c.num_hidden_layers * c.hidden_size * seq_len) as f64
}

/// The FLOP/s one rank's `device` reaches on f32 matmuls (the best of a few 512³
/// products, after one to warm up): the peak model FLOPs utilisation is measured against.
pub fn measured_peak_flops(device: &candle_core::Device) -> candle_core::Result<f64> {
    const N: usize = 512;
    let a = Tensor::ones((N, N), DType::F32, device)?;
    let b = Tensor::ones((N, N), DType::F32, device)?;
    a.matmul(&b)?.sum_all()?.to_scalar::<f32>()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = std::time::Instant::now();
        a.matmul(&b)?.sum_all()?.to_scalar::<f32>()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(2.0 * (N * N * N) as f64 / best)
}

/// The resident memory of this process (all its ranks), from `/proc/self/status`; `None`
/// where that is not available.
pub fn resident_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `1234567` as `1.23M`.
pub fn human_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Milliseconds of a duration, for tables.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).expect("no NaN timings"));
    let n = sorted.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// clap value parser for a world size: a positive count of ranks (threads).
pub fn parse_world_size(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|_| format!("`{s}` is not a number of ranks"))?;
    match n {
        0 => Err("the world size must be at least 1".into()),
        n if n > 1024 => Err(format!("a world size of {n} is more ranks than this example supports (at most 1024)")),
        n => Ok(n),
    }
}

/// clap value parser for a sharding strategy, through the library's `FromStr`.
pub fn parse_strategy(s: &str) -> Result<candle_fsdp::ShardingStrategy, String> {
    candle_fsdp::ShardingStrategy::from_str(s).map_err(|e| e.to_string())
}

/// clap value parser for a backward prefetch mode, through the library's `FromStr`.
pub fn parse_backward_prefetch(s: &str) -> Result<candle_fsdp::BackwardPrefetch, String> {
    candle_fsdp::BackwardPrefetch::from_str(s).map_err(|e| e.to_string())
}

/// The dtype every example trains in.
pub const DTYPE: DType = DType::F32;

/// The CPU threads of each rank: `requested`, or each of this process's `ranks` its share
/// of the cores ([`candle_fsdp::dist::cpu_threads_per_rank`]). Each rank runs on a rayon
/// pool of that many threads; candle's elementwise kernels split over a process-wide pool
/// of their own, which candle sizes from `CANDLE_NUM_THREADS` only, so this sets that to
/// the same count. It must run first in `main`, before any other thread exists: the
/// environment is not safe to change while another thread may read it.
pub fn configure_cpu_threads(requested: Option<usize>, ranks: usize) -> usize {
    let threads = requested.unwrap_or_else(|| candle_fsdp::dist::cpu_threads_per_rank(ranks));
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    threads
}

/// Logical cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The FSDP options the examples share, flattened into each one's arguments.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct FsdpArgs {
    /// Number of ranks the parameters are sharded over (one thread each).
    #[arg(long, default_value = "2", value_parser = parse_world_size)]
    pub world_size: usize,

    /// Sharding strategy: `full-shard` (ZeRO-3), `shard-grad-op` (ZeRO-2) or `no-shard` (DDP).
    #[arg(long, default_value = "full-shard", value_parser = parse_strategy)]
    pub strategy: candle_fsdp::ShardingStrategy,

    /// Backward prefetch: `none`, `backward-pre` or `backward-post`.
    #[arg(long, default_value = "backward-pre", value_parser = parse_backward_prefetch)]
    pub backward_prefetch: candle_fsdp::BackwardPrefetch,

    /// Gather the next unit of the static forward order when a unit's forward starts.
    #[arg(long)]
    pub forward_prefetch: bool,

    /// Hybrid sharding: shard within groups of this many consecutive ranks, replicate
    /// across the groups (HYBRID_SHARD with `full-shard`, its ZeRO-2 variant with
    /// `shard-grad-op`). Default: one group, the whole world.
    #[arg(long)]
    pub shard_group_size: Option<usize>,

    /// Checkpoint every decoder layer's activations: a layer keeps only its inputs after
    /// its forward and runs the forward again in backward.
    #[arg(long)]
    pub activation_checkpointing: bool,

    /// What the units compute in: `f32`, or `bf16` / `f16` over f32 master weights with
    /// gradients reduced in f32 (`f16` with dynamic loss scaling).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
}

/// The mixed-precision recipes the examples offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn policy(self) -> candle_fsdp::MixedPrecision {
        match self {
            Self::F32 => candle_fsdp::MixedPrecision::default(),
            Self::Bf16 => candle_fsdp::MixedPrecision::compute_in(DType::BF16),
            Self::F16 => candle_fsdp::MixedPrecision::compute_in(DType::F16),
        }
    }

    /// f16's range needs the loss scaled; the others need no scaler.
    pub fn grad_scaler(self) -> candle_fsdp::Result<Option<candle_fsdp::ShardedGradScaler>> {
        match self {
            Self::F16 => Ok(Some(candle_fsdp::ShardedGradScaler::new(Default::default())?)),
            Self::F32 | Self::Bf16 => Ok(None),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16 (f32 master weights and reductions)",
            Self::F16 => "f16 (f32 master weights and reductions, loss scaling)",
        })
    }
}

impl FsdpArgs {
    /// The wrap options these arguments choose.
    pub fn fsdp_config(&self) -> candle_fsdp::FsdpConfig {
        let config = candle_fsdp::FsdpConfig::default()
            .strategy(self.strategy)
            .backward_prefetch(self.backward_prefetch)
            .forward_prefetch(self.forward_prefetch)
            .mixed_precision(self.precision.policy());
        candle_fsdp::FsdpConfig { shard_group_size: self.shard_group_size, ..config }
            .activation_checkpointing(self.activation_checkpointing)
    }
}
