//! The command line, in the manner of `sqlx-cli`: `run` (the default), `migrate`, `config …`.
//!
//! Settings come from defaults < a TOML file (`--config` / `OUTBOX_CONFIG`) < `OUTBOX_*`
//! environment variables < flags (see [`crate::config::load`]). Every flag below also shows the
//! variable that sets it; `--set key=value` reaches any key.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{ConfigError, duration};

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
    pub settings: Settings,
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
    Run(Box<Settings>),
    /// Create or upgrade the outbox table (and its parked-events table), then exit.
    Migrate(Box<Settings>),
    /// Pending events, oldest pending age, last published event, parked events, slot lag.
    Status {
        /// Print JSON (the same document as the admin endpoint /status).
        #[arg(long)]
        json: bool,
        /// Settings.
        #[command(flatten)]
        settings: Box<Settings>,
    },
    /// Kafka topics the relay publishes to.
    Topics {
        /// What to do.
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Re-publish events still in the table, with their original ids and order (with several
    /// tables: the one named by --table, routed by its own route).
    Replay {
        /// Which events.
        #[command(flatten)]
        filter: ReplayArgs,
        /// Settings.
        #[command(flatten)]
        settings: Box<Settings>,
    },
    /// Events parked because they can never be published (and those held behind them); with
    /// several tables, --table names the table (`list` without it lists every table's).
    Parked {
        /// What to do.
        #[command(subcommand)]
        action: ParkedAction,
    },
    /// Logical-replication slots.
    Slot {
        /// What to do.
        #[command(subcommand)]
        action: SlotAction,
    },
    /// Check or show the effective configuration.
    Config {
        /// What to do with it.
        #[command(subcommand)]
        action: ConfigAction,
    },
}

/// `topics` subcommands.
#[derive(Debug, Subcommand)]
pub enum TopicsAction {
    /// Create the routed topics (from the table's aggregate and event types, the fixed routes and
    /// the dead-letter topic) and any given with --add; existing topics are left alone. With
    /// several tables: the routed topics of every configured table, each by its own route.
    Ensure {
        /// Another topic to create (repeatable).
        #[arg(long = "add", value_name = "TOPIC")]
        topics: Vec<String>,
        /// Partitions of each new topic.
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        /// Replication factor of each new topic.
        #[arg(long, default_value_t = 3)]
        replication_factor: i32,
        /// Topic config `key=value` (repeatable), e.g. min.insync.replicas=2.
        #[arg(long = "topic-config")]
        topic_configs: Vec<String>,
        /// Settings.
        #[command(flatten)]
        settings: Box<Settings>,
    },
}

/// Filters of `replay`.
#[derive(Debug, Clone, Default, Args)]
pub struct ReplayArgs {
    /// Events created at or after this time (RFC 3339, or a duration ago such as 2h).
    #[arg(long)]
    pub from: Option<String>,
    /// Events created before this time (RFC 3339, or a duration ago).
    #[arg(long)]
    pub to: Option<String>,
    /// Events with an id at or after this one.
    #[arg(long)]
    pub from_id: Option<uuid::Uuid>,
    /// Events with an id at or before this one.
    #[arg(long)]
    pub to_id: Option<uuid::Uuid>,
    /// Only this event type (repeatable).
    #[arg(long = "type")]
    pub event_types: Vec<String>,
    /// Only this aggregate type.
    #[arg(long)]
    pub aggregate_type: Option<String>,
}

/// `parked` subcommands.
#[derive(Debug, Subcommand)]
pub enum ParkedAction {
    /// List parked events in replay order (with several tables and no --table: every table's,
    /// each line or JSON object naming its table).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Settings.
        #[command(flatten)]
        settings: Box<Settings>,
    },
    /// Publish parked events (whole aggregates, in order) and unblock their aggregates.
    Retry {
        /// Event ids (their aggregates are retried).
        ids: Vec<uuid::Uuid>,
        /// Every parked event.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Settings (e.g. a raised --kafka-property message.max.bytes=…).
        #[command(flatten)]
        settings: Box<Settings>,
    },
    /// Delete parked events without publishing them.
    Drop {
        /// Event ids.
        ids: Vec<uuid::Uuid>,
        /// Every parked event.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Settings.
        #[command(flatten)]
        settings: Box<Settings>,
    },
}

/// `slot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SlotAction {
    /// List the server's replication slots with their lag and WAL status.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Settings.
        #[command(flatten)]
        settings: Box<Settings>,
    },
    /// Drop an inactive replication slot and forget it in `outbox_relay_state`; for a slot that
    /// is already gone, only forget it (accepting its loss: the next start creates a new slot).
    Drop {
        /// The slot's name.
        name: String,
        /// Settings.
        #[command(flatten)]
        settings: Box<Settings>,
    },
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Load and validate the configuration; exit 2 naming the bad key when it is invalid.
    Validate(Box<Settings>),
    /// Print the effective configuration as TOML, secrets redacted.
    Print(Box<Settings>),
}

/// Every setting that has its own flag, plus `--config` and `--set`.
#[derive(Debug, Clone, Default, Args)]
pub struct Settings {
    /// TOML configuration file.
    #[arg(long = "config", env = "OUTBOX_CONFIG")]
    pub config_file: Option<PathBuf>,
    /// Set any configuration key, e.g. `--set kafka.delivery_timeout=10s` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// PostgreSQL URL, e.g. postgres://relay:secret@db:5432/app?sslmode=verify-full
    /// [key: database_url; also OUTBOX_DATABASE_URL_FILE].
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The outbox table, `table` or `schema.table` [key: table]. With several tables
    /// (`[[outbox]]` sections or `tables`), `replay` and `parked …` take it as the one configured
    /// table to act on (required by `replay`, `parked retry` and `parked drop`).
    #[arg(long, env = "OUTBOX_TABLE")]
    pub table: Option<String>,
    /// Relay every migrated table matching `<schema glob>.<table>`, e.g. `tenant_*.outbox`,
    /// re-read every `tables_rescan_interval` [key: tables].
    #[arg(long, env = "OUTBOX_TABLES")]
    pub tables: Option<String>,
    /// Kafka bootstrap servers, e.g. broker1:9092,broker2:9092 [key: kafka.bootstrap_servers].
    #[arg(long, env = "OUTBOX_KAFKA_BOOTSTRAP_SERVERS")]
    pub kafka_bootstrap_servers: Option<String>,
    /// Extra librdkafka producer property, `key=value` (repeatable; comma-separated in the
    /// variable) [key: kafka.properties.*]. Idempotence and acks=all cannot be turned off.
    #[arg(
        long = "kafka-property",
        env = "OUTBOX_KAFKA_PROPERTIES",
        value_delimiter = ','
    )]
    pub kafka_properties: Vec<String>,
    /// Where events are read from: polling or logical [key: source].
    #[arg(long, env = "OUTBOX_SOURCE")]
    pub source: Option<String>,
    /// Where events are published: kafka, nats, rabbitmq or redis [key: sink].
    #[arg(long, env = "OUTBOX_SINK")]
    pub sink: Option<String>,
    /// How services write events: table, insert_delete or logical_message [key: write_mode].
    #[arg(long, env = "OUTBOX_WRITE_MODE")]
    pub write_mode: Option<String>,
    /// Topic template; placeholders {aggregatetype} and {type} [key: route.topic].
    #[arg(long, env = "OUTBOX_TOPIC")]
    pub topic: Option<String>,
    /// Per-event-type topic, `EventType=topic-template` (repeatable; comma-separated in the
    /// variable) [key: route.routes.*].
    #[arg(long = "route", env = "OUTBOX_ROUTES", value_delimiter = ',')]
    pub routes: Vec<String>,
    /// CloudEvents attributes on (true) or off (false) [key: route.cloudevents].
    #[arg(long, env = "OUTBOX_CLOUDEVENTS")]
    pub cloudevents: Option<bool>,
    /// Most events per round [key: batch_size].
    #[arg(long, env = "OUTBOX_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Most payload bytes in flight, e.g. 67108864 [key: max_in_flight_bytes].
    #[arg(long, env = "OUTBOX_MAX_IN_FLIGHT_BYTES")]
    pub max_in_flight_bytes: Option<usize>,
    /// Longest wait between polls, e.g. 1s [key: poll_interval].
    #[arg(long, env = "OUTBOX_POLL_INTERVAL", value_parser = duration::parse)]
    pub poll_interval: Option<Duration>,
    /// What to do with a published row: mark or delete [key: acknowledgement].
    #[arg(long, env = "OUTBOX_ACKNOWLEDGEMENT")]
    pub acknowledgement: Option<String>,
    /// How long marked rows are kept, e.g. 24h; 0s keeps them [key: retention].
    #[arg(long, env = "OUTBOX_RETENTION", value_parser = duration::parse)]
    pub retention: Option<Duration>,
    /// How long to drain on SIGTERM before exiting anyway, e.g. 30s [key: shutdown_timeout].
    #[arg(long, env = "OUTBOX_SHUTDOWN_TIMEOUT", value_parser = duration::parse)]
    pub shutdown_timeout: Option<Duration>,
    /// How often a standby checks whether it can take over, e.g. 1s [key: standby_interval].
    #[arg(long, env = "OUTBOX_STANDBY_INTERVAL", value_parser = duration::parse)]
    pub standby_interval: Option<Duration>,
    /// Split the table into this many shards (1 to 1024) so several relays share it; `migrate`
    /// with it creates the shard index [key: shards].
    #[arg(long, env = "OUTBOX_SHARDS")]
    pub shards: Option<String>,
    /// How long start-up waits for PostgreSQL and Kafka, e.g. 10s [key: connect_timeout].
    #[arg(long, env = "OUTBOX_CONNECT_TIMEOUT", value_parser = duration::parse)]
    pub connect_timeout: Option<Duration>,
    /// Replication slot (logical source) [key: logical.slot].
    #[arg(long, env = "OUTBOX_SLOT")]
    pub slot: Option<String>,
    /// Publication (logical source) [key: logical.publication].
    #[arg(long, env = "OUTBOX_PUBLICATION")]
    pub publication: Option<String>,
    /// Idle heartbeat interval (logical source), e.g. 10s [key: logical.heartbeat_interval].
    #[arg(long, env = "OUTBOX_HEARTBEAT_INTERVAL", value_parser = duration::parse)]
    pub heartbeat_interval: Option<Duration>,
    /// How often the confirmed position is reported to the server (logical source), e.g. 1s
    /// [key: logical.status_interval].
    #[arg(long, env = "OUTBOX_STATUS_INTERVAL", value_parser = duration::parse)]
    pub status_interval: Option<Duration>,
}

fn key_value(key: &str, item: &str) -> Result<(String, String), ConfigError> {
    item.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| ConfigError::new(key, format!("`{item}` is not key=value")))
}

impl Settings {
    /// The settings given as flags (or their variables), as `key=value` pairs for the
    /// highest-precedence configuration layer.
    pub fn pairs(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut put = |k: &str, v: String| out.push((k.to_owned(), v));
        let d = |d: &Duration| duration::format(d);
        if let Some(v) = &self.database_url {
            put("database_url", v.clone());
        }
        if let Some(v) = &self.table {
            put("table", v.clone());
        }
        if let Some(v) = &self.tables {
            put("tables", v.clone());
        }
        if let Some(v) = &self.kafka_bootstrap_servers {
            put("kafka.bootstrap_servers", v.clone());
        }
        for item in &self.kafka_properties {
            let (k, v) = key_value("kafka.properties", item)?;
            put(&format!("kafka.properties.{k}"), v);
        }
        if let Some(v) = &self.source {
            put("source", v.clone());
        }
        if let Some(v) = &self.sink {
            put("sink", v.clone());
        }
        if let Some(v) = &self.write_mode {
            put("write_mode", v.clone());
        }
        if let Some(v) = &self.topic {
            put("route.topic", v.clone());
        }
        for item in &self.routes {
            let (k, v) = key_value("route.routes", item)?;
            put(&format!("route.routes.{k}"), v);
        }
        if let Some(v) = self.cloudevents {
            put("route.cloudevents", v.to_string());
        }
        if let Some(v) = self.batch_size {
            put("batch_size", v.to_string());
        }
        if let Some(v) = self.max_in_flight_bytes {
            put("max_in_flight_bytes", v.to_string());
        }
        if let Some(v) = &self.poll_interval {
            put("poll_interval", d(v));
        }
        if let Some(v) = &self.acknowledgement {
            put("acknowledgement", v.clone());
        }
        if let Some(v) = &self.retention {
            put("retention", d(v));
        }
        if let Some(v) = &self.shutdown_timeout {
            put("shutdown_timeout", d(v));
        }
        if let Some(v) = &self.standby_interval {
            put("standby_interval", d(v));
        }
        if let Some(v) = &self.shards {
            put("shards", v.clone());
        }
        if let Some(v) = &self.connect_timeout {
            put("connect_timeout", d(v));
            put("kafka.connect_timeout", d(v));
        }
        if let Some(v) = &self.slot {
            put("logical.slot", v.clone());
        }
        if let Some(v) = &self.publication {
            put("logical.publication", v.clone());
        }
        if let Some(v) = &self.heartbeat_interval {
            put("logical.heartbeat_interval", d(v));
        }
        if let Some(v) = &self.status_interval {
            put("logical.status_interval", d(v));
        }
        for item in &self.set {
            let (k, v) = key_value("--set", item)?;
            out.push((k, v));
        }
        Ok(out)
    }

    /// Loads the configuration these settings describe, on top of the file and the process
    /// environment; ignored variables are logged as warnings.
    pub fn load(&self) -> Result<crate::RelayConfig, ConfigError> {
        let (config, sources) = crate::config::load::load(
            self.config_file.as_deref(),
            std::env::vars(),
            &self.pairs()?,
        )?;
        for w in &sources.warnings {
            tracing::warn!("{w}");
        }
        Ok(config)
    }

    /// For the commands that act on one of several tables (`replay`, `parked …`): loads the
    /// configuration like [`Self::load`], except that when it relays several tables
    /// (`[[outbox]]` sections or `tables`), `--table` (or `OUTBOX_TABLE`) does not set the
    /// top-level `table` (which would conflict with them) but is returned as the selector of
    /// the table to act on. A single-table configuration loads exactly as with [`Self::load`]
    /// and selects nothing.
    pub fn load_selecting_table(
        &self,
    ) -> Result<(crate::RelayConfig, Option<String>), ConfigError> {
        let Some(selector) = self.table.clone() else {
            return Ok((self.load()?, None));
        };
        let without = Settings {
            table: None,
            ..self.clone()
        };
        let env = std::env::vars().filter(|(k, _)| k != "OUTBOX_TABLE");
        match crate::config::load::load(self.config_file.as_deref(), env, &without.pairs()?) {
            Ok((config, sources)) if config.is_multi_table() => {
                for w in &sources.warnings {
                    tracing::warn!("{w}");
                }
                Ok((config, Some(selector)))
            }
            // Single-table (or invalid either way): exactly the usual load and its errors.
            _ => Ok((self.load()?, None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
