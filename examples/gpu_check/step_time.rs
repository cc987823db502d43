//! 8. Step time.

use super::*;

pub(super) struct Timed {
    /// Milliseconds of each measured step.
    pub(super) times: Vec<f64>,
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

pub(super) fn time_plain(
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

pub(super) fn step_time(sec: &Section, args: &Args, settings: &Settings) -> Result<()> {
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
