//! JSON → Protobuf: `.proto` text compiled to descriptors in pure Rust (`protox`, no `protoc`),
//! a JSON payload read into a message of the chosen type through those descriptors
//! (`prost-reflect`, the protobuf JSON mapping), then encoded as protobuf binary.
//!
//! The JSON is read with the [protobuf JSON mapping]: fields by their JSON name (`accountId`)
//! or their proto name (`account_id`); 64-bit integers as numbers or strings; enums by value
//! name or number; `bytes` as base64; well-known types in their JSON forms (`Timestamp` as
//! RFC 3339, `Duration` as `"1.5s"`, wrappers as bare values, `Struct`/`Value` as any JSON). A
//! member the message does not declare is an error (it would be lost); absent fields take their
//! defaults, as protobuf does.
//!
//! The `.proto` file may import the well-known types (`google/protobuf/*.proto`, which
//! Confluent-compatible registries know without references); other imports would need schema
//! references, which are not supported.
//!
//! Errors name the path and what was expected, never a value of the payload (they end up in park
//! reasons and logs); map keys in paths are shown as `[…]`.
//!
//! [protobuf JSON mapping]: https://protobuf.dev/programming-guides/json/

use prost::Message as _;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};

use crate::value::{EncodeError, SchemaError};
use crate::wire;

/// The name the schema text is compiled under (it appears in parse errors).
const FILE_NAME: &str = "value.proto";

/// A compiled protobuf value schema: the message type payloads are encoded as, and its index
/// path in the file (the Confluent message-index array).
#[derive(Debug, Clone)]
pub struct ProtobufSchema {
    message: MessageDescriptor,
    indexes: Vec<i32>,
}

/// Serves the schema text as `value.proto`; imports fall through to the next resolver.
struct Source(String);

impl FileResolver for Source {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if name == FILE_NAME {
            File::from_source(name, &self.0)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

impl ProtobufSchema {
    /// Compiles `text` (a whole `.proto` file) and picks `message`: its full name
    /// (`acct.v1.AccountOpened`), or its name relative to the file's package
    /// (`AccountOpened`, `Outer.Inner`); `None` picks the file's first message (as Confluent's
    /// serializers do).
    ///
    /// Guarantee: succeeds only if the file compiles (syntax, types, imports of well-known types
    /// only) and the message is declared in this file.
    pub fn compile(text: &str, message: Option<&str>) -> Result<Self, SchemaError> {
        Self::compile_inner(text, message).map_err(SchemaError::Protobuf)
    }

    fn compile_inner(text: &str, message: Option<&str>) -> Result<Self, String> {
        let mut resolver = ChainFileResolver::new();
        resolver.add(Source(text.to_owned()));
        resolver.add(GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(resolver);
        compiler.include_imports(true);
        compiler.open_file(FILE_NAME).map_err(|error| {
            let e = at_line(text, &error);
            if e.contains("not found") && e.contains("import") {
                format!(
                    "{e} (only google/protobuf/*.proto imports are supported: schema references are not)"
                )
            } else {
                e
            }
        })?;
        let pool = compiler.descriptor_pool();
        let file = pool
            .get_file_by_name(FILE_NAME)
            .expect("the compiled file is in its pool");
        let descriptor = match message {
            None => file
                .messages()
                .next()
                .ok_or_else(|| "the file declares no message".to_owned())?,
            Some(name) => find(&pool, file.package_name(), name)
                .filter(|m| m.parent_file().name() == FILE_NAME)
                .ok_or_else(|| {
                    format!(
                        "message `{name}` is not declared in the file (declared: {})",
                        {
                            let mut all = Vec::new();
                            for m in file.messages() {
                                list(&m, &mut all);
                            }
                            all.join(", ")
                        }
                    )
                })?,
        };
        if descriptor.is_map_entry() {
            return Err(format!(
                "`{}` is a map entry, not a message",
                descriptor.full_name()
            ));
        }
        // The path in the file descriptor alternates field numbers and indexes:
        // [4 (message_type), i, 3 (nested_type), j, …].
        let indexes = descriptor
            .path()
            .iter()
            .skip(1)
            .step_by(2)
            .copied()
            .collect();
        Ok(Self {
            message: descriptor,
            indexes,
        })
    }

    /// The message type payloads are encoded as.
    pub fn message(&self) -> &MessageDescriptor {
        &self.message
    }

    /// The message's index path in its file: `[i]` for the i-th top-level message, `[i, j]`
    /// for the j-th message nested in it, and so on.
    pub fn indexes(&self) -> &[i32] {
        &self.indexes
    }

    /// Appends the message-index array and the protobuf binary of the JSON text `payload` to
    /// `out`.
    ///
    /// Guarantee: on success `out` gained what [`decode`] reads back into the same message;
    /// on failure `out` is unchanged and the error ([`EncodeError::NotJson`] or
    /// [`EncodeError::Protobuf`]) names the path and the mismatch, never a value of the payload.
    pub fn encode_into(&self, payload: &str, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let message = self.read_json(payload)?;
        wire::encode_message_indexes(&self.indexes, out);
        message
            .encode(out)
            .expect("a Vec grows to take any message");
        Ok(())
    }

    fn read_json(&self, payload: &str) -> Result<DynamicMessage, EncodeError> {
        let misfit = |at: &str, e: serde_json::Error| {
            let reason = format!("{at}: {}", redact(&e.to_string()));
            if e.is_syntax() || e.is_eof() {
                EncodeError::NotJson(reason)
            } else {
                EncodeError::Protobuf {
                    message: self.message.full_name().to_owned(),
                    reason,
                }
            }
        };
        let mut json = serde_json::Deserializer::from_str(payload);
        let mut track = serde_path_to_error::Track::new();
        let options = DeserializeOptions::new().deny_unknown_fields(true);
        let message = DynamicMessage::deserialize_with_options(
            self.message.clone(),
            serde_path_to_error::Deserializer::new(&mut json, &mut track),
            &options,
        )
        .map_err(|e| misfit(&shown_path(&self.message, &track.path()), e))?;
        json.end().map_err(|e| misfit("$", e))?;
        Ok(message)
    }
}

/// A compile error with the line and column of its first source span in `text`, when it has
/// one in the schema file itself.
fn at_line(text: &str, error: &protox::Error) -> String {
    let span = (error.file() == Some(FILE_NAME))
        .then(|| miette::Diagnostic::labels(error))
        .flatten()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset());
    match span {
        Some(offset) if offset <= text.len() => {
            let before = &text[..offset];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {error}")
        }
        _ => error.to_string(),
    }
}

/// Where a path of the payload leads, for [`shown_path`].
enum At {
    /// A message: keys are its field names.
    Message(MessageDescriptor),
    /// A map field: keys are data.
    Map(Kind),
    /// A repeated field.
    List(Kind),
    /// A scalar, or a well-known type with a JSON form of its own (`Struct` keys are data).
    Opaque,
}

fn at_kind(kind: Kind) -> At {
    match kind {
        Kind::Message(m) if !m.full_name().starts_with("google.protobuf.") => At::Message(m),
        _ => At::Opaque,
    }
}

/// The payload path of an error (`$.lines[0].qty`), with map keys shown as `[…]`: they are data,
/// unlike field names.
fn shown_path(message: &MessageDescriptor, path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::from("$");
    let mut at = At::Message(message.clone());
    for segment in path.iter() {
        at = match (segment, at) {
            (Segment::Map { key }, At::Message(m)) => {
                out.push('.');
                out.push_str(key);
                match m
                    .get_field_by_json_name(key)
                    .or_else(|| m.get_field_by_name(key))
                {
                    Some(f) if f.is_map() => match f.kind() {
                        Kind::Message(entry) => At::Map(entry.map_entry_value_field().kind()),
                        _ => At::Opaque,
                    },
                    Some(f) if f.is_list() => At::List(f.kind()),
                    Some(f) => at_kind(f.kind()),
                    None => At::Opaque,
                }
            }
            (Segment::Map { .. }, At::Map(kind)) => {
                out.push_str("[…]");
                at_kind(kind)
            }
            (Segment::Seq { index }, At::List(kind)) => {
                out.push_str(&format!("[{index}]"));
                at_kind(kind)
            }
            (Segment::Seq { index }, _) => {
                out.push_str(&format!("[{index}]"));
                At::Opaque
            }
            (_, _) => {
                out.push_str("[…]");
                At::Opaque
            }
        };
    }
    out
}

/// The message `name` (full, or relative to `package`).
fn find(pool: &DescriptorPool, package: &str, name: &str) -> Option<MessageDescriptor> {
    let name = name.strip_prefix('.').unwrap_or(name);
    pool.get_message_by_name(name).or_else(|| {
        (!package.is_empty())
            .then(|| pool.get_message_by_name(&format!("{package}.{name}")))
            .flatten()
    })
}

fn list(message: &MessageDescriptor, out: &mut Vec<String>) {
    if message.is_map_entry() {
        return;
    }
    out.push(message.full_name().to_owned());
    for child in message.child_messages() {
        list(&child, out);
    }
}

/// `message` without the payload values serde and prost-reflect quote: every quoted or
/// back-ticked part is dropped, except the field names of unknown-field errors (names, not
/// values).
fn redact(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(['"', '\'', '`']) {
        let quote = rest[start..].chars().next().expect("found above");
        let Some(len) = rest[start + 1..].find(quote) else {
            break;
        };
        let before = &rest[..start];
        let quoted = &rest[start..start + len + 2];
        let keep = before.ends_with("field name ") || before.ends_with("unknown field ");
        out.push_str(if keep { before } else { before.trim_end() });
        if keep {
            out.push_str(quoted);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// Reads a protobuf value body (after the 5-byte header, see [`wire::decode`]): the
/// message-index array, then the message of the type it names in the file of `schema`. What a
/// consumer does with the schema fetched by the id in the header.
///
/// Guarantee: fails, without panicking, on a body whose index array is malformed or names no
/// message of the file, or whose bytes are not a valid message of that type.
pub fn decode(schema: &ProtobufSchema, body: &[u8]) -> Result<DynamicMessage, DecodeError> {
    let (indexes, bytes) =
        wire::decode_message_indexes(body).map_err(|e| DecodeError(e.to_string()))?;
    let file = schema.message.parent_file();
    let mut found: Option<MessageDescriptor> = None;
    for (depth, &i) in indexes.iter().enumerate() {
        let i =
            usize::try_from(i).map_err(|_| DecodeError(format!("negative message index {i}")))?;
        let next = match &found {
            None => file.messages().nth(i),
            Some(m) => m.child_messages().nth(i),
        };
        found = Some(next.ok_or_else(|| {
            DecodeError(format!(
                "message index {i} at depth {depth} names no message of the file"
            ))
        })?);
    }
    let message = found.ok_or_else(|| DecodeError("empty message-index array".to_owned()))?;
    DynamicMessage::decode(message, bytes).map_err(|e| DecodeError(e.to_string()))
}

/// A Protobuf value body that [`decode`] cannot read: what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode the Protobuf value: {0}")]
pub struct DecodeError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    const PROTO: &str = r#"
        syntax = "proto3";
        package acct.v1;
        import "google/protobuf/timestamp.proto";

        message Opened {
          string id = 1;
          int64 balance = 2;
          Kind kind = 3;
          google.protobuf.Timestamp at = 4;
          map<string, string> labels = 5;
          repeated Line lines = 6;
          message Line { string sku = 1; uint32 qty = 2; }
        }
        enum Kind { KIND_UNSPECIFIED = 0; PERSONAL = 1; BUSINESS = 2; }
        message Closed {
          string id = 1;
          message Reason { string text = 1; bool final = 2; }
          message Note { string text = 1; }
        }
    "#;

    fn round_trip(schema: &ProtobufSchema, payload: &str) -> serde_json::Value {
        let mut body = Vec::new();
        schema.encode_into(payload, &mut body).unwrap();
        let message = decode(schema, &body).unwrap();
        assert_eq!(
            prost_reflect::ReflectMessage::descriptor(&message),
            *schema.message()
        );
        serde_json::to_value(&message).unwrap()
    }

    #[test]
    fn first_message_uses_the_zero_shortcut_and_decodes_back() {
        let s = ProtobufSchema::compile(PROTO, Some("Opened")).unwrap();
        assert_eq!(s.message().full_name(), "acct.v1.Opened");
        assert_eq!(s.indexes(), &[0]);
        let mut body = Vec::new();
        s.encode_into(r#"{"id": "a-1", "balance": 5}"#, &mut body)
            .unwrap();
        // The index array [0] is the single byte 0, then field 1 (len 3), field 2 (varint 5).
        assert_eq!(body, [0, 0x0a, 3, b'a', b'-', b'1', 0x10, 5]);
        let json = round_trip(
            &s,
            r#"{"id": "a-1", "balance": "9007199254740993", "kind": "BUSINESS",
                "at": "2024-05-01T10:00:00Z", "labels": {"k": "v"},
                "lines": [{"sku": "x", "qty": 2}]}"#,
        );
        assert_eq!(
            json,
            serde_json::json!({"id": "a-1", "balance": "9007199254740993", "kind": "BUSINESS",
                "at": "2024-05-01T10:00:00Z", "labels": {"k": "v"},
                "lines": [{"sku": "x", "qty": 2}]})
        );
    }

    #[test]
    fn nested_and_later_messages_carry_their_index_path() {
        let s = ProtobufSchema::compile(PROTO, Some("acct.v1.Closed.Note")).unwrap();
        // Closed is the second top-level message; Note its second nested one.
        assert_eq!(s.indexes(), &[1, 1]);
        let mut body = Vec::new();
        s.encode_into(r#"{"text": "t"}"#, &mut body).unwrap();
        // Count 2, then 1 and 1, each a zig-zag varint: 4, 2, 2.
        assert_eq!(&body[..3], &[4, 2, 2]);
        assert_eq!(
            round_trip(&s, r#"{"text": "t"}"#),
            serde_json::json!({"text": "t"})
        );
        let s = ProtobufSchema::compile(PROTO, Some(".acct.v1.Closed")).unwrap();
        assert_eq!(s.indexes(), &[1]);
        let mut body = Vec::new();
        s.encode_into(r#"{"id": "c"}"#, &mut body).unwrap();
        assert_eq!(&body[..2], &[2, 2]);
        // Line is Opened's second nested type: the entry type of the map field before it is the first.
        let s = ProtobufSchema::compile(PROTO, Some("Opened.Line")).unwrap();
        assert_eq!(s.indexes(), &[0, 1]);
        // Without a name: the first message.
        let s = ProtobufSchema::compile(PROTO, None).unwrap();
        assert_eq!(s.message().full_name(), "acct.v1.Opened");
    }

    #[test]
    fn misfits_name_the_path_without_payload_values() {
        let s = ProtobufSchema::compile(PROTO, Some("Opened")).unwrap();
        let mut out = Vec::new();
        for (payload, expect) in [
            (r#"{"balance": "secret-text"}"#, "$.balance"),
            (r#"{"id": 4711}"#, "$.id"),
            (r#"{"kind": "SECRETKIND"}"#, "$.kind"),
            (r#"{"lines": [{"qty": -7}]}"#, "$.lines[0].qty"),
            (r#"{"nope": 1}"#, "nope"),
            (r#"{"labels": {"secret-key": 4711}}"#, "$.labels[…]"),
            (r#"{"id": "a"} trailing"#, "$"),
        ] {
            let e = s.encode_into(payload, &mut out).unwrap_err().to_string();
            assert!(
                e.starts_with(expect) || e.contains(expect),
                "{payload}: {e}"
            );
            for secret in ["secret-text", "4711", "SECRETKIND", "-7", "secret-key"] {
                assert!(!e.contains(secret), "{payload}: {e}");
            }
        }
        assert!(out.is_empty(), "nothing written on failure");
    }

    #[test]
    fn bad_files_and_names_are_refused() {
        let compile =
            |text, message| ProtobufSchema::compile(text, message).map_err(|e| e.to_string());
        let e = compile("syntax = \"proto3\";\nmessage {", None).unwrap_err();
        assert!(e.contains("line 2, column 9: "), "{e}");
        let e = compile(PROTO, Some("Missing")).unwrap_err();
        assert!(e.contains("acct.v1.Closed.Note"), "{e}");
        let e = compile(
            r#"syntax = "proto3"; import "other.proto"; message A { string a = 1; }"#,
            None,
        )
        .unwrap_err();
        assert!(e.contains("other.proto") && e.contains("references"), "{e}");
        assert!(ProtobufSchema::compile(r#"syntax = "proto3";"#, None).is_err());
        // A message of an imported file is not this file's.
        assert!(ProtobufSchema::compile(PROTO, Some("google.protobuf.Timestamp")).is_err());
    }
}
