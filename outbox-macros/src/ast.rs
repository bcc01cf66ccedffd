//! The typed syntax tree of a `#[derive(OutboxEvent)]` input: the type's shape plus its parsed
//! `#[outbox(...)]` attributes.

use crate::attr::{self, Attrs, Place};
use crate::diagnostics::Errors;
use crate::serde_attrs;
use syn::ext::IdentExt as _;
use syn::{Attribute, Data, DeriveInput, Error, Fields, Ident, Result, Type};

/// A derive input that has the shape of an event type.
pub(crate) enum Input<'a> {
    /// A struct with named fields: one event type.
    Struct(Struct<'a>),
    /// An enum of struct and newtype variants: one event type per variant.
    Enum(Enum<'a>),
}

/// A struct event, e.g. `struct AccountOpened { account_id: Uuid, .. }`.
pub(crate) struct Struct<'a> {
    pub attrs: Attrs,
    pub ident: &'a Ident,
    pub fields: Vec<Field<'a>>,
}

/// An enum of events, e.g. `enum AccountEvent { Opened { .. }, Closed(AccountClosed) }`.
pub(crate) struct Enum<'a> {
    pub attrs: Attrs,
    /// The enum's honoured `#[serde(...)]` items (`tag`, `content`, `untagged`, `rename_all`,
    /// `rename_all_fields`).
    pub serde: Vec<serde_attrs::Item>,
    pub ident: &'a Ident,
    pub variants: Vec<Variant<'a>>,
}

/// One event of an [`Enum`].
pub(crate) struct Variant<'a> {
    pub attrs: Attrs,
    /// The variant's honoured `#[serde(...)]` items (`rename`, `alias`, `rename_all`).
    pub serde: Vec<serde_attrs::Item>,
    pub ident: &'a Ident,
    pub shape: Shape<'a>,
}

/// The payload-carrying shape of a [`Variant`].
pub(crate) enum Shape<'a> {
    /// `Opened { account_id: Uuid, .. }`: the payload is a JSON object of the fields.
    Struct(Vec<Field<'a>>),
    /// `Opened(AccountOpened)`: the payload is the inner value's JSON.
    Newtype(Box<Field<'a>>),
}

/// A field of a struct, a struct variant or a newtype variant.
pub(crate) struct Field<'a> {
    pub attrs: Attrs,
    /// The field's name; `None` for the field of a newtype variant.
    pub ident: Option<&'a Ident>,
    pub ty: &'a Type,
    /// The field's `#[serde(...)]` attributes, forwarded to the generated serde helpers.
    pub serde_attrs: Vec<&'a Attribute>,
}

impl<'a> Input<'a> {
    /// Reads `node`, rejecting shapes that cannot be events. Errors in separate places are
    /// reported together.
    pub(crate) fn from_syn(node: &'a DeriveInput) -> Result<Self> {
        if !node.generics.params.is_empty() {
            return Err(Error::new_spanned(
                &node.generics,
                "generic event types are not supported by #[derive(OutboxEvent)]; implement \
                 OutboxEvent and DecodeEvent by hand, or derive on a concrete type",
            ));
        }
        match &node.data {
            Data::Struct(data) => Struct::from_syn(node, &data.fields).map(Input::Struct),
            Data::Enum(data) => Enum::from_syn(node, data).map(Input::Enum),
            Data::Union(data) => Err(Error::new_spanned(
                data.union_token,
                "unions cannot derive OutboxEvent; use a struct or an enum",
            )),
        }
    }
}

impl<'a> Struct<'a> {
    fn from_syn(node: &'a DeriveInput, fields: &'a Fields) -> Result<Self> {
        let mut errors = Errors::default();
        let attrs = errors.take(attr::parse(&node.attrs, Place::Struct));
        let fields = match fields {
            Fields::Named(named) => named
                .named
                .iter()
                .filter_map(|field| errors.take(Field::from_syn(field, Place::Field)))
                .collect(),
            Fields::Unnamed(_) | Fields::Unit => {
                errors.push(Error::new_spanned(
                    &node.ident,
                    "an OutboxEvent struct needs named fields, e.g. \
                     `struct AccountOpened { account_id: Uuid }`",
                ));
                Vec::new()
            }
        };
        errors.finish()?;
        Ok(Struct {
            attrs: attrs.unwrap_or_default(),
            ident: &node.ident,
            fields,
        })
    }
}

impl<'a> Enum<'a> {
    fn from_syn(node: &'a DeriveInput, data: &'a syn::DataEnum) -> Result<Self> {
        let mut errors = Errors::default();
        let attrs = errors.take(attr::parse(&node.attrs, Place::Enum));
        if data.variants.is_empty() {
            errors.push(Error::new_spanned(
                &node.ident,
                "an OutboxEvent enum needs at least one variant",
            ));
        }
        let variants = data
            .variants
            .iter()
            .filter_map(|variant| errors.take(Variant::from_syn(variant)))
            .collect();
        errors.finish()?;
        Ok(Enum {
            attrs: attrs.unwrap_or_default(),
            serde: serde_attrs::honoured(&node.attrs, false),
            ident: &node.ident,
            variants,
        })
    }
}

impl<'a> Variant<'a> {
    fn from_syn(node: &'a syn::Variant) -> Result<Self> {
        let mut errors = Errors::default();
        let attrs = errors.take(attr::parse(&node.attrs, Place::Variant));
        let shape = match &node.fields {
            Fields::Named(named) => Some(Shape::Struct(
                named
                    .named
                    .iter()
                    .filter_map(|field| errors.take(Field::from_syn(field, Place::Field)))
                    .collect(),
            )),
            Fields::Unnamed(unnamed) if unnamed.unnamed.len() == 1 => errors
                .take(Field::from_syn(&unnamed.unnamed[0], Place::NewtypeField))
                .map(|field| Shape::Newtype(Box::new(field))),
            Fields::Unnamed(unnamed) => {
                errors.push(Error::new_spanned(
                    unnamed,
                    format!(
                        "tuple variant `{}` has {} fields; an event variant is either a struct \
                         variant `{0} {{ .. }}` or a newtype variant `{0}(Payload)`",
                        node.ident,
                        unnamed.unnamed.len()
                    ),
                ));
                None
            }
            Fields::Unit => {
                errors.push(Error::new_spanned(
                    &node.ident,
                    format!(
                        "unit variant `{}` carries no payload; an event variant is either a \
                         struct variant `{0} {{ .. }}` or a newtype variant `{0}(Payload)`",
                        node.ident
                    ),
                ));
                None
            }
        };
        errors.finish()?;
        Ok(Variant {
            attrs: attrs.unwrap_or_default(),
            serde: serde_attrs::honoured(&node.attrs, true),
            ident: &node.ident,
            shape: shape.expect("no error means the shape was read"),
        })
    }
}

impl<'a> Field<'a> {
    fn from_syn(node: &'a syn::Field, place: Place) -> Result<Self> {
        Ok(Field {
            attrs: attr::parse(&node.attrs, place)?,
            ident: node.ident.as_ref(),
            ty: &node.ty,
            serde_attrs: node
                .attrs
                .iter()
                .filter(|attr| attr.path().is_ident("serde"))
                .collect(),
        })
    }
}

impl Struct<'_> {
    /// The event type name: `event_type = "..."`, else the struct's name.
    pub(crate) fn event_type(&self) -> String {
        self.attrs
            .event_type
            .as_ref()
            .map_or_else(|| self.ident.unraw().to_string(), syn::LitStr::value)
    }
}

impl Variant<'_> {
    /// The event type name: `event_type = "..."`, else the variant's name.
    pub(crate) fn event_type(&self) -> String {
        self.attrs
            .event_type
            .as_ref()
            .map_or_else(|| self.ident.unraw().to_string(), syn::LitStr::value)
    }
}
