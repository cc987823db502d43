//! 9. The fused ops' CUDA kernels against their CPU implementations (themselves tested
//! against the composed references), forward and every gradient, in f32 and bf16; and
//! candle's operations on a released parameter of a CUDA model.

use super::step_time::{time_plain, Timed};
use super::*;

/// The output and the gradients of `sum(op(inputs) · dy)` with respect to `inputs`.
fn forward_and_grads(
    op: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    dy: &Tensor,
) -> Result<Vec<Tensor>> {
    let vars = inputs.iter().map(Var::from_tensor).collect::<candle_core::Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&tensors)?;
    let grads = (&y * dy.to_dtype(y.dtype())?.to_device(y.device())?)?.sum_all()?.backward()?;
    let mut out = vec![y.to_dtype(DType::F32)?.to_device(&Device::Cpu)?];
    for var in &vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            out.push(g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
        }
    }
    Ok(out)
}

type FusedOp = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;

pub(super) fn fused_ops(sec: &Section, args: &Args, settings: &Settings) -> Result<()> {
    use candle_fsdp::ops;
    let dev = Device::new_cuda(0)?;
    let mut rng = Rng::new(77);
    let targets = Tensor::new(&[3u32, 0, 5, 7, 1, 6], &Device::Cpu)?;
    let t2 = targets.clone();
    let cases: Vec<(&str, Vec<Vec<usize>>, Vec<usize>, FusedOp)> = vec![
        ("rms_norm", vec![vec![6, 96], vec![96]], vec![6, 96], Box::new(|t| ops::rms_norm(&t[0], &t[1], 1e-5))),
        ("swiglu", vec![vec![6, 344], vec![6, 344]], vec![6, 344], Box::new(|t| ops::swiglu(&t[0], &t[1]))),
        ("linear", vec![vec![2, 3, 128], vec![344, 128]], vec![2, 3, 344], Box::new(|t| ops::linear(&t[0], &t[1]))),
        (
            "rope",
            vec![vec![2, 9, 4, 64], vec![9, 32]],
            vec![2, 9, 4, 64],
            Box::new(|t| ops::rope(&t[0], &t[1].cos()?, &t[1].sin()?)),
        ),
        (
            "causal_attention (GQA 4:2, head_dim 64, 70 rows)",
            vec![vec![2, 70, 4, 64], vec![2, 70, 2, 64], vec![2, 70, 2, 64]],
            vec![2, 70, 4, 64],
            Box::new(|t| ops::causal_attention(&t[0], &t[1], &t[2], 0.125)),
        ),
        (
            "causal_attention (head_dim 128)",
            vec![vec![1, 33, 8, 128], vec![1, 33, 1, 128], vec![1, 33, 1, 128]],
            vec![1, 33, 8, 128],
            Box::new(|t| ops::causal_attention(&t[0], &t[1], &t[2], 0.088)),
        ),
        (
            "cross_entropy",
            vec![vec![6, 8]],
            vec![],
            Box::new(move |t| ops::cross_entropy(&t[0], &targets.to_device(t[0].device())?)),
        ),
        (
            "linear_cross_entropy",
            vec![vec![6, 32], vec![8, 32]],
            vec![],
            Box::new(move |t| ops::linear_cross_entropy(&t[0], &t[1], &t2.to_device(t[0].device())?)),
        ),
    ];
    for (name, shapes, out_shape, op) in &cases {
        for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
            let inputs = shapes.iter().map(|s| randn_cpu(&mut rng, s)).collect::<Result<Vec<_>>>()?;
            let dy =
                if out_shape.is_empty() { Tensor::new(1.5f32, &Device::Cpu)? } else { randn_cpu(&mut rng, out_shape)? };
            let on = |device: &Device| -> Result<Vec<Tensor>> {
                let inputs = inputs
                    .iter()
                    .map(|t| t.to_dtype(dtype)?.to_device(device))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                forward_and_grads(op.as_ref(), &inputs, &dy)
            };
            let outcome = (|| -> Result<f64> {
                let (cpu, gpu) = (on(&Device::Cpu)?, on(&dev)?);
                ensure!(cpu.len() == gpu.len(), "{} gradients on the CPU, {} on the GPU", cpu.len() - 1, gpu.len() - 1);
                let mut worst = 0f64;
                for (c, g) in cpu.iter().zip(&gpu) {
                    worst = worst.max(max_abs_diff(g, c)? / max_abs(c)?.max(1e-2));
                }
                Ok(worst)
            })();
            if let Some(worst) = sec.check_result(format!("{name} {dtype:?}"), outcome) {
                sec.check(worst <= tolerance, format!("{name} {dtype:?}: forward and gradients within {worst:.2e} of the CPU (relative to scale; tolerance {tolerance:e})"));
            }
        }
    }
    // AdamW in place: three steps on the GPU, to the bit what candle-nn's AdamW computes.
    let outcome = (|| -> Result<bool> {
        let start = randn_cpu(&mut rng, &[4, 33])?.to_device(&dev)?;
        let theta = Var::from_tensor(&start)?;
        let reference = Var::from_tensor(&start)?;
        let params = ParamsAdamW { lr: 0.01, weight_decay: 0.1, ..ParamsAdamW::default() };
        let mut theirs = AdamW::new(vec![reference.clone()], params.clone())?;
        let mut ours = candle_fsdp::optim::AdamW::new(vec![theta.clone()], params)?;
        for _ in 0..3 {
            let g = randn_cpu(&mut rng, &[4, 33])?.to_device(&dev)?;
            ours.step(&(theta.as_tensor() * &g)?.sum_all()?.backward()?)?;
            theirs.step(&(reference.as_tensor() * &g)?.sum_all()?.backward()?)?;
        }
        Ok(values(theta.as_tensor())? == values(reference.as_tensor())?)
    })();
    if let Some(same) = sec.check_result("adamw_update", outcome) {
        sec.check(same, "adamw_update on the GPU: three steps bit-identical to candle-nn's AdamW");
    }
    // A parameter kept past summon_full_params on a CUDA model: candle refuses to use it.
    let outcome = on_gpu(Duration::from_secs(60), |ctx| {
        let model = Llama::new(&llama_presets::tiny(), VarBuilder::from_varmap(&VarMap::new(), DTYPE, &ctx.device))?;
        let fsdp = candle_fsdp::Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let kept = fsdp.summon_full_params(|m| m.lm_head.weight.clone())?;
        let x = Tensor::ones((3, 32), DTYPE, &ctx.device)?;
        let tries: Vec<(&str, candle_core::Result<Tensor>)> = vec![
            ("matmul", x.matmul(&kept.t()?)),
            ("read", kept.to_device(&Device::Cpu).and_then(|t| t.flatten_all()?.to_vec1::<f32>().map(|_| t))),
            ("exp", kept.exp()),
            ("add", &kept + &kept),
            ("copy", kept.copy()),
            ("contiguous of a transpose", kept.t()?.contiguous()),
        ];
        Ok(tries.into_iter().map(|(what, r)| (what, r.is_err())).collect::<Vec<_>>())
    });
    if let Some(tries) = sec.check_result("released parameter on the GPU", outcome) {
        for (what, refused) in tries {
            sec.check(refused, format!("a released CUDA parameter: {what} is refused"));
        }
    }
    // A training step of plain candle on the composed kernels and on the fused ones.
    for &size in &settings.models {
        let s = setup(size, args);
        let outcome = (|| -> Result<(f64, f64)> {
            let (snapshot, numel) = llama_snapshot(&s.config)?;
            sec.info(describe(&s, numel));
            let task = BigramTask::new(s.config.vocab_size, 0.1, 7);
            let mut rng = Rng::new(11);
            let batches = (0..settings.warmup + settings.steps)
                .map(|_| task.batch(&mut rng, s.batch, s.seq_len, &Device::Cpu))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let run = |kernels| -> Result<Timed> {
                let config = LlamaConfig { kernels, ..s.config.clone() };
                time_plain(&config, &snapshot, &batches, settings.warmup, &dev)
            };
            let (composed, fused) = (run(Kernels::Composed)?, run(Kernels::Fused)?);
            Ok((median(&composed.times), median(&fused.times)))
        })();
        if let Some((composed, fused)) = sec.check_result(format!("{} step time", s.name), outcome) {
            sec.figure(
                &format!("step time {} plain candle, f32", s.name),
                format!("composed {composed:.2} ms, fused {fused:.2} ms: fused / composed {:.3}", fused / composed),
            );
        }
    }
    Ok(())
}
