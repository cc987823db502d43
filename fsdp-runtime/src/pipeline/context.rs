//! The state shared by a stage's deferrable ops and its backward functions.

use candle_core::{Tensor, TensorId, Var};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

/// What the backward of a deferrable op computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PassMode {
    /// Input and weight gradients (an ordinary backward; `stage_backward`).
    #[default]
    Full,
    /// Input gradients only; the weight work is queued (`stage_backward_input`).
    InputOnly,
}

/// How much gradient work the deferrable ops did, for checks and accounting. A matmul's
/// FLOPs are `2·m·k·n`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkCounts {
    /// Input-gradient matmuls (`dy·wᵀ`), in either mode.
    pub input_matmuls: usize,
    /// The FLOPs of those input-gradient matmuls.
    pub input_matmul_flops: u64,
    /// Weight-gradient matmuls (`xᵀ·dy`): in a full backward, or at the weight pass.
    pub weight_matmuls: usize,
    /// The FLOPs of those weight-gradient matmuls.
    pub weight_matmul_flops: u64,
    /// Bias-gradient reductions (`dy` summed over the batch dimensions).
    pub bias_reductions: usize,
}

/// One piece of queued weight-gradient work. A weight is a `Var`, or a parameter a
/// [`DeferredGradSink`] owns (an FSDP unit's gathered parameter).
pub(crate) enum Deferred {
    /// `dw = x_flatᵀ·dy_flat` (or its transpose, for a weight used as `x·wᵀ`).
    Matmul { weight: Tensor, x: Tensor, dy: Tensor, transposed: bool },
    /// `db = dy_flat` summed over the rows.
    Bias { bias: Tensor, dy: Tensor },
    /// A gradient candle computed during the input pass anyway (a parameter used through an
    /// ordinary op); handed over at the weight pass.
    Ready { var: Var, grad: Tensor },
}

/// Receives the deferred gradients of weights that are not `Var`s: a wrapped FSDP model
/// ([`crate::Pipelining::deferred_grad_sink`]) takes those of its gathered parameters, and
/// reduces a unit's gradients as soon as its last one arrives.
///
/// The stage calls [`expect`](Self::expect) once per weight with work deferred since the
/// last weight pass, however many uses and input passes deferred it, and
/// [`deposit`](Self::deposit) once per such weight at the weight pass, with the uses summed.
pub trait DeferredGradSink: Send + Sync {
    /// Whether `weight` is one of the sink's parameters.
    fn owns(&self, weight: &Tensor) -> bool;
    /// An input pass deferred (part of) `weight`'s gradient: the sink must wait for the
    /// weight pass before it treats the gradient as complete.
    fn expect(&self, weight: &Tensor) -> crate::Result<()>;
    /// Adds `grad`, the deferred part, to `weight`'s gradient for the current step.
    fn deposit(&self, weight: &Tensor, grad: &Tensor) -> crate::Result<()>;
}

#[derive(Default)]
pub(crate) struct State {
    pub mode: PassMode,
    pub sink: Option<Arc<dyn DeferredGradSink>>,
    pub queue: Vec<Deferred>,
    /// The sink's weights announced to it since the last weight pass (each once).
    pub announced: HashSet<TensorId>,
    /// Input passes since the last weight pass (0: a weight pass has nothing to work on).
    pub input_passes: usize,
    pub counts: WorkCounts,
}

/// The context of one pipeline stage: the pass mode its deferrable ops read, the queue of
/// deferred weight-gradient work, and the work counters. Cheap to clone (an `Arc`); every
/// deferrable op of the stage holds a clone.
///
/// One backward at a time per context: the mode is the context's, not a thread's.
#[derive(Clone, Default)]
pub struct StageContext {
    pub(crate) inner: Arc<Mutex<State>>,
}

impl std::fmt::Debug for StageContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("StageContext")
            .field("mode", &state.mode)
            .field("queued", &state.queue.len())
            .field("input_passes", &state.input_passes)
            .field("counts", &state.counts)
            .finish()
    }
}

impl StageContext {
    /// A context in [`PassMode::Full`] with nothing queued and zero counts.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data; keep going with it.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where the weight pass sends the gradients of weights that are not `Var`s.
    pub fn set_grad_sink(&self, sink: Arc<dyn DeferredGradSink>) {
        self.lock().sink = Some(sink);
    }

    /// The current pass mode (`Full` outside `stage_backward_input`).
    pub fn mode(&self) -> PassMode {
        self.lock().mode
    }

    /// The work counters since the context was made or [`reset_counts`](Self::reset_counts).
    pub fn counts(&self) -> WorkCounts {
        self.lock().counts
    }

    /// Sets every work counter back to zero.
    pub fn reset_counts(&self) {
        self.lock().counts = WorkCounts::default();
    }

    /// How many pieces of weight work are queued (one per use of a deferred weight or bias,
    /// plus one per ready-made gradient).
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Input passes run since the last weight pass.
    pub fn pending_input_passes(&self) -> usize {
        self.lock().input_passes
    }

    /// Drops the queued work without computing it (e.g. a step abandoned after its
    /// input pass), and forgets the pending input passes.
    pub fn discard_deferred(&self) {
        let mut state = self.lock();
        state.queue.clear();
        state.input_passes = 0;
    }
}
