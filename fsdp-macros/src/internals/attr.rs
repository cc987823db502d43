//! `#[fsdp(...)]` attributes of the container and of its fields.
//!
//! Container: `rename = "prefix"` (a prefix for every field's name), `buffer` (every
//! tensor is a buffer), `forward_order(a, b, ...)`, `crate = "path"`.
//! Field: `rename = "name"` (may hold several dot-separated segments), `skip`, `buffer`,
//! `frozen` (every parameter below is not trained),
//! `checkpoint` (the units below it that hold no other unit checkpoint their activations).
//! `#[derive(Activations)]` container: `crate = "path"` only.

use super::symbol::{Symbol, BUFFER, CHECKPOINT, CRATE, FORWARD_ORDER, FROZEN, FSDP, RENAME, SKIP};
use super::Ctxt;
use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::meta::ParseNestedMeta;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{LitStr, Member, Token};

/// An attribute value that may be given at most once.
struct Once<T> {
    name: Symbol,
    value: Option<T>,
}

impl<T> Once<T> {
    fn new(name: Symbol) -> Self {
        Once { name, value: None }
    }

    fn set(&mut self, cx: &Ctxt, meta: &ParseNestedMeta, value: T) {
        if self.value.is_some() {
            cx.error_spanned_by(&meta.path, format!("duplicate fsdp attribute `{}`", self.name));
        } else {
            self.value = Some(value);
        }
    }
}

/// A validated `rename` value and where it was written.
pub struct Name {
    pub value: String,
    pub span: Span,
}

pub struct Container {
    pub rename: Option<Name>,
    pub buffer: bool,
    /// The listed fields and the span of the `forward_order` key.
    pub forward_order: Option<(Vec<Member>, Span)>,
    pub crate_path: Option<syn::Path>,
}

pub struct Field {
    pub rename: Option<Name>,
    pub skip: bool,
    pub buffer: bool,
    /// Where `checkpoint` was written, when it was.
    pub checkpoint: Option<Span>,
    /// `frozen`: every parameter below is frozen (not trained).
    pub frozen: Option<Span>,
}

impl Container {
    pub fn from_ast(cx: &Ctxt, input: &syn::DeriveInput) -> Self {
        let mut rename = Once::new(RENAME);
        let mut buffer = Once::new(BUFFER);
        let mut forward_order = Once::new(FORWARD_ORDER);
        let mut crate_path = Once::new(CRATE);
        for_each_fsdp_meta(cx, &input.attrs, |meta| {
            if meta.path == RENAME {
                if let Some(name) = parse_name(cx, &meta)? {
                    rename.set(cx, &meta, name);
                }
            } else if meta.path == BUFFER {
                buffer.set(cx, &meta, ());
            } else if meta.path == FORWARD_ORDER {
                let content;
                syn::parenthesized!(content in meta.input);
                let members = Punctuated::<Member, Token![,]>::parse_terminated(&content)?;
                forward_order.set(cx, &meta, (members.into_iter().collect(), meta.path.span()));
            } else if meta.path == CRATE {
                if let Some(path) = parse_crate_path(cx, &meta)? {
                    crate_path.set(cx, &meta, path);
                }
            } else if meta.path == SKIP {
                cx.error_spanned_by(&meta.path, "`skip` is a field attribute; a struct cannot be skipped");
            } else {
                unknown(cx, &meta, &[RENAME, BUFFER, FORWARD_ORDER, CRATE]);
            }
            Ok(())
        });
        Container {
            rename: rename.value,
            buffer: buffer.value.is_some(),
            forward_order: forward_order.value,
            crate_path: crate_path.value,
        }
    }
}

/// Where the generated code finds the runtime: `crate = "..."`, or `::candle_fsdp`.
fn crate_tokens(path: &Option<syn::Path>) -> TokenStream {
    match path {
        Some(path) => quote!(#path),
        None => quote!(::candle_fsdp),
    }
}

impl Container {
    pub fn crate_path(&self) -> TokenStream {
        crate_tokens(&self.crate_path)
    }
}

/// The attributes of `#[derive(Activations)]`: only `crate = "path"`.
pub struct Activations {
    crate_path: Option<syn::Path>,
}

impl Activations {
    pub fn from_ast(cx: &Ctxt, input: &syn::DeriveInput) -> Self {
        let mut crate_path = Once::new(CRATE);
        for_each_fsdp_meta(cx, &input.attrs, |meta| {
            if meta.path == CRATE {
                if let Some(path) = parse_crate_path(cx, &meta)? {
                    crate_path.set(cx, &meta, path);
                }
            } else {
                unknown(cx, &meta, &[CRATE]);
            }
            Ok(())
        });
        Activations { crate_path: crate_path.value }
    }

    pub fn crate_path(&self) -> TokenStream {
        crate_tokens(&self.crate_path)
    }
}

impl Field {
    pub fn from_ast(cx: &Ctxt, field: &syn::Field) -> Self {
        let mut rename = Once::new(RENAME);
        let mut skip = Once::new(SKIP);
        let mut buffer = Once::new(BUFFER);
        let mut checkpoint = Once::new(CHECKPOINT);
        let mut frozen = Once::new(FROZEN);
        for_each_fsdp_meta(cx, &field.attrs, |meta| {
            if meta.path == RENAME {
                if let Some(name) = parse_name(cx, &meta)? {
                    rename.set(cx, &meta, name);
                }
            } else if meta.path == SKIP {
                skip.set(cx, &meta, ());
            } else if meta.path == BUFFER {
                buffer.set(cx, &meta, ());
            } else if meta.path == CHECKPOINT {
                checkpoint.set(cx, &meta, meta.path.span());
            } else if meta.path == FROZEN {
                frozen.set(cx, &meta, meta.path.span());
            } else if meta.path == FORWARD_ORDER || meta.path == CRATE {
                let name = meta.path.get_ident().map(|i| i.to_string()).unwrap_or_default();
                cx.error_spanned_by(&meta.path, format!("`{name}` is a container attribute; put it on the struct"));
                // Consume the value so one misplaced attribute gives one error.
                if meta.input.peek(Token![=]) {
                    meta.value()?.parse::<syn::Expr>()?;
                } else if meta.input.peek(syn::token::Paren) {
                    let _content;
                    syn::parenthesized!(_content in meta.input);
                    let _: proc_macro2::TokenStream = _content.parse()?;
                }
            } else {
                unknown(cx, &meta, &[RENAME, SKIP, BUFFER, CHECKPOINT, FROZEN]);
            }
            Ok(())
        });
        Field {
            rename: rename.value,
            skip: skip.value.is_some(),
            buffer: buffer.value.is_some(),
            checkpoint: checkpoint.value,
            frozen: frozen.value,
        }
    }
}

fn for_each_fsdp_meta(cx: &Ctxt, attrs: &[syn::Attribute], mut f: impl FnMut(ParseNestedMeta) -> syn::Result<()>) {
    for attr in attrs.iter().filter(|a| a.path() == FSDP) {
        if let syn::Meta::List(list) = &attr.meta {
            if list.tokens.is_empty() {
                continue;
            }
        }
        if let Err(err) = attr.parse_nested_meta(&mut f) {
            cx.syn_error(err);
        }
    }
}

fn unknown(cx: &Ctxt, meta: &ParseNestedMeta, expected: &[Symbol]) {
    let name = meta.path.get_ident().map(|i| i.to_string()).unwrap_or_else(|| "?".into());
    let expected: Vec<_> = expected.iter().map(|s| format!("`{}`", s.name())).collect();
    let expected = match expected.as_slice() {
        [only] => only.clone(),
        several => format!("one of {}", several.join(", ")),
    };
    cx.error_spanned_by(&meta.path, format!("unknown fsdp attribute `{name}`; expected {expected}"));
    // Skip the value so the parse continues with the next key.
    if meta.input.peek(Token![=]) {
        let _ = meta.value().and_then(|v| v.parse::<syn::Expr>());
    } else if meta.input.peek(syn::token::Paren) {
        let _ = (|| -> syn::Result<()> {
            let content;
            syn::parenthesized!(content in meta.input);
            content.parse::<proc_macro2::TokenStream>()?;
            Ok(())
        })();
    }
}

/// Parses `= "path"`; `None` (with the error in `cx`) when it is not a path.
fn parse_crate_path(cx: &Ctxt, meta: &ParseNestedMeta) -> syn::Result<Option<syn::Path>> {
    let literal: LitStr = meta.value()?.parse()?;
    match literal.parse::<syn::Path>() {
        Ok(path) => Ok(Some(path)),
        Err(_) => {
            cx.error_spanned_by(&literal, "`crate` must be a path, e.g. \"::candle_fsdp\"");
            Ok(None)
        }
    }
}

/// Parses `= "a.b"` and validates it as an FQN fragment: dot-separated segments of ASCII
/// letters, digits and `_`, none empty.
fn parse_name(cx: &Ctxt, meta: &ParseNestedMeta) -> syn::Result<Option<Name>> {
    let literal: LitStr = meta.value()?.parse()?;
    let value = literal.value();
    if value.is_empty() {
        cx.error_spanned_by(&literal, "`rename` cannot be empty");
        return Ok(None);
    }
    if value.split('.').any(str::is_empty) {
        cx.error_spanned_by(
            &literal,
            format!("`rename = \"{value}\"` has an empty segment; segments are separated by single dots"),
        );
        return Ok(None);
    }
    if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '.')) {
        cx.error_spanned_by(
            &literal,
            format!(
                "`rename = \"{value}\"` contains `{bad}`; names may hold ASCII letters, digits, `_` and `.` between segments"
            ),
        );
        return Ok(None);
    }
    Ok(Some(Name { value, span: literal.span() }))
}
