//! The Llama trained on the fused kernels against the same training on the composed
//! reference path (chains of candle's primitives), under FSDP on 2 ranks: 20 AdamW steps,
//! the loss of every step and every trained parameter equal up to f32 rounding. The ops
//! themselves are tested one by one against their composed references in `fused-ops`;
//! `model_math.rs` checks both paths against a plain-loop Llama and central differences.

use candle_core::{DType, Device, Tensor};
use candle_fsdp::models::llama::{Llama, LlamaConfig};
use candle_fsdp::models::Kernels;
use candle_fsdp::optim::{AdamW, ParamsAdamW};
use candle_fsdp::{launch, Fsdp, FsdpConfig, LaunchOptions};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use std::collections::{BTreeMap, HashMap};

const STEPS: usize = 20;

fn batch(step: usize, rank: usize, config: &LlamaConfig) -> (Tensor, Tensor) {
    let (b, s) = (3, 21);
    let token = |i: usize| ((i * 7919 + step * 104_729 + rank * 31) % config.vocab_size) as u32;
    let tokens: Vec<u32> = (0..b * (s + 1)).map(token).collect();
    let all = Tensor::from_vec(tokens, (b, s + 1), &Device::Cpu).unwrap();
    (all.narrow(1, 0, s).unwrap(), all.narrow(1, 1, s).unwrap())
}

/// Trains 20 steps at 2 ranks on `kernels`; every step's loss (rank 0's) and the trained
/// parameters.
fn train(kernels: Kernels, initial: &HashMap<String, Tensor>) -> (Vec<f32>, BTreeMap<String, Tensor>) {
    let config = LlamaConfig { kernels, num_key_value_heads: 2, max_position_embeddings: 32, ..LlamaConfig::default() };
    let ranks = launch(LaunchOptions::new(2), |ctx| {
        let model = Llama::new(&config, VarBuilder::from_tensors(initial.clone(), DType::F32, &Device::Cpu))?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let mut optimizer = AdamW::new(fsdp.parameters(), ParamsAdamW { lr: 3e-3, ..ParamsAdamW::default() })?;
        let mut losses = Vec::new();
        for step in 0..STEPS {
            let (inputs, targets) = batch(step, ctx.rank, &config);
            let loss = fsdp.forward(|m| m.loss(&inputs, &targets))?;
            losses.push(loss.to_scalar::<f32>()?);
            optimizer.step(&fsdp.backward(&loss)?)?;
        }
        Ok((losses, fsdp.full_parameters()?.into_iter().collect::<BTreeMap<_, _>>()))
    })
    .unwrap();
    ranks.into_iter().next().unwrap()
}

#[test]
fn twenty_steps_on_the_fused_kernels_equal_the_composed_path_up_to_rounding() {
    let var_map = VarMap::new();
    Llama::new(&LlamaConfig::default(), VarBuilder::from_varmap(&var_map, DType::F32, &Device::Cpu)).unwrap();
    let initial: HashMap<String, Tensor> =
        var_map.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap())).collect();
    let (fused_losses, fused) = train(Kernels::Fused, &initial);
    let (composed_losses, composed) = train(Kernels::Composed, &initial);
    for (step, (a, b)) in fused_losses.iter().zip(&composed_losses).enumerate() {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "step {step}: loss {a} fused, {b} composed");
    }
    assert!(fused_losses[STEPS - 1] < fused_losses[0] - 0.1, "it trains: {fused_losses:?}");
    for (fqn, value) in &fused {
        let reference = &composed[fqn];
        let difference = (value - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(difference <= 1e-4 * scale, "`{fqn}` differs by {difference} (scale {scale}) after {STEPS} steps");
    }
}
