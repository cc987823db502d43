//! Errors of the runtime. Each names what a user needs to find the fault: the FQNs, the
//! units, and (once ranks run) the rank and the operation.

/// The runtime's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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

    #[error("rank {rank}: {op} for {label} timed out after {timeout:?}; rank(s) {missing:?} never joined")]
    CollectiveTimeout { rank: usize, op: String, label: String, timeout: std::time::Duration, missing: Vec<usize> },

    #[error("rank {rank}: {op} for {label} was aborted: {reason}")]
    CollectiveAborted { rank: usize, op: String, label: String, reason: String },

    #[error("rank {rank}: {op} for {label} does not match {other}")]
    CollectiveMismatch { rank: usize, op: String, label: String, other: String },

    #[error("rank {rank} panicked: {message}")]
    RankPanicked { rank: usize, message: String },

    #[error("rank {rank}: {message}")]
    Rank { rank: usize, message: String },

    #[error(
        "a deferred weight of shape {shape} is neither a `Var` nor a parameter of the stage's gradient sink; \
         for an FSDP model, give the stage context `fsdp.deferred_grad_sink()`"
    )]
    StageWeightUnowned { shape: String },

    #[error("invalid configuration: {0}")]
    Config(String),

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

    #[error("rank {rank}: rendezvous at {addr}: {message}")]
    Rendezvous { rank: usize, addr: String, message: String },

    #[error(
        "the launch environment (torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, \
         MASTER_PORT) is not usable: {}",
        problems.join("; ")
    )]
    LaunchEnv { problems: Vec<String> },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
