//! Which field holds an event's aggregate id and sequence, combining field markers
//! (`#[outbox(aggregate_id)]`) with named references (`#[outbox(aggregate_id = "field")]`).

use crate::ast::{Enum, Field, Shape, Struct, Variant};
use crate::attr::FieldName;
use syn::ext::IdentExt as _;
use syn::{Error, Ident, Result};

/// Where a struct variant or newtype variant keeps a value.
pub(crate) enum Access<'a> {
    /// A field of the struct variant.
    Field(&'a Field<'a>),
    /// A field of a newtype variant's inner value.
    Inner(&'a Ident),
}

/// The two per-event fields the derive looks up.
#[derive(Clone, Copy)]
enum Role {
    AggregateId,
    Sequence,
}

impl Role {
    fn key(self) -> &'static str {
        match self {
            Role::AggregateId => "aggregate_id",
            Role::Sequence => "sequence",
        }
    }

    fn marker<'f>(self, field: &'f Field<'_>) -> Option<&'f Ident> {
        match self {
            Role::AggregateId => field.attrs.aggregate_id_marker.as_ref(),
            Role::Sequence => field.attrs.sequence_marker.as_ref(),
        }
    }

    fn named(self, attrs: &crate::attr::Attrs) -> Option<&FieldName> {
        match self {
            Role::AggregateId => attrs.aggregate_id_field.as_ref(),
            Role::Sequence => attrs.sequence_field.as_ref(),
        }
    }
}

const MISSING_ID: &str = "missing aggregate id: mark a field with #[outbox(aggregate_id)] or set \
                          #[outbox(aggregate_id = \"field\")]";

impl<'a> Struct<'a> {
    /// The field holding the aggregate id.
    pub(crate) fn aggregate_id(&self) -> Result<&Field<'a>> {
        find(
            self.ident,
            &self.fields,
            self.attrs.aggregate_id_field.as_ref(),
            Role::AggregateId,
        )?
        .ok_or_else(|| Error::new(self.ident.span(), MISSING_ID))
    }

    /// The field holding the aggregate sequence, if any.
    pub(crate) fn sequence(&self) -> Result<Option<&Field<'a>>> {
        find(
            self.ident,
            &self.fields,
            self.attrs.sequence_field.as_ref(),
            Role::Sequence,
        )
    }
}

impl<'a> Variant<'a> {
    /// Where this variant keeps its aggregate id.
    pub(crate) fn aggregate_id(&'a self, parent: &'a Enum<'a>) -> Result<Access<'a>> {
        self.access(parent, Role::AggregateId)?.ok_or_else(|| {
            let hint = match self.shape {
                Shape::Struct(_) => {
                    "mark a field with #[outbox(aggregate_id)] or set #[outbox(aggregate_id = \
                     \"field\")] on the variant or the enum"
                }
                Shape::Newtype(_) => {
                    "set #[outbox(aggregate_id = \"field\")] on the variant or the enum, naming \
                     the inner value's field"
                }
            };
            Error::new(
                self.ident.span(),
                format!("missing aggregate id for variant `{}`: {hint}", self.ident),
            )
        })
    }

    /// Where this variant keeps its aggregate sequence, if anywhere.
    pub(crate) fn sequence(&'a self, parent: &'a Enum<'a>) -> Result<Option<Access<'a>>> {
        self.access(parent, Role::Sequence)
    }

    fn access(&'a self, parent: &'a Enum<'a>, role: Role) -> Result<Option<Access<'a>>> {
        let own = role.named(&self.attrs);
        let fields = match &self.shape {
            Shape::Newtype(_) => {
                return Ok(own
                    .or(role.named(&parent.attrs))
                    .map(|name| Access::Inner(&name.ident)));
            }
            Shape::Struct(fields) => fields,
        };
        if let Some(field) = find(self.ident, fields, own, role)? {
            return Ok(Some(Access::Field(field)));
        }
        let Some(inherited) = role.named(&parent.attrs) else {
            return Ok(None);
        };
        match by_name(fields, &inherited.ident) {
            Some(field) => Ok(Some(Access::Field(field))),
            None => Err(Error::new(
                self.ident.span(),
                format!(
                    "variant `{}` has no field `{}`, which the enum's #[outbox({} = {:?})] \
                     names; add it, or mark another field with #[outbox({2})]",
                    self.ident,
                    inherited.ident.unraw(),
                    role.key(),
                    inherited.lit.value(),
                ),
            )),
        }
    }
}

/// The field that `named` (on the type or variant `owner`) or a field marker selects for `role`;
/// errors when they disagree, repeat, or name a missing field.
fn find<'f, 'a>(
    owner: &Ident,
    fields: &'f [Field<'a>],
    named: Option<&FieldName>,
    role: Role,
) -> Result<Option<&'f Field<'a>>> {
    let key = role.key();
    let mut marked = fields
        .iter()
        .filter_map(|field| role.marker(field).map(|marker| (field, marker)));
    let first = marked.next();
    if let Some(named) = named {
        let field = by_name(fields, &named.ident).ok_or_else(|| {
            Error::new(
                named.lit.span(),
                format!("`{owner}` has no field `{}`", named.ident.unraw()),
            )
        })?;
        if let Some((_, marker)) = first {
            return Err(Error::new(
                marker.span(),
                format!(
                    "two {key} fields: #[outbox({key} = {:?})] on `{owner}` already names `{}`; \
                     keep only one",
                    named.lit.value(),
                    field_name(field),
                ),
            ));
        }
        return Ok(Some(field));
    }
    if let Some(((second, marker), (first, _))) = marked.next().zip(first) {
        return Err(Error::new(
            marker.span(),
            format!(
                "two {key} fields: `{}` and `{}` are both marked #[outbox({key})]; an event has \
                 exactly one",
                field_name(first),
                field_name(second),
            ),
        ));
    }
    Ok(first.map(|(field, _)| field))
}

fn by_name<'f, 'a>(fields: &'f [Field<'a>], name: &Ident) -> Option<&'f Field<'a>> {
    fields.iter().find(|field| {
        field
            .ident
            .is_some_and(|ident| ident.unraw() == name.unraw())
    })
}

fn field_name(field: &Field<'_>) -> String {
    field
        .ident
        .map_or_else(String::new, |ident| ident.unraw().to_string())
}

/// The fields marked `#[outbox(id)]`, `#[outbox(key)]` and `#[outbox(header = "...")]` of one
/// struct or struct variant.
pub(crate) struct Extras<'f, 'a> {
    /// The event id field.
    pub id: Option<&'f Field<'a>>,
    /// The broker key field.
    pub key: Option<&'f Field<'a>>,
    /// The header fields, with their header names, in field order.
    pub headers: Vec<(&'f syn::LitStr, &'f Field<'a>)>,
}

impl Extras<'_, '_> {
    /// No extras (a newtype variant).
    pub(crate) fn none() -> Self {
        Extras {
            id: None,
            key: None,
            headers: Vec::new(),
        }
    }
}

/// Reads the extras of `fields` (of the struct or variant `owner`); errors when a marker repeats
/// or two fields claim one header name.
pub(crate) fn extras<'f, 'a>(owner: &Ident, fields: &'f [Field<'a>]) -> Result<Extras<'f, 'a>> {
    let mut errors = crate::diagnostics::Errors::default();
    let mut single = |what: &str, pick: for<'x> fn(&'x Field<'a>) -> Option<&'x Ident>| {
        let mut marked = fields
            .iter()
            .filter_map(|field| pick(field).map(|marker| (field, marker)));
        let first = marked.next();
        for (second, marker) in marked {
            let (first, _) = first.expect("a second marked field means a first one");
            errors.push(Error::new(
                marker.span(),
                format!(
                    "two {what} fields in `{owner}`: `{}` and `{}` are both marked \
                     #[outbox({what})]; an event has at most one",
                    field_name(first),
                    field_name(second),
                ),
            ));
        }
        first.map(|(field, _)| field)
    };
    let id = single("id", |field| field.attrs.id_marker.as_ref());
    let key = single("key", |field| field.attrs.key_marker.as_ref());
    let mut headers: Vec<(&syn::LitStr, &Field<'a>)> = Vec::new();
    for field in fields {
        let Some(name) = &field.attrs.header else {
            continue;
        };
        if let Some((_, first)) = headers
            .iter()
            .find(|(seen, _)| seen.value() == name.value())
        {
            errors.push(Error::new(
                name.span(),
                format!(
                    "duplicate header `{}` in `{owner}`: field `{}` is already sent under that \
                     name",
                    name.value(),
                    field_name(first),
                ),
            ));
            continue;
        }
        headers.push((name, field));
    }
    errors.finish()?;
    Ok(Extras { id, key, headers })
}
