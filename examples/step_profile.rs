//! Where a training step of the bench's Llama spends its time, on the composed kernels
//! (chains of candle's primitives) and on the fused ones, in one run on the CPU:
//!
//! - the step's phases under FSDP at world size 1 (forward, backward with its
//!   collectives, AdamW);
//! - each op of the model timed alone at the model's shapes, forward and backward
//!   (`sum(y · dy).backward()`), times how often a step calls it.
//!
//! ```text
//! cargo run --release --example step_profile
//! cargo run --release --example step_profile -- --model medium --threads 2
//! ```

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_fsdp::models::llama::{Llama, LlamaConfig};
use candle_fsdp::models::Kernels;
use candle_fsdp::optim::{AdamW, ParamsAdamW};
use candle_fsdp::{launch, ops, Fsdp, FsdpConfig, LaunchOptions};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use clap::Parser;
use common::{median, BigramTask, Rng, DTYPE};
use std::time::Instant;

/// Time a training step's phases and its ops, composed against fused.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// `small` (hidden 128, 4 layers, vocab 512, 16 x 64 tokens) or `medium` (hidden 256,
    /// 6 layers, vocab 1024, 16 x 128 tokens): the bench's models.
    #[arg(long, default_value = "small", value_parser = ["small", "medium"])]
    model: String,
    /// Measured repetitions of each measurement (the median is printed).
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// CPU threads candle uses per op.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// The median of `repeats` timings of `op`'s forward and backward (`sum(y).backward()`)
/// in milliseconds, after two warm-up calls; the leaves are made outside the timing.
fn timed_op(
    repeats: usize,
    inputs: &[Tensor],
    op: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    let mut times = Vec::with_capacity(repeats);
    for n in 0..repeats + 2 {
        let vars = inputs.iter().map(Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let started = Instant::now();
        op(&tensors)?.sum_all()?.backward()?;
        if n >= 2 {
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(&times))
}

type OpFn = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;

/// `x · wᵀ` as candle's layers compute it: reshape, matmul with the transpose, reshape.
fn composed_linear(a: &[Tensor]) -> candle_core::Result<Tensor> {
    let (b, s, d) = a[0].dims3()?;
    a[0].reshape((b * s, d))?.matmul(&a[1].t()?)?.reshape((b, s, a[1].dim(0)?))
}

fn fused_linear(a: &[Tensor]) -> candle_core::Result<Tensor> {
    ops::linear(&a[0], &a[1])
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::configure_cpu_threads(Some(args.threads), 1);
    // The ops run on a pool of `--threads`, as a rank's do.
    candle_fsdp::dist::run_on_cpu_threads(args.threads, || profile(&args))?
}

fn profile(args: &Args) -> anyhow::Result<()> {
    let base = if args.model == "small" { common::llama_presets::small() } else { common::llama_presets::medium() };
    let (batch, seq) = (16, base.max_position_embeddings);
    let (vocab, hidden, inter, layers) =
        (base.vocab_size, base.hidden_size, base.intermediate_size, base.num_hidden_layers);
    let (heads, kv) = (base.num_attention_heads, base.num_key_value_heads);
    let config = |kernels| LlamaConfig { kernels, ..base.clone() };
    let head_dim = hidden / heads;
    println!(
        "Llama {args_model}: vocab {vocab}, hidden {hidden}, {layers} layers, {heads}/{kv} heads, MLP {inter}; batch {batch} x {seq} \
         tokens; f32, {} candle thread(s); medians of {} repetitions",
        args.threads,
        args.repeats,
        args_model = args.model
    );

    // The step's phases under FSDP at world size 1.
    let var_map = VarMap::new();
    Llama::new(&config(Kernels::Fused), VarBuilder::from_varmap(&var_map, DTYPE, &Device::Cpu))?;
    let snapshot = common::snapshot(&var_map)?;
    let task = BigramTask::new(vocab, 0.1, 7);
    let (inputs, targets) = task.batch(&mut Rng::new(3), batch, seq, &Device::Cpu)?;
    println!("\nstep phases (FSDP world 1, FULL_SHARD), ms:");
    println!("  {:<10} {:>9} {:>9} {:>9} {:>9}", "kernels", "forward", "backward", "AdamW", "step");
    for kernels in [Kernels::Composed, Kernels::Fused] {
        let phases = launch(LaunchOptions::new(1).cpu_threads(args.threads), |ctx| {
            let model = Llama::new(&config(kernels), VarBuilder::from_tensors(snapshot.clone(), DTYPE, &ctx.device))?;
            let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
            let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW { lr: 1e-3, ..ParamsAdamW::default() })?;
            let mut phases = [Vec::new(), Vec::new(), Vec::new()];
            for n in 0..args.repeats + 2 {
                let started = Instant::now();
                let loss = fsdp.forward(|m| m.loss(&inputs, &targets))?;
                let forward = started.elapsed();
                let grads = fsdp.backward(&loss)?;
                let backward = started.elapsed();
                optimizer.step(&grads)?;
                let step = started.elapsed();
                if n >= 2 {
                    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                    phases[0].push(ms(forward));
                    phases[1].push(ms(backward - forward));
                    phases[2].push(ms(step - backward));
                }
            }
            Ok(phases.map(|p| median(&p)))
        })?;
        let [forward, backward, adamw] = phases[0];
        println!(
            "  {:<10} {forward:>9.2} {backward:>9.2} {adamw:>9.2} {:>9.2}",
            format!("{kernels:?}"),
            forward + backward + adamw
        );
    }

    // Each op alone, forward and backward, at the model's shapes.
    let rows = batch * seq;
    let rng = &mut Rng::new(5);
    let mut randn = |shape: &[usize]| -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| (rng.unit() * 2.0 - 1.0) as f32 * 1.7).collect();
        Tensor::from_vec(values, shape, &Device::Cpu)
    };
    let x = randn(&[batch, seq, hidden])?;
    let norm_w = (randn(&[hidden])? + 1.0)?;
    let q = randn(&[batch, seq, heads, head_dim])?;
    let k = randn(&[batch, seq, kv, head_dim])?;
    let v = randn(&[batch, seq, kv, head_dim])?;
    let angles = randn(&[seq, head_dim / 2])?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let gate = randn(&[batch, seq, inter])?;
    let w_up = (randn(&[inter, hidden])? * 0.05)?;
    let w_down = (randn(&[hidden, inter])? * 0.05)?;
    let w_qo = (randn(&[hidden, hidden])? * 0.05)?;
    let w_kv = (randn(&[kv * head_dim, hidden])? * 0.05)?;
    let h = randn(&[rows, hidden])?;
    let w_head = (randn(&[vocab, hidden])? * 0.05)?;
    let t: Vec<u32> = (0..rows as u32).map(|i| (i * 7919) % vocab as u32).collect();
    let t = Tensor::from_vec(t, rows, &Device::Cpu)?;
    let heads_first = |t: &Tensor| t.transpose(1, 2)?.contiguous();
    let mask: Vec<f32> = (0..seq * seq).map(|i| if i % seq > i / seq { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (seq, seq), &Device::Cpu)?;
    let group = heads / kv;
    let scale = 1.0 / (head_dim as f64).sqrt();

    // (op, calls per step, inputs, composed, fused)
    let (t1, t2) = (t.clone(), t.clone());
    let ops_table: Vec<(&str, usize, Vec<Tensor>, OpFn, OpFn)> = vec![
        (
            "rms_norm",
            2 * layers + 1,
            vec![x.clone(), norm_w.clone()],
            Box::new(|a| candle_fsdp::models::rms_norm(&candle_nn::RmsNorm::new(a[1].clone(), 1e-5), &a[0])),
            Box::new(|a| ops::rms_norm(&a[0], &a[1], 1e-5)),
        ),
        ("linear q, o", 2 * layers, vec![x.clone(), w_qo.clone()], Box::new(composed_linear), Box::new(fused_linear)),
        ("linear k, v", 2 * layers, vec![x.clone(), w_kv.clone()], Box::new(composed_linear), Box::new(fused_linear)),
        (
            "linear gate, up",
            2 * layers,
            vec![x.clone(), w_up.clone()],
            Box::new(composed_linear),
            Box::new(fused_linear),
        ),
        ("linear down", layers, vec![gate.clone(), w_down.clone()], Box::new(composed_linear), Box::new(fused_linear)),
        (
            "rope (q and k)",
            2 * layers,
            vec![q.clone(), cos.clone(), sin.clone()],
            Box::new(move |a| candle_nn::rotary_emb::rope_slow(&heads_first(&a[0])?, &a[1], &a[2])),
            Box::new(|a| ops::rope(&a[0], &a[1], &a[2])),
        ),
        (
            "attention (scores, softmax, P·V)",
            layers,
            vec![q.clone(), k.clone(), v.clone()],
            Box::new(move |a| {
                let (b, s, _, d) = a[0].dims4()?;
                let repeat = |t: &Tensor| -> candle_core::Result<Tensor> {
                    let t = heads_first(t)?;
                    t.unsqueeze(2)?.broadcast_as((b, kv, group, s, d))?.contiguous()?.reshape((b, kv * group, s, d))
                };
                let q = heads_first(&a[0])?;
                let scores = (q.matmul(&repeat(&a[1])?.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
                candle_fsdp::models::softmax_last_dim(&scores)?.matmul(&repeat(&a[2])?)
            }),
            Box::new(move |a| ops::causal_attention(&a[0], &a[1], &a[2], scale)),
        ),
        (
            "swiglu",
            layers,
            vec![gate.clone(), gate.clone()],
            Box::new(|a| a[0].silu()? * &a[1]),
            Box::new(|a| ops::swiglu(&a[0], &a[1])),
        ),
        (
            "loss (lm_head + cross-entropy)",
            1,
            vec![h.clone(), w_head.clone()],
            Box::new(move |a| {
                let logits = a[0].matmul(&a[1].t()?)?;
                let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                log_probs.gather(&t1.unsqueeze(1)?, 1)?.mean_all()?.neg()
            }),
            Box::new(move |a| ops::linear_cross_entropy(&a[0], &a[1], &t2)),
        ),
    ];
    println!(
        "\nops at the model's shapes, forward + sum(y).backward() (ms per call, and per step = calls x per call):"
    );
    println!(
        "  {:<36} {:>6} {:>12} {:>12} {:>10} {:>10} {:>8}",
        "op", "calls", "composed", "fused", "composed", "fused", "speedup"
    );
    let (mut composed_total, mut fused_total) = (0.0, 0.0);
    for (name, calls, inputs, composed, fused) in &ops_table {
        let c = timed_op(args.repeats, inputs, composed.as_ref())?;
        let f = timed_op(args.repeats, inputs, fused.as_ref())?;
        let (cs, fs) = (c * *calls as f64, f * *calls as f64);
        composed_total += cs;
        fused_total += fs;
        println!("  {name:<36} {calls:>6} {c:>12.3} {f:>12.3} {cs:>10.2} {fs:>10.2} {:>7.2}x", c / f);
    }
    // AdamW over every parameter of the model, composed (candle-nn) and fused.
    let numel: usize = snapshot.values().map(|t| t.elem_count()).sum();
    let params = || -> candle_core::Result<Vec<Var>> {
        snapshot.values().map(|t| Var::from_tensor(&t.to_dtype(DType::F32)?)).collect()
    };
    let adamw_time = |fused: bool| -> candle_core::Result<f64> {
        let vars = params()?;
        let sums = vars.iter().map(|v| v.as_tensor().sum_all()).collect::<candle_core::Result<Vec<_>>>()?;
        let grads = Tensor::stack(&sums, 0)?.sum_all()?.backward()?;
        let settings = ParamsAdamW { lr: 1e-3, ..ParamsAdamW::default() };
        let mut optimizer: Box<dyn FnMut() -> candle_core::Result<()>> = if fused {
            let mut optimizer = AdamW::new(vars, settings)?;
            Box::new(move || optimizer.step(&grads))
        } else {
            let mut optimizer = candle_nn::AdamW::new(vars, settings)?;
            Box::new(move || optimizer.step(&grads))
        };
        let mut times = Vec::new();
        for n in 0..args.repeats + 2 {
            let started = Instant::now();
            optimizer()?;
            if n >= 2 {
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(median(&times))
    };
    let (c, f) = (adamw_time(false)?, adamw_time(true)?);
    composed_total += c;
    fused_total += f;
    println!(
        "  {:<36} {:>6} {c:>12.3} {f:>12.3} {c:>10.2} {f:>10.2} {:>7.2}x",
        format!("AdamW ({numel} elements)"),
        1,
        c / f
    );
    println!(
        "  {:<36} {:>6} {:>12} {:>12} {composed_total:>10.2} {fused_total:>10.2} {:>7.2}x",
        "sum",
        "",
        "",
        "",
        composed_total / fused_total
    );
    println!(
        "\nthe sum leaves out the embedding, the residual additions, the reshapes between ops and FSDP's gathers and \
         reductions; the phases above include them"
    );
    Ok(())
}
