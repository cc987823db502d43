//! The derive input read into the shape the rest of the macro works with.

use super::attr;
use super::Ctxt;
use syn::spanned::Spanned;
use syn::{Member, Type};

pub struct Container<'a> {
    pub ident: &'a syn::Ident,
    pub attrs: attr::Container,
    pub style: Style,
    pub fields: Vec<Field<'a>>,
    pub original: &'a syn::DeriveInput,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Named,
    Tuple,
    Unit,
}

pub struct Field<'a> {
    pub member: Member,
    pub attrs: attr::Field,
    pub ty: &'a Type,
}

impl Field<'_> {
    /// The Rust name: the identifier, or the position for tuple structs.
    pub fn ident_string(&self) -> String {
        match &self.member {
            Member::Named(ident) => ident.to_string(),
            Member::Unnamed(index) => index.index.to_string(),
        }
    }

    /// Primitive fields (numbers, `bool`, `char`) hold no tensors and need no attribute.
    pub fn is_primitive(&self) -> bool {
        const PRIMITIVES: &[&str] = &[
            "bool", "char", "f32", "f64", "i8", "i16", "i32", "i64", "i128", "isize", "u8", "u16", "u32", "u64",
            "u128", "usize",
        ];
        match self.ty {
            Type::Path(path) if path.qself.is_none() => {
                path.path.get_ident().is_some_and(|ident| PRIMITIVES.iter().any(|p| ident == p))
            }
            _ => false,
        }
    }

    /// Whether the field holds tensors: neither skipped nor primitive.
    pub fn holds_tensors(&self) -> bool {
        !self.attrs.skip && !self.is_primitive()
    }
}

impl<'a> Container<'a> {
    /// Reads the input with its parsed container attributes; `None` when it is not a
    /// struct (the error is in `cx`).
    pub fn from_ast(cx: &Ctxt, input: &'a syn::DeriveInput, attrs: attr::Container) -> Option<Container<'a>> {
        let (style, fields) = match &input.data {
            syn::Data::Struct(data) => match &data.fields {
                syn::Fields::Named(fields) => (Style::Named, fields_from_ast(cx, &fields.named)),
                syn::Fields::Unnamed(fields) => (Style::Tuple, fields_from_ast(cx, &fields.unnamed)),
                syn::Fields::Unit => (Style::Unit, Vec::new()),
            },
            syn::Data::Enum(data) => {
                cx.error_spanned_by(
                    data.enum_token,
                    "`Shardable` cannot be derived for an enum: its parameters would depend on the variant at run time, and the FQN table is fixed at compile time",
                );
                return None;
            }
            syn::Data::Union(data) => {
                cx.error_spanned_by(
                    data.union_token,
                    "`Shardable` cannot be derived for a union: the runtime must know which fields hold tensors",
                );
                return None;
            }
        };
        Some(Container { ident: &input.ident, attrs, style, fields, original: input })
    }
}

fn fields_from_ast<'a>(
    cx: &Ctxt,
    fields: &'a syn::punctuated::Punctuated<syn::Field, syn::Token![,]>,
) -> Vec<Field<'a>> {
    fields
        .iter()
        .enumerate()
        .map(|(index, field)| Field {
            member: match &field.ident {
                Some(ident) => Member::Named(ident.clone()),
                // Spanned at the field's type: a tuple field has no name to point errors at.
                None => Member::Unnamed(syn::Index { index: index as u32, span: field.ty.span() }),
            },
            attrs: attr::Field::from_ast(cx, field),
            ty: &field.ty,
        })
        .collect()
}
