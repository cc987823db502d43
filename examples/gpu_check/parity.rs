//! 6. Parity.

use super::*;

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

pub(super) fn parity(sec: &Section, args: &Args, settings: &Settings) -> Result<()> {
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
