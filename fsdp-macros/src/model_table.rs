//! The `ShardableModel` impl both the derive and its fallback emit: the model's FQN table,
//! flattened by the runtime's `const fn`s at compile time.

use proc_macro2::TokenStream;
use quote::quote;

/// The `ShardableModel` impl: the FQN table of `node` (an expression of type `&Node`),
/// flattened at compile time.
/// `node` must not name the type's generic parameters (only the fallback has any).
pub fn shardable_model(
    krate: &TokenStream,
    ident: &syn::Ident,
    generics: &syn::Generics,
    node: TokenStream,
) -> TokenStream {
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    quote! {
        #[automatically_derived]
        impl #impl_generics #krate::__private::ShardableModel for #ident #ty_generics #where_clause {
            const TABLE: #krate::__private::StaticTable = {
                const NODE: &#krate::__private::Node = #node;
                const PARAMS: usize = #krate::__private::param_count(NODE);
                const UNITS: usize = #krate::__private::unit_count(NODE);
                const TABLE: &#krate::__private::Table<PARAMS, UNITS> = &#krate::__private::Table::build(NODE);
                TABLE.as_static()
            };
        }
    }
}
