//! `[schema_registry]`: the Confluent-compatible schema registry that value schemas
//! (`[[route.value_schemas]]`, [`crate::route::ValueSchemaSettings`]) are registered with.

use std::path::PathBuf;
use std::time::Duration;

use outbox_schema::{RegistryConfig, SubjectStrategy};

use super::{ConfigError, Secret};

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
