//! The pipeline stage backward on FSDP units (on a sharded stage): the input pass
//! computes the input gradients and no weight gradient, frees the gathered parameters,
//! and reduces nothing for units whose weight gradients it deferred; the weight pass
//! computes them and each unit is reduce-scattered as soon as its last gradient arrives.
//! Every gradient equals a plain candle backward's, averaged over ranks as FSDP does.

use candle_core::{DType, Module, Result, Tensor, Var};
use candle_fsdp::pipeline::{
    stage_backward, stage_backward_input, stage_backward_weight, GradAccumulator, StageContext, StageInput, StageLinear,
};
use candle_fsdp::{launch, Fsdp, FsdpConfig, LaunchOptions, Shardable, ShardingStrategy, TraceEvent, Unit};
use candle_nn::VarBuilder;
use std::collections::HashMap;

use common::{assert_close, build, Snapshot, F32_ATOL, F32_RTOL};
use fsdp_testkit as common;

const DIM: usize = 16;
const BATCH: usize = 8;
const WORLD: usize = 2;

/// Two units and a root layer, every layer a `StageLinear`; `net2` runs twice, so the
/// input pass defers its weight's work twice and the weight pass sums both uses.
#[derive(Shardable)]
struct StageMlp {
    net1: Unit<StageLinear>,
    net2: Unit<StageLinear>,
    head: StageLinear,
}

impl StageMlp {
    fn new(ctx: &StageContext, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            net1: Unit::new(StageLinear::build(ctx, DIM, DIM, vb.pp("net1"))?),
            net2: Unit::new(StageLinear::build(ctx, DIM, DIM, vb.pp("net2"))?),
            head: StageLinear::build(ctx, DIM, DIM, vb.pp("head"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.net1.forward(x)?.relu()?;
        let x = self.net2.forward(&x)?.relu()?;
        let x = self.net2.forward(&x)?.relu()?;
        self.head.forward(&x)
    }
}

/// The same function through candle-nn layers, for the reference.
fn reference_forward(values: &HashMap<String, Var>, x: &Tensor) -> Result<Tensor> {
    let linear = |name: &str| {
        candle_nn::Linear::new(
            values[&format!("{name}.weight")].as_tensor().clone(),
            Some(values[&format!("{name}.bias")].as_tensor().clone()),
        )
    };
    let x = linear("net1").forward(x)?.relu()?;
    let x = linear("net2").forward(&x)?.relu()?;
    let x = linear("net2").forward(&x)?.relu()?;
    linear("head").forward(&x)
}

fn input(rank: usize) -> Tensor {
    common::randn(10 + rank as u64, &[BATCH, DIM])
}

fn output_grad(rank: usize) -> Tensor {
    common::randn(20 + rank as u64, &[BATCH, DIM])
}

/// Per rank: the input gradient; and the parameter gradients averaged over ranks.
fn reference(snapshot: &Snapshot) -> (Vec<Tensor>, HashMap<String, Tensor>) {
    let values: HashMap<String, Var> =
        snapshot.0.iter().map(|(name, value)| (name.clone(), Var::from_tensor(value).unwrap())).collect();
    let mut input_grads = Vec::new();
    let mut summed: HashMap<String, Tensor> = HashMap::new();
    for rank in 0..WORLD {
        let x = Var::from_tensor(&input(rank)).unwrap();
        let out = reference_forward(&values, x.as_tensor()).unwrap();
        let grads = (out * output_grad(rank)).unwrap().sum_all().unwrap().backward().unwrap();
        input_grads.push(grads.get(x.as_tensor()).unwrap().clone());
        for (name, var) in &values {
            let grad = grads.get(var.as_tensor()).unwrap().clone();
            let total = match summed.remove(name) {
                Some(sum) => (sum + grad).unwrap(),
                None => grad,
            };
            summed.insert(name.clone(), total);
        }
    }
    let averaged = summed.into_iter().map(|(name, sum)| (name, (sum / WORLD as f64).unwrap())).collect();
    (input_grads, averaged)
}

/// Rank `rank`'s shard of a full gradient, as FSDP pads and splits it.
fn shard_of(full: &Tensor, rank: usize, world: usize) -> Tensor {
    let flat = full.flatten_all().unwrap();
    let len = flat.elem_count().div_ceil(world);
    let padding = len * world - flat.elem_count();
    let padded = if padding == 0 {
        flat
    } else {
        Tensor::cat(&[flat, Tensor::zeros(padding, DType::F32, &candle_core::Device::Cpu).unwrap()], 0).unwrap()
    };
    padded.narrow(0, rank * len, len).unwrap()
}

struct RankResult {
    input_grad: Tensor,
    shard_grads: Vec<(String, Tensor)>,
    reduced_in_input_pass: Vec<String>,
    reduced_in_weight_pass: Vec<String>,
    weight_matmuls_in_input_pass: usize,
    gathered_after_input_pass: usize,
    accumulator_entries: usize,
}

fn reduced_units(events: Vec<TraceEvent>) -> Vec<String> {
    events
        .into_iter()
        .filter_map(|e| match e {
            TraceEvent::ReduceGrads { unit, .. } => Some(unit),
            _ => None,
        })
        .collect()
}

fn run(strategy: ShardingStrategy, split: bool, snapshot: &Snapshot) -> Vec<RankResult> {
    launch(LaunchOptions::new(WORLD), |ctx| {
        let stage = StageContext::new();
        let (model, _, _) = build(Some(snapshot), DType::F32, |vb| StageMlp::new(&stage, vb))?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().strategy(strategy))?;
        stage.set_grad_sink(fsdp.pipelining().deferred_grad_sink());
        let x = Var::from_tensor(&input(ctx.rank))?;
        let out = fsdp.forward(|m| m.forward(x.as_tensor()))?;
        let grads = [Some(output_grad(ctx.rank))];
        let inputs = [StageInput::from(&x)];
        let mut acc = GradAccumulator::new();
        let (input_grads, reduced_in_input_pass, weight_matmuls_in_input_pass, gathered_after_input_pass);
        let mut reduced_in_weight_pass = Vec::new();
        if split {
            input_grads = stage_backward_input(&stage, &[out], Some(&grads), &inputs)?;
            weight_matmuls_in_input_pass = stage.counts().weight_matmuls;
            fsdp.pipelining().finish_input_pass()?;
            gathered_after_input_pass = fsdp.diagnostics().memory().gathered_bytes;
            reduced_in_input_pass = reduced_units(fsdp.diagnostics().take_trace());
            // The stage output is gone; the weight pass works from what the input pass kept.
            stage_backward_weight(&stage, &mut acc)?;
            reduced_in_weight_pass = reduced_units(fsdp.diagnostics().take_trace());
        } else {
            input_grads = stage_backward(&stage, &[out], Some(&grads), &inputs, &mut acc)?;
            weight_matmuls_in_input_pass = 0;
            gathered_after_input_pass = 0;
            reduced_in_input_pass = Vec::new();
        }
        let store = fsdp.pipelining().finish_backward()?;
        let shard_grads = fsdp
            .named_parameters()
            .into_iter()
            .map(|(name, shard)| (name, store.get(shard.as_tensor()).expect("every parameter has a gradient").clone()))
            .collect();
        Ok(RankResult {
            input_grad: input_grads[0].clone().expect("the input is a Var"),
            shard_grads,
            reduced_in_input_pass,
            reduced_in_weight_pass,
            weight_matmuls_in_input_pass,
            gathered_after_input_pass,
            accumulator_entries: acc.len(),
        })
    })
    .unwrap()
}

fn check(strategy: ShardingStrategy, split: bool) {
    let what = format!("{} {}", strategy.name(), if split { "input + weight passes" } else { "full stage backward" });
    let stage = StageContext::new();
    let (_, _, snapshot) = build(None, DType::F32, |vb| StageMlp::new(&stage, vb)).unwrap();
    let (input_grads, param_grads) = reference(&snapshot);
    let shard_world = if strategy == ShardingStrategy::NoShard { 1 } else { WORLD };
    for (rank, result) in run(strategy, split, &snapshot).into_iter().enumerate() {
        let what = format!("{what}, rank {rank}");
        assert_close(&result.input_grad, &input_grads[rank], F32_ATOL, F32_RTOL, &format!("{what}: input gradient"));
        assert_eq!(result.shard_grads.len(), 6, "{what}");
        for (name, grad) in &result.shard_grads {
            let expected = shard_of(&param_grads[name], if shard_world == 1 { 0 } else { rank }, shard_world);
            assert_close(grad, &expected, F32_ATOL, F32_RTOL, &format!("{what}: gradient of {name}"));
        }
        assert_eq!(result.accumulator_entries, 0, "{what}: FSDP parameters go to the sink, not the accumulator");
        if split {
            assert_eq!(result.weight_matmuls_in_input_pass, 0, "{what}: the input pass computed weight gradients");
            assert!(
                result.reduced_in_input_pass.is_empty(),
                "{what}: reduced before the weight pass: {:?}",
                result.reduced_in_input_pass
            );
            // Each unit is reduced as soon as the weight pass completes it; the root at the end.
            assert_eq!(result.reduced_in_weight_pass, ["net2", "net1"], "{what}");
            if strategy != ShardingStrategy::NoShard {
                assert_eq!(result.gathered_after_input_pass, 0, "{what}: gathered parameters kept for the weight pass");
            }
        }
    }
}

#[test]
fn input_and_weight_passes_on_fsdp_units_match_plain_candle() {
    for strategy in ShardingStrategy::ALL {
        check(strategy, true);
    }
}

#[test]
fn full_stage_backward_on_fsdp_units_matches_plain_candle() {
    for strategy in ShardingStrategy::ALL {
        check(strategy, false);
    }
}
