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

use std::path::PathBuf;

use percent_encoding::percent_decode_str;
use pgwire_replication::{
    PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, SslMode, TlsConfig,
};
use sqlx::ConnectOptions;
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

/// A certificate or key path as sqlx resolved it (`file: PATH` in its URL rendering); inline PEM
/// (possible through `PGSSLROOTCERT` and friends) cannot be handed to the replication client.
fn certificate_path(param: &str, value: &str) -> Result<PathBuf, LogicalError> {
    match value.strip_prefix("file: ") {
        Some(path) => Ok(PathBuf::from(path)),
        None => Err(LogicalError::Config(format!(
            "database_url: `{param}` holds an inline PEM value; the replication connection needs \
             a file path: write it to a file and pass `{param}=/path/to/file`"
        ))),
    }
}

impl ReplicationTarget {
    /// Derive the replication connection from the same URL the relay's SQL pool uses, with
    /// everything sqlx resolves from it (URL parameters, then `PG*` variables, then `.pgpass`):
    /// host, port, user, database, password (`user:password@` or `?password=`), and TLS.
    ///
    /// TLS follows sqlx's behaviour for the SQL pool, so both connections are equally protected:
    ///
    /// | `sslmode` | replication connection |
    /// |---|---|
    /// | `disable` | plaintext |
    /// | `prefer` (sqlx's default) | TLS when the server offers it, else plaintext; certificate not verified |
    /// | `require` | TLS or fail; certificate not verified (as sqlx, even with `sslrootcert`) |
    /// | `verify-ca` | TLS or fail; chain verified against `sslrootcert` (Mozilla roots when unset); the host name is checked too (pgwire-replication 0.5.0 with current rustls: stricter than the pool, refused loudly) |
    /// | `verify-full` | as `verify-ca`, and the host name (or IP address) must match the certificate |
    /// | `allow` | refused: sqlx never upgrades it, libpq would; say `disable` or `prefer` |
    ///
    /// `sslcert` + `sslkey` present a client certificate on both connections (one without the
    /// other is refused, where sqlx would silently send none).
    pub(crate) fn from_url(url: &str) -> Result<Self, LogicalError> {
        let opts: PgConnectOptions = url.parse().map_err(|e| {
            LogicalError::Config(format!(
                "invalid database URL `{}`: {e}",
                crate::config::redact_url(url)
            ))
        })?;
        let host = match opts.get_socket() {
            Some(dir) => dir.to_string_lossy().into_owned(),
            None => opts.get_host().to_owned(),
        };
        // sqlx's own rendering of what it will use (URL parameters over PG* variables, .pgpass
        // applied): the only public way to read its password and certificate paths.
        let resolved = opts.to_url_lossy();
        let mut root_cert = None;
        let mut client_cert = None;
        let mut client_key = None;
        for (key, value) in resolved.query_pairs() {
            match &*key {
                "sslrootcert" => root_cert = Some(certificate_path("sslrootcert", &value)?),
                "sslcert" => client_cert = Some(certificate_path("sslcert", &value)?),
                "sslkey" => client_key = Some(certificate_path("sslkey", &value)?),
                _ => {}
            }
        }
        let password = resolved
            .password()
            .map(|p| percent_decode_str(p).decode_utf8_lossy().into_owned())
            .unwrap_or_default();
        let mut tls = match opts.get_ssl_mode() {
            PgSslMode::Disable => TlsConfig::disabled(),
            PgSslMode::Allow => {
                return Err(LogicalError::Config(
                    "database_url: `sslmode=allow` is not supported (the SQL pool would never \
                     use TLS with it, libpq would fall back to TLS): use `sslmode=disable`, \
                     `prefer`, `require`, `verify-ca` or `verify-full`"
                        .into(),
                ));
            }
            PgSslMode::Prefer => TlsConfig {
                mode: SslMode::Prefer,
                ..TlsConfig::default()
            },
            PgSslMode::Require => TlsConfig::require(),
            PgSslMode::VerifyCa => TlsConfig::verify_ca(root_cert),
            PgSslMode::VerifyFull => {
                let tls = TlsConfig::verify_full(root_cert);
                // An IP literal is checked against the certificate's IP addresses (as libpq and
                // the SQL pool do); the client refuses an IP without an explicit name to check.
                if opts.get_socket().is_none() && host.parse::<std::net::IpAddr>().is_ok() {
                    tls.with_sni_hostname(host.clone())
                } else {
                    tls
                }
            }
        };
        match (client_cert, client_key) {
            (Some(cert), Some(key)) => tls = tls.with_client_cert(cert, key),
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(LogicalError::Config(
                    "database_url: `sslcert` and `sslkey` go together (a client certificate \
                     needs its key): set both or neither"
                        .into(),
                ));
            }
        }
        Ok(Self {
            host,
            port: opts.get_port(),
            user: opts.get_username().to_owned(),
            password,
            database: opts
                .get_database()
                .map(str::to_owned)
                .unwrap_or_else(|| opts.get_username().to_owned()),
            tls,
        })
    }

    /// A replication connection to this target for `slot` and `publication`, announced as
    /// `application_name`; the caller adds what its use of the connection needs (start position,
    /// status interval, buffer).
    fn config(
        &self,
        slot: &SlotName,
        publication: &PublicationName,
        application_name: &str,
    ) -> ReplicationConfig {
        ReplicationConfig::new(
            self.host.clone(),
            self.user.clone(),
            self.password.clone(),
            self.database.clone(),
            slot.as_str(),
            publication.as_str(),
        )
        .with_port(self.port)
        .with_tls(self.tls.clone())
        .with_application_name(application_name)
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
        PgWireError::Tls(_) => {
            // pgwire-replication 0.5.0 recognises only rustls' older `NotValidForName`, so under
            // `verify-ca` a certificate naming another host is refused (stricter than the pool).
            let name_hint = if text.contains("not valid for name") {
                "; the replication connection checks the host name under `verify-ca` too: \
                 connect by a name the server certificate carries"
            } else {
                ""
            };
            LogicalError::Config(format!(
                "TLS on the replication connection failed: {text} (check `sslmode`, \
                 `sslrootcert`, `sslcert` and `sslkey` in database_url; the SQL connections use \
                 the same settings{name_hint})"
            ))
        }
        PgWireError::Auth(_) => {
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
    let cfg = target.config(slot, publication, application_name);
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

/// Replication messages the client buffers ahead of the relay. Each may carry a whole row (up to
/// its payload), so the bound is kept small: 128 events of 100 KB are 12.5 MiB, where 16,384
/// held up to 1.6 GB. The relay reads ahead of its window only up to a batch's byte bound.
const STREAM_BUFFER_EVENTS: usize = 128;

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
        let cfg = target
            .config(slot, publication, application_name)
            .with_start_lsn(pgwire_replication::Lsn::from_u64(start.0))
            .with_ack_lsn(pgwire_replication::Lsn::from_u64(start.0))
            .with_status_interval(status_interval)
            .with_wakeup_interval(status_interval.max(Duration::from_secs(1)))
            .with_buffer_size(STREAM_BUFFER_EVENTS);
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
            tracing::debug!(error = %e, "replication session ended with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_extracted_and_decoded() {
        let t = ReplicationTarget::from_url("postgres://u:p%40ss@h:5/db").unwrap();
        assert_eq!(t.password, "p@ss");
        let t = ReplicationTarget::from_url("postgres://alice:s3cret@127.0.0.1:6543/app").unwrap();
        assert_eq!(
            (t.port, t.user.as_str(), t.database.as_str()),
            (6543, "alice", "app")
        );
        assert!(!format!("{t:?}").contains("s3cret"));
        // `?password=` is honoured as sqlx honours it.
        let t = ReplicationTarget::from_url("postgres://alice@h/app?password=p%26w").unwrap();
        assert_eq!(t.password, "p&w");
    }

    #[test]
    fn tls_parameters_map_as_for_the_sql_pool() {
        let tls = |q: &str| ReplicationTarget::from_url(&format!("postgres://u@db.example/x?{q}"));
        assert_eq!(tls("sslmode=disable").unwrap().tls.mode, SslMode::Disable);
        assert_eq!(tls("sslmode=prefer").unwrap().tls.mode, SslMode::Prefer);
        assert_eq!(tls("sslmode=require").unwrap().tls.mode, SslMode::Require);
        let t = tls("sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/c.key")
            .unwrap()
            .tls;
        assert_eq!(t.mode, SslMode::VerifyFull);
        assert_eq!(
            t.ca_pem_path.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert_eq!(
            t.client_cert_pem_path.as_deref(),
            Some(std::path::Path::new("/c.pem"))
        );
        assert_eq!(
            t.client_key_pem_path.as_deref(),
            Some(std::path::Path::new("/c.key"))
        );
        let t = tls("sslmode=verify-ca&sslrootcert=/ca.pem").unwrap().tls;
        assert_eq!(t.mode, SslMode::VerifyCa);
        assert_eq!(
            t.ca_pem_path.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        let e = tls("sslmode=allow").unwrap_err().to_string();
        assert!(e.contains("sslmode=allow"), "{e}");
        let e = tls("sslmode=require&sslcert=/c.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`sslcert` and `sslkey` go together"), "{e}");
        // verify-full against an IP literal checks the certificate's IP address.
        let t = ReplicationTarget::from_url("postgres://u@127.0.0.1/x?sslmode=verify-full")
            .unwrap()
            .tls;
        assert_eq!(t.sni_hostname.as_deref(), Some("127.0.0.1"));
    }
}
