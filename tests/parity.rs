//! Parity with a single-process reference: the port of PyTorch's `TestParityWithDDP`
//! (`test/distributed/fsdp/test_fsdp_core.py`).
//!
//! For each model and world size, one `#[test]` trains the model under FSDP for every
//! configuration (sharding strategy × backward prefetch × forward prefetch, 18 in all) and
//! compares it with a reference trained once, in one process, on the global batch:
//!
//! - every step's loss: FSDP's is the average over ranks of the ranks' local losses; the
//!   reference's is the loss of the global batch, `(1/W) · Σ_r loss_r(batch_r)`, since FSDP
//!   averages the gradients over ranks (DDP's semantics);
//! - every trained parameter at the end, gathered with `full_parameters()` on every rank,
//!   by FQN against the reference's `VarMap` (tied parameters appear once, buffers not at
//!   all).
//!
//! PyTorch compares only the last loss after 2 steps; here every loss of 3 steps is checked.
//! The optimizer is SGD with momentum (lr 1e-2, momentum 0.9), as in PyTorch's helper, since
//! Adam's scale invariance would hide gradient-scaling errors. Tolerances are PyTorch's fp32
//! defaults (atol 1e-5, rtol 1.3e-6). Every model copy (the reference and each rank's) is
//! built from one snapshot, since candle's CPU generator cannot be seeded.
//!
//! Models and inputs follow `common_fsdp.py`:
//! - `NestedWrappedModule` and `AlwaysWrapNestedWrappedModule`: input `rand(4, 8)` seeded
//!   with `1 + rank` (different per rank, the same every step), loss `output.sum()`;
//! - `TransformerWithSharedParams` (with BatchNorm): `get_input` (the same on every rank)
//!   and the summed cross-entropy `get_loss`.

use fsdp_testkit as common;

use candle_core::{DType, Device, Module, Tensor};
use candle_fsdp::optim::{SgdMomentum, SgdMomentumConfig};
use candle_fsdp::{launch, BackwardPrefetch, Fsdp, FsdpConfig, LaunchOptions, ShardableModel, ShardingStrategy};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use common::{assert_close, build, Snapshot, F32_ATOL, F32_RTOL};
use fsdp_testkit::fsdp_test_models::{AlwaysWrapNestedWrappedModule, NestedWrappedModule, TransformerWithSharedParams};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Instant;

const STEPS: usize = 3;
const OPTIMIZER: SgdMomentumConfig = SgdMomentumConfig { lr: 1e-2, momentum: 0.9 };

/// One FSDP configuration of the sweep.
#[derive(Clone, Copy, Debug)]
struct Config {
    strategy: ShardingStrategy,
    backward_prefetch: BackwardPrefetch,
    forward_prefetch: bool,
}

impl Config {
    /// Every combination: 3 strategies × 3 backward prefetch modes × forward prefetch off/on.
    fn all() -> Vec<Config> {
        let mut configs = Vec::new();
        for strategy in ShardingStrategy::ALL {
            for backward_prefetch in BackwardPrefetch::ALL {
                for forward_prefetch in [false, true] {
                    configs.push(Config { strategy, backward_prefetch, forward_prefetch });
                }
            }
        }
        configs
    }

    fn fsdp(self) -> FsdpConfig {
        FsdpConfig::default()
            .strategy(self.strategy)
            .backward_prefetch(self.backward_prefetch)
            .forward_prefetch(self.forward_prefetch)
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "strategy {}, backward prefetch {}, forward prefetch {}",
            self.strategy.name(),
            self.backward_prefetch.name(),
            if self.forward_prefetch { "on" } else { "off" }
        )
    }
}

/// A model of the parity tests: how to build it, which `VarMap` entries are buffers, and
/// its losses under FSDP and in the reference (the frozen-parameter tests train them too).
pub(crate) trait ParityModel: ShardableModel + Sized {
    const NAME: &'static str;
    /// `VarMap` entries that are buffers, not trained parameters.
    const BUFFERS: &'static [&'static str];

    fn construct(vb: VarBuilder) -> candle_core::Result<Self>;

    /// Rank `rank`'s local loss, run through the wrapped model.
    fn fsdp_loss(fsdp: &Fsdp<Self>, rank: usize) -> candle_fsdp::Result<Tensor>;

    /// The loss of the global batch of `world` ranks, `(1/W) · Σ_r loss_r(batch_r)`, on
    /// the plain model.
    fn reference_loss(&self, world: usize) -> candle_core::Result<Tensor>;
}

/// `NestedWrappedModule`'s input on rank `rank`: `rand(4, 8)` seeded with `1 + rank`.
fn nested_input(rank: usize) -> Tensor {
    common::rand(1 + rank as u64, &[4, 8])
}

/// The global batch of `world` ranks (their inputs stacked), summed and divided by `world`.
fn nested_reference_loss(model: &impl Module, world: usize) -> candle_core::Result<Tensor> {
    let inputs: Vec<Tensor> = (0..world).map(nested_input).collect();
    let global = Tensor::cat(&inputs, 0)?;
    model.forward(&global)?.sum_all()? / world as f64
}

impl ParityModel for NestedWrappedModule {
    const NAME: &'static str = "NestedWrappedModule";
    const BUFFERS: &'static [&'static str] = &[];

    fn construct(vb: VarBuilder) -> candle_core::Result<Self> {
        NestedWrappedModule::new(vb)
    }

    fn fsdp_loss(fsdp: &Fsdp<Self>, rank: usize) -> candle_fsdp::Result<Tensor> {
        let x = nested_input(rank);
        Ok(fsdp.forward(|m| m.forward(&x))?.sum_all()?)
    }

    fn reference_loss(&self, world: usize) -> candle_core::Result<Tensor> {
        nested_reference_loss(self, world)
    }
}

impl ParityModel for AlwaysWrapNestedWrappedModule {
    const NAME: &'static str = "AlwaysWrapNestedWrappedModule";
    const BUFFERS: &'static [&'static str] = &[];

    fn construct(vb: VarBuilder) -> candle_core::Result<Self> {
        AlwaysWrapNestedWrappedModule::new(vb)
    }

    fn fsdp_loss(fsdp: &Fsdp<Self>, rank: usize) -> candle_fsdp::Result<Tensor> {
        let x = nested_input(rank);
        Ok(fsdp.forward(|m| m.forward(&x))?.sum_all()?)
    }

    fn reference_loss(&self, world: usize) -> candle_core::Result<Tensor> {
        nested_reference_loss(self, world)
    }
}

impl ParityModel for TransformerWithSharedParams {
    const NAME: &'static str = "TransformerWithSharedParams";
    const BUFFERS: &'static [&'static str] = &["vocab_bias", "long_buffer", "bn.running_mean", "bn.running_var"];

    fn construct(vb: VarBuilder) -> candle_core::Result<Self> {
        TransformerWithSharedParams::new(true, vb)
    }

    fn fsdp_loss(fsdp: &Fsdp<Self>, _rank: usize) -> candle_fsdp::Result<Tensor> {
        let (src, tgt) = TransformerWithSharedParams::get_input(&Device::Cpu)?;
        let out = fsdp.forward(|m| m.forward(&src, &tgt))?;
        Ok(TransformerWithSharedParams::get_loss(&tgt, &out)?)
    }

    /// Every rank's batch is `get_input`, so the global batch's mean loss is that batch's
    /// loss. (The batch cannot be stacked: `bn` has one channel per batch element.)
    fn reference_loss(&self, _world: usize) -> candle_core::Result<Tensor> {
        let (src, tgt) = TransformerWithSharedParams::get_input(&Device::Cpu)?;
        let out = self.forward(&src, &tgt)?;
        TransformerWithSharedParams::get_loss(&tgt, &out)
    }
}

/// What one training run ends with.
struct Trained {
    /// The loss of every step.
    losses: Vec<f64>,
    /// Trained parameters by FQN.
    params: BTreeMap<String, Tensor>,
}

fn scalar(loss: &Tensor) -> candle_core::Result<f64> {
    loss.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// The single-process reference on the global batch of `world` ranks.
fn train_reference<M: ParityModel>(snapshot: &Snapshot, world: usize) -> candle_core::Result<Trained> {
    let (model, var_map, _) = build(Some(snapshot), DType::F32, M::construct)?;
    let mut opt = SgdMomentum::new(var_map.all_vars(), OPTIMIZER)?;
    let mut losses = Vec::with_capacity(STEPS);
    for _ in 0..STEPS {
        let loss = model.reference_loss(world)?;
        losses.push(scalar(&loss)?);
        opt.step(&loss.backward()?)?;
    }
    Ok(Trained { losses, params: trained_vars::<M>(&var_map) })
}

/// The `VarMap`'s entries that are trained parameters (buffers left out).
fn trained_vars<M: ParityModel>(var_map: &VarMap) -> BTreeMap<String, Tensor> {
    let data = var_map.data().lock().expect("VarMap lock");
    let names: BTreeSet<&String> = data.keys().collect();
    for buffer in M::BUFFERS {
        assert!(names.contains(&buffer.to_string()), "{}: the VarMap has no buffer `{buffer}`", M::NAME);
    }
    data.iter()
        .filter(|(name, _)| !M::BUFFERS.contains(&name.as_str()))
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect()
}

/// Trains under FSDP on `world` ranks; every rank's losses and full parameters.
fn train_fsdp<M: ParityModel>(snapshot: &Snapshot, world: usize, config: Config) -> candle_fsdp::Result<Vec<Trained>> {
    launch(LaunchOptions::new(world), |ctx| {
        let (model, _, _) = build(Some(snapshot), DType::F32, M::construct)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), config.fsdp())?;
        let mut opt = SgdMomentum::new(fsdp.parameters(), OPTIMIZER)?;
        let mut losses = Vec::with_capacity(STEPS);
        for _ in 0..STEPS {
            let loss = M::fsdp_loss(&fsdp, ctx.rank)?;
            losses.push(scalar(&loss)?);
            let grads = fsdp.backward(&loss)?;
            opt.step(&grads)?;
        }
        let full = fsdp.full_parameters()?;
        let mut params = BTreeMap::new();
        for (name, value) in full {
            let rank = ctx.rank;
            if params.insert(name.clone(), value).is_some() {
                panic!("rank {rank}: full_parameters() lists `{name}` twice");
            }
        }
        Ok(Trained { losses, params })
    })
}

/// The largest `|actual - expected|`, for reporting how close parity is.
fn max_abs_diff(actual: &Tensor, expected: &Tensor) -> f64 {
    (actual.to_dtype(DType::F64).unwrap() - expected.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Trains `M` under every configuration on `world` ranks and checks each against the
/// reference.
fn parity<M: ParityModel>(world: usize) {
    let started = Instant::now();
    let (_, _, snapshot) = build(None, DType::F32, M::construct).expect("build the model");
    let reference = train_reference::<M>(&snapshot, world).expect("train the reference");
    let expected_names: Vec<&String> = reference.params.keys().collect();
    let (mut worst_loss, mut worst_param) = (0f64, 0f64);

    for config in Config::all() {
        let what = format!("{} on {world} rank(s), {config}", M::NAME);
        let ranks =
            train_fsdp::<M>(&snapshot, world, config).unwrap_or_else(|e| panic!("{what}: training failed: {e}"));
        assert_eq!(ranks.len(), world, "{what}: results of {} ranks", ranks.len());

        for step in 0..STEPS {
            let average = ranks.iter().map(|r| r.losses[step]).sum::<f64>() / world as f64;
            let (actual, expected) = (
                Tensor::new(average, &Device::Cpu).unwrap(),
                Tensor::new(reference.losses[step], &Device::Cpu).unwrap(),
            );
            assert_close(&actual, &expected, F32_ATOL, F32_RTOL, &format!("{what}: loss of step {}", step + 1));
            worst_loss = worst_loss.max((average - reference.losses[step]).abs());
        }

        for (rank, trained) in ranks.iter().enumerate() {
            let names: Vec<&String> = trained.params.keys().collect();
            assert_eq!(
                names, expected_names,
                "{what}: rank {rank}'s full_parameters() names differ from the reference's trained parameters"
            );
            for (name, value) in &trained.params {
                let expected = &reference.params[name];
                assert_close(
                    value,
                    expected,
                    F32_ATOL,
                    F32_RTOL,
                    &format!("{what}: rank {rank}'s full parameter `{name}` after {STEPS} steps"),
                );
                worst_param = worst_param.max(max_abs_diff(value, expected));
            }
        }
    }
    eprintln!(
        "{} on {world} rank(s): {} configurations in {:.2?}; max |loss error| {worst_loss:.3e}, max |parameter error| {worst_param:.3e}",
        M::NAME,
        Config::all().len(),
        started.elapsed()
    );
}

macro_rules! parity_tests {
    ($($name:ident: $model:ty, $world:expr;)*) => {
        $(
            #[test]
            fn $name() {
                parity::<$model>($world);
            }
        )*
    };
}

parity_tests! {
    nested_wrapped_world_1: NestedWrappedModule, 1;
    nested_wrapped_world_2: NestedWrappedModule, 2;
    nested_wrapped_world_3: NestedWrappedModule, 3;
    nested_wrapped_world_4: NestedWrappedModule, 4;
    always_wrap_nested_world_1: AlwaysWrapNestedWrappedModule, 1;
    always_wrap_nested_world_2: AlwaysWrapNestedWrappedModule, 2;
    always_wrap_nested_world_3: AlwaysWrapNestedWrappedModule, 3;
    always_wrap_nested_world_4: AlwaysWrapNestedWrappedModule, 4;
    transformer_world_1: TransformerWithSharedParams, 1;
    transformer_world_2: TransformerWithSharedParams, 2;
    transformer_world_3: TransformerWithSharedParams, 3;
    transformer_world_4: TransformerWithSharedParams, 4;
}
