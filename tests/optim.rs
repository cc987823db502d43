//! The library's optimizers against independent references: `AdamW` against candle-nn's
//! `AdamW` bit for bit, and a state exported, imported into a fresh optimizer and
//! continued against the same optimizer never interrupted; `StepLr` survives serde.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_fsdp::optim::{AdamW, OptimizerState, ParamsAdamW, SgdMomentum, SgdMomentumConfig, StepLr};
use candle_nn::Optimizer;
use fsdp_testkit as common;

const PARAMS: ParamsAdamW = ParamsAdamW { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };

fn vars() -> Vec<Var> {
    [(0, vec![3, 4]), (1, vec![5]), (2, vec![2, 2])]
        .into_iter()
        .map(|(seed, shape)| Var::from_tensor(&common::randn(seed, &shape)).unwrap())
        .collect()
}

fn copies(vars: &[Var]) -> Vec<Var> {
    vars.iter().map(|v| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap()).collect()
}

/// Step `step`'s gradients; the second variable gets none every third step.
fn grads(vars: &[Var], step: usize) -> GradStore {
    let mut store = GradStore::default();
    for (i, var) in vars.iter().enumerate() {
        if i == 1 && step % 3 == 2 {
            continue;
        }
        let grad = common::randn(1000 + 10 * step as u64 + i as u64, var.dims());
        store.insert(var.as_tensor(), (grad * 3.0).unwrap());
    }
    store
}

fn bits(vars: &[Var]) -> Vec<Vec<u32>> {
    vars.iter()
        .map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect())
        .collect()
}

#[test]
fn adamw_equals_candle_nn_bit_for_bit() {
    let ours_vars = vars();
    let theirs_vars = copies(&ours_vars);
    let mut ours = AdamW::new(ours_vars.clone(), PARAMS).unwrap();
    let mut theirs = candle_nn::AdamW::new(theirs_vars.clone(), PARAMS).unwrap();
    for step in 0..8 {
        ours.step(&grads(&ours_vars, step)).unwrap();
        theirs.step(&grads(&theirs_vars, step)).unwrap();
        assert_eq!(bits(&ours_vars), bits(&theirs_vars), "after step {step}");
    }
    assert_eq!(ours.step_count(), 8);
}

/// PyTorch's SGD with momentum by hand: `buf = g` the first time, then
/// `buf = momentum * buf + g`, `p -= lr * buf`.
#[test]
fn sgd_momentum_follows_pytorch_by_hand() {
    let var = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
    let mut sgd = SgdMomentum::new(vec![var.clone()], SgdMomentumConfig { lr: 0.1, momentum: 0.9 }).unwrap();
    for grad in [[0.5f64, -1.0], [1.0, 1.0]] {
        let mut store = GradStore::default();
        store.insert(var.as_tensor(), Tensor::new(&grad, &Device::Cpu).unwrap());
        sgd.step(&store).unwrap();
    }
    // Step 1: buf = [0.5, -1], p = [0.95, 2.1]; step 2: buf = [1.45, 0.1], p = [0.805, 2.09].
    let got = var.as_tensor().to_vec1::<f64>().unwrap();
    assert!((got[0] - 0.805).abs() < 1e-15 && (got[1] - 2.09).abs() < 1e-15, "{got:?}");
}

/// A variable of 2.5 Mi elements is updated in pieces: the pieces meet without a seam.
#[test]
fn adamw_equals_candle_nn_on_a_variable_of_several_pieces() {
    let shape = [5 << 19];
    let ours_vars = vec![Var::from_tensor(&common::randn(7, &shape)).unwrap()];
    let theirs_vars = copies(&ours_vars);
    let mut ours = AdamW::new(ours_vars.clone(), PARAMS).unwrap();
    let mut theirs = candle_nn::AdamW::new(theirs_vars.clone(), PARAMS).unwrap();
    for step in 0..3 {
        let grad = (common::randn(100 + step, &shape) * 3.0).unwrap();
        let mut store = GradStore::default();
        store.insert(ours_vars[0].as_tensor(), grad.clone());
        ours.step(&store).unwrap();
        let mut store = GradStore::default();
        store.insert(theirs_vars[0].as_tensor(), grad);
        theirs.step(&store).unwrap();
        assert!(bits(&ours_vars) == bits(&theirs_vars), "after step {step}");
    }
}

/// `total` steps with `make`'s optimizer, exporting after `k` into a fresh optimizer on
/// copies of the variables, against the same steps uninterrupted.
fn resume_matches<O: Optimizer + OptimizerState>(make: impl Fn(Vec<Var>) -> O, k: usize, total: usize) {
    let vars = vars();
    let mut uninterrupted = make(vars.clone());
    let resumed_vars = copies(&vars);
    let mut first = make(resumed_vars.clone());
    for step in 0..k {
        uninterrupted.step(&grads(&vars, step)).unwrap();
        first.step(&grads(&resumed_vars, step)).unwrap();
    }
    // A new run: new variables holding the values, a new optimizer given the state.
    let fresh_vars = copies(&resumed_vars);
    let mut state = first.export_state().unwrap();
    for (var_state, fresh) in state.vars.iter_mut().zip(&fresh_vars) {
        var_state.var = fresh.clone();
        var_state.slots.values_mut().for_each(|t| *t = t.copy().unwrap());
    }
    drop(first);
    let mut second = make(fresh_vars.clone());
    second.import_state(state).unwrap();
    for step in k..total {
        uninterrupted.step(&grads(&vars, step)).unwrap();
        second.step(&grads(&fresh_vars, step)).unwrap();
    }
    assert_eq!(bits(&fresh_vars), bits(&vars));
}

#[test]
fn an_exported_state_continues_exactly() {
    resume_matches(|vars| AdamW::new(vars, PARAMS).unwrap(), 3, 7);
    // SGD's momentum buffer is absent until a variable's first gradient: resume before
    // the second variable's first one too.
    let sgd = SgdMomentumConfig { lr: 0.05, momentum: 0.9 };
    resume_matches(|vars| SgdMomentum::new(vars, sgd).unwrap(), 3, 6);
    resume_matches(|vars| SgdMomentum::new(vars, sgd).unwrap(), 0, 3);
}

#[test]
fn a_state_that_does_not_fit_is_refused_and_changes_nothing() {
    let vars = vars();
    let mut opt = AdamW::new(vars.clone(), PARAMS).unwrap();
    opt.step(&grads(&vars, 0)).unwrap();
    let before = opt.export_state().unwrap();
    let before_bits: Vec<Vec<u32>> = before
        .vars
        .iter()
        .map(|v| {
            v.slots["exp_avg"].flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
        })
        .collect();

    let mut wrong_shape = opt.export_state().unwrap();
    wrong_shape.vars[0].slots.insert("exp_avg".into(), Tensor::zeros(12, DType::F32, &Device::Cpu).unwrap());
    let message = opt.import_state(wrong_shape).unwrap_err().to_string();
    assert!(message.contains("exp_avg") && message.contains("[12]"), "{message}");

    let mut stranger = opt.export_state().unwrap();
    stranger.vars[1].var = Var::zeros(5, DType::F32, &Device::Cpu).unwrap();
    let message = opt.import_state(stranger).unwrap_err().to_string();
    assert!(message.contains("does not step"), "{message}");

    let mut no_step = opt.export_state().unwrap();
    no_step.scalars.remove("step");
    assert!(opt.import_state(no_step).unwrap_err().to_string().contains("`step`"));

    let after = opt.export_state().unwrap();
    for (v, want) in after.vars.iter().zip(&before_bits) {
        let got: Vec<u32> =
            v.slots["exp_avg"].flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect();
        assert_eq!(&got, want, "a refused import changed the state");
    }
    assert_eq!(opt.step_count(), 1);
}

#[test]
fn step_lr_round_trips_through_json() {
    let vars = vars();
    let mut opt = SgdMomentum::new(vars, SgdMomentumConfig { lr: 1.0, momentum: 0.0 }).unwrap();
    let mut scheduler = StepLr::new(2, 0.5);
    for _ in 0..3 {
        scheduler.step(&mut opt);
    }
    let mut restored: StepLr = serde_json::from_value(serde_json::to_value(scheduler).unwrap()).unwrap();
    assert_eq!(restored, scheduler);
    restored.step(&mut opt);
    assert_eq!((restored.last_epoch(), opt.learning_rate()), (4, 0.25));
}
