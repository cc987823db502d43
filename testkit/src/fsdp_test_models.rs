//! The reference models of PyTorch's FSDP test suite (`torch/testing/_internal/common_fsdp.py`
//! and the FSDP2 autograd tests), ported for parity tests.
//!
//! Each keeps PyTorch's parameter names and its FSDP wrapping as [`Unit`] fields, so a
//! model's FQN table and unit grouping are those the PyTorch tests observe. PyTorch's
//! `nn.Sequential` children are named `0`, `1`, …; here they are tuple structs, whose
//! fields have exactly those names.
//!
//! Linear layers are initialised with PyTorch's default `nn.Linear` distribution
//! (`U(±1/sqrt(fan_in))`), embeddings with `N(0, 1)`; the values differ from PyTorch's
//! (another random generator), so parity tests compare against a reference built from the
//! same `VarMap`.

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor};
use candle_fsdp::models::transformer::{Transformer, TransformerConfig};
use candle_fsdp::models::{log_softmax_last_dim, torch_linear, torch_linear_init};
use candle_fsdp::{Activations, Shardable, Unit};
use candle_nn::{BatchNorm, BatchNormConfig, Embedding, Init, Linear, VarBuilder};
use std::collections::HashMap;

// ---------------------------------------------------------------------------------------
// NestedWrappedModule

/// `NestedWrappedModule`: `module = Sequential(Linear(8,4), W(Sequential(W(Linear(4,16)),
/// Linear(16,16))), W(Linear(16,4)), Linear(4,8))` with `W` an FSDP wrap, and no
/// activations (`forward` is `self.module(x)`).
///
/// Four units, as PyTorch's RECURSIVE init plus the parity helper's top-level wrap give:
/// the root (`module.0`, `module.3`), `module.1` (`module.1.1`), `module.1.0` and
/// `module.2`. Input `(batch, 8)`, output `(batch, 8)`; the tests use `rand(4, 8)` and the
/// loss `output.sum()`.
#[derive(Debug, Shardable)]
pub struct NestedWrappedModule {
    pub module: NestedSequential,
}

/// The outer `nn.Sequential` of [`NestedWrappedModule`].
#[derive(Debug, Shardable)]
pub struct NestedSequential(pub Linear, pub Unit<NestedInnerSequential>, pub Unit<Linear>, pub Linear);

/// The inner `nn.Sequential(W(Linear(4,16)), Linear(16,16))`.
#[derive(Debug, Shardable)]
pub struct NestedInnerSequential(pub Unit<Linear>, pub Linear);

impl NestedWrappedModule {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("module");
        let inner = vb.pp("1");
        Ok(Self {
            module: NestedSequential(
                torch_linear(8, 4, vb.pp("0"))?,
                Unit::new(NestedInnerSequential(
                    Unit::new(torch_linear(4, 16, inner.pp("0"))?),
                    torch_linear(16, 16, inner.pp("1"))?,
                )),
                Unit::new(torch_linear(16, 4, vb.pp("2"))?),
                torch_linear(4, 8, vb.pp("3"))?,
            ),
        })
    }
}

impl Module for NestedInnerSequential {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.1.forward(&self.0.forward(x)?)
    }
}

impl Module for NestedSequential {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.0.forward(x)?;
        let x = self.1.forward(&x)?;
        let x = self.2.forward(&x)?;
        self.3.forward(&x)
    }
}

impl Module for NestedWrappedModule {
    /// `x` `(batch, 8)` to `(batch, 8)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.module.forward(x)
    }
}

/// `AlwaysWrapNestedWrappedModule`: the same model and names as [`NestedWrappedModule`],
/// wrapped with PyTorch's `always_wrap_policy`: every `Linear` and every `Sequential`
/// (including the outer `module`) is a unit, and the root unit holds no parameters.
/// Eight units: root, `module`, `module.0`, `module.1`, `module.1.0`, `module.1.1`,
/// `module.2`, `module.3`.
#[derive(Debug, Shardable)]
pub struct AlwaysWrapNestedWrappedModule {
    pub module: Unit<AlwaysWrapSequential>,
}

/// The outer `nn.Sequential` of [`AlwaysWrapNestedWrappedModule`].
#[derive(Debug, Shardable)]
pub struct AlwaysWrapSequential(
    pub Unit<Linear>,
    pub Unit<AlwaysWrapInnerSequential>,
    pub Unit<Linear>,
    pub Unit<Linear>,
);

/// The inner `nn.Sequential` of [`AlwaysWrapNestedWrappedModule`].
#[derive(Debug, Shardable)]
pub struct AlwaysWrapInnerSequential(pub Unit<Linear>, pub Unit<Linear>);

impl AlwaysWrapNestedWrappedModule {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("module");
        let inner = vb.pp("1");
        Ok(Self {
            module: Unit::new(AlwaysWrapSequential(
                Unit::new(torch_linear(8, 4, vb.pp("0"))?),
                Unit::new(AlwaysWrapInnerSequential(
                    Unit::new(torch_linear(4, 16, inner.pp("0"))?),
                    Unit::new(torch_linear(16, 16, inner.pp("1"))?),
                )),
                Unit::new(torch_linear(16, 4, vb.pp("2"))?),
                Unit::new(torch_linear(4, 8, vb.pp("3"))?),
            )),
        })
    }
}

impl Module for AlwaysWrapInnerSequential {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.1.forward(&self.0.forward(x)?)
    }
}

impl Module for AlwaysWrapSequential {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.0.forward(x)?;
        let x = self.1.forward(&x)?;
        let x = self.2.forward(&x)?;
        self.3.forward(&x)
    }
}

impl Module for AlwaysWrapNestedWrappedModule {
    /// `x` `(batch, 8)` to `(batch, 8)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.module.forward(x)
    }
}

// ---------------------------------------------------------------------------------------
// TransformerWithSharedParams

/// `TransformerWithSharedParams` (`add_bn` selectable), as the deterministic PyTorch tests
/// run it: in `eval()` mode, so dropout is off and BatchNorm normalises with its running
/// statistics (which therefore never change).
///
/// - `embed_tokens = Embedding(23, 16)`;
/// - `transformer = nn.Transformer(d_model=16, nhead=8, 2 encoder + 2 decoder layers,
///   dim_feedforward=8)`, each layer a unit (PyTorch's `ModuleWrapPolicy`);
/// - `output_proj = Linear(16, 23)` whose weight **is** `embed_tokens.weight` (one tensor
///   at two FQNs; `output_proj.bias` is its own parameter);
/// - buffers `vocab_bias = ones(16)` and `long_buffer = zeros(16)`;
/// - `bn = BatchNorm1d(2)` (its running statistics are buffers).
///
/// The root unit holds the embedding (and so the tied projection), `output_proj.bias`,
/// the two final transformer norms, the buffers and `bn`.
///
/// The buffers live in the `VarMap` under their FQNs (so the `VarMap`'s keys are the
/// model's FQNs) and the forward detaches them, so they never receive a gradient and an
/// optimiser leaves them unchanged, like PyTorch buffers.
#[derive(Debug, Shardable)]
#[fsdp(forward_order(embed_tokens, vocab_bias, long_buffer, bn, transformer, output_proj))]
pub struct TransformerWithSharedParams {
    pub embed_tokens: Embedding,
    pub transformer: Transformer,
    /// Tied: `output_proj.weight()` is the same tensor as `embed_tokens.embeddings()`.
    pub output_proj: Linear,
    #[fsdp(buffer)]
    pub vocab_bias: Tensor,
    /// PyTorch's `long_buffer` is `zeros(16, dtype=long)`, only ever used as
    /// `long_buffer.type_as(src)`; it is kept here as an **f32** (model-dtype) zeros buffer,
    /// which adds exactly the same zeros and keeps every tensor of the model floating-point.
    #[fsdp(buffer)]
    pub long_buffer: Tensor,
    /// `BatchNorm1d(2)`, absent when built with `add_bn = false` (PyTorch's `Identity`).
    pub bn: Option<BatchNorm>,
}

impl TransformerWithSharedParams {
    pub const D_VOCAB: usize = 23;
    pub const D_MODEL: usize = 16;
    /// The batch size the model is built for: `bn` has one channel per batch element.
    pub const BATCH_SIZE: usize = 2;

    /// The transformer's configuration.
    pub fn transformer_config() -> TransformerConfig {
        TransformerConfig {
            d_model: Self::D_MODEL,
            nhead: 8,
            num_encoder_layers: 2,
            num_decoder_layers: 2,
            dim_feedforward: 8,
            layer_norm_eps: 1e-5,
        }
    }

    pub fn new(add_bn: bool, vb: VarBuilder) -> Result<Self> {
        let embed_tokens = candle_nn::embedding(Self::D_VOCAB, Self::D_MODEL, vb.pp("embed_tokens"))?;
        let transformer = Transformer::new(&Self::transformer_config(), vb.pp("transformer"))?;
        let output_bias =
            vb.pp("output_proj").get_with_hints(Self::D_VOCAB, "bias", torch_linear_init(Self::D_MODEL))?;
        let output_proj = Linear::new(embed_tokens.embeddings().clone(), Some(output_bias));
        let vocab_bias = vb.get_with_hints(Self::D_MODEL, "vocab_bias", Init::Const(1.0))?;
        let long_buffer = vb.get_with_hints(Self::D_MODEL, "long_buffer", Init::Const(0.0))?;
        let bn = if add_bn {
            Some(candle_nn::batch_norm(Self::BATCH_SIZE, BatchNormConfig::default(), vb.pp("bn"))?)
        } else {
            None
        };
        Ok(Self { embed_tokens, transformer, output_proj, vocab_bias, long_buffer, bn })
    }

    /// PyTorch's `get_input`: `src = arange(12).view(6, 2)`, `tgt = arange(8).view(4, 2)`
    /// (time × batch, u32 token ids).
    pub fn get_input(device: &Device) -> Result<(Tensor, Tensor)> {
        let src = Tensor::arange(0u32, 12, device)?.reshape((6, Self::BATCH_SIZE))?;
        let tgt = Tensor::arange(0u32, 8, device)?.reshape((4, Self::BATCH_SIZE))?;
        Ok((src, tgt))
    }

    /// `src_ids` `(S, 2)` and `tgt_ids` `(T, 2)` to logits `(T, 2, 23)`:
    /// `src = embed(src_ids) + vocab_bias + long_buffer`, `tgt = bn(embed(tgt_ids))`,
    /// `output_proj(transformer(src, tgt))`.
    pub fn forward(&self, src_ids: &Tensor, tgt_ids: &Tensor) -> Result<Tensor> {
        let src = self.embed_tokens.forward(src_ids)?;
        let src = src.broadcast_add(&self.vocab_bias.detach())?.broadcast_add(&self.long_buffer.detach())?;
        let tgt = self.embed_tokens.forward(tgt_ids)?;
        let tgt = match &self.bn {
            // `BatchNorm1d` on `(T, B, D)` takes dim 1 (the batch, of size 2) as its
            // channels; eval mode uses the running statistics.
            Some(bn) => {
                let batch = tgt.dim(1)?;
                if batch != Self::BATCH_SIZE {
                    candle_core::bail!(
                        "TransformerWithSharedParams: bn normalises over dim 1, which must be {} (the batch), got {batch}",
                        Self::BATCH_SIZE
                    )
                }
                bn.forward_t(&tgt, false)?
            }
            None => tgt,
        };
        let x = self.transformer.forward(&src, &tgt)?;
        self.output_proj.forward(&x)
    }

    /// PyTorch's `get_loss`: `cross_entropy(out.view(-1, 23), tgt.view(-1), reduction="sum")`.
    pub fn get_loss(tgt_ids: &Tensor, output: &Tensor) -> Result<Tensor> {
        let vocab = output.dim(candle_core::D::Minus1)?;
        let logits = output.reshape(((), vocab))?;
        let targets = tgt_ids.flatten_all()?.to_dtype(DType::U32)?;
        let log_probs = log_softmax_last_dim(&logits)?;
        log_probs.gather(&targets.unsqueeze(1)?, 1)?.sum_all()?.neg()
    }
}

// ---------------------------------------------------------------------------------------
// DoubleLinear and MLP (FSDP2 autograd tests)

/// `relu(lin1(x))`, and `relu(lin2(x))` when `use_second_linear`.
fn double_linear_forward(
    lin1: &Unit<Linear>,
    lin2: &impl Module,
    use_second_linear: bool,
    x: &Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let out1 = lin1.forward(x)?.relu()?;
    let out2 = if use_second_linear { Some(lin2.forward(x)?.relu()?) } else { None };
    Ok((out1, out2))
}

/// `DoubleLinear(dim, use_second_linear)` sharded as in `test_unused_forward_output`:
/// `fully_shard(lin1)` then `fully_shard(root)`, so `lin1` is a unit and the root holds
/// `lin2`. `forward` returns `(relu(lin1(x)), Some(relu(lin2(x))))`, or `(…, None)` when
/// `use_second_linear` is false (then `lin2` is never used).
#[derive(Debug, Shardable)]
pub struct DoubleLinear {
    pub lin1: Unit<Linear>,
    pub lin2: Linear,
    pub use_second_linear: bool,
}

impl DoubleLinear {
    pub fn new(dim: usize, use_second_linear: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            lin1: Unit::new(torch_linear(dim, dim, vb.pp("lin1"))?),
            lin2: torch_linear(dim, dim, vb.pp("lin2"))?,
            use_second_linear,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        double_linear_forward(&self.lin1, &self.lin2, self.use_second_linear, x)
    }
}

/// `DoubleLinear` sharded as in `test_unused_forward_module`: `fully_shard` on `lin1`, on
/// `lin2` and on the root (which then holds no parameters). Same forward as [`DoubleLinear`].
#[derive(Debug, Shardable)]
pub struct DoubleLinearEachUnit {
    pub lin1: Unit<Linear>,
    pub lin2: Unit<Linear>,
    pub use_second_linear: bool,
}

impl DoubleLinearEachUnit {
    pub fn new(dim: usize, use_second_linear: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            lin1: Unit::new(torch_linear(dim, dim, vb.pp("lin1"))?),
            lin2: Unit::new(torch_linear(dim, dim, vb.pp("lin2"))?),
            use_second_linear,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        double_linear_forward(&self.lin1, &self.lin2, self.use_second_linear, x)
    }
}

/// `MLP(dim)` of the FSDP2 tests: `in_proj = Linear(dim, 4·dim)`, `out_proj =
/// Linear(4·dim, dim)`, `relu(out_proj(relu(in_proj(x))))`; sharded as in
/// `test_post_acc_grad_hook_runs` (`fully_shard` on `in_proj`, `out_proj` and the root).
#[derive(Debug, Shardable)]
pub struct Mlp {
    pub in_proj: Unit<Linear>,
    pub out_proj: Unit<Linear>,
}

impl Mlp {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            in_proj: Unit::new(torch_linear(dim, 4 * dim, vb.pp("in_proj"))?),
            out_proj: Unit::new(torch_linear(4 * dim, dim, vb.pp("out_proj"))?),
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out_proj.forward(&self.in_proj.forward(x)?.relu()?)?.relu()
    }
}

// ---------------------------------------------------------------------------------------
// MixtureOfExperts

/// `MixtureOfExperts` of `common_fsdp.py`: `module = Sequential(Linear(8, 12), shared,
/// expert, Linear(12, 8))` with `shared = Linear(12, 23)` and `expert = Linear(23, 12)`,
/// no activations (`forward` is `self.module(x)`).
///
/// Three units, as PyTorch wraps it: the root (`module.0`, `module.3`), the shared layer
/// `module.1` (sharded over the world) and the expert `module.2`. PyTorch builds the
/// expert from a per-rank seed and wraps it on a one-rank group (`new_group([rank])`), so
/// every rank keeps its own expert, whole and never reduced; here that is
/// [`Fsdp::wrap_with_groups`](candle_fsdp::Fsdp::wrap_with_groups) with a size-1 group for
/// [`MixtureOfExperts::EXPERT_UNIT`], and the per-rank values are the caller's (build
/// each rank's model from its own values). Input `(batch, 8)`, output `(batch, 8)`; the
/// tests use `rand(4, 8)` and `output.sum()` like `NestedWrappedModule`.
#[derive(Debug, Shardable)]
pub struct MixtureOfExperts {
    pub module: MixtureOfExpertsSequential,
}

/// The `nn.Sequential(Linear(8, 12), shared, expert, Linear(12, 8))` of [`MixtureOfExperts`].
#[derive(Debug, Shardable)]
pub struct MixtureOfExpertsSequential(pub Linear, pub Unit<Linear>, pub Unit<Linear>, pub Linear);

impl MixtureOfExperts {
    pub const D_EXPERT: usize = 23;
    pub const D_SHARED: usize = 12;
    pub const D_INPUT: usize = 8;
    /// The unit of the shared layer, `Linear(12, 23)`.
    pub const SHARED_UNIT: &'static str = "module.1";
    /// The unit of the per-rank expert, `Linear(23, 12)`.
    pub const EXPERT_UNIT: &'static str = "module.2";

    pub fn new(vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("module");
        Ok(Self {
            module: MixtureOfExpertsSequential(
                torch_linear(Self::D_INPUT, Self::D_SHARED, vb.pp("0"))?,
                Unit::new(torch_linear(Self::D_SHARED, Self::D_EXPERT, vb.pp("1"))?),
                Unit::new(torch_linear(Self::D_EXPERT, Self::D_SHARED, vb.pp("2"))?),
                torch_linear(Self::D_SHARED, Self::D_INPUT, vb.pp("3"))?,
            ),
        })
    }

    /// Whether `fqn` is a parameter of the expert (PyTorch tags these `p.expert = True`):
    /// its gradient stays local to the rank, where every other gradient is averaged.
    pub fn is_expert_param(fqn: &str) -> bool {
        fqn.strip_prefix(Self::EXPERT_UNIT).is_some_and(|rest| rest.starts_with('.'))
    }
}

impl Module for MixtureOfExperts {
    /// `x` `(batch, 8)` to `(batch, 8)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let MixtureOfExpertsSequential(input, shared, expert, output) = &self.module;
        let x = input.forward(x)?;
        let x = shared.forward(&x)?;
        let x = expert.forward(&x)?;
        output.forward(&x)
    }
}

// ---------------------------------------------------------------------------------------
// Non-tensor activations (FSDP2 autograd test `test_nontensor_activations`)

/// A container that carries the activation `x` between the units of [`NontensorActivations`],
/// like the PyTorch test's `container_type` (`list`, `namedtuple`, `tuple`, `dict`). The runtime
/// finds the tensors inside through [`Activations`].
pub trait ActivationContainer: Activations {
    /// What `ToContainerType` builds from the input.
    fn pack(x: Tensor) -> Result<Self>;
    /// The activation the blocks transform: element 0, field `x` or key `"x"`.
    fn x(&self) -> &Tensor;
    /// The container with `x` replaced and every other entry kept.
    fn with_x(self, x: Tensor) -> Self;
}

/// `[x]` (a Python `list`).
impl ActivationContainer for Vec<Tensor> {
    fn pack(x: Tensor) -> Result<Self> {
        Ok(vec![x])
    }

    fn x(&self) -> &Tensor {
        &self[0]
    }

    fn with_x(mut self, x: Tensor) -> Self {
        self[0] = x;
        self
    }
}

/// `(x,)` (a Python `tuple`).
impl ActivationContainer for (Tensor,) {
    fn pack(x: Tensor) -> Result<Self> {
        Ok((x,))
    }

    fn x(&self) -> &Tensor {
        &self.0
    }

    fn with_x(self, x: Tensor) -> Self {
        (x,)
    }
}

/// `{"x": x}` (a Python `dict`).
impl ActivationContainer for HashMap<String, Tensor> {
    fn pack(x: Tensor) -> Result<Self> {
        Ok(HashMap::from([("x".to_string(), x)]))
    }

    fn x(&self) -> &Tensor {
        &self["x"]
    }

    fn with_x(mut self, x: Tensor) -> Self {
        self.insert("x".to_string(), x);
        self
    }
}

/// The PyTorch test's `namedtuple("NT", ["x", "y"])`, packed as `NT(x, ones_like(x))`: a user
/// struct with a second tensor that no parameter contributes to (it never requires a
/// gradient, so no hook is attached to it).
#[derive(Clone, Debug, Activations)]
pub struct NamedActivations {
    pub x: Tensor,
    pub y: Tensor,
}

impl ActivationContainer for NamedActivations {
    fn pack(x: Tensor) -> Result<Self> {
        let y = x.ones_like()?;
        Ok(Self { x, y })
    }

    fn x(&self) -> &Tensor {
        &self.x
    }

    fn with_x(self, x: Tensor) -> Self {
        Self { x, ..self }
    }
}

/// `ToContainerType`: packs the input into the container; no parameters.
#[derive(Debug, Default, Shardable)]
pub struct ToContainerType;

/// `FromContainerType`: takes `x` back out of the container; no parameters.
#[derive(Debug, Default, Shardable)]
pub struct FromContainerType;

/// The PyTorch test's `Module(dim)`: `relu(lin2(relu(lin1(x))))` on the container's `x`, re-packed
/// in the same container.
#[derive(Debug, Shardable)]
pub struct NontensorBlock {
    pub lin1: Linear,
    pub lin2: Linear,
}

impl NontensorBlock {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { lin1: torch_linear(dim, dim, vb.pp("lin1"))?, lin2: torch_linear(dim, dim, vb.pp("lin2"))? })
    }

    pub fn forward<C: ActivationContainer>(&self, input: C) -> Result<C> {
        let z = self.lin2.forward(&self.lin1.forward(input.x())?.relu()?)?.relu()?;
        Ok(input.with_x(z))
    }
}

/// The model of `test_nontensor_activations`: `Sequential(ToContainerType(ct), Module(dim),
/// Module(dim), Module(dim), FromContainerType(ct))` with every child a unit and the root
/// holding no parameters (`fully_shard` on each child, then on the root). The container
/// type is [`NontensorActivations::forward`]'s type parameter. FQNs are the `Sequential`'s:
/// `1.lin1.weight`, …, `3.lin2.bias`.
#[derive(Debug, Shardable)]
pub struct NontensorActivations(
    pub Unit<ToContainerType>,
    pub Unit<NontensorBlock>,
    pub Unit<NontensorBlock>,
    pub Unit<NontensorBlock>,
    pub Unit<FromContainerType>,
);

impl NontensorActivations {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self(
            Unit::new(ToContainerType),
            Unit::new(NontensorBlock::new(dim, vb.pp("1"))?),
            Unit::new(NontensorBlock::new(dim, vb.pp("2"))?),
            Unit::new(NontensorBlock::new(dim, vb.pp("3"))?),
            Unit::new(FromContainerType),
        ))
    }

    /// `x` `(batch, dim)` to `(batch, dim)`, carried between the units in a `C`.
    pub fn forward<C: ActivationContainer>(&self, x: &Tensor) -> Result<Tensor> {
        let packed: C = self.0.run(x.clone(), |_, x| C::pack(x))?;
        let packed = self.1.run(packed, |block, c| block.forward(c))?;
        let packed = self.2.run(packed, |block, c| block.forward(c))?;
        let packed = self.3.run(packed, |block, c| block.forward(c))?;
        self.4.run(packed, |_, c| Ok(c.x().clone()))
    }
}
