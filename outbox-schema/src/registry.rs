//! A client for the subset of the Confluent Schema Registry REST API a producer needs:
//!
//! - `POST /compatibility/subjects/{subject}/versions/latest` — is the schema compatible with the
//!   subject's latest version? (404 with error code 40401 or 40402: nothing registered yet, so
//!   nothing to check);
//! - `POST /subjects/{subject}/versions` — register the schema (or find it registered) and get
//!   its global id;
//! - `GET /schemas/ids/{id}` — the schema of an id (what a consumer needs to decode).
//!
//! Requests and answers use the content type `application/vnd.schemaregistry.v1+json`; the body
//! of a request is `{"schema": "<schema text>"}` plus `"schemaType": "JSON"` for JSON Schema or
//! `"schemaType": "PROTOBUF"` for Protobuf (the `.proto` text; an absent `schemaType` means
//! Avro). Errors come back as `{"error_code": n, "message": "…"}`.
//! Karapace, Apicurio (in its Confluent-compatible mode) and Redpanda answer the same API.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::value::SchemaFormat;

/// The content type of the registry's API (version 1).
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Characters of a subject that are percent-encoded in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Where the registry is and how to reach it.
#[derive(Clone)]
pub struct RegistryConfig {
    /// Base URL, e.g. `https://registry.example:8081` (a path prefix is kept).
    pub url: String,
    /// Basic-auth user name, if the registry requires authentication.
    pub username: Option<String>,
    /// Basic-auth password; never shown by `Debug` nor in any error.
    pub password: Option<String>,
    /// Time allowed for one request, connection included.
    pub timeout: Duration,
    /// PEM certificates trusted besides the built-in web roots (a private CA).
    pub ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &display_url(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .finish()
    }
}

/// The registry URL as shown in messages: without any `user:password@` part.
pub fn display_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// What went wrong talking to the registry. Every variant names the registry (its URL without
/// credentials); those about a subject name the subject.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The client cannot be built (bad URL, unreadable CA certificate).
    #[error("schema registry {registry}: {reason}")]
    Setup {
        /// The registry.
        registry: String,
        /// What is wrong.
        reason: String,
    },
    /// No answer: connection refused, TLS failure, timeout.
    #[error("schema registry {registry} cannot be reached ({what}): {source}")]
    Unreachable {
        /// The registry.
        registry: String,
        /// The request.
        what: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The schema is not compatible with the subject's latest version under the subject's
    /// compatibility level.
    #[error(
        "schema registry {registry}: the schema is incompatible with the latest version of subject `{subject}`{}",
        if messages.is_empty() { String::new() } else { format!(": {}", messages.join("; ")) }
    )]
    Incompatible {
        /// The registry.
        registry: String,
        /// The subject.
        subject: String,
        /// The registry's explanations, when it gives any.
        messages: Vec<String>,
    },
    /// The registry rejects the schema itself (error code 42201).
    #[error(
        "schema registry {registry}: subject `{subject}`: the registry rejects the schema as invalid: {message}"
    )]
    InvalidSchema {
        /// The registry.
        registry: String,
        /// The subject.
        subject: String,
        /// The registry's message.
        message: String,
    },
    /// Any other error answer.
    #[error("schema registry {registry}: {what}: HTTP {status}{}: {message}", code.map(|c| format!(" (error code {c})")).unwrap_or_default())]
    Api {
        /// The registry.
        registry: String,
        /// The request.
        what: String,
        /// HTTP status.
        status: u16,
        /// The registry's `error_code`, if the body had one.
        code: Option<i64>,
        /// The registry's message, or the start of the body.
        message: String,
    },
    /// A success answer the client cannot read.
    #[error("schema registry {registry}: {what}: unexpected answer: {reason}")]
    Protocol {
        /// The registry.
        registry: String,
        /// The request.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl RegistryError {
    /// Whether retrying later may succeed: no answer, a 5xx, 408 or 429. Incompatible or invalid
    /// schemas, authentication failures and other 4xx answers need an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Api { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }
}

/// A schema as the registry returns it by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredSchema {
    /// The schema text.
    pub schema: String,
    /// Its language.
    pub format: SchemaFormat,
}

#[derive(serde::Serialize)]
struct SchemaRequest<'a> {
    schema: &'a str,
    #[serde(rename = "schemaType", skip_serializing_if = "Option::is_none")]
    schema_type: Option<&'a str>,
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error_code: Option<i64>,
    message: Option<String>,
}

/// A Confluent-compatible schema registry client with an id cache.
///
/// Guarantees: the password is sent only as HTTP basic auth and appears in no message; every
/// request is bounded by the configured timeout; [`Self::register_checked`] asks the registry
/// once per (subject, schema text) for the life of the client and answers from its cache after.
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    shown: String,
    username: Option<String>,
    password: Option<String>,
    ids: Mutex<HashMap<(String, String), u32>>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("registry", &self.shown)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// Builds a client; connects nothing yet.
    pub fn new(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let shown = display_url(&config.url);
        let setup = |reason: String| RegistryError::Setup {
            registry: shown.clone(),
            reason,
        };
        let parsed =
            reqwest::Url::parse(&config.url).map_err(|e| setup(format!("not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(setup(format!(
                "scheme `{}` is not http or https",
                parsed.scheme()
            )));
        }
        // Credentials in the URL are honoured like the explicit settings.
        let username = config
            .username
            .clone()
            .or_else(|| (!parsed.username().is_empty()).then(|| parsed.username().to_owned()));
        let password = config
            .password
            .clone()
            .or_else(|| parsed.password().map(str::to_owned));
        let mut base = parsed.clone();
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout);
        if let Some(pem) = &config.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| setup(format!("CA certificates: {e}")))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| setup(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: base.as_str().trim_end_matches('/').to_owned(),
            shown,
            username,
            password,
            ids: Mutex::new(HashMap::new()),
        })
    }

    /// The registry's URL without credentials, for messages.
    pub fn registry(&self) -> &str {
        &self.shown
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        if let Some(user) = &self.username {
            r = r.basic_auth(user, self.password.as_deref());
        }
        r
    }

    async fn send(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, Vec<u8>), RegistryError> {
        let unreachable = |source| RegistryError::Unreachable {
            registry: self.shown.clone(),
            what: what.to_owned(),
            source,
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(unreachable)?;
        Ok((status, body.to_vec()))
    }

    /// `POST {before}{subject, percent-encoded}{after}` with the schema as the body
    /// (`{"schema", "schemaType"?}`); the status and body of the answer.
    async fn post_schema(
        &self,
        what: &str,
        before: &str,
        subject: &str,
        after: &str,
        schema: &str,
        format: SchemaFormat,
    ) -> Result<(u16, Vec<u8>), RegistryError> {
        let path = format!("{before}{}{after}", utf8_percent_encode(subject, SEGMENT));
        let body = SchemaRequest {
            schema,
            schema_type: match format {
                SchemaFormat::Avro => None,
                other => Some(other.schema_type()),
            },
        };
        let request = self
            .request(reqwest::Method::POST, &path)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(serde_json::to_vec(&body).expect("a string pair serializes"));
        self.send(what, request).await
    }

    fn api_error(&self, what: &str, status: u16, body: &[u8]) -> RegistryError {
        let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
        let message = parsed
            .as_ref()
            .and_then(|b| b.message.clone())
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
        RegistryError::Api {
            registry: self.shown.clone(),
            what: what.to_owned(),
            status,
            code: parsed.and_then(|b| b.error_code),
            message,
        }
    }

    fn protocol(&self, what: &str, reason: impl Into<String>) -> RegistryError {
        RegistryError::Protocol {
            registry: self.shown.clone(),
            what: what.to_owned(),
            reason: reason.into(),
        }
    }

    fn subject_error(&self, subject: &str, what: &str, status: u16, body: &[u8]) -> RegistryError {
        match self.api_error(what, status, body) {
            RegistryError::Api {
                code: Some(42201),
                message,
                ..
            } => RegistryError::InvalidSchema {
                registry: self.shown.clone(),
                subject: subject.to_owned(),
                message,
            },
            RegistryError::Api {
                status: 409,
                message,
                ..
            } => RegistryError::Incompatible {
                registry: self.shown.clone(),
                subject: subject.to_owned(),
                messages: vec![message],
            },
            other => other,
        }
    }

    /// Whether `schema` is compatible with the latest version of `subject`, under the
    /// compatibility level the registry has for it. A subject with no version yet is compatible
    /// with anything (`Ok(true)`).
    pub async fn check_compatibility(
        &self,
        subject: &str,
        schema: &str,
        format: SchemaFormat,
    ) -> Result<bool, RegistryError> {
        let what = format!("compatibility check of subject `{subject}`");
        let (status, body) = self
            .post_schema(
                &what,
                "/compatibility/subjects/",
                subject,
                "/versions/latest",
                schema,
                format,
            )
            .await?;
        match status {
            200 => {
                #[derive(serde::Deserialize)]
                struct Answer {
                    is_compatible: bool,
                }
                serde_json::from_slice::<Answer>(&body)
                    .map(|a| a.is_compatible)
                    .map_err(|e| self.protocol(&what, e.to_string()))
            }
            404 => match self.api_error(&what, status, &body) {
                // Subject not found, version not found: nothing registered to be compatible with.
                RegistryError::Api {
                    code: Some(40401 | 40402),
                    ..
                } => Ok(true),
                other => Err(other),
            },
            _ => Err(self.subject_error(subject, &what, status, &body)),
        }
    }

    /// Registers `schema` under `subject` and returns its global id; registering a schema the
    /// subject already has returns the existing id (the registry's rule).
    pub async fn register(
        &self,
        subject: &str,
        schema: &str,
        format: SchemaFormat,
    ) -> Result<u32, RegistryError> {
        let what = format!("registration under subject `{subject}`");
        let (status, body) = self
            .post_schema(&what, "/subjects/", subject, "/versions", schema, format)
            .await?;
        if status != 200 {
            return Err(self.subject_error(subject, &what, status, &body));
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            id: i64,
        }
        let id = serde_json::from_slice::<Answer>(&body)
            .map_err(|e| self.protocol(&what, e.to_string()))?
            .id;
        u32::try_from(id).map_err(|_| self.protocol(&what, format!("id {id} is not a 32-bit id")))
    }

    /// Checks compatibility, then registers; the id is cached per (subject, schema text), so
    /// later calls for the same pair make no request.
    ///
    /// Guarantee: an `Ok` id is registered under `subject` for exactly this schema text; an
    /// incompatible schema is never registered ([`RegistryError::Incompatible`]).
    pub async fn register_checked(
        &self,
        subject: &str,
        schema: &str,
        format: SchemaFormat,
    ) -> Result<u32, RegistryError> {
        let key = (subject.to_owned(), schema.to_owned());
        if let Some(id) = self.cached(&key) {
            return Ok(id);
        }
        if !self.check_compatibility(subject, schema, format).await? {
            return Err(RegistryError::Incompatible {
                registry: self.shown.clone(),
                subject: subject.to_owned(),
                messages: Vec::new(),
            });
        }
        let id = self.register(subject, schema, format).await?;
        self.ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, id);
        Ok(id)
    }

    fn cached(&self, key: &(String, String)) -> Option<u32> {
        self.ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .copied()
    }

    /// The schema registered with global id `id`.
    pub async fn schema_by_id(&self, id: u32) -> Result<RegisteredSchema, RegistryError> {
        let what = format!("lookup of schema id {id}");
        let request = self.request(reqwest::Method::GET, &format!("/schemas/ids/{id}"));
        let (status, body) = self.send(&what, request).await?;
        if status != 200 {
            return Err(self.api_error(&what, status, &body));
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            schema: String,
            #[serde(rename = "schemaType")]
            schema_type: Option<String>,
        }
        let a: Answer =
            serde_json::from_slice(&body).map_err(|e| self.protocol(&what, e.to_string()))?;
        let format = match a.schema_type.as_deref() {
            None | Some("AVRO") => SchemaFormat::Avro,
            Some("JSON") => SchemaFormat::JsonSchema,
            Some("PROTOBUF") => SchemaFormat::Protobuf,
            Some(other) => {
                return Err(self.protocol(&what, format!("schema type `{other}` is not supported")));
            }
        };
        Ok(RegisteredSchema {
            schema: a.schema,
            format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            display_url("https://u:p@reg.example:8081/prefix"),
            "https://reg.example:8081/prefix"
        );
        assert_eq!(display_url("http://reg:8081"), "http://reg:8081");
        let c = RegistryConfig {
            url: "https://u:s3cret@reg".into(),
            username: Some("u".into()),
            password: Some("s3cret".into()),
            timeout: Duration::from_secs(1),
            ca_pem: None,
        };
        assert!(!format!("{c:?}").contains("s3cret"));
        let client = RegistryClient::new(&c).unwrap();
        assert!(!format!("{client:?}").contains("s3cret"));
        assert_eq!(client.registry(), "https://reg");
        assert!(
            RegistryClient::new(&RegistryConfig {
                url: "ftp://x".into(),
                ..c
            })
            .is_err()
        );
    }
}
