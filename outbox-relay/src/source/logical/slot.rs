//! Publication and replication-slot management over a normal (non-replication) connection:
//! preflight checks (`wal_level`, privileges), create-or-verify of the publication and the slot,
//! slot health (`wal_status`, lag in bytes) and idle heartbeats.

use std::fmt;

use sqlx::{AssertSqlSafe, PgPool, Row};

use super::LogicalError;
use super::pgoutput::Lsn;
use crate::stats::LogicalMetrics;

/// A validated replication slot name.
///
/// Guarantee: matches `[a-z0-9_]{1,63}`, the rule PostgreSQL itself enforces for slot names, so it
/// can be embedded in replication commands (`START_REPLICATION SLOT name …`) without quoting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SlotName(String);

/// A validated publication name.
///
/// Guarantee: matches `[a-z_][a-z0-9_]{0,62}`; it is always written double-quoted in SQL and is
/// safe inside the `publication_names '…'` option of `START_REPLICATION`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PublicationName(String);

/// A configured slot or publication name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct NameError {
    /// Which setting.
    pub what: &'static str,
    /// The rejected value.
    pub value: String,
    /// Why.
    pub reason: &'static str,
}

fn check_name(what: &'static str, value: &str, first_digit_ok: bool) -> Result<(), NameError> {
    let err = |reason| NameError {
        what,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(err("must not be empty"));
    }
    if value.len() > 63 {
        return Err(err("longer than 63 bytes"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(err(
            "only lower-case ASCII letters, digits and `_` are allowed",
        ));
    }
    if !first_digit_ok && value.as_bytes()[0].is_ascii_digit() {
        return Err(err("must not start with a digit"));
    }
    Ok(())
}

impl SlotName {
    /// Validate a slot name.
    pub fn parse(value: &str) -> Result<Self, NameError> {
        check_name("replication slot name", value, true)?;
        Ok(Self(value.to_owned()))
    }

    /// The bare name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SlotName {
    /// `outbox_relay`, as in the configuration file (`logical.slot`).
    fn default() -> Self {
        Self("outbox_relay".to_owned())
    }
}

impl Default for PublicationName {
    /// `outbox_relay`, as in the configuration file (`logical.publication`).
    fn default() -> Self {
        Self("outbox_relay".to_owned())
    }
}

impl PublicationName {
    /// Validate a publication name.
    pub fn parse(value: &str) -> Result<Self, NameError> {
        check_name("publication name", value, false)?;
        Ok(Self(value.to_owned()))
    }

    /// The bare name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for SlotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for PublicationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The schema-resolved identity of the outbox table, as pgoutput `Relation` messages name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTable {
    /// Schema (namespace) name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// Quoted, schema-qualified name for SQL.
    pub qualified: String,
}

fn db_err(context: &'static str) -> impl FnOnce(sqlx::Error) -> LogicalError {
    move |source| LogicalError::Database { context, source }
}

/// Fail with a clear, fatal error unless the server can do logical replication for this role:
/// `wal_level = logical` and a role with `REPLICATION` (or superuser).
pub async fn preflight(pool: &PgPool) -> Result<(), LogicalError> {
    let wal_level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(pool)
        .await
        .map_err(db_err("reading wal_level"))?;
    if wal_level != "logical" {
        return Err(LogicalError::WalLevel { actual: wal_level });
    }
    let row = sqlx::query(
        "SELECT current_user::text AS role, rolreplication, rolsuper FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(pool)
    .await
    .map_err(db_err("reading role attributes"))?;
    let role: String = row.try_get("role").map_err(db_err("reading role"))?;
    let replication: bool = row
        .try_get("rolreplication")
        .map_err(db_err("reading rolreplication"))?;
    let superuser: bool = row
        .try_get("rolsuper")
        .map_err(db_err("reading rolsuper"))?;
    if !replication && !superuser {
        return Err(LogicalError::Privilege {
            role,
            missing: "the REPLICATION attribute (ALTER ROLE … WITH REPLICATION)".into(),
        });
    }
    Ok(())
}

/// Resolve the outbox table (quoted, possibly unqualified SQL name) to its schema and name.
pub async fn resolve_table(pool: &PgPool, qualified: &str) -> Result<ResolvedTable, LogicalError> {
    let row = sqlx::query(
        "SELECT n.nspname::text AS schema, c.relname::text AS name \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.oid = to_regclass($1)",
    )
    .bind(qualified)
    .fetch_optional(pool)
    .await
    .map_err(db_err("resolving the outbox table"))?;
    let Some(row) = row else {
        return Err(LogicalError::Config(format!(
            "outbox table {qualified} does not exist (run the migrations first)"
        )));
    };
    let schema: String = row.try_get("schema").map_err(db_err("reading schema"))?;
    let name: String = row.try_get("name").map_err(db_err("reading table name"))?;
    Ok(ResolvedTable {
        qualified: format!("\"{schema}\".\"{name}\""),
        schema,
        name,
    })
}

/// What `ensure_publication` found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicationOutcome {
    /// The publication was created by this call.
    Created,
    /// An existing publication was verified and reused.
    Reused {
        /// Non-fatal deviations found (also logged at warn).
        warnings: Vec<String>,
    },
}

/// Create the publication when missing (`FOR TABLE <table> WITH (publish = 'insert')`, or with no
/// table for the tableless `logical_message` mode), or verify an existing one.
///
/// Policy for an existing publication (documented decision): it must publish inserts and, when a
/// table is given, include the outbox table — otherwise a fatal [`LogicalError::Publication`],
/// because events would silently never arrive. Publishing updates/deletes/truncates, all tables
/// or other tables is only a warning: the relay ignores those changes (filtering by relation),
/// at the cost of extra WAL traffic.
pub async fn ensure_publication(
    pool: &PgPool,
    name: &PublicationName,
    table: Option<&ResolvedTable>,
) -> Result<PublicationOutcome, LogicalError> {
    let row = sqlx::query(
        "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate \
         FROM pg_publication WHERE pubname = $1",
    )
    .bind(name.as_str())
    .fetch_optional(pool)
    .await
    .map_err(db_err("reading pg_publication"))?;

    let Some(row) = row else {
        let sql = match table {
            Some(t) => format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')",
                name.quoted(),
                t.qualified
            ),
            None => format!(
                "CREATE PUBLICATION {} WITH (publish = 'insert')",
                name.quoted()
            ),
        };
        match sqlx::query(AssertSqlSafe(sql)).execute(pool).await {
            Ok(_) => {
                tracing::info!(publication = %name, "created publication (publish = 'insert')");
                return Ok(PublicationOutcome::Created);
            }
            // Lost a creation race with another relay instance: verify what it created.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => {
                return Box::pin(ensure_publication(pool, name, table)).await;
            }
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
                return Err(LogicalError::Privilege {
                    role: "current role".into(),
                    missing: format!(
                        "the right to create publication {name} (needs CREATE on the database and ownership of the outbox table): {}",
                        e.message()
                    ),
                });
            }
            Err(e) => return Err(db_err("creating the publication")(e)),
        }
    };

    let all_tables: bool = row
        .try_get("puballtables")
        .map_err(db_err("puballtables"))?;
    let ins: bool = row.try_get("pubinsert").map_err(db_err("pubinsert"))?;
    let upd: bool = row.try_get("pubupdate").map_err(db_err("pubupdate"))?;
    let del: bool = row.try_get("pubdelete").map_err(db_err("pubdelete"))?;
    let trunc: bool = row.try_get("pubtruncate").map_err(db_err("pubtruncate"))?;
    if !ins {
        return Err(LogicalError::Publication(format!(
            "publication {name} exists but does not publish inserts; recreate it with WITH (publish = 'insert')"
        )));
    }
    let mut warnings = Vec::new();
    if upd || del || trunc {
        warnings.push(format!(
            "publication {name} also publishes{}{}{}; the relay ignores them (create it with publish = 'insert' to save WAL traffic)",
            if upd { " updates" } else { "" },
            if del { " deletes" } else { "" },
            if trunc { " truncates" } else { "" },
        ));
    }
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
    )
    .bind(name.as_str())
    .fetch_all(pool)
    .await
    .map_err(db_err("reading pg_publication_tables"))?;
    if let Some(t) = table
        && !tables.iter().any(|(s, n)| s == &t.schema && n == &t.name)
    {
        return Err(LogicalError::Publication(format!(
            "publication {name} exists but does not include the outbox table {}.{}; \
             run ALTER PUBLICATION {} ADD TABLE {} or configure another publication name",
            t.schema,
            t.name,
            name.quoted(),
            t.qualified
        )));
    }
    let others: Vec<String> = tables
        .iter()
        .filter(|(s, n)| table.is_none_or(|t| !(s == &t.schema && n == &t.name)))
        .map(|(s, n)| format!("{s}.{n}"))
        .collect();
    if all_tables {
        warnings.push(format!(
            "publication {name} is FOR ALL TABLES; changes to other tables are decoded and discarded"
        ));
    } else if !others.is_empty() {
        warnings.push(format!(
            "publication {name} also publishes {}; their changes are discarded",
            others.join(", ")
        ));
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    Ok(PublicationOutcome::Reused { warnings })
}

/// The health of the replication slot, from `pg_replication_slots`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStatus {
    /// Output plugin (must be `pgoutput`).
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: String,
    /// Database the slot belongs to.
    pub database: Option<String>,
    /// Whether a session is streaming from it now.
    pub active: bool,
    /// Backend pid of that session.
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost` (NULL before the slot reserved WAL).
    pub wal_status: Option<String>,
    /// The position the server will resume from; everything before it was confirmed by a relay.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// Oldest WAL the slot pins.
    pub restart_lsn: Option<Lsn>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`: bytes of WAL not yet confirmed.
    pub lag_bytes: Option<i64>,
    /// `pg_current_wal_lsn() - restart_lsn`: bytes of WAL the slot keeps on disk.
    pub retained_bytes: Option<i64>,
    /// Bytes that can still be written before the slot is invalidated (NULL when unlimited).
    pub safe_wal_size: Option<i64>,
}

impl SlotStatus {
    /// The slot can no longer stream (its WAL was removed).
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }

    /// Records this check's lag, retained WAL and `wal_status` in `metrics`.
    pub fn record_in(&self, metrics: &LogicalMetrics) {
        metrics.record_slot(
            self.lag_bytes,
            self.retained_bytes,
            self.wal_status.as_deref(),
        );
    }
}

/// Read the slot's status; `None` when it does not exist.
pub async fn slot_status(
    pool: &PgPool,
    slot: &SlotName,
) -> Result<Option<SlotStatus>, LogicalError> {
    let row = sqlx::query(
        "SELECT plugin::text, slot_type::text, database::text, active, active_pid, wal_status, \
                confirmed_flush_lsn::text AS confirmed, restart_lsn::text AS restart, \
                (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 AS lag, \
                (pg_current_wal_lsn() - restart_lsn)::int8 AS retained, \
                safe_wal_size \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot.as_str())
    .fetch_optional(pool)
    .await
    .map_err(db_err("reading pg_replication_slots"))?;
    let Some(row) = row else { return Ok(None) };
    let lsn = |col: &str| -> Result<Option<Lsn>, LogicalError> {
        let text: Option<String> = row.try_get(col).map_err(db_err("reading slot lsn"))?;
        Ok(text.as_deref().and_then(Lsn::parse))
    };
    Ok(Some(SlotStatus {
        plugin: row.try_get("plugin").map_err(db_err("plugin"))?,
        slot_type: row.try_get("slot_type").map_err(db_err("slot_type"))?,
        database: row.try_get("database").map_err(db_err("database"))?,
        active: row.try_get("active").map_err(db_err("active"))?,
        active_pid: row.try_get("active_pid").map_err(db_err("active_pid"))?,
        wal_status: row.try_get("wal_status").map_err(db_err("wal_status"))?,
        confirmed_flush_lsn: lsn("confirmed")?,
        restart_lsn: lsn("restart")?,
        lag_bytes: row.try_get("lag").map_err(db_err("lag"))?,
        retained_bytes: row.try_get("retained").map_err(db_err("retained"))?,
        safe_wal_size: row
            .try_get("safe_wal_size")
            .map_err(db_err("safe_wal_size"))?,
    }))
}

/// Check that an existing slot is usable by this relay: logical, `pgoutput`, this database, not
/// lost. A slot with another plugin or in another database is a fatal configuration error.
pub async fn verify_slot(
    pool: &PgPool,
    slot: &SlotName,
    status: &SlotStatus,
) -> Result<(), LogicalError> {
    let db: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await
        .map_err(db_err("reading current_database()"))?;
    if status.slot_type != "logical" {
        return Err(LogicalError::Slot(format!(
            "replication slot {slot} is a {} slot, not a logical one; choose another slot name",
            status.slot_type
        )));
    }
    if status.plugin.as_deref() != Some("pgoutput") {
        return Err(LogicalError::Slot(format!(
            "replication slot {slot} uses plugin {:?}, not pgoutput; drop it or choose another slot name",
            status.plugin.as_deref().unwrap_or("?")
        )));
    }
    if status.database.as_deref() != Some(db.as_str()) {
        return Err(LogicalError::Slot(format!(
            "replication slot {slot} belongs to database {:?}, not {db:?}; slot names are server-wide, choose another",
            status.database.as_deref().unwrap_or("?")
        )));
    }
    if status.is_lost() {
        return Err(LogicalError::SlotLost {
            slot: slot.to_string(),
            detail: "wal_status = 'lost': the WAL it needed was removed (max_slot_wal_keep_size exceeded?)".into(),
        });
    }
    Ok(())
}

/// Create the logical slot with the `pgoutput` plugin. Returns its consistent point: every
/// transaction that commits after it is streamed; everything committed before it is visible to
/// any snapshot taken after this call returns.
///
/// Returns `Ok(None)` when another session created it concurrently (the caller re-reads it).
pub async fn create_slot(pool: &PgPool, slot: &SlotName) -> Result<Option<Lsn>, LogicalError> {
    let res: Result<String, sqlx::Error> = sqlx::query_scalar(
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
    )
    .bind(slot.as_str())
    .fetch_one(pool)
    .await;
    match res {
        Ok(text) => {
            let lsn = Lsn::parse(&text).ok_or_else(|| {
                LogicalError::Slot(format!("server returned an unparsable LSN {text:?}"))
            })?;
            tracing::info!(slot = %slot, consistent_point = %lsn, "created logical replication slot (pgoutput)");
            Ok(Some(lsn))
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => Ok(None),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
            Err(LogicalError::Privilege {
                role: "current role".into(),
                missing: format!("the right to create replication slots: {}", e.message()),
            })
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55000") => {
            // object_not_in_prerequisite_state: wal_level or max_replication_slots.
            Err(LogicalError::Slot(format!(
                "cannot create replication slot {slot}: {}",
                e.message()
            )))
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("53400") => {
            Err(LogicalError::Slot(format!(
                "cannot create replication slot {slot}: {} (raise max_replication_slots)",
                e.message()
            )))
        }
        Err(e) => Err(db_err("creating the replication slot")(e)),
    }
}

/// Drop the slot (used only to replace a lost one). Waits briefly for a lingering walsender.
pub async fn drop_slot(pool: &PgPool, slot: &SlotName) -> Result<(), LogicalError> {
    for attempt in 0..50 {
        let res = sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(slot.as_str())
            .execute(pool)
            .await;
        match res {
            Ok(_) => return Ok(()),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42704") => return Ok(()),
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("55006") && attempt < 49 =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(db_err("dropping the lost replication slot")(e)),
        }
    }
    Ok(())
}

/// Move an inactive slot's confirmed position forward to `lsn` (never backwards). Used at graceful
/// shutdown so that a position acknowledged after the last standby status update is not
/// re-streamed (no duplicates across a clean restart).
pub async fn advance_slot(pool: &PgPool, slot: &SlotName, lsn: Lsn) -> Result<(), LogicalError> {
    let mut last_err = None;
    for _ in 0..50 {
        let res = sqlx::query(
            "SELECT pg_replication_slot_advance($1, $2::pg_lsn) \
             FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn < $2::pg_lsn",
        )
        .bind(slot.as_str())
        .bind(lsn.to_string())
        .execute(pool)
        .await;
        match res {
            Ok(_) => return Ok(()),
            // The walsender of the session we just closed may still hold the slot.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55006") => {
                last_err = Some(sqlx::Error::Database(e));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(db_err("advancing the replication slot")(e)),
        }
    }
    Err(db_err("advancing the replication slot (still active)")(
        last_err.unwrap_or(sqlx::Error::PoolTimedOut),
    ))
}

/// Identifies the running PostgreSQL instance: its postmaster start time (and whether it is in
/// recovery). Two equal values mean the same server process, hence one WAL history: a restart or
/// a promoted standby gives another value.
pub async fn instance(pool: &PgPool) -> Result<String, LogicalError> {
    sqlx::query_scalar(
        "SELECT concat_ws(' ', pg_postmaster_start_time()::text, pg_is_in_recovery()::text, \
                coalesce(inet_server_addr()::text, 'local'), inet_server_port()::text)",
    )
    .fetch_one(pool)
    .await
    .map_err(db_err("identifying the PostgreSQL instance"))
}

/// Write a non-transactional logical decoding message `<prefix>-heartbeat` so an idle database
/// still produces WAL the slot can be confirmed past. Returns the message's LSN.
pub async fn emit_heartbeat(pool: &PgPool, prefix: &str) -> Result<Lsn, LogicalError> {
    let text: String =
        sqlx::query_scalar("SELECT pg_logical_emit_message(false, $1, ''::text)::text")
            .bind(heartbeat_prefix(prefix))
            .fetch_one(pool)
            .await
            .map_err(db_err("emitting a heartbeat message"))?;
    Lsn::parse(&text)
        .ok_or_else(|| LogicalError::Slot(format!("heartbeat returned an unparsable LSN {text:?}")))
}

/// The SQL that closes event injection through `pg_logical_emit_message` in the
/// `logical_message` write mode: no EXECUTE for PUBLIC on any overload, EXECUTE for the roles
/// that write events and for the relay's role (heartbeats use the `text` overload).
pub const EMIT_MESSAGE_REVOKE: &str = "REVOKE EXECUTE ON FUNCTION \
     pg_catalog.pg_logical_emit_message(boolean, text, text), \
     pg_catalog.pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC; \
     GRANT EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text) \
     TO <writer roles>, <relay role>";

/// The overloads of `pg_logical_emit_message` (as `regprocedure` text) that PUBLIC may execute
/// in the connected database — by default all of them. When any is listed, any role that can
/// connect can write a transactional message with the outbox prefix.
pub async fn emit_message_public_overloads<'c>(
    conn: impl sqlx::PgExecutor<'c>,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p \
         WHERE p.proname = 'pg_logical_emit_message' \
           AND p.pronamespace = 'pg_catalog'::regnamespace \
           AND has_function_privilege('public', p.oid, 'EXECUTE') \
         ORDER BY 1",
    )
    .fetch_all(conn)
    .await
}

/// At start: the relay's role must be able to emit its heartbeats (a fatal
/// [`LogicalError::Privilege`] naming the GRANT otherwise), and in the `logical_message` write
/// mode a WARN when PUBLIC can still execute `pg_logical_emit_message` — then any role that can
/// connect can publish arbitrary events through the relay.
pub async fn check_emit_message_privileges(
    pool: &PgPool,
    mode: outbox_core::WriteMode,
) -> Result<(), LogicalError> {
    let (role, own): (String, bool) = sqlx::query_as(
        "SELECT current_user::text, \
                has_function_privilege('pg_catalog.pg_logical_emit_message(boolean, text, text)', 'EXECUTE')",
    )
    .fetch_one(pool)
    .await
    .map_err(db_err("checking EXECUTE on pg_logical_emit_message"))?;
    if !own {
        return Err(LogicalError::Privilege {
            role,
            missing: "EXECUTE on pg_logical_emit_message(boolean, text, text), needed for the \
                      idle heartbeats: GRANT EXECUTE ON FUNCTION \
                      pg_catalog.pg_logical_emit_message(boolean, text, text) TO <relay role>"
                .into(),
        });
    }
    if mode != outbox_core::WriteMode::LogicalMessage {
        return Ok(());
    }
    let public = emit_message_public_overloads(pool).await.map_err(db_err(
        "checking PUBLIC's EXECUTE on pg_logical_emit_message",
    ))?;
    if !public.is_empty() {
        tracing::warn!(
            overloads = %public.join(", "),
            "pg_logical_emit_message is executable by PUBLIC: in the logical_message write mode \
             ANY role that can connect to this database can publish arbitrary events through the \
             relay; close it with: {EMIT_MESSAGE_REVOKE} (see docs/postgres.md)"
        );
    }
    Ok(())
}

/// The prefix of heartbeat messages for a relay whose event prefix is `prefix`.
pub fn heartbeat_prefix(prefix: &str) -> String {
    format!("{prefix}-heartbeat")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_follow_postgres_rules() {
        for ok in ["outbox", "outbox_slot_1", "1slot", &"a".repeat(63)] {
            assert!(SlotName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Outbox",
            "out-box",
            "a b",
            "x'; DROP",
            "é",
            &"a".repeat(64),
        ] {
            assert!(SlotName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn publication_names_are_quoted_and_strict() {
        assert_eq!(
            PublicationName::parse("outbox_pub").unwrap().quoted(),
            "\"outbox_pub\""
        );
        for bad in ["", "1pub", "Pub", "p\"ub", "p,ub", "p'ub", &"p".repeat(64)] {
            assert!(PublicationName::parse(bad).is_err(), "{bad}");
        }
    }
}
