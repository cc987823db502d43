//! The constants of one AdamW step, shared by the CPU update and the CUDA kernels.

/// One step's constants: the hyper-parameters and the bias corrections
/// `1 / (1 − β^t)` of step `t`.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// `1 / (1 − beta1^t)`.
    pub scale_m: f64,
    /// `1 / (1 − beta2^t)`.
    pub scale_v: f64,
}
