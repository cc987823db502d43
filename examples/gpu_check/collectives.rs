//! 3. Collectives.

use super::*;

pub(super) fn collectives(sec: &Section, settings: &Settings) -> Result<()> {
    on_gpu(settings.timeout, |ctx| {
        let dev = ctx.device.clone();
        let comm = ctx.comm.clone();
        sec.check(
            dev.is_cuda() && comm.size() == 1 && comm.rank() == 0 && comm.global_rank() == 0,
            format!("launch_gpus(world 1): rank 0 of 1 on {:?}", dev.location()),
        );
        let n = 1000;
        let base: Vec<f32> = (0..n).map(|i| ((i * 7) % 17) as f32 - 8.0).collect();
        let label = "gpu_check";
        let waited = |w: candle_fsdp::dist::Result<Work>| -> Result<Tensor> { Ok(w?.wait()?) };
        // The output must equal the input exactly (world size 1).
        let exact = |input: &Tensor, got: Result<Tensor>| -> Result<()> {
            let got = got?;
            ensure!(got.device().is_cuda(), "the output is not on the GPU");
            ensure!(got.dtype() == input.dtype(), "output dtype {:?}, input {:?}", got.dtype(), input.dtype());
            let (g, e) = (values(&got)?, values(input)?);
            ensure!(g.len() == e.len(), "{} output elements, expected {}", g.len(), e.len());
            let wrong = g.iter().zip(&e).filter(|(x, y)| x != y).count();
            ensure!(wrong == 0, "{wrong} of {} elements differ from the expected values", e.len());
            Ok(())
        };
        // One line per group of cases: PASS naming them all, or a FAIL per failing case.
        let report = |what: &str, len: usize, cases: Vec<(&str, Result<()>)>| {
            let names: Vec<&str> = cases.iter().map(|(n, _)| *n).collect();
            let failed: Vec<String> =
                cases.into_iter().filter_map(|(n, r)| r.err().map(|e| format!("{n}: {e:#}"))).collect();
            if failed.is_empty() {
                sec.check(true, format!("{what}: {} — {len} elements each, output == input exactly", names.join(", ")));
            }
            for f in failed {
                sec.check(false, format!("{what}: {f}"));
            }
        };
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let t = Tensor::new(base.as_slice(), &dev)?.to_dtype(dtype)?;
            report(
                &format!("{dtype:?}"),
                n,
                vec![
                    ("all_gather", exact(&t, waited(comm.all_gather(&t, label)))),
                    ("reduce_scatter Sum", exact(&t, waited(comm.reduce_scatter(&t, ReduceOp::Sum, label)))),
                    ("reduce_scatter Avg", exact(&t, waited(comm.reduce_scatter(&t, ReduceOp::Avg, label)))),
                    ("all_reduce Sum", exact(&t, waited(comm.all_reduce(&t, ReduceOp::Sum, label)))),
                    ("all_reduce Avg", exact(&t, waited(comm.all_reduce(&t, ReduceOp::Avg, label)))),
                    ("broadcast from rank 0", exact(&t, waited(comm.broadcast(&t, 0, label)))),
                ],
            );
        }
        let ints = Tensor::new((0..n as u32).map(|i| i * 3).collect::<Vec<_>>().as_slice(), &dev)?;
        report(
            "U32",
            n,
            vec![
                ("all_gather", exact(&ints, waited(comm.all_gather(&ints, label)))),
                ("broadcast from rank 0", exact(&ints, waited(comm.broadcast(&ints, 0, label)))),
            ],
        );
        let whole = Tensor::new(base.as_slice(), &dev)?;
        let slice = whole.narrow(0, 3, 500)?;
        report(
            "F32 input at a storage offset (narrow(0, 3, 500))",
            500,
            vec![
                ("all_gather", exact(&slice.copy()?, waited(comm.all_gather(&slice, label)))),
                ("all_reduce Sum", exact(&slice.copy()?, waited(comm.all_reduce(&slice, ReduceOp::Sum, label)))),
            ],
        );
        // The output is usable by later kernels on candle's stream.
        let used = attempt(|| -> Result<f64> {
            let g = comm.all_gather(&whole, label)?.wait()?;
            Ok((g * 2.0)?.sum_all()?.to_scalar::<f32>()? as f64)
        });
        let expected: f64 = base.iter().map(|&v| 2.0 * v as f64).sum();
        if let Some(v) = sec.check_result("a kernel reading an all_gather output", used) {
            sec.check(
                v == expected,
                format!("a kernel reading an all_gather output on candle's stream: sum {v} (expected {expected})"),
            );
        }

        let barrier = comm.barrier("gpu_check barrier");
        sec.check(
            barrier.is_ok(),
            format!("barrier: {}", barrier.map(|_| "ok".to_string()).unwrap_or_else(|e| e.to_string())),
        );

        let group = attempt(|| -> Result<(usize, usize, usize)> {
            let g = comm.new_group(&[0])?;
            let t = Tensor::new(base.as_slice(), &dev)?;
            let r = g.all_reduce(&t, ReduceOp::Sum, "gpu_check group")?.wait()?;
            ensure!(values(&r)? == values(&t)?, "all_reduce on the group changed the values");
            let again = comm.new_group(&[0])?;
            again.barrier("gpu_check group barrier")?;
            Ok((g.size(), g.rank(), g.global_rank()))
        });
        if let Some((size, rank, global)) = sec.check_result("new_group(&[0])", group) {
            sec.check(
                (size, rank, global) == (1, 0, 0),
                format!("new_group(&[0]) twice: size {size}, rank {rank}, global rank {global}; all_reduce on it exact; barrier ok"),
            );
        }

        let cpu = comm.all_gather(&Tensor::new(&[1f32, 2.0], &Device::Cpu)?, label);
        sec.check(
            matches!(&cpu, Err(e) if e.to_string().contains("not on a GPU")),
            format!(
                "a CPU input is refused with a clear error: {}",
                cpu.err().map(|e| e.to_string()).unwrap_or_else(|| "it was accepted".into())
            ),
        );

        // Bandwidth of a large all-gather at world 1 (a device-to-device copy by NCCL)
        // next to candle's own copy of the same tensor.
        let timing = attempt(|| -> Result<(f64, f64, f64)> {
            let len = 64 << 20;
            let big = Tensor::ones(len, DType::F32, &dev)?;
            let bytes = (len * 4) as f64;
            let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
                let _ = f()?;
                sync(&dev)?;
                let mut times = Vec::new();
                for _ in 0..5 {
                    let t = Instant::now();
                    let out = f()?;
                    sync(&dev)?;
                    times.push(t.elapsed().as_secs_f64());
                    drop(out);
                }
                Ok(median(&times))
            };
            let gather = time(&|| Ok(comm.all_gather(&big, label)?.wait()?))?;
            let reduce = time(&|| Ok(comm.all_reduce(&big, ReduceOp::Sum, label)?.wait()?))?;
            let copy = time(&|| Ok(big.copy()?))?;
            Ok((bytes / gather / 1e9, bytes / reduce / 1e9, bytes / copy / 1e9))
        });
        if let Some((g, r, c)) = sec.check_result("256 MiB collective timing", timing) {
            sec.figure(
                "NCCL world 1, 256 MiB f32",
                format!("all_gather {g:.0} GB/s, all_reduce {r:.0} GB/s; candle's device copy {c:.0} GB/s (bytes of the output per second, median of 5)"),
            );
        }
        Ok(())
    })
}
