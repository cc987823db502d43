//! 7. Backward prefetch sequences (the port of tests/backward_prefetch.rs, on the GPU).

use super::*;

const NUM_ITERS: usize = 2;
pub(super) fn prefetch_sequences(sec: &Section, settings: &Settings) -> Result<()> {
    let d_model = 64;
    let config: TransformerConfig = prefetch_test_fqns::prefetch_test_transformer_config(d_model, 8, 128);
    let var_map = VarMap::new();
    let _model = Transformer::new(&config, VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu))?;
    let snapshot = common::snapshot(&var_map)?;
    let mut rng = Rng::new(1);
    let src = randn_cpu(&mut rng, &[10, 1, d_model])?;
    let tgt = randn_cpu(&mut rng, &[20, 1, d_model])?;
    sec.info(
        "the PyTorch test's nn.Transformer (6 encoder + 6 decoder layers, each a unit; d_model 64, feed-forward 128 here), \
         SGD lr 1e-2 on model(src, tgt).sum(), two iterations; PyTorch's test expects 13 prefetch decisions per iteration under \
         BACKWARD_PRE (decoder.layers.5 .. 0, encoder.layers.5 .. 0, None) and under BACKWARD_POST (decoder.layers.4 .. 0, \
         encoder.layers.5 .. 0, None, None), none without backward prefetch",
    );
    on_gpu(settings.timeout, |ctx| {
        let dev = ctx.device.clone();
        let (src, tgt) = (src.to_device(&dev)?, tgt.to_device(&dev)?);
        for (mode, expected_len, begin) in
            [(BackwardPrefetch::None, 0, 0), (BackwardPrefetch::Pre, 13, 6), (BackwardPrefetch::Post, 13, 5)]
        {
            let recorded = attempt(|| -> Result<Vec<Vec<Option<String>>>> {
                let model = Transformer::new(&config, VarBuilder::from_tensors(snapshot.clone(), DType::F32, &dev))?;
                let fsdp = Fsdp::wrap(
                    model,
                    ctx.comm.clone(),
                    FsdpConfig { sync_module_states: false, ..FsdpConfig::default().backward_prefetch(mode) },
                )?;
                let mut optimizer = SGD::new(fsdp.parameters(), 1e-2)?;
                let mut per_iteration = Vec::new();
                for _ in 0..NUM_ITERS {
                    let loss = fsdp.forward(|m| m.forward(&src, &tgt))?.sum_all()?;
                    optimizer.step(&fsdp.backward(&loss)?)?;
                    per_iteration.push(
                        fsdp.diagnostics()
                            .take_trace()
                            .into_iter()
                            .filter_map(|e| match e {
                                TraceEvent::BackwardPrefetch { target, .. } => Some(target),
                                _ => None,
                            })
                            .collect(),
                    );
                }
                // The FQN lists of the units, for the PyTorch test's comparison.
                let units = fsdp.diagnostics().units();
                Ok(per_iteration
                    .into_iter()
                    .map(|it: Vec<Option<String>>| {
                        it.into_iter()
                            .map(|t| {
                                t.map(|name| {
                                    units.iter().find(|(n, _)| *n == name).map(|(_, f)| f.join(",")).unwrap_or(name)
                                })
                            })
                            .collect()
                    })
                    .collect())
            });
            let Some(recorded) = sec.check_result(format!("{mode}: training with the trace"), recorded) else {
                continue;
            };
            for (iteration, entries) in recorded.iter().enumerate() {
                let expected: Vec<Option<String>> = (0..expected_len)
                    .map(|k| prefetch_test_fqns::expected_prefetch_entry(k, begin).map(|f| f.join(",")))
                    .collect();
                let short = |e: &Option<String>| match e {
                    None => "None".to_string(),
                    Some(fqns) => fqns.split('.').take(3).collect::<Vec<_>>().join("."),
                };
                let shown = entries.iter().map(short).collect::<Vec<_>>().join(", ");
                let first_bad = entries.iter().zip(&expected).position(|(a, b)| a != b);
                let ok = entries.len() == expected.len() && first_bad.is_none();
                sec.check(
                    ok,
                    format!(
                        "{mode} iteration {}: {} decisions (expected {expected_len}){}: [{shown}]",
                        iteration + 1,
                        entries.len(),
                        match first_bad {
                            Some(k) => format!(
                                ", entry {k} is {} but PyTorch's test expects {}",
                                short(&entries[k]),
                                short(&expected[k])
                            ),
                            None => String::new(),
                        }
                    ),
                );
            }
        }

        // The prefetches are real gathers.
        let gathers = attempt(|| -> Result<Vec<String>> {
            let model = Transformer::new(&config, VarBuilder::from_tensors(snapshot.clone(), DType::F32, &dev))?;
            let fsdp =
                Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig { sync_module_states: false, ..FsdpConfig::default() })?;
            let loss = fsdp.forward(|m| m.forward(&src, &tgt))?.sum_all()?;
            fsdp.backward(&loss)?;
            Ok(fsdp
                .diagnostics()
                .take_trace()
                .into_iter()
                .filter_map(|e| match e {
                    TraceEvent::Unshard { unit, cause: UnshardCause::BackwardPrefetch } => Some(unit),
                    _ => None,
                })
                .collect())
        });
        if let Some(units) = sec.check_result("BACKWARD_PRE gathers through prefetch", gathers) {
            let expected: Vec<String> = (0..6)
                .rev()
                .map(|i| format!("decoder.layers.{i}"))
                .chain((0..6).rev().map(|i| format!("encoder.layers.{i}")))
                .collect();
            sec.check(
                units == expected,
                format!("BACKWARD_PRE: units gathered by a backward prefetch, in order: [{}]", units.join(", ")),
            );
        }
        Ok(())
    })
}
