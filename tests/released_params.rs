//! A parameter tensor that outlives the scope it was gathered for: kept from
//! `summon_full_params`, `summon_units`, a `Unit::run` closure, a training or inference
//! forward. Every way of using it afterwards either gives the right values or returns an
//! error; none reads freed memory, none panics, and training goes on exactly as if
//! nothing had been kept (checked against one process).
//!
//! The candle sweep runs candle's tensor operations, as a user would call them, on a
//! released parameter: each returns an error (or, for a view, a tensor that in turn
//! cannot be read). A crash here kills the test binary, a panic is caught and named.

use fsdp_testkit as common;

use candle_core::{DType, IndexOp, Module, Tensor};
use candle_fsdp::{launch, Fsdp, FsdpConfig, LaunchOptions, ShardingStrategy, SummonOptions};
use candle_nn::{Optimizer, SGD};
use common::fsdp_test_models::NestedWrappedModule as Nested;
use common::{build, Snapshot};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

const LR: f64 = 0.1;

fn input(rank: usize) -> Tensor {
    common::rand(1 + rank as u64, &[4, 8])
}

/// What happened when an operation ran on a kept tensor.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// It returned values.
    Values(Vec<f32>),
    /// It returned an error.
    Refused,
}

/// Runs `op` on `kept`, catching a panic (a failure of the test, naming the operation).
fn outcome(what: &str, op: impl FnOnce() -> candle_core::Result<Tensor>) -> Outcome {
    match catch_unwind(AssertUnwindSafe(op)) {
        Err(_) => panic!("{what}: panicked"),
        Ok(Err(_)) => Outcome::Refused,
        Ok(Ok(t)) => match catch_unwind(AssertUnwindSafe(|| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>())) {
            Err(_) => panic!("{what}: reading the result panicked"),
            Ok(Err(_)) => Outcome::Refused,
            Ok(Ok(values)) => Outcome::Values(values),
        },
    }
}

/// The two uses of a kept weight `w` (out × in) the tests make: as a matmul (what a
/// layer does) and as a read. Both must give what `expected` (the parameter's true
/// value, or `None` when a refusal is what is expected) says.
fn check_uses(what: &str, w: &Tensor, expected: Option<&Tensor>) {
    let x = common::rand(99, &[3, w.dim(1).unwrap()]);
    let product = outcome(&format!("{what}: x.matmul(w.t())"), || x.matmul(&w.t()?));
    let read = outcome(&format!("{what}: w.to_vec"), || Ok(w.clone()));
    match expected {
        None => {
            assert_eq!(product, Outcome::Refused, "{what}: matmul");
            assert_eq!(read, Outcome::Refused, "{what}: read");
        }
        Some(value) => {
            let want = x.matmul(&value.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(product, Outcome::Values(want), "{what}: matmul");
            assert_eq!(read, Outcome::Values(value.flatten_all().unwrap().to_vec1().unwrap()), "{what}: read");
        }
    }
}

/// One process: an SGD step of the global batch of `world` from `snapshot`.
fn reference(snapshot: &Snapshot, world: usize) -> BTreeMap<String, Tensor> {
    let (model, var_map, _) = build(Some(snapshot), DType::F32, Nested::new).unwrap();
    let vars = var_map.data().lock().unwrap().clone();
    let inputs: Vec<Tensor> = (0..world).map(input).collect();
    let loss = (model.forward(&Tensor::cat(&inputs, 0).unwrap()).unwrap().sum_all().unwrap() / world as f64).unwrap();
    SGD::new(vars.values().cloned().collect(), LR).unwrap().step(&loss.backward().unwrap()).unwrap();
    vars.into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect()
}

/// The configurations the escape routes run under: every strategy, and hybrid sharding.
fn configurations(world: usize) -> Vec<(String, FsdpConfig)> {
    let mut configs: Vec<(String, FsdpConfig)> =
        ShardingStrategy::ALL.iter().map(|&s| (s.to_string(), FsdpConfig::default().strategy(s))).collect();
    if world > 1 {
        configs.push(("hybrid, groups of 1".into(), FsdpConfig::default().hybrid_shard(1)));
    }
    configs
}

/// Every escape route, at world 1 and 2 under every configuration: the kept tensors are
/// used after their units were released, the rank trains a step, which must equal one
/// process's step (nothing kept corrupted a gather), and the kept tensors are used again.
/// Without sharding the full values stay in memory, so there a kept tensor keeps the
/// values it was gathered with; otherwise it is refused.
#[test]
fn kept_parameters_give_values_or_errors_and_training_goes_on() {
    let (_, _, snapshot) = build(None, DType::F32, Nested::new).unwrap();
    for world in [1, 2] {
        let expected = reference(&snapshot, world);
        for (name, config) in configurations(world) {
            let what = format!("{world} ranks, {name}");
            let keeps_values = config.strategy == ShardingStrategy::NoShard;
            // What a kept parameter `fqn` gives once its unit is released.
            let after_release = |fqn: &str| keeps_values.then(|| snapshot.0[fqn].clone());
            let trained = launch(LaunchOptions::new(world), |ctx| {
                let (model, _, _) = build(Some(&snapshot), DType::F32, Nested::new)?;
                let fsdp = Fsdp::wrap(model, ctx.comm.clone(), config)?;
                let mut kept: Vec<(String, &str, Tensor)> = Vec::new();

                // A root parameter returned from summon_full_params, as is and as a view.
                let (w, wt) = fsdp.summon_full_params(|m| {
                    let w = m.module.0.weight().clone();
                    let wt = w.t().unwrap();
                    (w, wt)
                })?;
                kept.push(("returned from summon_full_params".into(), "module.0.weight", w));
                kept.push(("a view returned from summon_full_params".into(), "module.0.weight", wt.t()?));

                // A nested unit's parameter, kept through a Unit::run closure in summon.
                let mut inner = None;
                fsdp.summon_full_params(|m| {
                    m.module.2.run(common::rand(7, &[1, 16]), |linear, x| {
                        inner = Some(linear.weight().clone());
                        linear.forward(&x)
                    })
                })??;
                kept.push(("kept in a Unit::run closure".into(), "module.2.weight", inner.expect("ran")));

                // summon_units' parameters.
                for (fqn, t) in fsdp.summon_units(SummonOptions::default(), |_, params| params.to_vec())?.concat() {
                    if t.rank() == 2 {
                        kept.push((format!("`{fqn}` from summon_units"), "", t));
                    }
                }
                for (route, fqn, t) in &kept {
                    let fqn = if fqn.is_empty() { route.split('`').nth(1).unwrap() } else { fqn };
                    check_uses(&format!("{what}: {route}"), t, after_release(fqn).as_ref());
                }

                // forward_inference returning a parameter: the returned tensor is the
                // caller's, with the values.
                let returned = fsdp.forward_inference(|m| m.module.0.weight().t())?;
                check_uses(
                    &format!("{what}: returned by forward_inference"),
                    &returned.t()?,
                    Some(&snapshot.0["module.0.weight"]),
                );

                // A training forward that keeps a nested weight on the side and returns a
                // root weight beside its output.
                let mut side = None;
                let x = input(ctx.rank);
                let (out, root_w) = fsdp.forward(|m| {
                    let y = m.module.1.forward(&m.module.0.forward(&x)?)?;
                    let y = m.module.2.run(y, |linear, y| {
                        side = Some(linear.weight().clone());
                        linear.forward(&y)
                    })?;
                    Ok((m.module.3.forward(&y)?, m.module.3.weight().clone()))
                })?;
                let side = side.expect("ran");
                check_uses(
                    &format!("{what}: returned by a training forward"),
                    &root_w,
                    Some(&snapshot.0["module.3.weight"]),
                );
                if config.strategy == ShardingStrategy::FullShard {
                    // Released after its forward, until its backward gathers it again.
                    check_uses(&format!("{what}: kept in a training forward"), &side, None);
                }
                kept.push(("kept in a training forward".into(), "module.2.weight", side));
                let grads = fsdp.backward(&out.sum_all()?)?;
                SGD::new(fsdp.parameters(), LR)?.step(&grads)?;
                drop(out);

                // After the step, the kept tensors still give what they gave.
                for (route, fqn, t) in &kept {
                    let fqn = if fqn.is_empty() { route.split('`').nth(1).unwrap() } else { fqn };
                    check_uses(&format!("{what}: {route}, after a step"), t, after_release(fqn).as_ref());
                }
                Ok(fsdp.full_parameters()?.into_iter().collect::<BTreeMap<_, _>>())
            })
            .unwrap();
            for (rank, params) in trained.iter().enumerate() {
                assert_eq!(params.len(), expected.len());
                for (fqn, value) in params {
                    common::assert_close(value, &expected[fqn], 1e-6, 1e-5, &format!("{what}: rank {rank}'s `{fqn}`"));
                }
            }
        }
    }
}

/// candle's operations on a released parameter, as a user would call them: each is
/// refused (the result, if any, cannot be read either); none panics or reads freed memory.
#[test]
fn candle_refuses_every_operation_on_a_released_parameter() {
    let (_, _, snapshot) = build(None, DType::F32, Nested::new).unwrap();
    let ranks = launch(LaunchOptions::new(1), |ctx| {
        let (model, _, _) = build(Some(&snapshot), DType::F32, Nested::new)?;
        let fsdp = Fsdp::wrap(model, ctx.comm.clone(), FsdpConfig::default())?;
        let (w, b) = fsdp.summon_full_params(|m| (m.module.0.weight().clone(), m.module.0.bias().unwrap().clone()))?;
        Ok((w, b))
    })
    .unwrap();
    let (w, b) = &ranks[0];
    // w: (4, 8), b: (4,), both released.
    let x = common::rand(5, &[3, 8]);
    let ids = Tensor::new(&[0u32, 2, 3], &candle_core::Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u8; 8]; 4], &candle_core::Device::Cpu).unwrap();
    type Op<'a> = (&'static str, Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>);
    let ops: Vec<Op> = vec![
        ("matmul", Box::new(|| x.matmul(&w.t()?))),
        ("matmul of two released", Box::new(|| w.matmul(&w.t()?))),
        ("broadcast_matmul", Box::new(|| x.unsqueeze(0)?.broadcast_matmul(&w.t()?))),
        ("Linear", Box::new(|| candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x))),
        ("Embedding", Box::new(|| candle_nn::Embedding::new(w.clone(), 8).forward(&ids))),
        ("add", Box::new(|| w + w)),
        ("broadcast_add", Box::new(|| x.broadcast_add(&w.i(0)?))),
        ("broadcast_mul", Box::new(|| w.broadcast_mul(b.unsqueeze(1)?.as_ref()))),
        ("sub", Box::new(|| w - 1.0)),
        ("div", Box::new(|| w / 2.0)),
        ("affine", Box::new(|| w.affine(2.0, 1.0))),
        ("exp", Box::new(|| w.exp())),
        ("log", Box::new(|| w.log())),
        ("tanh", Box::new(|| w.tanh())),
        ("sqr", Box::new(|| w.sqr())),
        ("sqrt", Box::new(|| w.sqrt())),
        ("abs", Box::new(|| w.abs())),
        ("neg", Box::new(|| w.neg())),
        ("recip", Box::new(|| w.recip())),
        ("relu", Box::new(|| w.relu())),
        ("silu", Box::new(|| w.silu())),
        ("gelu", Box::new(|| w.gelu())),
        ("gelu_erf", Box::new(|| w.gelu_erf())),
        ("powf", Box::new(|| w.powf(2.0))),
        ("elu", Box::new(|| w.elu(1.0))),
        ("clamp", Box::new(|| w.clamp(-1f32, 1f32))),
        ("maximum", Box::new(|| w.maximum(0f32))),
        ("sum_all", Box::new(|| w.sum_all())),
        ("sum_keepdim", Box::new(|| w.sum_keepdim(1))),
        ("mean", Box::new(|| w.mean(0))),
        ("max_keepdim", Box::new(|| w.max_keepdim(1))),
        ("argmax", Box::new(|| w.argmax(1))),
        ("cmp", Box::new(|| w.ge(0f64))),
        ("eq", Box::new(|| w.eq(w))),
        ("where_cond", Box::new(|| mask.where_cond(w, w))),
        ("where_cond on a kept mask", Box::new(|| w.where_cond(w, w))),
        ("index_select", Box::new(|| w.index_select(&ids, 0))),
        ("gather", Box::new(|| w.gather(&Tensor::zeros((4, 2), DType::U32, &candle_core::Device::Cpu)?, 1))),
        ("to_dtype bf16", Box::new(|| w.to_dtype(DType::BF16))),
        ("to_dtype f16", Box::new(|| w.to_dtype(DType::F16))),
        ("to_dtype f64", Box::new(|| w.to_dtype(DType::F64))),
        ("to_dtype u32", Box::new(|| w.to_dtype(DType::U32))),
        ("contiguous of a transpose", Box::new(|| w.t()?.contiguous())),
        ("copy", Box::new(|| w.copy())),
        ("detach", Box::new(|| Ok(w.detach()))),
        ("to_device", Box::new(|| w.to_device(&candle_core::Device::Cpu))),
        ("cat", Box::new(|| Tensor::cat(&[w, w], 0))),
        ("cat with a live tensor", Box::new(|| Tensor::cat(&[&x, w], 0))),
        ("cat along columns", Box::new(|| Tensor::cat(&[w, w], 1))),
        ("stack", Box::new(|| Tensor::stack(&[w, w], 0))),
        ("narrow", Box::new(|| w.narrow(1, 2, 3)?.contiguous())),
        ("reshape", Box::new(|| w.reshape((8, 4)))),
        ("pad_with_zeros", Box::new(|| w.pad_with_zeros(1, 1, 1))),
        ("pad_with_same", Box::new(|| w.pad_with_same(1, 1, 1))),
        ("repeat", Box::new(|| w.repeat((2, 1)))),
        ("broadcast_as", Box::new(|| w.broadcast_as((2, 4, 8))?.contiguous())),
        ("softmax_last_dim", Box::new(|| candle_nn::ops::softmax_last_dim(w))),
        ("softmax", Box::new(|| candle_nn::ops::softmax(w, 1))),
        ("sigmoid", Box::new(|| candle_nn::ops::sigmoid(w))),
        (
            "rms_norm",
            Box::new(|| candle_nn::ops::rms_norm(w, &Tensor::ones(8, DType::F32, &candle_core::Device::Cpu)?, 1e-5)),
        ),
        ("rms_norm with a kept weight", Box::new(|| candle_nn::ops::rms_norm(&x, &w.i(0)?, 1e-5))),
        ("layer_norm", Box::new(|| candle_nn::ops::layer_norm(&x, &w.i(0)?, &w.i(1)?, 1e-5))),
        ("log_sum_exp", Box::new(|| w.log_sum_exp(1))),
        ("cumsum", Box::new(|| w.cumsum(1))),
        ("arg_sort", Box::new(|| w.arg_sort_last_dim(true))),
        (
            "conv1d",
            Box::new(|| x.unsqueeze(0)?.conv1d(&w.unsqueeze(2)?.narrow(0, 0, 3)?.reshape((3, 1, 4))?, 0, 1, 1, 1)),
        ),
        (
            "slice_set into it",
            Box::new(|| {
                w.slice_set(&Tensor::zeros((1, 8), DType::F32, &candle_core::Device::Cpu)?, 0, 0)?;
                Ok(w.clone())
            }),
        ),
        (
            "slice_set from it",
            Box::new(|| {
                let target = Tensor::zeros((8, 8), DType::F32, &candle_core::Device::Cpu)?;
                target.slice_set(w, 0, 0)?;
                Ok(w.clone())
            }),
        ),
        ("slice_scatter", Box::new(|| x.slice_scatter0(&w.narrow(0, 0, 3)?, 0))),
        ("index_add", Box::new(|| w.index_add(&ids, &x, 0))),
        (
            "scatter_add",
            Box::new(|| w.scatter_add(&Tensor::zeros((4, 8), DType::U32, &candle_core::Device::Cpu)?, w, 1)),
        ),
        (
            "backward",
            Box::new(|| {
                let v = candle_core::Var::from_tensor(&x.narrow(0, 0, 1)?.broadcast_as((4, 8))?.contiguous()?)?;
                let grads = (v.as_tensor() * w)?.sum_all()?.backward()?;
                Ok(grads.get(v.as_tensor()).cloned().unwrap_or(x.clone()))
            }),
        ),
        ("Var::from_tensor", Box::new(|| Ok(candle_core::Var::from_tensor(w)?.as_tensor().clone()))),
        ("to_vec2", Box::new(|| Tensor::new(w.to_vec2::<f32>()?, &candle_core::Device::Cpu))),
        ("to_scalar", Box::new(|| Tensor::new(w.i((0, 0))?.to_scalar::<f32>()?, &candle_core::Device::Cpu))),
        (
            "write_npy",
            Box::new(|| {
                let dir = tempfile::tempdir()?;
                w.write_npy(dir.path().join("w.npy"))?;
                Ok(w.clone())
            }),
        ),
    ];
    for (what, op) in &ops {
        assert_eq!(outcome(what, op), Outcome::Refused, "{what} on a released parameter");
    }
    // Printing one does not read it either.
    let printed = catch_unwind(AssertUnwindSafe(|| format!("{w:?}")));
    assert!(printed.is_ok(), "Debug of a released parameter panicked");
}
