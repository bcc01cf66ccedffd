//! Encoding cost per event of each value-schema format: `cargo run --release -p outbox-schema
//! --example encode_cost [N]` encodes one 6-field payload N times (default 200 000) with each
//! format and prints the mean time per encoding and the value size.

use std::time::Instant;

use outbox_schema::{SchemaFormat, ValueSchema};

const PAYLOAD: &str = r#"{"id": "a-1042", "owner": "Ada Lovelace", "balance": 125000, "kind": "SAVINGS", "tags": ["new", "eu"], "note": null}"#;

const AVRO: &str = r#"{"type": "record", "name": "AccountOpened", "namespace": "acct",
  "fields": [
    {"name": "id", "type": "string"}, {"name": "owner", "type": "string"},
    {"name": "balance", "type": "long"},
    {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["CHECKING", "SAVINGS"]}},
    {"name": "tags", "type": {"type": "array", "items": "string"}},
    {"name": "note", "type": ["null", "string"], "default": null}]}"#;

const JSON_SCHEMA: &str = r#"{"title": "AccountOpened", "type": "object",
  "required": ["id", "owner", "balance", "kind", "tags"], "additionalProperties": false,
  "properties": {"id": {"type": "string"}, "owner": {"type": "string"},
    "balance": {"type": "integer"}, "kind": {"enum": ["CHECKING", "SAVINGS"]},
    "tags": {"type": "array", "items": {"type": "string"}}, "note": {"type": ["null", "string"]}}}"#;

const PROTO: &str = r#"syntax = "proto3";
package acct;
message AccountOpened {
  string id = 1; string owner = 2; int64 balance = 3; Kind kind = 4;
  repeated string tags = 5; optional string note = 6;
  enum Kind { CHECKING = 0; SAVINGS = 1; }
}"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u32 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200_000);
    println!("payload: {} bytes, {n} encodings each", PAYLOAD.len());
    for (format, text) in [
        (SchemaFormat::Avro, AVRO),
        (SchemaFormat::JsonSchema, JSON_SCHEMA),
        (SchemaFormat::Protobuf, PROTO),
    ] {
        let schema = ValueSchema::parse(format, text)?;
        let size = schema.encode(1, PAYLOAD)?.len();
        // Warm-up, then the measured run.
        for _ in 0..n / 10 {
            std::hint::black_box(schema.encode(1, std::hint::black_box(PAYLOAD))?);
        }
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(schema.encode(1, std::hint::black_box(PAYLOAD))?);
        }
        let per = start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
        println!(
            "{:<12} {per:>6.2} µs/event, {size}-byte value",
            format.name()
        );
    }
    Ok(())
}
