//! Parsing and validation of a `#[derive(Shardable)]` input, kept apart from code
//! generation: `ast` reads the struct, `attr` its `#[fsdp(...)]` attributes, `check` the
//! rules that span several fields, and `ctxt` gathers every error with its span.

pub mod ast;
pub mod attr;
pub mod check;
pub mod ctxt;
pub mod symbol;

pub use ctxt::Ctxt;
