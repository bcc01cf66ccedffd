//! Parsing of `#[outbox(...)]` attributes into typed values, with spanned errors.

use syn::ext::IdentExt as _;
use syn::{Attribute, Error, Expr, ExprLit, Ident, Lit, LitInt, LitStr, Result, UnOp};

/// Where an `#[outbox(...)]` attribute is written; decides which keys are allowed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// On a struct.
    Struct,
    /// On an enum.
    Enum,
    /// On an enum variant.
    Variant,
    /// On a field of a struct or of a struct variant.
    Field,
    /// On the single field of a newtype variant.
    NewtypeField,
}

impl Place {
    fn keys(self) -> &'static [&'static str] {
        match self {
            Place::Struct => &[
                "aggregate_type",
                "event_type",
                "topic",
                "schema_version",
                "aggregate_id",
                "sequence",
                "upcast",
                "crate",
            ],
            Place::Enum => &[
                "aggregate_type",
                "topic",
                "schema_version",
                "aggregate_id",
                "sequence",
                "upcast",
                "crate",
            ],
            Place::Variant => &[
                "event_type",
                "topic",
                "schema_version",
                "aggregate_id",
                "sequence",
            ],
            Place::Field => &["aggregate_id", "sequence", "id", "key", "header"],
            Place::NewtypeField => &[],
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Place::Struct => "a struct",
            Place::Enum => "an enum",
            Place::Variant => "an enum variant",
            Place::Field => "a field",
            Place::NewtypeField => "the field of a newtype variant",
        }
    }
}

/// The `#[outbox(...)]` settings of one struct, enum, variant or field.
///
/// Which members can be set depends on the [`Place`]; the parser rejects the others.
#[derive(Default)]
pub(crate) struct Attrs {
    /// `aggregate_type = "account"`.
    pub aggregate_type: Option<LitStr>,
    /// `event_type = "AccountOpened"`.
    pub event_type: Option<LitStr>,
    /// `topic = "accounts.v1"`.
    pub topic: Option<LitStr>,
    /// `schema_version = 2`.
    pub schema_version: Option<SchemaVersion>,
    /// `aggregate_id = "field"` (struct, enum, variant).
    pub aggregate_id_field: Option<FieldName>,
    /// `sequence = "field"` (struct, enum, variant).
    pub sequence_field: Option<FieldName>,
    /// The `aggregate_id` keyword of a field's `#[outbox(aggregate_id)]`.
    pub aggregate_id_marker: Option<Ident>,
    /// The `sequence` keyword of a field's `#[outbox(sequence)]`.
    pub sequence_marker: Option<Ident>,
    /// The `id` keyword of a field's `#[outbox(id)]`: the field is the event id.
    pub id_marker: Option<Ident>,
    /// The `key` keyword of a field's `#[outbox(key)]`: the field is the broker record key.
    pub key_marker: Option<Ident>,
    /// A field's `#[outbox(header = "name")]`.
    pub header: Option<LitStr>,
    /// `upcast = path` (struct, enum): the function upcasting old payloads.
    pub upcast: Option<Box<syn::Path>>,
    /// `crate = "path"` (struct, enum): where `outbox_core` is reachable.
    pub krate: Option<Box<syn::Path>>,
}

/// A validated `schema_version = N` value.
pub(crate) struct SchemaVersion {
    /// The version, at least 1.
    pub value: i32,
}

/// A field named by a string, e.g. `aggregate_id = "account_id"`.
pub(crate) struct FieldName {
    /// The field, as an identifier spanned at the string literal (so that errors about it
    /// point at the attribute).
    pub ident: Ident,
    /// The string literal as written.
    pub lit: LitStr,
}

/// Parses every `#[outbox(...)]` among `attrs`, written at `place`.
pub(crate) fn parse(attrs: &[Attribute], place: Place) -> Result<Attrs> {
    let mut out = Attrs::default();
    for attr in attrs {
        if attr.path().is_ident("outbox") {
            parse_one(attr, place, &mut out)?;
        }
    }
    Ok(out)
}

fn parse_one(attr: &Attribute, place: Place, out: &mut Attrs) -> Result<()> {
    if place == Place::NewtypeField {
        return Err(Error::new_spanned(
            attr,
            "#[outbox(...)] is not allowed on the field of a newtype variant; name the inner \
             value's field on the variant or the enum instead, e.g. \
             #[outbox(aggregate_id = \"account_id\")]",
        ));
    }
    attr.parse_nested_meta(|meta| {
        let Some(key) = meta.path.get_ident() else {
            return Err(meta.error(unknown_key_message(place, &path_text(&meta.path))));
        };
        let name = key.to_string();
        if !place.keys().contains(&name.as_str()) {
            return Err(Error::new(key.span(), misplaced_key_message(place, &name)));
        }
        let duplicate = || Error::new(key.span(), format!("duplicate `{name}` attribute"));
        match name.as_str() {
            "aggregate_type" | "event_type" | "topic" => {
                let lit = string_value(&name, &meta.value()?.parse()?)?;
                if lit.value().is_empty() {
                    return Err(Error::new(
                        lit.span(),
                        format!("`{name}` must not be empty"),
                    ));
                }
                let slot = match name.as_str() {
                    "aggregate_type" => &mut out.aggregate_type,
                    "event_type" => &mut out.event_type,
                    _ => &mut out.topic,
                };
                set_once(slot, lit, duplicate)?;
            }
            "schema_version" => {
                let version = schema_version(&meta.value()?.parse()?)?;
                set_once(&mut out.schema_version, version, duplicate)?;
            }
            "aggregate_id" | "sequence" if place == Place::Field => {
                if meta.input.peek(syn::Token![=]) {
                    return Err(meta.error(format!(
                        "on a field, write `#[outbox({name})]` without a value"
                    )));
                }
                let slot = if name == "aggregate_id" {
                    &mut out.aggregate_id_marker
                } else {
                    &mut out.sequence_marker
                };
                set_once(slot, key.clone(), duplicate)?;
            }
            "aggregate_id" | "sequence" => {
                if !meta.input.peek(syn::Token![=]) {
                    return Err(meta.error(format!(
                        "expected `{name} = \"field_name\"` here, or put `#[outbox({name})]` on \
                         the field itself"
                    )));
                }
                let field = field_name(&name, &meta.value()?.parse()?)?;
                let slot = if name == "aggregate_id" {
                    &mut out.aggregate_id_field
                } else {
                    &mut out.sequence_field
                };
                set_once(slot, field, duplicate)?;
            }
            "id" | "key" => {
                if meta.input.peek(syn::Token![=]) {
                    return Err(meta.error(format!(
                        "write `#[outbox({name})]` without a value, on the field itself"
                    )));
                }
                let slot = if name == "id" {
                    &mut out.id_marker
                } else {
                    &mut out.key_marker
                };
                set_once(slot, key.clone(), duplicate)?;
            }
            "header" => {
                if !meta.input.peek(syn::Token![=]) {
                    return Err(meta.error(
                        "expected `header = \"header-name\"`: the name of the header this field \
                         is sent as",
                    ));
                }
                let lit = string_value(&name, &meta.value()?.parse()?)?;
                check_header_name(&lit)?;
                set_once(&mut out.header, lit, duplicate)?;
            }
            "upcast" => {
                let path = match meta.value()?.parse::<Expr>()? {
                    Expr::Path(path) if path.qself.is_none() => path.path,
                    Expr::Lit(ExprLit {
                        lit: Lit::Str(lit), ..
                    }) => lit.parse::<syn::Path>()?,
                    other => {
                        return Err(Error::new_spanned(
                            other,
                            "expected the path of a function, e.g. `upcast = upcast_account` \
                             (fn(&str, i32, serde_json::Value) -> Result<serde_json::Value, E>)",
                        ));
                    }
                };
                set_once(&mut out.upcast, Box::new(path), duplicate)?;
            }
            "crate" => {
                let lit = string_value(&name, &meta.value()?.parse()?)?;
                let path = lit.parse::<syn::Path>().map_err(|_| {
                    Error::new(
                        lit.span(),
                        format!(
                            "`{}` is not a path; expected e.g. `crate = \"my_events::outbox_core\"`",
                            lit.value()
                        ),
                    )
                })?;
                set_once(&mut out.krate, Box::new(path), duplicate)?;
            }
            _ => unreachable!("every key in Place::keys is handled"),
        }
        Ok(())
    })
}

/// Every key `#[outbox(...)]` knows.
const ALL_KEYS: &[&str] = &[
    "aggregate_type",
    "event_type",
    "topic",
    "schema_version",
    "aggregate_id",
    "sequence",
    "upcast",
    "crate",
    "id",
    "key",
    "header",
];

/// Header names the relay sets itself (a row header with one of these names is dropped), plus
/// the header carrying the broker key.
const RESERVED_HEADERS: &[&str] = &[
    "id",
    "eventType",
    "schemaVersion",
    "traceparent",
    "outbox-aggregate-seq",
    "outbox-key",
    "content-type",
];

fn check_header_name(lit: &LitStr) -> Result<()> {
    let name = lit.value();
    if name.is_empty() {
        return Err(Error::new(lit.span(), "`header` name must not be empty"));
    }
    if RESERVED_HEADERS.contains(&name.as_str()) || name.starts_with("ce_") {
        return Err(Error::new(
            lit.span(),
            format!(
                "header `{name}` is reserved: the relay sets it itself (`id`, `eventType`, \
                 `schemaVersion`, `traceparent`, `outbox-aggregate-seq`, `outbox-key`, \
                 `content-type`, `ce_*`); choose another name"
            ),
        ));
    }
    Ok(())
}

/// Stores `value` in `slot`; an attribute given twice is the error `duplicate` makes.
fn set_once<T>(slot: &mut Option<T>, value: T, duplicate: impl FnOnce() -> Error) -> Result<()> {
    if slot.is_some() {
        return Err(duplicate());
    }
    *slot = Some(value);
    Ok(())
}

fn misplaced_key_message(place: Place, name: &str) -> String {
    if !ALL_KEYS.contains(&name) {
        return unknown_key_message(place, name);
    }
    let hint = match (place, name) {
        (Place::Enum, "event_type") => {
            "; an enum has one event type per variant: put #[outbox(event_type = \"...\")] on \
             the variant"
        }
        (Place::Variant, "aggregate_type") => {
            "; all variants share the enum's aggregate type: put it on the enum"
        }
        (Place::Field, "upcast" | "crate") => "; put it on the struct or enum",
        (Place::Field, _) => "; put it on the struct, enum or variant",
        (Place::Struct | Place::Enum | Place::Variant, "id" | "key" | "header") => {
            "; put it on a field"
        }
        (Place::Variant, "upcast" | "crate") => "; put it on the enum",
        _ => "",
    };
    format!(
        "`{name}` is not allowed on {}{hint}; allowed here: {}",
        place.describe(),
        key_list(place)
    )
}

fn unknown_key_message(place: Place, name: &str) -> String {
    format!(
        "unknown outbox attribute `{name}`; expected one of: {}",
        key_list(place)
    )
}

fn key_list(place: Place) -> String {
    place
        .keys()
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn path_text(path: &syn::Path) -> String {
    path.segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect::<Vec<_>>()
        .join("::")
}

fn string_value(name: &str, expr: &Expr) -> Result<LitStr> {
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => Ok(lit.clone()),
        _ => Err(Error::new_spanned(
            expr,
            format!("expected a string literal, e.g. `{name} = \"...\"`"),
        )),
    }
}

fn field_name(name: &str, expr: &Expr) -> Result<FieldName> {
    let lit = string_value(name, expr)?;
    let text = lit.value();
    let bare = text.strip_prefix("r#").unwrap_or(&text);
    let not_a_field = || {
        Error::new(
            lit.span(),
            format!("`{text}` is not a field name; expected e.g. `{name} = \"account_id\"`"),
        )
    };
    let ident = if syn::parse_str::<Ident>(bare).is_ok() {
        Ident::new(bare, lit.span())
    } else if syn::parse::Parser::parse_str(Ident::parse_any, bare).is_ok()
        && !matches!(bare, "self" | "Self" | "super" | "crate" | "_")
    {
        // A keyword such as `type`: the field is written `r#type`.
        Ident::new_raw(bare, lit.span())
    } else {
        return Err(not_a_field());
    };
    Ok(FieldName { ident, lit })
}

fn schema_version(expr: &Expr) -> Result<SchemaVersion> {
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Int(lit), ..
        }) => {
            let value = parse_i32(lit)?;
            if value < 1 {
                return Err(Error::new(
                    lit.span(),
                    "`schema_version` must be at least 1",
                ));
            }
            Ok(SchemaVersion { value })
        }
        Expr::Unary(unary) if matches!(unary.op, UnOp::Neg(_)) => Err(Error::new_spanned(
            expr,
            "`schema_version` must be at least 1",
        )),
        _ => Err(Error::new_spanned(
            expr,
            "expected an integer literal, e.g. `schema_version = 2`",
        )),
    }
}

fn parse_i32(lit: &LitInt) -> Result<i32> {
    if !matches!(lit.suffix(), "" | "i32") {
        return Err(Error::new(
            lit.span(),
            "`schema_version` is an `i32`; write it without a suffix, e.g. `schema_version = 2`",
        ));
    }
    lit.base10_parse::<i32>()
        .map_err(|_| Error::new(lit.span(), "`schema_version` does not fit in an `i32`"))
}
