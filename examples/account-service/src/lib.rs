//! # The account-service demo
//!
//! The whole story people adopt a transactional outbox for, in one example:
//!
//! * **`account-service`** ([`http`], [`store`], [`domain`]): an HTTP service over PostgreSQL that
//!   opens, validates, deactivates, re-activates and closes accounts and changes their email. Each
//!   accepted command updates the account row **and** writes its domain event
//!   ([`domain::AccountEvent`], `#[derive(OutboxEvent)]`) in one transaction; the account's
//!   version is the event's per-aggregate sequence. Rejected commands write nothing.
//! * **`outbox-relay`**, run as the service's sidecar, publishes the committed events to
//!   `outbox.event.account`, keyed by account id, on Kafka, NATS JetStream, RabbitMQ or Redis
//!   Streams (its `OUTBOX_SINK`).
//! * **`account-projector`** ([`projector`]): two consumers that never call the service. The CQRS
//!   query model ([`read_model`]) and the legacy application's enabled list ([`legacy`]) each keep
//!   their own database, consumer group and inbox, so a redelivered event is applied once. They
//!   read through the matching client, whichever the sink ([`source`]).
//! * **`account-demo`**: starts all of the above, drives [`scenario`] over HTTP, and checks that the
//!   read models converge to the write model. `scripts/demo.sh` runs it on a fresh machine.

pub mod domain;
pub mod http;
pub mod legacy;
pub mod projector;
pub mod read_model;
pub mod scenario;
pub mod source;
pub mod store;

/// Runs `main` to completion on a new multi-threaded runtime as the binary `name`: success when
/// it returns `Ok`; failure, with the error chain logged, when it fails or the runtime cannot
/// start.
pub fn run_main(
    name: &str,
    main: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{name} failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Creates the schema `schema` and runs the `CREATE ... IF NOT EXISTS` statements `tables` in
/// order: idempotent, like each statement.
pub(crate) async fn create_schema(
    conn: &mut sqlx::PgConnection,
    schema: &str,
    tables: &[&'static str],
) -> Result<(), sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}"
    )))
    .execute(&mut *conn)
    .await?;
    for table in tables {
        sqlx::query(*table).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Installs a `tracing` subscriber for the example binaries (`RUST_LOG`, default `info`).
pub fn init_logging(default: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
