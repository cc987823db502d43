//! 5. Memory.

use super::*;

pub(super) fn memory(sec: &Section, args: &Args, settings: &Settings) -> Result<()> {
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
            fsdp.diagnostics().memory().gathered_bytes == 0,
            format!("the runtime's accounting after wrap: {} gathered", fsdp.diagnostics().memory().gathered_bytes),
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
                probes.push((probe, fsdp.diagnostics().memory().gathered_bytes));
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
            fsdp.diagnostics().memory().gathered_bytes == 0,
            "after forward_inference nothing is gathered (runtime accounting)",
        );

        // Training steps.
        let mut after_steps = Vec::new();
        for step in 1..=3 {
            fsdp.diagnostics().reset_memory_peak();
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
                mib(fsdp.diagnostics().memory().gathered_peak as f64),
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
        sec.check(
            fsdp.diagnostics().memory().gathered_bytes == 0,
            "after backward nothing is gathered (runtime accounting)",
        );
        Ok(())
    })
}
