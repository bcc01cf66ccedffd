//! Every statement the relay runs on the outbox table and on its `<table>_parked` table, and the
//! one decoder of their rows.
//!
//! Table names cannot be bound as parameters, so each statement here is a template whose
//! placeholders `{table}` and `{parked}` stand for the two tables, and `statement` is the one
//! place that turns a template into SQL for sqlx: it substitutes [`OutboxTable::qualified`] and
//! [`OutboxTable::parked_qualified`] (identifiers validated when the table was configured, and
//! quoted) and this module's constant fragments, and asserts the result safe
//! ([`AssertSqlSafe`]). Auditing the SQL the relay builds from these tables' identifiers means
//! auditing that function and the templates passed to it. Every value is a bound parameter.
//! Callers get typed functions.
//!
//! Rows are decoded by [`decode_row`], which hands their columns to [`StoredEvent::from_columns`]
//! — the decoder the logical source applies to the rows it streams, there as text — so a row is
//! valid or malformed for every reader alike. The columns whose types the migrations fix (`id`,
//! `seq`, `created_at`, `schema_version`, `aggregate_seq`) travel in binary and are read as typed
//! values, which costs less than printing and parsing them as text; every other column is
//! selected as `text`.
//!
//! Not here: the statements on other tables (the relay state table, the leader lock, the slots),
//! and the session and transaction settings the callers run before these statements.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{ColumnValue, MalformedEvent, OutboxTable, StoredEvent};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{
    AssertSqlSafe, Column, Decode, PgConnection, Postgres, Row, SqlSafeStr, SqlStr, TypeInfo,
    ValueRef,
};
use uuid::Uuid;

/// An aggregate: its type and id.
pub type AggregateKey = (String, String);

/// An event to park: a row of `<table>_parked`.
#[derive(Debug, Clone)]
pub struct ParkRequest {
    /// The event.
    pub event: StoredEvent,
    /// Why it cannot be published.
    pub reason: String,
    /// For an event held behind a poison event of its aggregate: that event's id.
    pub blocked_by: Option<Uuid>,
}

/// A parked event as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParkedEvent {
    /// The event id.
    pub id: Uuid,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Event type.
    pub event_type: String,
    /// Why it was parked.
    pub reason: String,
    /// The poison event it is held behind, if any.
    pub blocked_by: Option<Uuid>,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
    /// Payload size in bytes.
    pub payload_bytes: i64,
}

/// Which events `replay` re-publishes.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// Created at or after.
    pub from: Option<DateTime<Utc>>,
    /// Created before.
    pub to: Option<DateTime<Utc>>,
    /// Event id at or after (UUIDv7 ids are time-ordered).
    pub from_id: Option<Uuid>,
    /// Event id at or before.
    pub to_id: Option<Uuid>,
    /// Only these event types.
    pub event_types: Vec<String>,
    /// Only this aggregate type.
    pub aggregate_type: Option<String>,
}

/// The last event marked published.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LastPublished {
    /// Its id.
    pub id: Uuid,
    /// Its event type.
    pub event_type: String,
    /// When it was marked published.
    pub published_at: DateTime<Utc>,
}

/// How far behind the outbox table is (`table` write mode): see [`backlog`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Backlog {
    /// Rows not yet published.
    pub pending_events: i64,
    /// Age in seconds of the oldest unpublished row (the first in `seq` order).
    pub oldest_pending_age_seconds: Option<f64>,
    /// The published row just before the oldest pending one in `seq` order, or the newest row
    /// when nothing is pending.
    pub last_published: Option<LastPublished>,
}

/// Why rows of the outbox table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The statement failed; retrying may help.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A column of a fetched row cannot be read at all: the table is not an outbox table.
    #[error(
        "cannot read column `{column}` of the outbox table (is it an outbox table? run `outbox-relay migrate`)"
    )]
    Unreadable {
        /// The column.
        column: &'static str,
        /// The driver's error.
        #[source]
        error: sqlx::Error,
    },
}

/// The event columns, in [`StoredEvent::from_columns`]'s names (Debezium's, then ours), from
/// the table aliased `o`, with the expression each is selected as: the typed columns bare (in
/// binary), the others as text.
const EVENT_COLUMNS: [(&str, &str); 12] = [
    ("id", "o.id"),
    ("aggregatetype", "o.aggregatetype::text"),
    ("aggregateid", "o.aggregateid::text"),
    ("type", "o.type::text"),
    ("payload", "o.payload::text"),
    ("seq", "o.seq"),
    ("created_at", "o.created_at"),
    ("tracingspancontext", "o.tracingspancontext::text"),
    ("headers", "o.headers::text"),
    ("schema_version", "o.schema_version"),
    ("topic", "o.topic::text"),
    ("aggregate_seq", "o.aggregate_seq"),
];

/// The SELECT list of [`EVENT_COLUMNS`], from the table aliased `o`, in that order: the first
/// columns of every statement whose rows [`decode_row`] reads.
fn event_columns() -> String {
    EVENT_COLUMNS
        .iter()
        .map(|(name, expression)| format!("{expression} AS {name}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `where` clause of [`ReplayFilter`], over parameters `$1`…`$6`, on the table aliased `o`.
const REPLAY_WHERE: &str = "($1::timestamptz IS NULL OR o.created_at >= $1)
        AND ($2::timestamptz IS NULL OR o.created_at < $2)
        AND ($3::uuid IS NULL OR o.id >= $3) AND ($4::uuid IS NULL OR o.id <= $4)
        AND (cardinality($5::text[]) = 0 OR o.type = ANY($5))
        AND ($6::text IS NULL OR o.aggregatetype = $6)";

/// The text of a statement on `table`: `template` with each placeholder replaced, in one pass
/// (nothing substituted is read again):
///
/// - `{table}`: the outbox table, [`OutboxTable::qualified`];
/// - `{parked}`: its `<table>_parked` table, [`OutboxTable::parked_qualified`];
/// - `{event_columns}`: the SELECT list of [`EVENT_COLUMNS`], from the table aliased `o`;
/// - `{replay_where}`: [`REPLAY_WHERE`].
///
/// A caller may fill a placeholder of its own first, with one of this module's constants:
/// `{key}`, the key column of [`Keys`], `{cursor_trap}`, the condition of the `cursor`
/// mutant in [`Claim`], and `{shard_o}`/`{shard_i}`, the shard expression of a sharded
/// [`Claim`] ([`crate::shard::expression`]: constant text around a validated integer).
///
/// # Panics
///
/// On any other `{…}` in `template`: the templates are this module's constants.
fn statement_text(table: &OutboxTable, template: &str) -> String {
    let mut sql = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        sql.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .map(|i| open + i)
            .unwrap_or_else(|| panic!("unclosed placeholder in statement template {template:?}"));
        match &rest[open + 1..close] {
            "table" => sql.push_str(&table.qualified()),
            "parked" => sql.push_str(&table.parked_qualified()),
            "event_columns" => sql.push_str(&event_columns()),
            "replay_where" => sql.push_str(REPLAY_WHERE),
            other => panic!("unknown placeholder {{{other}}} in statement template {template:?}"),
        }
        rest = &rest[close + 1..];
    }
    sql.push_str(rest);
    sql
}

/// A statement on `table`, ready to run: [`statement_text`] asserted safe. The one place this
/// module hands SQL built from identifiers to sqlx: the identifiers are the table's (validated
/// and quoted), the rest of the text is this module's constants, and every value is a bound
/// parameter.
fn statement(table: &OutboxTable, template: &str) -> SqlStr {
    AssertSqlSafe(statement_text(table, template)).into_sql_str()
}

/// Turns a row selected with the event columns of this module into an event. A row that is not a
/// valid event (`headers` that are not a JSON object, a `schema_version` below 1, a required
/// column that is null) comes back as the inner `Err`, with what could be read, so the relay can
/// park it; only a row without the event columns (the statement is not one of this module's) is
/// an error.
///
/// Each column is read by its position (the event columns come first, in the relay's fixed event-column
/// order) and checked by name. A typed column is decoded by the type PostgreSQL reports for it:
/// `uuid`, `smallint`/`integer`/`bigint` and `timestamptz` as typed values, text types as text
/// (a table created by hand with a `varchar` id still decodes, its ids parsed). A value of any
/// other type, or one that does not decode (text that is not UTF-8 in a `SQL_ASCII` database),
/// is [`ColumnValue::Unreadable`]: the row is malformed when the column is required or
/// validated.
pub fn decode_row(row: &PgRow) -> Result<Result<StoredEvent, MalformedEvent>, ReadError> {
    let mut unreadable = None;
    let values: [ColumnValue<'_>; EVENT_COLUMNS.len()] = std::array::from_fn(|index| {
        column_value(row, index, EVENT_COLUMNS[index].0).unwrap_or_else(|error| {
            unreadable.get_or_insert(error);
            ColumnValue::Null
        })
    });
    if let Some(error) = unreadable {
        return Err(error);
    }
    Ok(StoredEvent::from_columns(
        EVENT_COLUMNS.iter().map(|(name, _)| *name).zip(values),
    ))
}

/// The value of column `index` of `row`, which must be named `column`.
fn column_value<'r>(
    row: &'r PgRow,
    index: usize,
    column: &'static str,
) -> Result<ColumnValue<'r>, ReadError> {
    let unreadable = |error| ReadError::Unreadable { column, error };
    match row.columns().get(index) {
        Some(c) if c.name() == column => {}
        _ => return Err(unreadable(sqlx::Error::ColumnNotFound(column.to_owned()))),
    }
    let raw = row.try_get_raw(index).map_err(unreadable)?;
    if raw.is_null() {
        return Ok(ColumnValue::Null);
    }
    // Built-in type OIDs (`pg_type.dat`: fixed across PostgreSQL versions): a match on the
    // number is far cheaper per value than sqlx's type compatibility checks.
    let oid = raw.type_info().oid().map(|oid| oid.0);
    let decoded = match oid {
        // text, varchar, bpchar, name
        Some(25 | 1043 | 1042 | 19) => {
            <&str as Decode<Postgres>>::decode(raw).map(ColumnValue::Text)
        }
        Some(2950) => <Uuid as Decode<Postgres>>::decode(raw).map(ColumnValue::Uuid),
        Some(20) => <i64 as Decode<Postgres>>::decode(raw).map(ColumnValue::Int),
        Some(23) => <i32 as Decode<Postgres>>::decode(raw).map(|n| ColumnValue::Int(n.into())),
        Some(21) => <i16 as Decode<Postgres>>::decode(raw).map(|n| ColumnValue::Int(n.into())),
        Some(1184) => <DateTime<Utc> as Decode<Postgres>>::decode(raw).map(ColumnValue::Timestamp),
        _ => {
            let type_name = raw.type_info().name().to_owned();
            Err(format!("type {type_name} is not one the relay reads").into())
        }
    };
    // A value that cannot be read makes its row malformed (parked with the reason), not the
    // whole claim fail.
    Ok(decoded.unwrap_or_else(|why| ColumnValue::Unreadable(why.to_string())))
}

fn decode_all(rows: &[PgRow]) -> Result<Vec<Result<StoredEvent, MalformedEvent>>, ReadError> {
    rows.iter().map(decode_row).collect()
}

/// The polling source's claim of unpublished rows, prepared once per source.
///
/// Rows in flight are excluded by value, not by a cursor: a row with a lower `seq` that commits
/// late is still claimed by the next claim. The claim is cut by size too: of the first `max`
/// rows, those whose preceding payloads (in `seq` order) stay under `max_bytes`, so a backlog
/// of large events is not read into memory a thousand at a time. The first row always
/// qualifies.
///
/// A sharded claim ([`Claim::sharded`], [`crate::shard`]) takes only rows of the shards it is
/// given: for each of them, the oldest unpublished rows not in flight, read in `seq` order from
/// the shard index `(shard, seq) WHERE published_at IS NULL` (at most `max` per shard, each an
/// index range scan that stops there); of those, the `max` lowest `seq`s are fetched whole, in
/// `seq` order, and cut by size as above. Its cost follows the batch and the number of shards
/// owned, not the backlog of the other instances' shards. (One ordered scan of the
/// unpublished-rows index filtered by shard would step over every row of the other shards, and
/// a scan of the shard index with `shard = ANY(…)` would sort the whole backlog of the owned
/// shards for every claim.) Each row comes back with its shard.
#[derive(Debug, Clone)]
pub struct Claim {
    sql: SqlStr,
    /// The deliberately broken `cursor` mutant (test-only build): the `WHERE seq > :last` trap.
    cursor: bool,
    /// The shard count of a sharded claim.
    shards: Option<u32>,
}

impl Claim {
    /// The claim of `table`'s unpublished rows.
    pub fn new(table: &OutboxTable) -> Self {
        let cursor = crate::faults::mutant("cursor");
        let template = "SELECT * FROM (SELECT c.*, \
                 sum(coalesce(octet_length(c.payload), 0)) OVER (ORDER BY c.seq) \
                 - coalesce(octet_length(c.payload), 0) AS bytes_before FROM ( \
             SELECT {event_columns} FROM {table} o \
             WHERE o.published_at IS NULL AND NOT (o.seq = ANY($2)) {cursor_trap} \
             ORDER BY o.seq LIMIT $1) c) b WHERE b.bytes_before < $3 ORDER BY b.seq"
            .replace("{cursor_trap}", if cursor { "AND o.seq > $4" } else { "" });
        Self {
            sql: statement(table, &template),
            cursor,
            shards: None,
        }
    }

    /// The claim of `table`'s unpublished rows in some of its `count` shards
    /// ([`Claim::fetch_sharded`]).
    pub fn sharded(table: &OutboxTable, count: u32) -> Self {
        let cursor = crate::faults::mutant("cursor");
        let template = Self::sharded_template(count, cursor);
        Self {
            sql: statement(table, &template),
            cursor,
            shards: Some(count),
        }
    }

    /// The text of a sharded claim on `table` for `count` shards, with the parameters of
    /// [`Claim::fetch_sharded`]: `$1` max, `$2` the `seq`s in flight, `$3` max bytes, `$4` the
    /// shards. Public so that tests can `EXPLAIN` it.
    pub fn sharded_text(table: &OutboxTable, count: u32) -> String {
        statement_text(table, &Self::sharded_template(count, false))
    }

    fn sharded_template(count: u32, cursor: bool) -> String {
        "SELECT * FROM (SELECT c.*, \
                 sum(coalesce(octet_length(c.payload), 0)) OVER (ORDER BY c.seq) \
                 - coalesce(octet_length(c.payload), 0) AS bytes_before FROM ( \
             SELECT {event_columns}, {shard_o} AS shard FROM {table} o \
             WHERE o.seq = ANY(ARRAY( \
                 SELECT p.seq FROM unnest($4::int8[]) AS s(shard) CROSS JOIN LATERAL ( \
                     SELECT i.seq FROM {table} i \
                     WHERE {shard_i} = s.shard AND i.published_at IS NULL \
                       AND NOT (i.seq = ANY($2)) {cursor_trap} \
                     ORDER BY i.seq LIMIT $1) p \
                 ORDER BY p.seq LIMIT $1)) \
               AND o.published_at IS NULL \
             ORDER BY o.seq LIMIT $1) c) b WHERE b.bytes_before < $3 ORDER BY b.seq"
            .replace("{cursor_trap}", if cursor { "AND i.seq > $5" } else { "" })
            .replace("{shard_o}", &crate::shard::expression(count, "o"))
            .replace("{shard_i}", &crate::shard::expression(count, "i"))
    }

    /// Up to `max` unpublished rows in `seq` order, none of `in_flight`, cut at `max_bytes` of
    /// payload (the first row always comes). `highest_claimed` is read only by the `cursor`
    /// mutant.
    pub async fn fetch(
        &self,
        conn: &mut PgConnection,
        max: usize,
        in_flight: &[i64],
        max_bytes: i64,
        highest_claimed: i64,
    ) -> Result<Vec<Result<StoredEvent, MalformedEvent>>, ReadError> {
        let mut claim = sqlx::query(self.sql.clone())
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .bind(in_flight)
            .bind(max_bytes);
        if self.cursor {
            claim = claim.bind(highest_claimed);
        }
        decode_all(&claim.fetch_all(conn).await?)
    }

    /// [`Claim::fetch`] for a sharded claim: only rows of `shards`, each with its shard.
    ///
    /// # Panics
    ///
    /// On a claim made by [`Claim::new`].
    pub async fn fetch_sharded(
        &self,
        conn: &mut PgConnection,
        max: usize,
        in_flight: &[i64],
        max_bytes: i64,
        highest_claimed: i64,
        shards: &[i64],
    ) -> Result<Vec<ShardedRow>, ReadError> {
        assert!(self.shards.is_some(), "fetch_sharded on an unsharded claim");
        let mut claim = sqlx::query(self.sql.clone())
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .bind(in_flight)
            .bind(max_bytes)
            .bind(shards);
        if self.cursor {
            claim = claim.bind(highest_claimed);
        }
        claim
            .fetch_all(conn)
            .await?
            .iter()
            .map(|row| {
                let shard: i64 = row
                    .try_get("shard")
                    .map_err(|error| ReadError::Unreadable {
                        column: "shard",
                        error,
                    })?;
                Ok(ShardedRow {
                    shard: u32::try_from(shard).unwrap_or(u32::MAX),
                    event: decode_row(row)?,
                })
            })
            .collect()
    }
}

/// A row of a sharded claim ([`Claim::fetch_sharded`]).
#[derive(Debug)]
pub struct ShardedRow {
    /// The row's shard.
    pub shard: u32,
    /// The decoded row; a malformed one comes back with what could be read, to be parked.
    pub event: Result<StoredEvent, MalformedEvent>,
}

/// Creates the shard index of `table` for `count` shards ([`crate::shard::index_statement`]),
/// without blocking writers; an index left invalid by an interrupted build is dropped and built
/// again. Returns whether it had to be built. Runs outside any transaction.
pub async fn ensure_shard_index(
    conn: &mut PgConnection,
    table: &OutboxTable,
    count: u32,
) -> Result<bool, sqlx::Error> {
    let table = &table.resolve(&mut *conn).await?;
    let qualified = crate::shard::index_qualified(table, count);
    let valid: Option<bool> = sqlx::query_scalar(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
    )
    .bind(&qualified)
    .fetch_optional(&mut *conn)
    .await?;
    match valid {
        Some(true) => return Ok(false),
        Some(false) => {
            sqlx::query(AssertSqlSafe(format!(
                "DROP INDEX CONCURRENTLY IF EXISTS {qualified}"
            )))
            .execute(&mut *conn)
            .await?;
        }
        None => {}
    }
    sqlx::query(AssertSqlSafe(crate::shard::index_statement(table, count)))
        .execute(&mut *conn)
        .await?;
    Ok(true)
}

/// Whether the shard index of `table` for `count` shards exists and is valid.
pub async fn shard_index_ready(
    conn: &mut PgConnection,
    table: &OutboxTable,
    count: u32,
) -> Result<bool, sqlx::Error> {
    let table = &table.resolve(&mut *conn).await?;
    let valid: Option<bool> = sqlx::query_scalar(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
    )
    .bind(crate::shard::index_qualified(table, count))
    .fetch_optional(conn)
    .await?;
    Ok(valid == Some(true))
}

/// Whether any row of the table is marked published: a logical slot missing with no record of
/// it, over a table with published rows, was dropped or lost while no relay ran (the logical
/// source warns, then creates it and re-publishes as on a first start).
pub async fn has_published_rows(
    conn: &mut PgConnection,
    table: &OutboxTable,
) -> Result<bool, sqlx::Error> {
    let sql = "SELECT EXISTS (SELECT 1 FROM {table} WHERE published_at IS NOT NULL)";
    sqlx::query_scalar(statement(table, sql))
        .fetch_one(conn)
        .await
}

/// Counts the unpublished rows; answered from the partial `seq` index on them (see
/// [`backlog_queries`]).
const UNPUBLISHED_COUNT: &str = "SELECT count(*) FROM {table} WHERE published_at IS NULL";

/// How many rows of the table are unpublished, as the transaction open on `conn` sees them.
pub async fn unpublished_count(
    conn: &mut PgConnection,
    table: &OutboxTable,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(statement(table, UNPUBLISHED_COUNT))
        .fetch_one(conn)
        .await
}

/// A row of [`unpublished_page`]: its `seq`, where the next page starts, and the event.
#[derive(Debug)]
pub struct UnpublishedRow {
    /// The row's `seq`.
    pub seq: i64,
    /// The decoded row; a malformed one comes back with what could be read, to be parked.
    pub event: Result<StoredEvent, MalformedEvent>,
}

/// The next keyset page of unpublished rows: those with a `seq` above `after`, in `seq` order, at
/// most `max` of them and, past the first, only while the payloads before a row stay under
/// `max_bytes`. Read in the transaction open on `conn`, so every page of a re-publication reads
/// the same snapshot (the logical source imports its new slot's exported snapshot there).
pub async fn unpublished_page(
    conn: &mut PgConnection,
    table: &OutboxTable,
    after: i64,
    max: i64,
    max_bytes: i64,
) -> Result<Vec<UnpublishedRow>, ReadError> {
    let sql = "SELECT * FROM (SELECT p.*, \
             sum(coalesce(octet_length(p.payload), 0)) OVER (ORDER BY p.seq) \
             - coalesce(octet_length(p.payload), 0) AS bytes_before FROM ( \
         SELECT {event_columns} FROM {table} o \
         WHERE o.published_at IS NULL AND o.seq > $1 ORDER BY o.seq LIMIT $2) p) b \
         WHERE b.bytes_before < $3 ORDER BY b.seq";
    let rows = sqlx::query(statement(table, sql))
        .bind(after)
        .bind(max)
        .bind(max_bytes)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|row| {
            Ok(UnpublishedRow {
                event: decode_row(row)?,
                seq: row.try_get("seq").map_err(|error| ReadError::Unreadable {
                    column: "seq",
                    error,
                })?,
            })
        })
        .collect()
}

/// The `seq`s of (at most `max`) unpublished rows, lowest first, and the WAL insert position
/// read after the statement's snapshot was taken: every row returned was committed before that
/// position. The logical source marks them published once its slot is confirmed past it
/// (`source::logical::settle`). Answered from the partial `seq` index on unpublished rows.
pub async fn unpublished_with_position(
    conn: &mut PgConnection,
    table: &OutboxTable,
    max: i64,
) -> Result<(u64, Vec<i64>), sqlx::Error> {
    let sql = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8, \
               ARRAY(SELECT seq FROM {table} WHERE published_at IS NULL ORDER BY seq LIMIT $1)";
    let (position, seqs): (i64, Vec<i64>) = sqlx::query_as(statement(table, sql))
        .bind(max)
        .fetch_one(conn)
        .await?;
    Ok((u64::try_from(position).unwrap_or(0), seqs))
}

/// Deletes rows published more than `older_than` ago, in chunks; returns how many were deleted.
pub async fn purge_published(
    conn: &mut PgConnection,
    table: &OutboxTable,
    older_than: Duration,
) -> Result<u64, sqlx::Error> {
    let sql = statement(
        table,
        "DELETE FROM {table} WHERE id IN (SELECT id FROM {table}
             WHERE published_at < now() - make_interval(secs => $1) ORDER BY seq LIMIT 10000)",
    );
    let mut total = 0;
    loop {
        let n = sqlx::query(sql.clone())
            .bind(older_than.as_secs_f64())
            .execute(&mut *conn)
            .await?
            .rows_affected();
        total += n;
        if n < 10000 {
            return Ok(total);
        }
    }
}

/// Rows of the outbox table named by a key column: `seq` (rows the relay read itself) or the
/// event id (events known only by their content).
#[derive(Debug, Clone, Copy)]
pub enum Keys<'a> {
    /// The rows with these `seq`s.
    Seqs(&'a [i64]),
    /// The rows with these event ids.
    Ids(&'a [Uuid]),
}

impl<'a> Keys<'a> {
    /// The statement `template` on `table` for these rows: `{key}` names the key column, and the
    /// keys are bound as `$1`.
    fn query(
        self,
        table: &OutboxTable,
        template: &str,
    ) -> sqlx::query::Query<'a, Postgres, PgArguments> {
        match self {
            Self::Seqs(seqs) => {
                sqlx::query(statement(table, &template.replace("{key}", "seq"))).bind(seqs)
            }
            Self::Ids(ids) => {
                sqlx::query(statement(table, &template.replace("{key}", "id"))).bind(ids)
            }
        }
    }
}

/// Marks published those of these rows still unpublished; returns how many it marked.
pub async fn mark_published(
    conn: &mut PgConnection,
    table: &OutboxTable,
    keys: Keys<'_>,
) -> Result<u64, sqlx::Error> {
    let sql = "UPDATE {table} SET published_at = clock_timestamp() \
               WHERE {key} = ANY($1) AND published_at IS NULL";
    Ok(keys.query(table, sql).execute(conn).await?.rows_affected())
}

/// Deletes these rows; returns the `seq`s of those it deleted.
pub async fn delete(
    conn: &mut PgConnection,
    table: &OutboxTable,
    keys: Keys<'_>,
) -> Result<Vec<i64>, sqlx::Error> {
    let sql = "DELETE FROM {table} WHERE {key} = ANY($1) RETURNING seq";
    let rows = keys.query(table, sql).fetch_all(conn).await?;
    rows.iter().map(|row| row.try_get(0)).collect()
}

/// Those of `seqs` that no row of the table (visible to this session) has.
pub async fn seqs_not_in_table(
    conn: &mut PgConnection,
    table: &OutboxTable,
    seqs: &[i64],
) -> Result<Vec<i64>, sqlx::Error> {
    let sql = "SELECT s FROM unnest($1::int8[]) AS s \
               WHERE NOT EXISTS (SELECT 1 FROM {table} WHERE seq = s)";
    sqlx::query_scalar(statement(table, sql))
        .bind(seqs)
        .fetch_all(conn)
        .await
}

impl ReplayFilter {
    /// The statement `template` on `table` with this filter bound as `$1`…`$6`, the parameters
    /// of `{replay_where}`.
    fn query<'a>(
        &'a self,
        table: &OutboxTable,
        template: &str,
    ) -> sqlx::query::Query<'a, Postgres, PgArguments> {
        sqlx::query(statement(table, template))
            .bind(self.from)
            .bind(self.to)
            .bind(self.from_id)
            .bind(self.to_id)
            .bind(&self.event_types)
            .bind(&self.aggregate_type)
    }
}

/// How many rows of the table `filter` selects for a replay.
pub async fn replay_count(
    conn: &mut PgConnection,
    table: &OutboxTable,
    filter: &ReplayFilter,
) -> Result<i64, sqlx::Error> {
    let sql = "SELECT count(*) FROM {table} o WHERE {replay_where}";
    filter.query(table, sql).fetch_one(conn).await?.try_get(0)
}

/// The next (at most 1000) rows `filter` selects for a replay, with a `seq` above `after`, in
/// `seq` order.
pub async fn replay_page(
    conn: &mut PgConnection,
    table: &OutboxTable,
    filter: &ReplayFilter,
    after: i64,
) -> Result<Vec<Result<StoredEvent, MalformedEvent>>, ReadError> {
    let sql = "SELECT {event_columns} FROM {table} o WHERE {replay_where} \
               AND o.seq > $7 ORDER BY o.seq LIMIT 1000";
    let rows = filter.query(table, sql).bind(after).fetch_all(conn).await?;
    decode_all(&rows)
}

/// Every distinct (aggregate type, event type, topic override) in the table, to find the topics
/// the relay routes to.
pub async fn routed_event_types(
    conn: &mut PgConnection,
    table: &OutboxTable,
) -> Result<Vec<(String, String, Option<String>)>, sqlx::Error> {
    let sql = "SELECT DISTINCT aggregatetype::text, type::text, topic::text FROM {table}";
    sqlx::query_as(statement(table, sql)).fetch_all(conn).await
}

/// The templates of [`backlog_queries`], in its order.
const BACKLOG_TEMPLATES: [&str; 3] = [
    UNPUBLISHED_COUNT,
    "SELECT extract(epoch FROM now() - created_at)::float8 FROM {table}
             WHERE published_at IS NULL ORDER BY seq LIMIT 1",
    "SELECT id, type, published_at FROM {table}
             WHERE published_at IS NOT NULL
               AND seq < coalesce((SELECT seq FROM {table} WHERE published_at IS NULL
                                   ORDER BY seq LIMIT 1), 9223372036854775807)
             ORDER BY seq DESC LIMIT 1",
];

/// The statements [`backlog`] runs on the outbox table: the pending count, the oldest pending
/// age and the last published event. Each is answered from the table's `seq` indexes (the unique
/// one and the partial one on unpublished rows), never by a scan of the whole table: the count
/// reads the partial index only (its cost grows with the backlog, not with the table), the
/// oldest pending row is the first entry of the partial index, and the last published event is
/// the row just below it in `seq` order (the newest row when nothing is pending). Public so that
/// tests can `EXPLAIN` them.
pub fn backlog_queries(table: &OutboxTable) -> [String; 3] {
    BACKLOG_TEMPLATES.map(|template| statement_text(table, template))
}

/// The setting [`backlog`] runs [`backlog_queries`] under: with a large share of the table
/// pending the planner would otherwise count by a (parallel) scan of the whole table, whose cost
/// grows with the table rather than with the backlog.
pub const BACKLOG_PLANNER_SETTING: &str = "SET LOCAL enable_seqscan = off";

/// Reads how far behind the table is, in one transaction, with [`backlog_queries`].
pub async fn backlog(conn: &mut PgConnection, table: &OutboxTable) -> Result<Backlog, sqlx::Error> {
    let [pending, oldest, last] = BACKLOG_TEMPLATES.map(|template| statement(table, template));
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(BACKLOG_PLANNER_SETTING)
        .execute(&mut *tx)
        .await?;
    let pending_events = sqlx::query_scalar(pending).fetch_one(&mut *tx).await?;
    let oldest_pending_age_seconds = sqlx::query_scalar(oldest)
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
    let last = sqlx::query(last).fetch_optional(&mut *tx).await?;
    tx.commit().await?;
    let last_published = last
        .map(|r| {
            Ok::<_, sqlx::Error>(LastPublished {
                id: r.try_get(0)?,
                event_type: r.try_get(1)?,
                published_at: r.try_get(2)?,
            })
        })
        .transpose()?;
    Ok(Backlog {
        pending_events,
        oldest_pending_age_seconds,
        last_published,
    })
}

/// Whether `<table>_parked` exists (the migrations create it, also in `logical_message` mode).
pub async fn parked_table_exists(
    conn: &mut PgConnection,
    table: &OutboxTable,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table.parked_qualified())
        .fetch_one(conn)
        .await
}

/// Stores parked events durably, in the order given; an event already parked is left as it is.
pub async fn park(
    conn: &mut PgConnection,
    table: &OutboxTable,
    requests: &[ParkRequest],
) -> Result<(), sqlx::Error> {
    if requests.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(requests.len());
    let mut types = Vec::new();
    let mut agg_ids = Vec::new();
    let mut event_types = Vec::new();
    let mut payloads = Vec::new();
    let mut seqs = Vec::new();
    let mut created = Vec::new();
    let mut traces = Vec::new();
    let mut headers = Vec::new();
    let mut versions = Vec::new();
    let mut topics = Vec::new();
    let mut agg_seqs = Vec::new();
    let mut reasons = Vec::new();
    let mut blocked = Vec::new();
    for r in requests {
        let e = &r.event;
        ids.push(e.id);
        types.push(e.aggregate_type.clone());
        agg_ids.push(e.aggregate_id.clone());
        event_types.push(e.event_type.clone());
        payloads.push(e.payload.clone());
        seqs.push(e.seq);
        created.push(e.created_at);
        traces.push(e.traceparent.clone());
        headers.push(
            serde_json::to_string(
                &e.headers
                    .iter()
                    .cloned()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )
            .expect("string map serializes"),
        );
        versions.push(e.schema_version);
        topics.push(e.topic.clone());
        agg_seqs.push(e.aggregate_seq);
        reasons.push(r.reason.clone());
        blocked.push(r.blocked_by);
    }
    let sql =
        "INSERT INTO {parked} (id, aggregatetype, aggregateid, type, payload, seq, created_at,
                         tracingspancontext, headers, schema_version, topic, aggregate_seq,
                         reason, blocked_by)
         SELECT id, at, ai, ty, pl::jsonb, sq, ca, tp, hd::jsonb, sv, tc, asq, rs, bb
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[],
                     $7::timestamptz[], $8::text[], $9::text[], $10::int4[], $11::text[],
                     $12::int8[], $13::text[], $14::uuid[])
              WITH ORDINALITY AS p(id, at, ai, ty, pl, sq, ca, tp, hd, sv, tc, asq, rs, bb, ord)
         ORDER BY ord
         ON CONFLICT (id) DO NOTHING";
    sqlx::query(statement(table, sql))
        .bind(&ids)
        .bind(&types)
        .bind(&agg_ids)
        .bind(&event_types)
        .bind(&payloads)
        .bind(&seqs)
        .bind(&created)
        .bind(&traces)
        .bind(&headers)
        .bind(&versions)
        .bind(&topics)
        .bind(&agg_seqs)
        .bind(&reasons)
        .bind(&blocked)
        .execute(conn)
        .await?;
    Ok(())
}

/// The aggregates that currently have parked events, each with its first parked event's id
/// (their new events must be parked behind it).
pub async fn blocked_aggregates(
    conn: &mut PgConnection,
    table: &OutboxTable,
) -> Result<HashMap<AggregateKey, Uuid>, sqlx::Error> {
    let sql = "SELECT DISTINCT ON (aggregatetype, aggregateid) aggregatetype, aggregateid, id
               FROM {parked} ORDER BY aggregatetype, aggregateid, park_seq";
    let rows = sqlx::query(statement(table, sql)).fetch_all(conn).await?;
    rows.iter()
        .map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), r.try_get(2)?)))
        .collect()
}

/// Lists parked events in replay order.
pub async fn list_parked(
    conn: &mut PgConnection,
    table: &OutboxTable,
) -> Result<Vec<ParkedEvent>, sqlx::Error> {
    let sql = "SELECT id, aggregatetype, aggregateid, type, reason, blocked_by, parked_at,
                      coalesce(octet_length(payload::text), 0)::int8 AS payload_bytes
               FROM {parked} ORDER BY park_seq";
    let rows = sqlx::query(statement(table, sql)).fetch_all(conn).await?;
    rows.iter()
        .map(|r| {
            Ok(ParkedEvent {
                id: r.try_get("id")?,
                aggregate_type: r.try_get("aggregatetype")?,
                aggregate_id: r.try_get("aggregateid")?,
                event_type: r.try_get("type")?,
                reason: r.try_get("reason")?,
                blocked_by: r.try_get("blocked_by")?,
                parked_at: r.try_get("parked_at")?,
                payload_bytes: r.try_get("payload_bytes")?,
            })
        })
        .collect()
}

/// How many events are parked.
pub async fn parked_count(
    conn: &mut PgConnection,
    table: &OutboxTable,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(statement(table, "SELECT count(*) FROM {parked}"))
        .fetch_one(conn)
        .await
}

/// The parked events of one aggregate, in replay order, as full events. A parked row is what the
/// relay wrote from a decoded event, so it decodes; should one not, what could be read is
/// returned (its invalid `headers` dropped), as a retry publishes what was parked.
pub async fn parked_events_of(
    conn: &mut PgConnection,
    table: &OutboxTable,
    aggregate: &AggregateKey,
) -> Result<Vec<StoredEvent>, ReadError> {
    let sql = "SELECT {event_columns} FROM {parked} o \
               WHERE o.aggregatetype = $1 AND o.aggregateid = $2 ORDER BY o.park_seq";
    let rows = sqlx::query(statement(table, sql))
        .bind(&aggregate.0)
        .bind(&aggregate.1)
        .fetch_all(conn)
        .await?;
    Ok(decode_all(&rows)?
        .into_iter()
        .map(|decoded| decoded.unwrap_or_else(|malformed| *malformed.salvaged))
        .collect())
}

/// The aggregate of a parked event, if it is parked.
pub async fn parked_aggregate_of(
    conn: &mut PgConnection,
    table: &OutboxTable,
    id: Uuid,
) -> Result<Option<AggregateKey>, sqlx::Error> {
    let sql = "SELECT aggregatetype, aggregateid FROM {parked} WHERE id = $1";
    let row = sqlx::query(statement(table, sql))
        .bind(id)
        .fetch_optional(conn)
        .await?;
    row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
}

/// Removes these parked events (after they were published by a retry, or when dropped); returns
/// how many were removed.
pub async fn remove_parked(
    conn: &mut PgConnection,
    table: &OutboxTable,
    ids: &[Uuid],
) -> Result<u64, sqlx::Error> {
    let sql = "DELETE FROM {parked} WHERE id = ANY($1)";
    let done = sqlx::query(statement(table, sql)).bind(ids);
    Ok(done.execute(conn).await?.rows_affected())
}

/// Removes every parked event; returns how many were removed.
pub async fn remove_all_parked(
    conn: &mut PgConnection,
    table: &OutboxTable,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(statement(table, "DELETE FROM {parked}"));
    Ok(done.execute(conn).await?.rows_affected())
}

/// `schema.table` (or `table` when no schema is known), without quotes: the name a multi-table
/// relay shows a table by.
pub fn display_name(table: &OutboxTable) -> String {
    match table.schema() {
        Some(s) => format!("{s}.{}", table.name()),
        None => table.name().to_string(),
    }
}

/// The migrated tables matching `pattern` (`schema.table`, sorted): named like the pattern's
/// table, in a schema matching its glob, with an outbox schema version recorded.
pub async fn matching_tables(
    conn: &mut PgConnection,
    pattern: &crate::config::TablePattern,
) -> Result<Vec<String>, sqlx::Error> {
    let schemas: Vec<String> = sqlx::query_scalar(
        "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relname = $1 AND c.relkind IN ('r', 'p') AND n.nspname LIKE $2 ESCAPE '\\'
         ORDER BY 1",
    )
    .bind(pattern.table().as_str())
    .bind(pattern.schema_like())
    .fetch_all(&mut *conn)
    .await?;
    let mut found = Vec::with_capacity(schemas.len());
    for schema in schemas {
        let Ok(table) = OutboxTable::new(Some(&schema), pattern.table().as_str()) else {
            tracing::warn!(%schema, "a schema matching `tables` is not a plain identifier; skipped");
            continue;
        };
        match outbox_core::schema_version(conn, &table).await {
            Ok(Some(_)) => found.push(display_name(&table)),
            Ok(None) => {
                tracing::debug!(table = %display_name(&table), "matches `tables` but is not migrated yet")
            }
            Err(e) => {
                tracing::debug!(table = %display_name(&table), error = %e, "cannot read the schema version; skipped")
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_text_substitutes_the_quoted_tables_and_the_fragments() {
        let table = OutboxTable::new(Some("shop"), "events").unwrap();
        assert_eq!(
            statement_text(
                &table,
                "DELETE FROM {table} USING {parked} p WHERE p.id = id"
            ),
            "DELETE FROM \"shop\".\"events\" USING \"shop\".\"events_parked\" p WHERE p.id = id"
        );
        assert_eq!(
            statement_text(
                &table,
                "SELECT {event_columns} FROM {table} o WHERE {replay_where}"
            ),
            format!(
                "SELECT {} FROM \"shop\".\"events\" o WHERE {REPLAY_WHERE}",
                event_columns()
            )
        );
    }

    #[test]
    fn statement_text_leaves_text_without_placeholders_alone() {
        let table = OutboxTable::default();
        assert_eq!(statement_text(&table, "SELECT 1"), "SELECT 1");
    }

    #[test]
    #[should_panic(expected = "unknown placeholder {tabel}")]
    fn statement_text_refuses_an_unknown_placeholder() {
        statement_text(&OutboxTable::default(), "SELECT * FROM {tabel}");
    }
}
