//! `#[derive(Shardable)]` for candle-fsdp.
//!
//! The derive reads a model struct and emits, as constants, its schema (fields, names after
//! `rename`, buffers, units, forward order) and the flattened FQN table built from it. It
//! parses and validates first (`internals`), collecting every spanned error, and only then
//! generates code (`expand`); on errors it still emits a stand-in impl so a mistake is
//! reported once, at its own tokens.

mod activations;
mod expand;
mod internals;

use proc_macro::TokenStream;
use syn::{parse_macro_input, DeriveInput};

/// Derives `candle_fsdp::Shardable` and `candle_fsdp::ShardableModel`.
///
/// Attributes, all under `#[fsdp(...)]`:
/// - on the struct: `rename = "prefix"`, `buffer`, `forward_order(field, ...)`,
///   `crate = "path"`;
/// - on a field: `rename = "name"` (dot-separated segments allowed), `skip`, `buffer`.
#[proc_macro_derive(Shardable, attributes(fsdp))]
pub fn derive_shardable(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand::derive_shardable(&input) {
        Ok(tokens) => tokens.into(),
        Err(errors) => {
            let fallback = expand::fallback(&input);
            let errors = errors.to_compile_error();
            quote::quote!(#errors #fallback).into()
        }
    }
}

/// Derives `candle_fsdp::Activations` for a struct passed into or out of a unit: every
/// field's tensors, in declaration order. Every field's type must implement
/// `Activations` (tensors, containers of them, and plain values such as numbers do).
#[proc_macro_derive(Activations)]
pub fn derive_activations(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    activations::derive_activations(&input).unwrap_or_else(syn::Error::into_compile_error).into()
}
