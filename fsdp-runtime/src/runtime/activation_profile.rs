//! What each unit's training forward keeps for the backward: the bytes of the tensors its
//! forward added to the autograd graph (candle keeps every node of the graph until the
//! graph is dropped), measured during a real step when profiling is on
//! ([`crate::Diagnostics::set_activation_profiling`]).
//!
//! A unit's share is the graph reachable from its outputs (hooked, as the step keeps
//! them) less the graph reachable from its inputs, less what the units inside it own, less
//! the gathered parameters (which FSDP accounts for separately); each storage counts once
//! however many views share it. The root's share is what no unit owns.

use super::meta_model::storage_address;
use candle_core::Tensor;
use std::collections::{HashMap, HashSet};

/// One unit's activations, as measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitActivations {
    /// The unit's name.
    pub unit: String,
    /// Bytes of the tensors its forward kept for the backward.
    pub bytes: usize,
}

/// What one profiled training forward kept, unit by unit (root first, then in the order
/// the units' forwards ended).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActivationProfile {
    /// Per unit.
    pub units: Vec<UnitActivations>,
}

impl ActivationProfile {
    /// The bytes every unit kept, together: what the forward leaves for the backward.
    pub fn total(&self) -> usize {
        self.units.iter().map(|u| u.bytes).sum()
    }
}

/// The bookkeeping of a profiled forward.
#[derive(Default)]
pub(crate) struct Profiler {
    /// Each running unit's inputs, innermost last.
    inputs: Vec<(usize, Vec<Tensor>)>,
    /// The storages each unit owns, by unit, in the order their forwards ended.
    owned: Vec<(usize, HashSet<usize>, usize)>,
}

/// `storage address -> bytes` of the graph reachable from `tensors`, the storages in
/// `parameters` (the gathered parameters, and every view of them) left out.
fn reachable(tensors: &[Tensor], parameters: &HashSet<usize>) -> HashMap<usize, usize> {
    let mut storages = HashMap::new();
    for tensor in tensors {
        for node in tensor.sorted_nodes() {
            if node.is_variable() || parameters.contains(&storage_address(node)) {
                continue;
            }
            // A broadcast view repeats its elements (stride 0): count those it holds.
            let layout = node.layout();
            let held: usize =
                layout.dims().iter().zip(layout.stride()).filter(|(_, &s)| s != 0).map(|(&d, _)| d).product();
            let bytes = held * node.dtype().size_in_bytes();
            let entry = storages.entry(storage_address(node)).or_insert(0);
            *entry = (*entry).max(bytes);
        }
    }
    storages
}

impl Profiler {
    /// A unit's forward starts with `inputs` (as it receives them).
    pub fn started(&mut self, unit: usize, inputs: &[Tensor]) {
        self.inputs.push((unit, inputs.to_vec()));
    }

    /// A non-root unit's forward ended with `outputs`: records what it owns.
    pub fn ended(&mut self, unit: usize, outputs: &[Tensor], parameters: &HashSet<usize>) {
        let position = self.inputs.iter().rposition(|(u, _)| *u == unit);
        let inputs = position.map(|p| self.inputs.remove(p).1).unwrap_or_default();
        let before = reachable(&inputs, parameters);
        // Units that ended before this one are inside it or before it: theirs stays theirs.
        let owned = |storage: &usize| self.owned.iter().any(|(_, storages, _)| storages.contains(storage));
        let mine: HashMap<usize, usize> = reachable(outputs, parameters)
            .into_iter()
            .filter(|(storage, _)| !before.contains_key(storage) && !owned(storage))
            .collect();
        let bytes = mine.values().sum();
        self.owned.push((unit, mine.into_keys().collect(), bytes));
    }

    /// The forward of the root (unit `root`) ended with `outputs`: the root owns what no
    /// unit does. Returns the profile, by unit index.
    pub fn finish(self, root: usize, outputs: &[Tensor], parameters: &HashSet<usize>) -> Vec<(usize, usize)> {
        let units: HashSet<usize> = self.owned.iter().flat_map(|(_, storages, _)| storages.iter().copied()).collect();
        let root_bytes: usize =
            reachable(outputs, parameters).into_iter().filter(|(s, _)| !units.contains(s)).map(|(_, b)| b).sum();
        std::iter::once((root, root_bytes))
            .chain(self.owned.into_iter().map(|(unit, _, bytes)| (unit, bytes)))
            .collect()
    }
}
