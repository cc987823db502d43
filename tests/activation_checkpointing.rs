//! Activation checkpointing (`FsdpConfig::activation_checkpointing`): a checkpointed unit
//! keeps only its inputs after its forward and runs the forward again in backward.
//!
//! The results must be those of the same training without checkpointing, to the bit: on
//! the PyTorch test's `nn.Transformer` (encoder layers called through `Module::forward`, decoder
//! layers with two inputs through `Unit::run_fn`) and on the Llama model, at world sizes
//! 1-4 under every strategy and backward prefetch mode. Then what is refused: a
//! checkpointed unit called through a closure that cannot run again, and a forward that
//! computes other outputs the second time.

use fsdp_testkit as common;

use candle_core::{DType, Device, Module, Tensor};
use candle_fsdp::models::llama::{Llama, LlamaConfig};
use candle_fsdp::models::transformer::Transformer;
use candle_fsdp::optim::{SgdMomentum, SgdMomentumConfig};
use candle_fsdp::{
    launch, BackwardPrefetch, Fsdp, FsdpConfig, LaunchOptions, Shardable, ShardableModel, ShardingStrategy, TraceEvent,
    Unit,
};
use candle_nn::{Linear, Optimizer, VarBuilder};
use common::{build, Snapshot};
use std::collections::BTreeMap;

const STEPS: usize = 2;
const OPTIMIZER: SgdMomentumConfig = SgdMomentumConfig { lr: 1e-2, momentum: 0.9 };

struct Trained {
    losses: Vec<f32>,
    params: BTreeMap<String, Vec<f32>>,
    /// Per step, the units whose gathered parameters were freed after their forward and
    /// gathered again for their backward, in order.
    unshards: Vec<String>,
}

/// Trains on `world` ranks; `loss` runs one rank's forward and returns its loss.
fn train<M: ShardableModel>(
    snapshot: &Snapshot,
    world: usize,
    config: FsdpConfig,
    construct: impl Fn(VarBuilder) -> candle_core::Result<M> + Sync,
    loss: impl Fn(&Fsdp<M>, usize) -> candle_fsdp::Result<Tensor> + Sync,
) -> Vec<Trained> {
    launch(LaunchOptions::new(world), |ctx| {
        let (model, _, _) = build(Some(snapshot), DType::F32, &construct)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), config)?;
        let mut opt = SgdMomentum::new(fsdp.parameters(), OPTIMIZER)?;
        let mut losses = Vec::new();
        for _ in 0..STEPS {
            let l = loss(&fsdp, ctx.rank)?;
            losses.push(l.to_scalar::<f32>()?);
            opt.step(&fsdp.backward(&l)?)?;
        }
        let unshards = fsdp
            .diagnostics()
            .take_trace()
            .into_iter()
            .filter_map(|e| match e {
                TraceEvent::Unshard { unit, .. } => Some(unit),
                _ => None,
            })
            .collect();
        let params = fsdp
            .full_parameters()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.flatten_all()?.to_vec1::<f32>()?)))
            .collect::<candle_fsdp::Result<_>>()?;
        Ok(Trained { losses, params, unshards })
    })
    .unwrap()
}

/// Every world size, strategy and prefetch mode, with and without checkpointing: the
/// same bits.
fn bit_identical<M: ShardableModel>(
    name: &str,
    construct: impl Fn(VarBuilder) -> candle_core::Result<M> + Sync + Copy,
    loss: impl Fn(&Fsdp<M>, usize) -> candle_fsdp::Result<Tensor> + Sync + Copy,
) {
    let (_, _, snapshot) = build(None, DType::F32, construct).unwrap();
    for world in 1..=4 {
        for strategy in ShardingStrategy::ALL {
            for prefetch in BackwardPrefetch::ALL {
                let config = FsdpConfig::default().strategy(strategy).backward_prefetch(prefetch);
                let what = format!("{name}, world {world}, {strategy}, {prefetch}");
                let plain = train(&snapshot, world, config, construct, loss);
                let checkpointed = train(&snapshot, world, config.activation_checkpointing(true), construct, loss);
                for (rank, (p, c)) in plain.iter().zip(&checkpointed).enumerate() {
                    assert_eq!(p.losses, c.losses, "{what}: rank {rank}'s losses");
                    assert_eq!(p.params.len(), c.params.len());
                    for (fqn, values) in &p.params {
                        assert!(values == &c.params[fqn], "{what}: rank {rank}'s `{fqn}` differs");
                    }
                    // The same units are gathered, in the same order: the recompute uses
                    // the parameters its backward gathered, and prefetching is unchanged.
                    assert_eq!(p.unshards, c.unshards, "{what}: rank {rank}'s gathers");
                }
            }
        }
    }
}

#[test]
fn the_prefetch_test_transformer_trains_to_the_same_bits_with_every_layer_checkpointed() {
    const D_MODEL: usize = 16;
    let config = common::prefetch_test_fqns::prefetch_test_transformer_config(D_MODEL, 4, 32);
    let construct = |vb: VarBuilder| Transformer::new(&config, vb);
    let loss = |fsdp: &Fsdp<Transformer>, rank: usize| {
        let seed = rank as u64 + 1;
        let (src, tgt) = (common::randn(seed, &[6, 1, D_MODEL]), common::randn(seed + 100, &[5, 1, D_MODEL]));
        Ok(fsdp.forward(|m| m.forward(&src, &tgt))?.sqr()?.mean_all()?)
    };
    bit_identical("PyTorch test transformer", construct, loss);
}

fn llama_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 40,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        // Longer than the sequences: the rotary tables reach the layers whole and are cut
        // inside them, as in any real model (a table that became a variable of the recompute
        // once made candle's backward panic there).
        max_position_embeddings: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        initializer_range: 0.02,
        ..LlamaConfig::default()
    }
}

fn token_ids(seed: u64) -> Tensor {
    let u = common::rand(seed, &[2, 8]).flatten_all().unwrap().to_vec1::<f32>().unwrap();
    Tensor::from_vec(u.iter().map(|x| (x * 40.0) as u32 % 40).collect::<Vec<_>>(), (2, 8), &Device::Cpu).unwrap()
}

#[test]
fn llama_trains_to_the_same_bits_with_every_layer_checkpointed() {
    let config = llama_config();
    let construct = |vb: VarBuilder| Llama::new(&config, vb);
    let loss = |fsdp: &Fsdp<Llama>, rank: usize| {
        let ids = token_ids(rank as u64 + 7);
        let logits = fsdp.forward(|m| m.forward(&ids))?;
        Ok(candle_nn::loss::cross_entropy(&logits.flatten_to(1)?, &token_ids(rank as u64 + 70).flatten_all()?)?)
    };
    bit_identical("llama", construct, loss);
}

/// Two linear layers in one unit; `noise` adds a fresh random draw to the output, as an
/// unseeded dropout would.
#[derive(Shardable)]
struct Pair {
    a: Linear,
    b: Linear,
    #[fsdp(skip)]
    noise: bool,
}

impl Module for Pair {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.b.forward(&self.a.forward(x)?.tanh()?)?;
        if self.noise {
            &y + y.rand_like(0.0, 1e-3)?
        } else {
            Ok(y)
        }
    }
}

#[derive(Shardable)]
struct TwoUnits {
    first: Unit<Pair>,
    second: Unit<Pair>,
    #[fsdp(skip)]
    through_run: bool,
}

impl TwoUnits {
    fn new(noise: bool, through_run: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let pair = |vb: VarBuilder| -> candle_core::Result<Pair> {
            Ok(Pair { a: candle_nn::linear(4, 4, vb.pp("a"))?, b: candle_nn::linear(4, 4, vb.pp("b"))?, noise })
        };
        Ok(Self { first: Unit::new(pair(vb.pp("first"))?), second: Unit::new(pair(vb.pp("second"))?), through_run })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.first.forward(x)?;
        if self.through_run {
            self.second.run(x, |pair, x| pair.forward(&x))
        } else {
            self.second.forward(&x)
        }
    }
}

/// The error of one checkpointed training step of `TwoUnits`.
fn refused(noise: bool, through_run: bool) -> String {
    let errors = launch(LaunchOptions::new(2), |ctx| {
        let (model, _, _) = build(None, DType::F32, |vb| TwoUnits::new(noise, through_run, vb))?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default().activation_checkpointing(true))?;
        let x = common::rand(ctx.rank as u64, &[3, 4]);
        let step = || -> candle_fsdp::Result<()> {
            let loss = fsdp.forward(|m| m.forward(&x))?.sum_all()?;
            fsdp.backward(&loss)?;
            Ok(())
        };
        Ok(step().expect_err("refused").to_string())
    })
    .unwrap();
    errors[0].clone()
}

#[test]
fn a_forward_that_computes_other_outputs_the_second_time_is_refused() {
    let error = refused(true, false);
    assert!(error.contains("not deterministic") && error.contains("unit `second`"), "{error}");
}

#[test]
fn a_checkpointed_unit_called_through_a_closure_that_cannot_run_again_is_refused() {
    let error = refused(false, true);
    assert!(error.contains("Unit::run_fn") && error.contains("checkpointed"), "{error}");
}

/// Forwards of [`Counted`] run so far.
static COUNTED_FORWARDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Held by each test that counts, so that tests running in parallel do not mix counts.
static COUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A linear layer that counts its forwards.
#[derive(Shardable)]
struct Counted {
    linear: Linear,
}

impl Module for Counted {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        COUNTED_FORWARDS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.linear.forward(x)?.tanh()
    }
}

#[derive(Shardable)]
struct CountedModel {
    layers: Vec<Unit<Counted>>,
}

impl CountedModel {
    /// Three units of one counted layer each.
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let layers = (0..3)
            .map(|i| Ok(Unit::new(Counted { linear: candle_nn::linear(4, 4, vb.pp("layers").pp(i))? })))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { layers })
    }
}

#[test]
fn a_checkpointed_unit_runs_its_forward_again_in_backward_and_an_inference_forward_does_not() {
    let _counting = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let forwards = |config: FsdpConfig, train: bool| {
        let before = COUNTED_FORWARDS.load(std::sync::atomic::Ordering::SeqCst);
        launch(LaunchOptions::new(1), |ctx| {
            let (model, _, _) = build(None, DType::F32, CountedModel::new)?;
            let fsdp = Fsdp::wrap(model, ctx.comm.clone(), config)?;
            let x = common::rand(3, &[2, 4]);
            let run = |m: &CountedModel| m.layers.iter().try_fold(x.clone(), |x, l| l.forward(&x));
            if train {
                let loss = fsdp.forward(run)?.sum_all()?;
                fsdp.backward(&loss)?;
            } else {
                fsdp.forward_inference(run)?;
            }
            Ok(())
        })
        .unwrap();
        COUNTED_FORWARDS.load(std::sync::atomic::Ordering::SeqCst) - before
    };
    let checkpointing = FsdpConfig::default().activation_checkpointing(true);
    assert_eq!(forwards(FsdpConfig::default(), true), 3, "three units, one forward each");
    assert_eq!(forwards(checkpointing, true), 6, "each unit's forward again in its backward");
    assert_eq!(forwards(checkpointing, false), 3, "no recompute without a backward");
}

#[test]
fn units_chosen_by_name_are_checkpointed_and_only_they() {
    let _counting = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let forwards = |names: &[&str]| {
        let before = COUNTED_FORWARDS.load(std::sync::atomic::Ordering::SeqCst);
        let refusals = launch(LaunchOptions::new(1), |ctx| {
            let (model, _, _) = build(None, DType::F32, CountedModel::new)?;
            let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
            let refused = [
                fsdp.checkpoint_units(&["layers.7"]).expect_err("no such unit").to_string(),
                fsdp.checkpoint_units(&["<root>"]).expect_err("the root").to_string(),
            ];
            fsdp.checkpoint_units(names)?;
            let x = common::rand(3, &[2, 4]);
            let loss = fsdp.forward(|m| m.layers.iter().try_fold(x.clone(), |x, l| l.forward(&x)))?.sum_all()?;
            fsdp.backward(&loss)?;
            Ok(refused)
        })
        .unwrap();
        (COUNTED_FORWARDS.load(std::sync::atomic::Ordering::SeqCst) - before, refusals.into_iter().next().unwrap())
    };
    let (one, [unknown, root]) = forwards(&["layers.1"]);
    assert_eq!(one, 4, "three forwards and one recompute");
    assert!(unknown.contains("layers.7") && unknown.contains("no unit"), "{unknown}");
    assert!(root.contains("<root>") && root.contains("not the root"), "{root}");
    assert_eq!(forwards(&["layers.0", "layers.2"]).0, 5);
}

/// Two layers with a tanh between, as one unit.
#[derive(Shardable)]
struct Mlp {
    a: Linear,
    b: Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.b.forward(&self.a.forward(x)?.tanh()?)
    }
}

#[derive(Shardable)]
struct TwoMlps {
    layers: Vec<Unit<Mlp>>,
}

/// The profile of one training step of `TwoMlps` on a `(3, 4)` f32 input.
fn profile(checkpointing: bool) -> candle_fsdp::ActivationProfile {
    let profiles = launch(LaunchOptions::new(2), |ctx| {
        let (model, _, _) = build(None, DType::F32, |vb| {
            let mlp = |vb: VarBuilder| -> candle_core::Result<Unit<Mlp>> {
                Ok(Unit::new(Mlp { a: candle_nn::linear(4, 4, vb.pp("a"))?, b: candle_nn::linear(4, 4, vb.pp("b"))? }))
            };
            Ok(TwoMlps { layers: vec![mlp(vb.pp("layers.0"))?, mlp(vb.pp("layers.1"))?] })
        })?;
        let config = FsdpConfig::default().activation_checkpointing(checkpointing);
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), config)?;
        assert_eq!(fsdp.diagnostics().activation_profile(), None);
        fsdp.diagnostics().set_activation_profiling(true);
        let x = common::rand(ctx.rank as u64, &[3, 4]);
        let loss = fsdp.forward(|m| m.layers.iter().try_fold(x.clone(), |x, l| l.forward(&x)))?.sum_all()?;
        fsdp.backward(&loss)?;
        Ok(fsdp.diagnostics().activation_profile().expect("a profiled step"))
    })
    .unwrap();
    assert_eq!(profiles[0], profiles[1], "every rank keeps as much");
    profiles[0].clone()
}

/// Counted by hand from candle's ops, 3 x 4 f32 = 48 bytes each: a unit keeps the two
/// matmul results, the two bias sums and the tanh (5 x 48), and the hook on its output
/// (a sum of 48 bytes and a 4-byte zero); the root keeps its own output hook (52). The
/// weights (and their transposed views) are parameters, not activations.
#[test]
fn the_activation_profile_counts_what_each_unit_keeps_by_hand() {
    let plain = profile(false);
    let bytes: Vec<(&str, usize)> = plain.units.iter().map(|u| (u.unit.as_str(), u.bytes)).collect();
    assert_eq!(bytes, [("<root>", 52), ("layers.0", 6 * 48 + 4), ("layers.1", 6 * 48 + 4)]);
    // Checkpointed, a unit keeps only its output (the checkpoint node, 48) and the hook;
    // the second, whose input carries a gradient, also its input's tap and the anchor sum
    // (two 4-byte scalars).
    let checkpointed = profile(true);
    let bytes: Vec<usize> = checkpointed.units.iter().map(|u| u.bytes).collect();
    assert_eq!(bytes, [52, 48 + 48 + 4, 48 + 48 + 4 + 8]);
    assert!(checkpointed.total() * 2 < plain.total());
}

/// `CountedModel` with its units declared checkpointed on the model.
#[derive(Shardable)]
struct DeclaredCheckpoints {
    #[fsdp(checkpoint)]
    layers: Vec<Unit<Counted>>,
}

#[test]
fn units_declared_checkpointed_on_the_model_run_their_forward_again() {
    let _counting = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let before = COUNTED_FORWARDS.load(std::sync::atomic::Ordering::SeqCst);
    launch(LaunchOptions::new(2), |ctx| {
        let (model, _, _) =
            build(None, DType::F32, |vb| Ok(DeclaredCheckpoints { layers: CountedModel::new(vb)?.layers }))?;
        let layout = candle_fsdp::model::Layout::of(&model)?;
        assert_eq!(layout.units.iter().map(|u| u.checkpoint).collect::<Vec<_>>(), [false, true, true, true]);
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let x = common::rand(3, &[2, 4]);
        let loss = fsdp.forward(|m| m.layers.iter().try_fold(x.clone(), |x, l| l.forward(&x)))?.sum_all()?;
        fsdp.backward(&loss)?;
        Ok(())
    })
    .unwrap();
    let runs = COUNTED_FORWARDS.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(runs, 2 * 6, "two ranks, three units, each forward twice");
}

/// Nested units: an outer unit's share leaves out what the unit inside it keeps. Counted by
/// hand for `NestedWrappedModule` on a `(4, 8)` input (Linear layers without activations;
/// a linear keeps its matmul and its bias sum, each unit its output hook and a 4-byte
/// zero): the root 8→4 and 4→8 layers (2 x 64 + 2 x 128) and its hook (128 + 4); `module.1.0`
/// 4→16 (2 x 256) and its hook (256 + 4); `module.1` its own 16→16 layer (2 x 256) and
/// hook (256 + 4); `module.2` 16→4 (2 x 64) and hook (64 + 4).
#[test]
fn the_activation_profile_of_nested_units_counts_each_tensor_once() {
    let profiles = launch(LaunchOptions::new(1), |ctx| {
        let (model, _, _) = build(None, DType::F32, fsdp_testkit::fsdp_test_models::NestedWrappedModule::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        fsdp.diagnostics().set_activation_profiling(true);
        let x = common::rand(1, &[4, 8]);
        fsdp.backward(&fsdp.forward(|m| m.forward(&x))?.sum_all()?)?;
        Ok(fsdp.diagnostics().activation_profile().expect("a profiled step"))
    })
    .unwrap();
    let bytes: Vec<(&str, usize)> = profiles[0].units.iter().map(|u| (u.unit.as_str(), u.bytes)).collect();
    assert_eq!(bytes, [("<root>", 2 * 64 + 2 * 128 + 132), ("module.1.0", 772), ("module.1", 772), ("module.2", 196)]);
}
