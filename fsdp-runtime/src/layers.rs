//! `Shardable` for the candle-nn layers, with the parameter names candle-nn's own
//! constructors use in a `VarBuilder` (`weight`, `bias`, `running_mean`, …), so the FQNs
//! of a derived model equal the keys of the `VarMap` it was built from.

use crate::schema::{FieldSchema, Node, Role, Shardable, StructSchema, TensorMap, VisitOrder, Visitor};
use candle_core::{Result, Tensor};
use candle_nn::{
    BatchNorm, Conv1d, Conv2d, ConvTranspose1d, ConvTranspose2d, Embedding, LayerNorm, Linear,
    PReLU, RmsNorm,
};

const PARAM: Node = Node::Tensor(Role::Parameter);
const OPTIONAL_PARAM: Node = Node::Optional(&PARAM);
const BUFFER: Node = Node::Tensor(Role::Buffer);

const fn field(name: &'static str, node: &'static Node) -> FieldSchema {
    FieldSchema { ident: name, name, role: None, node }
}

/// The schema of a layer whose fields are all visited in declaration order.
macro_rules! layer_node {
    ($type_name:expr, [$($field:expr),* $(,)?]) => {{
        const FIELDS: &[FieldSchema] = &[$($field),*];
        const ORDER: [usize; FIELDS.len()] = declaration_order::<{ FIELDS.len() }>();
        Node::Struct(&StructSchema { type_name: $type_name, fields: FIELDS, forward_order: &ORDER })
    }};
}

const fn declaration_order<const N: usize>() -> [usize; N] {
    let mut order = [0; N];
    let mut i = 0;
    while i < N {
        order[i] = i;
        i += 1;
    }
    order
}

fn leaf(visitor: &mut dyn Visitor, name: &'static str, tensor: &Tensor, role: Role) {
    visitor.enter(name);
    visitor.tensor(tensor, role);
    visitor.leave();
}

fn weight_and_bias(visitor: &mut dyn Visitor, weight: &Tensor, bias: Option<&Tensor>) {
    leaf(visitor, "weight", weight, Role::Parameter);
    if let Some(bias) = bias {
        leaf(visitor, "bias", bias, Role::Parameter);
    }
}

fn map_bias(bias: Option<&Tensor>, map: &mut dyn TensorMap) -> Result<Option<Tensor>> {
    bias.map(|bias| map.map(bias.clone())).transpose()
}

impl Shardable for Linear {
    const NODE: Node = layer_node!("Linear", [field("weight", &PARAM), field("bias", &OPTIONAL_PARAM)]);

    fn visit(&self, visitor: &mut dyn Visitor, _order: VisitOrder) {
        weight_and_bias(visitor, self.weight(), self.bias());
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        let weight = map.map(self.weight().clone())?;
        Ok(Linear::new(weight, map_bias(self.bias(), map)?))
    }
}

impl Shardable for Embedding {
    const NODE: Node = layer_node!("Embedding", [field("weight", &PARAM)]);

    fn visit(&self, visitor: &mut dyn Visitor, _order: VisitOrder) {
        leaf(visitor, "weight", self.embeddings(), Role::Parameter);
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        let hidden_size = self.hidden_size();
        Ok(Embedding::new(map.map(self.embeddings().clone())?, hidden_size))
    }
}

impl Shardable for LayerNorm {
    const NODE: Node = layer_node!("LayerNorm", [field("weight", &PARAM), field("bias", &OPTIONAL_PARAM)]);

    fn visit(&self, visitor: &mut dyn Visitor, _order: VisitOrder) {
        weight_and_bias(visitor, self.weight(), self.bias());
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        let weight = map.map(self.weight().clone())?;
        let bias = map_bias(self.bias(), map)?;
        // candle-nn builds each kind of LayerNorm through its own constructor.
        match (self.remove_mean(), bias) {
            (true, Some(bias)) => Ok(LayerNorm::new(weight, bias, self.eps())),
            (true, None) => Ok(LayerNorm::new_no_bias(weight, self.eps())),
            (false, None) => Ok(LayerNorm::rms_norm(weight, self.eps())),
            (false, Some(_)) => candle_core::bail!(
                "a LayerNorm that keeps the mean but has a bias cannot be rebuilt through candle-nn's constructors"
            ),
        }
    }
}

impl Shardable for RmsNorm {
    const NODE: Node = layer_node!("RmsNorm", [field("weight", &PARAM)]);

    fn visit(&self, visitor: &mut dyn Visitor, _order: VisitOrder) {
        leaf(visitor, "weight", self.weight(), Role::Parameter);
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        let eps = self.eps();
        Ok(RmsNorm::new(map.map(self.weight().clone())?, eps))
    }
}

impl Shardable for PReLU {
    const NODE: Node = layer_node!("PReLU", [field("weight", &PARAM)]);

    fn visit(&self, visitor: &mut dyn Visitor, _order: VisitOrder) {
        leaf(visitor, "weight", self.weight(), Role::Parameter);
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        let is_scalar = self.is_scalar();
        Ok(PReLU::new(map.map(self.weight().clone())?, is_scalar))
    }
}

/// The convolutions differ only in their config type.
macro_rules! conv_shardable {
    ($($layer:ident),*) => {$(
        impl Shardable for $layer {
            const NODE: Node =
                layer_node!(stringify!($layer), [field("weight", &PARAM), field("bias", &OPTIONAL_PARAM)]);

            fn visit(&self, visitor: &mut dyn Visitor, _order: VisitOrder) {
                weight_and_bias(visitor, self.weight(), self.bias());
            }

            fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
                let weight = map.map(self.weight().clone())?;
                let bias = map_bias(self.bias(), map)?;
                Ok($layer::new(weight, bias, self.config().clone()))
            }
        }
    )*};
}

conv_shardable!(Conv1d, Conv2d, ConvTranspose1d, ConvTranspose2d);

impl Shardable for BatchNorm {
    const NODE: Node = layer_node!(
        "BatchNorm",
        [
            field("weight", &OPTIONAL_PARAM),
            field("bias", &OPTIONAL_PARAM),
            field("running_mean", &BUFFER),
            field("running_var", &BUFFER),
        ]
    );

    fn visit(&self, visitor: &mut dyn Visitor, _order: VisitOrder) {
        if let Some((weight, bias)) = self.weight_and_bias() {
            weight_and_bias(visitor, weight, Some(bias));
        }
        leaf(visitor, "running_mean", self.running_mean(), Role::Buffer);
        leaf(visitor, "running_var", self.running_var(), Role::Buffer);
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        let affine = match self.weight_and_bias() {
            Some((weight, bias)) => Some((map.map(weight.clone())?, map.map(bias.clone())?)),
            None => None,
        };
        let running_mean = map.map(self.running_mean().clone())?;
        let running_var = map.map(self.running_var().clone())?;
        let num_features = running_mean.elem_count();
        match affine {
            Some((weight, bias)) => BatchNorm::new_with_momentum(
                num_features,
                running_mean,
                running_var,
                weight,
                bias,
                self.eps(),
                self.momentum(),
            ),
            None => BatchNorm::new_no_bias_with_momentum(
                num_features,
                running_mean,
                running_var,
                self.eps(),
                self.momentum(),
            ),
        }
    }
}

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
pub fn group_norm(
    num_groups: usize,
    num_channels: usize,
    eps: f64,
    vb: candle_nn::VarBuilder,
) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(num_channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(num_channels, "bias", candle_nn::Init::Const(0.))?;
    GroupNorm::new(weight, bias, num_groups, eps)
}

impl GroupNorm {
    pub fn new(weight: Tensor, bias: Tensor, num_groups: usize, eps: f64) -> Result<Self> {
        let num_channels = weight.elem_count();
        if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
            candle_core::bail!(
                "GroupNorm: num_groups ({num_groups}) must divide num_channels ({num_channels})"
            )
        }
        Ok(Self { weight, bias, num_groups, eps })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

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
            candle_core::bail!(
                "GroupNorm expects {} channels, got {channels}",
                self.weight.elem_count()
            )
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

impl Shardable for crate::pipeline::StageLinear {
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
