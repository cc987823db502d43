//! `Shardable` for the candle-nn layers, with the parameter names candle-nn's own
//! constructors use in a `VarBuilder` (`weight`, `bias`, `running_mean`, …), so the FQNs
//! of a derived model equal the keys of the `VarMap` it was built from.

use super::schema::{FieldSchema, Node, Role, Shardable, TensorMap, VisitOrder, Visitor};
use candle_core::{Result, Tensor};
use candle_nn::{
    BatchNorm, Conv1d, Conv2d, ConvTranspose1d, ConvTranspose2d, Embedding, LayerNorm, Linear, PReLU, RmsNorm,
};

pub(crate) const PARAM: Node = Node::Tensor(Role::Parameter);
pub(crate) const OPTIONAL_PARAM: Node = Node::Optional(&PARAM);
const BUFFER: Node = Node::Tensor(Role::Buffer);

pub(crate) const fn field(name: &'static str, node: &'static Node) -> FieldSchema {
    FieldSchema { ident: name, name, role: None, node }
}

/// The schema of a layer whose fields are all visited in declaration order.
macro_rules! layer_node {
    ($type_name:expr, [$($field:expr),* $(,)?]) => {{
        const FIELDS: &[$crate::model::FieldSchema] = &[$($field),*];
        const ORDER: [usize; FIELDS.len()] = $crate::model::layers::declaration_order::<{ FIELDS.len() }>();
        $crate::model::Node::Struct(&$crate::model::StructSchema {
            type_name: $type_name,
            fields: FIELDS,
            forward_order: &ORDER,
        })
    }};
}
pub(crate) use layer_node;

pub(crate) const fn declaration_order<const N: usize>() -> [usize; N] {
    let mut order = [0; N];
    let mut i = 0;
    while i < N {
        order[i] = i;
        i += 1;
    }
    order
}

pub(crate) fn leaf(visitor: &mut dyn Visitor, name: &'static str, tensor: &Tensor, role: Role) {
    visitor.enter(name);
    visitor.tensor(tensor, role);
    visitor.leave();
}

pub(crate) fn weight_and_bias(visitor: &mut dyn Visitor, weight: &Tensor, bias: Option<&Tensor>) {
    leaf(visitor, "weight", weight, Role::Parameter);
    if let Some(bias) = bias {
        leaf(visitor, "bias", bias, Role::Parameter);
    }
}

pub(crate) fn map_bias(bias: Option<&Tensor>, map: &mut dyn TensorMap) -> Result<Option<Tensor>> {
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
