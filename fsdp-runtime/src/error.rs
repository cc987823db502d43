//! Errors of the library. Each names what a user needs to find the fault: the rank, the
//! operation, the unit, the parameter.
//!
//! Autograd and the layers' forward passes speak candle's error type, so an [`Error`] raised
//! inside them (a collective that timed out in a unit's backward, a refused gradient) travels
//! through candle and comes back out of [`crate::Fsdp`]'s calls as itself, not as a string:
//! [`into_candle`] packs it, the `From<candle_core::Error>` conversion unpacks it.

use std::path::PathBuf;

/// The library's error type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- By concern: each group is an error type of its own, kept whole ---------------
    /// A model, configuration or plan that cannot work: found at wrap time or by the call
    /// given it.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// A call made where it cannot work: a backward without its forward, a call in the
    /// middle of a step, a pipeline pass out of order.
    #[error(transparent)]
    Misuse(#[from] MisuseError),

    /// A checkpoint or export that cannot be written or loaded as asked.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),

    /// An error of the communication layer: a collective that timed out, was aborted or
    /// did not match its peers', a rendezvous or launch environment that failed.
    #[error(transparent)]
    Comm(#[from] fsdp_comm::Error),

    // --- Failures while running a step --------------------------------------------------
    /// A unit's forward failed while its parameters were gathered in the mixed-precision
    /// `param_dtype`.
    #[error(
        "rank {rank}: the forward of unit `{unit}` failed with its parameters gathered in {dtype:?} \
         (mixed precision): {message}. An op may lack a {dtype:?} kernel on this device, or the model \
         mixes dtypes: cast its own constants to its activations' dtype, and give the root's inputs to \
         Fsdp::forward_with, which casts them"
    )]
    MixedPrecisionForward {
        /// The global rank.
        rank: usize,
        /// The unit whose forward failed.
        unit: String,
        /// The dtype the parameters were gathered in.
        dtype: candle_core::DType,
        /// The forward's own error.
        message: String,
    },

    /// A unit refused an operation on its parameters or gradients (e.g. a gradient that
    /// arrives after the unit's gradients were reduced, or a second backward through a
    /// forward whose backward already ran).
    #[error("rank {rank}: unit `{unit}`: {message}")]
    Unit {
        /// The global rank.
        rank: usize,
        /// The unit's name.
        unit: String,
        /// What went wrong.
        message: String,
    },

    // --- Ranks and collectives -----------------------------------------------------------
    /// The threads of a rank's CPU pool could not be started.
    #[error("could not start {threads} CPU thread(s): {message}")]
    CpuThreads {
        /// The threads asked for.
        threads: usize,
        /// The operating system's reason.
        message: String,
    },

    /// A rank run as a thread by `launch` panicked.
    #[error("rank {rank} panicked: {message}")]
    RankPanicked {
        /// The rank that panicked.
        rank: usize,
        /// The panic's message.
        message: String,
    },

    /// A failure of one rank that no more specific variant describes (e.g. a rank thread
    /// that could not start, or `summon_full_params` asked to write back from rank 0 only).
    #[error("rank {rank}: {message}")]
    Rank {
        /// The global rank.
        rank: usize,
        /// What went wrong.
        message: String,
    },

    // --- Gradients ---------------------------------------------------------------------------
    /// The total gradient norm computed by [`crate::Fsdp::clip_grad_norm`] is not finite,
    /// so no gradient was scaled.
    #[error(
        "rank {rank}: the gradients' total {norm_type}-norm is {norm}; nothing was scaled{}",
        if parameters.is_empty() {
            String::new()
        } else {
            format!(" (not finite on this rank: the gradient of {})", parameters.join(", "))
        }
    )]
    NonFiniteGradNorm {
        /// The global rank.
        rank: usize,
        /// The `p` of the p-norm.
        norm_type: f64,
        /// The total norm over all ranks (NaN or infinite).
        norm: f64,
        /// The parameters whose local gradient is not finite on this rank (empty when the
        /// non-finite values are on other ranks).
        parameters: Vec<String>,
    },

    // --- candle --------------------------------------------------------------------------
    /// An error of candle itself (a shape mismatch, a device error, ...).
    #[error(transparent)]
    Candle(candle_core::Error),

    // --- the caller's own code ----------------------------------------------------------
    /// An error of the caller's own code, brought in with `?` (an I/O error, an
    /// `anyhow::Error`, any boxed error), carried as it is.
    #[error(transparent)]
    External(Box<dyn std::error::Error + Send + Sync + 'static>),

    /// A rank's closure under `launch` failed with an error of the caller's own
    /// code ([`Error::External`]): the same error, naming the rank.
    #[error("rank {rank}: {source}")]
    InRank {
        /// The rank whose closure failed.
        rank: usize,
        /// The caller's error.
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// A model, configuration or plan that cannot work: found at wrap time or by the call
/// given it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// One tensor is a parameter of two different units: a tie that crosses unit
    /// boundaries, found while laying out the model.
    #[error(
        "parameter `{second_fqn}` (unit `{second_unit}`) is the same tensor as `{first_fqn}` \
         (unit `{first_unit}`): tied parameters must live in one unit; move the tie into \
         their lowest common unit"
    )]
    TieAcrossUnits {
        /// The FQN under which the tensor was seen first.
        first_fqn: String,
        /// The unit that holds `first_fqn`.
        first_unit: String,
        /// The FQN under which the same tensor was seen again.
        second_fqn: String,
        /// The unit that holds `second_fqn`.
        second_unit: String,
    },
    /// [`crate::model::Layout::check_var_map`] found the model's tensors and a `VarMap`'s
    /// variables differ, by name or by identity.
    #[error("the model and the VarMap disagree:\n  {}", mismatches.join("\n  "))]
    VarMapMismatch {
        /// One line per disagreement.
        mismatches: Vec<String>,
    },
    /// A tensor or unit the model's `visit` reaches has no entry in its type's static
    /// table: the value does not match its type's schema.
    #[error("`{fqn}` (template `{template}`) is not in the model's static table: the value does not match its type's schema")]
    NotInTable {
        /// The FQN in the built model.
        fqn: String,
        /// `fqn` with every index replaced by `{index}`, as the table spells it.
        template: String,
    },
    /// A [`crate::Unit`] directly holds another `Unit`, so two units would share one FQN.
    #[error("unit `{fqn}` directly wraps another unit at the same FQN; remove one of the two `Unit`s")]
    UnitInUnit {
        /// The FQN of the doubled unit.
        fqn: String,
    },
    /// The model's [`crate::Shardable::visit`] does not visit every unit exactly once in
    /// both declaration and forward order.
    #[error(
        "the model's `Shardable::visit` walks units differently in declaration and forward order: {detail}; \
         both orders must visit every unit exactly once"
    )]
    VisitOrderMismatch {
        /// Which unit is missing or visited twice, and in which order.
        detail: String,
    },
    /// The constructor given to [`crate::MetaModel::build`] failed or panicked, typically
    /// because it read a parameter's values, which do not exist yet.
    #[error(
        "building the model without values failed{}: {message}; a constructor cannot read a parameter's values \
         before they exist (they are made by `Fsdp::wrap_meta`)",
        last.as_ref().map(|name| format!(" (the last parameter it was given: `{name}`)")).unwrap_or_default()
    )]
    MetaBuild {
        /// The name of the last parameter the constructor was given, if any.
        last: Option<String>,
        /// The constructor's own error, or its panic message.
        message: String,
    },
    /// A model built without values holds a view of a placeholder (a transpose or
    /// reshape made in the constructor) instead of the tensor the `VarBuilder` gave.
    #[error(
        "`{fqn}` is a view of `{placeholder}`, which had no values when the model was built: a model built \
         without values must hold the tensors its VarBuilder gives, unchanged (transpose or reshape in forward)"
    )]
    MetaView {
        /// The parameter that is a view.
        fqn: String,
        /// The name the `VarBuilder` gave the placeholder it is a view of.
        placeholder: String,
    },
    /// The ranks built different models (world size, unit or tensor counts, names, dtypes
    /// or shapes), found when the ranks compare them at wrap time.
    #[error("rank {rank}: the ranks built different models: {detail}")]
    RanksDisagree {
        /// The global rank that reports the disagreement.
        rank: usize,
        /// What differs.
        detail: String,
    },
    /// A [`crate::Unit`] that an [`crate::Fsdp`] already wraps was wrapped again.
    #[error("a unit can be wrapped by one Fsdp only; build a new model for a second wrap")]
    AlreadyWrapped,
    /// [`crate::Fsdp::wrap_with_groups`] was given a group for a unit name the model
    /// does not have.
    #[error("a group is given for unit `{name}`, but the model has no such unit")]
    UnknownUnit {
        /// The unit name as given.
        name: String,
    },
    /// No trained parameter has the given FQN.
    #[error("no trained parameter is named `{fqn}`")]
    UnknownParameter {
        /// The FQN as given.
        fqn: String,
    },
    /// An FQN pattern selecting tensors ([`crate::FsdpConfig::frozen`], the tensors of an
    /// export) matches none of the model's.
    #[error("the pattern `{pattern}` selecting {selecting} matches nothing in the model")]
    PatternMatchesNothing {
        /// The pattern as given.
        pattern: String,
        /// What the patterns select.
        selecting: &'static str,
    },
    /// A parameter frozen by [`crate::FsdpConfig::frozen`] was named where only a trained
    /// one can be (a gradient hook, an optimizer's variables).
    #[error("`{fqn}` is frozen: it gets no gradient and is not trained ({what})")]
    FrozenParameter {
        /// The parameter's FQN.
        fqn: String,
        /// What asked for it.
        what: String,
    },
    /// The [`crate::MixedPrecision`] policy cannot apply to a unit's parameters.
    #[error("unit `{unit}`: the mixed-precision policy casts to {dtype:?}, but {problem}")]
    MixedPrecisionPolicy {
        /// The unit's name.
        unit: String,
        /// The dtype the policy casts to.
        dtype: candle_core::DType,
        /// Why the cast cannot apply.
        problem: String,
    },
    /// A policy parsed from a string (`FromStr` of [`crate::ShardingStrategy`] or
    /// [`crate::BackwardPrefetch`]) has no value of that name.
    #[error("unknown {what} `{value}` (expected one of: {expected})")]
    UnknownOption {
        /// What was parsed ("sharding strategy" or "backward prefetch").
        what: &'static str,
        /// The string given.
        value: String,
        /// The accepted names, separated by commas.
        expected: String,
    },
    /// Hybrid sharding cannot be set up as configured: the shard group size does not
    /// divide the world, or the strategy shards nothing.
    #[error("rank {rank}: hybrid sharding over groups of {size} ranks in a world of {world}: {problem}")]
    BadShardGroup {
        /// The global rank.
        rank: usize,
        /// The world size.
        world: usize,
        /// The shard group size asked for.
        size: usize,
        /// What is wrong.
        problem: String,
    },
    /// [`crate::ShardedGradScaler::new`] was given a [`crate::GradScalerConfig`] that
    /// cannot work (a scale not positive and finite, a growth factor not above 1, a
    /// backoff factor outside (0, 1), a growth interval of 0).
    #[error(
        "ShardedGradScaler: {config} cannot work (the scale must be positive and finite, the growth factor \
         above 1, the backoff factor between 0 and 1, the growth interval at least 1)"
    )]
    GradScalerArgument {
        /// The configuration, formatted with `Debug`.
        config: String,
    },
    /// [`crate::Fsdp::clip_grad_norm`] was given a `norm_type` below 1 or a negative
    /// `max_norm` (or a NaN).
    #[error("clip_grad_norm: {problem}")]
    ClipArgument {
        /// What is wrong with them.
        problem: String,
    },
}

/// A call made where it cannot work: a backward without its forward, a call in the
/// middle of a step, a pipeline pass out of order.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MisuseError {
    /// [`crate::Fsdp::backward`] was called with no training forward since the last
    /// backward.
    #[error(
        "rank {rank}: Fsdp::backward with no training forward since the last backward; run \
         `Fsdp::forward` first (an inference forward is not backpropagated)"
    )]
    BackwardWithoutForward {
        /// The global rank.
        rank: usize,
    },
    /// The loss given to [`crate::Fsdp::backward`] depends on no output of this step's
    /// forward (nor on any parameter shard), so no gradient would be produced.
    #[error(
        "rank {rank}: the loss given to Fsdp::backward reaches none of this step's forward outputs \
         (nor any parameter shard), so no gradient would be produced; compute the loss from the \
         tensors `Fsdp::forward` returned"
    )]
    LossReachesNoOutput {
        /// The global rank.
        rank: usize,
    },
    /// A call that needs a finished step ran between a forward and its backward.
    #[error("rank {rank}: {call} between a forward and its backward; finish the step first")]
    StepInProgress {
        /// The global rank.
        rank: usize,
        /// The refused call (e.g. "Fsdp::clip_grad_norm").
        call: &'static str,
    },
    /// [`crate::Fsdp::forward_inference`] or [`crate::Fsdp::summon_full_params`] ran
    /// inside one of the two.
    #[error("rank {rank}: {call} cannot run inside {inside}")]
    NestedCall {
        /// The global rank.
        rank: usize,
        /// The refused call.
        call: &'static str,
        /// The call already running.
        inside: &'static str,
    },
    /// A unit's forward started out of the model's static forward order, under
    /// [`crate::OrderCheck::Strict`] (under `Warn` the same message is logged instead).
    #[error("rank {rank}: unit `{unit}` started its forward at position {position}, where the static order has `{expected}`")]
    OrderViolation {
        /// The global rank.
        rank: usize,
        /// The unit that started.
        unit: String,
        /// How many distinct units started their forward before it in this step.
        position: usize,
        /// The unit the static order has at that position (`<none>` past its end).
        expected: String,
    },
    /// A weight whose gradient a pipeline stage deferred is neither a `Var` nor a
    /// parameter of the stage's gradient sink, so the weight pass has nowhere to put it.
    #[error(
        "a deferred weight of shape {shape} is neither a `Var` nor a parameter of the stage's gradient sink; \
         for an FSDP model, give the stage context `fsdp.deferred_grad_sink()`"
    )]
    StageWeightUnowned {
        /// The weight's shape, formatted.
        shape: String,
    },
    /// A stage output that tracks gradients was given `None` as its output gradient.
    #[error(
        "stage output {index} tracks gradients, so it requires output gradients from the next \
         stage, but output_grads[{index}] is None"
    )]
    StageOutputGradMissing {
        /// The output's index.
        index: usize,
    },
    /// A stage output and its output gradient differ in shape or dtype.
    #[error("stage output {index} is {output} but its output gradient is {grad}")]
    StageGradMismatch {
        /// The output's index.
        index: usize,
        /// The output's shape and dtype, formatted with `Debug`.
        output: String,
        /// The gradient's shape and dtype, formatted with `Debug`.
        grad: String,
    },
    /// A stage backward was given a different number of output gradients than
    /// outputs.
    #[error("{outputs} stage outputs but {grads} output gradients")]
    StageGradCount {
        /// The number of outputs.
        outputs: usize,
        /// The number of output gradients.
        grads: usize,
    },
    /// [`crate::pipeline::stage_backward_weight`] ran with no input pass since the last
    /// weight pass.
    #[error(
        "stage_backward_weight: no stage_backward_input ran since the last weight pass, so there \
         is no deferred weight work to compute"
    )]
    StageNoInputPass,
    /// A stage call (the field names it) ran while the stage context is in an input
    /// pass.
    #[error("{0} was called while the stage context is in an input pass")]
    StageReentrant(&'static str),
}

/// A checkpoint or export that cannot be written or loaded as asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A checkpoint file could not be read, written or parsed.
    #[error("rank {rank}: {}: {problem}", path.display())]
    CheckpointFile {
        /// The global rank.
        rank: usize,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// A tensor of a checkpoint is not as its metadata records it (a piece of another
    /// dtype or length, pieces that do not cover the value) or cannot be read or written.
    #[error("rank {rank}: {}: `{fqn}`: {problem}", path.display())]
    CheckpointTensor {
        /// The global rank.
        rank: usize,
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        fqn: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A checkpoint does not fit the model it is loaded into (missing or extra tensors,
    /// other shapes or dtypes, missing optimizer state).
    #[error("rank {rank}: {} does not fit this model:\n  {}", path.display(), problems.join("\n  "))]
    CheckpointMismatch {
        /// The global rank.
        rank: usize,
        /// The checkpoint file compared with the model.
        path: PathBuf,
        /// One line per difference.
        problems: Vec<String>,
    },
    /// A stage of a collective save or load failed on other ranks; this rank stops too,
    /// so that no rank goes on while another has given up.
    #[error(
        "rank {rank}: {stage} failed on rank(s) {failed:?} (their own errors say why); {}",
        if *kept_previous { "the previous checkpoints are untouched" } else { "nothing was loaded" }
    )]
    CheckpointPeerFailed {
        /// The global rank that reports.
        rank: usize,
        /// The stage that failed.
        stage: String,
        /// The ranks whose own work failed.
        failed: Vec<usize>,
        /// `true` for a save or export, where the previous checkpoints are untouched;
        /// `false` for a load, where nothing was loaded.
        kept_previous: bool,
    },
    /// A checkpoint operation is not implemented for this model (e.g. a model with a
    /// unit sharded over a group other than the world).
    #[error("rank {rank}: {what} is not supported yet: {why}")]
    CheckpointUnsupported {
        /// The global rank.
        rank: usize,
        /// The operation and what it applies to.
        what: String,
        /// Why it is not supported.
        why: String,
    },
}

/// The library's result type, with [`Error`] as the default error.
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

/// A boxed error: ours unpacked again, any other carried as [`Error::External`].
impl From<Box<dyn std::error::Error + Send + Sync + 'static>> for Error {
    fn from(error: Box<dyn std::error::Error + Send + Sync + 'static>) -> Self {
        match error.downcast::<Error>() {
            Ok(ours) => *ours,
            Err(other) => match other.downcast::<candle_core::Error>() {
                Ok(candle) => Error::from(*candle),
                Err(other) => Error::External(other),
            },
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(error: std::io::Error) -> Self {
        if error.get_ref().is_some_and(|e| e.is::<Error>()) {
            let inner = error.into_inner().expect("checked: the io error carries an error");
            return *inner.downcast::<Error>().expect("checked: the carried error is ours");
        }
        Error::External(Box::new(error))
    }
}

impl From<anyhow::Error> for Error {
    fn from(error: anyhow::Error) -> Self {
        match error.downcast::<Error>() {
            Ok(ours) => ours,
            Err(other) => match other.downcast::<candle_core::Error>() {
                Ok(candle) => Error::from(candle),
                Err(other) => Error::External(other.into()),
            },
        }
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
    use std::time::Duration;

    #[test]
    fn a_typed_error_survives_a_trip_through_candle() {
        let original = Error::Comm(fsdp_comm::Error::CollectiveTimeout {
            rank: 3,
            op: "all_gather".into(),
            label: "unit `layers.1`".into(),
            timeout: Duration::from_secs(2),
            missing: vec![1],
        });
        let message = original.to_string();
        let through_candle = into_candle(original);
        assert_eq!(through_candle.to_string(), message, "candle shows the message unchanged");
        // candle adds a backtrace when RUST_BACKTRACE is set; the error is found inside it.
        let with_backtrace = candle_core::Error::WithBacktrace {
            inner: Box::new(through_candle),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        match Error::from(with_backtrace) {
            Error::Comm(fsdp_comm::Error::CollectiveTimeout { rank: 3, missing, .. }) => assert_eq!(missing, [1]),
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
