#![doc = include_str!("guide.md")]

mod ast;
mod attr;
mod diagnostics;
mod expand;
mod krate;
mod resolve;
mod serde_attrs;
mod topic;
mod valid;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

#[doc = include_str!("guide.md")]
#[proc_macro_derive(OutboxEvent, attributes(outbox, serde))]
pub fn derive_outbox_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::derive(&input).into()
}
