//! The attribute names the derive understands, in one place.

use std::fmt;
use syn::{Ident, Path};

#[derive(Copy, Clone)]
pub struct Symbol(&'static str);

/// The attribute itself: `#[fsdp(...)]`.
pub const FSDP: Symbol = Symbol("fsdp");
pub const RENAME: Symbol = Symbol("rename");
pub const SKIP: Symbol = Symbol("skip");
pub const BUFFER: Symbol = Symbol("buffer");
pub const CHECKPOINT: Symbol = Symbol("checkpoint");
pub const FROZEN: Symbol = Symbol("frozen");
pub const FORWARD_ORDER: Symbol = Symbol("forward_order");
pub const CRATE: Symbol = Symbol("crate");

impl Symbol {
    pub fn name(self) -> &'static str {
        self.0
    }
}

impl PartialEq<Symbol> for Ident {
    fn eq(&self, word: &Symbol) -> bool {
        self == word.0
    }
}

impl PartialEq<Symbol> for &Path {
    fn eq(&self, word: &Symbol) -> bool {
        self.is_ident(word.0)
    }
}

impl PartialEq<Symbol> for Path {
    fn eq(&self, word: &Symbol) -> bool {
        self.is_ident(word.0)
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str(self.0)
    }
}
