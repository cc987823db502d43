//! [`LlamaMlp`]: the gated MLP (SwiGLU, or Gemma's GeGLU).

use super::super::lora::LoraLinear;
use super::super::Kernels;
use super::config::{Family, LlamaConfig};
use crate::Shardable;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// The SiLU-gated MLP: `down_proj(silu(gate_proj(x)) · up_proj(x))`.
#[derive(Clone, Debug, Shardable)]
pub struct LlamaMlp {
    /// `(intermediate_size, hidden_size)`: the gate, through SiLU (not in Phi-3).
    pub gate_proj: Option<LoraLinear>,
    /// `(intermediate_size, hidden_size)`: the gated value (not in Phi-3).
    pub up_proj: Option<LoraLinear>,
    /// Phi-3's `gate_proj` and `up_proj` stacked, in that order.
    pub gate_up_proj: Option<LoraLinear>,
    /// `(hidden_size, intermediate_size)`: the projection back.
    pub down_proj: LoraLinear,
    /// What the gate goes through: SiLU, or Gemma's tanh-approximated GELU.
    #[fsdp(skip)]
    pub activation: Activation,
    /// The kernels the forward runs on.
    #[fsdp(skip)]
    pub kernels: Kernels,
}

/// The gate's activation of a gated MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (SwiGLU).
    Silu,
    /// `gelu_pytorch_tanh` (GeGLU).
    GeluTanh,
}

impl LlamaMlp {
    /// The projections under `vb` (`gate_proj`, `up_proj`, `down_proj`), initialised
    /// `N(0, initializer_range)`.
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        let fused = config.family == Family::Phi3;
        let separate = |name: &str| (!fused).then(|| config.projection(hidden, inter, false, vb.pp(name))).transpose();
        Ok(Self {
            gate_proj: separate("gate_proj")?,
            up_proj: separate("up_proj")?,
            gate_up_proj: fused
                .then(|| config.projection(hidden, 2 * inter, false, vb.pp("gate_up_proj")))
                .transpose()?,
            down_proj: config.projection(inter, hidden, false, vb.pp("down_proj"))?,
            activation: if config.gemma.is_some() { Activation::GeluTanh } else { Activation::Silu },
            kernels: config.kernels,
        })
    }
    /// The projections, in the order of the FQN table.
    pub(super) fn projections(&self) -> impl Iterator<Item = &LoraLinear> {
        [&self.gate_proj, &self.up_proj, &self.gate_up_proj].into_iter().flatten().chain([&self.down_proj])
    }

    /// The gate and the gated value of `x`: two products, or Phi-3's one, split.
    fn gate_up(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        match (&self.gate_up_proj, &self.gate_proj, &self.up_proj) {
            (Some(both), None, None) => {
                let all = both.forward(x)?;
                let half = all.dim(candle_core::D::Minus1)? / 2;
                let part = |start: usize| all.narrow(candle_core::D::Minus1, start, half)?.contiguous();
                Ok((part(0)?, part(half)?))
            }
            (None, Some(gate), Some(up)) => Ok((gate.forward(x)?, up.forward(x)?)),
            _ => candle_core::bail!("LlamaMlp: either gate_proj and up_proj, or gate_up_proj"),
        }
    }
}

impl Module for LlamaMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = self.gate_up(x)?;
        let gated = match (self.activation, self.kernels) {
            (Activation::Silu, Kernels::Fused) => crate::ops::swiglu(&gate, &up)?,
            (Activation::Silu, Kernels::Composed) => (gate.silu()? * up)?,
            // candle's `gelu` is the tanh approximation; no fused GeGLU yet.
            (Activation::GeluTanh, _) => (gate.gelu()? * up)?,
        };
        self.down_proj.forward(&gated)
    }
}
