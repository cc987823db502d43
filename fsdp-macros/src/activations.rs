//! `#[derive(Activations)]`: a struct that carries tensors between units (PyTorch's
//! namedtuple/dataclass activations) exposes every field's tensors in declaration order.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{Data, DeriveInput, Fields, Index};

pub fn derive_activations(input: &DeriveInput) -> syn::Result<TokenStream> {
    let fields = match &input.data {
        Data::Struct(data) => &data.fields,
        Data::Enum(data) => {
            return Err(syn::Error::new_spanned(
                data.enum_token,
                "`Activations` cannot be derived for an enum: every rank must find the same tensors in the same order",
            ))
        }
        Data::Union(data) => {
            return Err(syn::Error::new_spanned(data.union_token, "`Activations` cannot be derived for a union"))
        }
    };
    let krate = quote!(::candle_fsdp);
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let members: Vec<TokenStream> = fields
        .iter()
        .enumerate()
        .map(|(i, field)| match &field.ident {
            Some(ident) => quote!(#ident),
            None => {
                let index = Index::from(i);
                quote!(#index)
            }
        })
        .collect();
    let types = fields.iter().map(|f| &f.ty);
    let mut where_clause = where_clause.cloned().unwrap_or_else(|| syn::parse_quote!(where));
    for ty in types {
        where_clause.predicates.push(syn::parse_quote!(#ty: #krate::Activations));
    }
    let construct = match fields {
        Fields::Unit => quote!(Self),
        Fields::Named(_) | Fields::Unnamed(_) => quote! {
            Self { #(#members: #krate::Activations::map_tensors(self.#members, f)?),* }
        },
    };
    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics #krate::Activations for #ident #ty_generics #where_clause {
            fn for_each_tensor(&self, f: &mut dyn FnMut(&#krate::__private::Tensor)) {
                #(#krate::Activations::for_each_tensor(&self.#members, f);)*
            }

            fn map_tensors(
                self,
                f: &mut dyn FnMut(#krate::__private::Tensor) -> #krate::__private::CandleResult<#krate::__private::Tensor>,
            ) -> #krate::__private::CandleResult<Self> {
                ::core::result::Result::Ok(#construct)
            }
        }
    })
}
