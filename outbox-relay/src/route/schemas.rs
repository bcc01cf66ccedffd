//! Value schemas: per-event-type Avro, JSON Schema or Protobuf encoding of the record value in the
//! Confluent wire format (magic byte 0, the registry's 4-byte schema id, the body), with the
//! schema registered in a Confluent-compatible registry (`[schema_registry]`).
//!
//! The payload stays JSON in the outbox table; the relay encodes it when it routes the event, so
//! the writing transaction never depends on the registry. Schema ids are cached per (event type,
//! subject); the subject depends on the topic (subject strategy), so a templated topic's subject
//! is registered the first time an event goes to it ([`Router::prepare_schemas`], before the
//! batch is planned) and routing itself stays synchronous. A registry that cannot be reached
//! delays relaying (retried with backoff); a schema the registry refuses for a subject (not
//! compatible, invalid) parks the events of that subject with the registry's reason; a payload
//! that does not fit its schema is parked with the schema error. Neither stalls the stream.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use outbox_core::StoredEvent;
use outbox_schema::{RegistryClient, RegistryError, SchemaFormat, SubjectStrategy, ValueSchema};

use outbox_schema::RegistryConfig;

use super::{RouteError, RouteSettings, Router, TopicTemplate};

/// A value-schema setting that cannot be used: the setting (as in the configuration file) and
/// why. The configuration turns it into its own error type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{key}`: {reason}")]
pub struct SchemaSettingError {
    /// The setting, e.g. `route.value_schemas[0].schema_file`.
    pub key: String,
    /// What is wrong, naming the schema file where there is one.
    pub reason: String,
}

impl SchemaSettingError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// One `[[route.value_schemas]]` entry: the value schema of one event type.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValueSchemaSettings {
    /// The event type (`type` column) whose payloads are encoded with this schema.
    pub event_type: String,
    /// `avro`, `json_schema` or `protobuf`.
    pub format: String,
    /// The schema file (`.avsc` Avro schema, JSON Schema document, or `.proto` file), relative
    /// to the relay's working directory.
    pub schema_file: PathBuf,
    /// The Protobuf message type payloads are encoded as: its full name (`acct.v1.Opened`) or
    /// its name within the file's package (`Opened`, `Outer.Inner`). Required for `protobuf`,
    /// refused for the other formats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Overrides `schema_registry.subject_strategy` for this schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_strategy: Option<SubjectStrategy>,
}

/// A loaded value schema of one event type.
#[derive(Debug)]
pub(crate) struct TypeSchema {
    pub(crate) file: PathBuf,
    pub(crate) schema: ValueSchema,
    pub(crate) strategy: SubjectStrategy,
}

impl TypeSchema {
    /// The subject for a value published to `topic`.
    pub(crate) fn subject(&self, topic: &str) -> String {
        self.strategy
            .subject(topic, self.schema.record_name())
            .expect("record strategies are refused at load for schemas without a record name")
    }

    fn describe(&self) -> String {
        format!(
            "{} schema {}",
            self.schema.format().name(),
            self.file.display()
        )
    }
}

/// What registering a subject gave: its id, or the registry's refusal (events of the subject
/// are parked with it).
type Registration = Result<u32, String>;

/// The value schemas of a route and the registry they are registered with.
#[derive(Debug)]
pub struct ValueSchemas {
    client: RegistryClient,
    by_type: HashMap<String, TypeSchema>,
    /// Registrations by event type, then subject (looked up without allocating).
    ids: RwLock<HashMap<String, HashMap<String, Registration>>>,
}

/// Loads the schema files of `settings`; every error names the setting and the file.
fn load(
    entries: &[ValueSchemaSettings],
    default_strategy: SubjectStrategy,
) -> Result<HashMap<String, TypeSchema>, SchemaSettingError> {
    let mut by_type = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let key = |field: &str| format!("route.value_schemas[{i}].{field}");
        let file = &entry.schema_file;
        let format = SchemaFormat::parse(&entry.format).ok_or_else(|| {
            SchemaSettingError::new(
                key("format"),
                format!(
                    "unknown format `{}` for {} (avro, json_schema, protobuf)",
                    entry.format,
                    file.display()
                ),
            )
        })?;
        let text = std::fs::read_to_string(file).map_err(|e| {
            SchemaSettingError::new(
                key("schema_file"),
                format!("cannot read {}: {e}", file.display()),
            )
        })?;
        match (format, &entry.message) {
            (SchemaFormat::Protobuf, None) => {
                return Err(SchemaSettingError::new(
                    key("message"),
                    format!(
                        "protobuf schema {} needs the message type its events are encoded as",
                        file.display()
                    ),
                ));
            }
            (SchemaFormat::Avro | SchemaFormat::JsonSchema, Some(_)) => {
                return Err(SchemaSettingError::new(
                    key("message"),
                    format!(
                        "only protobuf schemas name a message ({} is {})",
                        file.display(),
                        format.name()
                    ),
                ));
            }
            _ => {}
        }
        let schema =
            ValueSchema::parse_message(format, &text, entry.message.as_deref()).map_err(|e| {
                SchemaSettingError::new(key("schema_file"), format!("{}: {e}", file.display()))
            })?;
        let strategy = entry.subject_strategy.unwrap_or(default_strategy);
        if strategy != SubjectStrategy::Topic && schema.record_name().is_none() {
            return Err(SchemaSettingError::new(
                key("subject_strategy"),
                format!(
                    "`{}` needs a record name, and {} has none (an Avro named type, or a JSON Schema `title`)",
                    strategy.name(),
                    file.display()
                ),
            ));
        }
        if by_type.contains_key(&entry.event_type) {
            return Err(SchemaSettingError::new(
                key("event_type"),
                format!("`{}` has a value schema already", entry.event_type),
            ));
        }
        by_type.insert(
            entry.event_type.clone(),
            TypeSchema {
                file: file.clone(),
                schema,
                strategy,
            },
        );
    }
    Ok(by_type)
}

impl ValueSchemas {
    /// Loads the value schemas of `route` (`[[route.value_schemas]]`) and a client for
    /// `registry`; `None` when the route has none. Checks, without connecting: formats, files,
    /// schemas, strategies (`default_strategy` for entries without their own), that a registry
    /// is configured, and that CloudEvents structured mode (which would wrap the encoded value
    /// in a JSON envelope) is not combined with value schemas.
    pub fn new(
        route: &RouteSettings,
        default_strategy: SubjectStrategy,
        registry: Option<&RegistryConfig>,
    ) -> Result<Option<Self>, SchemaSettingError> {
        if route.value_schemas.is_empty() {
            return Ok(None);
        }
        let by_type = load(&route.value_schemas, default_strategy)?;
        if route.cloudevents && route.cloudevents_mode == super::CloudEventsMode::Structured {
            return Err(SchemaSettingError::new(
                "route.cloudevents_mode",
                "`structured` wraps the value in a JSON envelope and cannot carry schema'd values: use `binary` with route.value_schemas",
            ));
        }
        let registry = registry.ok_or_else(|| {
            SchemaSettingError::new(
                "schema_registry.url",
                "route.value_schemas needs a schema registry: set schema_registry.url",
            )
        })?;
        let client = RegistryClient::new(registry)
            .map_err(|e| SchemaSettingError::new("schema_registry.url", e.to_string()))?;
        Ok(Some(Self {
            client,
            by_type,
            ids: RwLock::new(HashMap::new()),
        }))
    }

    /// The schema of an event type.
    pub(crate) fn of(&self, event_type: &str) -> Option<&TypeSchema> {
        self.by_type.get(event_type)
    }

    /// The registry, for messages (no credentials).
    pub fn registry(&self) -> &str {
        self.client.registry()
    }

    /// The registration of `subject` for `event_type`, when it was made.
    pub(crate) fn registration(&self, event_type: &str, subject: &str) -> Option<Registration> {
        self.ids
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(event_type)
            .and_then(|by_subject| by_subject.get(subject))
            .cloned()
    }

    /// Remembers the registration of `subject` for `event_type`.
    fn remember(&self, event_type: &str, subject: &str, registration: Registration) {
        self.ids
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(event_type.to_owned())
            .or_default()
            .insert(subject.to_owned(), registration);
    }

    /// Checks compatibility and registers the schema of `event_type` under `subject` once;
    /// a refusal by the registry is remembered (and returned) so its events are parked with it,
    /// a transient failure is returned and not remembered.
    async fn register(
        &self,
        event_type: &str,
        subject: &str,
    ) -> Result<Registration, RegistryError> {
        if let Some(done) = self.registration(event_type, subject) {
            return Ok(done);
        }
        let ts = self
            .of(event_type)
            .expect("called for event types with schemas");
        let outcome = match self
            .client
            .register_checked(subject, ts.schema.text(), ts.schema.format())
            .await
        {
            Ok(id) => {
                tracing::info!(
                    event_type,
                    subject,
                    schema_id = id,
                    registry = self.registry(),
                    file = %ts.file.display(),
                    "value schema registered"
                );
                Ok(id)
            }
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                tracing::error!(event_type, subject, error = %e, "value schema refused by the registry; events of this subject are parked");
                Err(format!("{}: {e}", ts.describe()))
            }
        };
        self.remember(event_type, subject, outcome.clone());
        Ok(outcome)
    }

    /// The (event type, subject) pairs known before any event is seen: the `record` strategy,
    /// or a topic the route fixes for the event type (a route or topic template without
    /// `{aggregatetype}`, for an event type the row's `topic` column cannot redirect).
    fn static_subjects(&self, router: &Router) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .by_type
            .iter()
            .filter_map(|(event_type, ts)| {
                let topic = match router.routes.get(event_type) {
                    Some(t) => static_topic(t, event_type),
                    // The row's `topic` column may choose another topic: known only per event.
                    None => None,
                };
                match (ts.strategy, topic) {
                    (SubjectStrategy::Record, _) => Some((event_type.clone(), ts.subject(""))),
                    (_, Some(topic)) => Some((event_type.clone(), ts.subject(&topic))),
                    (_, None) => None,
                }
            })
            .collect();
        out.sort();
        out
    }
}

/// The topic a template renders for `event_type` whatever the aggregate type, if any.
fn static_topic(template: &TopicTemplate, event_type: &str) -> Option<String> {
    (!template
        .parts
        .iter()
        .any(|p| matches!(p, super::Part::AggregateType)))
    .then(|| template.render("", event_type))
}

/// A value schema refused by the registry at start-up, or a registry that cannot be reached.
#[derive(Debug, thiserror::Error)]
#[error("value schema of event type `{event_type}` ({file}), subject `{subject}`: {source}")]
pub struct SchemaSetupError {
    /// The event type.
    pub event_type: String,
    /// The schema file.
    pub file: String,
    /// The subject.
    pub subject: String,
    /// The registry's answer (it names the registry).
    #[source]
    pub source: RegistryError,
}

impl Router {
    /// This router, encoding the values of the event types `schemas` has schemas for.
    pub fn with_value_schemas(mut self, schemas: Option<ValueSchemas>) -> Self {
        self.schemas = schemas.map(Arc::new);
        self
    }

    /// Whether events of `event_type` are encoded with a value schema.
    pub fn has_value_schema(&self, event_type: &str) -> bool {
        self.schemas
            .as_ref()
            .is_some_and(|s| s.by_type.contains_key(event_type))
    }

    /// The route's value schemas, if it has any.
    pub fn value_schemas(&self) -> Option<&ValueSchemas> {
        self.schemas.as_deref()
    }

    /// Checks and registers, once each, the subjects known before any event is seen (see
    /// [`ValueSchemas`]); the first refusal or unreachable registry is returned, naming the
    /// event type, schema file, subject and registry. Returns the registered (subject, id)s.
    pub async fn register_static_schemas(&self) -> Result<Vec<(String, u32)>, SchemaSetupError> {
        let Some(schemas) = &self.schemas else {
            return Ok(Vec::new());
        };
        let mut registered = Vec::new();
        for (event_type, subject) in schemas.static_subjects(self) {
            let ts = schemas.of(&event_type).expect("listed from by_type");
            let error = |source| SchemaSetupError {
                event_type: event_type.clone(),
                file: ts.file.display().to_string(),
                subject: subject.clone(),
                source,
            };
            let id = schemas
                .client
                .register_checked(&subject, ts.schema.text(), ts.schema.format())
                .await
                .map_err(error)?;
            schemas.remember(&event_type, &subject, Ok(id));
            registered.push((subject, id));
        }
        Ok(registered)
    }

    /// Registers the subjects the schema'd `events` need that are not registered yet, so that
    /// [`Router::route`] can encode them without I/O; a registry that cannot be reached is
    /// retried with backoff (up to 5 s apart, a warning each time) until it answers, so relaying
    /// is delayed, never failed. A refusal (incompatible, invalid) is remembered: the events of
    /// that subject are then parked by [`Router::route`] with the registry's reason.
    pub fn wait_for_schemas<'e>(
        &self,
        events: impl IntoIterator<Item = &'e StoredEvent>,
    ) -> impl Future<Output = ()> + Send + '_ {
        let prepared = self.prepare(events, true);
        async move {
            // With `wait`, only a registration is returned: transient failures are retried.
            let _ = prepared.await;
        }
    }

    /// [`Router::wait_for_schemas`] for one-shot commands: the first failure to reach the
    /// registry is returned instead of waited out.
    pub fn prepare_schemas<'e>(
        &self,
        events: impl IntoIterator<Item = &'e StoredEvent>,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send + '_ {
        self.prepare(events, false)
    }

    fn prepare<'e>(
        &self,
        events: impl IntoIterator<Item = &'e StoredEvent>,
        wait: bool,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send + '_ {
        // Decided before the first await, so the future holds no borrowed iterator.
        let missing = self.unregistered_subjects(events);
        async move {
            let Some(schemas) = &self.schemas else {
                return Ok(());
            };
            for (event_type, subject) in missing {
                let mut delay = Duration::from_millis(100);
                loop {
                    match schemas.register(&event_type, &subject).await {
                        Ok(_) => break,
                        Err(e) if wait => {
                            tracing::warn!(
                                event_type,
                                subject,
                                error = %e,
                                retry_in = ?delay,
                                "schema registry unavailable; relaying waits for it"
                            );
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(())
        }
    }

    /// The (event type, subject) pairs of schema'd `events` not registered yet, each once.
    fn unregistered_subjects<'e>(
        &self,
        events: impl IntoIterator<Item = &'e StoredEvent>,
    ) -> Vec<(String, String)> {
        let Some(schemas) = &self.schemas else {
            return Vec::new();
        };
        let mut missing: Vec<(String, String)> = Vec::new();
        for event in events {
            let Some(ts) = schemas.of(&event.event_type) else {
                continue;
            };
            if event.payload.is_none() {
                continue;
            }
            // An unroutable event is parked by `route` for that reason.
            let Ok(topic) = self.topic_for(event) else {
                continue;
            };
            let subject = ts.subject(&topic);
            if schemas.registration(&event.event_type, &subject).is_none()
                && !missing
                    .iter()
                    .any(|(t, s)| *t == event.event_type && *s == subject)
            {
                missing.push((event.event_type.clone(), subject));
            }
        }
        missing
    }

    /// The wire-format value of a schema'd event's payload, or `None` when the event type has
    /// no schema (the value stays the payload JSON).
    pub(super) fn encode_value(
        &self,
        event: &StoredEvent,
        topic: &str,
        payload: &str,
    ) -> Option<Result<(Vec<u8>, SchemaFormat), RouteError>> {
        let schemas = self.schemas.as_ref()?;
        let ts = schemas.of(&event.event_type)?;
        let subject = ts.subject(topic);
        let err = |reason: String| RouteError {
            id: event.id,
            reason,
        };
        Some(match schemas.registration(&event.event_type, &subject) {
            None => Err(err(format!(
                "event type `{}`: subject `{subject}` is not registered yet ({})",
                event.event_type,
                ts.describe()
            ))),
            Some(Err(refused)) => Err(err(format!("event type `{}`: {refused}", event.event_type))),
            Some(Ok(id)) => ts
                .schema
                .encode(id, payload)
                .map(|v| (v, ts.schema.format()))
                .map_err(|e| {
                    err(format!(
                        "event type `{}` does not fit its {}: {e}",
                        event.event_type,
                        ts.describe()
                    ))
                }),
        })
    }
}

/// Fixtures shared by the value-schema tests of the route and of the configuration.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::path::{Path, PathBuf};

    use super::ValueSchemaSettings;

    /// An Avro record `acct.Opened` with one `long` field `n`.
    pub(crate) const AVSC: &str = r#"{"type": "record", "name": "Opened", "namespace": "acct",
        "fields": [{"name": "n", "type": "long"}]}"#;

    /// A `[[route.value_schemas]]` entry without `message` or `subject_strategy`.
    pub(crate) fn entry(event_type: &str, format: &str, file: PathBuf) -> ValueSchemaSettings {
        ValueSchemaSettings {
            event_type: event_type.into(),
            format: format.into(),
            schema_file: file,
            message: None,
            subject_strategy: None,
        }
    }

    /// A fresh temporary directory, removed when dropped.
    pub(crate) struct SchemaDir(PathBuf);

    impl SchemaDir {
        pub(crate) fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("outbox-schemas-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        /// Writes `text` to the file `name` in the directory; its path.
        pub(crate) fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for SchemaDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{AVSC, SchemaDir, entry};
    use super::*;

    #[test]
    fn schemad_events_are_encoded_and_misfits_are_route_errors_naming_the_type() {
        let dir = SchemaDir::new();
        let file = dir.write("opened.avsc", AVSC);
        let mut route = RouteSettings::default();
        route.value_schemas = vec![entry("Opened", "avro", file)];
        route
            .routes
            .insert("Opened".into(), "accounts.{type}".into());
        let registry = RegistryConfig {
            url: "http://127.0.0.1:1".into(),
            username: None,
            password: None,
            timeout: Duration::from_secs(1),
            ca_pem: None,
        };
        let schemas = ValueSchemas::new(&route, SubjectStrategy::Topic, Some(&registry)).unwrap();
        let router = Router::new(&route).unwrap().with_value_schemas(schemas);
        let schemas = router.value_schemas().unwrap();
        assert_eq!(
            schemas.static_subjects(&router),
            vec![("Opened".to_owned(), "accounts.Opened-value".to_owned())]
        );
        let mut event = StoredEvent {
            id: uuid::Uuid::nil(),
            aggregate_type: "acct".into(),
            aggregate_id: "1".into(),
            event_type: "Opened".into(),
            payload: Some(r#"{"n": 5}"#.into()),
            seq: None,
            created_at: None,
            traceparent: None,
            headers: Vec::new(),
            schema_version: 1,
            topic: None,
            aggregate_seq: None,
        };
        // Not registered yet: never encoded without an id.
        assert!(
            router
                .route(&event)
                .unwrap_err()
                .reason
                .contains("not registered")
        );
        schemas.remember("Opened", "accounts.Opened-value", Ok(21));
        let rec = router.route(&event).unwrap();
        // Magic byte, id 21, then the zig-zag varint of 5.
        assert_eq!(rec.payload.as_deref(), Some(&[0, 0, 0, 0, 21, 10][..]));
        // The record holds the encoding: the event keeps its JSON (what the table stores).
        let mut moved = event.clone();
        assert_eq!(router.route_moving_payload(&mut moved).unwrap(), rec);
        assert_eq!(moved.payload, event.payload);
        assert!(
            rec.headers
                .iter()
                .any(|(k, v)| k == "content-type" && v == b"application/avro")
        );
        event.payload = Some(r#"{"n": "five"}"#.into());
        let e = router.route(&event).unwrap_err();
        assert!(e.reason.contains("event type `Opened`"), "{e}");
        assert!(e.reason.contains("$.n"), "{e}");
        // Other event types keep their JSON value.
        event.event_type = "Closed".into();
        let rec = router.route(&event).unwrap();
        assert_eq!(rec.payload.as_deref(), Some(&br#"{"n": "five"}"#[..]));
    }
}
