//! LoRA: a trained low-rank update beside a frozen linear weight, as PEFT computes and
//! names it, `y = x Wᵀ (+ b) + scale · (x Aᵀ) Bᵀ` with `A` (`lora_A.weight`, `r × in`) and `B`
//! (`lora_B.weight`, `out × r`) next to the layer's `weight`.
//!
//! A model that builds its linear layers as [`LoraLinear`] (the bundled Llama does) gets
//! adapters on the layers a [`LoraConfig`] names; wrapped with
//! `FsdpConfig::freeze(LoraConfig::FROZEN)`, only the adapters are trained, and they are
//! sharded, gathered and reduced like any parameter. [`super::peft`] reads and writes
//! them in PEFT's files.

use super::{affine, Kernels};
use crate::Shardable;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Which linear layers get adapters, of what rank and scale (PEFT's `LoraConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// The rank `r` of the update.
    pub r: usize,
    /// `lora_alpha`: the update is scaled by `alpha / r` (`alpha / √r` with `use_rslora`).
    pub alpha: f64,
    /// PEFT's `target_modules` as a list: a layer is adapted when its FQN is one of these
    /// names or ends with `.` and one of them (`q_proj` adapts every `…self_attn.q_proj`).
    pub target_modules: Vec<String>,
    /// Rank-stabilised LoRA's scale, `alpha / √r`.
    pub use_rslora: bool,
}

impl LoraConfig {
    /// The patterns of [`crate::FsdpConfig::freeze`] that train the adapters alone.
    pub const FROZEN: [&'static str; 3] = ["*", "!*.lora_A.weight", "!*.lora_B.weight"];

    /// Adapters of rank `r` scaled by `alpha / r` on the layers named `target_modules`.
    pub fn new<S: Into<String>>(r: usize, alpha: f64, target_modules: impl IntoIterator<Item = S>) -> Self {
        Self { r, alpha, target_modules: target_modules.into_iter().map(Into::into).collect(), use_rslora: false }
    }

    /// What the update `(x Aᵀ) Bᵀ` is multiplied by.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether the linear layer at `module` (its FQN, without `.weight`) gets adapters.
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| module == t || module.strip_suffix(t.as_str()).is_some_and(|p| p.ends_with('.')))
    }
}

/// A linear layer without bias that may carry LoRA adapters: `x Wᵀ`, plus
/// `scale · (x Aᵀ) Bᵀ` when it has them. Its parameters are `weight`, `lora_A.weight` and
/// `lora_B.weight`, PEFT's names below the layer.
#[derive(Clone, Debug, Shardable)]
pub struct LoraLinear {
    /// `(out_features, in_features)`.
    pub weight: Tensor,
    /// `(out_features)`, where the layer has one.
    pub bias: Option<Tensor>,
    /// `(r, in_features)`.
    #[fsdp(rename = "lora_A.weight")]
    pub lora_a: Option<Tensor>,
    /// `(out_features, r)`.
    #[fsdp(rename = "lora_B.weight")]
    pub lora_b: Option<Tensor>,
    /// What the update is multiplied by.
    pub scale: f64,
    /// The kernels the products run on.
    #[fsdp(skip)]
    pub kernels: Kernels,
}

impl LoraLinear {
    /// The layer `in_dim → out_dim` under `vb` (its weight drawn from `init`, a bias
    /// starting at zero if `bias`), with adapters when `lora` targets `vb`'s prefix:
    /// `lora_A` drawn as PEFT draws it (as `nn.Linear` does, uniform in `±1/√in_dim`),
    /// `lora_B` zero, so a fresh adapter changes nothing; f32 on an f16 or bf16 base.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        init: Init,
        bias: bool,
        lora: Option<&LoraConfig>,
        kernels: Kernels,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = bias.then(|| vb.get_with_hints(out_dim, "bias", Init::Const(0.0))).transpose()?;
        let Some(lora) = lora.filter(|l| l.targets(&vb.prefix())) else {
            return Ok(Self { weight, bias, lora_a: None, lora_b: None, scale: 0.0, kernels });
        };
        if lora.r == 0 {
            candle_core::bail!("LoRA: the rank of the adapters on `{}` is 0", vb.prefix())
        }
        let bound = 1.0 / (in_dim as f64).sqrt();
        // On a half-precision base the adapters are f32, as PEFT keeps them
        // (`autocast_adapter_dtype`): their small updates would round away in bf16.
        let dtype = match vb.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            other => other,
        };
        let uniform = Init::Uniform { lo: -bound, up: bound };
        let a = vb.pp("lora_A").get_with_hints_dtype((lora.r, in_dim), "weight", uniform, dtype)?;
        let b = vb.pp("lora_B").get_with_hints_dtype((out_dim, lora.r), "weight", Init::Const(0.0), dtype)?;
        Ok(Self { weight, bias, lora_a: Some(a), lora_b: Some(b), scale: lora.scale(), kernels })
    }

    fn adapters(&self) -> Result<Option<(&Tensor, &Tensor)>> {
        match (&self.lora_a, &self.lora_b) {
            (Some(a), Some(b)) => Ok(Some((a, b))),
            (None, None) => Ok(None),
            _ => candle_core::bail!("LoraLinear: `lora_A` and `lora_B` come together"),
        }
    }

    fn product(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        match self.kernels {
            Kernels::Fused => crate::ops::linear(x, weight),
            Kernels::Composed => affine(x, weight, None),
        }
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let base = self.product(x, &self.weight)?;
        let base = match &self.bias {
            Some(bias) => base.broadcast_add(bias)?,
            None => base,
        };
        match self.adapters()? {
            None => Ok(base),
            // The adapters may be of another dtype than the base (f32 on bf16): the
            // update is computed in theirs and added in the base's.
            Some((a, b)) => {
                let low = self.product(&x.to_dtype(a.dtype())?, a)?;
                let update = (self.product(&low, b)? * self.scale)?.to_dtype(base.dtype())?;
                base + update
            }
        }
    }
}
