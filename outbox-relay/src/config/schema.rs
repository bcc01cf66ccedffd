//! `[schema_registry]`: the Confluent-compatible schema registry that value schemas
//! (`[[route.value_schemas]]`, [`crate::route::ValueSchemaSettings`]) are registered with.

use std::path::PathBuf;
use std::time::Duration;

use outbox_schema::{RegistryConfig, SubjectStrategy};

use super::{ConfigError, RelayConfig, Secret};
use crate::route::{Router, ValueSchemas};

/// Where the schema registry is and how to authenticate. Needed only when the route has value
/// schemas.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchemaRegistrySettings {
    /// Base URL (`http://…` or `https://…`), e.g. `https://registry.internal:8081`.
    pub url: Option<String>,
    /// Basic-auth user name.
    pub username: Option<String>,
    /// Basic-auth password. Secret: like every setting it can come from a file through the
    /// environment, `OUTBOX_SCHEMA_REGISTRY__PASSWORD_FILE=/run/secrets/registry-password`.
    pub password: Option<Secret>,
    /// A PEM file of CA certificates trusted for `https` besides the public web roots (a
    /// private CA).
    pub ca_certificates: Option<PathBuf>,
    /// Time allowed for one registry request, connection included (default 10s).
    #[serde(with = "super::duration")]
    pub timeout: Duration,
    /// Subject name strategy of every value schema that does not set its own: `topic`
    /// (`<topic>-value`, the default), `record` (the record name) or `topic_record`
    /// (`<topic>-<record name>`).
    pub subject_strategy: SubjectStrategy,
}

impl Default for SchemaRegistrySettings {
    fn default() -> Self {
        Self {
            url: None,
            username: None,
            password: None,
            ca_certificates: None,
            timeout: Duration::from_secs(10),
            subject_strategy: SubjectStrategy::Topic,
        }
    }
}

impl SchemaRegistrySettings {
    /// The client settings, reading `ca_certificates`; `None` when no URL is set.
    /// Every error names the setting (and the file).
    pub fn client_config(&self) -> Result<Option<RegistryConfig>, ConfigError> {
        let Some(url) = &self.url else {
            return Ok(None);
        };
        if self.timeout.is_zero() {
            return Err(ConfigError::new(
                "schema_registry.timeout",
                "must be more than 0s",
            ));
        }
        let password = self.password.as_ref().map(|p| p.expose().to_owned());
        let ca_pem = match &self.ca_certificates {
            Some(file) => Some(std::fs::read(file).map_err(|e| {
                ConfigError::new(
                    "schema_registry.ca_certificates",
                    format!("cannot read {}: {e}", file.display()),
                )
            })?),
            None => None,
        };
        Ok(Some(RegistryConfig {
            url: url.clone(),
            username: self.username.clone(),
            password,
            timeout: self.timeout,
            ca_pem,
        }))
    }
}

impl RelayConfig {
    /// The router of this configuration: [`Router::new`] of `route`, with its value schemas
    /// (`[[route.value_schemas]]`, registered with `[schema_registry]`). Reads and parses the
    /// schema files; connects nothing. Every error names the setting (and the schema file).
    pub fn router(&self) -> Result<Router, ConfigError> {
        let router =
            Router::new(&self.route).map_err(|e| ConfigError::new("route.topic", e.to_string()))?;
        let registry = self.schema_registry.client_config()?;
        let schemas = ValueSchemas::new(
            &self.route,
            self.schema_registry.subject_strategy,
            registry.as_ref(),
        )
        .map_err(|e| ConfigError::new(e.key, e.reason))?;
        Ok(router.with_value_schemas(schemas))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::ValueSchemaSettings;
    use crate::route::schemas::fixtures::{AVSC, SchemaDir, entry};

    fn config(entries: Vec<ValueSchemaSettings>) -> RelayConfig {
        let mut c = RelayConfig::default();
        c.schema_registry.url = Some("http://127.0.0.1:1".into());
        c.route.value_schemas = entries;
        c
    }

    fn validate(c: &RelayConfig) -> Result<(), ConfigError> {
        c.router().map(|_| ())
    }

    #[test]
    fn configuration_errors_name_the_setting_and_the_file() {
        let dir = SchemaDir::new();
        let good = dir.write("opened.avsc", AVSC);
        let bad = dir.write("bad.avsc", r#"{"type": "recrod"}"#);
        let untitled = dir.write("untitled.json", r#"{"type": "object"}"#);
        let proto = dir.write(
            "opened.proto",
            "syntax = \"proto3\"; package acct; message Opened { int64 n = 1; }",
        );
        let cases = [
            (
                entry("A", "protobof", good.clone()),
                "route.value_schemas[0].format",
                "opened.avsc",
            ),
            (
                entry("A", "avro", dir.path().join("missing.avsc")),
                "route.value_schemas[0].schema_file",
                "missing.avsc",
            ),
            (
                entry("A", "avro", bad.clone()),
                "route.value_schemas[0].schema_file",
                "bad.avsc",
            ),
            (
                ValueSchemaSettings {
                    subject_strategy: Some(SubjectStrategy::Record),
                    ..entry("A", "json_schema", untitled.clone())
                },
                "route.value_schemas[0].subject_strategy",
                "untitled.json",
            ),
            (
                entry("A", "protobuf", proto.clone()),
                "route.value_schemas[0].message",
                "opened.proto",
            ),
            (
                ValueSchemaSettings {
                    message: Some("Opened".into()),
                    ..entry("A", "avro", good.clone())
                },
                "route.value_schemas[0].message",
                "opened.avsc",
            ),
            (
                ValueSchemaSettings {
                    message: Some("Closed".into()),
                    ..entry("A", "protobuf", proto.clone())
                },
                "route.value_schemas[0].schema_file",
                "opened.proto",
            ),
        ];
        for (e, key, file) in cases {
            let err = validate(&config(vec![e])).unwrap_err();
            assert_eq!(err.key, key, "{err}");
            assert!(err.reason.contains(file), "{err}");
        }
        let mut c = config(vec![entry("A", "avro", good.clone())]);
        c.schema_registry.url = None;
        assert_eq!(validate(&c).unwrap_err().key, "schema_registry.url");
        let mut c = config(vec![entry("A", "avro", good.clone())]);
        c.route.cloudevents_mode = crate::route::CloudEventsMode::Structured;
        assert_eq!(validate(&c).unwrap_err().key, "route.cloudevents_mode");
        validate(&config(vec![entry("A", "avro", good)])).unwrap();
        validate(&config(vec![ValueSchemaSettings {
            message: Some("acct.Opened".into()),
            subject_strategy: Some(SubjectStrategy::Record),
            ..entry("A", "protobuf", proto)
        }]))
        .unwrap();
    }
}
