//! The command line: `outbox-relay run` (default) and `outbox-relay migrate`.
//!
//! Every flag can also be set with the environment variable shown in `--help`.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{ConfigError, RelayConfig, Secret, SourceKind, duration};
use crate::source::polling::RowAcknowledgement;

/// Relay committed outbox events from PostgreSQL to Kafka.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about, long_about = None)]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "OUTBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings for the default `run` command.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay events until SIGTERM/SIGINT (the default).
    Run(Box<RunArgs>),
    /// Create or upgrade the outbox table, then exit.
    Migrate(MigrateArgs),
}

/// Connection settings shared by every command.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://relay:secret@db:5432/app?sslmode=verify-full.
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The outbox table, `table` or `schema.table`.
    #[arg(long, env = "OUTBOX_TABLE")]
    pub table: Option<String>,
}

/// Settings of `migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Database and table.
    #[command(flatten)]
    pub db: DatabaseArgs,
}

/// Settings of `run`.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// PostgreSQL URL, e.g. postgres://relay:secret@db:5432/app?sslmode=verify-full.
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The outbox table, `table` or `schema.table`.
    #[arg(long, env = "OUTBOX_TABLE")]
    pub table: Option<String>,
    /// Kafka bootstrap servers, e.g. broker1:9092,broker2:9092.
    #[arg(long, env = "OUTBOX_KAFKA_BOOTSTRAP_SERVERS")]
    pub kafka_bootstrap_servers: Option<String>,
    /// Extra librdkafka producer property, `key=value` (repeatable; comma-separated in the
    /// variable). Idempotence and acks=all cannot be turned off.
    #[arg(
        long = "kafka-property",
        env = "OUTBOX_KAFKA_PROPERTIES",
        value_delimiter = ','
    )]
    pub kafka_properties: Vec<String>,
    /// Where events are read from: polling or logical.
    #[arg(long, env = "OUTBOX_SOURCE")]
    pub source: Option<String>,
    /// How services write events: table, insert_delete or logical_message.
    #[arg(long, env = "OUTBOX_WRITE_MODE")]
    pub write_mode: Option<String>,
    /// Topic template; placeholders {aggregatetype} and {type}.
    #[arg(long, env = "OUTBOX_TOPIC")]
    pub topic: Option<String>,
    /// Per-event-type topic, `EventType=topic-template` (repeatable; comma-separated in the
    /// variable).
    #[arg(long = "route", env = "OUTBOX_ROUTES", value_delimiter = ',')]
    pub routes: Vec<String>,
    /// Turn CloudEvents binary-mode headers off or on.
    #[arg(long, env = "OUTBOX_CLOUDEVENTS")]
    pub cloudevents: Option<bool>,
    /// Most events per round.
    #[arg(long, env = "OUTBOX_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Longest wait between polls, e.g. 1s.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL", value_parser = duration::parse)]
    pub poll_interval: Option<Duration>,
    /// What to do with a published row: mark or delete.
    #[arg(long, env = "OUTBOX_ACKNOWLEDGEMENT")]
    pub acknowledgement: Option<String>,
    /// How long marked rows are kept, e.g. 24h (0s keeps them).
    #[arg(long, env = "OUTBOX_RETENTION", value_parser = duration::parse)]
    pub retention: Option<Duration>,
    /// How long to drain on SIGTERM before exiting anyway, e.g. 30s.
    #[arg(long, env = "OUTBOX_SHUTDOWN_TIMEOUT", value_parser = duration::parse)]
    pub shutdown_timeout: Option<Duration>,
    /// How often a standby checks whether it can take over, e.g. 1s.
    #[arg(long, env = "OUTBOX_STANDBY_INTERVAL", value_parser = duration::parse)]
    pub standby_interval: Option<Duration>,
    /// How long start-up waits for PostgreSQL and Kafka, e.g. 10s.
    #[arg(long, env = "OUTBOX_CONNECT_TIMEOUT", value_parser = duration::parse)]
    pub connect_timeout: Option<Duration>,
    /// Replication slot (logical source).
    #[arg(long, env = "OUTBOX_SLOT")]
    pub slot: Option<String>,
    /// Publication (logical source).
    #[arg(long, env = "OUTBOX_PUBLICATION")]
    pub publication: Option<String>,
    /// Idle heartbeat interval (logical source), e.g. 10s.
    #[arg(long, env = "OUTBOX_HEARTBEAT_INTERVAL", value_parser = duration::parse)]
    pub heartbeat_interval: Option<Duration>,
    /// How often the confirmed position is reported to the server (logical source), e.g. 1s.
    #[arg(long, env = "OUTBOX_STATUS_INTERVAL", value_parser = duration::parse)]
    pub status_interval: Option<Duration>,
}

fn key_value(key: &str, item: &str) -> Result<(String, String), ConfigError> {
    item.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| ConfigError::new(key, format!("`{item}` is not key=value")))
}

impl RunArgs {
    /// Applies the flags and variables that were given on top of `config`.
    pub fn apply(&self, config: &mut RelayConfig) -> Result<(), ConfigError> {
        if let Some(v) = &self.database_url {
            config.database_url = Secret::new(v.clone());
        }
        if let Some(v) = &self.table {
            config.table = v.clone();
        }
        if let Some(v) = &self.kafka_bootstrap_servers {
            config.kafka.bootstrap_servers = v.clone();
        }
        for item in &self.kafka_properties {
            let (k, v) = key_value("kafka.properties", item)?;
            config.kafka.properties.insert(k, v);
        }
        if let Some(v) = &self.source {
            config.source = SourceKind::parse(v).ok_or_else(|| {
                ConfigError::new("source", format!("unknown source `{v}` (polling, logical)"))
            })?;
        }
        if let Some(v) = &self.write_mode {
            config.write_mode = outbox_core::WriteMode::parse(v).ok_or_else(|| {
                ConfigError::new(
                    "write_mode",
                    format!("unknown write mode `{v}` (table, insert_delete, logical_message)"),
                )
            })?;
        }
        if let Some(v) = &self.topic {
            config.route.topic = v.clone();
        }
        for item in &self.routes {
            let (k, v) = key_value("route.routes", item)?;
            config.route.routes.insert(k, v);
        }
        if let Some(v) = self.cloudevents {
            config.route.cloudevents = v;
        }
        if let Some(v) = self.batch_size {
            config.batch_size = v;
        }
        if let Some(v) = self.poll_interval {
            config.poll_interval = v;
        }
        if let Some(v) = &self.acknowledgement {
            config.acknowledgement = RowAcknowledgement::parse(v).ok_or_else(|| {
                ConfigError::new(
                    "acknowledgement",
                    format!("unknown acknowledgement `{v}` (mark, delete)"),
                )
            })?;
        }
        if let Some(v) = self.retention {
            config.retention = v;
        }
        if let Some(v) = self.shutdown_timeout {
            config.shutdown_timeout = v;
        }
        if let Some(v) = self.standby_interval {
            config.standby_interval = v;
        }
        if let Some(v) = self.connect_timeout {
            config.connect_timeout = v;
            config.kafka.connect_timeout = v;
        }
        if let Some(v) = &self.slot {
            config.logical.slot = v.clone();
        }
        if let Some(v) = &self.publication {
            config.logical.publication = v.clone();
        }
        if let Some(v) = self.status_interval {
            config.logical.status_interval = v;
        }
        if let Some(v) = self.heartbeat_interval {
            config.logical.heartbeat_interval = v;
        }
        Ok(())
    }
}
