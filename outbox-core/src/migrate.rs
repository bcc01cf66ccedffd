//! Creating and upgrading the outbox table, apart from the host application's own migrations.
//!
//! Applied migrations are recorded per outbox table in `_outbox_migrations`, in the table's schema,
//! so they never mix with the service's `_sqlx_migrations` (or Flyway, or Diesel) history. All
//! steps of one run happen in one transaction under an advisory lock, so concurrent service
//! instances and relays can all call [`migrate`] at start-up. The statements are built once here
//! ([`MigrationRun`], [`pending_steps`]) and run by each database driver: sqlx in [`migrate`],
//! `tokio-postgres` in `Outbox::migrate_tokio_postgres` (feature `tokio-postgres`), and likewise
//! `migrate_diesel_async`, `migrate_sqlx08` and `migrate_sea_orm`.

use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::error::{Error, Result};
use crate::table::{Identifier, OutboxTable};

/// One migration step of the outbox schema.
struct Step {
    version: i32,
    description: &'static str,
    sql: fn(&OutboxTable) -> Vec<String>,
}

const STEPS: &[Step] = &[
    Step {
        version: 1,
        description: "create the outbox table (Debezium-compatible columns plus relay columns)",
        sql: v1,
    },
    Step {
        version: 2,
        description: "create the parked-events table (poison events and the events held behind them)",
        sql: v2,
    },
    Step {
        version: 3,
        description: "make the NOTIFY wake-up switchable with the `outbox.notify` setting",
        sql: v3,
    },
    Step {
        version: 4,
        description: "refuse malformed rows at write time (headers a JSON object, schema_version from 1)",
        sql: v4,
    },
    Step {
        version: 5,
        description: "notify on a channel named after the table's resolved schema and name",
        sql: v5,
    },
    Step {
        version: 6,
        description: "drop the per-statement NOTIFY trigger: writers commit in parallel, the polling relay paces its polls",
        sql: v6,
    },
];

/// The newest schema version this library creates.
pub const SCHEMA_VERSION: i32 = 6;

/// The PostgreSQL setting that switches an installed NOTIFY wake-up trigger off: `outbox.notify`.
///
/// The migrations install no wake-up trigger (migration 6 drops the one earlier versions created):
/// PostgreSQL serialises the commits of all transactions that sent a notification (a cluster-wide
/// lock held through the commit's WAL flush), and even when it sends nothing the trigger costs
/// every outbox-writing statement a PL/pgSQL call. The polling relay instead tightens its poll
/// interval to a few milliseconds while rows keep coming and relaxes it to `poll_interval` when
/// idle. A deployment that wants a wake-up on every commit anyway (few writers, sporadic events)
/// installs [`notify_trigger_sql`]; the function it calls sends nothing while this setting is
/// `off` — per database (`ALTER DATABASE … SET outbox.notify = off`), per role, or per
/// transaction (`SET LOCAL`).
pub const NOTIFY_SETTING: &str = "outbox.notify";

fn notify_function(t: &OutboxTable, guarded: bool) -> String {
    let notify_fn = t.derived("notify");
    let channel = t.notify_channel();
    let body = if guarded {
        format!(
            "IF current_setting('{NOTIFY_SETTING}', true) IS DISTINCT FROM 'off' THEN \
                 PERFORM pg_notify('{channel}', ''); \
             END IF; RETURN NULL;"
        )
    } else {
        format!("PERFORM pg_notify('{channel}', ''); RETURN NULL;")
    };
    format!(
        "CREATE OR REPLACE FUNCTION {notify_fn}() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN {body} END $$"
    )
}

/// The statement that installs the optional NOTIFY wake-up trigger on a table migrated to
/// [`SCHEMA_VERSION`]: an `AFTER INSERT … FOR EACH STATEMENT` trigger calling the table's notify
/// function, which notifies the channel the polling relay listens on
/// ([`OutboxTable::notify_channel`]) unless [`NOTIFY_SETTING`] is `off`. Idempotent.
///
/// Every transaction that notifies commits one at a time with every other notifying transaction,
/// so this caps the write throughput of concurrent writers; it suits deployments with sporadic
/// events that want them relayed at once rather than within the relay's `poll_interval`.
pub fn notify_trigger_sql(table: &OutboxTable) -> String {
    let trigger = table.derived_unqualified("notify_trg");
    let qualified = table.qualified();
    format!(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_trigger
                            WHERE tgrelid = '{}'::regclass AND tgname = '{}') THEN
                 CREATE TRIGGER {trigger} AFTER INSERT ON {qualified}
                     FOR EACH STATEMENT EXECUTE FUNCTION {}();
             END IF;
         END $$",
        qualified,
        trigger.trim_matches('"'),
        table.derived("notify")
    )
}

fn v6(t: &OutboxTable) -> Vec<String> {
    // The function stays (v5's, channel from the table it fires on) so that
    // `notify_trigger_sql` can put the wake-up back without a schema change.
    vec![format!(
        "DROP TRIGGER IF EXISTS {} ON {}",
        t.derived_unqualified("notify_trg"),
        t.qualified()
    )]
}

fn v5(t: &OutboxTable) -> Vec<String> {
    // The channel comes from the table the trigger fires on, so it is the same whichever spelling
    // (`outbox`, `public.outbox`) migrated it; the relay listens on
    // `OutboxTable::notify_channel` of the resolved table, cut to 63 bytes alike.
    let notify_fn = t.derived("notify");
    vec![format!(
        "CREATE OR REPLACE FUNCTION {notify_fn}() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF current_setting('{NOTIFY_SETTING}', true) IS DISTINCT FROM 'off' THEN
                 PERFORM pg_notify(left('outbox_' || TG_TABLE_SCHEMA || '_' || TG_TABLE_NAME, 63), '');
             END IF;
             RETURN NULL;
         END $$"
    )]
}

fn v4(t: &OutboxTable) -> Vec<String> {
    let table = t.qualified();
    // `NOT VALID`: new rows are checked at once, existing ones are left alone (no table scan
    // under an exclusive lock); a malformed row already there is parked by the relay.
    let check = |name: &str, expr: &str| {
        format!(
            "DO $$ BEGIN
                 ALTER TABLE {table} ADD CONSTRAINT {} CHECK ({expr}) NOT VALID;
             EXCEPTION WHEN duplicate_object THEN NULL;
             END $$",
            t.derived_unqualified(name)
        )
    };
    vec![
        check("headers_object", "jsonb_typeof(headers) = 'object'"),
        check(
            "schema_version_check",
            &format!("schema_version >= {}", crate::MIN_SCHEMA_VERSION),
        ),
    ]
}

fn v3(t: &OutboxTable) -> Vec<String> {
    vec![notify_function(t, true)]
}

fn v2(t: &OutboxTable) -> Vec<String> {
    let parked = t.parked_qualified();
    vec![
        // A parked event keeps every column of its outbox row, plus why it was parked. Events of
        // the same aggregate that arrive after a poison event are parked behind it (`blocked_by`)
        // so the aggregate's order survives; `park_seq` is the order to replay them in.
        format!(
            "CREATE TABLE IF NOT EXISTS {parked} (
                id                 uuid         PRIMARY KEY,
                aggregatetype      varchar(255) NOT NULL,
                aggregateid        varchar(255) NOT NULL,
                type               varchar(255) NOT NULL,
                payload            jsonb,
                seq                bigint,
                created_at         timestamptz,
                tracingspancontext varchar(512),
                headers            jsonb        NOT NULL DEFAULT '{{}}'::jsonb,
                schema_version     integer      NOT NULL DEFAULT 1,
                topic              varchar(249),
                aggregate_seq      bigint,
                park_seq           bigint       GENERATED ALWAYS AS IDENTITY,
                reason             text         NOT NULL,
                blocked_by         uuid,
                parked_at          timestamptz  NOT NULL DEFAULT now()
            )"
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS {} ON {parked} (aggregatetype, aggregateid, park_seq)",
            t.derived_unqualified("parked_aggregate_idx")
        ),
    ]
}

fn v1(t: &OutboxTable) -> Vec<String> {
    let table = t.qualified();
    let notify_fn = t.derived("notify");
    vec![
        // The first five columns are Debezium's outbox-router defaults. The others are added one by
        // one with defaults, so that an existing Debezium outbox table is upgraded in place and a
        // row inserted by plain SQL with only the five columns is relayed correctly.
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                id            uuid         PRIMARY KEY DEFAULT gen_random_uuid(),
                aggregatetype varchar(255) NOT NULL,
                aggregateid   varchar(255) NOT NULL,
                type          varchar(255) NOT NULL,
                payload       jsonb
            )"
        ),
        format!(
            "ALTER TABLE {table}
                ADD COLUMN IF NOT EXISTS seq                bigint GENERATED BY DEFAULT AS IDENTITY,
                ADD COLUMN IF NOT EXISTS created_at         timestamptz NOT NULL DEFAULT now(),
                ADD COLUMN IF NOT EXISTS tracingspancontext varchar(512),
                ADD COLUMN IF NOT EXISTS headers            jsonb NOT NULL DEFAULT '{{}}'::jsonb,
                ADD COLUMN IF NOT EXISTS schema_version     integer NOT NULL DEFAULT 1,
                ADD COLUMN IF NOT EXISTS topic              varchar(249),
                ADD COLUMN IF NOT EXISTS aggregate_seq      bigint,
                ADD COLUMN IF NOT EXISTS published_at       timestamptz"
        ),
        format!(
            "CREATE UNIQUE INDEX IF NOT EXISTS {} ON {table} (seq)",
            t.derived_unqualified("seq_key")
        ),
        // The relay claims unpublished rows in `seq` order through this partial index.
        format!(
            "CREATE INDEX IF NOT EXISTS {} ON {table} (seq) WHERE published_at IS NULL",
            t.derived_unqualified("unpublished_idx")
        ),
        // Wake the polling relay at commit time; the poll interval stays as a fallback.
        notify_function(t, false),
        format!(
            "DROP TRIGGER IF EXISTS {} ON {table}",
            t.derived_unqualified("notify_trg")
        ),
        format!(
            "CREATE TRIGGER {} AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {notify_fn}()",
            t.derived_unqualified("notify_trg")
        ),
    ]
}

/// What a [`migrate`] call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this call, in order (empty when already up to date).
    pub applied: Vec<i32>,
    /// The schema version after the call.
    pub version: i32,
}

fn history_table(table: &OutboxTable) -> String {
    match table.schema() {
        Some(s) => format!("{}.\"_outbox_migrations\"", s.quoted()),
        None => "\"_outbox_migrations\"".to_owned(),
    }
}

/// The statement that takes a migration run's transaction-scoped advisory lock (`$1`: the lock
/// key, `bigint`), so that concurrent runs apply each step once: a second migrator waits here
/// until the first commits, then finds the steps recorded.
pub(crate) const LOCK_SQL: &str = "SELECT pg_advisory_xact_lock($1)";

/// The statements of one migration run apart from its steps, the same for every database driver
/// (sqlx here, `tokio-postgres` in `tokio_pg.rs`): each driver runs, in one transaction,
/// [`LOCK_SQL`] with `lock_key`, then `setup`, then `current_version`, then for each pending step
/// its statements and `record`.
pub(crate) struct MigrationRun {
    /// The advisory lock key, bound to [`LOCK_SQL`].
    pub(crate) lock_key: i64,
    /// Parameterless statements creating the schema (if any) and the history table when missing.
    pub(crate) setup: Vec<String>,
    /// The highest recorded version (`integer`, NULL when none); `$1`: the table name (`text`).
    pub(crate) current_version: String,
    /// Records an applied step; `$1`: table name (`text`), `$2`: version (`integer`),
    /// `$3`: description (`text`).
    pub(crate) record: String,
}

impl MigrationRun {
    /// The run recording its steps in `history`, after creating `schema` when given.
    pub(crate) fn new(lock_key: i64, schema: Option<&Identifier>, history: &str) -> Self {
        let mut setup = Vec::new();
        if let Some(schema) = schema {
            setup.push(format!("CREATE SCHEMA IF NOT EXISTS {}", schema.quoted()));
        }
        setup.push(format!(
            "CREATE TABLE IF NOT EXISTS {history} (
            table_name  text        NOT NULL,
            version     integer     NOT NULL,
            description text        NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (table_name, version)
        )"
        ));
        MigrationRun {
            lock_key,
            setup,
            current_version: format!("SELECT max(version) FROM {history} WHERE table_name = $1"),
            record: format!(
                "INSERT INTO {history} (table_name, version, description) VALUES ($1, $2, $3)"
            ),
        }
    }

    /// The run of the outbox table `table` (its history in `_outbox_migrations`).
    pub(crate) fn outbox(table: &OutboxTable) -> Self {
        Self::new(
            table.lock_key("migrate"),
            table.schema(),
            &history_table(table),
        )
    }
}

/// A step of the outbox schema still to apply: its version, description and statements.
pub(crate) struct PendingStep {
    pub(crate) version: i32,
    pub(crate) description: &'static str,
    pub(crate) statements: Vec<String>,
}

/// The steps that bring `table` from version `current` to [`SCHEMA_VERSION`], in order, or
/// [`Error::SchemaTooNew`] when `current` is newer than this library.
pub(crate) fn pending_steps(table: &OutboxTable, current: i32) -> Result<Vec<PendingStep>> {
    if current > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            table: table.to_string(),
            found: current,
            known: SCHEMA_VERSION,
        });
    }
    Ok(STEPS
        .iter()
        .filter(|s| s.version > current)
        .map(|s| PendingStep {
            version: s.version,
            description: s.description,
            statements: (s.sql)(table),
        })
        .collect())
}

/// Logs an applied step, the same for every driver.
pub(crate) fn log_applied(table: &OutboxTable, step: &PendingStep) {
    tracing::info!(table = %table, version = step.version, "applied outbox migration: {}", step.description);
}

/// Opens a migration run in `tx`: takes the transaction-scoped advisory lock `lock_key` (so that
/// concurrent runs apply each step once), creates `schema` and the history table `history` when
/// missing, and returns the highest version recorded there for `table_name` (0 when none).
pub(crate) async fn begin_migration(
    tx: &mut PgConnection,
    lock_key: i64,
    schema: Option<&Identifier>,
    history: &str,
    table_name: &str,
) -> std::result::Result<i32, sqlx::Error> {
    begin_run(
        tx,
        &MigrationRun::new(lock_key, schema, history),
        table_name,
    )
    .await
}

/// [`begin_migration`] for a prepared [`MigrationRun`].
async fn begin_run(
    tx: &mut PgConnection,
    run: &MigrationRun,
    table_name: &str,
) -> std::result::Result<i32, sqlx::Error> {
    sqlx::query(LOCK_SQL)
        .bind(run.lock_key)
        .execute(&mut *tx)
        .await?;
    for statement in &run.setup {
        sqlx::query(AssertSqlSafe(statement.as_str()))
            .execute(&mut *tx)
            .await?;
    }
    let current: Option<i32> = sqlx::query_scalar(AssertSqlSafe(run.current_version.as_str()))
        .bind(table_name)
        .fetch_one(&mut *tx)
        .await?;
    Ok(current.unwrap_or(0))
}

/// Creates the outbox table or upgrades it to [`SCHEMA_VERSION`].
///
/// Guarantee: idempotent and safe to call concurrently from many processes; each step is applied
/// exactly once, all of a run in one transaction (a failure leaves the previous version intact).
/// Fails with [`Error::SchemaTooNew`] rather than touching a table migrated by a newer version.
/// `tokio-postgres` users call `Outbox::migrate_tokio_postgres`, which runs the same statements
/// under the same lock.
pub async fn migrate(conn: &mut PgConnection, table: &OutboxTable) -> Result<MigrationReport> {
    let mut tx = conn.begin().await?;
    let run = MigrationRun::outbox(table);
    let current = begin_run(&mut tx, &run, table.name().as_str()).await?;
    let mut applied = Vec::new();
    for step in pending_steps(table, current)? {
        for statement in &step.statements {
            sqlx::query(AssertSqlSafe(statement.as_str()))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(AssertSqlSafe(run.record.as_str()))
            .bind(table.name().as_str())
            .bind(step.version)
            .bind(step.description)
            .execute(&mut *tx)
            .await?;
        log_applied(table, &step);
        applied.push(step.version);
    }
    tx.commit().await?;
    Ok(MigrationReport {
        applied,
        version: SCHEMA_VERSION,
    })
}

/// The schema version recorded for `table`, or `None` when it was never migrated.
pub async fn schema_version(conn: &mut PgConnection, table: &OutboxTable) -> Result<Option<i32>> {
    let history = history_table(table);
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&history)
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(None);
    }
    Ok(sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT max(version) FROM {history} WHERE table_name = $1"
    )))
    .bind(table.name().as_str())
    .fetch_one(&mut *conn)
    .await?)
}
