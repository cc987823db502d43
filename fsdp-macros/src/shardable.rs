//! `#[derive(Shardable)]`: parse and check the container, then emit the `Shardable` impl
//! (schema, visit, rebuild) and the `ShardableModel` impl (the flattened static table);
//! on errors, the errors and the stand-in impls of [`fallback`].

use crate::fallback;
use crate::internals::ast::{Container, Field, Style};
use crate::internals::check::field_name;
use crate::internals::{ast, attr, check, Ctxt};
use crate::model_table::shardable_model;
use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::DeriveInput;

pub fn derive(input: &DeriveInput) -> TokenStream {
    let cx = Ctxt::new();
    let attrs = attr::Container::from_ast(&cx, input);
    let krate = attrs.crate_path();
    let cont = ast::Container::from_ast(&cx, input, attrs);
    if let Some(cont) = &cont {
        check::check(&cx, cont);
    }
    match (cx.check(), cont) {
        (Ok(()), Some(cont)) => expand(&cont, &krate),
        (Err(errors), _) => {
            let errors = errors.to_compile_error();
            let fallback = fallback::shardable(input, &krate);
            quote!(#errors #fallback)
        }
        (Ok(()), None) => unreachable!("a non-struct input always records an error"),
    }
}

fn expand(cont: &Container, krate: &TokenStream) -> TokenStream {
    let ident = cont.ident;
    let fields: Vec<&Field> = cont.fields.iter().filter(|f| f.holds_tensors()).collect();

    let field_schemas = fields.iter().map(|field| {
        let ident_string = field.ident_string();
        let name = field_name(cont, field);
        let ty = field.ty;
        let role = if field.attrs.buffer || cont.attrs.buffer {
            quote!(::core::option::Option::Some(#krate::__private::Role::Buffer))
        } else {
            quote!(::core::option::Option::None)
        };
        // Spanned at the type, so an unimplemented trait is reported on the field.
        let node = quote_spanned!(ty.span()=> &<#ty as #krate::__private::Shardable>::NODE);
        quote! {
            #krate::__private::FieldSchema { ident: #ident_string, name: #name, role: #role, node: #node }
        }
    });

    // Positions of the tensor-holding fields in forward order.
    let forward_order: Vec<usize> = match &cont.attrs.forward_order {
        Some((members, _)) => members
            .iter()
            .map(|m| fields.iter().position(|f| f.member == *m).expect("checked: forward_order names fields"))
            .collect(),
        None => (0..fields.len()).collect(),
    };
    let declaration_order: Vec<usize> = (0..fields.len()).collect();

    let visit_arms = fields.iter().enumerate().map(|(index, field)| {
        let member = &field.member;
        let ty = field.ty;
        // Spanned at the type like `node`, so a missing impl is reported once, on the field.
        let visit = quote_spanned!(ty.span()=> <#ty as #krate::__private::Shardable>::visit);
        let name = field_name(cont, field);
        let buffer = field.attrs.buffer || cont.attrs.buffer;
        let (enter_buffer, leave_buffer) = if buffer {
            (quote!(visitor.enter_buffer();), quote!(visitor.leave_buffer();))
        } else {
            (quote!(), quote!())
        };
        let (enter_checkpointed, leave_checkpointed) = if field.attrs.checkpoint.is_some() {
            (quote!(visitor.enter_checkpointed();), quote!(visitor.leave_checkpointed();))
        } else {
            (quote!(), quote!())
        };
        let (enter_frozen, leave_frozen) = if field.attrs.frozen.is_some() {
            (quote!(visitor.enter_frozen();), quote!(visitor.leave_frozen();))
        } else {
            (quote!(), quote!())
        };
        quote! {
            #index => {
                visitor.enter(#name);
                #enter_buffer
                #enter_checkpointed
                #enter_frozen
                #visit(&self.#member, visitor, order);
                #leave_frozen
                #leave_checkpointed
                #leave_buffer
                visitor.leave();
            }
        }
    });

    let bindings: Vec<syn::Ident> = cont
        .fields
        .iter()
        .enumerate()
        .map(|(i, _)| syn::Ident::new(&format!("__field{i}"), proc_macro2::Span::call_site()))
        .collect();
    let members = cont.fields.iter().map(|f| &f.member);
    let destructure = match cont.style {
        Style::Unit => quote!(let _ = self;),
        Style::Named | Style::Tuple => quote!(let Self { #(#members: #bindings),* } = self;),
    };
    let rebuilt = cont.fields.iter().zip(&bindings).map(|(field, binding)| {
        let member = &field.member;
        if field.holds_tensors() {
            let ty = field.ty;
            let map_tensors = quote_spanned!(ty.span()=> <#ty as #krate::__private::Shardable>::map_tensors);
            quote!(#member: #map_tensors(#binding, map)?)
        } else {
            quote!(#member: #binding)
        }
    });
    let construct = match cont.style {
        Style::Unit => quote!(Self),
        Style::Named | Style::Tuple => quote!(Self { #(#rebuilt),* }),
    };

    // A `checkpoint` field must hold a unit, or the attribute would do nothing: checked at
    // compile time (the derive takes no generic parameters), reported at the attribute.
    let checkpoint_checks = fields.iter().filter_map(|field| {
        let span = field.attrs.checkpoint?;
        let ty = field.ty;
        Some(quote_spanned! {span=>
            const _: () = ::core::assert!(
                #krate::__private::holds_unit(&<#ty as #krate::__private::Shardable>::NODE),
                "`#[fsdp(checkpoint)]` is on a field that holds no `Unit`: only units checkpoint their activations"
            );
        })
    });
    let table =
        shardable_model(krate, ident, &cont.original.generics, quote!(&<#ident as #krate::__private::Shardable>::NODE));
    quote! {
        #(#checkpoint_checks)*

        #[automatically_derived]
        impl #krate::__private::Shardable for #ident {
            const NODE: #krate::__private::Node = #krate::__private::Node::Struct(&#krate::__private::StructSchema {
                type_name: stringify!(#ident),
                fields: &[#(#field_schemas),*],
                forward_order: &[#(#forward_order),*],
            });

            fn visit(&self, visitor: &mut dyn #krate::__private::Visitor, order: #krate::__private::VisitOrder) {
                let fields: &[usize] = match order {
                    #krate::__private::VisitOrder::Declaration => &[#(#declaration_order),*],
                    #krate::__private::VisitOrder::Forward => &[#(#forward_order),*],
                };
                for &field in fields {
                    match field {
                        #(#visit_arms)*
                        _ => unreachable!(),
                    }
                }
            }

            fn map_tensors(
                self,
                map: &mut dyn #krate::__private::TensorMap,
            ) -> #krate::__private::CandleResult<Self> {
                #destructure
                ::core::result::Result::Ok(#construct)
            }
        }

        #table
    }
}
