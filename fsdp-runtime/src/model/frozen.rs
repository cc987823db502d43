//! Which parameters are frozen: the [`crate::FsdpConfig::frozen`] patterns matched
//! against a [`Layout`]'s FQNs.

use super::layout::Layout;
use super::schema::Role;
use crate::error::{ConfigError, Error, Result};
use wildmatch::WildMatch;

impl Layout {
    /// For each of [`Layout::params`], whether `patterns` freeze it. A pattern matches a
    /// trained parameter by its FQN or by the FQN of a tie to it (a tied parameter is one
    /// tensor, frozen at every FQN); buffers are never trained and are not matched. A
    /// pattern that starts with `!` keeps what it matches trained; the last pattern that
    /// matches a parameter decides, so `["*", "!*.lora_A.weight"]` freezes all but the
    /// `lora_A` weights. A pattern that matches no trained parameter is refused, naming it.
    pub fn frozen_params(&self, patterns: &[String]) -> Result<Vec<bool>> {
        let mut frozen = vec![false; self.params.len()];
        for pattern in patterns {
            let (freezes, glob) = match pattern.strip_prefix('!') {
                Some(kept) => (false, kept),
                None => (true, pattern.as_str()),
            };
            let matcher = WildMatch::new(glob);
            let mut matched = false;
            for (index, param) in self.params.iter().enumerate() {
                let tied = self.ties.iter().filter(|t| t.param == index).map(|t| t.fqn.as_str());
                let mut fqns = std::iter::once(param.fqn.as_str()).chain(tied);
                if param.role == Role::Parameter && fqns.any(|f| matcher.matches(f)) {
                    frozen[index] = freezes;
                    matched = true;
                }
            }
            if !matched {
                return Err(Error::Config(ConfigError::FrozenPatternMatchesNothing { pattern: pattern.clone() }));
            }
        }
        Ok(frozen)
    }
}
