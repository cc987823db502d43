//! 2. Kernels.

use super::*;

type Op = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>>;

/// One kernel case: `f(a, b, ids)` computed on the CPU and on the GPU.
fn op(f: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + 'static) -> Op {
    Box::new(f)
}

pub(super) fn kernels(sec: &Section) -> Result<()> {
    check_libraries(0)?;
    let dev = Device::new_cuda(0)?;
    let mut rng = Rng::new(2024);
    let a = randn_cpu(&mut rng, &[128, 256])?;
    let b = randn_cpu(&mut rng, &[256, 96])?;
    let ids = Tensor::new(&[3u32, 0, 127, 64, 5, 5, 99], &Device::Cpu)?;
    let f32_ones = |n: usize, d: &Device| Tensor::ones(n, DType::F32, d);
    let ops: Vec<(&str, f64, Op)> = vec![
        ("matmul 128x256 @ 256x96 (cuBLAS)", 1e-4, op(|a, b, _| a.matmul(b))),
        (
            "matmul with a transposed operand (x @ w.t(), as Linear)",
            1e-4,
            op(|a, b, _| a.matmul(&b.t()?.contiguous()?.t()?)),
        ),
        (
            "fused softmax_last_dim (candle-nn kernel)",
            1e-5,
            op(|a, b, _| candle_nn::ops::softmax_last_dim(&a.matmul(b)?)),
        ),
        (
            "softmax from primitives (candle_fsdp::models::softmax_last_dim)",
            1e-5,
            op(|a, b, _| candle_fsdp::models::softmax_last_dim(&a.matmul(b)?)),
        ),
        (
            "log_softmax (candle_fsdp::models::log_softmax_last_dim)",
            1e-4,
            op(|a, _, _| candle_fsdp::models::log_softmax_last_dim(a)),
        ),
        (
            "fused rms_norm (candle-nn kernel)",
            1e-4,
            op(move |a, _, _| candle_nn::ops::rms_norm(a, &f32_ones(256, a.device())?, 1e-5)),
        ),
        (
            "unary: silu, exp, tanh, sqrt(|x|), neg, sqr",
            1e-4,
            op(|a, _, _| {
                Tensor::cat(&[a.silu()?, (a * 0.1)?.exp()?, a.tanh()?, a.abs()?.sqrt()?, a.neg()?, a.sqr()?], 1)
            }),
        ),
        (
            "binary broadcast add / mul / div / sub / maximum",
            1e-4,
            op(|a, _, _| {
                let row = a.sum_keepdim(1)?;
                let col = a.mean_keepdim(0)?;
                Tensor::cat(
                    &[
                        a.broadcast_add(&row)?,
                        a.broadcast_mul(&col)?,
                        a.broadcast_div(&(row.abs()? + 1.0)?)?,
                        a.broadcast_sub(&col)?,
                        a.broadcast_maximum(&col)?,
                    ],
                    1,
                )
            }),
        ),
        (
            "reductions: sum, max, min, mean over a dimension",
            1e-4,
            op(|a, _, _| {
                Tensor::cat(&[a.sum_keepdim(1)?, a.max_keepdim(1)?, a.min_keepdim(1)?, a.mean_keepdim(1)?], 1)
            }),
        ),
        ("argmax (u32 output)", 0.0, op(|a, _, _| a.argmax_keepdim(1))),
        (
            "arg_sort_last_dim (sort kernel)",
            0.0,
            op(|a, _, _| a.narrow(1, 0, 64)?.contiguous()?.arg_sort_last_dim(true)),
        ),
        ("affine (2x + 1)", 1e-5, op(|a, _, _| a.affine(2.0, 1.0))),
        ("cast f32 -> bf16 -> f32", 1e-2, op(|a, _, _| a.to_dtype(DType::BF16)?.to_dtype(DType::F32))),
        ("cast f32 -> f16 -> f32", 1e-3, op(|a, _, _| a.to_dtype(DType::F16)?.to_dtype(DType::F32))),
        (
            "bf16 matmul (cuBLAS, bf16 in and out)",
            2e-2,
            op(|a, b, _| a.to_dtype(DType::BF16)?.matmul(&b.to_dtype(DType::BF16)?)?.to_dtype(DType::F32)),
        ),
        ("index_select of rows (u32 ids; the embedding lookup)", 0.0, op(|a, _, ids| a.index_select(ids, 0))),
        (
            "gather along the last dimension",
            0.0,
            op(|a, _, ids| {
                let idx = ids.narrow(0, 0, 4)?.reshape((1, 4))?.broadcast_as((128, 4))?.contiguous()?;
                a.gather(&idx, 1)
            }),
        ),
        ("where_cond / ge (relu by mask)", 0.0, op(|a, _, _| a.ge(0.0)?.where_cond(a, &a.zeros_like()?))),
        ("transpose + contiguous (strided copy)", 0.0, op(|a, _, _| a.t()?.contiguous())),
        ("cat along dim 1", 0.0, op(|a, _, _| Tensor::cat(&[a, a], 1))),
        (
            "rope_slow (the Llama model's rotary embedding)",
            1e-5,
            op(|a, _, _| {
                let x = a.reshape((1, 2, 64, 256))?.narrow(3, 0, 16)?.contiguous()?;
                let cos = a.narrow(0, 0, 64)?.narrow(1, 0, 8)?.cos()?.contiguous()?;
                let sin = a.narrow(0, 0, 64)?.narrow(1, 0, 8)?.sin()?.contiguous()?;
                candle_nn::rotary_emb::rope_slow(&x, &cos, &sin)
            }),
        ),
        (
            "fused rope (candle-nn kernel)",
            1e-5,
            op(|a, _, _| {
                let x = a.reshape((1, 2, 64, 256))?.narrow(3, 0, 16)?.contiguous()?;
                let cos = a.narrow(0, 0, 64)?.narrow(1, 0, 8)?.cos()?.contiguous()?;
                let sin = a.narrow(0, 0, 64)?.narrow(1, 0, 8)?.sin()?.contiguous()?;
                candle_nn::rotary_emb::rope(&x, &cos, &sin)
            }),
        ),
    ];
    let (ga, gb, gids) = (a.to_device(&dev)?, b.to_device(&dev)?, ids.to_device(&dev)?);
    for (name, tol, op) in &ops {
        let result = attempt(|| -> Result<(f64, f64)> {
            let cpu = op(&a, &b, &ids)?;
            let gpu = op(&ga, &gb, &gids)?;
            ensure!(gpu.device().is_cuda(), "the result is not on the GPU");
            ensure!(gpu.dtype() == cpu.dtype(), "dtype {:?} on the GPU, {:?} on the CPU", gpu.dtype(), cpu.dtype());
            Ok((max_abs_diff(&gpu, &cpu)?, max_abs(&cpu)?))
        });
        if let Some((diff, scale)) = sec.check_result(name, result) {
            let bound = tol * scale.max(1.0);
            sec.check(diff <= bound, format!("{name}: max |gpu - cpu| = {diff:.3e} (bound {bound:.1e})"));
        }
    }

    // A backward on the GPU against the CPU.
    let grads = attempt(|| -> Result<f64> {
        let grad_on = |dev: &Device| -> Result<Tensor> {
            let w = Var::from_tensor(&b.to_device(dev)?)?;
            let loss = a.to_device(dev)?.matmul(w.as_tensor())?.silu()?.sqr()?.mean_all()?;
            let grads = loss.backward()?;
            Ok(grads.get(w.as_tensor()).ok_or_else(|| anyhow!("no gradient"))?.clone())
        };
        let (g, c) = (grad_on(&dev)?, grad_on(&Device::Cpu)?);
        let diff = max_abs_diff(&g, &c)?;
        ensure!(diff <= 1e-4 * max_abs(&c)?.max(1e-6), "max |gpu - cpu| = {diff:.3e}");
        Ok(diff)
    });
    if let Some(diff) = sec.check_result("backward of mean(silu(a @ w)^2) on the GPU", grads) {
        sec.check(true, format!("backward of mean(silu(a @ w)^2): gradient max |gpu - cpu| = {diff:.3e}"));
    }

    // curand.
    let random = attempt(|| -> Result<(f64, f64)> {
        let r = Tensor::randn(0f32, 1f32, 1 << 20, &dev)?;
        let v = values(&r)?;
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        Ok((mean, var.sqrt()))
    });
    if let Some((mean, std)) = sec.check_result("randn on the GPU (cuRAND)", random) {
        sec.check(
            mean.abs() < 0.01 && (std - 1.0).abs() < 0.01,
            format!("randn on the GPU (cuRAND): mean {mean:.4}, std {std:.4}"),
        );
    }

    // f32 matmul throughput, for perspective.
    let speed = attempt(|| -> Result<(f64, f64)> {
        let n = 4096;
        let x = Tensor::randn(0f32, 1f32, (n, n), &dev)?;
        let y = Tensor::randn(0f32, 1f32, (n, n), &dev)?;
        let _ = x.matmul(&y)?;
        sync(&dev)?;
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let _z = x.matmul(&y)?;
            sync(&dev)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let m = median(&times);
        Ok((m, 2.0 * (n as f64).powi(3) / (m / 1e3) / 1e12))
    });
    if let Some((ms, tflops)) = sec.check_result("f32 matmul timing", speed) {
        sec.figure("candle f32 matmul 4096^3", format!("{ms:.2} ms median of 5, {tflops:.1} TFLOP/s"));
    }
    Ok(())
}
