//! `#[derive(Activations)]`: a struct that carries tensors between units (PyTorch's
//! namedtuple/dataclass activations) exposes every field's tensors in declaration order.
//! Parsed and checked through `internals` like `Shardable`; on errors, the errors and the
//! stand-in impl of [`fallback`].

use crate::fallback;
use crate::internals::{attr, Ctxt};
use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, Index};

pub fn derive(input: &DeriveInput) -> TokenStream {
    let cx = Ctxt::new();
    let attrs = attr::Activations::from_ast(&cx, input);
    let krate = attrs.crate_path();
    let fields = match &input.data {
        Data::Struct(data) => Some(&data.fields),
        Data::Enum(data) => {
            cx.error_spanned_by(
                data.enum_token,
                "`Activations` cannot be derived for an enum: every rank must find the same tensors in the same order",
            );
            None
        }
        Data::Union(data) => {
            cx.error_spanned_by(
                data.union_token,
                "`Activations` cannot be derived for a union: the runtime must know which field holds the tensors",
            );
            None
        }
    };
    match (cx.check(), fields) {
        (Ok(()), Some(fields)) => expand(input, fields, &krate),
        (Err(errors), _) => {
            let errors = errors.to_compile_error();
            let fallback = fallback::activations(input, &krate);
            quote!(#errors #fallback)
        }
        (Ok(()), None) => unreachable!("a non-struct input always records an error"),
    }
}

fn expand(input: &DeriveInput, fields: &Fields, krate: &TokenStream) -> TokenStream {
    let ident = &input.ident;
    // Like serde: every type parameter must itself be `Activations`; a concrete field type
    // that is not is reported at the field by the spanned calls below.
    let mut generics = input.generics.clone();
    for param in generics.type_params_mut() {
        param.bounds.push(syn::parse_quote!(#krate::__private::Activations));
    }
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
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
    let visits = fields.iter().zip(&members).map(|(field, member)| {
        let ty = &field.ty;
        quote_spanned!(ty.span()=> <#ty as #krate::__private::Activations>::for_each_tensor(&self.#member, f);)
    });
    let maps = fields.iter().zip(&members).map(|(field, member)| {
        let ty = &field.ty;
        quote_spanned!(ty.span()=> #member: <#ty as #krate::__private::Activations>::map_tensors(self.#member, f)?)
    });
    let construct = match fields {
        Fields::Unit => quote!(Self),
        Fields::Named(_) | Fields::Unnamed(_) => quote!(Self { #(#maps),* }),
    };
    quote! {
        #[automatically_derived]
        impl #impl_generics #krate::__private::Activations for #ident #ty_generics #where_clause {
            fn for_each_tensor(&self, f: &mut dyn FnMut(&#krate::__private::Tensor)) {
                #(#visits)*
            }

            fn map_tensors(
                self,
                f: &mut dyn FnMut(#krate::__private::Tensor) -> #krate::__private::CandleResult<#krate::__private::Tensor>,
            ) -> #krate::__private::CandleResult<Self> {
                ::core::result::Result::Ok(#construct)
            }
        }
    }
}
