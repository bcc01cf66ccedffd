//! Schema'd payloads for the outbox relay: a Confluent-compatible schema registry client, the
//! Confluent wire format, and the encoding of a JSON payload as an Avro datum, as JSON checked
//! against a JSON Schema, or as a Protobuf message.
//!
//! A value in the Confluent wire format is `0x00`, the schema's registry id (4 bytes, big
//! endian), then the body ([`wire`]). Producers register the schema under a subject named by a
//! [`SubjectStrategy`] and put the id in every value; consumers read the id and fetch the schema
//! ([`RegistryClient::schema_by_id`]). A Protobuf body starts with the message-index array
//! ([`wire::encode_message_indexes`]).
//!
//! ```
//! use outbox_schema::{SchemaFormat, ValueSchema, wire};
//!
//! let schema = ValueSchema::parse(
//!     SchemaFormat::Avro,
//!     r#"{"type": "record", "name": "Opened", "fields": [{"name": "id", "type": "string"}]}"#,
//! )?;
//! let value = schema.encode(42, r#"{"id": "a-1"}"#)?;
//! let (id, body) = wire::decode(&value)?;
//! assert_eq!(id, 42);
//! let datum = apache_avro::reader::datum::GenericDatumReader::builder(schema.avro().unwrap())
//!     .build()?
//!     .read_value(&mut &body[..])?;
//! # let _ = datum;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod avro;
pub mod protobuf;
pub mod registry;
pub mod subject;
pub mod value;
pub mod wire;

pub use apache_avro;
pub use prost_reflect;
pub use registry::{RegisteredSchema, RegistryClient, RegistryConfig, RegistryError};
pub use subject::SubjectStrategy;
pub use value::{EncodeError, SchemaError, SchemaFormat, ValueSchema};
