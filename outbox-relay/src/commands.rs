//! The one-shot commands of the CLI: `migrate`, `status`, `topics ensure`, `replay`,
//! `parked list|retry|drop`, `slot list|drop`. Each connects, does its work, prints a result and
//! returns the process exit code.
//!
//! With several tables (`[[outbox]]` sections, a `tables` pattern), `replay`, `parked retry` and
//! `parked drop` act on the one table the `--table` selector names, with that table's own
//! settings; `parked list` without a selector and `topics ensure` cover every configured table.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{OutboxTable, StoredEvent};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use uuid::Uuid;

use crate::config::{RelayConfig, redact_url};
use crate::failure::Report;
use crate::route::Router;
use crate::sink::{Outcome, Sink};
use crate::table::{self, AggregateKey, ReadError};

pub use crate::table::ReplayFilter;

/// A command failure: what to print and the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    /// What went wrong.
    pub message: String,
    /// 1 for runtime failures, 2 for bad arguments.
    pub code: i32,
}

impl CommandError {
    fn runtime(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 1,
        }
    }

    fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 2,
        }
    }
}

type Result<T> = std::result::Result<T, CommandError>;

fn db_err(context: &str) -> impl Fn(sqlx::Error) -> CommandError + '_ {
    move |e| CommandError::runtime(format!("{context}: {e}"))
}

/// Like [`db_err`] for a read that decodes rows; a row that cannot be read at all is reported
/// as it is (it names `outbox-relay migrate`).
fn read_err(context: &str) -> impl Fn(ReadError) -> CommandError + '_ {
    move |e| match e {
        ReadError::Database(e) => CommandError::runtime(format!("{context}: {e}")),
        unreadable => CommandError::runtime(unreadable.to_string()),
    }
}

/// Connects to the configured database, for a command on the configured table. A multi-table
/// configuration (`[[outbox]]`, `tables`) is refused: the callers work on one table without a
/// selector (`slot …`), and silently using the default `outbox` would act on a table the relay
/// does not relay. The commands that take `--table` choose their table with `one_table` (the configured table `--table` names).
pub async fn connect(config: &RelayConfig) -> Result<(PgConnection, OutboxTable)> {
    if config.is_multi_table() {
        return Err(CommandError::usage(
            "this command works on one outbox table, and the configuration lists several \
             ([[outbox]] sections or `tables`): run it with a configuration naming only that \
             table (`--table SCHEMA.TABLE`, without the [[outbox]] sections and `tables`)",
        ));
    }
    connect_database(config).await
}

/// Connects to the configured database (any configuration); returns the top-level table too.
async fn connect_database(config: &RelayConfig) -> Result<(PgConnection, OutboxTable)> {
    let table = config
        .validate()
        .map_err(|e| CommandError::usage(e.to_string()))?;
    let url = config.database_url.expose();
    let options = PgConnectOptions::from_str(url).map_err(|e| {
        CommandError::usage(format!(
            "invalid setting `database_url` ({}): {e}",
            redact_url(url)
        ))
    })?;
    let conn = tokio::time::timeout(config.connect_timeout, options.connect())
        .await
        .map_err(|_| {
            CommandError::runtime(format!(
                "cannot connect to PostgreSQL at {}: no answer",
                redact_url(url)
            ))
        })?
        .map_err(|e| {
            CommandError::runtime(format!(
                "cannot connect to PostgreSQL at {}: {e}",
                redact_url(url)
            ))
        })?;
    Ok((conn, table))
}

/// `migrate`: creates or upgrades the outbox table (and its parked-events table); with
/// `--source logical`, also the relay state table `outbox_relay_state`; with `shards` set, the
/// shard index ([`crate::shard::index_statement`], built without blocking writers).
///
/// With `[[outbox]]` sections: every listed table, each with its own settings (tables found by
/// a `tables` pattern are migrated by whoever creates them, e.g. tenant provisioning).
pub async fn migrate(config: &RelayConfig) -> Result<()> {
    if config.is_multi_table() {
        let listed = config
            .listed_tables()
            .map_err(|e| CommandError::usage(e.to_string()))?;
        if listed.is_empty() {
            return Err(CommandError::usage(
                "`migrate` with only a `tables` pattern has no table to migrate: migrate each \
                 table with --table SCHEMA.TABLE (and no pattern)",
            ));
        }
        for table_config in &listed {
            Box::pin(migrate(table_config)).await?;
        }
        return Ok(());
    }
    let (mut conn, table) = connect(config).await?;
    let report = outbox_core::migrate(&mut conn, &table)
        .await
        .map_err(|e| CommandError::runtime(format!("migration of {table} failed: {e}")))?;
    if report.applied.is_empty() {
        tracing::info!(table = %table, version = report.version, "outbox table already up to date");
    } else {
        tracing::info!(table = %table, applied = ?report.applied, "outbox table migrated");
    }
    if config.source == crate::config::SourceKind::Logical {
        // The logical source's memory of its slots, created here for relay roles that may not
        // create tables (grant them SELECT, INSERT, UPDATE, DELETE on it).
        crate::source::logical::state::ensure_table(&mut conn, &table)
            .await
            .map_err(|e| CommandError::runtime(Report(&e).to_string()))?;
    }
    if let Some(count) = config.shards {
        let built = table::ensure_shard_index(&mut conn, &table, count)
            .await
            .map_err(|e| {
                CommandError::runtime(format!(
                    "creating the shard index ({count} shards) of {table} failed: {e}"
                ))
            })?;
        if built {
            tracing::info!(table = %table, shards = count, index = %crate::shard::index_name(&table, count), "shard index created");
        } else {
            tracing::info!(table = %table, shards = count, "shard index already present");
        }
    }
    Ok(())
}

/// `status`: pending events, oldest pending age, last published event, parked events, slot.
///
/// A multi-table relay's configuration lists every table (`[[outbox]]` sections, then the
/// `tables` pattern's matches): in text one block per table, in JSON `{"tables": [...]}` with
/// one single-table object per table.
pub async fn status(config: &RelayConfig, json: bool) -> Result<()> {
    if config.is_multi_table() {
        return status_of_tables(config, json).await;
    }
    let (mut conn, table) = connect(config).await?;
    let s = crate::status::read(&mut conn, config, &table)
        .await
        .map_err(db_err("reading the outbox status"))?;
    // logical_message mode: can any role inject events through pg_logical_emit_message?
    let emit_public = if config.source == crate::config::SourceKind::Logical
        && config.write_mode == outbox_core::WriteMode::LogicalMessage
    {
        Some(
            crate::source::logical::slot::emit_message_public_overloads(&mut conn)
                .await
                .map_err(db_err(
                    "checking PUBLIC's EXECUTE on pg_logical_emit_message",
                ))?,
        )
    } else {
        None
    };
    if json {
        let mut value = serde_json::to_value(&s).expect("status serializes");
        if let (Some(public), Some(map)) = (&emit_public, value.as_object_mut()) {
            map.insert(
                "emit_message_executable_by_public".into(),
                serde_json::json!(public),
            );
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("status serializes")
        );
        return Ok(());
    }
    print_status(&s);
    match emit_public.as_deref() {
        Some([]) => println!("emit_message      not executable by PUBLIC"),
        Some(public) => println!(
            "emit_message      WARNING: executable by PUBLIC ({}): any role can publish events; \
             see docs/postgres.md",
            public.join(", ")
        ),
        None => {}
    }
    Ok(())
}

/// Every table of a multi-table configuration, each with its own configuration: the
/// `[[outbox]]` sections in order, then the migrated tables matching the `tables` pattern that
/// are not listed.
async fn all_tables(
    conn: &mut PgConnection,
    config: &RelayConfig,
) -> Result<Vec<(RelayConfig, OutboxTable)>> {
    let configs = config
        .listed_tables()
        .map_err(|e| CommandError::usage(e.to_string()))?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(configs.len());
    for c in configs {
        let t = OutboxTable::parse(&c.table).map_err(|e| CommandError::usage(e.to_string()))?;
        let resolved = t
            .resolve(conn)
            .await
            .map_err(db_err("resolving the outbox tables"))?;
        seen.insert(table::display_name(&resolved));
        out.push((c, t));
    }
    if let Some(pattern) = config
        .table_pattern()
        .map_err(|e| CommandError::usage(e.to_string()))?
    {
        for name in table::matching_tables(conn, &pattern)
            .await
            .map_err(db_err("matching the `tables` pattern"))?
        {
            if seen.insert(name.clone()) {
                let t =
                    OutboxTable::parse(&name).map_err(|e| CommandError::usage(e.to_string()))?;
                let c = config
                    .pattern_table_config(&t)
                    .map_err(|e| CommandError::usage(e.to_string()))?;
                out.push((c, t));
            }
        }
    }
    Ok(out)
}

/// The configured tables as an operator wrote them, for an error message: the `[[outbox]]`
/// tables and the `tables` pattern.
fn configured_tables(config: &RelayConfig) -> String {
    let mut parts: Vec<String> = config
        .outbox
        .iter()
        .map(|e| format!("`{}`", e.table))
        .collect();
    if let Some(pattern) = &config.tables {
        parts.push(format!("the tables matching `{pattern}`"));
    }
    parts.join(", ")
}

/// The one table a command acts on, connected, with that table's own configuration (its route
/// overrides, write mode, dead-letter topic). A single-table configuration gives its `table`
/// (`selector` is unused). A multi-table configuration needs `selector`: a table listed in
/// `[[outbox]]` (compared as PostgreSQL resolves the names), or an existing, migrated table
/// matching the `tables` pattern; anything else is refused (exit 2) naming the configured tables,
/// before any change is made.
async fn one_table(
    config: &RelayConfig,
    selector: Option<&str>,
) -> Result<(PgConnection, RelayConfig, OutboxTable)> {
    if !config.is_multi_table() {
        let (conn, table) = connect(config).await?;
        return Ok((conn, config.clone(), table));
    }
    let Some(name) = selector else {
        // Validate first, so that a broken configuration is reported as such.
        config
            .validate()
            .map_err(|e| CommandError::usage(e.to_string()))?;
        return Err(CommandError::usage(format!(
            "this configuration relays several outbox tables ({}): pass --table SCHEMA.TABLE \
             to name the one to act on",
            configured_tables(config)
        )));
    };
    let wanted = OutboxTable::parse(name)
        .map_err(|e| CommandError::usage(format!("--table `{name}`: {e}")))?;
    let (mut conn, _) = connect_database(config).await?;
    let resolved = wanted
        .resolve(&mut conn)
        .await
        .map_err(db_err("resolving the --table name"))?;
    let wanted_name = table::display_name(&resolved);
    for c in config
        .listed_tables()
        .map_err(|e| CommandError::usage(e.to_string()))?
    {
        let t = OutboxTable::parse(&c.table).map_err(|e| CommandError::usage(e.to_string()))?;
        let listed = t
            .resolve(&mut conn)
            .await
            .map_err(db_err("resolving the outbox tables"))?;
        if table::display_name(&listed) == wanted_name {
            return Ok((conn, c, t));
        }
    }
    if let Some(pattern) = config
        .table_pattern()
        .map_err(|e| CommandError::usage(e.to_string()))?
    {
        let schema_matches = resolved
            .schema()
            .is_some_and(|s| pattern.matches_schema(s.as_str()));
        if schema_matches && resolved.name().as_str() == pattern.table().as_str() {
            let found = table::matching_tables(&mut conn, &pattern)
                .await
                .map_err(db_err("matching the `tables` pattern"))?;
            if !found.contains(&wanted_name) {
                return Err(CommandError::usage(format!(
                    "--table `{name}` matches the `tables` pattern `{pattern}` but is not a \
                     migrated outbox table (create it with `outbox-relay migrate --table \
                     {wanted_name}`)"
                )));
            }
            let c = config
                .pattern_table_config(&resolved)
                .map_err(|e| CommandError::usage(e.to_string()))?;
            return Ok((conn, c, resolved));
        }
    }
    Err(CommandError::usage(format!(
        "--table `{name}` is not one of the configured outbox tables ({})",
        configured_tables(config)
    )))
}

/// `status` of a multi-table configuration.
async fn status_of_tables(config: &RelayConfig, json: bool) -> Result<()> {
    let (mut conn, _) = connect_database(config).await?;
    let configs = all_tables(&mut conn, config).await?;
    let mut all = Vec::with_capacity(configs.len());
    for (c, t) in &configs {
        all.push(
            crate::status::read(&mut conn, c, t)
                .await
                .map_err(db_err("reading the outbox status"))?,
        );
    }
    if json {
        let value = serde_json::json!({ "tables": all });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("status serializes")
        );
        return Ok(());
    }
    println!("tables            {}", all.len());
    for s in &all {
        println!();
        print_status(s);
    }
    Ok(())
}

/// The text form of one table's status.
fn print_status(s: &crate::status::OutboxStatus) {
    println!("outbox table      {}", s.table);
    println!("source            {}", s.source);
    println!(
        "active relay      {}",
        if s.leader_present { "yes" } else { "none" }
    );
    println!("pending events    {}", s.pending_events);
    if let Some(age) = s.oldest_pending_age_seconds {
        println!("oldest pending    {age:.1} s");
    }
    if let Some(l) = &s.last_published {
        println!(
            "last published    {} {} at {}",
            l.id, l.event_type, l.published_at
        );
    }
    println!("parked events     {}", s.parked_events);
    if let Some(sh) = &s.shards {
        println!(
            "shards            {} over {} relay(s), {} unowned",
            sh.count,
            sh.members,
            sh.unowned.len()
        );
        for owner in &sh.owners {
            println!(
                "  relay pid {:<8} owns {} shard(s): {:?}",
                owner.pid,
                owner.shards.len(),
                owner.shards
            );
        }
    }
    if let Some(slot) = &s.slot {
        println!(
            "slot              {} active={} wal_status={} lag={} bytes",
            slot.name,
            slot.active,
            slot.wal_status.as_deref().unwrap_or("?"),
            slot.lag_bytes.unwrap_or(0)
        );
    }
}

/// Settings of `topics ensure`.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    /// Extra topics to create besides the routed ones.
    pub topics: Vec<String>,
    /// Partitions of each new topic.
    pub partitions: i32,
    /// Replication factor of each new topic.
    pub replication: i32,
    /// Topic configs (`cleanup.policy=compact`, …).
    pub configs: Vec<(String, String)>,
}

/// `topics ensure`: creates the topics the relay routes to (from the aggregate and event types
/// in the table, the fixed routes and the dead-letter topic) plus any given ones.
///
/// With several tables: the routed topics of every configured table (the `[[outbox]]` tables
/// and the migrated tables matching `tables`), each by its own route, write mode and dead-letter
/// topic, plus any given ones.
pub async fn topics_ensure(config: &RelayConfig, spec: &TopicSpec) -> Result<()> {
    let mut topics: BTreeSet<String> = spec.topics.iter().cloned().collect();
    if config.is_multi_table() {
        let (mut conn, _) = connect_database(config).await?;
        for (c, t) in all_tables(&mut conn, config).await? {
            routed_topics(&mut conn, &c, &t, &mut topics).await?;
        }
    } else {
        let (mut conn, table) = connect(config).await?;
        routed_topics(&mut conn, config, &table, &mut topics).await?;
    }
    if config.sink == crate::config::SinkKind::Nats {
        let subjects: Vec<String> = topics.into_iter().collect();
        let done = crate::sink::nats::ensure_stream(&config.nats, &subjects)
            .await
            .map_err(CommandError::runtime)?;
        for step in done {
            match step {
                crate::sink::nats::Ensured::Created(s) => println!("created  stream {s}"),
                crate::sink::nats::Ensured::Exists(s) => println!("exists   stream {s}"),
                crate::sink::nats::Ensured::Captured { subject, stream } => {
                    println!("captured {subject} (stream {stream})")
                }
            }
        }
        return Ok(());
    }
    for t in &topics {
        outbox_core::validate_topic(t)
            .map_err(|reason| CommandError::usage(format!("topic `{t}`: {reason}")))?;
    }
    if topics.is_empty() {
        println!("no topics to create");
        return Ok(());
    }
    if config.sink == crate::config::SinkKind::Redis {
        return redis_streams_ensure(config, &topics).await;
    }
    if config.sink == crate::config::SinkKind::Rabbitmq {
        let destinations: Vec<String> = topics.into_iter().collect();
        let lines = crate::sink::rabbitmq::ensure_queues(&config.rabbitmq, &destinations)
            .await
            .map_err(|e| CommandError::runtime(e.to_string()))?;
        for line in lines {
            println!("{line}");
        }
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = config
        .kafka
        .client_config()
        .map_err(|e| CommandError::usage(e.to_string()))?
        .create()
        .map_err(|e| CommandError::runtime(format!("cannot create a Kafka admin client: {e}")))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let mut n = NewTopic::new(
                t,
                spec.partitions,
                TopicReplication::Fixed(spec.replication),
            );
            for (k, v) in &spec.configs {
                n = n.set(k, v);
            }
            n
        })
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(config.kafka.connect_timeout)),
        )
        .await
        .map_err(|e| CommandError::runtime(format!("creating topics failed: {e}")))?;
    let mut failed = false;
    for r in results {
        match r {
            Ok(t) => println!("created  {t}"),
            Err((t, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                println!("exists   {t}")
            }
            Err((t, e)) => {
                failed = true;
                println!("FAILED   {t}: {e}");
            }
        }
    }
    if failed {
        return Err(CommandError::runtime("some topics could not be created"));
    }
    Ok(())
}

/// Adds to `topics` the destinations one table's configuration routes to: its events' topics
/// (read from the table in the `table` write mode), its fixed routes and its dead-letter topic.
async fn routed_topics(
    conn: &mut PgConnection,
    config: &RelayConfig,
    table: &OutboxTable,
    topics: &mut BTreeSet<String>,
) -> Result<()> {
    let router = Router::new(&config.route).map_err(|e| CommandError::usage(e.to_string()))?;
    if config.write_mode == outbox_core::WriteMode::Table {
        let rows = table::routed_event_types(conn, table)
            .await
            .map_err(db_err("reading routed event types"))?;
        for (aggregate_type, event_type, topic) in rows {
            let probe = probe_event(&aggregate_type, &event_type, topic);
            match router.topic_for(&probe) {
                Ok(t) => {
                    topics.insert(t);
                }
                Err(error) => {
                    tracing::warn!(%error, table = %table, "an event type in the table cannot be routed")
                }
            }
        }
    }
    for template in config.route.routes.values() {
        if !template.contains('{') {
            topics.insert(template.clone());
        }
    }
    if let Some(dlq) = &config.dead_letter_topic {
        topics.insert(dlq.clone());
    }
    Ok(())
}

/// `topics ensure` for Redis: nothing to create (a stream appears with its first entry); fails
/// when a key of another type holds a destination's name (the relay would stop on it).
async fn redis_streams_ensure(config: &RelayConfig, topics: &BTreeSet<String>) -> Result<()> {
    let sink = crate::sink::redis::RedisSink::new(config.redis.clone())
        .map_err(|e| CommandError::usage(e.to_string()))?;
    let names: Vec<String> = topics.iter().cloned().collect();
    let types = sink
        .key_types(&names)
        .await
        .map_err(|e| CommandError::runtime(e.to_string()))?;
    let mut failed = false;
    for (name, kind) in types {
        match kind.as_str() {
            "stream" => println!("exists   {name}"),
            "none" => println!(
                "nothing to create for {name}: a Redis stream appears with its first entry"
            ),
            other => {
                failed = true;
                println!(
                    "FAILED   {name}: a Redis key of type {other} holds this name; rename or delete it"
                );
            }
        }
    }
    if failed {
        return Err(CommandError::runtime(
            "some destinations are held by keys that are not streams",
        ));
    }
    Ok(())
}

fn probe_event(aggregate_type: &str, event_type: &str, topic: Option<String>) -> StoredEvent {
    StoredEvent {
        topic,
        ..StoredEvent::new(Uuid::nil(), aggregate_type, "", event_type)
    }
}

/// `replay`: re-publishes events still in the table (rows are kept with the `mark`
/// acknowledgement for `retention`), in their original order and with their original event ids,
/// so consumers that dedupe by id are unaffected. Returns how many were published.
///
/// With several tables, `selector` (`--table`) names the table; its events are routed by that
/// table's own route.
pub async fn replay(
    config: &RelayConfig,
    selector: Option<&str>,
    filter: &ReplayFilter,
) -> Result<u64> {
    let (mut conn, config, table) = one_table(config, selector).await?;
    let config = &config;
    if filter.from.is_none()
        && filter.to.is_none()
        && filter.from_id.is_none()
        && filter.to_id.is_none()
        && filter.event_types.is_empty()
        && filter.aggregate_type.is_none()
    {
        return Err(CommandError::usage(
            "replay needs a range or a filter (--from/--to, --from-id/--to-id, --type, --aggregate-type)",
        ));
    }
    let (router, sink) = publisher(config).await?;
    let total = table::replay_count(&mut conn, &table, filter)
        .await
        .map_err(db_err("counting events to replay"))?;
    let progress = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} events {eta}")
                .expect("static template"),
        );
        Some(bar)
    } else {
        None
    };
    let mut after: i64 = i64::MIN;
    let mut published = 0u64;
    loop {
        let rows = table::replay_page(&mut conn, &table, filter, after)
            .await
            .map_err(read_err("reading events to replay"))?;
        if rows.is_empty() {
            break;
        }
        let events = rows
            .into_iter()
            .map(|decoded| {
                decoded.map_err(|m| {
                    CommandError::runtime(format!(
                        "cannot replay: {m}; fix or delete the row and replay again"
                    ))
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        after = events.last().and_then(|e| e.seq).unwrap_or(after);
        router
            .prepare_schemas(&events)
            .await
            .map_err(|e| CommandError::runtime(e.to_string()))?;
        let records = events
            .iter()
            .map(|e| router.route(e))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| CommandError::runtime(e.to_string()))?;
        for (e, outcome) in events.iter().zip(sink.send_batch(&records).await) {
            if !matches!(outcome, Outcome::Delivered(_)) {
                return Err(CommandError::runtime(format!(
                    "replay stopped at event {} after {published} events: {outcome:?}",
                    e.id
                )));
            }
            published += 1;
        }
        if let Some(bar) = &progress {
            bar.set_position(published);
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    println!("replayed {published} events");
    Ok(published)
}

/// One line of `parked list`.
fn parked_line(e: &table::ParkedEvent) -> String {
    format!(
        "{}  {}/{}  {}  {} bytes  {}{}",
        e.id,
        e.aggregate_type,
        e.aggregate_id,
        e.event_type,
        e.payload_bytes,
        e.reason,
        e.blocked_by
            .map(|b| format!(" (behind {b})"))
            .unwrap_or_default()
    )
}

/// A parked event of `parked list` over every table: its table, then its fields.
#[derive(serde::Serialize)]
struct TableParked<'a> {
    table: &'a str,
    #[serde(flatten)]
    event: &'a table::ParkedEvent,
}

/// `parked list`. With several tables: `selector` (`--table`) lists one table's parked events;
/// without it, every configured table's, each line (or JSON object) naming its table first.
pub async fn parked_list(config: &RelayConfig, selector: Option<&str>, json: bool) -> Result<()> {
    if config.is_multi_table() && selector.is_none() {
        let (mut conn, _) = connect_database(config).await?;
        let mut all = Vec::new();
        for (_, t) in all_tables(&mut conn, config).await? {
            let events = table::list_parked(&mut conn, &t)
                .await
                .map_err(db_err("listing parked events"))?;
            all.push((table::display_name(&t), events));
        }
        let rows: Vec<TableParked<'_>> = all
            .iter()
            .flat_map(|(name, events)| {
                events
                    .iter()
                    .map(move |event| TableParked { table: name, event })
            })
            .collect();
        print_list(&rows, json, "no parked events", |r| {
            format!("{}  {}", r.table, parked_line(r.event))
        });
        return Ok(());
    }
    let (mut conn, _, table) = one_table(config, selector).await?;
    let events = table::list_parked(&mut conn, &table)
        .await
        .map_err(db_err("listing parked events"))?;
    print_list(&events, json, "no parked events", parked_line);
    Ok(())
}

/// Prints `items` as pretty JSON, or one line each (`empty` when there are none).
fn print_list<T: serde::Serialize>(
    items: &[T],
    json: bool,
    empty: &str,
    line: impl Fn(&T) -> String,
) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(items).expect("serializes")
        );
        return;
    }
    if items.is_empty() {
        println!("{empty}");
    }
    for item in items {
        println!("{}", line(item));
    }
}

/// Which parked events a command applies to.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every parked event.
    All,
    /// These events (a retry takes their whole aggregates).
    Ids(Vec<Uuid>),
}

/// The router and a connected sink (the configured broker) for a command that publishes events.
async fn publisher(config: &RelayConfig) -> Result<(Router, Box<dyn Sink>)> {
    let router = config
        .router()
        .map_err(|e| CommandError::usage(e.to_string()))?;
    let sink = crate::sink::select::from_config(config)
        .map_err(|e| CommandError::usage(Report(&e).to_string()))?;
    sink.check_connection()
        .await
        .map_err(|e| CommandError::runtime(e.to_string()))?;
    Ok((router, sink))
}

/// `parked retry`: publishes the selected aggregates' parked events in their original order,
/// then removes them, unblocking the aggregates. Stops an aggregate at its first event that still
/// cannot be published and reports it. With several tables, `selector` (`--table`) names the
/// table; its events are routed by that table's own route.
pub async fn parked_retry(
    config: &RelayConfig,
    selector: Option<&str>,
    selection: &Selection,
) -> Result<u64> {
    let (mut conn, config, table) = one_table(config, selector).await?;
    let (router, sink) = publisher(&config).await?;
    let aggregates: BTreeSet<AggregateKey> = match selection {
        Selection::All => table::blocked_aggregates(&mut conn, &table)
            .await
            .map_err(db_err("listing parked events"))?
            .into_keys()
            .collect(),
        Selection::Ids(ids) => {
            let mut set = BTreeSet::new();
            for id in ids {
                match table::parked_aggregate_of(&mut conn, &table, *id)
                    .await
                    .map_err(db_err("finding a parked event"))?
                {
                    Some(a) => {
                        set.insert(a);
                    }
                    None => return Err(CommandError::usage(format!("event {id} is not parked"))),
                }
            }
            set
        }
    };
    let mut published = 0u64;
    let mut stuck = Vec::new();
    for aggregate in aggregates {
        // The relay may park further events of the aggregate while we retry: repeat until none
        // are left, so the aggregate is unblocked with nothing behind.
        for _ in 0..10 {
            let events = table::parked_events_of(&mut conn, &table, &aggregate)
                .await
                .map_err(read_err("reading parked events"))?;
            if events.is_empty() {
                break;
            }
            router
                .prepare_schemas(&events)
                .await
                .map_err(|e| CommandError::runtime(e.to_string()))?;
            let mut done = Vec::new();
            let mut blocked = None;
            for e in &events {
                let outcome = match router.route(e) {
                    Ok(record) => sink
                        .send_batch(std::slice::from_ref(&record))
                        .await
                        .remove(0),
                    Err(err) => {
                        blocked = Some(format!("{}: {}", e.id, err.reason));
                        break;
                    }
                };
                match outcome {
                    Outcome::Delivered(_) => done.push(e.id),
                    other => {
                        blocked = Some(format!("{}: {other:?}", e.id));
                        break;
                    }
                }
            }
            published += done.len() as u64;
            table::remove_parked(&mut conn, &table, &done)
                .await
                .map_err(db_err("removing republished events"))?;
            if let Some(why) = blocked {
                stuck.push(format!("{}/{} stuck at {why}", aggregate.0, aggregate.1));
                break;
            }
        }
    }
    println!("republished {published} parked events");
    if !stuck.is_empty() {
        return Err(CommandError::runtime(format!(
            "some parked events still cannot be published: {}",
            stuck.join("; ")
        )));
    }
    Ok(published)
}

/// `parked drop`: deletes parked events without publishing them. With several tables,
/// `selector` (`--table`) names the table.
pub async fn parked_drop(
    config: &RelayConfig,
    selector: Option<&str>,
    selection: &Selection,
) -> Result<u64> {
    let (mut conn, _, table) = one_table(config, selector).await?;
    let n = match selection {
        Selection::All => table::remove_all_parked(&mut conn, &table)
            .await
            .map_err(db_err("dropping parked events"))?,
        Selection::Ids(ids) => table::remove_parked(&mut conn, &table, ids)
            .await
            .map_err(db_err("dropping parked events"))?,
    };
    println!("dropped {n} parked events");
    Ok(n)
}

/// `slot list`.
pub async fn slot_list(config: &RelayConfig, json: bool) -> Result<()> {
    let (mut conn, _) = connect(config).await?;
    let slots = crate::status::slots(&mut conn)
        .await
        .map_err(db_err("listing replication slots"))?;
    print_list(&slots, json, "no replication slots", |s| {
        format!(
            "{}  plugin={}  database={}  active={}  wal_status={}  confirmed_flush_lsn={}  lag={} bytes",
            s.name,
            s.plugin.as_deref().unwrap_or("-"),
            s.database.as_deref().unwrap_or("-"),
            s.active,
            s.wal_status.as_deref().unwrap_or("-"),
            s.confirmed_flush_lsn.as_deref().unwrap_or("-"),
            s.lag_bytes.unwrap_or(0)
        )
    });
    Ok(())
}

/// `slot drop NAME`: drops an inactive replication slot and forgets, in the relay state table
/// (`outbox_relay_state`), that a relay streamed from it. The relay then starts from a new slot;
/// in the `table` write mode it first re-publishes what is still unpublished, in the other modes
/// events committed since the slot's confirmed position that were not published are never
/// published. Also the way to accept a loss the relay refuses to start over (`SlotLost`): with
/// the slot already gone, it only forgets it.
pub async fn slot_drop(config: &RelayConfig, name: &str) -> Result<()> {
    use crate::source::logical::state;
    let (mut conn, table) = connect(config).await?;
    let active: Option<bool> =
        sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = $1")
            .bind(name)
            .fetch_optional(&mut conn)
            .await
            .map_err(db_err("looking up the slot"))?;
    let forget = async |conn: &mut PgConnection| {
        state::forget(conn, &table, name)
            .await
            .map_err(|e| CommandError::runtime(Report(&e).to_string()))
    };
    match active {
        None => match forget(&mut conn).await? {
            None => Err(CommandError::usage(format!("no replication slot `{name}`"))),
            Some(lsn) => {
                println!(
                    "replication slot {name} does not exist; forgot that a relay streamed from it \
                     (confirmed up to LSN {lsn}): the next start creates a new slot"
                );
                Ok(())
            }
        },
        Some(true) => Err(CommandError::runtime(format!(
            "slot `{name}` is in use by a running relay: stop it first"
        ))),
        Some(false) => {
            sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(name)
                .execute(&mut conn)
                .await
                .map_err(db_err("dropping the slot"))?;
            forget(&mut conn).await?;
            println!("dropped replication slot {name}");
            Ok(())
        }
    }
}

/// Parses a time for `--from`/`--to`: RFC 3339, or a duration ago (`15m`, `2h`).
pub fn parse_time(text: &str) -> std::result::Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let ago: Duration = crate::config::duration::parse(text).map_err(|_| {
        format!("`{text}` is neither an RFC 3339 time nor a duration ago (e.g. 2h)")
    })?;
    Ok(Utc::now() - chrono::Duration::from_std(ago).map_err(|e| e.to_string())?)
}
