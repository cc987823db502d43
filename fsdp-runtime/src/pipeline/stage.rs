//! `stage_backward`, `stage_backward_input` and `stage_backward_weight`.

use super::accumulator::GradAccumulator;
use super::context::{Deferred, PassMode, StageContext};
use super::deferred::{bias_grad, weight_grad};
use crate::error::MisuseError;
use crate::error::{Error, Result};
use candle_core::{Tensor, TensorId, Var};
use std::collections::{HashMap, HashSet};

/// One of a stage's input values. Only a variable gets a gradient back (candle keeps the
/// gradients of variables only): wrap an activation received from the previous stage in a
/// `Var` (`Var::from_tensor`) before the forward. A plain tensor and a non-tensor value get
/// `None` at their position, like PyTorch's placeholders.
#[derive(Clone, Copy, Debug)]
pub enum StageInput<'a> {
    /// A tensor input; it gets a gradient only if it is a variable.
    Tensor(&'a Tensor),
    /// A value that is not a tensor; always gets `None`.
    NonTensor,
}

impl<'a> From<&'a Tensor> for StageInput<'a> {
    fn from(tensor: &'a Tensor) -> Self {
        StageInput::Tensor(tensor)
    }
}

impl<'a> From<&'a Var> for StageInput<'a> {
    fn from(var: &'a Var) -> Self {
        StageInput::Tensor(var.as_tensor())
    }
}

/// The scalar whose backward is the stage's backward: `Σ sum(yᵢ·gᵢ)` over the outputs
/// that track gradients (`Σ sum(yᵢ)` — a ones seed — when `output_grads` is `None`, the
/// loss case). `None` when no output tracks gradients.
fn seed(outputs: &[Tensor], output_grads: Option<&[Option<Tensor>]>) -> Result<Option<Tensor>> {
    if let Some(grads) = output_grads {
        if grads.len() != outputs.len() {
            return Err(Error::Misuse(MisuseError::StageGradCount { outputs: outputs.len(), grads: grads.len() }));
        }
    }
    let mut root: Option<Tensor> = None;
    for (index, output) in outputs.iter().enumerate() {
        // Like PyTorch, an output that neither requires grad nor has a grad_fn is skipped.
        if !output.track_op() {
            continue;
        }
        let term = match output_grads {
            None => output.sum_all()?,
            Some(grads) => match &grads[index] {
                None => return Err(Error::Misuse(MisuseError::StageOutputGradMissing { index })),
                Some(grad) => {
                    if grad.shape() != output.shape() || grad.dtype() != output.dtype() {
                        return Err(Error::Misuse(MisuseError::StageGradMismatch {
                            index,
                            output: format!("{:?} {:?}", output.shape(), output.dtype()),
                            grad: format!("{:?} {:?}", grad.shape(), grad.dtype()),
                        }));
                    }
                    (output * grad.detach())?.sum_all()?
                }
            },
        };
        root = Some(match root {
            None => term,
            Some(root) => {
                let term = term.to_dtype(root.dtype())?;
                (root + term)?
            }
        });
    }
    Ok(root)
}

/// The variables `root` depends on, in candle's backward order.
fn variables(root: &Tensor) -> Vec<Var> {
    root.sorted_nodes()
        .into_iter()
        .filter(|node| node.is_variable())
        // `from_tensor` of a variable returns that variable (no copy).
        .filter_map(|node| Var::from_tensor(node).ok())
        .collect()
}

/// Runs the backward from `root`: the gradients of the stage inputs (positionally) and of
/// every other variable, in backward order.
/// The input gradients (positionally) and the other variables' gradients.
type BackwardResult = (Vec<Option<Tensor>>, Vec<(Var, Tensor)>);

fn run_backward(root: &Tensor, inputs: &[StageInput]) -> Result<BackwardResult> {
    let vars = variables(root);
    let grads = root.backward()?;
    let mut input_ids: HashSet<TensorId> = HashSet::new();
    let input_grads = inputs
        .iter()
        .map(|input| match input {
            StageInput::Tensor(tensor) if tensor.is_variable() => {
                input_ids.insert(tensor.id());
                grads.get(tensor).cloned()
            }
            _ => None,
        })
        .collect();
    let params = vars
        .into_iter()
        .filter(|var| !input_ids.contains(&var.id()))
        .filter_map(|var| grads.get(var.as_tensor()).cloned().map(|grad| (var, grad)))
        .collect();
    Ok((input_grads, params))
}

fn not_in_input_pass(ctx: &StageContext, what: &'static str) -> Result<()> {
    match ctx.mode() {
        PassMode::Full => Ok(()),
        PassMode::InputOnly => Err(Error::Misuse(MisuseError::StageReentrant(what))),
    }
}

/// The full (fused) backward of a stage (PyTorch's `stage_backward`, the schedules' "B").
///
/// - `outputs`: the stage's outputs. Outputs that do not track gradients are skipped.
/// - `output_grads`: the gradients of the outputs received from the next stage, one per
///   output (`None` entries only for outputs that do not track gradients), or `None` when
///   the outputs are losses (seeded with ones).
/// - `inputs`: the stage's inputs; the result holds, at each position, the input's
///   gradient, or `None` for a non-tensor, a non-variable tensor, or a variable the outputs
///   do not depend on.
///
/// Every other variable's gradient (the parameters') is added to `acc`, PyTorch's
/// accumulation into `param.grad`. Deferrable ops compute their weight gradients here too.
pub fn stage_backward(
    ctx: &StageContext,
    outputs: &[Tensor],
    output_grads: Option<&[Option<Tensor>]>,
    inputs: &[StageInput],
    acc: &mut GradAccumulator,
) -> Result<Vec<Option<Tensor>>> {
    not_in_input_pass(ctx, "stage_backward")?;
    let Some(root) = seed(outputs, output_grads)? else {
        return Ok(vec![None; inputs.len()]);
    };
    let (input_grads, params) = run_backward(&root, inputs)?;
    for (var, grad) in &params {
        acc.add(var, grad)?;
    }
    Ok(input_grads)
}

/// The input half of a stage's backward (PyTorch's `stage_backward_input`, "I"): returns
/// the input gradients (arguments as for [`stage_backward`]) and queues, in `ctx`, the
/// weight-gradient work of every deferrable op on the path (the saved activation and
/// upstream gradient of each use), for [`stage_backward_weight`]. No weight-gradient matmul
/// runs and no accumulator is touched. Gradients of parameters used through ordinary
/// candle ops, which candle computes regardless, are queued ready-made.
///
/// The queue holds what the weight pass needs, so the outputs can be dropped after this.
/// Several input passes may run before one weight pass (their work is all computed there).
pub fn stage_backward_input(
    ctx: &StageContext,
    outputs: &[Tensor],
    output_grads: Option<&[Option<Tensor>]>,
    inputs: &[StageInput],
) -> Result<Vec<Option<Tensor>>> {
    not_in_input_pass(ctx, "stage_backward_input")?;
    let Some(root) = seed(outputs, output_grads)? else {
        ctx.lock().input_passes += 1;
        return Ok(vec![None; inputs.len()]);
    };
    let queued_before = {
        let mut state = ctx.lock();
        state.mode = PassMode::InputOnly;
        state.queue.len()
    };
    let result = run_backward(&root, inputs);
    let mut state = ctx.lock();
    state.mode = PassMode::Full;
    match result {
        Ok((input_grads, params)) => {
            state.queue.extend(params.into_iter().map(|(var, grad)| Deferred::Ready { var, grad }));
            state.input_passes += 1;
            Ok(input_grads)
        }
        Err(err) => {
            // Nothing of a failed pass stays queued.
            state.queue.truncate(queued_before);
            Err(err)
        }
    }
}

/// The weight half (PyTorch's `stage_backward_weight`, "W"): computes every piece of weight
/// work queued by the input passes since the last weight pass — `x_flatᵀ·dy_flat` per use
/// of a deferred weight, `dy` summed over the batch per use of a deferred bias — sums the
/// uses of a shared weight, adds the results to `acc`, and empties the queue.
///
/// Errors with [`MisuseError::StageNoInputPass`] when no input pass ran since the last weight
/// pass; after an input pass that deferred nothing it does nothing. On an error, the queue
/// and `acc` are left as they were.
pub fn stage_backward_weight(ctx: &StageContext, acc: &mut GradAccumulator) -> Result<()> {
    let queue = {
        let mut state = ctx.lock();
        if state.mode == PassMode::InputOnly {
            return Err(Error::Misuse(MisuseError::StageReentrant("stage_backward_weight")));
        }
        if state.input_passes == 0 && state.queue.is_empty() {
            return Err(Error::Misuse(MisuseError::StageNoInputPass));
        }
        std::mem::take(&mut state.queue)
    };
    let summed = match compute_weight_work(ctx, &queue).and_then(|summed| check_owners(ctx, summed)) {
        Ok(summed) => summed,
        Err(err) => {
            let mut state = ctx.lock();
            let later = std::mem::replace(&mut state.queue, queue);
            state.queue.extend(later);
            return Err(err);
        }
    };
    {
        let mut state = ctx.lock();
        state.input_passes = 0;
        state.announced.clear();
    }
    let sink = ctx.lock().sink.clone();
    for (weight, grad) in &summed {
        match weight {
            Owner::Var(var) => acc.add(var, grad)?,
            Owner::Sink(tensor) => sink.as_ref().expect("checked by check_owners").deposit(tensor, grad)?,
        }
    }
    Ok(())
}

/// Who receives a weight's gradient: the accumulator (a `Var`) or the context's sink.
enum Owner {
    Var(Var),
    Sink(Tensor),
}

/// Resolves every weight's receiver before any gradient is handed over, so a weight
/// nobody owns fails the pass without a partial update.
fn check_owners(ctx: &StageContext, summed: Vec<(Tensor, Tensor)>) -> Result<Vec<(Owner, Tensor)>> {
    let sink = ctx.lock().sink.clone();
    summed
        .into_iter()
        .map(|(weight, grad)| {
            if weight.is_variable() {
                Ok((Owner::Var(Var::from_tensor(&weight)?), grad))
            } else if sink.as_ref().is_some_and(|s| s.owns(&weight)) {
                Ok((Owner::Sink(weight), grad))
            } else {
                Err(Error::Misuse(MisuseError::StageWeightUnowned { shape: format!("{:?}", weight.shape()) }))
            }
        })
        .collect()
}

fn compute_weight_work(ctx: &StageContext, queue: &[Deferred]) -> Result<Vec<(Tensor, Tensor)>> {
    let mut index: HashMap<TensorId, usize> = HashMap::new();
    let mut summed: Vec<(Tensor, Tensor)> = Vec::new();
    for work in queue {
        let (weight, grad) = match work {
            Deferred::Matmul { weight, x, dy, transposed } => {
                let grad = weight_grad(x, dy, *transposed)?;
                let (rows, k) = x.dims2()?;
                let mut state = ctx.lock();
                state.counts.weight_matmuls += 1;
                state.counts.weight_matmul_flops += 2 * (rows as u64) * (k as u64) * (dy.dim(1)? as u64);
                (weight, grad)
            }
            Deferred::Bias { bias, dy } => {
                let grad = bias_grad(dy)?;
                ctx.lock().counts.bias_reductions += 1;
                (bias, grad)
            }
            Deferred::Ready { var, grad } => (var.as_tensor(), grad.clone()),
        };
        match index.get(&weight.id()) {
            Some(&i) => summed[i].1 = (&summed[i].1 + &grad)?,
            None => {
                index.insert(weight.id(), summed.len());
                summed.push((weight.clone(), grad));
            }
        }
    }
    Ok(summed)
}
