//! What candle-fsdp's tests and examples share, not published: the models of PyTorch's
//! FSDP test suite ([`fsdp_test_models`]), the FQN lists of PyTorch's backward-prefetch test
//! ([`prefetch_test_fqns`]), reproducible model construction (candle's CPU generator cannot be
//! seeded, so a model is built once and its values copied into every other copy), seeded
//! inputs, tolerance checks, and a collectives wrapper that injects faults (a slow network,
//! a rank that dies at a chosen collective).

pub mod fsdp_test_models;
pub mod prefetch_test_fqns;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;

/// The values of every variable of a model, by FQN.
#[derive(Clone)]
pub struct Snapshot(pub HashMap<String, Tensor>);

impl Snapshot {
    pub fn of(var_map: &VarMap) -> Result<Self> {
        let data = var_map.data().lock().expect("VarMap lock");
        data.iter().map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?))).collect::<Result<_>>().map(Snapshot)
    }
}

/// Builds a model with `ctor`; when `snapshot` is given, overwrites every variable with
/// its value there, so every copy starts from the same parameters.
pub fn build<M>(
    snapshot: Option<&Snapshot>,
    dtype: DType,
    ctor: impl FnOnce(VarBuilder) -> Result<M>,
) -> Result<(M, VarMap, Snapshot)> {
    let var_map = VarMap::new();
    let model = ctor(VarBuilder::from_varmap(&var_map, dtype, &Device::Cpu))?;
    if let Some(snapshot) = snapshot {
        let data = var_map.data().lock().expect("VarMap lock");
        for (name, var) in data.iter() {
            let value = snapshot.0.get(name).unwrap_or_else(|| panic!("snapshot has no `{name}`"));
            var.set(value)?;
        }
    }
    let snapshot = Snapshot::of(&var_map)?;
    Ok((model, var_map, snapshot))
}

/// The largest `|actual - expected|` as a share of the largest `|expected|`: how golden
/// logits and gradients of a reference library are compared.
pub fn error_of_largest(actual: &Tensor, expected: &Tensor) -> f64 {
    let largest =
        |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let diff = (actual.to_dtype(DType::F32).unwrap() - expected.to_dtype(DType::F32).unwrap()).unwrap();
    largest(&diff) / largest(expected)
}

/// Fails unless [`error_of_largest`] is at most `tolerance`, naming `what`.
pub fn assert_within_of_largest(actual: &Tensor, expected: &Tensor, tolerance: f64, what: &str) {
    let error = error_of_largest(actual, expected);
    assert!(error <= tolerance, "{what}: off by {error:.2e} of its largest value (tolerance {tolerance:.0e})");
}

/// `|a - b| <= atol + rtol * |b|` elementwise (PyTorch's `assert_close`), with the worst
/// offender in the message.
pub fn assert_close(actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64, what: &str) {
    assert_eq!(actual.shape(), expected.shape(), "{what}: shapes differ");
    let a = actual.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let e = expected.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let mut worst: Option<(usize, f64)> = None;
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if excess > 0.0 && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!("{what}: element {i} is {} but expected {} (atol {atol}, rtol {rtol})", a[i], e[i]);
    }
}

/// PyTorch's default float32 tolerances.
pub const F32_ATOL: f64 = 1e-5;
pub const F32_RTOL: f64 = 1.3e-6;

/// A deterministic pseudo-random tensor in [0, 1): `seed` picks the sequence, so ranks
/// can draw different inputs reproducibly.
pub fn rand(seed: u64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32) / ((1u64 << 24) as f32)
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// As [`rand`], standard-normal by Box-Muller.
pub fn randn(seed: u64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let u = rand(seed, &[2 * n]).to_vec1::<f32>().unwrap();
    let values: Vec<f32> = (0..n)
        .map(|i| {
            let (u1, u2) = ((u[2 * i] as f64).max(1e-12), u[2 * i + 1] as f64);
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// A fault injected into a rank's collectives, without a fault knob in the library.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// None: the calls are only counted.
    None,
    /// Every reduce-scatter is issued this late: the slow network of PyTorch's
    /// delayed-reduce-scatter test.
    SlowReduceScatter(std::time::Duration),
    /// The rank panics when it issues a collective whose label contains this text: a rank
    /// that dies at a chosen point (between two stages of a checkpoint save, say).
    PanicAt(&'static str),
}

/// Counts by (operation, size of the group it ran over).
type Counts = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<(&'static str, usize), usize>>>;

/// A rank's collectives with a [`Fault`], counting the calls issued of each kind and the
/// bytes of their inputs, also over the sub-groups made from it.
pub struct FaultyCollectives {
    pub inner: std::sync::Arc<dyn candle_fsdp::dist::Collectives>,
    pub fault: Fault,
    calls: Counts,
    bytes: Counts,
}

impl FaultyCollectives {
    pub fn new(inner: std::sync::Arc<dyn candle_fsdp::dist::Collectives>, fault: Fault) -> Self {
        Self { inner, fault, calls: Default::default(), bytes: Default::default() }
    }

    /// The bytes of the inputs of every call of `op` issued (what this rank contributed),
    /// over every group.
    pub fn bytes(&self, op: &str) -> usize {
        self.bytes.lock().unwrap().iter().filter(|((o, _), _)| *o == op).map(|(_, n)| n).sum()
    }

    /// As [`FaultyCollectives::bytes`], over groups of `size` ranks only.
    pub fn bytes_in_groups_of(&self, op: &str, size: usize) -> usize {
        self.bytes.lock().unwrap().get(&(op, size)).copied().unwrap_or(0)
    }

    fn count_bytes(&self, op: &'static str, input: &Tensor) {
        let bytes = input.elem_count() * input.dtype().size_in_bytes();
        *self.bytes.lock().unwrap().entry((op, self.inner.size())).or_default() += bytes;
    }

    /// How many calls of `op` ("all_gather", "reduce_scatter", ...) were issued.
    pub fn calls(&self, op: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|((o, _), _)| *o == op).map(|(_, n)| n).sum()
    }

    fn before(&self, op: &'static str, label: &str) {
        *self.calls.lock().unwrap().entry((op, self.inner.size())).or_default() += 1;
        match self.fault {
            Fault::SlowReduceScatter(delay) if op == "reduce_scatter" => std::thread::sleep(delay),
            Fault::PanicAt(text) if label.contains(text) => {
                panic!("injected fault: rank {} dies in {op} for {label}", self.inner.global_rank())
            }
            _ => {}
        }
    }
}

impl candle_fsdp::dist::Collectives for FaultyCollectives {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn global_rank(&self) -> usize {
        self.inner.global_rank()
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn all_gather(&self, input: &Tensor, label: &str) -> candle_fsdp::dist::Result<candle_fsdp::dist::Work> {
        self.before("all_gather", label);
        self.count_bytes("all_gather", input);
        self.inner.all_gather(input, label)
    }
    fn reduce_scatter(
        &self,
        input: &Tensor,
        op: candle_fsdp::dist::ReduceOp,
        label: &str,
    ) -> candle_fsdp::dist::Result<candle_fsdp::dist::Work> {
        self.before("reduce_scatter", label);
        self.count_bytes("reduce_scatter", input);
        self.inner.reduce_scatter(input, op, label)
    }
    fn all_reduce(
        &self,
        input: &Tensor,
        op: candle_fsdp::dist::ReduceOp,
        label: &str,
    ) -> candle_fsdp::dist::Result<candle_fsdp::dist::Work> {
        self.before("all_reduce", label);
        self.count_bytes("all_reduce", input);
        self.inner.all_reduce(input, op, label)
    }
    fn broadcast(
        &self,
        input: &Tensor,
        root: usize,
        label: &str,
    ) -> candle_fsdp::dist::Result<candle_fsdp::dist::Work> {
        self.before("broadcast", label);
        self.inner.broadcast(input, root, label)
    }
    fn barrier(&self, label: &str) -> candle_fsdp::dist::Result<()> {
        self.before("barrier", label);
        self.inner.barrier(label)
    }
    fn new_group(&self, global_ranks: &[usize]) -> candle_fsdp::dist::Result<Box<dyn candle_fsdp::dist::Collectives>> {
        let group = self.inner.new_group(global_ranks)?;
        Ok(Box::new(FaultyCollectives {
            inner: group.into(),
            fault: self.fault,
            calls: self.calls.clone(),
            bytes: self.bytes.clone(),
        }))
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
}
