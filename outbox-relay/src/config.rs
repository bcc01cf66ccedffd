//! The relay's typed configuration.
//!
//! Every setting has a default that works against a local PostgreSQL and Kafka; the binary fills
//! it from flags and `OUTBOX_*` environment variables ([`crate::cli`]). Validation happens once,
//! before any connection is made, and every error names the setting.

use std::fmt;
use std::time::Duration;

use outbox_core::{OutboxTable, WriteMode};

pub mod kafka;
pub mod load;
pub mod nats;
pub mod rabbitmq;
pub mod redis;
pub mod schema;
pub mod tables;
pub mod telemetry;
mod validate;

pub use kafka::{KafkaPropertyError, KafkaSettings};
pub use nats::{NatsSettings, NatsStreamSettings};
pub use rabbitmq::RabbitmqSettings;
pub use redis::RedisSettings;
pub use schema::SchemaRegistrySettings;
pub use tables::{OutboxEntry, TableOrigin, TablePattern};
pub use telemetry::TelemetrySettings;

use crate::route::RouteSettings;

/// A secret string (a database URL with a password, a SASL password, the admin token): its
/// `Debug` and `Serialize` print `<redacted>`, it has no `Display`, and the value is reachable
/// only through [`Secret::expose`].
///
/// The one secret type of the relay. (`secrecy::SecretString` was considered: it offers the same
/// guarantee plus zeroing on drop, but has no `PartialEq` and serializes only through an opt-in
/// marker, while the configuration must be compared in tests and rendered redacted by
/// `config print`, so a wrapper would still hand-write `Debug`, `Serialize`, `PartialEq` and
/// `Default`. Zeroing this copy would not clear the secret from the process either: sqlx's
/// connection options, the replication client and librdkafka each keep their own plain copy for
/// as long as the relay runs. One small type keeps the guarantee without a new dependency.)
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Whether a free-form setting name (a librdkafka passthrough property such as
/// `sasl.password`, `sasl.oauthbearer.config`, `ssl.key.pem`, `ssl.keystore.password`, or any
/// name containing `password`, `secret`, `token`, `credential`, `jaas` or `private`) holds a
/// secret. Such values are replaced by `<redacted>` in `Debug`, `config print` and logs.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    const EXACT: &[&str] = &["sasl.oauthbearer.config", "ssl.key.pem"];
    const PARTS: &[&str] = &[
        "password",
        "passwd",
        "secret",
        "token",
        "credential",
        "jaas",
        "private",
        "oauthbearer.config",
    ];
    EXACT.contains(&key.as_str()) || PARTS.iter().any(|p| key.contains(p))
}

/// A map of free-form settings for `Debug`: values of [secret keys](is_secret_key) are shown as
/// `<redacted>`.
pub struct RedactedMap<'a>(pub &'a std::collections::BTreeMap<String, String>);

impl fmt::Debug for RedactedMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if is_secret_key(k) { "<redacted>" } else { v };
                (k, shown)
            }))
            .finish()
    }
}

/// A database URL with its secrets replaced by `***`, for messages: the password of the
/// `user:password@` part and the value of any `password`/`sslpassword` (or other
/// [secret-named](is_secret_key)) query parameter. User, host, port, database and the other
/// parameters are shown as given (`postgres://app:***@db:5432/app?sslmode=require`).
///
/// The URL is parsed with the `url` crate (as sqlx parses it). Text it cannot parse (a bad
/// port, a password with a `/`, several hosts, or no URL at all) is shown more coarsely, so that
/// the secret never depends on where a hand-written parser would cut: everything up to the last
/// `@` before the query becomes `***`, and text that does not look like a URL is not shown.
pub fn redact_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                // Fails only for URLs that cannot have credentials, which then have none.
                let _ = parsed.set_password(Some("***"));
            }
            if let Some(query) = parsed.query().map(redact_query) {
                parsed.set_query(Some(&query));
            }
            parsed.to_string()
        }
        Err(_) => redact_unparsed(text),
    }
}

/// The query string with the value of every [secret-named](is_secret_key) parameter replaced
/// by `***`; the rest is kept byte for byte. Names are compared percent-decoded, so an encoded
/// `pass%77ord` is caught too.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let name = pair.split_once('=').map_or(pair, |(name, _)| name);
            let decoded = url::form_urlencoded::parse(name.as_bytes())
                .next()
                .map(|(name, _)| name.into_owned())
                .unwrap_or_default();
            if pair.contains('=') && is_secret_key(&decoded) {
                format!("{name}=***")
            } else {
                pair.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The coarse redaction of [`redact_url`] for text the `url` crate cannot parse.
fn redact_unparsed(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return "<not a URL>".to_owned();
    };
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return "<not a URL>".to_owned();
    }
    let (base, query) = match rest.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (rest, None),
    };
    let mut shown = match base.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}"),
        None => format!("{scheme}://{base}"),
    };
    if let Some(query) = query {
        shown.push('?');
        shown.push_str(&redact_query(query));
    }
    shown
}

/// Which source reads the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Poll the table for unpublished rows (LISTEN/NOTIFY wake-ups).
    #[default]
    Polling,
    /// Stream the table's inserts (or logical messages) from a replication slot (pgoutput).
    Logical,
}

impl SourceKind {
    /// Parses `polling` or `logical`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "polling" => Some(Self::Polling),
            "logical" => Some(Self::Logical),
            _ => None,
        }
    }
}

/// The broker a relay publishes to (`sink = "kafka"`, `--sink`, `OUTBOX_SINK`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// Apache Kafka (or any Kafka-protocol broker), through an idempotent producer.
    #[default]
    Kafka,
    /// NATS JetStream.
    Nats,
    /// RabbitMQ (AMQP 0-9-1) with publisher confirms.
    Rabbitmq,
    /// Redis Streams.
    Redis,
}

impl SinkKind {
    /// The name used in settings, logs and metrics (`kafka`, `nats`, `rabbitmq`, `redis`).
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Kafka => "kafka",
            SinkKind::Nats => "nats",
            SinkKind::Rabbitmq => "rabbitmq",
            SinkKind::Redis => "redis",
        }
    }

    /// The broker's name as people write it (`Kafka`, `NATS`, `RabbitMQ`, `Redis`), for messages.
    pub fn broker(self) -> &'static str {
        match self {
            SinkKind::Kafka => "Kafka",
            SinkKind::Nats => "NATS",
            SinkKind::Rabbitmq => "RabbitMQ",
            SinkKind::Redis => "Redis",
        }
    }
}

/// What the relay does to a row once Kafka acknowledged its event (`table` write mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowAcknowledgement {
    /// Set `published_at`; rows are kept for `retention` (replay, audit, status), then purged.
    #[default]
    Mark,
    /// Delete the row: the table holds only unpublished events.
    Delete,
}

impl RowAcknowledgement {
    /// Parses `mark` or `delete`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "mark" => Some(Self::Mark),
            "delete" => Some(Self::Delete),
            _ => None,
        }
    }
}

/// Settings of the logical-replication source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogicalSettings {
    /// Replication slot name (`[a-z0-9_]`, at most 63 bytes).
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// How often an idle relay emits a heartbeat so the slot keeps advancing.
    #[serde(with = "duration")]
    pub heartbeat_interval: Duration,
    /// How often the relay reports its confirmed position to the server.
    #[serde(with = "duration")]
    pub status_interval: Duration,
    /// Logical decoding message prefix of the `logical_message` write mode.
    pub message_prefix: String,
}

impl Default for LogicalSettings {
    fn default() -> Self {
        Self {
            slot: "outbox_relay".to_owned(),
            publication: "outbox_relay".to_owned(),
            heartbeat_interval: Duration::from_secs(10),
            status_interval: Duration::from_secs(1),
            message_prefix: outbox_core::DEFAULT_MESSAGE_PREFIX.to_owned(),
        }
    }
}

/// Access control and caching of the admin endpoint ([`crate::admin`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Bearer token that `/status` (and `/metrics` with `metrics_auth`) require
    /// (`Authorization: Bearer <token>`); `/healthz` and `/readyz` stay open for probes. Unset:
    /// no authentication. Secret (`OUTBOX_ADMIN__TOKEN`, or `OUTBOX_ADMIN__TOKEN_FILE`).
    pub token: Option<Secret>,
    /// Whether `/metrics` requires the token too (default: no, so annotation-based Prometheus
    /// scraping keeps working; its figures carry no ids, payloads or secrets).
    pub metrics_auth: bool,
    /// How long one reading of the outbox status serves `/status` and `/metrics`: the endpoint
    /// queries the database at most once per this interval, whatever the request rate.
    #[serde(with = "duration")]
    pub status_refresh: Duration,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            token: None,
            metrics_auth: false,
            status_refresh: Duration::from_secs(5),
        }
    }
}

/// The whole relay configuration.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// PostgreSQL URL (`sslmode` and the other libpq URL parameters are honoured). Secret.
    pub database_url: Secret,
    /// `polling` or `logical`.
    pub source: SourceKind,
    /// The broker events are published to: `kafka` (default), `nats`, `rabbitmq` or `redis`.
    pub sink: SinkKind,
    /// The outbox table, `table` or `schema.table` (single-table mode; leave it at its default
    /// with `[[outbox]]` or `tables`).
    pub table: String,
    /// Several outbox tables in one relay: one `[[outbox]]` section per table, each with
    /// optional overrides ([`OutboxEntry`]); one pipeline per table ([`crate::RelayGroup`]).
    pub outbox: Vec<OutboxEntry>,
    /// Every table matching a pattern `<schema glob>.<table>` (e.g. `tenant_*.outbox`): matching
    /// migrated tables are relayed, the list re-read every `tables_rescan_interval`
    /// (`OUTBOX_TABLES`, `--tables`).
    pub tables: Option<String>,
    /// How often the `tables` pattern is matched again: a new migrated table starts relaying, a
    /// dropped one's pipeline stops (default 30s).
    #[serde(with = "duration")]
    pub tables_rescan_interval: Duration,
    /// Most tables one relay relays (default 256): bounds the `table` label of every metric and
    /// the database sessions held; more `[[outbox]]` sections, or more pattern matches, are an
    /// error naming this setting.
    pub max_tables: usize,
    /// Sessions of the pool every table of the relay shares for its row acknowledgements and
    /// purges (default 4); a table uses at most half of it (at least one, at most two) at a time,
    /// and waits its turn for the rest. Each table also holds its own leader-lock session, so a
    /// relay holds at most `tables + pool_size + 3` sessions (one shared `LISTEN` session and
    /// the admin endpoint's two; see docs/operations.md).
    pub pool_size: usize,
    /// How services write events; must match their `outbox-core` setting.
    #[serde(with = "write_mode")]
    pub write_mode: WriteMode,
    /// Most events per claim/produce/acknowledge round.
    pub batch_size: usize,
    /// How many batches may be produced ahead while the oldest awaits Kafka's verdict (1 turns
    /// pipelining off). After a delivery failure everything in flight is produced again, so
    /// this bounds the duplicates a failure can cause: `batch_size × max_in_flight_batches`.
    pub max_in_flight_batches: usize,
    /// Most payload bytes in flight (default 64 MiB): each batch is cut at
    /// `max_in_flight_bytes / (max_in_flight_batches + 1)` (the polling source cuts the claim
    /// itself) and the relay claims another batch only while the window and that batch fit
    /// within the bound. A single event larger than that is still taken alone, so progress is
    /// guaranteed.
    pub max_in_flight_bytes: usize,
    /// Longest wait between polls when no notification arrives (polling source): an idle relay
    /// polls this often; while rows keep coming it polls within a few milliseconds.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// Whether the polling source listens for the optional insert trigger's notifications
    /// (`outbox_core::notify_trigger_sql`).
    pub listen: bool,
    /// What happens to a published row in the `table` write mode.
    pub acknowledgement: RowAcknowledgement,
    /// How long marked rows are kept before they are purged (`0s` keeps them forever).
    #[serde(with = "duration")]
    pub retention: Duration,
    /// How often a standby checks whether it can become active.
    #[serde(with = "duration")]
    pub standby_interval: Duration,
    /// The active relay's lease ([`crate::leader`]): the server ends the lock session of a leader
    /// that has been silent this long (a paused process), so a standby can take over; the leader
    /// heartbeats every quarter of it and stops producing and acknowledging after three quarters
    /// without a successful heartbeat.
    #[serde(with = "duration")]
    pub leader_lease: Duration,
    /// Split the table's aggregates into this many shards (1 to 1024) so that several relay
    /// instances relay the table together, each the shards it owns ([`crate::shard`]); unset
    /// (the default): one active relay per table, the others stand by. Polling source only;
    /// every instance of a table must use the same count, and `migrate` with it creates the
    /// shard index.
    pub shards: Option<u32>,
    /// How long a stopping relay may take to drain before it exits anyway.
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// How long start-up waits for PostgreSQL.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Address of the admin HTTP endpoint (`/healthz`, `/readyz`, `/metrics`, `/status`);
    /// off when unset.
    pub admin_addr: Option<std::net::SocketAddr>,
    /// Access control and caching of the admin endpoint.
    pub admin: AdminSettings,
    /// Topic on which parked (poison) events are announced, if any.
    pub dead_letter_topic: Option<String>,
    /// Routing.
    pub route: RouteSettings,
    /// The schema registry of the route's value schemas (`[[route.value_schemas]]`).
    pub schema_registry: SchemaRegistrySettings,
    /// The Kafka producer.
    pub kafka: KafkaSettings,
    /// The NATS JetStream sink (`sink = "nats"`).
    pub nats: NatsSettings,
    /// The Redis Streams sink (`sink = "redis"`).
    pub redis: RedisSettings,
    /// The RabbitMQ sink (`sink = "rabbitmq"`).
    pub rabbitmq: RabbitmqSettings,
    /// The logical-replication source.
    pub logical: LogicalSettings,
    /// OpenTelemetry producer spans ([`crate::telemetry`]).
    pub telemetry: TelemetrySettings,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            database_url: Secret::new("postgres://postgres@localhost:5432/postgres"),
            source: SourceKind::Polling,
            sink: SinkKind::Kafka,
            table: OutboxTable::DEFAULT_NAME.to_owned(),
            outbox: Vec::new(),
            tables: None,
            tables_rescan_interval: Duration::from_secs(30),
            max_tables: tables::DEFAULT_MAX_TABLES,
            pool_size: 4,
            write_mode: WriteMode::Table,
            batch_size: 1000,
            max_in_flight_batches: 3,
            max_in_flight_bytes: 64 * 1024 * 1024,
            poll_interval: Duration::from_millis(250),
            listen: true,
            acknowledgement: RowAcknowledgement::Mark,
            retention: Duration::from_secs(24 * 3600),
            standby_interval: Duration::from_secs(1),
            leader_lease: Duration::from_secs(10),
            shards: None,
            shutdown_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            admin_addr: None,
            admin: AdminSettings::default(),
            dead_letter_topic: None,
            route: RouteSettings::default(),
            schema_registry: SchemaRegistrySettings::default(),
            kafka: KafkaSettings::default(),
            nats: NatsSettings::default(),
            redis: RedisSettings::default(),
            rabbitmq: RabbitmqSettings::default(),
            logical: LogicalSettings::default(),
            telemetry: TelemetrySettings::default(),
        }
    }
}

/// A configuration error: the setting and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{key}`: {reason}")]
pub struct ConfigError {
    /// The setting's name (as in the config file; flags and variables map to it).
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl ConfigError {
    /// An error for `key`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Durations written as `500ms`, `30s`, `5m`, `24h`, `7d` (a bare number is seconds).
pub mod duration {
    use std::time::Duration;

    /// Parses a duration: a number of seconds (`30`, `0.5`) or a `humantime` duration —
    /// `500ms`, `30s`, `5m`, `24h`, `7d`, and combinations such as `1h30m` or `1h 30m`.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        if let Ok(secs) = text.parse::<f64>() {
            return Duration::try_from_secs_f64(secs)
                .map_err(|_| format!("`{text}` is not a valid duration"));
        }
        humantime::parse_duration(text).map_err(|e| {
            format!("`{text}` is not a duration ({e}; e.g. 500ms, 30s, 5m, 1h30m, 7d)")
        })
    }

    /// Formats a duration in the largest unit that keeps it exact.
    pub fn format(d: &Duration) -> String {
        let ms = d.as_millis();
        if ms.is_multiple_of(86_400_000) && ms > 0 {
            format!("{}d", ms / 86_400_000)
        } else if ms.is_multiple_of(3_600_000) && ms > 0 {
            format!("{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            format!("{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        }
    }

    pub(crate) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(d))
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

mod write_mode {
    use outbox_core::WriteMode;

    pub(crate) fn serialize<S: serde::Serializer>(m: &WriteMode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(m.as_str())
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<WriteMode, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        WriteMode::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown write mode `{text}` (table, insert_delete, logical_message)"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            duration::parse("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(duration::parse("30").unwrap(), Duration::from_secs(30));
        assert_eq!(duration::parse("24h").unwrap(), Duration::from_secs(86400));
        assert!(duration::parse("5 parsecs").is_err());
        assert!(duration::parse("-1").is_err());
        assert_eq!(duration::parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            duration::parse("1h 30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            duration::parse("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(duration::parse("2min").unwrap(), Duration::from_secs(120));
        for d in ["500ms", "30s", "5m", "24h", "7d", "90m"] {
            let parsed = duration::parse(d).unwrap();
            assert_eq!(
                duration::parse(&duration::format(&parsed)).unwrap(),
                parsed,
                "{d}"
            );
        }
        assert_eq!(duration::format(&Duration::from_secs(86400)), "1d");
        assert_eq!(duration::format(&Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn url_redaction_shows_user_and_host_never_the_password() {
        let cases = [
            // Parsed by the url crate.
            (
                "postgresql://app:s3cret@DB.example:6432/app?sslmode=verify-full",
                "postgresql://app:***@DB.example:6432/app?sslmode=verify-full",
            ),
            (
                "postgres://app:s3%2Fcret@[::1]:5432/app",
                "postgres://app:***@[::1]:5432/app",
            ),
            (
                "postgres://app@db/app?pass%77ord=s3cret&application_name=relay",
                "postgres://app@db/app?pass%77ord=***&application_name=relay",
            ),
            ("postgres://db/app", "postgres://db/app"),
            // Not parseable: coarser, still without the secret.
            (
                "postgres://app:s3cret@127.0.0.1:notaport/db?password=s3cret",
                "postgres://***@127.0.0.1:notaport/db?password=***",
            ),
            ("postgres://app:s3/cret@db/app", "postgres://***@db/app"),
            (
                "postgres://app:s3cret@h1:5432,h2:5433/app",
                "postgres://***@h1:5432,h2:5433/app",
            ),
            ("host=db password=s3cret", "<not a URL>"),
            ("s3cret", "<not a URL>"),
        ];
        for (given, shown) in cases {
            let redacted = redact_url(given);
            assert_eq!(redacted, shown, "{given}");
            assert!(!redacted.contains("s3"), "{given} → {redacted}");
        }
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(
            redact_url("postgres://app@db/x?sslmode=require&password=s3cret&sslpassword=k3y"),
            "postgres://app@db/x?sslmode=require&password=***&sslpassword=***"
        );
        assert_eq!(
            redact_url("postgres://app:p@ss@db/x?application_name=a@b"),
            "postgres://app:***@db/x?application_name=a@b"
        );
        for key in [
            "sasl.password",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.jaas.config",
            "Some.Token",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in [
            "linger.ms",
            "sasl.mechanism",
            "ssl.ca.location",
            "security.protocol",
        ] {
            assert!(!is_secret_key(key), "{key}");
        }
        let mut c = RelayConfig::default();
        for (k, v) in [
            ("sasl.password", "hunter2"),
            ("sasl.oauthbearer.config", "principal=me token=t0ken"),
            ("ssl.keystore.password", "k3ystore"),
            ("linger.ms", "7"),
        ] {
            c.kafka.properties.insert(k.into(), v.into());
        }
        let debug = format!("{c:?}");
        for secret in ["hunter2", "t0ken", "k3ystore"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(debug.contains("\"linger.ms\": \"7\""), "{debug}");
        let c = RelayConfig {
            database_url: Secret::new("postgres://a:s3cret@h/d"),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
