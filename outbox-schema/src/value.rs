//! A value schema: its format, its text as registered, and what encodes a JSON payload with it.

use std::fmt;

use crate::avro::{AvroEncoder, AvroFitError};
use crate::protobuf::ProtobufSchema;
use crate::wire;

/// The schema language of a value schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaFormat {
    /// Apache Avro; the value body is an Avro binary datum.
    Avro,
    /// JSON Schema; the value body is the payload's JSON text, validated against the schema.
    JsonSchema,
    /// Protobuf; the value body is the message-index array, then the protobuf binary of one
    /// message type of the `.proto` file.
    Protobuf,
}

impl SchemaFormat {
    /// The registry's `schemaType` (`AVRO`, `JSON`, `PROTOBUF`).
    pub fn schema_type(self) -> &'static str {
        match self {
            SchemaFormat::Avro => "AVRO",
            SchemaFormat::JsonSchema => "JSON",
            SchemaFormat::Protobuf => "PROTOBUF",
        }
    }

    /// The name used in settings (`avro`, `json_schema`, `protobuf`).
    pub fn name(self) -> &'static str {
        match self {
            SchemaFormat::Avro => "avro",
            SchemaFormat::JsonSchema => "json_schema",
            SchemaFormat::Protobuf => "protobuf",
        }
    }

    /// The media type of a value body (`application/avro`, `application/json`,
    /// `application/x-protobuf`), e.g. for a CloudEvents `content-type`.
    pub fn content_type(self) -> &'static str {
        match self {
            SchemaFormat::Avro => "application/avro",
            SchemaFormat::JsonSchema => "application/json",
            SchemaFormat::Protobuf => "application/x-protobuf",
        }
    }

    /// Parses a setting value: `avro`, `json_schema` (also `json-schema`, `json`), or
    /// `protobuf` (also `proto`).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "avro" => Some(Self::Avro),
            "json_schema" | "json-schema" | "json" => Some(Self::JsonSchema),
            "protobuf" | "proto" => Some(Self::Protobuf),
            _ => None,
        }
    }
}

/// A schema that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// Not a valid Avro schema.
    #[error("not a valid Avro schema: {0}")]
    Avro(String),
    /// Not JSON, or not a valid JSON Schema.
    #[error("not a valid JSON Schema: {0}")]
    JsonSchema(String),
    /// A `.proto` file that does not compile, or without the named message.
    #[error("not a usable Protobuf schema: {0}")]
    Protobuf(String),
    /// A message name given for a format that has none.
    #[error("a message name is only for Protobuf schemas, not {0}")]
    MessageNotApplicable(&'static str),
}

/// Why a payload cannot be encoded with its schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The payload is not JSON.
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    /// The payload does not fit the Avro schema.
    #[error("payload does not fit the Avro schema: {0}")]
    Avro(#[from] AvroFitError),
    /// The payload does not validate against the JSON Schema.
    #[error("payload does not validate against the JSON Schema: {0}")]
    JsonSchema(String),
    /// The payload does not fit the Protobuf message type.
    #[error("payload does not fit the Protobuf message {message}: {reason}")]
    Protobuf {
        /// The message type's full name.
        message: String,
        /// Where and what does not fit.
        reason: String,
    },
}

enum Compiled {
    /// Resolved once, at parse.
    Avro(Box<AvroEncoder>),
    Json(Box<jsonschema::Validator>),
    Protobuf(Box<ProtobufSchema>),
}

/// A parsed value schema, ready to encode payloads. Cheap to share behind an `Arc`.
pub struct ValueSchema {
    format: SchemaFormat,
    text: String,
    record_name: Option<String>,
    compiled: Compiled,
}

impl fmt::Debug for ValueSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValueSchema")
            .field("format", &self.format)
            .field("record_name", &self.record_name)
            .finish_non_exhaustive()
    }
}

impl ValueSchema {
    /// Parses `text` as a schema of `format`; for Protobuf, values are the file's first
    /// message (see [`Self::parse_message`] to choose another).
    ///
    /// Guarantee: succeeds only if the schema can encode (Avro: parses and resolves every
    /// named reference; JSON Schema: JSON that compiles as a schema; Protobuf: the file compiles
    /// and declares a message). The registered text is `text` as written (not Avro's parsing
    /// canonical form, which drops field defaults and so would change what the registry's
    /// compatibility check sees).
    pub fn parse(format: SchemaFormat, text: &str) -> Result<Self, SchemaError> {
        Self::parse_message(format, text, None)
    }

    /// [`Self::parse`], with the Protobuf message type values are encoded as: its full name
    /// (`acct.v1.AccountOpened`) or its name relative to the file's package
    /// (`AccountOpened`, `Outer.Inner`). `message` must be `None` for Avro and JSON Schema.
    pub fn parse_message(
        format: SchemaFormat,
        text: &str,
        message: Option<&str>,
    ) -> Result<Self, SchemaError> {
        if message.is_some() && format != SchemaFormat::Protobuf {
            return Err(SchemaError::MessageNotApplicable(format.name()));
        }
        match format {
            SchemaFormat::Protobuf => {
                let schema = ProtobufSchema::compile(text, message)?;
                Ok(Self {
                    format,
                    text: text.to_owned(),
                    record_name: Some(schema.message().full_name().to_owned()),
                    compiled: Compiled::Protobuf(Box::new(schema)),
                })
            }
            SchemaFormat::Avro => {
                let schema = apache_avro::Schema::parse_str(text)
                    .map_err(|e| SchemaError::Avro(e.to_string()))?;
                let record_name = match &schema {
                    apache_avro::Schema::Record(r) => Some(r.name.to_string()),
                    apache_avro::Schema::Enum(e) => Some(e.name.to_string()),
                    apache_avro::Schema::Fixed(f) => Some(f.name.to_string()),
                    _ => None,
                };
                Ok(Self {
                    format,
                    text: text.trim().to_owned(),
                    record_name,
                    compiled: Compiled::Avro(Box::new(
                        AvroEncoder::new(schema).map_err(|e| SchemaError::Avro(e.to_string()))?,
                    )),
                })
            }
            SchemaFormat::JsonSchema => {
                let json: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| SchemaError::JsonSchema(format!("not JSON: {e}")))?;
                let validator = jsonschema::validator_for(&json)
                    .map_err(|e| SchemaError::JsonSchema(e.to_string()))?;
                let record_name = json
                    .get("title")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned);
                Ok(Self {
                    format,
                    text: text.to_owned(),
                    record_name,
                    compiled: Compiled::Json(Box::new(validator)),
                })
            }
        }
    }

    /// The schema language.
    pub fn format(&self) -> SchemaFormat {
        self.format
    }

    /// The schema text sent to the registry.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The record name used by the `record` and `topic_record` subject strategies: the full
    /// name of an Avro named type, the `title` of a JSON Schema, the full name of the Protobuf
    /// message; `None` when there is none.
    pub fn record_name(&self) -> Option<&str> {
        self.record_name.as_deref()
    }

    /// The Avro schema, for an Avro value schema.
    pub fn avro(&self) -> Option<&apache_avro::Schema> {
        match &self.compiled {
            Compiled::Avro(s) => Some(s.schema()),
            _ => None,
        }
    }

    /// The compiled `.proto` file and chosen message, for a Protobuf value schema (decode
    /// values with [`crate::protobuf::decode`]).
    pub fn protobuf(&self) -> Option<&ProtobufSchema> {
        match &self.compiled {
            Compiled::Protobuf(s) => Some(s),
            _ => None,
        }
    }

    /// The body of a value for the JSON text `payload`, without the wire header: the Avro
    /// binary datum, the JSON bytes as given once they validate, or the Protobuf message-index
    /// array and message binary.
    ///
    /// Guarantee: fails, naming where and which schema rule, for any payload the schema does
    /// not accept, without quoting the payload's values; never panics on bad input.
    pub fn encode_body(&self, payload: &str) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        self.write_body(payload, &mut out)?;
        Ok(out)
    }

    /// The whole wire-format value (header with `schema_id`, then [`Self::encode_body`]).
    pub fn encode(&self, schema_id: u32, payload: &str) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(wire::HEADER_LEN + payload.len());
        out.extend_from_slice(&wire::header(schema_id));
        self.write_body(payload, &mut out)?;
        Ok(out)
    }

    /// Appends the body to `out`.
    fn write_body(&self, payload: &str, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        if let Compiled::Protobuf(schema) = &self.compiled {
            // Read straight into the message: no intermediate JSON tree.
            return schema.encode_into(payload, out);
        }
        let json: serde_json::Value =
            serde_json::from_str(payload).map_err(|e| EncodeError::NotJson(e.to_string()))?;
        match &self.compiled {
            Compiled::Avro(encoder) => Ok(encoder.write(&json, out)?),
            Compiled::Json(validator) => {
                let errors: Vec<String> = validator
                    .iter_errors(&json)
                    .take(3)
                    // The instance path and the failing keyword, not the validator's message:
                    // that quotes the payload's value, and this ends up in logs.
                    .map(|e| {
                        let at = e.instance_path().to_string();
                        format!(
                            "{}: fails the schema at {}",
                            if at.is_empty() { "/" } else { &at },
                            e.schema_path()
                        )
                    })
                    .collect();
                if errors.is_empty() {
                    out.extend_from_slice(payload.as_bytes());
                    Ok(())
                } else {
                    Err(EncodeError::JsonSchema(errors.join("; ")))
                }
            }
            Compiled::Protobuf(_) => unreachable!("encoded above"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_schema_values_are_the_json_bytes_after_the_header() {
        let s = ValueSchema::parse(
            SchemaFormat::JsonSchema,
            r#"{"title": "Opened", "type": "object", "required": ["id"],
                "properties": {"id": {"type": "string"}}}"#,
        )
        .unwrap();
        assert_eq!(s.record_name(), Some("Opened"));
        let v = s.encode(9, r#"{"id": "a"}"#).unwrap();
        assert_eq!(wire::decode(&v).unwrap(), (9, &br#"{"id": "a"}"#[..]));
        let e = s.encode(9, r#"{"id": 4711}"#).unwrap_err();
        assert!(e.to_string().contains("/id"), "{e}");
        assert!(e.to_string().contains("/properties/id/type"), "{e}");
        assert!(!e.to_string().contains("4711"), "no payload value: {e}");
        assert!(matches!(s.encode(9, "{"), Err(EncodeError::NotJson(_))));
        assert!(ValueSchema::parse(SchemaFormat::JsonSchema, r#"{"type": 3}"#).is_err());
    }

    #[test]
    fn avro_schemas_are_registered_as_written() {
        let s = ValueSchema::parse(
            SchemaFormat::Avro,
            r#"{"type": "record", "name": "Opened", "namespace": "x",
                "doc": "dropped", "fields": [{"name": "id", "type": "string"}]}"#,
        )
        .unwrap();
        assert_eq!(s.record_name(), Some("x.Opened"));
        assert!(s.text().contains("\"doc\": \"dropped\""));
        assert!(ValueSchema::parse(SchemaFormat::Avro, r#"{"type": "recrd"}"#).is_err());
    }
}
