//! [`RotaryEmbedding`]: the rotary position tables and the rotation of queries and keys.

use super::at_least_f32;
use super::config::{LlamaConfig, RopeScaling};
use candle_core::{DType, Device, Result, Tensor};

/// Precomputed rotary-embedding tables: `cos` and `sin` of `position · θ^(-2j/head_dim)`,
/// each `(max_position_embeddings, head_dim / 2)`. Not parameters.
#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    /// `cos(position · θ^(-2j/head_dim))`, `(max_position_embeddings, head_dim / 2)`.
    pub cos: Tensor,
    /// `sin(position · θ^(-2j/head_dim))`, `(max_position_embeddings, head_dim / 2)`.
    pub sin: Tensor,
}

impl RotaryEmbedding {
    /// The tables are computed in f32 (as Hugging Face does), or in f64 for an f64 model,
    /// and stored in `dtype`.
    pub fn new(config: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let (head_dim, scaling) = (config.head_dim(), config.rope_scaling.as_ref());
        Self::from_base(head_dim, config.rope_theta, scaling, config.max_position_embeddings, dtype, device)
    }

    /// The tables for heads of `head_dim`, base `theta` (with Llama 3's `scaling`, if
    /// given) and positions `0..max_positions`.
    pub fn from_base(
        head_dim: usize,
        theta: f64,
        scaling: Option<&RopeScaling>,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let internal = at_least_f32(dtype);
        let inv_freq: Vec<f64> = (0..half)
            .map(|j| {
                let inv_freq = 1.0 / theta.powf((2 * j) as f64 / head_dim as f64);
                scaling.map_or(inv_freq, |scaling| scaling.scale(inv_freq))
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?.to_dtype(internal)?;
        let positions =
            Tensor::arange(0u32, max_positions as u32, device)?.to_dtype(internal)?.reshape((max_positions, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        Ok(Self { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// Rotates `x` `(batch, heads, seq, head_dim)` for positions `0..seq`:
    /// `x·cos + rotate_half(x)·sin` with the half-split convention of Hugging Face Llama,
    /// from candle's differentiable primitives (candle-nn's `rope` is forward-only).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (cos, sin) = self.tables(x.dim(2)?, x.dtype())?;
        candle_nn::rotary_emb::rope_slow(&x.contiguous()?, &cos, &sin)
    }

    /// The same rotation of `x` `(batch, seq, heads, head_dim)` by the fused op.
    pub fn apply_fused(&self, x: &Tensor) -> Result<Tensor> {
        let (cos, sin) = self.tables(x.dim(1)?, x.dtype())?;
        crate::ops::rope(x, &cos, &sin)
    }

    /// The tables' first `seq` rows in `dtype`: they follow the activations' dtype, which
    /// mixed precision may lower.
    fn tables(&self, seq: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let table = |t: &Tensor| t.narrow(0, 0, seq)?.to_dtype(dtype);
        Ok((table(&self.cos)?, table(&self.sin)?))
    }
}
