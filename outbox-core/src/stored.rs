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
///
/// The ISO output PostgreSQL sends (four-digit year, up to six fractional digits, an offset of
/// hours and optionally minutes and seconds) is read by hand; anything else goes through
/// `chrono`'s format parser, so both give the same instant for the same text.
pub fn parse_timestamptz(text: &str) -> Option<DateTime<Utc>> {
    if let Some(t) = parse_iso_timestamptz(text.as_bytes()) {
        return Some(t);
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%#z", "%+"] {
        if let Ok(t) = DateTime::parse_from_str(text, fmt) {
            return Some(t.with_timezone(&Utc));
        }
    }
    None
}

/// `YYYY-MM-DD HH:MM:SS[.f{1,9}]±HH[:MM[:SS]]`, PostgreSQL's ISO `DateStyle` output; `None` for
/// anything else (then [`parse_timestamptz`] falls back to `chrono`'s parser).
fn parse_iso_timestamptz(b: &[u8]) -> Option<DateTime<Utc>> {
    fn digits(b: &[u8]) -> Option<u32> {
        b.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    }
    if b.len() < 22
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b' '
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(
        i32::try_from(digits(&b[0..4])?).ok()?,
        digits(&b[5..7])?,
        digits(&b[8..10])?,
    )?;
    let (hour, minute, second) = (
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    );
    let mut rest = &b[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix(b".") {
        let n = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 9 {
            return None;
        }
        nanos = digits(&fraction[..n])? * 10u32.pow(9 - n as u32);
        rest = &fraction[n..];
    }
    let sign = match rest.first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let mut offset = 0i32;
    for (i, part) in rest[1..].split(|&c| c == b':').enumerate() {
        if i > 2 || part.len() != 2 {
            return None;
        }
        offset += i32::try_from(digits(part)?).ok()? * [3600, 60, 1][i];
    }
    let time = chrono::NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)?;
    let offset = chrono::FixedOffset::east_opt(sign * offset)?;
    date.and_time(time)
        .and_local_timezone(offset)
        .single()
        .map(|t| t.with_timezone(&Utc))
}

/// One column of an outbox row as a reader hands it to [`StoredEvent::from_columns`]: its text
/// rendering (pgoutput's text format, a column selected as `text`), or the value already typed,
/// as a binary column of the type the migrations give it arrives.
///
/// A typed value decodes to the same field as its text rendering would: reading a column in
/// binary or as text never changes whether a row is valid, nor the event it gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnValue<'a> {
    /// SQL NULL.
    Null,
    /// The value's text rendering.
    Text(&'a str),
    /// A `uuid` value.
    Uuid(Uuid),
    /// An integer value (`smallint`, `integer` or `bigint`).
    Int(i64),
    /// A `timestamptz` value.
    Timestamp(DateTime<Utc>),
    /// A value the reader could not read, with why (a type it does not decode, bytes that are
    /// not a valid value of the column's type): in a required or validated column it makes the
    /// row malformed, in an optional one (`seq`, `created_at`, `aggregate_seq`) it is read as
    /// absent, as an unparsable text value is.
    Unreadable(String),
}

impl<'a> ColumnValue<'a> {
    /// The text rendering, as PostgreSQL's text output of the value; `Err` with the reason for
    /// [`ColumnValue::Unreadable`].
    fn text(&self) -> Result<Option<std::borrow::Cow<'a, str>>, &str> {
        use std::borrow::Cow;
        Ok(Some(match self {
            ColumnValue::Null => return Ok(None),
            ColumnValue::Text(v) => Cow::Borrowed(*v),
            ColumnValue::Uuid(u) => Cow::Owned(u.to_string()),
            ColumnValue::Int(n) => Cow::Owned(n.to_string()),
            ColumnValue::Timestamp(t) => {
                Cow::Owned(t.format("%Y-%m-%d %H:%M:%S%.f+00").to_string())
            }
            ColumnValue::Unreadable(why) => return Err(why),
        }))
    }
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
    /// The same as [`StoredEvent::from_columns`] with every value as [`ColumnValue::Text`] or
    /// [`ColumnValue::Null`].
    pub fn from_text_columns<'a>(
        columns: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Result<Self, MalformedEvent> {
        Self::from_columns(
            columns
                .into_iter()
                .map(|(name, value)| (name, value.map_or(ColumnValue::Null, ColumnValue::Text))),
        )
    }

    /// Builds an event from `(column name, value)` pairs, each value as text or already typed
    /// (see [`ColumnValue`]). Unknown columns are ignored; the five Debezium columns (`id`,
    /// `aggregatetype`, `aggregateid`, `type`, `payload`) are required, the first four non-null.
    /// A row that is not a valid event — an `id` that is not a uuid, a required column null,
    /// `headers` that are not a JSON object, a `schema_version` below 1 or not an integer —
    /// comes back as a [`MalformedEvent`] naming every problem, with the fields that could be
    /// read; it is never dropped.
    pub fn from_columns<'a>(
        columns: impl IntoIterator<Item = (&'a str, ColumnValue<'a>)>,
    ) -> Result<Self, MalformedEvent> {
        let mut id = None;
        let (mut aggregate_type, mut aggregate_id, mut event_type) = (None, None, None);
        let mut ev = StoredEvent::new(Uuid::nil(), "", "", "");
        let mut errors = Vec::new();
        // Required columns whose problem is already in `errors`.
        let mut reported: Vec<&str> = Vec::new();
        for (name, value) in columns {
            // The typed values that need no text: what the migrations' column types give.
            match (name, &value) {
                ("id", ColumnValue::Uuid(u)) => {
                    id = Some(*u);
                    continue;
                }
                ("seq", ColumnValue::Int(n)) => {
                    ev.seq = Some(*n);
                    continue;
                }
                ("aggregate_seq", ColumnValue::Int(n)) => {
                    ev.aggregate_seq = Some(*n);
                    continue;
                }
                ("created_at", ColumnValue::Timestamp(t)) => {
                    ev.created_at = Some(*t);
                    continue;
                }
                ("schema_version", ColumnValue::Int(n)) => {
                    match i32::try_from(*n)
                        .map_err(|_| format!("schema_version `{n}` is not an integer"))
                        .and_then(check_schema_version)
                    {
                        Ok(n) => ev.schema_version = n,
                        Err(e) => errors.push(e),
                    }
                    continue;
                }
                _ => {}
            }
            let text = match value.text() {
                Ok(text) => text,
                Err(why) => {
                    if !matches!(name, "seq" | "created_at" | "aggregate_seq") {
                        errors.push(format!("column `{name}` cannot be read: {why}"));
                        reported.push(name);
                    }
                    continue;
                }
            };
            let owned = |v: &Option<std::borrow::Cow<'_, str>>| v.as_deref().map(str::to_owned);
            match (name, text.as_deref()) {
                ("id", Some(v)) => match Uuid::parse_str(v) {
                    Ok(u) => id = Some(u),
                    Err(_) => {
                        errors.push(format!("id `{v}` is not a uuid"));
                        reported.push(name);
                    }
                },
                ("aggregatetype", _) => aggregate_type = owned(&text),
                ("aggregateid", _) => aggregate_id = owned(&text),
                ("type", _) => event_type = owned(&text),
                ("payload", _) => ev.payload = owned(&text),
                ("seq", Some(v)) => ev.seq = v.parse().ok(),
                ("created_at", Some(v)) => ev.created_at = parse_timestamptz(v),
                ("tracingspancontext", _) => ev.traceparent = owned(&text),
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
                ("topic", _) => ev.topic = owned(&text),
                ("aggregate_seq", Some(v)) => ev.aggregate_seq = v.parse().ok(),
                _ => {}
            }
        }
        let id_read = id.is_some();
        match id {
            Some(id) => ev.id = id,
            // Present but not a uuid, or unreadable, was reported above.
            None if reported.contains(&"id") => {}
            None => errors.push("column `id` is missing or null".to_owned()),
        }
        for (field, value, slot) in [
            ("aggregatetype", aggregate_type, &mut ev.aggregate_type),
            ("aggregateid", aggregate_id, &mut ev.aggregate_id),
            ("type", event_type, &mut ev.event_type),
        ] {
            match value {
                Some(v) => *slot = v,
                None if reported.contains(&field) => {}
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

    /// What `chrono`'s format parser alone makes of `text` (the parser before the fast path).
    fn chrono_only(text: &str) -> Option<DateTime<Utc>> {
        ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%#z", "%+"]
            .iter()
            .find_map(|fmt| DateTime::parse_from_str(text, fmt).ok())
            .map(|t| t.with_timezone(&Utc))
    }

    #[test]
    fn the_iso_fast_path_reads_what_chrono_reads() {
        for text in [
            "2026-11-22 10:00:00+00",
            "2026-11-22 10:00:00.1+00",
            "2026-11-22 10:00:00.123456+00",
            "2026-11-22 10:00:00.000001-03",
            "2026-11-22 23:59:59.999999+05:30",
            "1999-02-28 00:00:00.5-09:30",
            "2024-02-29 12:34:56.78901+14",
        ] {
            let fast = parse_iso_timestamptz(text.as_bytes());
            assert!(fast.is_some(), "{text}");
            assert_eq!(fast, chrono_only(text), "{text}");
            assert_eq!(parse_timestamptz(text), fast, "{text}");
        }
        // Not the ISO output: left to chrono, which decides as before.
        for text in [
            "2026-11-22T10:00:00Z",
            "2026-11-22 10:00:00+0530",
            "12026-11-22 10:00:00+00",
            "2026-02-30 10:00:00+00",
            "2026-11-22 10:00:00",
            "2026-11-22 10:00:00.+00",
            "2026-11-22 1a:00:00+00",
            "0044-03-15 10:00:00+00 BC",
            "",
        ] {
            assert_eq!(parse_iso_timestamptz(text.as_bytes()), None, "{text}");
            assert_eq!(parse_timestamptz(text), chrono_only(text), "{text}");
        }
        assert!(parse_timestamptz("2026-11-22T10:00:00Z").is_some());
    }

    type TextRow = Vec<(&'static str, Option<&'static str>)>;
    type TypedRow = Vec<(&'static str, ColumnValue<'static>)>;

    /// A full row as text, and the same row with the typed columns typed.
    fn row_pair() -> (TextRow, TypedRow) {
        let id = "0192f0c4-7f3a-7cc1-8f4e-4a3f6f0b6b01";
        let text = vec![
            ("id", Some(id)),
            ("aggregatetype", Some("account")),
            ("aggregateid", Some("42")),
            ("type", Some("AccountOpened")),
            ("payload", Some(r#"{"a": 1}"#)),
            ("seq", Some("17")),
            ("created_at", Some("2026-11-22 10:00:00.123456+00")),
            ("tracingspancontext", None),
            ("headers", Some(r#"{"tenant": "t1"}"#)),
            ("schema_version", Some("2")),
            ("topic", None),
            ("aggregate_seq", Some("5")),
        ];
        let typed = text
            .iter()
            .map(|&(name, value)| {
                let typed = match (name, value) {
                    (_, None) => ColumnValue::Null,
                    ("id", Some(v)) => ColumnValue::Uuid(Uuid::parse_str(v).unwrap()),
                    ("seq" | "schema_version" | "aggregate_seq", Some(v)) => {
                        ColumnValue::Int(v.parse().unwrap())
                    }
                    ("created_at", Some(v)) => {
                        ColumnValue::Timestamp(parse_timestamptz(v).unwrap())
                    }
                    (_, Some(v)) => ColumnValue::Text(v),
                };
                (name, typed)
            })
            .collect();
        (text, typed)
    }

    #[test]
    fn typed_columns_give_the_event_their_text_gives() {
        let (text, typed) = row_pair();
        let from_text = StoredEvent::from_text_columns(text).unwrap();
        assert_eq!(StoredEvent::from_columns(typed.clone()).unwrap(), from_text);
        assert_eq!(from_text.seq, Some(17));
        assert_eq!(from_text.schema_version, 2);
        // A typed value where text is expected is read as its text rendering.
        let mut renamed = typed;
        renamed[2] = ("aggregateid", ColumnValue::Int(42));
        assert_eq!(StoredEvent::from_columns(renamed).unwrap(), from_text);
    }

    #[test]
    fn typed_columns_are_malformed_where_their_text_is() {
        let (text, typed) = row_pair();
        for (index, value, text_value, reason) in [
            (9, ColumnValue::Int(0), "0", "schema_version 0"),
            (
                9,
                ColumnValue::Int(1 << 40),
                "1099511627776",
                "is not an integer",
            ),
            (0, ColumnValue::Int(7), "7", "id `7` is not a uuid"),
        ] {
            let mut t = text.clone();
            t[index].1 = Some(text_value);
            let mut v = typed.clone();
            v[index].1 = value;
            let from_text = StoredEvent::from_text_columns(t).unwrap_err();
            let from_typed = StoredEvent::from_columns(v).unwrap_err();
            assert!(from_typed.reason.contains(reason), "{from_typed}");
            assert_eq!(from_typed, from_text);
        }
    }

    #[test]
    fn an_unreadable_value_is_malformed_where_required_and_absent_where_optional() {
        let (_, typed) = row_pair();
        let mut v = typed.clone();
        v[0].1 = ColumnValue::Unreadable("type BYTEA is not read".into());
        v[3].1 = ColumnValue::Unreadable("not valid UTF-8".into());
        let e = StoredEvent::from_columns(v).unwrap_err();
        assert_eq!(e.id, None);
        assert_eq!(
            e.reason,
            "column `id` cannot be read: type BYTEA is not read; \
             column `type` cannot be read: not valid UTF-8"
        );
        assert_eq!(e.salvaged.aggregate_id, "42");
        let mut v = typed;
        v[6].1 = ColumnValue::Unreadable("type TIMESTAMP is not read".into());
        let ev = StoredEvent::from_columns(v).unwrap();
        assert_eq!(ev.created_at, None);
        assert_eq!(ev.seq, Some(17));
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
