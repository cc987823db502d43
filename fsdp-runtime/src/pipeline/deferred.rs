//! The deferrable ops: candle `CustomOp2`s whose backward computes the weight gradient
//! now or queues it, as the stage's [`PassMode`] says.
//!
//! Each op computes its value with ordinary tensor ops on detached inputs when it is built,
//! and its forward only hands that value's storage to candle (on any backend), so no raw-storage
//! arithmetic is written here; the backward also uses ordinary tensor ops. The forward and
//! the gradients are the same products candle's own `matmul`/`broadcast_add` compute, so a
//! stage built from these ops matches a plain candle model numerically.

use super::context::{Deferred, PassMode, StageContext};
use crate::backend::BuiltValue;
use crate::model::layers::{field, layer_node, map_bias, weight_and_bias, OPTIONAL_PARAM, PARAM};
use crate::model::{Node, Shardable, TensorMap, VisitOrder, Visitor};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Module, Result, Shape, Tensor};

/// `2·m·k·n`.
fn matmul_flops(m: usize, k: usize, n: usize) -> u64 {
    2 * (m as u64) * (k as u64) * (n as u64)
}

/// `x·w` (or `x·wᵀ`) for `x` of shape `(…, k)`, flattened to `(rows, k)`.
struct DeferredMatmulOp {
    ctx: StageContext,
    weight: Tensor,
    transposed: bool,
    value: BuiltValue,
}

impl CustomOp2 for DeferredMatmulOp {
    fn name(&self) -> &'static str {
        "stage-deferred-matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.take()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.value.take()
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let w_node = w;
        let w = w.detach();
        let (k, n) = if self.transposed { (w.dim(1)?, w.dim(0)?) } else { (w.dim(0)?, w.dim(1)?) };
        let rows = x.elem_count() / k.max(1);
        let dy_flat = dy.detach().reshape((rows, n))?;
        let mode = self.ctx.lock().mode;

        // dx = dy·wᵀ, the product candle's Matmul backward computes for its lhs.
        let dx = if x.track_op() {
            let dx = if self.transposed { dy_flat.matmul(&w)? } else { dy_flat.matmul(&w.t()?)? };
            let mut state = self.ctx.lock();
            state.counts.input_matmuls += 1;
            state.counts.input_matmul_flops += matmul_flops(rows, n, k);
            Some(dx.reshape(x.shape())?)
        } else {
            None
        };

        let x_flat = x.detach().reshape((rows, k))?;
        let dw = match mode {
            PassMode::Full => {
                let dw = weight_grad(&x_flat, &dy_flat, self.transposed)?;
                let mut state = self.ctx.lock();
                state.counts.weight_matmuls += 1;
                state.counts.weight_matmul_flops += matmul_flops(k, rows, n);
                Some(dw)
            }
            PassMode::InputOnly => {
                let work = Deferred::Matmul {
                    weight: self.weight.clone(),
                    x: x_flat,
                    dy: dy_flat,
                    transposed: self.transposed,
                };
                self.ctx.lock().queue.push(work);
                defer(&self.ctx, w_node)?
            }
        };
        Ok((dx, dw))
    }
}

/// What an input pass returns as a deferred weight's gradient. A `Var` gets none (candle
/// skips variables). A parameter owned by the context's sink (an FSDP unit's gathered
/// node) is a tracked node that candle's walk requires a gradient for: it gets zeros, and
/// the sink is told to wait for the weight pass before reducing it.
fn defer(ctx: &StageContext, weight: &Tensor) -> Result<Option<Tensor>> {
    if weight.is_variable() || !weight.track_op() {
        return Ok(None);
    }
    let sink = ctx.lock().sink.clone();
    match sink {
        Some(sink) if sink.owns(weight) => {
            if ctx.lock().announced.insert(weight.id()) {
                sink.expect(weight).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            }
            Ok(Some(weight.zeros_like()?))
        }
        _ => candle_core::bail!(
            "a deferred weight of shape {:?} is neither a Var nor owned by the stage's gradient sink",
            weight.shape()
        ),
    }
}

/// `x_flatᵀ·dy_flat`, transposed for a weight used as `x·wᵀ` (the products candle's Matmul
/// and Transpose backwards compute).
pub(crate) fn weight_grad(x_flat: &Tensor, dy_flat: &Tensor, transposed: bool) -> Result<Tensor> {
    let dw = x_flat.t()?.matmul(dy_flat)?;
    if transposed {
        dw.t()
    } else {
        Ok(dw)
    }
}

fn matmul_impl(ctx: &StageContext, x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    let (w0, w1) = w.dims2()?;
    let (k, n) = if transposed { (w1, w0) } else { (w0, w1) };
    let dims = x.dims();
    let Some((&last, batch)) = dims.split_last() else {
        candle_core::bail!("deferred matmul: a scalar input");
    };
    if last != k {
        candle_core::bail!(
            "deferred matmul: input {:?} against weight {:?}{}",
            x.shape(),
            w.shape(),
            if transposed { " (transposed)" } else { "" }
        );
    }
    let rows = x.elem_count() / k.max(1);
    let x_flat = x.detach().reshape((rows, k))?;
    let w_value = w.detach();
    let value = if transposed { x_flat.matmul(&w_value.t()?)? } else { x_flat.matmul(&w_value)? };
    let mut out_dims = batch.to_vec();
    out_dims.push(n);
    let value = value.reshape(out_dims)?;
    let op = DeferredMatmulOp {
        ctx: ctx.clone(),
        weight: w.clone(),
        transposed,
        value: BuiltValue::new("stage-deferred-matmul", value),
    };
    x.apply_op2(w, op)
}

/// `x·w` for `x` of shape `(…, k)` and a 2-D weight `w` of shape `(k, n)` (like
/// `broadcast_matmul`), whose weight gradient a [`PassMode::InputOnly`] backward defers.
pub fn deferred_matmul(ctx: &StageContext, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul_impl(ctx, x, w, false)
}

/// `x·wᵀ` for `x` of shape `(…, k)` and a weight of shape `(n, k)` (a linear layer's
/// layout), whose weight gradient a [`PassMode::InputOnly`] backward defers.
pub fn deferred_matmul_t(ctx: &StageContext, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul_impl(ctx, x, w, true)
}

/// `y + bias` broadcast over the leading dimensions.
struct DeferredBiasAddOp {
    ctx: StageContext,
    bias: Tensor,
    value: BuiltValue,
}

impl CustomOp2 for DeferredBiasAddOp {
    fn name(&self) -> &'static str {
        "stage-deferred-bias-add"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value.take()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.value.take()
    }

    fn bwd(&self, y: &Tensor, b: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = b.elem_count();
        let rows = y.elem_count() / n.max(1);
        let dy = dy.detach();
        let dy_y = if y.track_op() { Some(dy.clone()) } else { None };
        let dy_flat = dy.reshape((rows, n))?;
        let mode = self.ctx.lock().mode;
        let db = match mode {
            PassMode::Full => {
                let db = bias_grad(&dy_flat)?;
                self.ctx.lock().counts.bias_reductions += 1;
                Some(db)
            }
            PassMode::InputOnly => {
                self.ctx.lock().queue.push(Deferred::Bias { bias: self.bias.clone(), dy: dy_flat });
                defer(&self.ctx, b)?
            }
        };
        Ok((dy_y, db))
    }
}

pub(crate) fn bias_grad(dy_flat: &Tensor) -> Result<Tensor> {
    dy_flat.sum(0)
}

/// `y + bias` for `y` of shape `(…, n)` and a 1-D `bias` of shape `(n,)`, whose bias
/// gradient a [`PassMode::InputOnly`] backward defers.
pub fn deferred_bias_add(ctx: &StageContext, y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let n = bias.dims1()?;
    if y.dims().last() != Some(&n) {
        candle_core::bail!("deferred bias add: input {:?} and bias {:?}", y.shape(), bias.shape());
    }
    let value = y.detach().broadcast_add(&bias.detach())?;
    let op = DeferredBiasAddOp {
        ctx: ctx.clone(),
        bias: bias.clone(),
        value: BuiltValue::new("stage-deferred-bias-add", value),
    };
    y.apply_op2(bias, op)
}

/// A linear layer (`x·Wᵀ + b`, PyTorch's and candle-nn's layout: `weight` is
/// `(out, in)`, `bias` `(out,)`) whose parameter gradients an input pass defers. Its
/// parameters are `Var`s in a plain stage, or an FSDP unit's gathered parameters once the
/// model is wrapped (it is `Shardable`, named `weight` and `bias` like candle-nn's).
#[derive(Clone, Debug)]
pub struct StageLinear {
    ctx: StageContext,
    weight: Tensor,
    bias: Option<Tensor>,
}

impl StageLinear {
    /// A layer of stage `ctx` over existing parameters: `weight` `(out, in)` and an optional
    /// `bias` `(out,)`.
    pub fn new(ctx: &StageContext, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { ctx: ctx.clone(), weight, bias }
    }

    /// Like `candle_nn::linear`: parameters `weight` `(out, in)` and `bias` `(out,)`
    /// created through `vb` with candle-nn's initialisation.
    pub fn build(ctx: &StageContext, in_dim: usize, out_dim: usize, vb: candle_nn::VarBuilder) -> Result<Self> {
        let linear = candle_nn::linear(in_dim, out_dim, vb)?;
        Ok(Self::new(ctx, linear.weight().clone(), linear.bias().cloned()))
    }

    /// The weight, `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `(out,)`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The stage context whose pass mode the layer's backward follows.
    pub fn context(&self) -> &StageContext {
        &self.ctx
    }

    /// The same layer with its parameters replaced, for `Shardable::map_tensors`.
    pub(crate) fn with_parameters(self, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { ctx: self.ctx, weight, bias }
    }
}

impl Module for StageLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = deferred_matmul_t(&self.ctx, x, &self.weight)?;
        match &self.bias {
            Some(bias) => deferred_bias_add(&self.ctx, &y, bias),
            None => Ok(y),
        }
    }
}

/// A stage layer can be an FSDP unit's parameter: `weight` and `bias`, like `Linear`.
impl Shardable for StageLinear {
    const NODE: Node = layer_node!("StageLinear", [field("weight", &PARAM), field("bias", &OPTIONAL_PARAM)]);

    fn visit(&self, visitor: &mut dyn Visitor, _order: VisitOrder) {
        weight_and_bias(visitor, self.weight(), self.bias());
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        let weight = map.map(self.weight().clone())?;
        let bias = map_bias(self.bias(), map)?;
        Ok(self.with_parameters(weight, bias))
    }
}
