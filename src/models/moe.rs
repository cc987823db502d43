//! Mixtral's sparse mixture of experts: a router picks `top_k` of `num_experts` SiLU-gated
//! MLPs for each token and mixes their outputs by its renormalised probabilities; the
//! router's load-balancing loss (Switch Transformer's) keeps the experts evenly used.
//!
//! Under FSDP the experts stay in their decoder layer's unit: which expert a token reaches
//! depends on the data, so ranks route differently, but every rank gathers and reduces
//! the same unit in the same order. Each expert runs on the rows routed to it on this
//! rank, none if none are: its gradient is then zero, not missing, so every rank reduces
//! the same tensors.

use super::lora::{LoraConfig, LoraLinear};
use super::{softmax_last_dim, Kernels};
use crate::Shardable;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// The experts of a Mixtral layer (Hugging Face `num_local_experts`,
/// `num_experts_per_tok`, `router_aux_loss_coef`).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    /// Experts per layer.
    pub num_experts: usize,
    /// Experts each token is sent to.
    pub top_k: usize,
    /// The weight of the router's load-balancing loss in [`super::llama::Llama::loss`];
    /// `None` leaves it out (Hugging Face's `output_router_logits: false`).
    pub router_aux_loss_coef: Option<f64>,
}

/// One expert: `w2(silu(w1 x) · w3 x)`.
#[derive(Clone, Debug, Shardable)]
pub struct Expert {
    /// `(intermediate_size, hidden_size)`: the gate.
    pub w1: LoraLinear,
    /// `(hidden_size, intermediate_size)`: the projection back.
    pub w2: LoraLinear,
    /// `(intermediate_size, hidden_size)`: the gated value.
    pub w3: LoraLinear,
    /// The kernels the forward runs on.
    #[fsdp(skip)]
    pub kernels: Kernels,
}

impl Module for Expert {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.w1.forward(x)?, self.w3.forward(x)?);
        match self.kernels {
            Kernels::Fused => self.w2.forward(&crate::ops::swiglu(&gate, &up)?),
            Kernels::Composed => self.w2.forward(&(gate.silu()? * up)?),
        }
    }
}

/// Mixtral's `block_sparse_moe`: the router (`gate`) and the experts.
#[derive(Clone, Debug, Shardable)]
pub struct SparseMoe {
    /// The router, `(num_experts, hidden_size)`.
    pub gate: LoraLinear,
    /// The experts (`experts.{e}`).
    pub experts: Vec<Expert>,
    /// Experts each token is sent to.
    pub top_k: usize,
}

impl SparseMoe {
    /// The block under `vb`, every matrix drawn from `init`; LoRA adapters where `lora`
    /// targets an expert's `w1`, `w2` or `w3`.
    pub fn new(
        hidden: usize,
        intermediate: usize,
        config: &MoeConfig,
        init: Init,
        lora: Option<&LoraConfig>,
        kernels: Kernels,
        vb: VarBuilder,
    ) -> Result<Self> {
        if config.top_k == 0 || config.top_k > config.num_experts {
            candle_core::bail!("Mixtral: {} experts per token out of {}", config.top_k, config.num_experts)
        }
        let linear = |i: usize, o: usize, vb: VarBuilder| LoraLinear::new(i, o, init, false, lora, kernels, vb);
        let experts = (0..config.num_experts)
            .map(|e| {
                let vb = vb.pp("experts").pp(e);
                Ok(Expert {
                    w1: linear(hidden, intermediate, vb.pp("w1"))?,
                    w2: linear(intermediate, hidden, vb.pp("w2"))?,
                    w3: linear(hidden, intermediate, vb.pp("w3"))?,
                    kernels,
                })
            })
            .collect::<Result<_>>()?;
        let gate = LoraLinear::new(hidden, config.num_experts, init, false, None, kernels, vb.pp("gate"))?;
        Ok(Self { gate, experts, top_k: config.top_k })
    }

    /// The expert projections, for the check that LoRA targets something.
    pub(crate) fn projections(&self) -> impl Iterator<Item = &LoraLinear> {
        self.experts.iter().flat_map(|e| [&e.w1, &e.w2, &e.w3])
    }

    /// `x` `(batch, seq, hidden)` to the experts' mix, and the router's logits
    /// `(batch · seq, num_experts)` for the load-balancing loss.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, s, hidden) = x.dims3()?;
        let rows = x.reshape((b * s, hidden))?;
        let logits = self.gate.forward(&rows)?;
        // The router's probabilities in f32, as Hugging Face computes them.
        let probs = softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
        let chosen = largest(&probs.to_vec2::<f32>()?, self.top_k);
        let device = x.device();
        let index =
            Tensor::from_vec(chosen.iter().flatten().copied().collect::<Vec<u32>>(), (b * s, self.top_k), device)?;
        let picked = probs.gather(&index, 1)?;
        let weights = picked.broadcast_div(&picked.sum_keepdim(1)?)?.flatten_all()?;
        let mut out = rows.zeros_like()?;
        for (e, expert) in self.experts.iter().enumerate() {
            // The rows routed to expert `e` and where its weight is in `weights`.
            let (tokens, slots): (Vec<u32>, Vec<u32>) = chosen
                .iter()
                .enumerate()
                .flat_map(|(t, experts)| {
                    experts.iter().enumerate().filter(move |(_, &x)| x as usize == e).map(move |(k, _)| (t, k))
                })
                .map(|(t, k)| (t as u32, (t * self.top_k + k) as u32))
                .unzip();
            let (tokens, slots) = (Tensor::new(tokens.as_slice(), device)?, Tensor::new(slots.as_slice(), device)?);
            let y = expert.forward(&rows.index_select(&tokens, 0)?)?;
            let y = y.broadcast_mul(&weights.index_select(&slots, 0)?.to_dtype(y.dtype())?.unsqueeze(1)?)?;
            out = out.index_add(&tokens, &y, 0)?;
        }
        Ok((out.reshape((b, s, hidden))?, logits))
    }
}

/// For each row of probabilities, the indices of its `k` largest, largest first (the
/// lower index first among equals).
fn largest(probs: &[Vec<f32>], k: usize) -> Vec<Vec<u32>> {
    probs
        .iter()
        .map(|row| {
            let mut order: Vec<u32> = (0..row.len() as u32).collect();
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            order.truncate(k);
            order
        })
        .collect()
}

/// The router's load-balancing loss over all layers' logits (each `(tokens, experts)`),
/// as Hugging Face's `load_balancing_loss_func` computes it without a mask: `experts ·
/// Σ_e f_e · P_e`, with `f_e` the share of (token, slot) picks that went to expert `e`
/// and `P_e` its mean probability, both over every layer's tokens. Only `P` carries a
/// gradient.
pub fn load_balancing_loss(router_logits: &[Tensor], top_k: usize) -> Result<Tensor> {
    let Some(first) = router_logits.first() else {
        candle_core::bail!("the load-balancing loss needs the router logits of at least one layer")
    };
    let experts = first.dim(1)?;
    let probs = softmax_last_dim(&Tensor::cat(router_logits, 0)?.to_dtype(DType::F32)?)?;
    let rows = probs.dim(0)?;
    let mut picks = vec![0f32; experts];
    for chosen in largest(&probs.to_vec2::<f32>()?, top_k) {
        for e in chosen {
            picks[e as usize] += 1.0;
        }
    }
    let share = Tensor::from_vec(picks, experts, probs.device())?.affine(1.0 / rows as f64, 0.0)?;
    let mean_probs = probs.mean(0)?;
    (share * mean_probs)?.sum_all()?.affine(experts as f64, 0.0)
}
