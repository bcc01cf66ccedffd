//! Checks of a parsed [`Input`] that span several attributes or fields: required settings,
//! aggregate id resolution, topic names, duplicate event types.

use crate::ast::{Enum, Input, Struct};
use crate::attr::Attrs;
use crate::diagnostics::Errors;
use crate::topic;
use std::collections::BTreeMap;
use syn::{Error, Ident, LitStr, Result};

impl Input<'_> {
    /// All problems of the input, each at its own span.
    pub(crate) fn validate(&self) -> Result<()> {
        let mut errors = Errors::default();
        match self {
            Input::Struct(input) => input.validate(&mut errors),
            Input::Enum(input) => input.validate(&mut errors),
        }
        errors.finish()
    }
}

impl Struct<'_> {
    fn validate(&self, errors: &mut Errors) {
        check_container(&self.attrs, self.ident, errors);
        errors.take(self.aggregate_id());
        errors.take(self.sequence());
        errors.take(crate::resolve::extras(self.ident, &self.fields));
    }
}

impl Enum<'_> {
    fn validate(&self, errors: &mut Errors) {
        check_container(&self.attrs, self.ident, errors);
        let mut event_types = BTreeMap::new();
        for variant in &self.variants {
            check_topic(variant.attrs.topic.as_ref(), errors);
            errors.take(variant.aggregate_id(self));
            errors.take(variant.sequence(self));
            if let crate::ast::Shape::Struct(fields) = &variant.shape {
                errors.take(crate::resolve::extras(variant.ident, fields));
            }
            let event_type = variant.event_type();
            if let Some(first) = event_types.get(&event_type) {
                let span = variant
                    .attrs
                    .event_type
                    .as_ref()
                    .map_or_else(|| variant.ident.span(), LitStr::span);
                errors.push(Error::new(
                    span,
                    format!(
                        "duplicate event type `{event_type}`: variant `{first}` already uses it; \
                         set a distinct #[outbox(event_type = \"...\")]"
                    ),
                ));
            } else {
                event_types.insert(event_type, variant.ident);
            }
        }
    }
}

fn check_container(attrs: &Attrs, ident: &Ident, errors: &mut Errors) {
    if attrs.aggregate_type.is_none() {
        errors.push(Error::new(
            ident.span(),
            format!(
                "missing aggregate type: add #[outbox(aggregate_type = \"...\")] to `{ident}`, \
                 e.g. #[outbox(aggregate_type = \"account\")]"
            ),
        ));
    }
    check_topic(attrs.topic.as_ref(), errors);
}

fn check_topic(topic: Option<&LitStr>, errors: &mut Errors) {
    if let Some(lit) = topic
        && let Err(message) = topic::check(&lit.value())
    {
        errors.push(Error::new(lit.span(), message));
    }
}
