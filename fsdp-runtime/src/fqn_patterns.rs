//! FQN patterns that select tensors: `*` stands for any run of characters, dots included,
//! `?` for one; a pattern starting with `!` deselects what it matches, and the last
//! pattern that matches a tensor decides. Used for frozen parameters and for the tensors
//! an export writes.

use wildmatch::WildMatch;

/// For each candidate (the names a tensor goes by), whether `patterns` select it, starting
/// from `selected` (what is selected before the first pattern). `Err` names the first
/// pattern that matches no candidate: a pattern that selects nothing is a mistake, never
/// ignored.
pub(crate) fn select(
    patterns: &[String],
    candidates: &[Vec<&str>],
    mut selected: Vec<bool>,
) -> Result<Vec<bool>, String> {
    for pattern in patterns {
        let (selects, glob) = match pattern.strip_prefix('!') {
            Some(kept) => (false, kept),
            None => (true, pattern.as_str()),
        };
        let matcher = WildMatch::new(glob);
        let mut matched = false;
        for (names, selected) in candidates.iter().zip(selected.iter_mut()) {
            if names.iter().any(|name| matcher.matches(name)) {
                *selected = selects;
                matched = true;
            }
        }
        if !matched {
            return Err(pattern.clone());
        }
    }
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_last_matching_pattern_decides_and_an_unmatched_one_is_named() {
        let names = [vec!["a.weight"], vec!["a.lora_A.weight"], vec!["b.bias", "tied.bias"]];
        let none = || vec![false; 3];
        assert_eq!(select(&patterns(&["*"]), &names, none()), Ok(vec![true, true, true]));
        assert_eq!(select(&patterns(&["*", "!*.lora_?.weight"]), &names, none()), Ok(vec![true, false, true]));
        assert_eq!(select(&patterns(&["*.lora_A.*", "!*"]), &names, none()), Ok(vec![false, false, false]));
        // Any of a tensor's names matches (a tie's second FQN).
        assert_eq!(select(&patterns(&["tied.*"]), &names, none()), Ok(vec![false, false, true]));
        assert_eq!(select(&patterns(&["a.*", "c.*"]), &names, none()), Err("c.*".to_string()));
        assert_eq!(select(&[], &names, none()), Ok(vec![false, false, false]));
        // Patterns apply on top of what was selected before them.
        assert_eq!(select(&patterns(&["!a.weight"]), &names, vec![true, false, true]), Ok(vec![false, false, true]));
    }
}
