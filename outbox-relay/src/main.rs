//! The `outbox-relay` binary: parses the command line, sets up logging, runs the command and maps
//! the outcome to an exit code (0 success, 1 runtime failure, 2 bad configuration, 3 shutdown
//! timed out).

use std::process::ExitCode;
use std::str::FromStr;

use clap::Parser;
use outbox_core::OutboxTable;
use outbox_relay::cli::{Cli, Command, LogFormat};
use outbox_relay::config::{RelayConfig, redact_url};
use outbox_relay::{Relay, RelayError};
use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(try_main(cli));
    // Do not wait for lingering blocking tasks (e.g. a metadata fetch) at exit.
    runtime.shutdown_background();
    ExitCode::from(code as u8)
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

async fn try_main(cli: Cli) -> i32 {
    match cli.command {
        Some(Command::Migrate(args)) => {
            let mut config = RelayConfig::default();
            if let Some(url) = args.db.database_url {
                config.database_url = outbox_relay::config::Secret::new(url);
            }
            if let Some(t) = args.db.table {
                config.table = t;
            }
            migrate(&config).await
        }
        Some(Command::Run(args)) => run(&args).await,
        None => run(&cli.run).await,
    }
}

async fn migrate(config: &RelayConfig) -> i32 {
    let table = match OutboxTable::parse(&config.table) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("invalid setting `table`: {e}");
            return 2;
        }
    };
    let url = config.database_url.expose();
    let options = match PgConnectOptions::from_str(url) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("invalid setting `database_url` ({}): {e}", redact_url(url));
            return 2;
        }
    };
    let mut conn = match options.connect().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot connect to PostgreSQL at {}: {e}", redact_url(url));
            return 1;
        }
    };
    match outbox_core::migrate(&mut conn, &table).await {
        Ok(report) if report.applied.is_empty() => {
            tracing::info!(table = %table, version = report.version, "outbox table already up to date");
            0
        }
        Ok(report) => {
            tracing::info!(table = %table, applied = ?report.applied, "outbox table migrated");
            0
        }
        Err(e) => {
            tracing::error!(table = %table, "migration failed: {e}");
            1
        }
    }
}

async fn run(args: &outbox_relay::cli::RunArgs) -> i32 {
    let mut config = RelayConfig::default();
    if let Err(e) = args.apply(&mut config) {
        tracing::error!("{e}");
        return 2;
    }
    let shutdown_timeout = config.shutdown_timeout;
    let relay = match Relay::new(config) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            return e.exit_code();
        }
    };
    let shutdown = CancellationToken::new();
    let mut task = tokio::spawn(relay.run(shutdown.clone()));
    tokio::select! {
        result = &mut task => return outcome(result),
        _ = termination() => {
            tracing::info!("stop requested: draining in-flight events");
            shutdown.cancel();
        }
    }
    match tokio::time::timeout(shutdown_timeout, task).await {
        Ok(result) => outcome(result),
        Err(_) => {
            tracing::error!(
                "drain did not finish within the shutdown timeout; unacknowledged events will be published again by the next relay"
            );
            3
        }
    }
}

fn outcome(result: Result<Result<(), RelayError>, tokio::task::JoinError>) -> i32 {
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            tracing::error!("{e}");
            e.exit_code()
        }
        Err(e) => {
            tracing::error!("relay task failed: {e}");
            1
        }
    }
}

async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
