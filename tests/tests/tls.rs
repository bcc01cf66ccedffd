//! TLS on both of the relay's PostgreSQL connections (the SQL pool and the replication
//! connection), against a private cluster with a private CA and client-certificate
//! authentication. Certificates are generated at test time with the `openssl` CLI.
//!
//! The server's `pg_hba.conf` admits the relay's roles only over TLS (`hostssl`), one by client
//! certificate (`cert`) and one by password, so a connection that silently fell back to
//! plaintext, ignored `sslrootcert`, `sslcert`/`sslkey` or a `?password=` parameter could not
//! stream; `pg_stat_ssl` then shows that every connection of the role, the walsender included,
//! is encrypted.

mod logical_common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use logical_common::*;
use outbox_core::{NewEvent, Outbox, WriteMode};
use outbox_tests::certs::{make_ca, make_cert};
use outbox_tests::*;
use sqlx::postgres::PgPoolOptions;

/// Certificates for one test: the server's CA, another CA, a server certificate for
/// `localhost` only (so that 127.0.0.1 does not match its name), a client certificate for the role `relay`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn generate() -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("outbox-tls"));
        std::fs::create_dir_all(&dir)?;
        make_ca(&dir, "server")?;
        make_ca(&dir, "other")?;
        make_cert(
            &dir,
            "server",
            "server",
            "localhost",
            "subjectAltName=DNS:localhost\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )?;
        make_cert(
            &dir,
            "server",
            "client",
            "relay",
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
        )?;
        // The server runs as the postgres OS user when we are root; its key must be private.
        let _ = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )?;
        Ok(Self { dir })
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    /// postgresql.conf lines: TLS on, and a pg_hba.conf that admits the relay's roles only
    /// over TLS.
    fn server_conf(&self) -> Result<String> {
        let hba = self.dir.join("pg_hba.conf");
        std::fs::write(
            &hba,
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host replication postgres 127.0.0.1/32 trust\n\
             hostssl all relay 127.0.0.1/32 cert\n\
             hostssl replication relay 127.0.0.1/32 cert\n\
             hostssl all relay_pw 127.0.0.1/32 scram-sha-256\n\
             hostssl replication relay_pw 127.0.0.1/32 scram-sha-256\n",
        )?;
        let _ = Command::new("chown").arg("postgres").arg(&hba).status();
        Ok(format!(
            "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nssl_ca_file = '{}'\nhba_file = '{}'\n",
            self.path("server.crt"),
            self.path("server.key"),
            self.path("server-ca.crt"),
            hba.display()
        ))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A database `name` on the cluster, migrated, as a [`TestDb`] of the (plaintext) superuser.
async fn database(cluster: &TempCluster, name: &str) -> Result<TestDb> {
    let admin = cluster.test_db().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin.pool)
        .await?;
    let url = cluster.url(name);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    let db = TestDb {
        url,
        name: name.to_owned(),
        pool,
    };
    db.migrate().await?;
    Ok(db)
}

/// Every session of `role`: (backend type, ssl, client DN).
async fn sessions(db: &TestDb, role: &str) -> Result<Vec<(String, bool, Option<String>)>> {
    Ok(sqlx::query_as(
        "SELECT coalesce(a.backend_type, ''), s.ssl, s.client_dn
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.usename = $1",
    )
    .bind(role)
    .fetch_all(&db.pool)
    .await?)
}

/// Runs a logical relay with `url`, checks that it streams and publishes, and that every
/// connection of `role` (the walsender included) is encrypted; returns the sessions.
async fn streams_over_tls(
    db: &TestDb,
    url: &str,
    role: &str,
) -> Result<Vec<(String, bool, Option<String>)>> {
    let slot = unique("tls_slot");
    let mut env = logical_env(WriteMode::Table, &slot);
    env.push(("OUTBOX_DATABASE_URL", url.to_owned()));
    let relay = RelayProcess::start(db, &[], &env_refs(&env)).await?;
    relay
        .wait_for_log("replication stream started", LONG)
        .await?;
    wait_slot_active(&db.pool, &slot, LONG).await?;
    let agg = unique("tls");
    let mut tx = db.pool.begin().await?;
    Outbox::default()
        .publish_new(
            &mut tx,
            (0..20)
                .map(|i| NewEvent::new(&agg, format!("k{}", i % 3), "Opened", None))
                .collect(),
        )
        .await?;
    tx.commit().await?;
    wait_drained(&db.pool, LONG).await?;
    let seen = sessions(db, role).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    drop_slots(&db.pool, &slot).await?;
    assert!(
        seen.iter().any(|(kind, _, _)| kind == "walsender"),
        "no replication connection of {role}: {seen:?}"
    );
    assert!(
        seen.iter().any(|(kind, _, _)| kind == "client backend"),
        "no SQL connection of {role}: {seen:?}"
    );
    assert!(
        seen.iter().all(|(_, ssl, _)| *ssl),
        "a connection of {role} is not encrypted: {seen:?}"
    );
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_connections_honour_verify_full_client_certificates_and_password_parameters()
-> Result<()> {
    let pki = Pki::generate()?;
    let cluster = TempCluster::start("logical", &pki.server_conf()?)?;
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let admin = cluster.test_db().await?;
    sqlx::query("CREATE ROLE relay LOGIN SUPERUSER REPLICATION")
        .execute(&admin.pool)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE relay_pw LOGIN SUPERUSER REPLICATION PASSWORD '{password}'"
    )))
    .execute(&admin.pool)
    .await?;

    // verify-full with the private CA and a client certificate (the `cert` method: no password).
    let db = database(&cluster, "tls_cert").await?;
    let url = format!(
        "postgres://relay@localhost:{}/tls_cert?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        cluster.port,
        pki.path("server-ca.crt"),
        pki.path("client.crt"),
        pki.path("client.key"),
    );
    let seen = streams_over_tls(&db, &url, "relay").await?;
    assert!(
        seen.iter()
            .all(|(_, _, dn)| dn.as_deref().is_some_and(|d| d.contains("CN=relay"))),
        "a connection did not present the client certificate: {seen:?}"
    );

    // sslmode=prefer (sqlx's default) with the password as a URL parameter: the server offers
    // TLS, so both connections must use it (pg_hba admits this role only over TLS).
    let db = database(&cluster, "tls_prefer").await?;
    let url = format!(
        "postgres://relay_pw@127.0.0.1:{}/tls_prefer?sslmode=prefer&password={password}",
        cluster.port
    );
    streams_over_tls(&db, &url, "relay_pw").await?;

    // verify-ca with the private CA.
    let db = database(&cluster, "tls_ca").await?;
    let url = format!(
        "postgres://relay_pw@localhost:{}/tls_ca?sslmode=verify-ca&sslrootcert={}&password={password}",
        cluster.port,
        pki.path("server-ca.crt"),
    );
    streams_over_tls(&db, &url, "relay_pw").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_a_server_without_tls_fails_loudly_never_plaintext() -> Result<()> {
    let pki = Pki::generate()?;
    let cluster = TempCluster::start("logical", &pki.server_conf()?)?;
    let admin = cluster.test_db().await?;
    sqlx::query("CREATE ROLE relay LOGIN SUPERUSER REPLICATION")
        .execute(&admin.pool)
        .await?;
    let db = database(&cluster, "tls_wrong_ca").await?;
    for (mode, host, ca) in [
        ("verify-ca", "localhost", "other-ca.crt"),
        ("verify-full", "localhost", "other-ca.crt"),
        // The right CA, but the certificate names `localhost`, not 127.0.0.1.
        ("verify-full", "127.0.0.1", "server-ca.crt"),
        // The SQL pool accepts this (verify-ca ignores names); pgwire-replication 0.5.0 checks
        // the name anyway: the replication connection must refuse it loudly, naming TLS.
        ("verify-ca", "127.0.0.1", "server-ca.crt"),
    ] {
        let url = format!(
            "postgres://relay@{host}:{}/tls_wrong_ca?sslmode={mode}&sslrootcert={}&sslcert={}&sslkey={}",
            cluster.port,
            pki.path(ca),
            pki.path("client.crt"),
            pki.path("client.key"),
        );
        let slot = unique("tls_bad");
        let mut env = logical_env(WriteMode::Table, &slot);
        env.push(("OUTBOX_DATABASE_URL", url));
        env.push(("OUTBOX_CONNECT_TIMEOUT", "2s".to_owned()));
        let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
        let (code, log) = relay.wait_exit(LONG).await?;
        assert_ne!(code, 0, "{mode} {host} {ca} did not fail:\n{log}");
        assert!(
            log.contains("certificate verify failed")
                || log.contains("UnknownIssuer")
                || log.contains("not valid for name"),
            "{mode} {host} {ca}: the error does not name the certificate problem:\n{log}"
        );
        if mode == "verify-ca" && ca == "server-ca.crt" {
            assert!(
                log.contains("TLS on the replication connection failed")
                    && log.contains("connect by a name the server certificate carries"),
                "the replication connection's TLS error is not explained:\n{log}"
            );
        }
        assert!(!log.contains("replication stream started"), "{log}");
    }

    // sslmode=require against the shared server, which has no TLS: an error, not plaintext.
    let plain = TestDb::migrated("tls_require").await?;
    let sep = if plain.url.contains('?') { '&' } else { '?' };
    for source in ["logical", "polling"] {
        let slot = unique("tls_req");
        let mut env = logical_env(WriteMode::Table, &slot);
        env.push(("OUTBOX_SOURCE", source.to_owned()));
        env.push((
            "OUTBOX_DATABASE_URL",
            format!("{}{sep}sslmode=require", plain.url),
        ));
        env.push(("OUTBOX_CONNECT_TIMEOUT", "2s".to_owned()));
        let relay = RelayProcess::start(&plain, &[], &env_refs(&env)).await?;
        let (code, log) = relay.wait_exit(LONG).await?;
        assert_ne!(
            code, 0,
            "sslmode=require without server TLS ran ({source}):\n{log}"
        );
        assert!(
            log.contains("does not support TLS"),
            "({source}) the error does not say TLS is missing:\n{log}"
        );
    }
    Ok(())
}
