//! Where a stage's parameter gradients accumulate (candle has no `.grad` field).

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};
use std::collections::HashMap;

/// `Var → summed gradient`, the stand-in for PyTorch's `param.grad`: every
/// [`stage_backward`](super::stage_backward) and
/// [`stage_backward_weight`](super::stage_backward_weight) adds to it, nothing resets it but
/// [`clear`](Self::clear) (PyTorch's `zero_grad(set_to_none=True)`). Variables are kept in
/// the order they first received a gradient.
#[derive(Default, Clone)]
pub struct GradAccumulator {
    index: HashMap<TensorId, usize>,
    entries: Vec<(Var, Tensor)>,
}

impl std::fmt::Debug for GradAccumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.entries.iter().map(|(var, grad)| (var.id(), grad.shape().clone()))).finish()
    }
}

impl GradAccumulator {
    /// An accumulator holding no gradient.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `grad` to `var`'s gradient (sets it if `var` has none yet).
    pub fn add(&mut self, var: &Var, grad: &Tensor) -> Result<()> {
        if grad.shape() != var.shape() {
            candle_core::bail!("gradient {:?} for a variable of shape {:?}", grad.shape(), var.shape());
        }
        match self.index.get(&var.id()) {
            Some(&i) => {
                let summed = (&self.entries[i].1 + grad)?;
                self.entries[i].1 = summed;
            }
            None => {
                self.index.insert(var.id(), self.entries.len());
                self.entries.push((var.clone(), grad.detach()));
            }
        }
        Ok(())
    }

    /// `var`'s accumulated gradient, `None` when it received none.
    pub fn get(&self, var: &Var) -> Option<&Tensor> {
        self.get_id(var.id())
    }

    /// The accumulated gradient of the variable whose tensor id is `id`, `None` when it
    /// received none.
    pub fn get_id(&self, id: TensorId) -> Option<&Tensor> {
        self.index.get(&id).map(|&i| &self.entries[i].1)
    }

    /// The variables with a gradient and their gradients.
    pub fn iter(&self) -> impl Iterator<Item = (&Var, &Tensor)> {
        self.entries.iter().map(|(var, grad)| (var, grad))
    }

    /// How many variables have a gradient.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no variable has a gradient.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forgets every gradient.
    pub fn clear(&mut self) {
        self.index.clear();
        self.entries.clear();
    }

    /// The gradients as a candle `GradStore`, for an optimizer's `step(&grads)`.
    pub fn to_grad_store(&self) -> GradStore {
        let mut store = GradStore::default();
        for (var, grad) in &self.entries {
            store.insert(var.as_tensor(), grad.clone());
        }
        store
    }
}
