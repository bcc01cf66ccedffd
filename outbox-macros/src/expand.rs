//! Code generation: `impl OutboxEvent` and `impl DecodeEvent` for a validated [`Input`].

use crate::ast::{Enum, Field, Input, Shape, Struct, Variant};
use crate::resolve::{self, Access, Extras};
use crate::serde_attrs::{self, Layout};
use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::ext::IdentExt as _;
use syn::spanned::Spanned as _;
use syn::{DeriveInput, Ident, LitStr, Result};

/// The derive's output for `node`: both impls, or the compile errors plus placeholder impls
/// (so that the errors are not followed by "trait not implemented" noise at every use).
pub(crate) fn derive(node: &DeriveInput) -> TokenStream {
    match try_expand(node) {
        Ok(tokens) => tokens,
        Err(error) => {
            let errors = error.to_compile_error();
            let fallback = fallback(node);
            quote! {
                #errors
                #fallback
            }
        }
    }
}

fn try_expand(node: &DeriveInput) -> Result<TokenStream> {
    let input = Input::from_syn(node)?;
    input.validate()?;
    let (tokens, krate) = match &input {
        Input::Struct(input) => (expand_struct(input)?, input.attrs.krate.as_ref()),
        Input::Enum(input) => (expand_enum(input)?, input.attrs.krate.as_ref()),
    };
    Ok(match krate {
        Some(path) => crate::krate::replace(tokens, path),
        None => tokens,
    })
}

fn expand_struct(input: &Struct<'_>) -> Result<TokenStream> {
    let ident = input.ident;
    let aggregate_type = &input.attrs.aggregate_type;
    let aggregate_id = input.aggregate_id()?.ident;
    let event_type = input.event_type();
    let schema_version = input.attrs.schema_version.as_ref().map(|version| {
        let value = version.value;
        quote! {
            fn schema_version(&self) -> i32 {
                #value
            }
        }
    });
    let topic = input.attrs.topic.as_ref().map(|topic| {
        quote! {
            fn topic(&self) -> ::core::option::Option<&str> {
                ::core::option::Option::Some(#topic)
            }
        }
    });
    let sequence = input.sequence()?.map(|field| {
        let member = field.ident;
        let value = sequence_from_field(field, quote!(&self.#member));
        quote! {
            fn aggregate_sequence(&self) -> ::core::option::Option<i64> {
                ::core::option::Option::Some(#value)
            }
        }
    });
    let extras = resolve::extras(ident, &input.fields)?;
    let extra_methods = struct_extra_methods(&extras);
    let current_version = input.attrs.schema_version.as_ref().map_or(1, |v| v.value);
    let decode_versioned = input
        .attrs
        .upcast
        .as_ref()
        .map(|upcast| decode_versioned(ident, upcast, quote!(#current_version)));
    // Spanned at the type's name, so a missing `Serialize` / `Deserialize` derive is reported there.
    let to_value =
        quote_spanned!(ident.span()=> ::outbox_core::__private::serde_json::to_value(self));
    let from_slice =
        quote_spanned!(ident.span()=> ::outbox_core::__private::serde_json::from_slice::<Self>);
    let payload_error = payload_error(ident);
    let unknown_event_type = unknown_event_type(ident);
    let outbox_event = outbox_event_impl(
        quote!(::outbox_core::OutboxEvent for #ident),
        EventMethods {
            aggregate_type: quote!(#aggregate_type),
            aggregate_id: quote!(::std::string::ToString::to_string(&self.#aggregate_id)),
            event_type: quote!(#event_type),
            optional: quote!(#schema_version #topic #sequence #extra_methods),
            to_payload: to_value,
        },
    );
    Ok(quote! {
        #outbox_event

        #[automatically_derived]
        impl ::outbox_core::DecodeEvent for #ident {
            fn accepts(event_type: &str) -> bool {
                event_type == #event_type
            }

            fn decode(
                event_type: &str,
                payload: &[u8],
            ) -> ::core::result::Result<Self, ::outbox_core::DecodeError> {
                if event_type != #event_type {
                    return #unknown_event_type;
                }
                #from_slice(payload).map_err(#payload_error)
            }

            #decode_versioned
        }
    })
}

/// `event_id`, `message_key` and `headers` of a struct, each only when a field is marked.
fn struct_extra_methods(extras: &Extras<'_, '_>) -> TokenStream {
    let place = |field: &Field<'_>| {
        let member = field.ident;
        quote!(&self.#member)
    };
    let id = extras.id.map(|field| {
        let value = id_value(field, place(field));
        quote! {
            fn event_id(&self) -> ::core::option::Option<::outbox_core::__private::uuid::Uuid> {
                #value
            }
        }
    });
    let key = extras.key.map(|field| {
        let value = header_value(field, place(field));
        quote! {
            fn message_key(&self) -> ::core::option::Option<::std::string::String> {
                #value
            }
        }
    });
    let headers = (!extras.headers.is_empty()).then(|| {
        let body = headers_body(&extras.headers, place);
        quote! {
            fn headers(&self) -> ::std::vec::Vec<(::std::string::String, ::std::string::String)> {
                #body
            }
        }
    });
    quote!(#id #key #headers)
}

/// `Option<Uuid>` from an `#[outbox(id)]` field borrowed by `place`; an unsuitable type is
/// reported at the field's type.
fn id_value(field: &Field<'_>, place: TokenStream) -> TokenStream {
    let ty = field.ty;
    quote_spanned! {ty.span()=>
        <#ty as ::outbox_core::EventIdValue>::to_event_id(#place)
    }
}

/// `Option<String>` from a header or key field borrowed by `place`; an unsuitable type is
/// reported at the field's type.
fn header_value(field: &Field<'_>, place: TokenStream) -> TokenStream {
    let ty = field.ty;
    quote_spanned! {ty.span()=>
        <#ty as ::outbox_core::HeaderValue>::to_header_value(#place)
    }
}

/// A block building the `Vec` of headers from `headers`, each field borrowed by `place`.
fn headers_body(
    headers: &[(&LitStr, &Field<'_>)],
    place: impl Fn(&Field<'_>) -> TokenStream,
) -> TokenStream {
    let pushes = headers.iter().map(|(name, field)| {
        let value = header_value(field, place(field));
        quote! {
            if let ::core::option::Option::Some(__outbox_value) = #value {
                __outbox_headers.push((::std::string::String::from(#name), __outbox_value));
            }
        }
    });
    quote! {
        let mut __outbox_headers = ::std::vec::Vec::new();
        #(#pushes)*
        __outbox_headers
    }
}

/// `DecodeEvent::decode_versioned` running payloads older than `current` (an `i32` expression
/// of `event_type`; it may `return` for unknown event types) through `upcast` first.
fn decode_versioned(ident: &Ident, upcast: &syn::Path, current: TokenStream) -> TokenStream {
    let target = ident.unraw().to_string();
    let payload_error = payload_error(ident);
    // Coerced to a function pointer first, so a wrong signature is reported at the path as
    // "expected fn pointer `fn(&str, i32, Value) -> Result<Value, _>`".
    let function = quote_spanned! {upcast.span()=>
        let __outbox_upcast: fn(
            &str,
            i32,
            ::outbox_core::__private::serde_json::Value,
        ) -> ::core::result::Result<::outbox_core::__private::serde_json::Value, _> = #upcast;
    };
    quote! {
        fn decode_versioned(
            event_type: &str,
            schema_version: i32,
            payload: &[u8],
        ) -> ::core::result::Result<Self, ::outbox_core::DecodeError> {
            let __outbox_current: i32 = #current;
            if schema_version >= __outbox_current {
                return <Self as ::outbox_core::DecodeEvent>::decode(event_type, payload);
            }
            let __outbox_value: ::outbox_core::__private::serde_json::Value =
                ::outbox_core::__private::serde_json::from_slice(payload)
                    .map_err(#payload_error)?;
            #function
            let __outbox_value = __outbox_upcast(event_type, schema_version, __outbox_value)
                .map_err(|source| ::outbox_core::DecodeError::Upcast {
                event_type: ::std::borrow::ToOwned::to_owned(event_type),
                target: #target,
                from: schema_version,
                to: __outbox_current,
                source: ::core::convert::Into::<::outbox_core::UpcastError>::into(source),
            })?;
            let __outbox_bytes = ::outbox_core::__private::serde_json::to_vec(&__outbox_value)
                .map_err(#payload_error)?;
            <Self as ::outbox_core::DecodeEvent>::decode(event_type, &__outbox_bytes)
        }
    }
}

/// `event_id`, `message_key` and `headers` of an enum, each only when some variant marks a
/// field for it.
fn enum_extra_methods(variants: &[Variant<'_>], extras: &[Extras<'_, '_>]) -> TokenStream {
    let id = extras.iter().any(|e| e.id.is_some()).then(|| {
        let body = extra_match(variants, extras, Extra::Id);
        quote! {
            fn event_id(&self) -> ::core::option::Option<::outbox_core::__private::uuid::Uuid> {
                #body
            }
        }
    });
    let key = extras.iter().any(|e| e.key.is_some()).then(|| {
        let body = extra_match(variants, extras, Extra::Key);
        quote! {
            fn message_key(&self) -> ::core::option::Option<::std::string::String> {
                #body
            }
        }
    });
    let headers = extras.iter().any(|e| !e.headers.is_empty()).then(|| {
        let body = extra_match(variants, extras, Extra::Headers);
        quote! {
            fn headers(&self) -> ::std::vec::Vec<(::std::string::String, ::std::string::String)> {
                #body
            }
        }
    });
    quote!(#id #key #headers)
}

/// Which of the [`Extras`] a generated method reads.
#[derive(Clone, Copy)]
enum Extra {
    Id,
    Key,
    Headers,
}

/// `match self { .. }` computing `which` for every variant, binding only the fields it reads.
fn extra_match(variants: &[Variant<'_>], extras: &[Extras<'_, '_>], which: Extra) -> TokenStream {
    let binding = |field: &Field<'_>| {
        let member = field.ident.expect("struct variant fields are named");
        format_ident!("__outbox_{}", member.unraw())
    };
    let place = |field: &Field<'_>| {
        let binding = binding(field);
        quote!(#binding)
    };
    let arms = variants.iter().zip(extras).map(|(variant, extra)| {
        let ident = variant.ident;
        let (fields, body): (Vec<&Field<'_>>, TokenStream) = match which {
            Extra::Id => match extra.id {
                Some(field) => (vec![field], id_value(field, place(field))),
                None => (Vec::new(), quote!(::core::option::Option::None)),
            },
            Extra::Key => match extra.key {
                Some(field) => (vec![field], header_value(field, place(field))),
                None => (Vec::new(), quote!(::core::option::Option::None)),
            },
            Extra::Headers if extra.headers.is_empty() => {
                (Vec::new(), quote!(::std::vec::Vec::new()))
            }
            Extra::Headers => (
                extra.headers.iter().map(|(_, field)| *field).collect(),
                headers_body(&extra.headers, place),
            ),
        };
        let members = fields.iter().map(|field| field.ident);
        let bindings = fields.iter().map(|field| binding(field));
        quote!(Self::#ident { #(#members: #bindings,)* .. } => { #body })
    });
    quote!(match self { #(#arms)* })
}

/// The bodies of the `impl OutboxEvent` methods: what a struct and an enum generate differently.
struct EventMethods {
    aggregate_type: TokenStream,
    aggregate_id: TokenStream,
    event_type: TokenStream,
    /// `schema_version`, `topic` and `aggregate_sequence`, each only when declared.
    optional: TokenStream,
    to_payload: TokenStream,
}

/// `impl #header` (`OutboxEvent for` the type, with any generics) with these method bodies.
fn outbox_event_impl(header: TokenStream, methods: EventMethods) -> TokenStream {
    let EventMethods {
        aggregate_type,
        aggregate_id,
        event_type,
        optional,
        to_payload,
    } = methods;
    quote! {
        #[automatically_derived]
        impl #header {
            fn aggregate_type(&self) -> &str {
                #aggregate_type
            }

            fn aggregate_id(&self) -> ::std::string::String {
                #aggregate_id
            }

            fn event_type(&self) -> &str {
                #event_type
            }

            #optional

            fn to_payload(
                &self,
            ) -> ::core::result::Result<
                ::outbox_core::__private::serde_json::Value,
                ::outbox_core::__private::serde_json::Error,
            > {
                #to_payload
            }
        }
    }
}

fn expand_enum(input: &Enum<'_>) -> Result<TokenStream> {
    let ident = input.ident;
    let aggregate_type = &input.attrs.aggregate_type;
    let variants = &input.variants;

    let aggregate_id_arms = variants
        .iter()
        .map(|variant| {
            let (pattern, value) = bind(variant, variant.aggregate_id(input)?);
            Ok(quote! {
                #pattern => ::std::string::ToString::to_string(#value),
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let event_types: Vec<String> = variants.iter().map(Variant::event_type).collect();
    let any_variant = variants.iter().map(|variant| {
        let variant = variant.ident;
        quote!(Self::#variant { .. })
    });
    let event_type_arms = any_variant
        .clone()
        .zip(&event_types)
        .map(|(pattern, event_type)| quote!(#pattern => #event_type,));

    let schema_version = (input.attrs.schema_version.is_some()
        || variants.iter().any(|v| v.attrs.schema_version.is_some()))
    .then(|| {
        let arms = any_variant.clone().zip(variants).map(|(pattern, variant)| {
            let version = variant
                .attrs
                .schema_version
                .as_ref()
                .or(input.attrs.schema_version.as_ref())
                .map_or(1, |version| version.value);
            quote!(#pattern => #version,)
        });
        quote! {
            fn schema_version(&self) -> i32 {
                match self {
                    #(#arms)*
                }
            }
        }
    });

    let topic = (input.attrs.topic.is_some() || variants.iter().any(|v| v.attrs.topic.is_some()))
        .then(|| {
            let arms = any_variant.clone().zip(variants).map(|(pattern, variant)| {
                let topic = variant.attrs.topic.as_ref().or(input.attrs.topic.as_ref());
                let topic = option(topic.map(|topic| quote!(#topic)));
                quote!(#pattern => #topic,)
            });
            quote! {
                fn topic(&self) -> ::core::option::Option<&str> {
                    match self {
                        #(#arms)*
                    }
                }
            }
        });

    let mut any_sequence = false;
    let sequence_arms = any_variant
        .clone()
        .zip(variants)
        .map(|(unbound, variant)| {
            Ok(match variant.sequence(input)? {
                Some(access) => {
                    any_sequence = true;
                    let value = match access {
                        Access::Field(field) => sequence_from_field(field, quote!(__outbox_field)),
                        Access::Inner(member) => sequence_from_inner(member),
                    };
                    let (pattern, _) = bind(variant, access);
                    quote!(#pattern => ::core::option::Option::Some(#value),)
                }
                None => quote!(#unbound => ::core::option::Option::None,),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let sequence = any_sequence.then(|| {
        quote! {
            fn aggregate_sequence(&self) -> ::core::option::Option<i64> {
                match self {
                    #(#sequence_arms)*
                }
            }
        }
    });

    let extras = variants
        .iter()
        .map(|variant| match &variant.shape {
            Shape::Struct(fields) => resolve::extras(variant.ident, fields),
            Shape::Newtype(_) => Ok(Extras::none()),
        })
        .collect::<Result<Vec<_>>>()?;
    let extra_methods = enum_extra_methods(variants, &extras);
    let decode_versioned = input.attrs.upcast.as_ref().map(|upcast| {
        let arms = variants
            .iter()
            .zip(&event_types)
            .map(|(variant, event_type)| {
                let version = variant
                    .attrs
                    .schema_version
                    .as_ref()
                    .or(input.attrs.schema_version.as_ref())
                    .map_or(1, |version| version.value);
                quote!(#event_type => #version,)
            });
        decode_versioned(
            ident,
            upcast,
            quote! {
                match event_type {
                    #(#arms)*
                    _ => return <Self as ::outbox_core::DecodeEvent>::decode(event_type, payload),
                }
            },
        )
    });

    let payload_mirror = payload_mirror(input);
    let tagged = matches!(serde_attrs::layout(&input.serde), Layout::Tagged);
    let decode_helpers = variants
        .iter()
        .filter(|_| !tagged)
        .map(|variant| decode_helper(input, variant));
    let decode_arms = variants
        .iter()
        .zip(&event_types)
        .map(|(variant, event_type)| {
            let helper = decode_helper_ident(variant);
            let variant_ident = variant.ident;
            let construct = match &variant.shape {
                Shape::Struct(fields) => {
                    let members = fields.iter().map(|field| field.ident);
                    let members2 = members.clone();
                    quote!(Self::#variant_ident { #(#members: __outbox_payload.#members2),* })
                }
                Shape::Newtype(_) => quote!(Self::#variant_ident(__outbox_payload.0)),
            };
            let payload_error = payload_error(ident);
            quote! {
                #event_type => {
                    let __outbox_payload: #helper =
                        ::outbox_core::__private::serde_json::from_slice(payload)
                            .map_err(#payload_error)?;
                    ::core::result::Result::Ok(#construct)
                }
            }
        });
    let unknown_event_type = unknown_event_type(ident);
    let decode_body = if tagged {
        decode_tagged(ident)
    } else {
        quote! {
            match event_type {
                #(#decode_arms)*
                _ => #unknown_event_type,
            }
        }
    };
    let outbox_event = outbox_event_impl(
        quote!(::outbox_core::OutboxEvent for #ident),
        EventMethods {
            aggregate_type: quote!(#aggregate_type),
            aggregate_id: quote!(match self { #(#aggregate_id_arms)* }),
            event_type: quote!(match self { #(#event_type_arms)* }),
            optional: quote!(#schema_version #topic #sequence #extra_methods),
            to_payload: quote! {
                __OutboxPayload::serialize(
                    self,
                    ::outbox_core::__private::serde_json::value::Serializer,
                )
            },
        },
    );

    Ok(quote! {
        #[doc(hidden)]
        const _: () = {
            #payload_mirror
            #(#decode_helpers)*

            #outbox_event

            #[automatically_derived]
            impl ::outbox_core::DecodeEvent for #ident {
                fn accepts(event_type: &str) -> bool {
                    ::core::matches!(event_type, #(#event_types)|*)
                }

                fn decode(
                    event_type: &str,
                    payload: &[u8],
                ) -> ::core::result::Result<Self, ::outbox_core::DecodeError> {
                    #decode_body
                }

                #decode_versioned
            }
        };
    })
}

/// A pattern for `variant` that binds `__outbox_field` to the value `access` points at (the
/// field itself, or the newtype's inner value), and the expression that borrows that value.
fn bind(variant: &Variant<'_>, access: Access<'_>) -> (TokenStream, TokenStream) {
    let ident = variant.ident;
    match access {
        Access::Field(field) => {
            let member = field.ident;
            (
                quote!(Self::#ident { #member: __outbox_field, .. }),
                quote!(__outbox_field),
            )
        }
        Access::Inner(member) => (
            quote!(Self::#ident(__outbox_field)),
            quote!(&__outbox_field.#member),
        ),
    }
}

/// `i64` from a sequence field of known type, borrowed by `place`; a type that is not a
/// `SequenceValue` is reported at the field's type.
fn sequence_from_field(field: &Field<'_>, place: TokenStream) -> TokenStream {
    let ty = field.ty;
    quote_spanned! {ty.span()=>
        <#ty as ::outbox_core::SequenceValue>::to_sequence(#place)
    }
}

/// `i64` from the sequence field `member` of a newtype variant's inner value.
fn sequence_from_inner(member: &Ident) -> TokenStream {
    quote_spanned! {member.span()=>
        ::outbox_core::SequenceValue::to_sequence(&__outbox_field.#member)
    }
}

fn option(value: Option<TokenStream>) -> TokenStream {
    match value {
        Some(value) => quote!(::core::option::Option::Some(#value)),
        None => quote!(::core::option::Option::None),
    }
}

/// `DecodeEvent::decode` of a tagged enum: the whole payload through the mirror's remote
/// `Deserialize` (exactly serde's reading of the tag), then a check that the tag names the
/// record's event type.
fn decode_tagged(ident: &Ident) -> TokenStream {
    let target = ident.unraw().to_string();
    let payload_error = payload_error(ident);
    let unknown_event_type = unknown_event_type(ident);
    quote! {
        if !<Self as ::outbox_core::DecodeEvent>::accepts(event_type) {
            return #unknown_event_type;
        }
        #[derive(::outbox_core::__private::serde::Deserialize)]
        #[serde(crate = "::outbox_core::__private::serde")]
        struct __OutboxTagged(#[serde(with = "__OutboxPayload")] #ident);
        let __outbox_decoded =
            ::outbox_core::__private::serde_json::from_slice::<__OutboxTagged>(payload)
                .map_err(#payload_error)?
                .0;
        let __outbox_found = ::outbox_core::OutboxEvent::event_type(&__outbox_decoded);
        if __outbox_found != event_type {
            return ::core::result::Result::Err(::outbox_core::DecodeError::Payload {
                event_type: ::std::borrow::ToOwned::to_owned(event_type),
                target: #target,
                source: <::outbox_core::__private::serde_json::Error
                    as ::outbox_core::__private::serde::de::Error>::custom(
                    ::std::format!(
                        "the payload's tag names the variant of event type `{}`, not `{}`",
                        __outbox_found, event_type
                    ),
                ),
            });
        }
        ::core::result::Result::Ok(__outbox_decoded)
    }
}

/// A copy of the enum, with the fields' `#[serde]` attributes and the honoured enum and variant
/// serde attributes, whose remote `Serialize` derive writes the payloads. Without an enum-level
/// `tag` it writes each variant untagged (a struct variant as the object of its fields, a
/// newtype variant as its inner value); with one it is tagged like serde's own derive, and also
/// derives the remote `Deserialize` that decoding uses. The user's enum itself needs no serde
/// derive.
fn payload_mirror(input: &Enum<'_>) -> TokenStream {
    let remote = LitStr::new(&input.ident.to_string(), input.ident.span());
    let variants = input.variants.iter().map(|variant| {
        let ident = variant.ident;
        let serde = variant.serde.iter().map(serde_attrs::Item::tokens);
        let serde = quote!(#(#[serde(#serde)])*);
        match &variant.shape {
            Shape::Struct(fields) => {
                let fields = fields.iter().map(field_declaration);
                quote!(#serde #ident { #(#fields),* })
            }
            Shape::Newtype(field) => {
                let field = field_declaration(field);
                quote!(#serde #ident(#field))
            }
        }
    });
    let (layout, derive) = match serde_attrs::layout(&input.serde) {
        Layout::Tagged => {
            let items = input.serde.iter().map(serde_attrs::Item::tokens);
            (
                quote!(#(#[serde(#items)])*),
                quote!(
                    ::outbox_core::__private::serde::Serialize,
                    ::outbox_core::__private::serde::Deserialize
                ),
            )
        }
        Layout::Untagged => {
            let fields = serde_attrs::find(&input.serde, "rename_all_fields").map(|item| {
                let tokens = item.tokens();
                quote!(#[serde(#tokens)])
            });
            (
                quote!(#[serde(untagged)] #fields),
                quote!(::outbox_core::__private::serde::Serialize),
            )
        }
    };
    quote! {
        #[derive(#derive)]
        #[serde(crate = "::outbox_core::__private::serde", remote = #remote)]
        #layout
        #[allow(dead_code)]
        enum __OutboxPayload {
            #(#variants,)*
        }
    }
}

/// A struct with the variant's fields (and their `#[serde]` attributes, and the variant's
/// `rename_all` or else the enum's `rename_all_fields`) that its payload is deserialized into
/// before the variant is built.
fn decode_helper(input: &Enum<'_>, variant: &Variant<'_>) -> TokenStream {
    let helper = decode_helper_ident(variant);
    let body = match &variant.shape {
        Shape::Struct(fields) => {
            let fields = fields.iter().map(field_declaration);
            quote!({ #(#fields),* })
        }
        Shape::Newtype(field) => {
            let field = field_declaration(field);
            quote!((#field);)
        }
    };
    let rename_all = match &variant.shape {
        Shape::Struct(_) => serde_attrs::find(&variant.serde, "rename_all")
            .map(serde_attrs::Item::tokens)
            .or_else(|| {
                serde_attrs::find(&input.serde, "rename_all_fields")
                    .map(|item| item.renamed("rename_all"))
            }),
        Shape::Newtype(_) => None,
    };
    let rename_all = rename_all.map(|tokens| quote!(#[serde(#tokens)]));
    quote! {
        #[derive(::outbox_core::__private::serde::Deserialize)]
        #[serde(crate = "::outbox_core::__private::serde")]
        #rename_all
        #[allow(non_camel_case_types)]
        struct #helper #body
    }
}

fn decode_helper_ident(variant: &Variant<'_>) -> Ident {
    format_ident!("__OutboxDecode{}", variant.ident)
}

fn field_declaration(field: &Field<'_>) -> TokenStream {
    let attrs = &field.serde_attrs;
    let ty = field.ty;
    match field.ident {
        Some(ident) => quote!(#(#attrs)* #ident: #ty),
        None => quote!(#(#attrs)* #ty),
    }
}

fn payload_error(ident: &Ident) -> TokenStream {
    let target = ident.unraw().to_string();
    quote! {
        |source| ::outbox_core::DecodeError::Payload {
            event_type: ::std::borrow::ToOwned::to_owned(event_type),
            target: #target,
            source,
        }
    }
}

fn unknown_event_type(ident: &Ident) -> TokenStream {
    let target = ident.unraw().to_string();
    quote! {
        ::core::result::Result::Err(::outbox_core::DecodeError::UnknownEventType {
            event_type: ::std::borrow::ToOwned::to_owned(event_type),
            target: #target,
        })
    }
}

/// Impls with the right signatures and no behavior, emitted next to compile errors.
fn fallback(node: &DeriveInput) -> TokenStream {
    let ident = &node.ident;
    let (impl_generics, ty_generics, where_clause) = node.generics.split_for_impl();
    let unreachable = quote!(::core::unreachable!());
    let outbox_event = outbox_event_impl(
        quote!(#impl_generics ::outbox_core::OutboxEvent for #ident #ty_generics #where_clause),
        EventMethods {
            aggregate_type: unreachable.clone(),
            aggregate_id: unreachable.clone(),
            event_type: unreachable.clone(),
            optional: TokenStream::new(),
            to_payload: unreachable,
        },
    );
    let tokens = quote! {
        #outbox_event

        #[automatically_derived]
        impl #impl_generics ::outbox_core::DecodeEvent for #ident #ty_generics #where_clause {
            fn accepts(_: &str) -> bool {
                ::core::unreachable!()
            }

            fn decode(
                _: &str,
                _: &[u8],
            ) -> ::core::result::Result<Self, ::outbox_core::DecodeError> {
                ::core::unreachable!()
            }
        }
    };
    // Best effort: a readable `crate = "..."` keeps the placeholders resolvable.
    let place = match node.data {
        syn::Data::Enum(_) => crate::attr::Place::Enum,
        _ => crate::attr::Place::Struct,
    };
    match crate::attr::parse(&node.attrs, place) {
        Ok(crate::attr::Attrs {
            krate: Some(path), ..
        }) => crate::krate::replace(tokens, &path),
        _ => tokens,
    }
}
