//! [`GroupNorm`]: group normalization whose parameters the runtime can reach.

use super::layers::{field, layer_node, weight_and_bias, PARAM};
use super::schema::{Node, Shardable, TensorMap, VisitOrder, Visitor};
use candle_core::{Result, Tensor};

/// Group normalization with its parameters reachable.
///
/// candle-nn's `GroupNorm` keeps `weight` and `bias` private and has no accessors, so no
/// code outside candle-nn can shard it; this layer computes the same function and exposes
/// its parameters. Build it with [`group_norm`] exactly like candle-nn's.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

/// Like `candle_nn::group_norm`: parameters `weight` (ones) and `bias` (zeros).
pub fn group_norm(num_groups: usize, num_channels: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(num_channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(num_channels, "bias", candle_nn::Init::Const(0.))?;
    GroupNorm::new(weight, bias, num_groups, eps)
}

impl GroupNorm {
    /// A group norm over `num_groups` groups with the given per-channel `weight` and `bias`
    /// (one element per channel) and `eps` added to the variance. Fails unless `num_groups`
    /// is positive and divides the channel count.
    pub fn new(weight: Tensor, bias: Tensor, num_groups: usize, eps: f64) -> Result<Self> {
        let num_channels = weight.elem_count();
        if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
            candle_core::bail!("GroupNorm: num_groups ({num_groups}) must divide num_channels ({num_channels})")
        }
        Ok(Self { weight, bias, num_groups, eps })
    }

    /// The per-channel scale, `(num_channels)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The per-channel shift, `(num_channels)`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl candle_core::Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() < 3 {
            candle_core::bail!("input rank for GroupNorm should be at least 3, got {dims:?}")
        }
        let (batch, channels) = (dims[0], dims[1]);
        if channels != self.weight.elem_count() {
            candle_core::bail!("GroupNorm expects {} channels, got {channels}", self.weight.elem_count())
        }
        // Normalise each group over its channels and spatial positions, then apply the
        // per-channel affine transform.
        let grouped = x.reshape((batch, self.num_groups, ()))?;
        let mean = grouped.mean_keepdim(2)?;
        let centered = grouped.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(2)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?.reshape(dims)?;
        let mut affine_shape = vec![1; dims.len()];
        affine_shape[1] = channels;
        normed
            .broadcast_mul(&self.weight.reshape(affine_shape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(affine_shape.as_slice())?)
    }
}

impl Shardable for GroupNorm {
    const NODE: Node = layer_node!("GroupNorm", [field("weight", &PARAM), field("bias", &PARAM)]);

    fn visit(&self, visitor: &mut dyn Visitor, _order: VisitOrder) {
        weight_and_bias(visitor, &self.weight, Some(&self.bias));
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        let weight = map.map(self.weight)?;
        let bias = map.map(self.bias)?;
        GroupNorm::new(weight, bias, self.num_groups, self.eps)
    }
}
