//! Activation checkpointing of a unit: its forward runs once without keeping its graph,
//! and its backward runs the forward again and backpropagates through that.
//!
//! After the first forward only the unit's inputs and outputs are kept. The outputs are
//! [`CheckpointOutput`] nodes: output 0 over an anchor scalar built from every tracked
//! input, each further output over output 0. In backward, the further outputs (which
//! candle reaches first) hand their gradients to the shared [`Checkpoint`]; output 0 then
//! re-runs the forward ([`Recompute`]) on copies of the
//! inputs with the unit's parameters gathered (its pre-backward gathered them), checks
//! that it computes the outputs it computed the first time, backpropagates the outputs'
//! gradients through the new graph (the parameters' gradients go to the unit as in any
//! backward), and leaves each input's gradient for its [`InputTap`].

use crate::backend::{BuiltValue, OnBackend};
use crate::error::{Error, Result};
use crate::model::Recompute;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor, Var};
use std::sync::{Arc, Mutex};

/// What the nodes of one checkpointed forward share.
struct Checkpoint {
    unit: String,
    rank: usize,
    recompute: Recompute,
    /// The unit's inputs, detached: the recompute runs on copies of these.
    inputs: Vec<Tensor>,
    /// Which inputs tracked a gradient in the first forward: only those become variables
    /// of the recompute (a constant, a mask or a position table, stays one, as ops that
    /// take constants return no gradient for them).
    tracked: Vec<bool>,
    state: Mutex<CheckpointState>,
}

#[derive(Default)]
struct CheckpointState {
    /// Each output's value and gradient, as the taps and the node deliver them.
    outputs: Vec<Option<(Tensor, Tensor)>>,
    /// Each input's gradient from the recomputed graph, until its tap takes it.
    input_grads: Vec<Option<Tensor>>,
}

impl Checkpoint {
    fn fail(&self, message: String) -> candle_core::Error {
        crate::error::into_candle(Error::Unit { rank: self.rank, unit: self.unit.clone(), message })
    }

    /// Runs the forward again, checks its outputs and backpropagates `outputs`' gradients
    /// through it; the inputs' gradients wait in the state for their taps.
    fn backward(&self) -> candle_core::Result<()> {
        let delivered = std::mem::take(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()).outputs);
        // Copies the recomputed graph starts from: the inputs that tracked a gradient as
        // variables, so their gradients are computed; the others as they are.
        let vars: Vec<Option<Var>> = self
            .inputs
            .iter()
            .zip(&self.tracked)
            .map(|(t, &tracked)| if tracked { Var::from_tensor(t).map(Some) } else { Ok(None) })
            .collect::<candle_core::Result<_>>()?;
        let inputs =
            vars.iter().zip(&self.inputs).map(|(v, t)| v.as_ref().map_or(t.clone(), |v| v.as_tensor().clone()));
        let outputs = (self.recompute)(inputs.collect())?;
        if outputs.len() != delivered.len() {
            return Err(self.fail(format!(
                "the recomputed forward returned {} tensors, the first forward {}",
                outputs.len(),
                delivered.len()
            )));
        }
        let mut target: Option<Tensor> = None;
        for (k, (output, first)) in outputs.iter().zip(&delivered).enumerate() {
            let Some((value, grad)) = first else { continue };
            let differing = count_differing(output, value)?;
            if differing > 0 {
                return Err(self.fail(format!(
                    "its checkpointed forward is not deterministic: the recomputed output {k} differs from the first \
                     forward's in {differing} of {} elements (dropout without a fixed seed?); checkpoint only units \
                     whose forward computes the same outputs from the same inputs",
                    value.elem_count()
                )));
            }
            if !output.dtype().is_float() || !output.track_op() {
                continue;
            }
            // d(Σ output · grad)/d output = grad, exactly (1 · g = g).
            let term = (output * grad)?.sum_all()?.to_dtype(DType::F64)?;
            target = Some(match target {
                None => term,
                Some(sum) => (sum + term)?,
            });
        }
        let grads = match target {
            Some(target) => Some(target.backward()?),
            None => None,
        };
        let input_grads = vars
            .iter()
            .map(|v| v.as_ref().and_then(|v| grads.as_ref().and_then(|g| g.get(v.as_tensor()).cloned())))
            .collect();
        self.state.lock().unwrap_or_else(|p| p.into_inner()).input_grads = input_grads;
        Ok(())
    }
}

/// How many elements of `a` and `b` differ, NaN against NaN counting as equal.
fn count_differing(a: &Tensor, b: &Tensor) -> candle_core::Result<usize> {
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        return Ok(a.elem_count().max(b.elem_count()).max(1));
    }
    let mut differing = a.ne(b)?.to_dtype(DType::I64)?;
    if a.dtype().is_float() {
        let both_nan = (a.ne(a)? * b.ne(b)?)?.to_dtype(DType::I64)?;
        differing = (differing - both_nan)?;
    }
    // One read back per output: on a GPU, one synchronisation.
    Ok(differing.sum_all()?.to_scalar::<i64>()? as usize)
}

/// Output `k` of a checkpointed unit. Output 0 hangs from the anchor of the unit's
/// inputs, every further output from output 0, so that candle reaches the further ones
/// (and they hand over their gradients) before output 0, whose backward then runs the
/// recompute. See the module docs.
struct CheckpointOutput {
    shared: Arc<Checkpoint>,
    k: usize,
    value: BuiltValue,
}

impl CustomOp1 for CheckpointOutput {
    fn name(&self) -> &'static str {
        "fsdp-checkpoint-output"
    }

    fn cpu_fwd(&self, _from: &CpuStorage, _layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.value.take()
    }

    fn cuda_fwd(&self, _from: &CudaStorage, _layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.value.take()
    }

    fn bwd(&self, from: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner()).outputs[self.k] =
            Some((res.detach(), grad.clone()));
        if self.k == 0 {
            self.shared.backward()?;
        }
        // The inputs' gradients go through their taps: what this node hangs from (the
        // anchor, or output 0) gets none.
        Ok(Some(from.zeros_like()?))
    }
}

/// A zero scalar computed from input `j`: its backward hands the input the gradient the
/// recomputed graph gave it.
struct InputTap {
    shared: Arc<Checkpoint>,
    j: usize,
}

impl CustomOp1 for InputTap {
    fn name(&self) -> &'static str {
        "fsdp-checkpoint-input"
    }

    fn cpu_fwd(&self, input: &CpuStorage, _layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        zero_scalar(input)
    }

    fn cuda_fwd(&self, input: &CudaStorage, _layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        zero_scalar(input)
    }

    fn bwd(&self, input: &Tensor, _res: &Tensor, _grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = self
            .shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .input_grads
            .get_mut(self.j)
            .and_then(Option::take);
        // An input the recomputed forward did not use gets zeros, as in a plain backward.
        Ok(Some(match grad {
            Some(grad) => grad,
            None => input.zeros_like()?,
        }))
    }
}

fn zero_scalar<S: OnBackend>(like: &S) -> candle_core::Result<(S, Shape)> {
    let shape = Shape::from(());
    Ok((candle_core::backend::BackendDevice::zeros_impl(like.device(), &shape, DType::F32)?, shape))
}

/// Joins `outputs` (the values of the unit's first forward, detached) to `inputs` (as the
/// unit received them) with the nodes of the module docs, so that backward re-runs
/// `recompute` instead of keeping the first forward's graph. Returns the outputs to hand
/// on, in order.
pub(crate) fn attach(
    unit: String,
    rank: usize,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
    recompute: Recompute,
) -> Result<Vec<Tensor>> {
    let Some(first) = outputs.first() else {
        return Ok(outputs);
    };
    if !first.dtype().is_float() {
        return Err(Error::Unit {
            rank,
            unit,
            message: format!(
                "a checkpointed unit's first output must be floating-point (it carries the backward), not {:?}",
                first.dtype()
            ),
        });
    }
    let device = first.device().clone();
    let shared = Arc::new(Checkpoint {
        unit,
        rank,
        recompute,
        inputs: inputs.iter().map(Tensor::detach).collect(),
        tracked: inputs.iter().map(|t| t.dtype().is_float() && t.track_op()).collect(),
        state: Mutex::new(CheckpointState { outputs: vec![None; outputs.len()], input_grads: Vec::new() }),
    });
    // The anchor is tracked even when no input is (a variable of its own), so that the
    // unit's backward always runs.
    let mut anchor = Var::zeros((), DType::F32, &device)?.as_tensor().clone();
    for (j, input) in inputs.iter().enumerate() {
        if input.dtype().is_float() && input.track_op() {
            anchor = (anchor + input.apply_op1(InputTap { shared: shared.clone(), j })?)?;
        }
    }
    let output = |k: usize, value: &Tensor| CheckpointOutput {
        shared: shared.clone(),
        k,
        value: BuiltValue::new("checkpoint output", value.clone()),
    };
    let node = anchor.apply_op1(output(0, first))?;
    let mut joined = vec![node.clone()];
    for (k, value) in outputs.iter().enumerate().skip(1) {
        joined.push(node.apply_op1(output(k, value))?);
    }
    Ok(joined)
}
