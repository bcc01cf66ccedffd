//! The `#[serde(...)]` attributes of an enum and its variants that shape an enum's payloads:
//! which are honoured, and how they are copied onto the generated serde helpers.

use proc_macro2::TokenStream;
use quote::quote;
use syn::{Attribute, Expr, Ident, Token};

/// Enum-level serde keys copied onto the payload helpers.
const ENUM_KEYS: &[&str] = &[
    "tag",
    "content",
    "untagged",
    "rename_all",
    "rename_all_fields",
];
/// Variant-level serde keys copied onto the payload helpers.
const VARIANT_KEYS: &[&str] = &["rename", "alias", "rename_all"];

/// One `key`, `key = value` or `key(...)` item of a `#[serde(...)]` attribute.
pub(crate) struct Item {
    /// The key, e.g. `rename_all`.
    pub key: Ident,
    /// Everything after the key: `= "camelCase"`, `(serialize = "...")` or nothing.
    pub rest: TokenStream,
}

impl Item {
    /// The item as written, for a `#[serde(...)]` attribute.
    pub(crate) fn tokens(&self) -> TokenStream {
        let Item { key, rest } = self;
        quote!(#key #rest)
    }

    /// The item's value under another key (`rename_all_fields = X` as `rename_all = X`).
    pub(crate) fn renamed(&self, key: &str) -> TokenStream {
        let key = Ident::new(key, self.key.span());
        let rest = &self.rest;
        quote!(#key #rest)
    }
}

/// The honoured `#[serde(...)]` items among `attrs` of an enum (`variant == false`) or a variant.
///
/// Items that are not honoured, and attributes that do not parse, are left to serde's own derive
/// (which reports malformed ones); they do not change the outbox payload.
pub(crate) fn honoured(attrs: &[Attribute], variant: bool) -> Vec<Item> {
    let keys = if variant { VARIANT_KEYS } else { ENUM_KEYS };
    let mut items = Vec::new();
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("serde")) {
        let mut found = Vec::new();
        let parsed = attr.parse_nested_meta(|meta| {
            let rest = if meta.input.peek(Token![=]) {
                let value: Expr = meta.value()?.parse()?;
                quote!(= #value)
            } else if meta.input.peek(syn::token::Paren) {
                let content;
                syn::parenthesized!(content in meta.input);
                let inner: TokenStream = content.parse()?;
                quote!((#inner))
            } else {
                TokenStream::new()
            };
            if let Some(key) = meta.path.get_ident()
                && keys.contains(&key.to_string().as_str())
            {
                found.push(Item {
                    key: key.clone(),
                    rest,
                });
            }
            Ok(())
        });
        if parsed.is_ok() {
            items.extend(found);
        }
    }
    items
}

/// How an enum's payload is laid out, from its honoured serde items.
pub(crate) enum Layout {
    /// No `tag`: the payload is the variant's content (the event type travels in the envelope).
    Untagged,
    /// `tag = "..."`, maybe with `content = "..."`: the payload carries the variant's (serde)
    /// name, exactly as serde's own derive writes it.
    Tagged,
}

/// The layout the enum-level `items` select.
pub(crate) fn layout(items: &[Item]) -> Layout {
    if items.iter().any(|item| item.key == "tag") {
        Layout::Tagged
    } else {
        Layout::Untagged
    }
}

/// The first item called `key`.
pub(crate) fn find<'i>(items: &'i [Item], key: &str) -> Option<&'i Item> {
    items.iter().find(|item| item.key == key)
}
