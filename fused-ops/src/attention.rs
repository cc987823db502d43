//! Causal scaled-dot-product attention with grouped key/value heads, tiled over blocks of
//! queries so that no `S × S` score matrix is ever stored (FlashAttention's idea), on
//! FlashAttention's layout `(batch, seq, heads, head_dim)`: what the projections produce,
//! so no transposes (and no autograd nodes for them) around it.
//!
//! For query head `h`, which reads key/value head `h / (heads / kv_heads)`, and a block
//! of query rows `[i0, i1)`: the scores `S = Q·Kᵀ·scale` against keys `0..i1` (the later
//! ones are masked anyway), their row softmax `P`, and `O = P·V`. Rows see every key they
//! may attend to at once, so the softmax is exact in one pass. The backward recomputes
//! `S` and `P` block by block (with `D = rowsum(dO ∘ O)`):
//! `dV += Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − D)`, `dQ = dS·K·scale`, `dK += dSᵀ·Q·scale`.
//! One task per (batch, key/value head) owns that head's `dK` and `dV` and the gradients
//! of all its query heads, so nothing is shared between tasks.

use crate::cpu::{for_float, matmul, max_of, slice, sum_of, Accum, Element, Mat, Threads};
use crate::{check_same_dtype, flat_outputs, op_error};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::{One, Zero};
use rayon::prelude::*;

const OP: &str = "causal_attention";
/// Query rows per block: the scores of one block against all keys are the largest buffer.
const BLOCK: usize = 64;

/// Causal attention of `q` `(batch, seq, heads, head_dim)` over `k` and `v`
/// `(batch, seq, kv_heads, head_dim)` (`kv_heads` dividing `heads`), with scores
/// `q·kᵀ·scale`: `(batch, seq, heads, head_dim)`, differentiable in all three. Computed in
/// f32 for f16 and bf16 inputs.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let shapes = || format!("q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims());
    let (Ok((b, seq, heads, dim)), Ok((kb, kseq, kv_heads, kdim))) = (q.dims4(), k.dims4()) else {
        return Err(op_error(OP, format!("4-D (batch, seq, heads, head_dim) inputs expected, got {}", shapes())));
    };
    if (kb, kseq, kdim) != (b, seq, dim) || k.dims() != v.dims() || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(op_error(
            OP,
            format!("k and v must be (batch, seq, kv_heads, head_dim) with kv_heads dividing heads: {}", shapes()),
        ));
    }
    check_same_dtype(OP, &[q, k, v])?;
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, Attention { scale })
}

struct Attention {
    scale: f64,
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    dim: usize,
}

impl Dims {
    fn of(lq: &Layout, lk: &Layout) -> Self {
        let (q, k) = (lq.dims(), lk.dims());
        Self { batch: q[0], seq: q[1], heads: q[2], kv_heads: k[2], dim: q[3] }
    }

    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Head `head` of batch `b` of a tensor with `heads` heads, as a `seq × dim` matrix.
    fn head<'a, A>(&self, data: &'a [A], b: usize, head: usize, heads: usize) -> Mat<'a, A> {
        Mat::rows(data, (b * self.seq * heads + head) * self.dim, self.seq, self.dim, heads * self.dim)
    }
}

/// The row softmax of block rows `i0..i0 + rows` of the scores in `scores` (`rows ×
/// keys`, row `r` seeing keys `0..=i0 + r`), in place; masked entries become 0. Every
/// loop runs over whole rows (the masked tail set to −∞ first), so it vectorizes without
/// a scalar remainder.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn causal_softmax<A: Accum>(scores: &mut [A], rows: usize, keys: usize, i0: usize) {
    for r in 0..rows {
        let row = &mut scores[r * keys..][..keys];
        let visible = (i0 + r + 1).min(keys);
        row[visible..].iter_mut().for_each(|v| *v = A::neg_infinity());
        let max = max_of(row);
        row.iter_mut().for_each(|v| *v = (*v - max).exp_fast());
        // The masked tail is zeroed before the scaling: its tiny values scaled would be
        // subnormal, and subnormal arithmetic is slow.
        row[visible..].iter_mut().for_each(|v| *v = A::zero());
        let inverse = sum_of(row, |v| v).recip();
        row.iter_mut().for_each(|v| *v = *v * inverse);
    }
}

/// Block rows `i0..i0 + rows` of a head (`sub`: the head as a matrix).
fn block<A>(head: Mat<'_, A>, i0: usize, rows: usize) -> Mat<'_, A> {
    Mat { data: &head.data[(i0 * head.row_stride).min(head.data.len())..], rows, ..head }
}

/// Copies per-head results (`heads` per batch, each `seq × dim`, in task order) into a
/// `(batch, seq, heads, dim)` tensor's elements.
fn scatter_heads<T: Element>(dst: &mut [T], per_head: &[Vec<T::Acc>], d: Dims, heads: usize) {
    dst.par_chunks_mut((heads * d.dim).max(1)).enumerate().for_each(|(bi, row)| {
        let (b, i) = (bi / d.seq, bi % d.seq);
        for (h, out) in row.chunks_mut(d.dim).enumerate() {
            let src = &per_head[b * heads + h][i * d.dim..][..d.dim];
            out.iter_mut().zip(src).for_each(|(o, &v)| *o = T::store(v));
        }
    });
}

fn forward<T: Element>(
    (q, lq): (&CpuStorage, &Layout),
    (k, lk): (&CpuStorage, &Layout),
    (v, lv): (&CpuStorage, &Layout),
    scale: f64,
) -> Result<CpuStorage> {
    let d = Dims::of(lq, lk);
    let (q, k, v) = (slice::<T>(OP, q, lq)?, slice::<T>(OP, k, lk)?, slice::<T>(OP, v, lv)?);
    let (q, k, v) = (T::computed(q), T::computed(k), T::computed(v));
    let scale = T::Acc::from_f64(scale);
    // One task per (batch, query head), its output as a contiguous `seq × dim` matrix.
    let per_head: Vec<Vec<T::Acc>> = (0..d.batch * d.heads)
        .into_par_iter()
        .map(|task| {
            let (b, h) = (task / d.heads, task % d.heads);
            let kv = h / d.group();
            let (qh, kh, vh) =
                (d.head(&q, b, h, d.heads), d.head(&k, b, kv, d.kv_heads), d.head(&v, b, kv, d.kv_heads));
            let mut scores = vec![T::Acc::zero(); BLOCK.min(d.seq) * d.seq];
            let mut out = vec![T::Acc::zero(); d.seq * d.dim];
            for i0 in (0..d.seq).step_by(BLOCK) {
                let (rows, keys) = (BLOCK.min(d.seq - i0), (i0 + BLOCK).min(d.seq));
                let kt = Mat { rows: keys, ..kh }.t();
                matmul(&mut scores, 0, keys, block(qh, i0, rows), kt, false, scale, Threads::One);
                causal_softmax(&mut scores, rows, keys, i0);
                let p = Mat::rows(&scores, 0, rows, keys, keys);
                matmul(&mut out, i0 * d.dim, d.dim, p, Mat { rows: keys, ..vh }, false, T::Acc::one(), Threads::One);
            }
            out
        })
        .collect();
    let mut out = vec![T::zero(); q.len()];
    scatter_heads::<T>(&mut out, &per_head, d, d.heads);
    Ok(T::to_cpu_storage_owned(out))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((for_float!(OP, q.dtype(), forward((q, lq), (k, lk), (v, lv), self.scale))?, lq.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        k: &candle_core::CudaStorage,
        lk: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::attention_forward(q, lq, k, lk, v, lv, self.scale)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let backward = AttentionBackward { scale: self.scale, out: out.clone(), dout: dout.contiguous()? };
        let grads = q.apply_op3_no_bwd(k, v, &backward)?;
        let [dq, dk, dv] = flat_outputs(&grads, [q.shape(), k.shape(), v.shape()])?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The three gradients as one flat buffer `dq, dk, dv`, from `q, k, v`, the forward's
/// output and its gradient.
struct AttentionBackward {
    scale: f64,
    out: Tensor,
    dout: Tensor,
}

/// The CPU elements of a contiguous tensor the op holds.
fn held<'a, T: Element>(storage: &'a candle_core::Storage, layout: &Layout) -> Result<&'a [T]> {
    match storage {
        candle_core::Storage::Cpu(cpu) => slice::<T>(OP, cpu, layout),
        _ => Err(op_error(OP, "the output and its gradient must be on the CPU with the inputs".into())),
    }
}

/// One (batch, key/value head)'s gradients: its query heads' `dq`, then `dk`, `dv`.
struct HeadGrads<A> {
    dq: Vec<Vec<A>>,
    dk: Vec<A>,
    dv: Vec<A>,
}

fn backward<T: Element>(
    (q, lq): (&CpuStorage, &Layout),
    (k, lk): (&CpuStorage, &Layout),
    (v, lv): (&CpuStorage, &Layout),
    (out, dout): (&Tensor, &Tensor),
    scale: f64,
) -> Result<CpuStorage> {
    let d = Dims::of(lq, lk);
    let (q, k, v) = (slice::<T>(OP, q, lq)?, slice::<T>(OP, k, lk)?, slice::<T>(OP, v, lv)?);
    let (o_storage, lo) = out.storage_and_layout();
    let (do_storage, ldo) = dout.storage_and_layout();
    let (o, dout) = (held::<T>(&o_storage, lo)?, held::<T>(&do_storage, ldo)?);
    if o.len() != q.len() || dout.len() != q.len() {
        return Err(op_error(
            OP,
            format!("the output {:?} and its gradient {:?} for q {:?}", lo.dims(), ldo.dims(), lq.dims()),
        ));
    }
    let (q_len, kv_len) = (q.len(), k.len());
    let (q, k, v, o, dout) = (T::computed(q), T::computed(k), T::computed(v), T::computed(o), T::computed(dout));
    let scale = T::Acc::from_f64(scale);
    let (group, width) = (d.group(), BLOCK.min(d.seq) * d.seq);
    // One task per (batch, key/value head): its dk, dv, and its query heads' dq.
    let per_task: Vec<HeadGrads<T::Acc>> = (0..d.batch * d.kv_heads)
        .into_par_iter()
        .map(|task| {
            let (b, kv) = (task / d.kv_heads, task % d.kv_heads);
            let (kh, vh) = (d.head(&k, b, kv, d.kv_heads), d.head(&v, b, kv, d.kv_heads));
            let head = d.seq * d.dim;
            let (mut dk, mut dv) = (vec![T::Acc::zero(); head], vec![T::Acc::zero(); head]);
            let (mut p, mut ds) = (vec![T::Acc::zero(); width], vec![T::Acc::zero(); width]);
            let mut dqs = Vec::with_capacity(group);
            for h in kv * group..(kv + 1) * group {
                let (qh, oh, doh) =
                    (d.head(&q, b, h, d.heads), d.head(&o, b, h, d.heads), d.head(&dout, b, h, d.heads));
                let mut dq = vec![T::Acc::zero(); head];
                for i0 in (0..d.seq).step_by(BLOCK) {
                    let (rows, keys) = (BLOCK.min(d.seq - i0), (i0 + BLOCK).min(d.seq));
                    let (qb, dob) = (block(qh, i0, rows), block(doh, i0, rows));
                    let (kb, vb) = (Mat { rows: keys, ..kh }, Mat { rows: keys, ..vh });
                    matmul(&mut p, 0, keys, qb, kb.t(), false, scale, Threads::One);
                    causal_softmax(&mut p, rows, keys, i0);
                    let pb = Mat::rows(&p, 0, rows, keys, keys);
                    matmul(&mut dv, 0, d.dim, pb.t(), dob, true, T::Acc::one(), Threads::One);
                    matmul(&mut ds, 0, keys, dob, vb.t(), false, T::Acc::one(), Threads::One);
                    for r in 0..rows {
                        let (o_row, do_row) = (block(oh, i0 + r, 1), block(doh, i0 + r, 1));
                        let delta = (0..d.dim).fold(T::Acc::zero(), |s, j| s + do_row.data[j] * o_row.data[j]);
                        for (ds, &p) in ds[r * keys..][..keys].iter_mut().zip(&p[r * keys..][..keys]) {
                            *ds = p * (*ds - delta);
                        }
                    }
                    let dsb = Mat::rows(&ds, 0, rows, keys, keys);
                    matmul(&mut dq, i0 * d.dim, d.dim, dsb, kb, false, scale, Threads::One);
                    matmul(&mut dk, 0, d.dim, dsb.t(), qb, true, scale, Threads::One);
                }
                dqs.push(dq);
            }
            HeadGrads { dq: dqs, dk, dv }
        })
        .collect();
    let mut grads = vec![T::zero(); q_len + 2 * kv_len];
    let (dq, dkv) = grads.split_at_mut(q_len);
    let (dk, dv) = dkv.split_at_mut(kv_len);
    let dq_heads: Vec<Vec<T::Acc>> = per_task.iter().flat_map(|t| t.dq.iter().cloned()).collect();
    scatter_heads::<T>(dq, &dq_heads, d, d.heads);
    let dk_heads: Vec<Vec<T::Acc>> = per_task.iter().map(|t| t.dk.clone()).collect();
    scatter_heads::<T>(dk, &dk_heads, d, d.kv_heads);
    let dv_heads: Vec<Vec<T::Acc>> = per_task.into_iter().map(|t| t.dv).collect();
    scatter_heads::<T>(dv, &dv_heads, d, d.kv_heads);
    Ok(T::to_cpu_storage_owned(grads))
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "fused-causal-attention-backward"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let grads =
            for_float!(OP, q.dtype(), backward((q, lq), (k, lk), (v, lv), (&self.out, &self.dout), self.scale))?;
        Ok((grads, Shape::from(lq.shape().elem_count() + 2 * lk.shape().elem_count())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        k: &candle_core::CudaStorage,
        lk: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::attention_backward(q, lq, k, lk, v, lv, &self.out, &self.dout, self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, grads_of, randn};
    use candle_core::{DType, Device, Var, D};

    /// The composed reference: scores, an additive causal mask, softmax, and `P·V`, with
    /// the key/value heads repeated for their query heads, on `(batch, seq, heads, dim)`.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let heads_first = |t: &Tensor| t.transpose(1, 2)?.contiguous();
        let (q, k, v) = (heads_first(q)?, heads_first(k)?, heads_first(v)?);
        let (b, heads, s, dim) = q.dims4()?;
        let kv_heads = k.dim(1)?;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            t.unsqueeze(2)?.broadcast_as((b, kv_heads, heads / kv_heads, s, dim))?.reshape((b, heads, s, dim))
        };
        let mask: Vec<f32> = (0..s * s).map(|i| if i % s > i / s { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (s, s), &Device::Cpu)?.to_dtype(q.dtype())?;
        let scores = (q.matmul(&repeat(&k)?.t()?)? * scale)?.broadcast_add(&mask)?;
        candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&repeat(&v)?)?.transpose(1, 2)
    }

    #[test]
    fn forward_and_all_gradients_equal_the_composed_reference() -> Result<()> {
        // Odd lengths, one row, head dims 64, 80 and 128, GQA ratios 1, 4 and 8, more
        // than one query block.
        let cases = [
            (1, 1, 1, 1, 8),
            (2, 2, 2, 7, 16),
            (1, 4, 1, 33, 64),
            (2, 8, 1, 5, 80),
            (1, 4, 4, 130, 32),
            (1, 8, 2, 70, 128),
        ];
        for (b, heads, kv_heads, s, dim) in cases {
            let q = Var::from_tensor(&randn(1, &[b, s, heads, dim]))?;
            let k = Var::from_tensor(&randn(2, &[b, s, kv_heads, dim]))?;
            let v = Var::from_tensor(&randn(3, &[b, s, kv_heads, dim]))?;
            let dy = randn(4, &[b, s, heads, dim]);
            let scale = 1.0 / (dim as f64).sqrt();
            let what = format!("b {b}, heads {heads}/{kv_heads}, seq {s}, dim {dim}");
            let ours = causal_attention(&q, &k, &v, scale)?;
            let theirs = reference(&q, &k, &v, scale)?;
            assert_close(&ours, &theirs, 1e-5, &format!("{what}: forward"))?;
            let (ours, theirs) = (grads_of(&ours, &dy, &[&q, &k, &v])?, grads_of(&theirs, &dy, &[&q, &k, &v])?);
            for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(ours.iter().zip(&theirs)) {
                assert_close(a, b, 1e-5, &format!("{what}: {name}"))?;
            }
        }
        Ok(())
    }

    #[test]
    fn half_precision_stays_within_the_rounding_of_an_f32_reference() -> Result<()> {
        let (q, k, v) = (randn(5, &[1, 20, 4, 16]), randn(6, &[1, 20, 2, 16]), randn(7, &[1, 20, 2, 16]));
        for (dtype, tolerance) in [(DType::BF16, 1.0 / 64.0), (DType::F16, 1.0 / 512.0)] {
            let half = |t: &Tensor| t.to_dtype(dtype);
            let ours = causal_attention(&half(&q)?, &half(&k)?, &half(&v)?, 0.25)?.to_dtype(DType::F32)?;
            let exact = |t: &Tensor| t.to_dtype(dtype)?.to_dtype(DType::F32);
            let exact = reference(&exact(&q)?, &exact(&k)?, &exact(&v)?, 0.25)?;
            assert_close(&ours, &exact, tolerance, &format!("{dtype:?}"))?;
        }
        Ok(())
    }

    #[test]
    fn heads_that_do_not_group_are_refused_naming_the_shapes() {
        let error = causal_attention(&randn(1, &[1, 4, 3, 8]), &randn(2, &[1, 4, 2, 8]), &randn(3, &[1, 4, 2, 8]), 1.0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("causal_attention") && error.contains("[1, 4, 3, 8]"), "{error}");
        assert!(causal_attention(&randn(1, &[1, 4, 2, 8]), &randn(2, &[1, 5, 2, 8]), &randn(3, &[1, 5, 2, 8]), 1.0)
            .is_err());
    }
}
