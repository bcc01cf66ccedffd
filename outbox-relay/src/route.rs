//! Routing: which topic, key, value and headers an event is published with.
//!
//! Defaults follow Debezium's outbox event router, so consumers of a Debezium outbox keep working:
//! topic `outbox.event.<aggregatetype>`, record key = `aggregateid`, value = the payload JSON as
//! PostgreSQL renders it (a NULL payload gives a null value, key and headers kept), header `id` =
//! the event id. On top of that every record carries `eventType`, `schemaVersion`, the W3C
//! `traceparent` captured at write time, the per-aggregate sequence (`outbox-aggregate-seq`) when
//! the writer set one, the row's own headers, and CloudEvents binary-mode headers (`ce_*`).
//!
//! Topic choice, first match wins: a per-event-type route from the relay's configuration, the
//! row's `topic` column (e.g. `#[outbox(topic = "…")]`), the topic template. Splitting one
//! aggregate's events across topics gives up their relative order: Kafka orders records only
//! within one partition of one topic.
//!
//! Topic reach: rows choose their topic (the `topic` column, template values), so a writer could
//! make the relay publish anywhere its Kafka principal may write. Every routed topic must match
//! `route.allowed_topics`; by default that is exactly what the template and the routes can
//! render (`outbox.event.*` for the default template), so the `topic` column may only pick
//! topics inside that range unless an operator widens it. Kafka's internal `__…` topics are
//! refused unless a pattern names them literally. A refused event is parked with the reason.
//!
//! Value schemas (`[[route.value_schemas]]`, [`schemas`]): the payload of an event type with a
//! schema is encoded as Avro or checked against a JSON Schema and sent in the Confluent wire
//! format; an event whose payload does not fit is parked with the schema error.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use outbox_core::{StoredEvent, validate_topic};
use uuid::Uuid;

pub mod schemas;

pub use schemas::{SchemaSettingError, SchemaSetupError, ValueSchemaSettings, ValueSchemas};

/// The default topic template (Debezium's `route.topic.replacement`).
pub const DEFAULT_TOPIC_TEMPLATE: &str = "outbox.event.{aggregatetype}";

/// Header names the router sets; a row header with one of these names is not copied.
pub const RESERVED_HEADERS: &[&str] = &[
    "id",
    "eventType",
    "schemaVersion",
    "traceparent",
    "outbox-aggregate-seq",
    "outbox-aggregate-id",
    "ce_specversion",
    "ce_id",
    "ce_source",
    "ce_type",
    "ce_subject",
    "ce_time",
    "content-type",
];

/// A topic template or route that cannot produce legal topic names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid topic template `{template}`: {reason}")]
pub struct TemplateError {
    /// The template as configured.
    pub template: String,
    /// What is wrong with it.
    pub reason: String,
}

/// An event that cannot be routed (its rendered topic is not a legal Kafka topic name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {id} cannot be routed: {reason}")]
pub struct RouteError {
    /// The event id.
    pub id: Uuid,
    /// Why.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    AggregateType,
    EventType,
}

/// A pattern of `route.allowed_topics`: literal topic characters and `*`, which matches any run
/// (possibly empty) of legal topic characters.
///
/// Guarantee: a topic matches only if it has every literal part, in order, with the first at its
/// start and the last at its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    source: String,
    /// The literal parts between the `*`s (`a.*.b` → `["a.", ".b"]`).
    parts: Vec<String>,
}

impl TopicPattern {
    /// Parses a pattern such as `outbox.event.*` or `accounts.v1`.
    pub fn parse(pattern: &str) -> Result<Self, TemplateError> {
        let err = |reason: String| TemplateError {
            template: pattern.to_owned(),
            reason: format!("allowed topic pattern: {reason}"),
        };
        if pattern.is_empty() {
            return Err(err("must not be empty".to_owned()));
        }
        for literal in pattern.split('*').filter(|l| !l.is_empty()) {
            // Literal parts with the topic rules (dots alone are fine inside a pattern).
            validate_topic(&literal.replace('.', "x")).map_err(err)?;
        }
        Ok(Self {
            source: pattern.to_owned(),
            parts: pattern.split('*').map(str::to_owned).collect(),
        })
    }

    /// The pattern covering every topic `template` can render: each placeholder becomes `*`.
    pub fn of_template(template: &TopicTemplate) -> Self {
        let source: String = template
            .parts
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.as_str(),
                Part::AggregateType | Part::EventType => "*",
            })
            .collect();
        Self {
            parts: source.split('*').map(str::to_owned).collect(),
            source,
        }
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        let (first, rest) = self
            .parts
            .split_first()
            .expect("split yields one part at least");
        let Some(mut tail) = topic.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return tail.is_empty();
        };
        for part in middle {
            match tail.find(part.as_str()) {
                Some(at) => tail = &tail[at + part.len()..],
                None => return false,
            }
        }
        tail.ends_with(last.as_str())
    }

    /// Whether the pattern names Kafka-internal `__…` topics literally.
    fn names_internal_topics(&self) -> bool {
        self.parts[0].starts_with("__")
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// A parsed topic template: literal text with `{aggregatetype}` and `{type}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    source: String,
    parts: Vec<Part>,
}

impl TopicTemplate {
    /// Parses and validates a template. Placeholders: `{aggregatetype}` (alias
    /// `{aggregate_type}`) and `{type}` (alias `{event_type}`). Literal text must consist of legal
    /// topic characters, so the only way a rendered topic can be illegal is a bad value in a row.
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let err = |reason: String| TemplateError {
            template: template.to_owned(),
            reason,
        };
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| err("unclosed `{`".to_owned()))?;
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "aggregatetype" | "aggregate_type" => Part::AggregateType,
                "type" | "event_type" => Part::EventType,
                other => {
                    return Err(err(format!(
                        "unknown placeholder `{{{other}}}` (known: {{aggregatetype}}, {{type}})"
                    )));
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err(err("a topic template must not be empty".to_owned()));
        }
        for part in &parts {
            if let Part::Literal(text) = part {
                if text.contains('}') {
                    return Err(err("unmatched `}`".to_owned()));
                }
                // Check the literal's characters with the topic rules (placeholders aside).
                if let Err(reason) = validate_topic(&text.replace('.', "x")) {
                    return Err(err(reason));
                }
            }
        }
        let t = Self {
            source: template.to_owned(),
            parts,
        };
        if !t.has_placeholders() {
            validate_topic(&t.source).map_err(err)?;
        }
        Ok(t)
    }

    fn has_placeholders(&self) -> bool {
        self.parts.iter().any(|p| !matches!(p, Part::Literal(_)))
    }

    /// Renders the template for an event.
    pub fn render(&self, aggregate_type: &str, event_type: &str) -> String {
        let mut out = String::with_capacity(self.source.len() + 16);
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::AggregateType => out.push_str(aggregate_type),
                Part::EventType => out.push_str(event_type),
            }
        }
        out
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// Routing settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteSettings {
    /// The topic template (default `outbox.event.{aggregatetype}`).
    pub topic: String,
    /// Per-event-type topic templates, e.g. `AccountOpened = "accounts.opened"`.
    pub routes: BTreeMap<String, String>,
    /// Whether to add CloudEvents binary-mode headers (`ce_*`, `content-type`).
    pub cloudevents: bool,
    /// `binary` (attributes in `ce_*` headers, value = payload) or `structured` (value = a
    /// CloudEvents JSON envelope with the payload in `data`).
    pub cloudevents_mode: CloudEventsMode,
    /// The CloudEvents `source` attribute; `{aggregatetype}` is replaced.
    pub cloudevents_source: String,
    /// Topic patterns (`*` = any run of topic characters) every routed topic must match; an
    /// event routed elsewhere is parked. Empty (the default): what the template and the routes
    /// can render. A list in files, comma-separated in the environment and flags.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub allowed_topics: Vec<String>,
    /// Per-event-type value schemas (`[[route.value_schemas]]`): the payload is encoded as Avro
    /// or checked against a JSON Schema and sent in the Confluent wire format; event types
    /// without one keep the JSON value. Needs `[schema_registry]`.
    pub value_schemas: Vec<ValueSchemaSettings>,
}

/// A list of strings, from a list or from one comma-separated string (environment, flags).
fn list_or_comma_separated<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Text(String),
    }
    Ok(
        match <Either as serde::Deserialize>::deserialize(deserializer)? {
            Either::List(l) => l,
            Either::Text(t) => t
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        },
    )
}

/// How CloudEvents attributes travel (CloudEvents Kafka protocol binding).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloudEventsMode {
    /// `ce_*` headers; the value stays the bare payload (Debezium-compatible).
    #[default]
    Binary,
    /// The value is `{"specversion": "1.0", "id": …, "data": <payload>}` with content type
    /// `application/cloudevents+json`.
    Structured,
}

impl Default for RouteSettings {
    fn default() -> Self {
        Self {
            topic: DEFAULT_TOPIC_TEMPLATE.to_owned(),
            routes: BTreeMap::new(),
            cloudevents: true,
            cloudevents_mode: CloudEventsMode::Binary,
            cloudevents_source: "/outbox/{aggregatetype}".to_owned(),
            allowed_topics: Vec::new(),
            value_schemas: Vec::new(),
        }
    }
}

/// A Kafka record ready to be produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRecord {
    /// Destination topic.
    pub topic: String,
    /// Record key: the aggregate id, or the event's `outbox-key` header when it has one.
    pub key: String,
    /// Record value: the payload JSON (or, for an event type with a value schema, its
    /// Confluent wire-format encoding), or `None` for a null value.
    pub payload: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Record timestamp in milliseconds since the epoch (the event's creation time).
    pub timestamp_ms: Option<i64>,
}

/// Maps events to records. Built once from [`RouteSettings`] (and, with value schemas, the
/// relay's configuration: [`RelayConfig::router`](crate::config::RelayConfig::router)); routing itself never fails except for an
/// event whose values render an illegal topic name, or whose payload does not fit its value
/// schema.
#[derive(Debug, Clone)]
pub struct Router {
    template: TopicTemplate,
    routes: HashMap<String, TopicTemplate>,
    cloudevents: bool,
    cloudevents_mode: CloudEventsMode,
    cloudevents_source: String,
    /// `route.allowed_topics`, or the template's and routes' own patterns.
    allowed: Vec<TopicPattern>,
    /// Value schemas and their registry ([`RelayConfig::router`](crate::config::RelayConfig::router)); shared by clones, with the
    /// schema ids registered so far.
    schemas: Option<Arc<ValueSchemas>>,
}

impl Router {
    /// Validates the settings; every template error names the template.
    pub fn new(settings: &RouteSettings) -> Result<Self, TemplateError> {
        let routes = settings
            .routes
            .iter()
            .map(|(event_type, t)| {
                TopicTemplate::parse(t)
                    .map(|t| (event_type.clone(), t))
                    .map_err(|mut e| {
                        e.reason = format!("route for event type `{event_type}`: {}", e.reason);
                        e
                    })
            })
            .collect::<Result<HashMap<String, TopicTemplate>, _>>()?;
        let template = TopicTemplate::parse(&settings.topic)?;
        let allowed = if settings.allowed_topics.is_empty() {
            std::iter::once(&template)
                .chain(routes.values())
                .map(TopicPattern::of_template)
                .collect()
        } else {
            settings
                .allowed_topics
                .iter()
                .map(|p| TopicPattern::parse(p))
                .collect::<Result<_, _>>()?
        };
        Ok(Self {
            template,
            allowed,
            routes,
            cloudevents: settings.cloudevents,
            cloudevents_mode: settings.cloudevents_mode,
            cloudevents_source: settings.cloudevents_source.clone(),
            schemas: None,
        })
    }

    /// The topic an event goes to.
    pub fn topic_for(&self, event: &StoredEvent) -> Result<String, RouteError> {
        let topic = if let Some(route) = self.routes.get(&event.event_type) {
            route.render(&event.aggregate_type, &event.event_type)
        } else if let Some(topic) = &event.topic {
            topic.clone()
        } else {
            self.template
                .render(&event.aggregate_type, &event.event_type)
        };
        validate_topic(&topic).map_err(|reason| RouteError {
            id: event.id,
            reason: format!("topic `{topic}` is not a legal Kafka topic name: {reason}"),
        })?;
        if !self.allows(&topic) {
            let allowed: Vec<&str> = self.allowed.iter().map(TopicPattern::as_str).collect();
            return Err(RouteError {
                id: event.id,
                reason: format!(
                    "topic `{topic}` is not allowed: it matches none of route.allowed_topics [{}]; \
                     the event's `topic` column or values chose it — add a pattern to \
                     route.allowed_topics if the topic is meant",
                    allowed.join(", ")
                ),
            });
        }
        Ok(topic)
    }

    /// Whether `topic` may be published to: it matches an allowed pattern, and a Kafka-internal
    /// `__…` topic only through a pattern that names internal topics literally.
    pub fn allows(&self, topic: &str) -> bool {
        let internal = topic.starts_with("__");
        self.allowed
            .iter()
            .any(|p| p.matches(topic) && (!internal || p.names_internal_topics()))
    }

    /// The record for an event.
    pub fn route(&self, event: &StoredEvent) -> Result<OutboundRecord, RouteError> {
        let topic = self.topic_for(event)?;
        self.record(event, topic, None)
    }

    /// [`Router::route`], moving the payload into the record instead of copying it where the
    /// record carries it unchanged (no value schema, not structured CloudEvents): the event's
    /// `payload` is then `None` afterwards. An event that cannot be routed is left as it was
    /// (its payload still there, to be parked with it).
    pub fn route_moving_payload(
        &self,
        event: &mut StoredEvent,
    ) -> Result<OutboundRecord, RouteError> {
        let topic = self.topic_for(event)?;
        let structured = self.cloudevents && self.cloudevents_mode == CloudEventsMode::Structured;
        if structured || self.has_value_schema(&event.event_type) {
            return self.record(event, topic, None);
        }
        let payload = event.payload.take().map(String::into_bytes);
        self.record(event, topic, Some(payload))
    }

    /// The record for `event` bound for `topic`; `given` is its value when the caller moved it
    /// out of the event (only where it is sent unchanged, see [`Router::route_moving_payload`]).
    fn record(
        &self,
        event: &StoredEvent,
        topic: String,
        given: Option<Option<Vec<u8>>>,
    ) -> Result<OutboundRecord, RouteError> {
        let id = event.id.to_string();
        let mut headers: Vec<(String, Vec<u8>)> = Vec::with_capacity(12 + event.headers.len());
        headers.push(("id".into(), id.clone().into_bytes()));
        headers.push(("eventType".into(), event.event_type.clone().into_bytes()));
        headers.push((
            "schemaVersion".into(),
            event.schema_version.to_string().into_bytes(),
        ));
        if let Some(tp) = &event.traceparent {
            headers.push(("traceparent".into(), tp.clone().into_bytes()));
        }
        if let Some(seq) = event.aggregate_seq {
            headers.push(("outbox-aggregate-seq".into(), seq.to_string().into_bytes()));
        }
        let source = self
            .cloudevents_source
            .replace("{aggregatetype}", &event.aggregate_type);
        let time = event.created_at.map(rfc3339_micros);
        let mut content_type: &[u8] = b"application/json";
        let mut payload = match (given, &event.payload) {
            (Some(given), _) => given,
            (None, Some(p)) => match self.encode_value(event, &topic, p) {
                Some(encoded) => {
                    let (value, format) = encoded?;
                    content_type = format.content_type().as_bytes();
                    Some(value)
                }
                None => Some(p.clone().into_bytes()),
            },
            (None, None) => None,
        };
        match (self.cloudevents, self.cloudevents_mode) {
            (false, _) => {}
            (true, CloudEventsMode::Binary) => {
                headers.push(("ce_specversion".into(), b"1.0".to_vec()));
                headers.push(("ce_id".into(), id.into_bytes()));
                headers.push(("ce_source".into(), source.into_bytes()));
                headers.push(("ce_type".into(), event.event_type.clone().into_bytes()));
                headers.push(("ce_subject".into(), event.aggregate_id.clone().into_bytes()));
                if let Some(t) = time {
                    headers.push(("ce_time".into(), t.into_bytes()));
                }
                headers.push(("content-type".into(), content_type.to_vec()));
            }
            (true, CloudEventsMode::Structured) => {
                let mut envelope = serde_json::Map::new();
                envelope.insert("specversion".into(), "1.0".into());
                envelope.insert("id".into(), id.into());
                envelope.insert("source".into(), source.into());
                envelope.insert("type".into(), event.event_type.clone().into());
                envelope.insert("subject".into(), event.aggregate_id.clone().into());
                if let Some(t) = time {
                    envelope.insert("time".into(), t.into());
                }
                envelope.insert("datacontenttype".into(), "application/json".into());
                let data = match &event.payload {
                    // The payload is JSON text from PostgreSQL; embed it as is.
                    Some(p) => serde_json::from_str::<Box<serde_json::value::RawValue>>(p)
                        .map(|raw| serde_json::to_value(raw).unwrap_or(serde_json::Value::Null))
                        .map_err(|e| RouteError {
                            id: event.id,
                            reason: format!("payload is not valid JSON: {e}"),
                        })?,
                    None => serde_json::Value::Null,
                };
                envelope.insert("data".into(), data);
                payload = Some(serde_json::Value::Object(envelope).to_string().into_bytes());
                headers.push((
                    "content-type".into(),
                    b"application/cloudevents+json".to_vec(),
                ));
            }
        }
        for (name, value) in &event.headers {
            if RESERVED_HEADERS.contains(&name.as_str()) {
                tracing::debug!(event_id = %event.id, header = %name, "row header shadows a reserved header; not copied");
                continue;
            }
            headers.push((name.clone(), value.clone().into_bytes()));
        }
        // A key of the event's own (`outbox-key` row header) replaces the aggregate id as the
        // record key; the aggregate id then travels in a header of its own.
        let key = match event
            .headers
            .iter()
            .rev()
            .find(|(name, value)| name == outbox_core::KEY_HEADER && !value.is_empty())
        {
            Some((_, key)) if *key != event.aggregate_id => {
                headers.push((
                    outbox_core::HEADER_AGGREGATE_ID.into(),
                    event.aggregate_id.clone().into_bytes(),
                ));
                key.clone()
            }
            _ => event.aggregate_id.clone(),
        };
        Ok(OutboundRecord {
            topic,
            key,
            payload,
            headers,
            timestamp_ms: event.created_at.map(|t| t.timestamp_millis()),
        })
    }
}

/// `t` as RFC 3339 in UTC with microseconds (`2024-05-01T12:00:00.123456Z`), exactly as
/// `chrono`'s `to_rfc3339_opts(SecondsFormat::Micros, true)` writes it, without its formatting
/// machinery (the CloudEvents `ce_time` of every record); years outside 0–9999 and leap seconds
/// go through `chrono`.
fn rfc3339_micros(t: chrono::DateTime<chrono::Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let (year, nanos) = (t.year(), t.nanosecond());
    let Ok(year) = u32::try_from(year) else {
        return t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    };
    if year > 9999 || nanos >= 1_000_000_000 {
        return t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    }
    fn digits(out: &mut [u8], mut n: u32) {
        for d in out.iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    digits(&mut text[0..4], year);
    digits(&mut text[5..7], t.month());
    digits(&mut text[8..10], t.day());
    digits(&mut text[11..13], t.hour());
    digits(&mut text[14..16], t.minute());
    digits(&mut text[17..19], t.second());
    digits(&mut text[20..26], nanos / 1000);
    text.iter().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ce_time_is_written_as_chrono_writes_it() {
        use chrono::{TimeZone, Utc};
        let mut instants = vec![
            Utc.timestamp_opt(0, 0).unwrap(),
            Utc.timestamp_opt(1_700_000_000, 123_456_789).unwrap(),
            Utc.timestamp_opt(1_700_000_000, 999_999_999).unwrap(),
            Utc.timestamp_opt(1_700_000_000, 1_000).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(1, 2, 3, 4, 5, 6).unwrap(),
            Utc.with_ymd_and_hms(-1, 2, 3, 4, 5, 6).unwrap(),
            // A leap second as chrono represents it.
            Utc.timestamp_opt(1_483_228_799, 1_500_000_000).unwrap(),
        ];
        // Pseudo-random instants across years 1900–2300, to the nanosecond.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = (x % 12_600_000_000) as i64 - 2_208_988_800;
            instants.push(
                Utc.timestamp_opt(secs, (x >> 34) as u32 % 1_000_000_000)
                    .unwrap(),
            );
        }
        for t in instants {
            assert_eq!(
                rfc3339_micros(t),
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "{t:?}"
            );
        }
    }

    fn event(aggregate_type: &str, event_type: &str) -> StoredEvent {
        StoredEvent {
            id: Uuid::nil(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: "42".into(),
            event_type: event_type.into(),
            payload: Some(r#"{"a": 1}"#.into()),
            seq: Some(1),
            created_at: None,
            traceparent: None,
            headers: vec![("tenant".into(), "t1".into()), ("id".into(), "x".into())],
            schema_version: 1,
            topic: None,
            aggregate_seq: Some(3),
        }
    }

    #[test]
    fn debezium_defaults() {
        let r = Router::new(&RouteSettings::default()).unwrap();
        let rec = r.route(&event("Account", "AccountOpened")).unwrap();
        assert_eq!(rec.topic, "outbox.event.Account");
        assert_eq!(rec.key, "42");
        assert_eq!(rec.payload.as_deref(), Some(&br#"{"a": 1}"#[..]));
        let h = |n: &str| {
            rec.headers
                .iter()
                .filter(|(k, _)| k == n)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(h("id"), vec![Uuid::nil().to_string()]);
        assert_eq!(h("eventType"), vec!["AccountOpened"]);
        assert_eq!(h("ce_type"), vec!["AccountOpened"]);
        assert_eq!(h("ce_subject"), vec!["42"]);
        assert_eq!(h("outbox-aggregate-seq"), vec!["3"]);
        assert_eq!(h("tenant"), vec!["t1"]);
    }

    #[test]
    fn an_events_own_key_keys_the_record_and_the_aggregate_id_travels_beside_it() {
        let r = Router::new(&RouteSettings::default()).unwrap();
        let header = |rec: &OutboundRecord, n: &str| {
            rec.headers
                .iter()
                .filter(|(k, _)| k == n)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
                .collect::<Vec<_>>()
        };
        let mut e = event("acct", "Opened");
        e.headers
            .push((outbox_core::KEY_HEADER.into(), "tenant-7".into()));
        let rec = r.route(&e).unwrap();
        assert_eq!(rec.key, "tenant-7");
        assert_eq!(header(&rec, outbox_core::HEADER_AGGREGATE_ID), vec!["42"]);
        assert_eq!(header(&rec, outbox_core::KEY_HEADER), vec!["tenant-7"]);
        // A key equal to the aggregate id, an empty one, or none: keyed by the aggregate id,
        // no extra header; a row cannot forge the aggregate-id header.
        for own in ["42", ""] {
            let mut e = event("acct", "Opened");
            e.headers.push((outbox_core::KEY_HEADER.into(), own.into()));
            let rec = r.route(&e).unwrap();
            assert_eq!(rec.key, "42");
            assert!(header(&rec, outbox_core::HEADER_AGGREGATE_ID).is_empty());
        }
        let mut e = event("acct", "Opened");
        e.headers
            .push((outbox_core::HEADER_AGGREGATE_ID.into(), "forged".into()));
        let rec = r.route(&e).unwrap();
        assert_eq!(rec.key, "42");
        assert!(header(&rec, outbox_core::HEADER_AGGREGATE_ID).is_empty());
    }

    #[test]
    fn moving_the_payload_gives_the_record_route_gives() {
        let binary = Router::new(&RouteSettings::default()).unwrap();
        let mut e = event("acct", "Opened");
        let expected = binary.route(&e).unwrap();
        assert_eq!(binary.route_moving_payload(&mut e).unwrap(), expected);
        assert_eq!(e.payload, None, "moved, not copied");
        // Unroutable: the event is left whole, to be parked with its payload.
        let mut bad = event("orders/eu", "Opened");
        assert!(binary.route_moving_payload(&mut bad).is_err());
        assert_eq!(bad.payload.as_deref(), Some(r#"{"a": 1}"#));
        // Structured CloudEvents wrap the payload: the event keeps it.
        let mut s = RouteSettings::default();
        s.cloudevents_mode = CloudEventsMode::Structured;
        let structured = Router::new(&s).unwrap();
        let mut e = event("acct", "Opened");
        let expected = structured.route(&e).unwrap();
        assert_eq!(structured.route_moving_payload(&mut e).unwrap(), expected);
        assert_eq!(e.payload.as_deref(), Some(r#"{"a": 1}"#));
    }

    #[test]
    fn structured_cloudevents_wrap_the_payload() {
        let mut s = RouteSettings::default();
        s.cloudevents_mode = CloudEventsMode::Structured;
        let rec = Router::new(&s)
            .unwrap()
            .route(&event("acct", "Opened"))
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(rec.payload.as_deref().unwrap()).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "Opened");
        assert_eq!(v["subject"], "42");
        assert_eq!(v["source"], "/outbox/acct");
        assert_eq!(v["data"], serde_json::json!({"a": 1}));
        assert!(
            rec.headers
                .iter()
                .any(|(k, v)| k == "content-type" && v == b"application/cloudevents+json")
        );
        assert!(!rec.headers.iter().any(|(k, _)| k == "ce_type"));
    }

    #[test]
    fn templates_and_routes() {
        let mut s = RouteSettings::default();
        s.topic = "events.{aggregatetype}.{type}".into();
        s.routes.insert("Closed".into(), "closures".into());
        s.allowed_topics = vec!["events.*".into(), "closures".into(), "fixed".into()];
        let r = Router::new(&s).unwrap();
        assert_eq!(
            r.topic_for(&event("acct", "Opened")).unwrap(),
            "events.acct.Opened"
        );
        assert_eq!(r.topic_for(&event("acct", "Closed")).unwrap(), "closures");
        let mut e = event("acct", "Opened");
        e.topic = Some("fixed".into());
        assert_eq!(r.topic_for(&e).unwrap(), "fixed");
    }

    #[test]
    fn bad_templates_are_rejected() {
        for bad in [
            "",
            "a/{aggregatetype}",
            "x.{nope}",
            "x.{aggregatetype",
            "a}b",
            "..",
            "a b",
        ] {
            assert!(TopicTemplate::parse(bad).is_err(), "{bad}");
        }
        let mut s = RouteSettings::default();
        s.routes.insert("T".into(), "bad topic".into());
        let e = Router::new(&s).unwrap_err();
        assert!(e.reason.contains("`T`"), "{e}");
    }

    #[test]
    fn topic_patterns_match_as_globs() {
        let p = TopicPattern::parse("a.*.b*").unwrap();
        assert!(p.matches("a.x.b"));
        assert!(p.matches("a..b"));
        assert!(p.matches("a.x.y.bz"));
        assert!(!p.matches("a.x"));
        assert!(!p.matches("za.x.b"));
        let exact = TopicPattern::parse("accounts.v1").unwrap();
        assert!(exact.matches("accounts.v1"));
        assert!(!exact.matches("accounts.v10"));
        assert!(TopicPattern::parse("").is_err());
        assert!(TopicPattern::parse("a/b.*").is_err());
        let t = TopicTemplate::parse("x.{aggregatetype}.{type}").unwrap();
        assert_eq!(TopicPattern::of_template(&t).as_str(), "x.*.*");
    }

    #[test]
    fn only_allowed_topics_are_routed() {
        // Default: what the template and the routes render; the `topic` column stays inside.
        let mut s = RouteSettings::default();
        s.routes.insert("Closed".into(), "closures".into());
        let r = Router::new(&s).unwrap();
        assert!(r.topic_for(&event("acct", "Closed")).is_ok());
        let mut e = event("acct", "Opened");
        e.topic = Some("payments.commands".into());
        let err = r.topic_for(&e).unwrap_err();
        assert!(err.reason.contains("not allowed"), "{err}");
        assert!(err.reason.contains("outbox.event.*, closures"), "{err}");
        e.topic = Some("outbox.event.elsewhere".into());
        assert!(r.topic_for(&e).is_ok());
        // Kafka-internal topics only when named literally.
        let mut s = RouteSettings::default();
        s.topic = "{aggregatetype}".into();
        let r = Router::new(&s).unwrap();
        assert!(r.topic_for(&event("orders", "X")).is_ok());
        assert!(r.topic_for(&event("__consumer_offsets", "X")).is_err());
        // Configured: exactly those patterns.
        let mut s = RouteSettings::default();
        s.allowed_topics = vec!["outbox.event.*".into(), "accounts.v1".into()];
        let r = Router::new(&s).unwrap();
        let mut e = event("acct", "Opened");
        e.topic = Some("accounts.v1".into());
        assert!(r.topic_for(&e).is_ok());
        e.topic = Some("accounts.v2".into());
        assert!(r.topic_for(&e).is_err());
        s.allowed_topics = vec!["bad topic".into()];
        assert!(Router::new(&s).is_err());
    }

    #[test]
    fn allowed_topics_from_a_comma_separated_string() {
        let s: RouteSettings =
            serde_json::from_value(serde_json::json!({"allowed_topics": "a.*, b"})).unwrap();
        assert_eq!(s.allowed_topics, vec!["a.*".to_owned(), "b".to_owned()]);
        let s: RouteSettings =
            serde_json::from_value(serde_json::json!({"allowed_topics": ["a.*"]})).unwrap();
        assert_eq!(s.allowed_topics, vec!["a.*".to_owned()]);
    }

    #[test]
    fn illegal_rendered_topic_is_an_error_naming_the_event() {
        let r = Router::new(&RouteSettings::default()).unwrap();
        let e = r.route(&event("orders/eu", "X")).unwrap_err();
        assert!(e.reason.contains("outbox.event.orders/eu"), "{e}");
    }
}
