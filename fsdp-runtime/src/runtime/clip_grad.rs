//! [`Fsdp::clip_grad_norm`]: the norm of the whole model's gradients, computed from the
//! shard gradients of every rank, and the gradients scaled so that it is at most a limit
//! (PyTorch's `FullyShardedDataParallel.clip_grad_norm_`).

use super::Fsdp;
use crate::error::ConfigError;
use crate::error::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use fsdp_comm::ReduceOp;

/// Added to the norm before dividing, as PyTorch does, so a zero norm scales by nothing.
const EPS: f64 = 1e-6;

impl<M> Fsdp<M> {
    /// Replaces the shard gradients in `grads` (what [`Fsdp::backward`] returned) with
    /// scaled ones so that the total `norm_type`-norm of the whole model's gradients is at most
    /// `max_norm`, and returns that norm as it was before scaling. `norm_type` is any
    /// p ≥ 1, or `f64::INFINITY` for the largest magnitude.
    ///
    /// Every element of the model counts once: a rank counts the elements of its shards
    /// (not their padding), and a unit every rank of its group holds whole (`NO_SHARD`)
    /// is counted by the group's first rank. A collective: every rank calls it with its
    /// gradients of the same step. A norm that is not finite is an error on every rank,
    /// naming the parameters whose shard gradients on this rank are not finite (in layout
    /// order), and nothing is scaled.
    pub fn clip_grad_norm(&self, grads: &mut GradStore, max_norm: f64, norm_type: f64) -> Result<f64> {
        if norm_type.is_nan() || norm_type < 1.0 || max_norm.is_nan() || max_norm < 0.0 {
            return Err(Error::Config(ConfigError::ClipArgument {
                problem: format!(
                    "norm_type must be at least 1 and max_norm non-negative, not {norm_type} and {max_norm}"
                ),
            }));
        }
        self.check_between_steps("Fsdp::clip_grad_norm")?;
        // This rank's contribution per parameter, Σ|g|^p (or max|g| for the infinity norm)
        // in f64, and Σ|g|, which is NaN or infinite when any element is (a maximum may
        // skip a NaN); kept on the device and read back once.
        let mut named = Vec::new();
        let mut parts = Vec::new();
        for group in self.groups() {
            if (group.replicates() && group.comm.rank() != 0) || group.replica_rank() != 0 {
                continue;
            }
            for param in &group.params {
                let Some(grad) = grads.get(param.shard.as_tensor()) else {
                    continue;
                };
                let real = param.spec.real_len(group.shard_rank());
                if real == 0 {
                    continue;
                }
                let values = grad.flatten_all()?.narrow(0, 0, real)?.to_dtype(DType::F64)?.abs()?;
                let part = if norm_type.is_infinite() { values.max(0)? } else { values.powf(norm_type)?.sum_all()? };
                parts.push(Tensor::stack(&[part, values.sum_all()?], 0)?);
                named.push((param.fqn.as_str(), group.name.as_str()));
            }
        }
        let read = if parts.is_empty() { Vec::new() } else { Tensor::stack(&parts, 0)?.to_vec2::<f64>()? };
        let mut local = 0.0f64;
        let mut non_finite = Vec::new();
        for ((fqn, unit), row) in named.into_iter().zip(read) {
            let (part, sum) = (row[0], row[1]);
            let part = if sum.is_finite() { part } else { sum };
            if !part.is_finite() {
                non_finite.push(format!("`{fqn}` (unit `{unit}`)"));
            }
            local = combine(local, part, norm_type);
        }
        let total = self.combine_over_ranks(local, norm_type)?;
        let norm = if norm_type.is_infinite() { total } else { total.powf(1.0 / norm_type) };
        if !norm.is_finite() {
            return Err(Error::NonFiniteGradNorm { rank: self.rank(), norm_type, norm, parameters: non_finite });
        }
        let scale = max_norm / (norm + EPS);
        if scale < 1.0 {
            for var in self.parameters() {
                if let Some(grad) = grads.get(var.as_tensor()) {
                    let scaled = (grad * scale)?;
                    grads.insert(var.as_tensor(), scaled);
                }
            }
        }
        Ok(norm)
    }

    /// The sum (or, for the infinity norm, the largest) of every rank's `local` value.
    fn combine_over_ranks(&self, local: f64, norm_type: f64) -> Result<f64> {
        let comm = self.comm();
        let device = comm.device();
        let label = "the gradient norm (clip_grad_norm)";
        let mine = Tensor::new(&[local], &device)?;
        let all = if norm_type.is_infinite() {
            comm.all_gather(&mine, label)?.wait()?
        } else {
            comm.all_reduce(&mine, ReduceOp::Sum, label)?.wait()?
        };
        let all = all.to_device(&Device::Cpu)?.to_vec1::<f64>()?;
        Ok(all.into_iter().fold(0.0, |acc, v| combine(acc, v, norm_type)))
    }
}

/// Adds two contributions to a p-norm's sum, or takes the larger for the infinity norm;
/// NaN wins either way (`f64::max` would drop it).
fn combine(a: f64, b: f64, norm_type: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else if norm_type.is_infinite() {
        a.max(b)
    } else {
        a + b
    }
}
