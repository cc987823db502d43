//! Rules that need the whole struct: generics, unit fields that are skipped, names that
//! collide after `rename`, and `forward_order` against the fields.

use super::ast::{Container, Field};
use super::Ctxt;
use std::collections::HashMap;
use syn::{GenericArgument, Member, PathArguments, Type};

pub fn check(cx: &Ctxt, cont: &Container) {
    check_generics(cx, cont);
    for field in &cont.fields {
        check_field(cx, field);
    }
    check_names(cx, cont);
    check_forward_order(cx, cont);
}

fn check_generics(cx: &Ctxt, cont: &Container) {
    let generics = &cont.original.generics;
    if !generics.params.is_empty() {
        cx.error_spanned_by(
            generics,
            "`Shardable` cannot be derived for a generic struct: its FQN table and unit grouping are compile-time constants of one concrete type",
        );
    }
}

fn check_field(cx: &Ctxt, field: &Field) {
    let attrs = &field.attrs;
    if attrs.skip {
        if contains_unit(field.ty) {
            cx.error_spanned_by(
                field.ty,
                "a `Unit` field cannot be skipped: it is an FSDP unit boundary and holds parameters",
            );
        }
        if attrs.buffer {
            cx.error_spanned_by(&field.member, "a field cannot be both `skip` and `buffer`");
        }
        if let Some(span) = attrs.frozen {
            cx.syn_error(syn::Error::new(span, "a skipped field holds no parameters to freeze"));
        }
        if let Some(name) = &attrs.rename {
            cx.syn_error(syn::Error::new(name.span, "a skipped field has no name to rename"));
        }
    } else if field.is_primitive() && (attrs.buffer || attrs.rename.is_some() || attrs.frozen.is_some()) {
        cx.error_spanned_by(field.ty, "a primitive field holds no tensors: it cannot be a buffer, frozen or renamed");
    } else if let (true, Some(span)) = (attrs.buffer, attrs.frozen) {
        cx.syn_error(syn::Error::new(span, "a buffer is never trained: `frozen` says nothing more"));
    }
}

/// The field's FQN segment(s): its `rename` or its Rust name, under the container's prefix.
pub fn field_name(cont: &Container, field: &Field) -> String {
    let own = match &field.attrs.rename {
        Some(name) => name.value.clone(),
        None => field.ident_string(),
    };
    match &cont.attrs.rename {
        Some(prefix) => format!("{}.{own}", prefix.value),
        None => own,
    }
}

fn check_names(cx: &Ctxt, cont: &Container) {
    let mut seen: HashMap<String, String> = HashMap::new();
    for field in cont.fields.iter().filter(|f| f.holds_tensors()) {
        let name = field_name(cont, field);
        if let Some(first) = seen.get(&name) {
            let message =
                format!("field `{}` has the FQN `{name}`, which field `{first}` already has", field.ident_string());
            match &field.attrs.rename {
                Some(rename) => cx.syn_error(syn::Error::new(rename.span, message)),
                None => cx.error_spanned_by(&field.member, message),
            }
        } else {
            seen.insert(name, field.ident_string());
        }
    }
}

fn check_forward_order(cx: &Ctxt, cont: &Container) {
    let Some((members, span)) = &cont.attrs.forward_order else {
        return;
    };
    let mut listed: Vec<&Member> = Vec::new();
    for member in members {
        let field = cont.fields.iter().find(|f| f.member == *member);
        match field {
            None => cx.error_spanned_by(
                member,
                format!("`forward_order` names `{}`, which is not a field", member_string(member)),
            ),
            Some(field) if !field.holds_tensors() => cx.error_spanned_by(
                member,
                format!("field `{}` holds no tensors; leave it out of `forward_order`", member_string(member)),
            ),
            Some(_) if listed.contains(&member) => {
                cx.error_spanned_by(member, format!("`forward_order` names `{}` twice", member_string(member)))
            }
            Some(_) => listed.push(member),
        }
    }
    let missing: Vec<String> = cont
        .fields
        .iter()
        .filter(|f| f.holds_tensors() && !members.contains(&f.member))
        .map(|f| format!("`{}`", f.ident_string()))
        .collect();
    if !missing.is_empty() {
        cx.syn_error(syn::Error::new(
            *span,
            format!("`forward_order` must list every field that holds tensors; missing {}", missing.join(", ")),
        ));
    }
}

fn member_string(member: &Member) -> String {
    match member {
        Member::Named(ident) => ident.to_string(),
        Member::Unnamed(index) => index.index.to_string(),
    }
}

/// Whether the type is `Unit<..>`, possibly inside `Vec`, `Option`, `Box` or an array.
fn contains_unit(ty: &Type) -> bool {
    match ty {
        Type::Array(array) => contains_unit(&array.elem),
        Type::Paren(paren) => contains_unit(&paren.elem),
        Type::Group(group) => contains_unit(&group.elem),
        Type::Path(path) => {
            let Some(last) = path.path.segments.last() else {
                return false;
            };
            if last.ident == "Unit" {
                return true;
            }
            let wrapper = ["Vec", "Option", "Box"].iter().any(|w| last.ident == w);
            match &last.arguments {
                PathArguments::AngleBracketed(args) if wrapper => args.args.iter().any(|arg| match arg {
                    GenericArgument::Type(inner) => contains_unit(inner),
                    _ => false,
                }),
                _ => false,
            }
        }
        _ => false,
    }
}
