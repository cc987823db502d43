//! Scoped access to the full parameters (PyTorch's `summon_full_params`): every unit
//! gathered at once, or one unit at a time to bound memory; on every rank or on rank 0
//! only; read only, or with edits written back into the shards.

use super::Fsdp;
use crate::error::{Error, Result};
use candle_core::Tensor;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

/// How [`Fsdp::summon_full_params_with`] and [`Fsdp::summon_units`] run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SummonOptions {
    /// Copy the full values, as the closure leaves them (edited in place, e.g. with
    /// `Tensor::slice_set`), back into each rank's shards. Every rank must make the same
    /// edit; the next step trains from the edited values.
    pub writeback: bool,
    /// Run the closure on rank 0 only (the others take part in the gathers and get
    /// `None`). Cannot be combined with `writeback`: the other ranks would not see the edit.
    pub rank0_only: bool,
}

impl<M> Fsdp<M> {
    /// Runs `f` with every unit's full parameters gathered: `f` may read the model's
    /// layers and run them. A collective: every rank calls it. Refused between a forward
    /// and its backward. What `f` computes is for reading only: no gradient of it reaches
    /// the shards, and changes to the full values are not written back (see
    /// [`Fsdp::summon_full_params_with`]). The units are freed again afterwards, also
    /// when `f` panics: a parameter tensor `f` returns or keeps is released with them
    /// (see [`Fsdp`]'s docs; copy what should outlive the call).
    pub fn summon_full_params<R>(&self, f: impl FnOnce(&M) -> R) -> Result<R> {
        let ran = self.summon_full_params_with(SummonOptions::default(), f)?;
        Ok(ran.expect("without rank0_only every rank runs the closure"))
    }

    /// [`Fsdp::summon_full_params`] with [`SummonOptions`]: `None` on the ranks that do
    /// not run `f` (with `rank0_only`).
    pub fn summon_full_params_with<R>(&self, options: SummonOptions, f: impl FnOnce(&M) -> R) -> Result<Option<R>> {
        self.check_summon_options(options)?;
        self.summoned(0..self.groups().len(), options, || f(&self.model))
    }

    /// Gathers one unit at a time, root first, and runs `f(unit name, its parameters as
    /// (FQN, full value))` on it, so that at most one unit's full parameters are in memory
    /// beside the shards. A collective, refused between a forward and its backward, as
    /// [`Fsdp::summon_full_params`]; `writeback` copies edits to the values `f` was given
    /// back into the shards. Returns `f`'s results in unit order (empty on ranks that do
    /// not run it). The tensors `f` is given are the unit's gathered parameters, released
    /// when `f` returns, as in [`Fsdp::summon_full_params`].
    pub fn summon_units<R>(
        &self,
        options: SummonOptions,
        mut f: impl FnMut(&str, &[(String, Tensor)]) -> R,
    ) -> Result<Vec<R>> {
        self.check_summon_options(options)?;
        let mut results = Vec::new();
        for (index, group) in self.groups().iter().enumerate() {
            let params: Vec<(String, Tensor)> =
                group.params.iter().map(|p| (p.fqn.clone(), p.gathered.clone())).collect();
            let ran = self.summoned(index..index + 1, options, || f(&group.name, &params))?;
            results.extend(ran);
        }
        Ok(results)
    }

    fn check_summon_options(&self, options: SummonOptions) -> Result<()> {
        if options.writeback && options.rank0_only {
            return Err(Error::Rank {
                rank: self.rank(),
                message: "summon_full_params: rank0_only cannot write back (the other ranks would keep the old values)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Gathers `units`, runs `f` (on this rank, unless `rank0_only` says otherwise),
    /// writes back if asked, and frees the units again, also when `f` panics.
    fn summoned<R>(
        &self,
        units: std::ops::Range<usize>,
        options: SummonOptions,
        f: impl FnOnce() -> R,
    ) -> Result<Option<R>> {
        self.state.summon(units.clone())?;
        let runs_here = !options.rank0_only || self.rank() == 0;
        let result = catch_unwind(AssertUnwindSafe(|| runs_here.then(f)));
        let written = match (&result, options.writeback) {
            (Ok(_), true) => self.groups()[units].iter().try_for_each(|g| g.write_back_gathered()),
            _ => Ok(()),
        };
        let released = self.state.end_summon();
        match result {
            Err(panic) => resume_unwind(panic),
            Ok(result) => {
                written?;
                released?;
                Ok(result)
            }
        }
    }
}
