//! The replication session: a `pgwire-replication` client started from a confirmed LSN.
//!
//! `pgwire-replication` only ever reports to the server the *applied* LSN we hand it with
//! [`ReplicationClient::update_applied_lsn`] (write = flush = apply = that value), both in its
//! periodic status updates and in replies to server keepalives with reply-requested — it never
//! echoes the received WAL position. Its initial applied LSN is the start LSN, which we set to the
//! slot's confirmed position. So the server is never told of a position the relay has not
//! acknowledged. (Checked in `pgwire-replication` 0.5.0, `client/worker.rs`: `send_feedback` is
//! only called with `progress.load_applied()`.)

use std::time::Duration;

use pgwire_replication::{
    PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::LogicalError;
use super::pgoutput::Lsn;
use super::slot::{PublicationName, SlotName};

/// Connection settings for the replication connection, derived from the database URL.
#[derive(Clone)]
pub(crate) struct ReplicationTarget {
    host: String,
    port: u16,
    user: String,
    password: String,
    database: String,
    tls: TlsConfig,
}

impl std::fmt::Debug for ReplicationTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("ReplicationTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The password embedded in a `postgres://user:password@host/db` URL, if any.
fn url_password(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    let (_, pw) = userinfo.split_once(':')?;
    Some(percent_decode(pw))
}

impl ReplicationTarget {
    /// Derive the replication connection from the same URL the relay's SQL pool uses
    /// (host, port, user, database, password, `sslmode`; `PGPASSWORD` as fallback).
    pub(crate) fn from_url(url: &str) -> Result<Self, LogicalError> {
        let opts: PgConnectOptions = url
            .parse()
            .map_err(|e| LogicalError::Config(format!("invalid database URL: {e}")))?;
        let host = match opts.get_socket() {
            Some(dir) => dir.to_string_lossy().into_owned(),
            None => opts.get_host().to_owned(),
        };
        let tls = match opts.get_ssl_mode() {
            PgSslMode::Disable | PgSslMode::Allow | PgSslMode::Prefer => TlsConfig::disabled(),
            PgSslMode::Require => TlsConfig::require(),
            PgSslMode::VerifyCa => TlsConfig::verify_ca(None),
            PgSslMode::VerifyFull => TlsConfig::verify_full(None),
        };
        Ok(Self {
            host,
            port: opts.get_port(),
            user: opts.get_username().to_owned(),
            password: url_password(url)
                .or_else(|| std::env::var("PGPASSWORD").ok())
                .unwrap_or_default(),
            database: opts
                .get_database()
                .map(str::to_owned)
                .unwrap_or_else(|| opts.get_username().to_owned()),
            tls,
        })
    }
}

/// Map a replication-protocol error to the relay's classification.
pub(crate) fn classify(slot: &SlotName, e: PgWireError) -> LogicalError {
    let text = e.to_string();
    match &e {
        PgWireError::Server(msg) => {
            if msg.contains("does not exist") && msg.contains("replication slot") {
                LogicalError::SlotLost {
                    slot: slot.to_string(),
                    detail: format!("the slot no longer exists: {msg}"),
                }
            } else if msg.contains("can no longer get changes")
                || msg.contains("has been invalidated")
                || msg.contains("requested WAL segment") && msg.contains("removed")
            {
                LogicalError::SlotLost {
                    slot: slot.to_string(),
                    detail: msg.clone(),
                }
            } else if msg.contains("all replication slots are in use") {
                LogicalError::Slot(format!("{msg} (raise max_replication_slots)"))
            } else if msg.contains("is active for PID") {
                LogicalError::SlotInUse(msg.clone())
            } else if msg.contains("permission denied")
                || msg.contains("must be superuser or replication role")
            {
                LogicalError::Privilege {
                    role: "current role".into(),
                    missing: msg.clone(),
                }
            } else if msg.contains("wal_level") {
                LogicalError::WalLevel {
                    actual: msg.clone(),
                }
            } else if msg.contains("publication") && msg.contains("does not exist") {
                LogicalError::Publication(msg.clone())
            } else {
                LogicalError::Replication(text)
            }
        }
        PgWireError::Auth(_) | PgWireError::Tls(_) => {
            LogicalError::Config(format!("replication connection refused: {text}"))
        }
        _ => LogicalError::Replication(text),
    }
}

/// A slot just created over the replication protocol with `EXPORT_SNAPSHOT`: while this value
/// lives (its session stays idle), `snapshot` can be imported with `SET TRANSACTION SNAPSHOT`, and
/// a transaction doing so sees exactly what was committed before the slot's consistent point —
/// no more, no less. Dropping it ends the session and the snapshot.
pub(crate) struct ExportedSlot {
    _client: ReplicationClient,
    /// The consistent point: the slot streams every transaction committing after it.
    pub(crate) consistent_point: Lsn,
    /// The exported snapshot's name (validated: hex digits and `-`).
    pub(crate) snapshot: String,
}

/// Create `slot` (pgoutput) with an exported snapshot. `Ok(None)`: it already exists.
pub(crate) async fn create_slot_exporting(
    target: &ReplicationTarget,
    slot: &SlotName,
    publication: &PublicationName,
    application_name: &str,
) -> Result<Option<ExportedSlot>, LogicalError> {
    let cfg = ReplicationConfig::new(
        target.host.clone(),
        target.user.clone(),
        target.password.clone(),
        target.database.clone(),
        slot.as_str(),
        publication.as_str(),
    )
    .with_port(target.port)
    .with_tls(target.tls.clone())
    .with_application_name(application_name);
    let mut client = ReplicationClient::connect_gated(cfg)
        .await
        .map_err(|e| classify(slot, e))?;
    // The pre-PostgreSQL-15 spelling, still accepted by 15+.
    let rows = match client
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput EXPORT_SNAPSHOT"
        ))
        .await
    {
        Ok(rows) => rows,
        Err(PgWireError::Server(msg)) if msg.contains("already exists") => return Ok(None),
        Err(e) => return Err(classify(slot, e)),
    };
    let text = |row: &pgwire_replication::QueryRow, i: usize| -> Option<String> {
        row.get(i)?
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let row = rows
        .first()
        .ok_or_else(|| LogicalError::Slot("CREATE_REPLICATION_SLOT returned no row".into()))?;
    let consistent_point = text(row, 1)
        .as_deref()
        .and_then(Lsn::parse)
        .ok_or_else(|| {
            LogicalError::Slot("CREATE_REPLICATION_SLOT returned no consistent point".into())
        })?;
    let snapshot = text(row, 2)
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        .ok_or_else(|| {
            LogicalError::Slot("CREATE_REPLICATION_SLOT exported no usable snapshot".into())
        })?;
    tracing::info!(slot = %slot, consistent_point = %consistent_point, "created logical replication slot (pgoutput) with an exported snapshot");
    Ok(Some(ExportedSlot {
        _client: client,
        consistent_point,
        snapshot,
    }))
}

/// A running replication session.
pub(crate) struct Session {
    client: ReplicationClient,
}

impl Session {
    /// Connect and START_REPLICATION from `start` (the confirmed position; `0/0` = the slot's).
    pub(crate) async fn start(
        target: &ReplicationTarget,
        slot: &SlotName,
        publication: &PublicationName,
        start: Lsn,
        status_interval: Duration,
        application_name: &str,
    ) -> Result<Self, LogicalError> {
        let cfg = ReplicationConfig::new(
            target.host.clone(),
            target.user.clone(),
            target.password.clone(),
            target.database.clone(),
            slot.as_str(),
            publication.as_str(),
        )
        .with_port(target.port)
        .with_tls(target.tls.clone())
        .with_start_lsn(pgwire_replication::Lsn::from_u64(start.0))
        .with_ack_lsn(pgwire_replication::Lsn::from_u64(start.0))
        .with_status_interval(status_interval)
        .with_wakeup_interval(status_interval.max(Duration::from_secs(1)))
        .with_buffer_size(16 * 1024)
        .with_application_name(application_name);
        let mut client = ReplicationClient::connect(cfg)
            .await
            .map_err(|e| classify(slot, e))?;
        client.wait_started().await.map_err(|e| classify(slot, e))?;
        tracing::info!(slot = %slot, publication = %publication, start = %start, "replication stream started");
        Ok(Self { client })
    }

    /// Next event; cancel-safe. `Ok(None)`: the stream ended.
    pub(crate) async fn recv(&mut self) -> Result<Option<ReplicationEvent>, PgWireError> {
        self.client.recv().await
    }

    /// Tell the server everything up to `lsn` is processed (sent with the next status update).
    /// Callers pass only positions the relay has acknowledged.
    pub(crate) fn confirm(&self, lsn: Lsn) {
        self.client
            .update_applied_lsn(pgwire_replication::Lsn::from_u64(lsn.0));
    }

    /// Stop streaming (CopyDone) and wait for the worker to end.
    pub(crate) async fn stop(mut self) {
        if let Err(e) = self.client.shutdown().await {
            tracing::debug!("replication session ended with: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_extracted_and_decoded() {
        assert_eq!(
            url_password("postgres://u:p%40ss@h:5/db").as_deref(),
            Some("p@ss")
        );
        assert_eq!(url_password("postgres://u@h/db"), None);
        assert_eq!(
            url_password("postgres://u:%é%4@h/db").as_deref(),
            Some("%é%4")
        );
        assert_eq!(url_password("postgres://h/db"), None);
        let t = ReplicationTarget::from_url("postgres://alice:s3cret@127.0.0.1:6543/app").unwrap();
        assert_eq!(
            (t.port, t.user.as_str(), t.database.as_str()),
            (6543, "alice", "app")
        );
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
