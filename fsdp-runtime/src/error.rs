//! Errors of the library. Each names what a user needs to find the fault: the rank, the
//! operation, the unit, the parameter.
//!
//! Autograd and the layers' forward passes speak candle's error type, so an [`Error`] raised
//! inside them (a collective that timed out in a unit's backward, a refused gradient) travels
//! through candle and comes back out of [`crate::Fsdp`]'s calls as itself, not as a string:
//! [`into_candle`] packs it, the `From<candle_core::Error>` conversion unpacks it.

use std::path::PathBuf;
use std::time::Duration;

/// The library's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- The model's description -----------------------------------------------------
    #[error(
        "parameter `{second_fqn}` (unit `{second_unit}`) is the same tensor as `{first_fqn}` \
         (unit `{first_unit}`): tied parameters must live in one unit; move the tie into \
         their lowest common unit"
    )]
    TieAcrossUnits { first_fqn: String, first_unit: String, second_fqn: String, second_unit: String },

    #[error("the model and the VarMap disagree:\n  {}", mismatches.join("\n  "))]
    VarMapMismatch { mismatches: Vec<String> },

    #[error("`{fqn}` (template `{template}`) is not in the model's static table: the value does not match its type's schema")]
    NotInTable { fqn: String, template: String },

    #[error("unit `{fqn}` directly wraps another unit at the same FQN; remove one of the two `Unit`s")]
    UnitInUnit { fqn: String },

    #[error(
        "the model's `Shardable::visit` walks units differently in declaration and forward order: {detail}; \
         both orders must visit every unit exactly once"
    )]
    VisitOrderMismatch { detail: String },

    #[error(
        "building the model without values failed{}: {message}; a constructor cannot read a parameter's values \
         before they exist (they are made by `Fsdp::wrap_meta`)",
        last.as_ref().map(|name| format!(" (the last parameter it was given: `{name}`)")).unwrap_or_default()
    )]
    MetaBuild { last: Option<String>, message: String },

    #[error(
        "`{fqn}` is a view of `{placeholder}`, which had no values when the model was built: a model built \
         without values must hold the tensors its VarBuilder gives, unchanged (transpose or reshape in forward)"
    )]
    MetaView { fqn: String, placeholder: String },

    // --- Wrapping and configuring --------------------------------------------------------
    #[error("rank {rank}: the ranks built different models: {detail}")]
    RanksDisagree { rank: usize, detail: String },

    #[error("a unit can be wrapped by one Fsdp only; build a new model for a second wrap")]
    AlreadyWrapped,

    #[error("a group is given for unit `{name}`, but the model has no such unit")]
    UnknownUnit { name: String },

    #[error("no trained parameter is named `{fqn}`")]
    UnknownParameter { fqn: String },

    #[error(
        "unit `{unit}` mixes dtypes: `{first}` is {first_dtype:?}, `{other}` is {other_dtype:?}; \
         one unit is gathered in one collective"
    )]
    MixedDtypes {
        unit: String,
        first: String,
        first_dtype: candle_core::DType,
        other: String,
        other_dtype: candle_core::DType,
    },

    #[error("unit `{unit}`: the mixed-precision policy casts to {dtype:?}, but {problem}")]
    MixedPrecisionPolicy { unit: String, dtype: candle_core::DType, problem: String },

    #[error(
        "rank {rank}: the forward of unit `{unit}` failed with its parameters gathered in {dtype:?} \
         (mixed precision): {message}. An op may lack a {dtype:?} kernel on this device, or the model \
         mixes dtypes: cast its own constants to its activations' dtype, and give the root's inputs to \
         Fsdp::forward_with, which casts them"
    )]
    MixedPrecisionForward { rank: usize, unit: String, dtype: candle_core::DType, message: String },

    #[error("unknown {what} `{value}` (expected one of: {expected})")]
    UnknownOption { what: &'static str, value: String, expected: String },

    // --- Running a step ------------------------------------------------------------------
    #[error("rank {rank}: unit `{unit}` started its forward at position {position}, where the static order has `{expected}`")]
    OrderViolation { rank: usize, unit: String, position: usize, expected: String },

    #[error("rank {rank}: unit `{unit}`: {message}")]
    Unit { rank: usize, unit: String, message: String },

    #[error(
        "rank {rank}: Fsdp::backward with no training forward since the last backward; run \
         `Fsdp::forward` first (an inference forward is not backpropagated)"
    )]
    BackwardWithoutForward { rank: usize },

    #[error(
        "rank {rank}: the loss given to Fsdp::backward reaches none of this step's forward outputs \
         (nor any parameter shard), so no gradient would be produced; compute the loss from the \
         tensors `Fsdp::forward` returned"
    )]
    LossReachesNoOutput { rank: usize },

    #[error("rank {rank}: {call} between a forward and its backward; finish the step first")]
    StepInProgress { rank: usize, call: &'static str },

    #[error("rank {rank}: {call} cannot run inside {inside}")]
    NestedCall { rank: usize, call: &'static str, inside: &'static str },

    // --- Ranks and collectives -----------------------------------------------------------
    #[error("a world needs at least one rank")]
    EmptyWorld,

    #[error("rank {rank} does not exist in a world of {world_size} ranks")]
    NoSuchRank { rank: usize, world_size: usize },

    #[error("rank {rank}: {op} for {label} timed out after {timeout:?}; rank(s) {missing:?} never joined")]
    CollectiveTimeout { rank: usize, op: String, label: String, timeout: Duration, missing: Vec<usize> },

    #[error("rank {rank}: {op} for {label} was aborted: {reason}")]
    CollectiveAborted { rank: usize, op: String, label: String, reason: String },

    #[error("rank {rank}: {op} for {label} does not match {other}")]
    CollectiveMismatch { rank: usize, op: String, label: String, other: String },

    #[error("rank {rank}: {op} for {label}: {problem}")]
    CollectiveArgument { rank: usize, op: String, label: String, problem: String },

    #[error("rank {rank}: group {ranks:?}: {problem}")]
    BadGroup { rank: usize, ranks: Vec<usize>, problem: String },

    #[error("rank {rank} panicked: {message}")]
    RankPanicked { rank: usize, message: String },

    #[error("rank {rank}: {message}")]
    Rank { rank: usize, message: String },

    #[error("rank {rank}: {wanted} GPU(s) needed, but {visible} are visible")]
    NotEnoughGpus { rank: usize, wanted: usize, visible: usize },

    #[error("rank {rank}: rendezvous at {addr}: {message}")]
    Rendezvous { rank: usize, addr: String, message: String },

    #[error(
        "the launch environment (torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, \
         MASTER_PORT) is not usable: {}",
        problems.join("; ")
    )]
    LaunchEnv { problems: Vec<String> },

    // --- Pipeline stages -----------------------------------------------------------------
    #[error(
        "a deferred weight of shape {shape} is neither a `Var` nor a parameter of the stage's gradient sink; \
         for an FSDP model, give the stage context `fsdp.deferred_grad_sink()`"
    )]
    StageWeightUnowned { shape: String },

    #[error(
        "stage output {index} tracks gradients, so it requires output gradients from the next \
         stage, but output_grads[{index}] is None"
    )]
    StageOutputGradMissing { index: usize },

    #[error("stage output {index} is {output} but its output gradient is {grad}")]
    StageGradMismatch { index: usize, output: String, grad: String },

    #[error("{outputs} stage outputs but {grads} output gradients")]
    StageGradCount { outputs: usize, grads: usize },

    #[error(
        "stage_backward_weight: no stage_backward_input ran since the last weight pass, so there \
         is no deferred weight work to compute"
    )]
    StageNoInputPass,

    #[error("{0} was called while the stage context is in an input pass")]
    StageReentrant(&'static str),

    // --- Checkpoints ---------------------------------------------------------------------
    #[error("rank {rank}: {}: {problem}", path.display())]
    CheckpointFile { rank: usize, path: PathBuf, problem: String },

    #[error("rank {rank}: {}: `{fqn}`: {problem}", path.display())]
    CheckpointTensor { rank: usize, path: PathBuf, fqn: String, problem: String },

    #[error("rank {rank}: {} does not fit this model:\n  {}", path.display(), problems.join("\n  "))]
    CheckpointMismatch { rank: usize, path: PathBuf, problems: Vec<String> },

    #[error(
        "rank {rank}: {stage} failed on rank(s) {failed:?} (their own errors say why); {}",
        if *kept_previous { "the previous checkpoints are untouched" } else { "nothing was loaded" }
    )]
    CheckpointPeerFailed { rank: usize, stage: String, failed: Vec<usize>, kept_previous: bool },

    #[error("rank {rank}: {what} is not supported yet: {why}")]
    CheckpointUnsupported { rank: usize, what: String, why: String },

    #[error("{}: {problem}", path.display())]
    ModelConfig { path: PathBuf, problem: String },

    // --- Gradients ---------------------------------------------------------------------------
    #[error(
        "rank {rank}: the gradients' total {norm_type}-norm is {norm}; nothing was scaled{}",
        if parameters.is_empty() {
            String::new()
        } else {
            format!(" (not finite on this rank: the gradient of {})", parameters.join(", "))
        }
    )]
    NonFiniteGradNorm { rank: usize, norm_type: f64, norm: f64, parameters: Vec<String> },

    #[error(
        "ShardedGradScaler: {config} cannot work (the scale must be positive and finite, the growth factor \
         above 1, the backoff factor between 0 and 1, the growth interval at least 1)"
    )]
    GradScalerArgument { config: String },

    #[error("clip_grad_norm: {problem}")]
    ClipArgument { problem: String },

    // --- candle --------------------------------------------------------------------------
    #[error(transparent)]
    Candle(candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Packs `error` into a candle error that [`Error`]'s `From<candle_core::Error>` unpacks
/// again. candle's own `Wrapped` variant holds a `dyn Display`, which cannot be
/// downcast; `std::io::Error::other` holds a `dyn std::error::Error`, which can, and
/// candle's `Io` variant displays it unchanged.
pub fn into_candle(error: Error) -> candle_core::Error {
    match error {
        Error::Candle(inner) => inner,
        typed => candle_core::Error::Io(std::io::Error::other(typed)),
    }
}

impl From<candle_core::Error> for Error {
    fn from(error: candle_core::Error) -> Self {
        match error {
            candle_core::Error::WithBacktrace { inner, .. } => Error::from(*inner),
            candle_core::Error::Io(io) if io.get_ref().is_some_and(|e| e.is::<Error>()) => {
                let inner = io.into_inner().expect("checked: the io error carries an error");
                *inner.downcast::<Error>().expect("checked: the carried error is ours")
            }
            other => Error::Candle(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typed_error_survives_a_trip_through_candle() {
        let original = Error::CollectiveTimeout {
            rank: 3,
            op: "all_gather".into(),
            label: "unit `layers.1`".into(),
            timeout: Duration::from_secs(2),
            missing: vec![1],
        };
        let message = original.to_string();
        let through_candle = into_candle(original);
        assert_eq!(through_candle.to_string(), message, "candle shows the message unchanged");
        // candle adds a backtrace when RUST_BACKTRACE is set; the error is found inside it.
        let with_backtrace = candle_core::Error::WithBacktrace {
            inner: Box::new(through_candle),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        match Error::from(with_backtrace) {
            Error::CollectiveTimeout { rank: 3, missing, .. } => assert_eq!(missing, [1]),
            other => panic!("lost its kind: {other:?}"),
        }
    }

    #[test]
    fn candle_errors_stay_candle_errors() {
        let error = Error::from(candle_core::Error::Msg("shape mismatch".into()));
        assert!(matches!(&error, Error::Candle(candle_core::Error::Msg(m)) if m == "shape mismatch"));
        assert!(matches!(into_candle(error), candle_core::Error::Msg(_)));
    }
}
