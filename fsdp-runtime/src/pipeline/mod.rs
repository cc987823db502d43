//! Pipeline-stage backward for plain candle: the port of PyTorch's
//! `torch.distributed.pipelining._backward` (`stage_backward`, `stage_backward_input`,
//! `stage_backward_weight`).
//!
//! # Why custom ops
//!
//! PyTorch splits a stage's backward into an input pass (dI, sent upstream early) and a
//! weight pass (dW, deferred) by walking the autograd graph and saving the gradients that
//! reach the points where the weights join the activation path. candle's autograd cannot do
//! that: `Tensor::backward()` computes, for every op on the path, the gradients of *all* its
//! inputs (`Op::Matmul` always computes both `grad·rhsᵀ` and `lhsᵀ·grad`), and it has no
//! hooks and no way to run a backward from a saved intermediate. Detaching the weights does
//! not help either (the weight-side product is still computed).
//!
//! So the split is made by the ops themselves: the *deferrable* ops of this module
//! ([`deferred_matmul`], [`deferred_matmul_t`], [`deferred_bias_add`], and the
//! [`StageLinear`] layer built from them) are candle `CustomOp2`s whose backward always
//! computes the input gradient and, depending on the [`StageContext`]'s [`PassMode`],
//! either computes the weight gradient too ([`PassMode::Full`]) or records what computing
//! it needs — the weight `Var`, the saved activation and the upstream gradient — in the
//! context's queue ([`PassMode::InputOnly`]). [`stage_backward_weight`] later computes the
//! queued work (one `xᵀ·dy` matmul per use of a weight, a reduction per bias), sums the
//! uses of a shared weight, and accumulates into a [`GradAccumulator`].
//!
//! Parameters used through ordinary candle ops still get gradients in both modes, but
//! their weight work cannot be deferred: during an input pass candle computes it anyway and
//! the result is queued as ready-made (handed over at the weight pass, so the accumulator
//! is still untouched by the input pass).
//!
//! # Gradients live in an accumulator
//!
//! candle tensors have no `.grad` field: every `backward()` returns a fresh `GradStore`.
//! Where PyTorch accumulates into `param.grad`, these functions accumulate into a
//! [`GradAccumulator`] (a `Var → summed gradient` store; [`GradAccumulator::to_grad_store`]
//! feeds an optimizer step). Input gradients are returned, never accumulated, as in
//! PyTorch's `stage_backward` (which returns them and clears `input.grad`).
//!
//! candle only keeps the gradients of variables, so a stage input whose gradient is wanted
//! must be a `Var` (the caller wraps the activation received from the previous stage in
//! one); other inputs get `None` positionally (see [`StageInput`]).
//!
//! # FSDP units
//!
//! A stage may be made of FSDP units ([`StageLinear`] is `Shardable`): give the stage
//! context the model's `Pipelining::deferred_grad_sink`, which reduces a unit as soon as the
//! weight pass has delivered its last deferred gradient, and end the input pass with
//! `Pipelining::finish_input_pass`, which frees the gathered parameters the weight pass does not
//! read. The ops are written over candle's backend traits, so they run on the CPU and on
//! CUDA alike.
//!
//! Not done: batching the uses of a shared weight into one matmul.

mod accumulator;
mod context;
mod deferred;
mod stage;

pub use accumulator::GradAccumulator;
pub use context::{DeferredGradSink, PassMode, StageContext, WorkCounts};
pub use deferred::{deferred_bias_add, deferred_matmul, deferred_matmul_t, StageLinear};
pub use stage::{stage_backward, stage_backward_input, stage_backward_weight, StageInput};
