//! JSON → Avro: a JSON payload resolved against an Avro schema, then encoded as an Avro binary
//! datum.
//!
//! The JSON is read the way a person writes it, not in Avro's own JSON encoding: a union value
//! is the bare value (the first branch it fits is taken; `{"<branch type>": value}` is accepted
//! too), `bytes`/`fixed` are strings whose characters are code points 0–255 (as in Avro's JSON
//! encoding), and logical types take their natural JSON form besides the underlying number:
//! `date` an ISO date (`2024-05-01`), `timestamp-*` and `local-timestamp-*` an RFC 3339 date-time,
//! `time-*` `HH:MM:SS[.fff]`, `uuid` a UUID string. A record field absent from the JSON takes its
//! schema default; a JSON member the record does not declare is an error (it would be lost).
//! `decimal` and `duration` are not supported from JSON (an error names the field).
//!
//! Errors name the path and what was expected, never a value of the payload (they end up in
//! park reasons and logs); map keys in paths are shown as `[…]`.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::schema::{Name, Names, ResolvedSchema, UuidSchema};
use apache_avro::types::Value as Avro;
use serde_json::Value as Json;

/// Why a JSON value does not fit an Avro schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct AvroFitError {
    /// Where in the payload, as a JSON pointer-like path (`$.owner.name`, `$.items[2]`).
    pub path: String,
    /// What does not fit.
    pub reason: String,
}

/// Converts `json` to the Avro value of `schema`.
///
/// Guarantee: on success the value validates against `schema` (every named reference resolved
/// through the schema's own definitions); on failure the error names the path and the mismatch.
/// Resolves `schema` on every call: to convert many payloads, use [`AvroEncoder`].
pub fn json_to_avro(schema: &Schema, json: &Json) -> Result<Avro, AvroFitError> {
    AvroEncoder::new(schema.clone())
        .map_err(|e| AvroFitError {
            path: "$".into(),
            reason: format!("schema cannot be resolved: {e}"),
        })?
        .to_avro(json)
}

/// An Avro schema with its named types resolved once, ready to convert and encode any number of
/// payloads without resolving the schema again.
pub struct AvroEncoder {
    schema: Schema,
    /// Every named type of the schema by full name.
    names: Names,
}

impl AvroEncoder {
    /// Resolves `schema`'s named types.
    ///
    /// Guarantee: fails if a named reference does not resolve or a name is defined twice.
    pub fn new(schema: Schema) -> Result<Self, apache_avro::Error> {
        let names = ResolvedSchema::try_from(&schema)?
            .get_names()
            .iter()
            .map(|(name, s)| (name.clone(), (*s).clone()))
            .collect();
        Ok(Self { schema, names })
    }

    /// The schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// [`json_to_avro`] with the names resolved at [`Self::new`].
    pub fn to_avro(&self, json: &Json) -> Result<Avro, AvroFitError> {
        let mut path = String::from("$");
        convert(&self.schema, json, &self.names, None, &mut path)
    }

    /// Appends the Avro binary datum of `json` to `out`.
    ///
    /// Guarantee: what is appended is the datum the Apache Avro writer writes for the value
    /// [`Self::to_avro`] returns (which validates against the schema), and reads back with the
    /// schema; on failure `out` is unchanged.
    pub fn write(&self, json: &Json, out: &mut Vec<u8>) -> Result<(), AvroFitError> {
        let value = self.to_avro(json)?;
        let len = out.len();
        write_datum(&value, out).inspect_err(|_| out.truncate(len))
    }
}

/// Appends a zig-zag varint (Avro `int` and `long`).
fn put_long(n: i64, out: &mut Vec<u8>) {
    let mut v = ((n << 1) ^ (n >> 63)) as u64;
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    put_long(bytes.len() as i64, out);
    out.extend_from_slice(bytes);
}

/// The binary encoding of a value [`convert`] made. Such a value carries everything its encoding
/// needs (union branch and enum symbol indexes, record fields in schema order, UUIDs already in
/// the form of their schema), so no schema is consulted.
fn write_datum(value: &Avro, out: &mut Vec<u8>) -> Result<(), AvroFitError> {
    match value {
        Avro::Null => {}
        Avro::Boolean(b) => out.push(u8::from(*b)),
        Avro::Int(n) | Avro::Date(n) | Avro::TimeMillis(n) => put_long(i64::from(*n), out),
        Avro::Long(n)
        | Avro::TimeMicros(n)
        | Avro::TimestampMillis(n)
        | Avro::TimestampMicros(n)
        | Avro::TimestampNanos(n)
        | Avro::LocalTimestampMillis(n)
        | Avro::LocalTimestampMicros(n)
        | Avro::LocalTimestampNanos(n) => put_long(*n, out),
        Avro::Float(f) => out.extend_from_slice(&f.to_le_bytes()),
        Avro::Double(f) => out.extend_from_slice(&f.to_le_bytes()),
        Avro::Bytes(b) => put_bytes(b, out),
        Avro::String(s) => put_bytes(s.as_bytes(), out),
        Avro::Fixed(_, b) => out.extend_from_slice(b),
        Avro::Enum(i, _) => put_long(i64::from(*i), out),
        Avro::Union(i, v) => {
            put_long(i64::from(*i), out);
            write_datum(v, out)?;
        }
        Avro::Array(items) => {
            if !items.is_empty() {
                put_long(items.len() as i64, out);
                for item in items {
                    write_datum(item, out)?;
                }
            }
            out.push(0);
        }
        Avro::Map(entries) => {
            if !entries.is_empty() {
                put_long(entries.len() as i64, out);
                for (k, v) in entries {
                    put_bytes(k.as_bytes(), out);
                    write_datum(v, out)?;
                }
            }
            out.push(0);
        }
        Avro::Record(fields) => {
            for (_, v) in fields {
                write_datum(v, out)?;
            }
        }
        other => {
            return Err(fail(
                "$",
                format!("cannot encode a value of kind {other:?}"),
            ));
        }
    }
    Ok(())
}

fn fail(path: &str, reason: impl Into<String>) -> AvroFitError {
    AvroFitError {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn kind(json: &Json) -> &'static str {
    match json {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn lookup<'s>(names: &'s Names, name: &Name, namespace: Option<&str>) -> Option<&'s Schema> {
    names
        .get(name)
        .or_else(|| names.get(&name.fully_qualified_name(namespace)))
}

fn convert(
    schema: &Schema,
    json: &Json,
    names: &Names,
    namespace: Option<&str>,
    path: &mut String,
) -> Result<Avro, AvroFitError> {
    let mismatch = |path: &str, expected: &str| {
        fail(path, format!("expected {expected}, found {}", kind(json)))
    };
    Ok(match schema {
        Schema::Null => match json {
            Json::Null => Avro::Null,
            _ => return Err(mismatch(path, "null")),
        },
        Schema::Boolean => match json {
            Json::Bool(b) => Avro::Boolean(*b),
            _ => return Err(mismatch(path, "a boolean")),
        },
        Schema::Int => Avro::Int(int(json, path)?),
        Schema::Long => Avro::Long(long(json, path)?),
        Schema::Float => match json.as_f64() {
            Some(f) => Avro::Float(f as f32),
            None => return Err(mismatch(path, "a number (float)")),
        },
        Schema::Double => match json.as_f64() {
            Some(f) => Avro::Double(f),
            None => return Err(mismatch(path, "a number (double)")),
        },
        Schema::String => match json {
            Json::String(s) => Avro::String(s.clone()),
            _ => return Err(mismatch(path, "a string")),
        },
        Schema::Bytes => Avro::Bytes(latin1(json, path)?),
        Schema::Fixed(f) => {
            let bytes = latin1(json, path)?;
            if bytes.len() != f.size {
                return Err(fail(
                    path,
                    format!(
                        "fixed `{}` needs {} bytes, found {}",
                        f.name,
                        f.size,
                        bytes.len()
                    ),
                ));
            }
            Avro::Fixed(f.size, bytes)
        }
        Schema::Enum(e) => match json {
            Json::String(s) => match e.symbols.iter().position(|x| x == s) {
                Some(i) => Avro::Enum(i as u32, s.clone()),
                None => {
                    return Err(fail(
                        path,
                        format!(
                            "not a symbol of enum `{}` ({})",
                            e.name,
                            e.symbols.join(", ")
                        ),
                    ));
                }
            },
            _ => return Err(mismatch(path, &format!("a symbol of enum `{}`", e.name))),
        },
        Schema::Array(a) => match json {
            Json::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    out.push(convert(&a.items, item, names, namespace, path)?);
                    path.truncate(len);
                }
                Avro::Array(out)
            }
            _ => return Err(mismatch(path, "an array")),
        },
        Schema::Map(m) => match json {
            Json::Object(members) => {
                let mut out = HashMap::with_capacity(members.len());
                for (k, v) in members {
                    let len = path.len();
                    // Map keys are data: not shown.
                    path.push_str("[…]");
                    out.insert(k.clone(), convert(&m.types, v, names, namespace, path)?);
                    path.truncate(len);
                }
                Avro::Map(out)
            }
            _ => return Err(mismatch(path, "an object (map)")),
        },
        Schema::Union(u) => {
            let variants = u.variants();
            // `{"<type name>": value}`, Avro's own JSON encoding of a union branch.
            if let Json::Object(members) = json
                && members.len() == 1
            {
                let (tag, inner) = members.iter().next().expect("one member");
                if let Some(i) = variants
                    .iter()
                    .position(|v| branch_name(v) == Some(tag.as_str()))
                    && let Ok(v) = convert(&variants[i], inner, names, namespace, path)
                {
                    return Ok(Avro::Union(i as u32, Box::new(v)));
                }
            }
            let mut reasons = Vec::new();
            for (i, v) in variants.iter().enumerate() {
                match convert(v, json, names, namespace, path) {
                    Ok(value) => return Ok(Avro::Union(i as u32, Box::new(value))),
                    Err(e) => reasons.push(e.to_string()),
                }
            }
            return Err(fail(
                path,
                format!("fits no branch of the union: {}", reasons.join("; ")),
            ));
        }
        Schema::Record(r) => {
            let Json::Object(members) = json else {
                return Err(mismatch(path, &format!("an object (record `{}`)", r.name)));
            };
            let ns = r.name.namespace().or(namespace);
            for key in members.keys() {
                if !r.lookup.contains_key(key) {
                    return Err(fail(
                        path,
                        format!("member `{key}` is not a field of record `{}`", r.name),
                    ));
                }
            }
            let mut fields = Vec::with_capacity(r.fields.len());
            for field in &r.fields {
                let len = path.len();
                path.push('.');
                path.push_str(&field.name);
                let value = match (members.get(&field.name), &field.default) {
                    (Some(v), _) => convert(&field.schema, v, names, ns, path)?,
                    // Avro: the default of a union field is of its first branch.
                    (None, Some(d)) => match &field.schema {
                        Schema::Union(u) if !u.variants().is_empty() => {
                            Avro::Union(0, Box::new(convert(&u.variants()[0], d, names, ns, path)?))
                        }
                        other => convert(other, d, names, ns, path)?,
                    },
                    (None, None) => {
                        return Err(fail(path, "missing, and the field has no default"));
                    }
                };
                path.truncate(len);
                fields.push((field.name.clone(), value));
            }
            Avro::Record(fields)
        }
        Schema::Ref { name } => match lookup(names, name, namespace) {
            Some(target) => convert(target, json, names, namespace, path)?,
            None => return Err(fail(path, format!("unknown named type `{name}`"))),
        },
        Schema::Date => match json {
            Json::String(s) => {
                let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
                    .map_err(|e| fail(path, format!("not an ISO date: {e}")))?;
                let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch");
                Avro::Date((d - epoch).num_days() as i32)
            }
            _ => Avro::Date(int(json, path)?),
        },
        Schema::TimeMillis => match json {
            Json::String(s) => Avro::TimeMillis((time_of_day_micros(s, path)? / 1000) as i32),
            _ => Avro::TimeMillis(int(json, path)?),
        },
        Schema::TimeMicros => match json {
            Json::String(s) => Avro::TimeMicros(time_of_day_micros(s, path)?),
            _ => Avro::TimeMicros(long(json, path)?),
        },
        Schema::TimestampMillis => Avro::TimestampMillis(timestamp(json, path, Unit::Millis)?),
        Schema::TimestampMicros => Avro::TimestampMicros(timestamp(json, path, Unit::Micros)?),
        Schema::TimestampNanos => Avro::TimestampNanos(timestamp(json, path, Unit::Nanos)?),
        Schema::LocalTimestampMillis => {
            Avro::LocalTimestampMillis(timestamp(json, path, Unit::Millis)?)
        }
        Schema::LocalTimestampMicros => {
            Avro::LocalTimestampMicros(timestamp(json, path, Unit::Micros)?)
        }
        Schema::LocalTimestampNanos => {
            Avro::LocalTimestampNanos(timestamp(json, path, Unit::Nanos)?)
        }
        // In the form of the schema's underlying type, so encoding needs no schema.
        Schema::Uuid(inner) => match json {
            Json::String(s) => {
                let u =
                    uuid::Uuid::parse_str(s).map_err(|e| fail(path, format!("not a UUID: {e}")))?;
                match inner {
                    UuidSchema::String => Avro::String(u.hyphenated().to_string()),
                    UuidSchema::Bytes => Avro::Bytes(u.as_bytes().to_vec()),
                    UuidSchema::Fixed(_) => Avro::Fixed(16, u.as_bytes().to_vec()),
                }
            }
            _ => return Err(mismatch(path, "a UUID string")),
        },
        Schema::Decimal(_) | Schema::BigDecimal | Schema::Duration(_) => {
            return Err(fail(
                path,
                "the decimal, big-decimal and duration logical types are not supported from JSON",
            ));
        }
    })
}

/// The name a union branch is tagged with in Avro's JSON encoding.
fn branch_name(schema: &Schema) -> Option<&str> {
    Some(match schema {
        Schema::Null => "null",
        Schema::Boolean => "boolean",
        Schema::Int => "int",
        Schema::Long => "long",
        Schema::Float => "float",
        Schema::Double => "double",
        Schema::Bytes => "bytes",
        Schema::String => "string",
        Schema::Array(_) => "array",
        Schema::Map(_) => "map",
        Schema::Record(r) => r.name.name(),
        Schema::Enum(e) => e.name.name(),
        Schema::Fixed(f) => f.name.name(),
        Schema::Ref { name } => name.name(),
        _ => return None,
    })
}

fn long(json: &Json, path: &str) -> Result<i64, AvroFitError> {
    json.as_i64().ok_or_else(|| {
        fail(
            path,
            format!("expected an integer (long), found {}", describe(json)),
        )
    })
}

fn int(json: &Json, path: &str) -> Result<i32, AvroFitError> {
    let n = json.as_i64().ok_or_else(|| {
        fail(
            path,
            format!("expected an integer (int), found {}", describe(json)),
        )
    })?;
    i32::try_from(n).map_err(|_| fail(path, "the integer does not fit a 32-bit int"))
}

fn describe(json: &Json) -> String {
    match json {
        Json::Number(n) if n.is_f64() => "a fractional number".to_owned(),
        Json::Number(_) => "an integer out of range".to_owned(),
        other => kind(other).to_owned(),
    }
}

fn latin1(json: &Json, path: &str) -> Result<Vec<u8>, AvroFitError> {
    let Json::String(s) = json else {
        return Err(fail(
            path,
            format!("expected a string of bytes, found {}", kind(json)),
        ));
    };
    s.chars()
        .map(|c| {
            u8::try_from(u32::from(c)).map_err(|_| {
                fail(
                    path,
                    format!(
                        "a character is not a byte (code point {} > 255)",
                        u32::from(c)
                    ),
                )
            })
        })
        .collect()
}

fn time_of_day_micros(s: &str, path: &str) -> Result<i64, AvroFitError> {
    use chrono::Timelike;
    let t = chrono::NaiveTime::parse_from_str(s, "%H:%M:%S%.f")
        .map_err(|e| fail(path, format!("not a time of day (HH:MM:SS[.fff]): {e}")))?;
    Ok(i64::from(t.num_seconds_from_midnight()) * 1_000_000 + i64::from(t.nanosecond() / 1000))
}

enum Unit {
    Millis,
    Micros,
    Nanos,
}

fn timestamp(json: &Json, path: &str, unit: Unit) -> Result<i64, AvroFitError> {
    let Json::String(s) = json else {
        return long(json, path);
    };
    let t = chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.naive_utc())
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f"))
        .map_err(|e| fail(path, format!("not an RFC 3339 date-time: {e}")))?;
    let utc = t.and_utc();
    match unit {
        Unit::Millis => Ok(utc.timestamp_millis()),
        Unit::Micros => Ok(utc.timestamp_micros()),
        Unit::Nanos => utc
            .timestamp_nanos_opt()
            .ok_or_else(|| fail(path, "out of range for nanoseconds")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SCHEMA: &str = r#"{
        "type": "record", "name": "AccountOpened", "namespace": "com.example",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "owner", "type": {"type": "record", "name": "Owner", "fields": [
                {"name": "name", "type": "string"}
            ]}},
            {"name": "co_owner", "type": ["null", "Owner"], "default": null},
            {"name": "balance", "type": "long"},
            {"name": "rate", "type": "double", "default": 0.5},
            {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["CHECKING", "SAVINGS"]}},
            {"name": "tags", "type": {"type": "array", "items": "string"}},
            {"name": "limits", "type": {"type": "map", "values": "int"}},
            {"name": "opened_on", "type": {"type": "int", "logicalType": "date"}},
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "ref", "type": {"type": "string", "logicalType": "uuid"}},
            {"name": "note", "type": ["null", "string"], "default": null}
        ]
    }"#;

    fn payload() -> Json {
        json!({
            "id": "a-1",
            "owner": {"name": "Ada"},
            "co_owner": {"name": "Bob"},
            "balance": 12,
            "kind": "SAVINGS",
            "tags": ["x", "y"],
            "limits": {"daily": 500},
            "opened_on": "1970-01-11",
            "at": "1970-01-01T00:00:01.5Z",
            "ref": "67e55044-10b1-426f-9247-bb680e5fe0c8",
            "note": "hi"
        })
    }

    #[test]
    fn a_fitting_payload_encodes_and_decodes_back() {
        let schema = Schema::parse_str(SCHEMA).unwrap();
        let value = json_to_avro(&schema, &payload()).unwrap();
        let bytes = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .unwrap();
        let back = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut &bytes[..])
            .unwrap();
        let Avro::Record(fields) = back else { panic!() };
        let get = |n: &str| fields.iter().find(|(k, _)| k == n).unwrap().1.clone();
        assert_eq!(get("id"), Avro::String("a-1".into()));
        assert_eq!(get("rate"), Avro::Double(0.5));
        assert_eq!(get("kind"), Avro::Enum(1, "SAVINGS".into()));
        assert_eq!(get("opened_on"), Avro::Date(10));
        assert_eq!(get("at"), Avro::TimestampMillis(1500));
        assert_eq!(
            get("co_owner"),
            Avro::Union(
                1,
                Box::new(Avro::Record(vec![(
                    "name".into(),
                    Avro::String("Bob".into())
                )]))
            )
        );
        assert_eq!(
            get("note"),
            Avro::Union(1, Box::new(Avro::String("hi".into())))
        );
    }

    #[test]
    fn the_cached_encoder_writes_what_the_apache_writer_writes() {
        let schema = Schema::parse_str(SCHEMA).unwrap();
        let encoder = AvroEncoder::new(schema.clone()).unwrap();
        let mut p = payload();
        // One map entry: the order of map entries is free.
        *p.pointer_mut("/limits").unwrap() = json!({"daily": 500});
        for p in [p.clone(), {
            let mut q = p.clone();
            q["tags"] = json!([]);
            q["note"] = json!(null);
            q
        }] {
            let value = json_to_avro(&schema, &p).unwrap();
            let expected = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
                .build()
                .unwrap()
                .write_value_to_vec(value)
                .unwrap();
            let mut out = vec![9];
            encoder.write(&p, &mut out).unwrap();
            assert_eq!(out[1..], expected[..]);
        }
        let mut out = Vec::new();
        p["balance"] = json!("twelve");
        assert!(encoder.write(&p, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn misfits_name_the_path() {
        let schema = Schema::parse_str(SCHEMA).unwrap();
        let cases = [
            ("/balance", json!("twelve"), "$.balance"),
            ("/kind", json!("BROKERAGE"), "not a symbol"),
            ("/tags/1", json!(3), "$.tags[1]"),
            ("/owner/name", json!(null), "$.owner.name"),
        ];
        for (pointer, bad, expect) in cases {
            let mut p = payload();
            *p.pointer_mut(pointer).unwrap() = bad;
            let e = json_to_avro(&schema, &p).unwrap_err();
            assert!(e.to_string().contains(expect), "{pointer}: {e}");
            // No payload value in the message (it is logged and stored as the park reason).
            for value in ["twelve", "BROKERAGE"] {
                assert!(!e.to_string().contains(value), "{pointer}: {e}");
            }
        }
        let mut p = payload();
        p.as_object_mut().unwrap().remove("id");
        assert!(
            json_to_avro(&schema, &p)
                .unwrap_err()
                .to_string()
                .contains("$.id: missing")
        );
        let mut p = payload();
        p.as_object_mut().unwrap().insert("extra".into(), json!(1));
        assert!(
            json_to_avro(&schema, &p)
                .unwrap_err()
                .to_string()
                .contains("`extra`")
        );
        let big = Schema::parse_str(r#"{"type":"int"}"#).unwrap();
        assert!(json_to_avro(&big, &json!(1_i64 << 40)).is_err());
    }
}
