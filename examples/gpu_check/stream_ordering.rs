//! 4. Stream ordering between candle's compute stream and NCCL's stream.

use super::*;

/// Values `x` after a chain of kernels that keeps the compute stream busy for many
/// milliseconds: a collective issued right after it must wait for all of it.
fn busy_chain(x: &Tensor, rounds: usize) -> Result<Tensor> {
    let mut y = x.clone();
    for _ in 0..rounds {
        y = (y.matmul(x)? / (x.dim(0)? as f64).sqrt())?.tanh()?;
    }
    Ok(y)
}

/// Element by element: `got` (read back now) against `expected`.
fn differing(got: &Tensor, expected: &[f64]) -> Result<usize> {
    let got = values(got)?;
    ensure!(got.len() == expected.len(), "{} elements, expected {}", got.len(), expected.len());
    Ok(got.iter().zip(expected).filter(|(a, b)| a != b).count())
}

pub(super) fn stream_ordering(sec: &Section, settings: &Settings) -> Result<()> {
    on_gpu(settings.timeout, |ctx| {
        let dev = ctx.device.clone();
        let comm = ctx.comm.clone();
        let label = "gpu_check ordering";
        let side = 4096;

        // (1) An input written by a chain of kernels, handed straight to the collective:
        // the communication stream must wait for the kernels (cudarc records no write
        // event for a kernel's output).
        let written = attempt(|| -> Result<(usize, usize)> {
            let mut rng = Rng::stream(7, 1);
            let x = randn_cpu(&mut rng, &[side, side])?.to_device(&dev)?;
            sync(&dev)?;
            let chain = busy_chain(&x, 6)?.flatten_all()?;
            let gathered = comm.all_gather(&chain, label)?.wait()?;
            let reduced = comm.all_reduce(&busy_chain(&x, 6)?.flatten_all()?, ReduceOp::Sum, label)?.wait()?;
            sync(&dev)?;
            let expected = values(&chain)?;
            Ok((differing(&gathered, &expected)?, differing(&reduced, &expected)?))
        });
        if let Some((g, r)) = sec.check_result("an input written by a chain of kernels", written) {
            sec.check(
                g == 0 && r == 0,
                format!(
                    "an input written by 6 chained {side}x{side} matmuls and handed straight to all_gather / all_reduce: \
                     {g} / {r} of {} elements differ from the input",
                    side * side
                ),
            );
        }

        // (2) Collectives queued back to back (the communication stream busy), their
        // outputs read at once by candle's copies (`to_dtype`, `cat`), which wait on a
        // buffer's own stream only.
        let queued = attempt(|| -> Result<(usize, usize, usize)> {
            let len = 16 << 20;
            let inputs: Vec<Tensor> = (0..8)
                .map(|i| Ok(((Tensor::arange(0u32, len as u32, &dev)?.to_dtype(DType::F32)? * 1e-3)? + i as f64)?))
                .collect::<Result<_>>()?;
            sync(&dev)?;
            let outputs: Vec<Tensor> =
                inputs.iter().map(|t| Ok(comm.all_gather(t, label)?.wait()?)).collect::<Result<_>>()?;
            let as_f64: Vec<Tensor> = outputs.iter().map(|o| Ok(o.to_dtype(DType::F64)?)).collect::<Result<_>>()?;
            let joined = Tensor::cat(&outputs, 0)?;
            let (mut casts, mut cat) = (0, 0);
            let mut expected_all = Vec::with_capacity(8 * len);
            for (input, cast) in inputs.iter().zip(&as_f64) {
                let expected = values(input)?;
                casts += differing(cast, &expected)?;
                expected_all.extend(expected);
            }
            cat += differing(&joined, &expected_all)?;
            Ok((casts, cat, 8 * len))
        });
        if let Some((casts, cat, total)) = sec.check_result("outputs read at once", queued) {
            sec.check(
                casts == 0 && cat == 0,
                format!(
                    "8 all_gathers of 64 MiB queued back to back, outputs read at once: to_dtype {casts}, cat {cat} of {total} elements wrong"
                ),
            );
        }

        // (3) An output dropped while a reader is queued, its memory free for the next
        // collective's output: the reader must still see the first values.
        let reused = attempt(|| -> Result<usize> {
            let len = 32 << 20;
            let first = Tensor::ones(len, DType::F32, &dev)?;
            let second = (Tensor::ones(len, DType::F32, &dev)? * 2.0)?;
            let x = randn_cpu(&mut Rng::stream(7, 2), &[side, side])?.to_device(&dev)?;
            sync(&dev)?;
            let mut wrong = 0;
            for _ in 0..4 {
                // Keep the compute stream busy so the reader below stays queued.
                let busy = busy_chain(&x, 4)?;
                let gathered = comm.all_gather(&first, label)?.wait()?;
                let read = gathered.to_dtype(DType::F64)?;
                drop(gathered);
                let next = comm.all_gather(&second, label)?.wait()?;
                wrong += differing(&read, &vec![1.0; len])?;
                wrong += differing(&next, &vec![2.0; len])?;
                drop(busy);
            }
            Ok(wrong)
        });
        if let Some(wrong) = sec.check_result("an output dropped while read", reused) {
            sec.check(
                wrong == 0,
                format!("an all_gather output dropped with its reader queued, then a second all_gather: {wrong} elements wrong in 4 rounds"),
            );
        }
        Ok(())
    })
}
