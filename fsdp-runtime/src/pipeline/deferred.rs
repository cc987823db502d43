//! The deferrable ops: candle `CustomOp2`s whose backward computes the weight gradient
//! now or queues it, as the stage's [`PassMode`] says.
//!
//! Each op computes its value with ordinary tensor ops on detached inputs when it is built,
//! and its `cpu_fwd` only hands that value's storage to candle, so no raw-storage
//! arithmetic is written here; the backward also uses ordinary tensor ops. The forward and
//! the gradients are the same products candle's own `matmul`/`broadcast_add` compute, so a
//! stage built from these ops matches a plain candle model numerically.

use super::context::{Deferred, PassMode, StageContext};
use crate::ops::cpu_storage;
use candle_core::{CpuStorage, CustomOp2, Layout, Module, Result, Shape, Tensor, Var};
use std::sync::Mutex;

/// `2·m·k·n`.
fn matmul_flops(m: usize, k: usize, n: usize) -> u64 {
    2 * (m as u64) * (k as u64) * (n as u64)
}

/// Takes the value computed at build time (consumed by the one forward that creates the node).
fn take_value(value: &Mutex<Option<Tensor>>, name: &str) -> Result<(CpuStorage, Shape)> {
    let value = value.lock().unwrap_or_else(|p| p.into_inner()).take();
    match value {
        Some(value) => Ok((cpu_storage(&value)?, value.shape().clone())),
        None => candle_core::bail!("{name}: the node is created once and never recomputed"),
    }
}

/// `x·w` (or `x·wᵀ`) for `x` of shape `(…, k)`, flattened to `(rows, k)`.
struct DeferredMatmulOp {
    ctx: StageContext,
    weight: Var,
    transposed: bool,
    value: Mutex<Option<Tensor>>,
}

impl CustomOp2 for DeferredMatmulOp {
    fn name(&self) -> &'static str {
        "stage-deferred-matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        take_value(&self.value, self.name())
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
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
                None
            }
        };
        Ok((dx, dw))
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

fn matmul_impl(ctx: &StageContext, x: &Tensor, w: &Var, transposed: bool) -> Result<Tensor> {
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
    let w_value = w.as_detached_tensor();
    let value = if transposed { x_flat.matmul(&w_value.t()?)? } else { x_flat.matmul(&w_value)? };
    let mut out_dims = batch.to_vec();
    out_dims.push(n);
    let value = value.reshape(out_dims)?;
    let op = DeferredMatmulOp { ctx: ctx.clone(), weight: w.clone(), transposed, value: Mutex::new(Some(value)) };
    x.apply_op2(w.as_tensor(), op)
}

/// `x·w` for `x` of shape `(…, k)` and a 2-D weight `w` of shape `(k, n)` (like
/// `broadcast_matmul`), whose weight gradient a [`PassMode::InputOnly`] backward defers.
pub fn deferred_matmul(ctx: &StageContext, x: &Tensor, w: &Var) -> Result<Tensor> {
    matmul_impl(ctx, x, w, false)
}

/// `x·wᵀ` for `x` of shape `(…, k)` and a weight of shape `(n, k)` (a linear layer's
/// layout), whose weight gradient a [`PassMode::InputOnly`] backward defers.
pub fn deferred_matmul_t(ctx: &StageContext, x: &Tensor, w: &Var) -> Result<Tensor> {
    matmul_impl(ctx, x, w, true)
}

/// `y + bias` broadcast over the leading dimensions.
struct DeferredBiasAddOp {
    ctx: StageContext,
    bias: Var,
    value: Mutex<Option<Tensor>>,
}

impl CustomOp2 for DeferredBiasAddOp {
    fn name(&self) -> &'static str {
        "stage-deferred-bias-add"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        take_value(&self.value, self.name())
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
                None
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
pub fn deferred_bias_add(ctx: &StageContext, y: &Tensor, bias: &Var) -> Result<Tensor> {
    let n = bias.dims1()?;
    if y.dims().last() != Some(&n) {
        candle_core::bail!("deferred bias add: input {:?} and bias {:?}", y.shape(), bias.shape());
    }
    let value = y.detach().broadcast_add(&bias.as_detached_tensor())?;
    let op = DeferredBiasAddOp { ctx: ctx.clone(), bias: bias.clone(), value: Mutex::new(Some(value)) };
    y.apply_op2(bias.as_tensor(), op)
}

/// A linear layer (`x·Wᵀ + b`, PyTorch's and candle-nn's layout: `weight` is
/// `(out, in)`, `bias` `(out,)`) whose parameter gradients an input pass defers.
#[derive(Clone, Debug)]
pub struct StageLinear {
    ctx: StageContext,
    weight: Var,
    bias: Option<Var>,
}

impl StageLinear {
    pub fn new(ctx: &StageContext, weight: Var, bias: Option<Var>) -> Self {
        Self { ctx: ctx.clone(), weight, bias }
    }

    pub fn weight(&self) -> &Var {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }

    pub fn context(&self) -> &StageContext {
        &self.ctx
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
