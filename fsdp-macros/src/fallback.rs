//! What a derive emits beside its errors: stand-ins for every impl it would have emitted,
//! at the same crate path, so that one mistake in the derive is reported once, at its own
//! tokens, and not again as "trait not implemented" wherever the type is used. The bodies
//! never run: the crate does not compile.

use crate::model_table::shardable_model;
use proc_macro2::TokenStream;
use quote::quote;
use syn::DeriveInput;

/// `Shardable` and `ShardableModel` for a model with no fields.
pub fn shardable(input: &DeriveInput, krate: &TokenStream) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let empty = quote! {
        #krate::__private::Node::Struct(&#krate::__private::StructSchema {
            type_name: stringify!(#ident),
            fields: &[],
            forward_order: &[],
        })
    };
    let table = shardable_model(krate, ident, &input.generics, quote!(&#empty));
    quote! {
        impl #impl_generics #krate::__private::Shardable for #ident #ty_generics #where_clause {
            const NODE: #krate::__private::Node = #empty;
            fn visit(&self, _: &mut dyn #krate::__private::Visitor, _: #krate::__private::VisitOrder) {
                ::core::unreachable!()
            }
            fn map_tensors(self, _: &mut dyn #krate::__private::TensorMap) -> #krate::__private::CandleResult<Self> {
                ::core::unreachable!()
            }
        }
        #table
    }
}

/// `Activations` with no tensors.
pub fn activations(input: &DeriveInput, krate: &TokenStream) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    quote! {
        impl #impl_generics #krate::__private::Activations for #ident #ty_generics #where_clause {
            fn for_each_tensor(&self, _: &mut dyn FnMut(&#krate::__private::Tensor)) {
                ::core::unreachable!()
            }
            fn map_tensors(
                self,
                _: &mut dyn FnMut(#krate::__private::Tensor) -> #krate::__private::CandleResult<#krate::__private::Tensor>,
            ) -> #krate::__private::CandleResult<Self> {
                ::core::unreachable!()
            }
        }
    }
}
