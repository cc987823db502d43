//! The static description of a model that `#[derive(Shardable)]` emits.
//!
//! A model type is a tree of [`Node`]s built entirely in constants: structs with named
//! fields, candle-nn layers, raw tensors, `Vec`/`Option`/array containers and [`Unit`]
//! boundaries. The `table` module flattens that tree at compile time into the FQN table,
//! the unit grouping and the forward/backward orders; the `layout` module expands it at run
//! time for one built model (actual `Vec` lengths, `Option` presence).
//!
//! The same trait also walks and rebuilds a live model, so the static description and the
//! tensors the runtime shards can never disagree: both come from one derive.
//!
//! [`Unit`]: super::Unit

use candle_core::{Result, Tensor};

/// What a tensor leaf of the model is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Trained: sharded across ranks, gathered for compute, gradients reduced.
    Parameter,
    /// State that is not trained (running statistics, masks): replicated, never reduced.
    Buffer,
}

/// One node of a model's static schema.
#[derive(Debug)]
pub enum Node {
    /// A tensor leaf. The enclosing field's name is its name.
    Tensor(Role),
    /// A struct whose fields are themselves nodes.
    Struct(&'static StructSchema),
    /// An FSDP unit boundary: everything below is gathered and reduced together. Adds no
    /// name segment.
    Unit(&'static Node),
    /// A `Vec<T>`: one `{index}` segment, length known only at run time.
    Repeated(&'static Node),
    /// A `[T; N]`: one `{index}` segment with a length known at compile time.
    Array(usize, &'static Node),
    /// An `Option<T>`: present or not at run time. Adds no name segment.
    Optional(&'static Node),
}

/// The schema of a struct deriving `Shardable` (or of a candle-nn layer).
#[derive(Debug)]
pub struct StructSchema {
    /// The Rust type name, for messages.
    pub type_name: &'static str,
    /// Fields holding tensors, in declaration order (skipped fields are absent).
    pub fields: &'static [FieldSchema],
    /// Indices into `fields` in the order the forward pass visits them.
    pub forward_order: &'static [usize],
}

/// One field of a [`StructSchema`].
#[derive(Debug)]
pub struct FieldSchema {
    /// The Rust field name (`"0"`, `"1"`, … for tuple structs).
    pub ident: &'static str,
    /// The FQN segment(s) the field contributes, after `rename` (may contain dots).
    pub name: &'static str,
    /// `Some(Buffer)` when the field is marked `buffer`: every tensor below it is a buffer.
    pub role: Option<Role>,
    /// The schema of the field's type.
    pub node: &'static Node,
}

/// The placeholder segment for a `Vec` or array index in FQN templates.
pub const INDEX: &str = "{index}";

/// A model, or part of one, that the runtime can describe, walk and rebuild.
///
/// Derive it with `#[derive(Shardable)]`; the runtime implements it for `Tensor`, `Var`,
/// the candle-nn layers, `Vec`, `Option`, arrays and [`Unit`](crate::Unit).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not `Shardable`, so candle-fsdp cannot find its parameters",
    label = "this field's type does not implement `Shardable`",
    note = "derive it with `#[derive(Shardable)]`, or mark the field `#[fsdp(skip)]` if it holds no parameters"
)]
pub trait Shardable: Sized {
    /// The static schema of this type.
    const NODE: Node;

    /// Walks every tensor leaf in declaration order (or in forward order when
    /// `order` is [`VisitOrder::Forward`]), reporting names, units and tensors.
    fn visit(&self, visitor: &mut dyn Visitor, order: VisitOrder);

    /// Rebuilds the value with each tensor leaf replaced by `map`, called once per leaf in
    /// declaration order (the order of [`VisitOrder::Declaration`]).
    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self>;
}

/// Which order [`Shardable::visit`] walks fields in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisitOrder {
    /// Declaration order: the flat-parameter order of the FQN table.
    Declaration,
    /// The order the forward pass runs fields in (`forward_order` attribute).
    Forward,
}

/// Receives the events of [`Shardable::visit`].
pub trait Visitor {
    /// Entering a named segment (a field name, possibly with dots).
    fn enter(&mut self, name: &'static str);
    /// Entering element `index` of a `Vec` or array.
    fn enter_index(&mut self, index: usize);
    /// Leaving the innermost segment entered.
    fn leave(&mut self);
    /// Entering a unit boundary; `cell` is where the unit's runtime is installed.
    fn enter_unit(&mut self, cell: &super::unit_hooks::UnitCell);
    /// Leaving the innermost unit.
    fn leave_unit(&mut self);
    /// A tensor leaf at the current path. `role` is the leaf's own role; a `buffer`
    /// attribute above it is reported through [`Visitor::enter_buffer`].
    fn tensor(&mut self, tensor: &Tensor, role: Role);
    /// Everything until the matching [`Visitor::leave_buffer`] is a buffer.
    fn enter_buffer(&mut self) {}
    /// Leaving the innermost region [`Visitor::enter_buffer`] opened.
    fn leave_buffer(&mut self) {}
    /// Every unit until the matching [`Visitor::leave_checkpointed`] is declared
    /// checkpointed (`#[fsdp(checkpoint)]` on the field above it).
    fn enter_checkpointed(&mut self) {}
    /// Leaving the innermost region [`Visitor::enter_checkpointed`] opened.
    fn leave_checkpointed(&mut self) {}
    /// Every parameter until the matching [`Visitor::leave_frozen`] is declared frozen
    /// (`#[fsdp(frozen)]` on the field above it).
    fn enter_frozen(&mut self) {}
    /// Leaving the innermost region [`Visitor::enter_frozen`] opened.
    fn leave_frozen(&mut self) {}
}

/// Whether `node` holds an FSDP unit anywhere below it (what `#[fsdp(checkpoint)]` needs).
pub const fn holds_unit(node: &Node) -> bool {
    match node {
        Node::Tensor(_) => false,
        Node::Unit(_) => true,
        Node::Repeated(inner) | Node::Array(_, inner) | Node::Optional(inner) => holds_unit(inner),
        Node::Struct(schema) => {
            let mut i = 0;
            while i < schema.fields.len() {
                if holds_unit(schema.fields[i].node) {
                    return true;
                }
                i += 1;
            }
            false
        }
    }
}

/// Replaces tensor leaves during [`Shardable::map_tensors`].
pub trait TensorMap {
    /// The tensor to put in place of `tensor`; an error aborts the rebuild.
    fn map(&mut self, tensor: Tensor) -> Result<Tensor>;
}

impl<F: FnMut(Tensor) -> Result<Tensor>> TensorMap for F {
    fn map(&mut self, tensor: Tensor) -> Result<Tensor> {
        self(tensor)
    }
}

impl Shardable for Tensor {
    const NODE: Node = Node::Tensor(Role::Parameter);

    fn visit(&self, visitor: &mut dyn Visitor, _order: VisitOrder) {
        visitor.tensor(self, Role::Parameter);
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        map.map(self)
    }
}

impl Shardable for candle_core::Var {
    const NODE: Node = Node::Tensor(Role::Parameter);

    fn visit(&self, visitor: &mut dyn Visitor, _order: VisitOrder) {
        visitor.tensor(self.as_tensor(), Role::Parameter);
    }

    /// A `Var` owns its storage, so it cannot alias a tensor the runtime produced: the
    /// replacement must itself be a variable (or the original tensor, unchanged).
    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        let id = self.as_tensor().id();
        let mapped = map.map(self.as_tensor().clone())?;
        if mapped.id() == id || mapped.is_variable() {
            candle_core::Var::from_tensor(&mapped)
        } else {
            candle_core::bail!(
                "a `Var` field cannot hold a tensor computed by the runtime; declare the field as `Tensor`"
            )
        }
    }
}

/// Walks a sequence's elements under their `{index}` segments.
fn visit_elements<T: Shardable>(items: &[T], visitor: &mut dyn Visitor, order: VisitOrder) {
    for (index, item) in items.iter().enumerate() {
        visitor.enter_index(index);
        item.visit(visitor, order);
        visitor.leave();
    }
}

impl<T: Shardable> Shardable for Vec<T> {
    const NODE: Node = Node::Repeated(&T::NODE);

    fn visit(&self, visitor: &mut dyn Visitor, order: VisitOrder) {
        visit_elements(self, visitor, order)
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        self.into_iter().map(|item| item.map_tensors(map)).collect()
    }
}

impl<T: Shardable, const N: usize> Shardable for [T; N] {
    const NODE: Node = Node::Array(N, &T::NODE);

    fn visit(&self, visitor: &mut dyn Visitor, order: VisitOrder) {
        visit_elements(self, visitor, order)
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        let mapped: Vec<T> = self.into_iter().map(|item| item.map_tensors(map)).collect::<Result<_>>()?;
        Ok(mapped.try_into().unwrap_or_else(|_| unreachable!("an array maps to an array of the same length")))
    }
}

impl<T: Shardable> Shardable for Option<T> {
    const NODE: Node = Node::Optional(&T::NODE);

    fn visit(&self, visitor: &mut dyn Visitor, order: VisitOrder) {
        if let Some(item) = self {
            item.visit(visitor, order);
        }
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        self.map(|item| item.map_tensors(map)).transpose()
    }
}

impl<T: Shardable> Shardable for Box<T> {
    const NODE: Node = T::NODE;

    fn visit(&self, visitor: &mut dyn Visitor, order: VisitOrder) {
        (**self).visit(visitor, order)
    }

    fn map_tensors(self, map: &mut dyn TensorMap) -> Result<Self> {
        (*self).map_tensors(map).map(Box::new)
    }
}
