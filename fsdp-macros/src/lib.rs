//! The derives of candle-fsdp: `#[derive(Shardable)]` and `#[derive(Activations)]`.
//!
//! `Shardable` reads a model struct and emits, as constants, its schema (fields, names after
//! `rename`, buffers, units, forward order) and the flattened FQN table built from it. Both
//! derives parse and validate first (`internals`), collecting every spanned error, and only
//! then generate code; on errors they still emit stand-in impls (`fallback`) so a mistake
//! is reported once, at its own tokens. Generated code names the runtime only through its
//! `__private` module, so the runtime's module tree can change freely.

mod activations;
mod fallback;
mod internals;
mod model_table;
mod shardable;

use proc_macro::TokenStream;
use syn::{parse_macro_input, DeriveInput};

/// Derives `candle_fsdp::Shardable` and `candle_fsdp::ShardableModel`.
///
/// Attributes, all under `#[fsdp(...)]`:
/// - on the struct: `rename = "prefix"`, `buffer`, `forward_order(field, ...)`,
///   `crate = "path"`;
/// - on a field: `rename = "name"` (dot-separated segments allowed), `skip`, `buffer`,
///   `checkpoint` (the units below it that hold no other unit checkpoint their activations),
///   `frozen` (the parameters below it are not trained).
#[proc_macro_derive(Shardable, attributes(fsdp))]
pub fn derive_shardable(input: TokenStream) -> TokenStream {
    shardable::derive(&parse_macro_input!(input as DeriveInput)).into()
}

/// Derives `candle_fsdp::Activations` for a struct passed into or out of a unit: every
/// field's tensors, in declaration order. Every field's type must implement
/// `Activations` (tensors, containers of them, and plain values such as numbers do).
///
/// Attribute: `#[fsdp(crate = "path")]` on the struct.
#[proc_macro_derive(Activations, attributes(fsdp))]
pub fn derive_activations(input: TokenStream) -> TokenStream {
    activations::derive(&parse_macro_input!(input as DeriveInput)).into()
}
