//! Code generation for a validated container: the `Shardable` impl (schema, visit,
//! rebuild) and the `ShardableModel` impl (the flattened static table).

use crate::internals::ast::{Container, Field, Style};
use crate::internals::check::field_name;
use crate::internals::{ast, check, Ctxt};
use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::DeriveInput;

pub fn derive_shardable(input: &DeriveInput) -> syn::Result<TokenStream> {
    let cx = Ctxt::new();
    let Some(cont) = ast::Container::from_ast(&cx, input) else {
        cx.check()?;
        unreachable!("a non-struct input always records an error");
    };
    check::check(&cx, &cont);
    cx.check()?;
    Ok(expand(&cont))
}

/// What to emit beside the errors, so that one mistake in the derive does not also
/// surface as "`Shardable` is not implemented" wherever the type is used.
pub fn fallback(input: &DeriveInput) -> TokenStream {
    let krate = default_crate_path();
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    quote! {
        impl #impl_generics #krate::schema::Shardable for #ident #ty_generics #where_clause {
            const NODE: #krate::schema::Node = #krate::schema::Node::Struct(&#krate::schema::StructSchema {
                type_name: stringify!(#ident),
                fields: &[],
                forward_order: &[],
            });
            fn visit(&self, _: &mut dyn #krate::schema::Visitor, _: #krate::schema::VisitOrder) {
                unimplemented!()
            }
            fn map_tensors(self, _: &mut dyn #krate::schema::TensorMap) -> #krate::__private::CandleResult<Self> {
                unimplemented!()
            }
        }
    }
}

fn default_crate_path() -> TokenStream {
    quote!(::candle_fsdp)
}

fn expand(cont: &Container) -> TokenStream {
    let krate = match &cont.attrs.crate_path {
        Some(path) => quote!(#path),
        None => default_crate_path(),
    };
    let ident = cont.ident;
    let fields: Vec<&Field> = cont.fields.iter().filter(|f| f.holds_tensors()).collect();

    let field_schemas = fields.iter().map(|field| {
        let ident_string = field.ident_string();
        let name = field_name(cont, field);
        let ty = field.ty;
        let role = if field.attrs.buffer || cont.attrs.buffer {
            quote!(::core::option::Option::Some(#krate::schema::Role::Buffer))
        } else {
            quote!(::core::option::Option::None)
        };
        // Spanned at the type, so an unimplemented trait is reported on the field.
        let node = quote_spanned!(ty.span()=> &<#ty as #krate::schema::Shardable>::NODE);
        quote! {
            #krate::schema::FieldSchema { ident: #ident_string, name: #name, role: #role, node: #node }
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
        let visit = quote_spanned!(ty.span()=> <#ty as #krate::schema::Shardable>::visit);
        let name = field_name(cont, field);
        let buffer = field.attrs.buffer || cont.attrs.buffer;
        let (enter_buffer, leave_buffer) = if buffer {
            (quote!(visitor.enter_buffer();), quote!(visitor.leave_buffer();))
        } else {
            (quote!(), quote!())
        };
        quote! {
            #index => {
                visitor.enter(#name);
                #enter_buffer
                #visit(&self.#member, visitor, order);
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
            let map_tensors = quote_spanned!(ty.span()=> <#ty as #krate::schema::Shardable>::map_tensors);
            quote!(#member: #map_tensors(#binding, map)?)
        } else {
            quote!(#member: #binding)
        }
    });
    let construct = match cont.style {
        Style::Unit => quote!(Self),
        Style::Named | Style::Tuple => quote!(Self { #(#rebuilt),* }),
    };

    quote! {
        #[automatically_derived]
        impl #krate::schema::Shardable for #ident {
            const NODE: #krate::schema::Node = #krate::schema::Node::Struct(&#krate::schema::StructSchema {
                type_name: stringify!(#ident),
                fields: &[#(#field_schemas),*],
                forward_order: &[#(#forward_order),*],
            });

            fn visit(&self, visitor: &mut dyn #krate::schema::Visitor, order: #krate::schema::VisitOrder) {
                let fields: &[usize] = match order {
                    #krate::schema::VisitOrder::Declaration => &[#(#declaration_order),*],
                    #krate::schema::VisitOrder::Forward => &[#(#forward_order),*],
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
                map: &mut dyn #krate::schema::TensorMap,
            ) -> #krate::__private::CandleResult<Self> {
                #destructure
                ::core::result::Result::Ok(#construct)
            }
        }

        #[automatically_derived]
        impl #krate::table::ShardableModel for #ident {
            const TABLE: #krate::table::StaticTable = {
                const NODE: &#krate::schema::Node = &<#ident as #krate::schema::Shardable>::NODE;
                const PARAMS: usize = #krate::table::param_count(NODE);
                const UNITS: usize = #krate::table::unit_count(NODE);
                const TABLE: &#krate::table::Table<PARAMS, UNITS> = &#krate::table::Table::build(NODE);
                TABLE.as_static()
            };
        }
    }
}
