//! Mean cross-entropy over rows of logits and their target classes, without the softmax
//! ever being stored: the forward keeps nothing, the backward recomputes each row's
//! log-sum-exp and writes `(softmax − onehot) · dloss / rows` in one pass.
//!
//! [`linear_cross_entropy`] also fuses the output projection in (Liger's fused linear
//! cross-entropy): the forward takes the hidden states and the projection's weight, and
//! for one chunk of rows at a time computes the logits, the loss and their gradient, and
//! from it the gradients of the hidden states and of the weight, which backward then only
//! scales. The `rows × vocab` logits, the largest activation of a language model's step,
//! never exist whole.

use crate::cpu::{for_float, load, matmul, max_of, rows_per_task, slice, sum_of, Accum, Element, Mat, Threads};
use crate::stash::{Stash, Stored};
use crate::{check_same_dtype, op_error};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use num_traits::{One, Zero};
use rayon::prelude::*;

const OP: &str = "cross_entropy";
const LINEAR_OP: &str = "linear_cross_entropy";

/// Checks `targets` (u32 or i64, `rows` of them) and reads them.
fn read_targets(op: &str, targets: &CpuStorage, layout: &Layout, classes: usize) -> Result<Vec<usize>> {
    let values: Vec<usize> = match targets {
        CpuStorage::U32(_) => slice::<u32>(op, targets, layout)?.iter().map(|&t| t as usize).collect(),
        CpuStorage::I64(_) => {
            slice::<i64>(op, targets, layout)?.iter().map(|&t| usize::try_from(t).unwrap_or(usize::MAX)).collect()
        }
        other => return Err(op_error(op, format!("targets must be u32 or i64, got {:?}", other.dtype()))),
    };
    if let Some((row, &t)) = values.iter().enumerate().find(|(_, &t)| t >= classes) {
        return Err(op_error(op, format!("the target of row {row} is {t}, outside the {classes} classes")));
    }
    Ok(values)
}

fn check_targets(op: &str, targets: &Tensor, rows: usize) -> Result<()> {
    if targets.dims() != [rows] || !matches!(targets.dtype(), DType::U32 | DType::I64) {
        return Err(op_error(
            op,
            format!("{rows} targets (u32 or i64) expected, got {:?} {:?}", targets.dtype(), targets.dims()),
        ));
    }
    Ok(())
}

/// The log-sum-exp of one row.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn row_lse<A: Accum>(row: &[A]) -> A {
    let max = max_of(row);
    max + sum_of(row, |v| (v - max).exp_fast()).ln()
}

/// A row of logits turned into its gradient `(softmax − onehot(target)) · scale` in place;
/// returns the row's loss `lse − z[target]`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn row_gradient<A: Accum>(row: &mut [A], target: usize, scale: A) -> A {
    let lse = row_lse(row);
    let loss = lse - row[target];
    for z in row.iter_mut() {
        *z = (*z - lse).exp_fast() * scale;
    }
    row[target] = row[target] - scale;
    loss
}

/// The mean over rows of `−log softmax(logits)[target]`, for `logits` `(rows, classes)`
/// and `targets` `(rows)` (u32 or i64), differentiable in `logits`. A scalar of the
/// logits' dtype, computed in f32 for f16 and bf16.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (rows, _) =
        logits.dims2().map_err(|_| op_error(OP, format!("logits must be (rows, classes), got {:?}", logits.dims())))?;
    check_targets(OP, targets, rows)?;
    check_same_dtype(OP, &[logits])?;
    logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy)
}

struct CrossEntropy;

fn loss<T: Element>(z: &CpuStorage, lz: &Layout, t: &CpuStorage, lt: &Layout) -> Result<CpuStorage> {
    let z = slice::<T>(OP, z, lz)?;
    let classes = lz.dims()[1];
    let targets = read_targets(OP, t, lt, classes)?;
    let rows = targets.len();
    let total: T::Acc = z
        .par_chunks(classes.max(1))
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let row = load(row);
            row_lse(&row) - row[t]
        })
        .reduce(T::Acc::zero, |a, b| a + b);
    Ok(T::to_cpu_storage_owned(vec![T::store(total / T::Acc::from_f64(rows.max(1) as f64))]))
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, z: &CpuStorage, lz: &Layout, t: &CpuStorage, lt: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((for_float!(OP, z.dtype(), loss(z, lz, t, lt))?, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        z: &candle_core::CudaStorage,
        lz: &Layout,
        t: &candle_core::CudaStorage,
        lt: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::cross_entropy_forward(z, lz, t, lt)
    }

    fn bwd(&self, z: &Tensor, t: &Tensor, _loss: &Tensor, dloss: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dz = z.apply_op3_no_bwd(t, &dloss.to_dtype(z.dtype())?, &CrossEntropyBackward)?;
        Ok((Some(dz), None))
    }
}

/// `(softmax(z) − onehot(target)) · dloss / rows`.
struct CrossEntropyBackward;

fn logits_grad<T: Element>(
    (z, lz): (&CpuStorage, &Layout),
    (t, lt): (&CpuStorage, &Layout),
    (g, lg): (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    let z = slice::<T>(OP, z, lz)?;
    let classes = lz.dims()[1];
    let targets = read_targets(OP, t, lt, classes)?;
    let scale = slice::<T>(OP, g, lg)?[0].load() / T::Acc::from_f64(targets.len().max(1) as f64);
    let mut dz = vec![T::zero(); z.len()];
    let rows = rows_per_task(targets.len(), classes);
    let chunk = (rows * classes).max(1);
    dz.par_chunks_mut(chunk).zip(z.par_chunks(chunk)).zip(targets.par_chunks(rows.max(1))).for_each(|((dz, z), t)| {
        let mut row = vec![T::Acc::zero(); classes];
        for ((dz, z), &t) in dz.chunks_mut(classes).zip(z.chunks(classes)).zip(t) {
            row.iter_mut().zip(z).for_each(|(r, &v)| *r = v.load());
            row_gradient(&mut row, t, scale);
            dz.iter_mut().zip(&row).for_each(|(dz, &g)| *dz = T::store(g));
        }
    });
    Ok(T::to_cpu_storage_owned(dz))
}

impl CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        lz: &Layout,
        t: &CpuStorage,
        lt: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((for_float!(OP, z.dtype(), logits_grad((z, lz), (t, lt), (g, lg)))?, lz.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        z: &candle_core::CudaStorage,
        lz: &Layout,
        t: &candle_core::CudaStorage,
        lt: &Layout,
        g: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::cross_entropy_backward(z, lz, t, lt, g, lg)
    }
}

/// [`cross_entropy`] of `hidden · weightᵀ` (`hidden` `(rows, dim)`, `weight`
/// `(classes, dim)`, an output projection without bias) without the logits ever being
/// stored whole: differentiable in `hidden` and `weight`, whose gradients the forward
/// computes chunk by chunk (they take the place the logits would have taken).
pub fn linear_cross_entropy(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let shapes = || format!("hidden {:?}, weight {:?}", hidden.dims(), weight.dims());
    let ((rows, dim), (_, weight_dim)) = match (hidden.dims2(), weight.dims2()) {
        (Ok(h), Ok(w)) => (h, w),
        _ => return Err(op_error(LINEAR_OP, format!("2-D hidden states and weight expected, got {}", shapes()))),
    };
    if dim != weight_dim {
        return Err(op_error(LINEAR_OP, format!("the hidden size differs: {}", shapes())));
    }
    check_targets(LINEAR_OP, targets, rows)?;
    check_same_dtype(LINEAR_OP, &[hidden, weight])?;
    hidden.contiguous()?.apply_op3(&weight.contiguous()?, &targets.contiguous()?, LinearCrossEntropy::default())
}

/// The gradients of `hidden` and `weight` for a unit loss, from the forward.
#[derive(Default)]
struct LinearCrossEntropy {
    hidden_grad: Stash,
    weight_grad: Stash,
}

/// Rows of logits computed at once: about 4 MiB of f32 logits, at least one row.
fn chunk_rows(classes: usize) -> usize {
    ((1 << 20) / classes.max(1)).max(1)
}

impl LinearCrossEntropy {
    fn forward<T: Element>(
        &self,
        (h, lh): (&CpuStorage, &Layout),
        (w, lw): (&CpuStorage, &Layout),
        (t, lt): (&CpuStorage, &Layout),
    ) -> Result<CpuStorage> {
        let (rows, dim) = (lh.dims()[0], lh.dims()[1]);
        let classes = lw.dims()[0];
        let targets = read_targets(LINEAR_OP, t, lt, classes)?;
        let h: Vec<T::Acc> = load(slice::<T>(LINEAR_OP, h, lh)?);
        let w: Vec<T::Acc> = load(slice::<T>(LINEAR_OP, w, lw)?);
        let inverse_rows = T::Acc::from_f64(1.0 / rows.max(1) as f64);
        let (mut dh, mut dw) = (vec![T::Acc::zero(); rows * dim], vec![T::Acc::zero(); classes * dim]);
        let mut total = T::Acc::zero();
        let step = chunk_rows(classes);
        let mut logits = vec![T::Acc::zero(); step.min(rows) * classes];
        for start in (0..rows).step_by(step) {
            let n = step.min(rows - start);
            let (hc, logits) = (Mat::rows(&h, start * dim, n, dim, dim), &mut logits[..n * classes]);
            let wt = Mat::rows(&w, 0, classes, dim, dim).t();
            matmul(logits, 0, classes, hc, wt, false, T::Acc::one(), Threads::All);
            // Each row's loss, and its logits turned into their gradient in place.
            total += logits
                .par_chunks_mut(classes)
                .zip(targets[start..start + n].par_iter())
                .map(|(row, &t)| row_gradient(row, t, inverse_rows))
                .reduce(T::Acc::zero, |a, b| a + b);
            let grad = Mat::rows(logits, 0, n, classes, classes);
            matmul(
                &mut dh,
                start * dim,
                dim,
                grad,
                Mat::rows(&w, 0, classes, dim, dim),
                false,
                T::Acc::one(),
                Threads::All,
            );
            matmul(&mut dw, 0, dim, grad.t(), hc, true, T::Acc::one(), Threads::All);
        }
        let store = |values: Vec<T::Acc>| T::to_cpu_storage_owned(values.into_iter().map(T::store).collect());
        self.hidden_grad.put(Stored::Cpu(store(dh)), Shape::from((rows, dim)));
        self.weight_grad.put(Stored::Cpu(store(dw)), Shape::from((classes, dim)));
        Ok(T::to_cpu_storage_owned(vec![T::store(total * inverse_rows)]))
    }
}

impl CustomOp3 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        lh: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let loss = match h.dtype() {
            DType::F32 => self.forward::<f32>((h, lh), (w, lw), (t, lt)),
            DType::F64 => self.forward::<f64>((h, lh), (w, lw), (t, lt)),
            DType::F16 => self.forward::<half::f16>((h, lh), (w, lw), (t, lt)),
            DType::BF16 => self.forward::<half::bf16>((h, lh), (w, lw), (t, lt)),
            other => Err(crate::unsupported_dtype(LINEAR_OP, other)),
        }?;
        Ok((loss, Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        h: &candle_core::CudaStorage,
        lh: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
        t: &candle_core::CudaStorage,
        lt: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (loss, dh, dw) = crate::cuda::linear_cross_entropy(h, lh, w, lw, t, lt)?;
        self.hidden_grad.put(Stored::Cuda(dh), lh.shape().clone());
        self.weight_grad.put(Stored::Cuda(dw), lw.shape().clone());
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _t: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let scale = dloss.to_dtype(h.dtype())?;
        let dh = self.hidden_grad.take(LINEAR_OP, h)?.broadcast_mul(&scale)?;
        let dw = self.weight_grad.take(LINEAR_OP, w)?.broadcast_mul(&scale)?;
        Ok((Some(dh), Some(dw), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, grads_of, randn};
    use candle_core::{Device, Var};

    fn targets(seed: u32, rows: usize, classes: usize) -> Tensor {
        let t: Vec<u32> = (0..rows as u32).map(|i| (i * 7919 + seed * 104_729) % classes as u32).collect();
        Tensor::from_vec(t, rows, &Device::Cpu).unwrap()
    }

    #[test]
    fn the_loss_and_its_gradient_equal_candle_nns_cross_entropy() -> Result<()> {
        for (rows, classes) in [(1, 1), (1, 5), (7, 3), (64, 128), (33, 1000)] {
            let z = Var::from_tensor(&(randn(1, &[rows, classes]) * 4.0)?)?;
            let t = targets(2, rows, classes);
            let ours = cross_entropy(&z, &t)?;
            let theirs = candle_nn::loss::cross_entropy(&z, &t)?;
            assert_close(&ours, &theirs, 1e-6, &format!("({rows}, {classes}) loss"))?;
            let dy = Tensor::new(1.5f32, &Device::Cpu)?;
            let (ours, theirs) = (grads_of(&ours, &dy, &[&z])?, grads_of(&theirs, &dy, &[&z])?);
            assert_close(&ours[0], &theirs[0], 1e-5, &format!("({rows}, {classes}) dz"))?;
        }
        Ok(())
    }

    #[test]
    fn the_fused_projection_equals_a_matmul_then_cross_entropy() -> Result<()> {
        // Chunks of 8192 rows at 128 classes: 10 000 rows run two chunks, the last short.
        for (rows, dim, classes) in [(1, 1, 2), (5, 3, 7), (48, 32, 96), (10_000, 8, 128)] {
            let h = Var::from_tensor(&randn(3, &[rows, dim]))?;
            let w = Var::from_tensor(&randn(4, &[classes, dim]))?;
            let t = targets(5, rows, classes);
            let ours = linear_cross_entropy(&h, &w, &t)?;
            let theirs = candle_nn::loss::cross_entropy(&h.matmul(&w.t()?)?, &t)?;
            let what = format!("({rows}, {dim}) x ({classes}, {dim})");
            assert_close(&ours, &theirs, 1e-5, &format!("{what} loss"))?;
            let dy = Tensor::new(0.75f32, &Device::Cpu)?;
            let (ours, theirs) = (grads_of(&ours, &dy, &[&h, &w])?, grads_of(&theirs, &dy, &[&h, &w])?);
            for (name, (a, b)) in ["dh", "dw"].iter().zip(ours.iter().zip(&theirs)) {
                assert_close(a, b, 1e-5, &format!("{what} {name}"))?;
            }
        }
        Ok(())
    }

    #[test]
    fn half_precision_stays_within_the_rounding_of_an_f32_reference() -> Result<()> {
        let (z, t) = (randn(6, &[20, 50]), targets(7, 20, 50));
        for (dtype, tolerance) in [(DType::BF16, 1.0 / 128.0), (DType::F16, 1.0 / 1024.0)] {
            let rounded = z.to_dtype(dtype)?;
            let ours = cross_entropy(&rounded, &t)?.to_dtype(DType::F32)?;
            let exact = candle_nn::loss::cross_entropy(&rounded.to_dtype(DType::F32)?, &t)?;
            assert_close(&ours, &exact, tolerance, &format!("{dtype:?}"))?;
        }
        Ok(())
    }

    #[test]
    fn targets_outside_the_classes_are_refused_not_read() {
        let error = cross_entropy(&randn(1, &[2, 4]), &targets(0, 2, 9)).map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("cross_entropy") && error.contains("outside the 4 classes"), "{error}");
        let error = linear_cross_entropy(&randn(1, &[2, 3]), &randn(2, &[4, 5]), &targets(0, 2, 4)).unwrap_err();
        assert!(error.to_string().contains("[2, 3]") && error.to_string().contains("[4, 5]"), "{error}");
        assert!(cross_entropy(&randn(1, &[2, 4]), &targets(0, 3, 4)).is_err(), "three targets for two rows");
    }
}
