//! `pg_logical_emit_message`: the relay's idle heartbeats, and the privileges that decide who
//! can write a message with the outbox prefix.

use sqlx::PgPool;

use super::{LogicalError, Lsn, db_err};

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
