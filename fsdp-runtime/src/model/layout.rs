//! The run-time side of the FQN table: the templates expanded for one built model.
//!
//! A [`Layout`] lists every tensor of a model under its FQN (actual `Vec` lengths, present
//! `Option`s), the concrete units with their parameters, the concrete forward and
//! post-forward orders, and the tied parameters (one tensor reachable at two FQNs). It
//! refuses ties that cross units, and cross-checks the model against a candle `VarMap`.

use super::schema::{Role, Shardable, VisitOrder, Visitor, INDEX};
use super::table::{ShardableModel, StaticTable};
use super::unit_hooks::UnitCell;
use crate::error::ConfigError;
use crate::error::{Error, Result};
use candle_core::{Tensor, TensorId};
use std::collections::HashMap;

/// One distinct tensor of a model.
#[derive(Clone, Debug)]
pub struct ParamInfo {
    /// The tensor's FQN: the first one a declaration-order walk reaches (others are
    /// [`Tie`]s).
    pub fqn: String,
    /// Index into the static table's parameter templates.
    pub template: usize,
    /// Index into [`Layout::units`].
    pub unit: usize,
    /// Trained parameter or buffer (every tensor below a `buffer` field is a buffer).
    pub role: Role,
    /// Declared frozen on the model (below a `#[fsdp(frozen)]` field); see
    /// [`Layout::frozen_params`] for what else freezes it.
    pub frozen: bool,
    /// The tensor the built model holds.
    pub tensor: Tensor,
}

/// One concrete unit: the root (index 0) or an instance of a [`crate::Unit`] field.
#[derive(Clone, Debug)]
pub struct UnitInfo {
    /// The unit's FQN prefix; empty for the root.
    pub fqn: String,
    /// Index into the static table's unit templates.
    pub template: usize,
    /// Index into [`Layout::units`] of the enclosing unit; `None` for the root.
    pub parent: Option<usize>,
    /// Indices into [`Layout::params`], in flat-parameter order.
    pub params: Vec<usize>,
    /// Declared `#[fsdp(checkpoint)]` on the model: the unit checkpoints its activations.
    pub checkpoint: bool,
}

impl UnitInfo {
    /// The unit's name for messages and traces: its FQN, or `<root>`.
    pub fn display_name(&self) -> &str {
        if self.fqn.is_empty() {
            "<root>"
        } else {
            &self.fqn
        }
    }
}

/// A second FQN at which an already listed tensor is reachable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tie {
    /// Index into [`Layout::params`] of the tensor's first FQN.
    pub param: usize,
    /// The FQN under which the tensor is reached again.
    pub fqn: String,
}

/// A built model's expanded table.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The model type's static table the layout expands.
    pub table: StaticTable,
    /// Every distinct tensor, parameters and buffers, in declaration order.
    pub params: Vec<ParamInfo>,
    /// Every concrete unit, the root first, in declaration order.
    pub units: Vec<UnitInfo>,
    /// The further FQNs of tensors already in [`Layout::params`].
    pub ties: Vec<Tie>,
    /// Concrete units in the order their forward starts (the root first).
    pub forward_order: Vec<usize>,
    /// Concrete units in the order their forward ends (the root last).
    pub post_forward_order: Vec<usize>,
}

impl Layout {
    /// Expands `model`'s table. Fails when a tensor is reachable from two units.
    pub fn of<M: ShardableModel>(model: &M) -> Result<Self> {
        Self::from_table(model, M::TABLE)
    }

    /// As [`Layout::of`], for any `Shardable` value with an explicitly given table.
    pub fn from_table<M: Shardable>(model: &M, table: StaticTable) -> Result<Self> {
        let mut collector = Collector::new(table);
        model.visit(&mut collector, VisitOrder::Declaration);
        if let Some(error) = collector.error {
            return Err(error);
        }
        let mut orders = OrderCollector {
            by_cell: collector.by_cell.clone(),
            path: Vec::new(),
            pre: vec![0],
            post: Vec::new(),
            stack: Vec::new(),
            error: None,
        };
        model.visit(&mut orders, VisitOrder::Forward);
        orders.post.push(0);
        if let Some(detail) = orders.error {
            return Err(Error::Config(ConfigError::VisitOrderMismatch { detail }));
        }
        if orders.pre.len() != collector.units.len() {
            let missing: Vec<&str> = (1..collector.units.len())
                .filter(|u| !orders.pre.contains(u))
                .map(|u| collector.units[u].display_name())
                .collect();
            let detail = format!("unit(s) {missing:?} are visited in declaration order but not in forward order");
            return Err(Error::Config(ConfigError::VisitOrderMismatch { detail }));
        }
        Ok(Self {
            table,
            params: collector.params,
            units: collector.units,
            ties: collector.ties,
            forward_order: orders.pre,
            post_forward_order: orders.post,
        })
    }

    /// The FQNs of unit `unit`'s tensors, in flat-parameter order.
    pub fn unit_fqns(&self, unit: usize) -> Vec<&str> {
        self.units[unit].params.iter().map(|&p| self.params[p].fqn.as_str()).collect()
    }

    /// The unit whose FQN (display name) is `name`.
    pub fn unit_named(&self, name: &str) -> Option<usize> {
        self.units.iter().position(|u| u.display_name() == name)
    }

    /// Concrete units in the order their pre-backward runs: the reverse of post-forward.
    pub fn backward_order(&self) -> impl Iterator<Item = usize> + '_ {
        self.post_forward_order.iter().rev().copied()
    }

    /// Checks that the model's tensors are exactly a `VarMap`'s variables, by name and by
    /// identity (the same tensor, not a copy). Lists every mismatched FQN.
    ///
    /// A tied parameter's second FQN may be absent from the `VarMap` (a model built through
    /// a `VarBuilder` registers the shared tensor once, like PyTorch's `named_parameters()`);
    /// where present, it must hold the same tensor.
    pub fn check_var_map(&self, var_map: &candle_nn::VarMap) -> Result<()> {
        let vars = var_map.data().lock().expect("VarMap lock poisoned");
        let mut mismatches = Vec::new();
        // FQN -> (tensor, whether the VarMap must hold the name).
        let mut model_names: HashMap<&str, (TensorId, bool)> = HashMap::new();
        for param in &self.params {
            model_names.insert(&param.fqn, (param.tensor.id(), true));
        }
        for tie in &self.ties {
            model_names.insert(&tie.fqn, (self.params[tie.param].tensor.id(), false));
        }
        for (fqn, (id, required)) in &model_names {
            match vars.get(*fqn) {
                None if !required => {}
                None => mismatches.push(format!("{fqn}: in the model, not in the VarMap")),
                Some(var) if var.as_tensor().id() != *id => {
                    mismatches.push(format!("{fqn}: the VarMap holds a different tensor under this name"))
                }
                Some(_) => {}
            }
        }
        for name in vars.keys() {
            if !model_names.contains_key(name.as_str()) {
                mismatches.push(format!("{name}: in the VarMap, not in the model"));
            }
        }
        if mismatches.is_empty() {
            Ok(())
        } else {
            mismatches.sort();
            Err(Error::Config(ConfigError::VarMapMismatch { mismatches }))
        }
    }
}

/// Builds the declaration-order lists.
struct Collector {
    table: StaticTable,
    template_index: HashMap<String, usize>,
    unit_template_index: HashMap<String, usize>,
    path: Vec<String>,
    template_path: Vec<&'static str>,
    unit_stack: Vec<usize>,
    buffer_depth: usize,
    /// How many `#[fsdp(checkpoint)]` fields enclose the current position.
    checkpoint_depth: usize,
    frozen_depth: usize,
    params: Vec<ParamInfo>,
    units: Vec<UnitInfo>,
    ties: Vec<Tie>,
    by_tensor: HashMap<TensorId, usize>,
    /// Each unit's index, by its cell.
    by_cell: HashMap<usize, usize>,
    error: Option<Error>,
}

impl Collector {
    fn new(table: StaticTable) -> Self {
        let template_index = table.params.iter().enumerate().map(|(i, p)| (p.fqn.to_string(), i)).collect();
        let unit_template_index = table.units.iter().enumerate().map(|(i, u)| (u.fqn.to_string(), i)).collect();
        Self {
            table,
            template_index,
            unit_template_index,
            path: Vec::new(),
            template_path: Vec::new(),
            unit_stack: vec![0],
            buffer_depth: 0,
            params: Vec::new(),
            units: vec![UnitInfo {
                fqn: String::new(),
                template: 0,
                parent: None,
                params: Vec::new(),
                checkpoint: false,
            }],
            checkpoint_depth: 0,
            frozen_depth: 0,
            ties: Vec::new(),
            by_tensor: HashMap::new(),
            by_cell: HashMap::new(),
            error: None,
        }
    }

    fn current_unit(&self) -> usize {
        *self.unit_stack.last().expect("the root unit is never left")
    }

    fn fail(&mut self, error: Error) {
        self.error.get_or_insert(error);
    }
}

impl Visitor for Collector {
    fn enter(&mut self, name: &'static str) {
        self.path.push(name.to_string());
        self.template_path.push(name);
    }

    fn enter_index(&mut self, index: usize) {
        self.path.push(index.to_string());
        self.template_path.push(INDEX);
    }

    fn leave(&mut self) {
        self.path.pop();
        self.template_path.pop();
    }

    fn enter_unit(&mut self, cell: &UnitCell) {
        let fqn = self.path.join(".");
        if self.by_cell.insert(cell_key(cell), self.units.len()).is_some() {
            self.fail(Error::Config(ConfigError::VisitOrderMismatch {
                detail: format!("the unit at `{fqn}` is visited twice in declaration order"),
            }));
        }
        let template_fqn = self.template_path.join(".");
        let template = match self.unit_template_index.get(&template_fqn) {
            Some(&t) => t,
            None => {
                self.fail(Error::Config(ConfigError::NotInTable { fqn: fqn.clone(), template: template_fqn }));
                0
            }
        };
        let parent = Some(self.current_unit());
        if self.units[self.current_unit()].fqn == fqn {
            self.fail(Error::Config(ConfigError::UnitInUnit { fqn: fqn.clone() }));
        }
        let checkpoint = self.checkpoint_depth > 0;
        self.units.push(UnitInfo { fqn, template, parent, params: Vec::new(), checkpoint });
        self.unit_stack.push(self.units.len() - 1);
    }

    fn leave_unit(&mut self) {
        self.unit_stack.pop();
    }

    fn enter_buffer(&mut self) {
        self.buffer_depth += 1;
    }

    fn leave_buffer(&mut self) {
        self.buffer_depth -= 1;
    }

    fn enter_checkpointed(&mut self) {
        self.checkpoint_depth += 1;
    }

    fn leave_checkpointed(&mut self) {
        self.checkpoint_depth -= 1;
    }

    fn enter_frozen(&mut self) {
        self.frozen_depth += 1;
    }

    fn leave_frozen(&mut self) {
        self.frozen_depth -= 1;
    }

    fn tensor(&mut self, tensor: &Tensor, role: Role) {
        let fqn = self.path.join(".");
        let unit = self.current_unit();
        if let Some(&first) = self.by_tensor.get(&tensor.id()) {
            let first_unit = self.params[first].unit;
            if first_unit != unit {
                let error = Error::Config(ConfigError::TieAcrossUnits {
                    first_fqn: self.params[first].fqn.clone(),
                    first_unit: self.units[first_unit].display_name().to_string(),
                    second_fqn: fqn,
                    second_unit: self.units[unit].display_name().to_string(),
                });
                self.fail(error);
            } else {
                self.ties.push(Tie { param: first, fqn });
            }
            return;
        }
        let template_fqn = self.template_path.join(".");
        let template = match self.template_index.get(&template_fqn) {
            Some(&t) => t,
            None => {
                self.fail(Error::Config(ConfigError::NotInTable { fqn: fqn.clone(), template: template_fqn }));
                return;
            }
        };
        let role = if self.buffer_depth > 0 { Role::Buffer } else { role };
        debug_assert_eq!(role, self.table.params[template].role, "visit and table disagree on {fqn}");
        self.by_tensor.insert(tensor.id(), self.params.len());
        self.units[unit].params.push(self.params.len());
        let frozen = self.frozen_depth > 0 && role == Role::Parameter;
        self.params.push(ParamInfo { fqn, template, unit, role, frozen, tensor: tensor.clone() });
    }
}

/// Identifies a unit instance by its cell, which only it holds: hand-written `Shardable`
/// impls may walk paths that do not match the derive's FQNs.
fn cell_key(cell: &UnitCell) -> usize {
    cell as *const UnitCell as usize
}

/// Records the concrete unit orders of a forward-order walk, refusing a walk that meets
/// units the declaration-order walk did not, or meets one twice.
struct OrderCollector {
    by_cell: HashMap<usize, usize>,
    path: Vec<String>,
    pre: Vec<usize>,
    post: Vec<usize>,
    /// The units entered and not yet left (`None`: one the declaration walk never met).
    stack: Vec<Option<usize>>,
    error: Option<String>,
}

impl Visitor for OrderCollector {
    fn enter(&mut self, name: &'static str) {
        self.path.push(name.to_string());
    }

    fn enter_index(&mut self, index: usize) {
        self.path.push(index.to_string());
    }

    fn leave(&mut self) {
        self.path.pop();
    }

    fn enter_unit(&mut self, cell: &UnitCell) {
        let unit = self.by_cell.get(&cell_key(cell)).copied();
        let problem = match unit {
            None => Some(format!("the unit at `{}` is visited in forward order only", self.path.join("."))),
            Some(unit) if self.pre.contains(&unit) => {
                Some(format!("the unit at `{}` is visited twice in forward order", self.path.join(".")))
            }
            Some(unit) => {
                self.pre.push(unit);
                None
            }
        };
        if let Some(problem) = problem {
            self.error.get_or_insert(problem);
        }
        self.stack.push(unit);
    }

    fn leave_unit(&mut self) {
        if let Some(Some(unit)) = self.stack.pop() {
            self.post.push(unit);
        }
    }

    fn tensor(&mut self, _tensor: &Tensor, _role: Role) {}
}
