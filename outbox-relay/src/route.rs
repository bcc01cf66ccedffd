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

use std::collections::{BTreeMap, HashMap};

use outbox_core::{StoredEvent, validate_topic};
use uuid::Uuid;

/// The default topic template (Debezium's `route.topic.replacement`).
pub const DEFAULT_TOPIC_TEMPLATE: &str = "outbox.event.{aggregatetype}";

/// Header names the router sets; a row header with one of these names is not copied.
pub const RESERVED_HEADERS: &[&str] = &[
    "id",
    "eventType",
    "schemaVersion",
    "traceparent",
    "outbox-aggregate-seq",
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
        }
    }
}

/// A Kafka record ready to be produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRecord {
    /// Destination topic.
    pub topic: String,
    /// Record key: the aggregate id.
    pub key: String,
    /// Record value: the payload JSON, or `None` for a null value.
    pub payload: Option<String>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Record timestamp in milliseconds since the epoch (the event's creation time).
    pub timestamp_ms: Option<i64>,
}

/// Maps events to records. Built once from [`RouteSettings`]; routing itself never fails except
/// for an event whose values render an illegal topic name.
#[derive(Debug, Clone)]
pub struct Router {
    template: TopicTemplate,
    routes: HashMap<String, TopicTemplate>,
    cloudevents: bool,
    cloudevents_mode: CloudEventsMode,
    cloudevents_source: String,
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
            .collect::<Result<_, _>>()?;
        Ok(Self {
            template: TopicTemplate::parse(&settings.topic)?,
            routes,
            cloudevents: settings.cloudevents,
            cloudevents_mode: settings.cloudevents_mode,
            cloudevents_source: settings.cloudevents_source.clone(),
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
        Ok(topic)
    }

    /// The record for an event.
    pub fn route(&self, event: &StoredEvent) -> Result<OutboundRecord, RouteError> {
        let topic = self.topic_for(event)?;
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
        let time = event
            .created_at
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
        let mut payload = event.payload.clone();
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
                headers.push(("content-type".into(), b"application/json".to_vec()));
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
                payload = Some(serde_json::Value::Object(envelope).to_string());
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
        Ok(OutboundRecord {
            topic,
            key: event.aggregate_id.clone(),
            payload,
            headers,
            timestamp_ms: event.created_at.map(|t| t.timestamp_millis()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(rec.payload.as_deref(), Some(r#"{"a": 1}"#));
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
    fn structured_cloudevents_wrap_the_payload() {
        let mut s = RouteSettings::default();
        s.cloudevents_mode = CloudEventsMode::Structured;
        let rec = Router::new(&s)
            .unwrap()
            .route(&event("acct", "Opened"))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(rec.payload.as_deref().unwrap()).unwrap();
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
    fn illegal_rendered_topic_is_an_error_naming_the_event() {
        let r = Router::new(&RouteSettings::default()).unwrap();
        let e = r.route(&event("orders/eu", "X")).unwrap_err();
        assert!(e.reason.contains("outbox.event.orders/eu"), "{e}");
    }
}
