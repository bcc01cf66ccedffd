//! `#[outbox(crate = "path")]`: pointing the generated code at a re-export of `outbox_core`.

use proc_macro2::{Group, Literal, TokenStream, TokenTree};
use quote::ToTokens as _;

/// `tokens` with every `::outbox_core` path prefix replaced by `path`, including inside the
/// string literal of serde's `crate = "::outbox_core::__private::serde"`.
pub(crate) fn replace(tokens: TokenStream, path: &syn::Path) -> TokenStream {
    let replacement = path.to_token_stream();
    let serde_path = format!(
        "{}::__private::serde",
        replacement.to_string().replace(' ', "")
    );
    rewrite(tokens, &replacement, &serde_path)
}

fn rewrite(tokens: TokenStream, replacement: &TokenStream, serde_path: &str) -> TokenStream {
    let trees: Vec<TokenTree> = tokens.into_iter().collect();
    let mut out = TokenStream::new();
    let mut i = 0;
    while i < trees.len() {
        if let [
            TokenTree::Punct(a),
            TokenTree::Punct(b),
            TokenTree::Ident(name),
            ..,
        ] = &trees[i..]
            && a.as_char() == ':'
            && b.as_char() == ':'
            && name == "outbox_core"
            && !preceded_by_path(&trees[..i])
        {
            out.extend(replacement.clone());
            i += 3;
            continue;
        }
        let tree = match &trees[i] {
            TokenTree::Group(group) => {
                let mut new = Group::new(
                    group.delimiter(),
                    rewrite(group.stream(), replacement, serde_path),
                );
                new.set_span(group.span());
                TokenTree::Group(new)
            }
            TokenTree::Literal(lit) if lit.to_string() == "\"::outbox_core::__private::serde\"" => {
                let mut new = Literal::string(serde_path);
                new.set_span(lit.span());
                TokenTree::Literal(new)
            }
            other => other.clone(),
        };
        out.extend([tree]);
        i += 1;
    }
    out
}

/// Whether the `::` at the end of `before` continues a path (`a::outbox_core`), which is not
/// the crate root.
fn preceded_by_path(before: &[TokenTree]) -> bool {
    const KEYWORDS: &[&str] = &[
        "impl", "for", "as", "dyn", "return", "let", "mut", "in", "where", "if", "match",
    ];
    match before.last() {
        Some(TokenTree::Ident(ident)) => !KEYWORDS.iter().any(|k| ident == k),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use crate::expand::derive;

    fn expand(input: &str) -> String {
        derive(&syn::parse_str(input).expect("test input parses")).to_string()
    }

    #[test]
    fn crate_path_replaces_every_outbox_core_root() {
        for input in [
            "#[outbox(crate = \"my::reexport\", aggregate_type = \"a\", upcast = up)]
             struct S { #[outbox(aggregate_id)] id: u8, #[outbox(header = \"h\")] h: String }",
            "#[outbox(crate = \"my::reexport\", aggregate_type = \"a\")]
             enum E { V { #[outbox(aggregate_id)] id: u8, #[outbox(id)] e: Uuid } }",
        ] {
            let plain = expand(&input.replace("crate = \"my::reexport\",", ""));
            assert!(plain.contains(":: outbox_core ::"), "{plain}");
            let out = expand(input);
            assert!(!out.contains("outbox_core"), "{out}");
            assert!(
                out.contains("impl my :: reexport :: OutboxEvent for"),
                "{out}"
            );
        }
        let out = expand(
            "#[outbox(crate = \"my::reexport\", aggregate_type = \"a\")]
             enum E { V { #[outbox(aggregate_id)] id: u8 } }",
        );
        assert!(out.contains("\"my::reexport::__private::serde\""), "{out}");
    }

    #[test]
    fn a_derive_error_keeps_the_crate_path_in_its_placeholders() {
        let out = expand("#[outbox(crate = \"my::reexport\")] struct S { id: u8 }");
        assert!(out.contains("compile_error"), "{out}");
        assert!(!out.contains("outbox_core"), "{out}");
    }
}
