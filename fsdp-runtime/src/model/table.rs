//! The static FQN table: a model's schema flattened at compile time.
//!
//! Everything here is `const fn`, so `#[derive(Shardable)]` turns a model's [`Node`] tree
//! into constants: the parameter templates in flat-parameter (declaration) order with
//! `{index}` segments for `Vec` and array elements, the unit each template belongs to (its
//! nearest enclosing [`Unit`](crate::Unit), else the root unit 0), and the unit templates in
//! pre-forward and post-forward order. The backward prefetch order follows from the
//! post-forward order: in backward each unit prefetches the unit that finished its forward
//! just before it.

use super::schema::{Node, Role, Shardable, INDEX};
use std::fmt;

/// The deepest FQN a template can have, in segments. Deeper models fail to compile with a
/// message naming this limit.
pub const MAX_DEPTH: usize = 24;

/// An FQN template: its segments, joined with `.` when shown. A segment may itself hold
/// dots (a `rename` such as `"model.embed_tokens"`); `{index}` stands for an element index.
#[derive(Clone, Copy)]
pub struct FqnTemplate {
    segments: [&'static str; MAX_DEPTH],
    len: usize,
}

impl FqnTemplate {
    /// The empty path: the root.
    pub const ROOT: Self = Self { segments: [""; MAX_DEPTH], len: 0 };

    const fn push(mut self, segment: &'static str) -> Self {
        if segment.is_empty() {
            return self;
        }
        assert!(self.len < MAX_DEPTH, "model nesting is deeper than candle_fsdp::model::MAX_DEPTH");
        self.segments[self.len] = segment;
        self.len += 1;
        self
    }

    /// The segments in order, `{index}` for an element index; empty for the root.
    pub fn segments(&self) -> &[&'static str] {
        &self.segments[..self.len]
    }

    /// How many `{index}` segments the template holds.
    pub fn index_count(&self) -> usize {
        self.segments().iter().filter(|s| **s == INDEX).count()
    }

    /// The template with its `{index}` segments replaced by `indices`, in order.
    pub fn expand(&self, indices: &[usize]) -> String {
        let mut indices = indices.iter();
        let parts: Vec<String> = self
            .segments()
            .iter()
            .map(|segment| match *segment {
                INDEX => indices.next().map(|i| i.to_string()).unwrap_or_else(|| INDEX.to_string()),
                name => name.to_string(),
            })
            .collect();
        parts.join(".")
    }
}

impl fmt::Display for FqnTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.segments().join("."))
    }
}

impl fmt::Debug for FqnTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl PartialEq<&str> for FqnTemplate {
    fn eq(&self, other: &&str) -> bool {
        let mut rest = *other;
        for (i, segment) in self.segments().iter().enumerate() {
            if i > 0 {
                let Some(after_dot) = rest.strip_prefix('.') else {
                    return false;
                };
                rest = after_dot;
            }
            let Some(after) = rest.strip_prefix(segment) else {
                return false;
            };
            rest = after;
        }
        rest.is_empty()
    }
}

/// One tensor leaf of the table.
#[derive(Clone, Copy, Debug)]
pub struct ParamTemplate {
    /// Where the tensor sits, with `{index}` for element indices.
    pub fqn: FqnTemplate,
    /// Index of the unit template it belongs to (0: the root unit).
    pub unit: usize,
    /// Trained parameter or buffer.
    pub role: Role,
}

/// One unit of the table. Unit 0 is the root: every parameter in no [`Unit`](crate::Unit).
#[derive(Clone, Copy, Debug)]
pub struct UnitTemplate {
    /// Where the unit sits; the root's is empty.
    pub fqn: FqnTemplate,
    /// The enclosing unit; `None` for the root.
    pub parent: Option<usize>,
}

impl UnitTemplate {
    /// The unit's name for display: its FQN, or `<root>`.
    pub fn display_name(&self) -> String {
        if self.fqn.len == 0 {
            "<root>".to_string()
        } else {
            self.fqn.to_string()
        }
    }
}

/// How many tensor leaves a schema holds (each `Vec`/array element template once).
pub const fn param_count(node: &Node) -> usize {
    match node {
        Node::Tensor(_) => 1,
        Node::Struct(schema) => {
            let mut total = 0;
            let mut i = 0;
            while i < schema.fields.len() {
                total += param_count(schema.fields[i].node);
                i += 1;
            }
            total
        }
        Node::Unit(inner) | Node::Repeated(inner) | Node::Array(_, inner) | Node::Optional(inner) => param_count(inner),
    }
}

/// How many unit templates a schema holds, the root unit included.
pub const fn unit_count(node: &Node) -> usize {
    1 + nested_unit_count(node)
}

const fn nested_unit_count(node: &Node) -> usize {
    match node {
        Node::Tensor(_) => 0,
        Node::Struct(schema) => {
            let mut total = 0;
            let mut i = 0;
            while i < schema.fields.len() {
                total += nested_unit_count(schema.fields[i].node);
                i += 1;
            }
            total
        }
        Node::Unit(inner) => 1 + nested_unit_count(inner),
        Node::Repeated(inner) | Node::Array(_, inner) | Node::Optional(inner) => nested_unit_count(inner),
    }
}

/// The flattened table of a model type with `P` tensor templates and `U` unit templates.
#[derive(Clone, Copy, Debug)]
pub struct Table<const P: usize, const U: usize> {
    /// Every tensor template, in flat-parameter (declaration) order.
    pub params: [ParamTemplate; P],
    /// Every unit template in declaration order, the root (0) first.
    pub units: [UnitTemplate; U],
    /// Unit templates in the order their forward starts (the root first).
    pub forward_order: [usize; U],
    /// Unit templates in the order their forward ends (the root last).
    pub post_forward_order: [usize; U],
    /// Unit templates in the order their pre-backward runs (the root first): the reverse
    /// of the post-forward order. Each unit's backward prefetch targets the unit after it
    /// here (for a `Vec` of units, the same template at the next lower index).
    pub backward_order: [usize; U],
}

struct Cursor<'a, const P: usize, const U: usize> {
    table: &'a mut Table<P, U>,
    params: usize,
    units: usize,
    pre: usize,
    post: usize,
}

impl<const P: usize, const U: usize> Table<P, U> {
    /// Flattens `node`. `P` and `U` must be [`param_count`] and [`unit_count`] of it.
    pub const fn build(node: &Node) -> Self {
        assert!(P == param_count(node), "Table::build: P must equal param_count(node)");
        assert!(U == unit_count(node), "Table::build: U must equal unit_count(node)");
        let empty_param = ParamTemplate { fqn: FqnTemplate::ROOT, unit: 0, role: Role::Parameter };
        let root = UnitTemplate { fqn: FqnTemplate::ROOT, parent: None };
        let mut table = Table {
            params: [empty_param; P],
            units: [root; U],
            forward_order: [0; U],
            post_forward_order: [0; U],
            backward_order: [0; U],
        };
        let mut cursor = Cursor { table: &mut table, params: 0, units: 1, pre: 1, post: 0 };
        declare(node, FqnTemplate::ROOT, 0, None, &mut cursor);
        order(node, 1, &mut cursor);
        cursor.table.post_forward_order[U - 1] = 0;
        let mut i = 0;
        while i < U {
            table.backward_order[i] = table.post_forward_order[U - 1 - i];
            i += 1;
        }
        table
    }

    /// The slice view the runtime works with.
    pub const fn as_static(&'static self) -> StaticTable {
        StaticTable {
            params: &self.params,
            units: &self.units,
            forward_order: &self.forward_order,
            post_forward_order: &self.post_forward_order,
            backward_order: &self.backward_order,
        }
    }
}

/// Walks in declaration order: parameter templates and unit numbering.
const fn declare<const P: usize, const U: usize>(
    node: &Node,
    fqn: FqnTemplate,
    unit: usize,
    role: Option<Role>,
    cursor: &mut Cursor<'_, P, U>,
) {
    match node {
        Node::Tensor(own_role) => {
            let role = match role {
                Some(role) => role,
                None => *own_role,
            };
            cursor.table.params[cursor.params] = ParamTemplate { fqn, unit, role };
            cursor.params += 1;
        }
        Node::Struct(schema) => {
            let mut i = 0;
            while i < schema.fields.len() {
                let field = &schema.fields[i];
                let role = if field.role.is_some() { field.role } else { role };
                declare(field.node, fqn.push(field.name), unit, role, cursor);
                i += 1;
            }
        }
        Node::Unit(inner) => {
            let id = cursor.units;
            cursor.table.units[id] = UnitTemplate { fqn, parent: Some(unit) };
            cursor.units += 1;
            declare(inner, fqn, id, role, cursor);
        }
        Node::Repeated(inner) | Node::Array(_, inner) => declare(inner, fqn.push(INDEX), unit, role, cursor),
        Node::Optional(inner) => declare(inner, fqn, unit, role, cursor),
    }
}

/// Walks in forward order: records unit starts and ends. `first_unit` is the declaration
/// number the first unit inside `node` has.
const fn order<const P: usize, const U: usize>(node: &Node, first_unit: usize, cursor: &mut Cursor<'_, P, U>) {
    match node {
        Node::Tensor(_) => {}
        Node::Struct(schema) => {
            let mut k = 0;
            while k < schema.forward_order.len() {
                let field = schema.forward_order[k];
                let mut before = 0;
                let mut j = 0;
                while j < field {
                    before += nested_unit_count(schema.fields[j].node);
                    j += 1;
                }
                order(schema.fields[field].node, first_unit + before, cursor);
                k += 1;
            }
        }
        Node::Unit(inner) => {
            cursor.table.forward_order[cursor.pre] = first_unit;
            cursor.pre += 1;
            order(inner, first_unit + 1, cursor);
            cursor.table.post_forward_order[cursor.post] = first_unit;
            cursor.post += 1;
        }
        Node::Repeated(inner) | Node::Array(_, inner) | Node::Optional(inner) => order(inner, first_unit, cursor),
    }
}

/// A model type's table as slices, independent of its sizes.
#[derive(Clone, Copy, Debug)]
pub struct StaticTable {
    /// Every tensor template, in flat-parameter (declaration) order.
    pub params: &'static [ParamTemplate],
    /// Every unit template in declaration order, the root (0) first.
    pub units: &'static [UnitTemplate],
    /// Unit templates in the order their forward starts (the root first).
    pub forward_order: &'static [usize],
    /// Unit templates in the order their forward ends (the root last).
    pub post_forward_order: &'static [usize],
    /// Unit templates in the order their pre-backward runs: the reverse of
    /// `post_forward_order`.
    pub backward_order: &'static [usize],
}

impl StaticTable {
    /// The parameter templates of unit template `unit`, in flat-parameter order.
    pub fn unit_params(&self, unit: usize) -> impl Iterator<Item = &ParamTemplate> {
        self.params.iter().filter(move |p| p.unit == unit)
    }
}

/// A type with a static table: every struct deriving `Shardable` can be a model root.
pub trait ShardableModel: Shardable {
    /// The type's flattened table, built at compile time by the derive.
    const TABLE: StaticTable;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::schema::{FieldSchema, StructSchema};

    const PARAMETER: Node = Node::Tensor(Role::Parameter);

    const fn field(name: &'static str, role: Option<Role>, node: &'static Node) -> FieldSchema {
        FieldSchema { ident: name, name, role, node }
    }

    static LINEAR: StructSchema = StructSchema {
        type_name: "Linear",
        fields: &[field("weight", None, &PARAMETER), field("bias", None, &PARAMETER)],
        forward_order: &[0, 1],
    };
    /// A block whose forward runs its norm scale (a buffer) before its attention unit.
    static BLOCK: StructSchema = StructSchema {
        type_name: "Block",
        fields: &[
            field("self_attn", None, &Node::Unit(&Node::Struct(&LINEAR))),
            field("scale", Some(Role::Buffer), &PARAMETER),
        ],
        forward_order: &[1, 0],
    };
    /// Declared head, layers, embedding; run embedding, layers, head.
    static MODEL: StructSchema = StructSchema {
        type_name: "Model",
        fields: &[
            field("lm_head", None, &Node::Optional(&Node::Struct(&LINEAR))),
            field("model.layers", None, &Node::Repeated(&Node::Unit(&Node::Struct(&BLOCK)))),
            field("embed.weight", None, &PARAMETER),
        ],
        forward_order: &[2, 1, 0],
    };
    static ROOT: Node = Node::Struct(&MODEL);

    #[test]
    fn a_hand_built_schema_flattens_to_its_fqns_units_and_orders() {
        assert_eq!((param_count(&ROOT), unit_count(&ROOT)), (6, 3));
        let table = Table::<6, 3>::build(&ROOT);
        let params: Vec<(String, usize, Role)> =
            table.params.iter().map(|p| (p.fqn.segments().join("."), p.unit, p.role)).collect();
        let expected = [
            ("lm_head.weight", 0, Role::Parameter),
            ("lm_head.bias", 0, Role::Parameter),
            ("model.layers.{index}.self_attn.weight", 2, Role::Parameter),
            ("model.layers.{index}.self_attn.bias", 2, Role::Parameter),
            ("model.layers.{index}.scale", 1, Role::Buffer),
            ("embed.weight", 0, Role::Parameter),
        ];
        let expected: Vec<(String, usize, Role)> = expected.iter().map(|&(f, u, r)| (f.to_string(), u, r)).collect();
        assert_eq!(params, expected);

        let units: Vec<(String, Option<usize>)> = table.units.iter().map(|u| (u.display_name(), u.parent)).collect();
        assert_eq!(
            units,
            [
                ("<root>".to_string(), None),
                ("model.layers.{index}".to_string(), Some(0)),
                ("model.layers.{index}.self_attn".to_string(), Some(1)),
            ]
        );
        // The root starts first and ends last; the attention unit ends inside its block.
        assert_eq!(table.forward_order, [0, 1, 2]);
        assert_eq!(table.post_forward_order, [2, 1, 0]);
        assert_eq!(table.backward_order, [0, 1, 2]);
        // Expanded with the layer index.
        assert_eq!(table.params[3].fqn.expand(&[7]), "model.layers.7.self_attn.bias");
        assert_eq!(table.params[2].fqn.index_count(), 1);
    }
}
