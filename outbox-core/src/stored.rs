//! An outbox event as the relay reads it back: from a table row, a pgoutput tuple or a logical
//! decoding message.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

/// A committed outbox event, read back for publishing.
///
/// Whatever the source (polling, pgoutput row, logical message), the relay sees the same fields,
/// named after the table's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// `id`: the event id, sent as the `id` header; consumers dedupe on it.
    pub id: Uuid,
    /// `aggregatetype`: routes the event (default topic `outbox.event.<aggregatetype>`).
    pub aggregate_type: String,
    /// `aggregateid`: the Kafka record key.
    pub aggregate_id: String,
    /// `type`: the event type name.
    pub event_type: String,
    /// `payload` as JSON text (PostgreSQL's rendering of the `jsonb`), `None` for SQL NULL.
    pub payload: Option<String>,
    /// `seq`: the table's insertion sequence (absent for logical messages).
    pub seq: Option<i64>,
    /// `created_at`: when the event was written.
    pub created_at: Option<DateTime<Utc>>,
    /// `tracingspancontext`: a W3C `traceparent` captured at write time.
    pub traceparent: Option<String>,
    /// `headers`: extra Kafka headers, in name order.
    pub headers: Vec<(String, String)>,
    /// `schema_version`: the payload schema version.
    pub schema_version: i32,
    /// `topic`: a per-event topic override.
    pub topic: Option<String>,
    /// `aggregate_seq`: the event's position in its aggregate's stream, if the writer set one.
    pub aggregate_seq: Option<i64>,
}

/// A row or message that cannot be turned into a [`StoredEvent`]: it is reported with this reason,
/// never silently skipped. The relay parks it, with the reason, from [`MalformedEvent::salvaged`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed outbox event{}: {reason}", id.map(|i| format!(" {i}")).unwrap_or_default())]
pub struct MalformedEvent {
    /// The event id, when it could be read.
    pub id: Option<Uuid>,
    /// What is wrong.
    pub reason: String,
    /// Every field that could be read, the others at their defaults (empty strings for the
    /// required text columns, the nil uuid for an unreadable `id`): what gets parked.
    pub salvaged: Box<StoredEvent>,
}

impl MalformedEvent {
    fn new(salvaged: StoredEvent, id_read: bool, reason: impl Into<String>) -> Self {
        Self {
            id: id_read.then_some(salvaged.id),
            reason: reason.into(),
            salvaged: Box::new(salvaged),
        }
    }
}

/// The lowest valid `schema_version`: versions count from 1 (the column's default).
pub const MIN_SCHEMA_VERSION: i32 = 1;

/// Checks a `schema_version` value: versions count from [`MIN_SCHEMA_VERSION`].
pub fn check_schema_version(version: i32) -> Result<i32, String> {
    if version >= MIN_SCHEMA_VERSION {
        Ok(version)
    } else {
        Err(format!(
            "schema_version {version} is below {MIN_SCHEMA_VERSION} (versions count from 1)"
        ))
    }
}

/// Parses the `headers` column's JSON text into name/value pairs (non-string values keep their
/// JSON text).
pub fn parse_headers(json: &str) -> Result<Vec<(String, String)>, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("headers are not JSON: {e}"))?;
    match value {
        serde_json::Value::Null => Ok(Vec::new()),
        serde_json::Value::Object(map) => Ok(map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect()),
        _ => Err("headers must be a JSON object".to_owned()),
    }
}

/// Parses a `timestamptz` in PostgreSQL's text output (`2026-11-22 10:00:00.123456+00`).
pub fn parse_timestamptz(text: &str) -> Option<DateTime<Utc>> {
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%#z", "%+"] {
        if let Ok(t) = DateTime::parse_from_str(text, fmt) {
            return Some(t.with_timezone(&Utc));
        }
    }
    None
}

impl StoredEvent {
    /// An event with the four required fields and every other one at the table's default:
    /// no payload, no `seq`, `created_at` or trace context, no headers, schema version 1, no
    /// topic override and no aggregate sequence. Set the others with struct update syntax:
    ///
    /// ```
    /// # use outbox_core::StoredEvent;
    /// let event = StoredEvent {
    ///     seq: Some(7),
    ///     ..StoredEvent::new(uuid::Uuid::nil(), "account", "42", "AccountOpened")
    /// };
    /// assert_eq!(event.schema_version, 1);
    /// ```
    pub fn new(
        id: Uuid,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
    ) -> Self {
        Self {
            id,
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload: None,
            seq: None,
            created_at: None,
            traceparent: None,
            headers: Vec::new(),
            schema_version: 1,
            topic: None,
            aggregate_seq: None,
        }
    }

    /// Builds an event from `(column name, text value)` pairs, as pgoutput sends an inserted row
    /// in text format. Unknown columns are ignored; the five Debezium columns are required.
    pub fn from_text_columns<'a>(
        columns: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Result<Self, MalformedEvent> {
        let mut id = None;
        let (mut aggregate_type, mut aggregate_id, mut event_type) = (None, None, None);
        let mut ev = StoredEvent::new(Uuid::nil(), "", "", "");
        let mut errors = Vec::new();
        for (name, value) in columns {
            match (name, value) {
                ("id", Some(v)) => match Uuid::parse_str(v) {
                    Ok(u) => id = Some(u),
                    Err(_) => errors.push(format!("id `{v}` is not a uuid")),
                },
                ("aggregatetype", v) => aggregate_type = v.map(str::to_owned),
                ("aggregateid", v) => aggregate_id = v.map(str::to_owned),
                ("type", v) => event_type = v.map(str::to_owned),
                ("payload", v) => ev.payload = v.map(str::to_owned),
                ("seq", Some(v)) => ev.seq = v.parse().ok(),
                ("created_at", Some(v)) => ev.created_at = parse_timestamptz(v),
                ("tracingspancontext", v) => ev.traceparent = v.map(str::to_owned),
                ("headers", Some(v)) => match parse_headers(v) {
                    Ok(h) => ev.headers = h,
                    Err(e) => errors.push(e),
                },
                ("schema_version", Some(v)) => match v.parse() {
                    Ok(n) => match check_schema_version(n) {
                        Ok(n) => ev.schema_version = n,
                        Err(e) => errors.push(e),
                    },
                    Err(_) => errors.push(format!("schema_version `{v}` is not an integer")),
                },
                ("topic", v) => ev.topic = v.map(str::to_owned),
                ("aggregate_seq", Some(v)) => ev.aggregate_seq = v.parse().ok(),
                _ => {}
            }
        }
        let id_read = id.is_some();
        match id {
            Some(id) => ev.id = id,
            // Present but not a uuid was reported above.
            None if !errors.iter().any(|e| e.starts_with("id ")) => {
                errors.push("column `id` is missing or null".to_owned())
            }
            None => {}
        }
        for (field, value, slot) in [
            ("aggregatetype", aggregate_type, &mut ev.aggregate_type),
            ("aggregateid", aggregate_id, &mut ev.aggregate_id),
            ("type", event_type, &mut ev.event_type),
        ] {
            match value {
                Some(v) => *slot = v,
                None => errors.push(format!("column `{field}` is missing or null")),
            }
        }
        if errors.is_empty() {
            Ok(ev)
        } else {
            Err(MalformedEvent::new(ev, id_read, errors.join("; ")))
        }
    }

    /// Builds an event from the content of a logical decoding message written in the
    /// `logical_message` write mode (see [`crate::WriteMode::LogicalMessage`]).
    pub fn from_logical_message(content: &[u8]) -> Result<Self, MalformedEvent> {
        #[derive(Deserialize)]
        struct Message<'a> {
            id: Uuid,
            aggregatetype: String,
            aggregateid: String,
            #[serde(rename = "type")]
            event_type: String,
            #[serde(borrow)]
            payload: Option<&'a RawValue>,
            #[serde(default)]
            tracingspancontext: Option<String>,
            #[serde(default)]
            headers: Option<serde_json::Map<String, serde_json::Value>>,
            #[serde(default)]
            schema_version: Option<i32>,
            #[serde(default)]
            topic: Option<String>,
            #[serde(default)]
            aggregate_seq: Option<i64>,
            #[serde(default)]
            created_at: Option<DateTime<Utc>>,
        }
        let m: Message<'_> = serde_json::from_slice(content).map_err(|e| {
            let (salvaged, id_read) = salvage_message(content);
            MalformedEvent::new(
                salvaged,
                id_read,
                format!("logical message is not an outbox event: {e}"),
            )
        })?;
        let schema_version = match check_schema_version(m.schema_version.unwrap_or(1)) {
            Ok(v) => v,
            Err(reason) => {
                let (salvaged, id_read) = salvage_message(content);
                return Err(MalformedEvent::new(salvaged, id_read, reason));
            }
        };
        Ok(StoredEvent {
            id: m.id,
            aggregate_type: m.aggregatetype,
            aggregate_id: m.aggregateid,
            event_type: m.event_type,
            payload: m
                .payload
                .map(|p| p.get().to_owned())
                .filter(|p| p != "null"),
            seq: None,
            created_at: m.created_at,
            traceparent: m.tracingspancontext,
            headers: m
                .headers
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => (k, s),
                    other => (k, other.to_string()),
                })
                .collect(),
            schema_version,
            topic: m.topic,
            aggregate_seq: m.aggregate_seq,
        })
    }
}

/// The fields of a malformed logical message that can still be read (for parking it), and
/// whether its `id` was among them.
fn salvage_message(content: &[u8]) -> (StoredEvent, bool) {
    let value: serde_json::Value = serde_json::from_slice(content).unwrap_or_default();
    let text = |field: &str| {
        value
            .get(field)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let id = value
        .get("id")
        .and_then(serde_json::Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok());
    let mut ev = StoredEvent::new(
        id.unwrap_or_default(),
        text("aggregatetype"),
        text("aggregateid"),
        text("type"),
    );
    ev.payload = value
        .get("payload")
        .filter(|p| !p.is_null())
        .map(serde_json::Value::to_string);
    (ev, id.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_debezium_columns_are_enough() {
        let ev = StoredEvent::from_text_columns([
            ("id", Some("0192f0c4-7f3a-7cc1-8f4e-4a3f6f0b6b01")),
            ("aggregatetype", Some("account")),
            ("aggregateid", Some("42")),
            ("type", Some("AccountOpened")),
            ("payload", Some(r#"{"a": 1}"#)),
        ])
        .unwrap();
        assert_eq!(ev.aggregate_type, "account");
        assert_eq!(ev.payload.as_deref(), Some(r#"{"a": 1}"#));
        assert_eq!(ev.schema_version, 1);
        assert!(ev.headers.is_empty());
    }

    #[test]
    fn all_columns_are_decoded() {
        let ev = StoredEvent::from_text_columns([
            ("id", Some("0192f0c4-7f3a-7cc1-8f4e-4a3f6f0b6b01")),
            ("aggregatetype", Some("account")),
            ("aggregateid", Some("42")),
            ("type", Some("AccountOpened")),
            ("payload", None),
            ("seq", Some("17")),
            ("created_at", Some("2026-11-22 10:00:00.123456+00")),
            ("headers", Some(r#"{"tenant": "t1", "n": 3}"#)),
            ("schema_version", Some("2")),
            ("topic", Some("accounts")),
            ("aggregate_seq", Some("5")),
        ])
        .unwrap();
        assert_eq!(ev.seq, Some(17));
        assert_eq!(
            ev.created_at.unwrap().to_rfc3339(),
            "2026-11-22T10:00:00.123456+00:00"
        );
        assert_eq!(
            ev.headers,
            vec![("n".into(), "3".into()), ("tenant".into(), "t1".into())]
        );
        assert_eq!(ev.schema_version, 2);
        assert_eq!(ev.topic.as_deref(), Some("accounts"));
        assert_eq!(ev.aggregate_seq, Some(5));
    }

    #[test]
    fn malformed_rows_say_why() {
        let e = StoredEvent::from_text_columns([("id", Some("nope"))]).unwrap_err();
        assert!(e.reason.contains("id"), "{e}");
        assert_eq!(e.id, None);
        assert!(e.salvaged.id.is_nil());
        let e = StoredEvent::from_text_columns([
            ("id", Some("0192f0c4-7f3a-7cc1-8f4e-4a3f6f0b6b01")),
            ("aggregatetype", Some("account")),
            ("type", Some("X")),
            ("headers", Some("[1]")),
        ])
        .unwrap_err();
        assert!(e.id.is_some());
        assert!(e.reason.contains("aggregateid"), "{e}");
        assert!(e.reason.contains("headers must be a JSON object"), "{e}");
        // What could be read is kept for parking.
        assert_eq!(e.salvaged.id, e.id.unwrap());
        assert_eq!(e.salvaged.aggregate_type, "account");
        assert_eq!(e.salvaged.event_type, "X");
        let e = StoredEvent::from_text_columns([
            ("id", Some("0192f0c4-7f3a-7cc1-8f4e-4a3f6f0b6b01")),
            ("aggregatetype", Some("account")),
            ("aggregateid", Some("1")),
            ("type", Some("X")),
            ("schema_version", Some("0")),
        ])
        .unwrap_err();
        assert!(e.reason.contains("schema_version 0"), "{e}");
    }

    #[test]
    fn malformed_messages_keep_what_can_be_read() {
        let e = StoredEvent::from_logical_message(
            br#"{"id":"0192f0c4-7f3a-7cc1-8f4e-4a3f6f0b6b01","aggregatetype":"a","aggregateid":"1","type":"T","payload":{"x":1},"headers":[1]}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.id.map(|i| i.to_string()).as_deref(),
            Some("0192f0c4-7f3a-7cc1-8f4e-4a3f6f0b6b01")
        );
        assert_eq!(e.salvaged.aggregate_id, "1");
        assert_eq!(e.salvaged.payload.as_deref(), Some(r#"{"x":1}"#));
        let e = StoredEvent::from_logical_message(b"not json").unwrap_err();
        assert_eq!(e.id, None);
        let e = StoredEvent::from_logical_message(
            br#"{"id":"0192f0c4-7f3a-7cc1-8f4e-4a3f6f0b6b01","aggregatetype":"a","aggregateid":"1","type":"T","schema_version":-2}"#,
        )
        .unwrap_err();
        assert!(e.reason.contains("schema_version -2"), "{e}");
    }

    #[test]
    fn logical_message_round_trip() {
        let ev = StoredEvent::from_logical_message(
            br#"{"id":"0192f0c4-7f3a-7cc1-8f4e-4a3f6f0b6b01","aggregatetype":"a","aggregateid":"1","type":"T","payload":{"x": [1, 2]},"headers":{"h":"v"},"schema_version":3}"#,
        )
        .unwrap();
        assert_eq!(ev.payload.as_deref(), Some(r#"{"x": [1, 2]}"#));
        assert_eq!(ev.headers, vec![("h".into(), "v".into())]);
        assert_eq!(ev.schema_version, 3);
        assert!(StoredEvent::from_logical_message(b"{}").is_err());
    }
}
