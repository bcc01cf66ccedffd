//! The outbox table as pgoutput names it ([`ResolvedTable`]) and the publication that carries
//! its inserts: created when missing, verified when it exists.

use outbox_core::OutboxTable;
use sqlx::{AssertSqlSafe, PgPool, Row};

use super::{LogicalError, PublicationName, db_err};

/// The schema-resolved identity of the outbox table, as pgoutput `Relation` messages name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTable {
    /// Schema (namespace) name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// Quoted, schema-qualified name for SQL.
    pub qualified: String,
    /// The same table for the statements of [`crate::table`]: in the resolved schema, or as
    /// configured when the schema's name is not a valid identifier.
    pub table: OutboxTable,
}

/// Resolve the configured outbox table (its name possibly unqualified) to its schema and name.
pub async fn resolve_table(
    pool: &PgPool,
    configured: &OutboxTable,
) -> Result<ResolvedTable, LogicalError> {
    let qualified = configured.qualified();
    let row = sqlx::query(
        "SELECT n.nspname::text AS schema, c.relname::text AS name \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.oid = to_regclass($1)",
    )
    .bind(&qualified)
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
        table: OutboxTable::new(Some(&schema), &name).unwrap_or_else(|_| configured.clone()),
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

/// The publication of a multi-table slot: created `FOR TABLE a, b, … WITH (publish = 'insert')`
/// when missing; when it exists, verified like [`ensure_publication`] (inserts published) and
/// every table not yet a member added (`ALTER PUBLICATION … ADD TABLE`). Every name is quoted.
pub async fn ensure_publication_tables(
    pool: &PgPool,
    name: &PublicationName,
    tables: &[ResolvedTable],
) -> Result<(), LogicalError> {
    let exists: Option<bool> =
        sqlx::query_scalar("SELECT pubinsert FROM pg_publication WHERE pubname = $1")
            .bind(name.as_str())
            .fetch_optional(pool)
            .await
            .map_err(db_err("reading pg_publication"))?;
    match exists {
        Some(false) => {
            return Err(LogicalError::Publication(format!(
                "publication {name} exists but does not publish inserts; recreate it with WITH (publish = 'insert')"
            )));
        }
        Some(true) => {}
        None => {
            let list: Vec<&str> = tables.iter().map(|t| t.qualified.as_str()).collect();
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')",
                name.quoted(),
                list.join(", ")
            );
            match sqlx::query(AssertSqlSafe(sql)).execute(pool).await {
                Ok(_) => {
                    tracing::info!(publication = %name, tables = tables.len(), "created publication for every outbox table (publish = 'insert')");
                    return Ok(());
                }
                // Lost a creation race: verify and complete what the other relay created.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => {}
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
                    return Err(LogicalError::Privilege {
                        role: "current role".into(),
                        missing: format!(
                            "the right to create publication {name} (needs CREATE on the database and ownership of the outbox tables): {}",
                            e.message()
                        ),
                    });
                }
                Err(e) => return Err(db_err("creating the publication")(e)),
            }
        }
    }
    let members = publication_members(pool, name).await?;
    for t in tables {
        if !members.iter().any(|(s, n)| s == &t.schema && n == &t.name) {
            add_publication_table(pool, name, t).await?;
        }
    }
    Ok(())
}

/// `schema.table` of every member of the publication.
async fn publication_members(
    pool: &PgPool,
    name: &PublicationName,
) -> Result<Vec<(String, String)>, LogicalError> {
    sqlx::query_as(
        "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
    )
    .bind(name.as_str())
    .fetch_all(pool)
    .await
    .map_err(db_err("reading pg_publication_tables"))
}

/// `ALTER PUBLICATION <name> ADD TABLE <table>` (quoted); a table that is a member already is
/// not an error.
pub async fn add_publication_table(
    pool: &PgPool,
    name: &PublicationName,
    table: &ResolvedTable,
) -> Result<(), LogicalError> {
    let sql = format!(
        "ALTER PUBLICATION {} ADD TABLE {}",
        name.quoted(),
        table.qualified
    );
    match sqlx::query(AssertSqlSafe(sql)).execute(pool).await {
        Ok(_) => {
            tracing::info!(publication = %name, table = %format!("{}.{}", table.schema, table.name), "added the outbox table to the publication");
            Ok(())
        }
        // 42710: already a member (another relay added it).
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => Ok(()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
            Err(LogicalError::Privilege {
                role: "current role".into(),
                missing: format!(
                    "the right to add {}.{} to publication {name} (needs ownership of the table and the publication): {}",
                    table.schema,
                    table.name,
                    e.message()
                ),
            })
        }
        Err(e) => Err(db_err("adding a table to the publication")(e)),
    }
}

/// Fails with [`LogicalError::Publication`] naming the first of `tables` that no longer exists or
/// is no longer a member of the publication.
pub async fn check_publication_tables(
    pool: &PgPool,
    name: &PublicationName,
    tables: &[ResolvedTable],
) -> Result<(), LogicalError> {
    let members = publication_members(pool, name).await?;
    for t in tables {
        if !members.iter().any(|(s, n)| s == &t.schema && n == &t.name) {
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(&t.qualified)
                .fetch_one(pool)
                .await
                .map_err(db_err("looking up an outbox table"))?;
            return Err(LogicalError::Publication(format!(
                "the outbox table {}.{} {}: its events would no longer be streamed by the slot; \
                 {}",
                t.schema,
                t.name,
                if exists {
                    format!("is no longer a member of publication {name}")
                } else {
                    "was dropped".to_owned()
                },
                if exists {
                    format!(
                        "run ALTER PUBLICATION {} ADD TABLE {} and restart the relay (events \
                         committed meanwhile were not streamed: relay them with the polling \
                         source or re-insert them)",
                        name.quoted(),
                        t.qualified
                    )
                } else {
                    "remove it from the configuration (or restore it) and restart the relay"
                        .to_owned()
                }
            )));
        }
    }
    Ok(())
}
