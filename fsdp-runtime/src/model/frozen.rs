//! Which parameters are frozen: the [`crate::FsdpConfig::frozen`] patterns matched
//! against a [`Layout`]'s FQNs.

use super::layout::Layout;
use super::schema::Role;
use crate::error::{ConfigError, Error, Result};
use crate::fqn_patterns::select;

impl Layout {
    /// For each of [`Layout::params`], whether it is frozen: declared so on the model
    /// (`#[fsdp(frozen)]`), then as `patterns` say (see [`crate::FsdpConfig::frozen`]; a
    /// `!` pattern can keep a declared one trained). A pattern matches a trained parameter
    /// by its FQN or by the FQN of a tie to it (a tied parameter is one tensor, frozen at
    /// every FQN); buffers are never trained and are not matched. A pattern that matches
    /// no trained parameter is refused, naming it.
    pub fn frozen_params(&self, patterns: &[String]) -> Result<Vec<bool>> {
        let candidates: Vec<Vec<&str>> = (0..self.params.len())
            .map(|index| {
                if self.params[index].role != Role::Parameter {
                    return Vec::new();
                }
                let tied = self.ties.iter().filter(|t| t.param == index).map(|t| t.fqn.as_str());
                std::iter::once(self.params[index].fqn.as_str()).chain(tied).collect()
            })
            .collect();
        let declared = self.params.iter().map(|p| p.frozen).collect();
        select(patterns, &candidates, declared).map_err(|pattern| {
            Error::Config(ConfigError::PatternMatchesNothing { pattern, selecting: "frozen parameters" })
        })
    }
}
