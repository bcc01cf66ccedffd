//! The account service: HTTP commands over PostgreSQL, events through the outbox.

use std::net::SocketAddr;
use std::process::ExitCode;

use account_service::store::{self, Accounts};
use anyhow::Context;
use clap::Parser;
use sqlx::postgres::PgPoolOptions;

/// Account service: manages accounts; every change writes its domain event to the outbox in the
/// same transaction.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// PostgreSQL URL of the service's database.
    #[arg(long, env = "ACCOUNT_SERVICE_DATABASE_URL")]
    database_url: String,
    /// Address to listen on (port 0 picks a free one; the address is printed on stdout).
    #[arg(long, env = "ACCOUNT_SERVICE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

fn main() -> ExitCode {
    let args = Args::parse();
    account_service::init_logging("info");
    account_service::run_main("account-service", run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&args.database_url)
        .await
        .context("connecting to the account database")?;
    store::migrate(&mut *pool.acquire().await?).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    tracing::info!(%addr, "account service ready");
    axum::serve(listener, account_service::http::router(Accounts::new(pool)))
        .with_graceful_shutdown(account_service::shutdown_signal())
        .await?;
    tracing::info!("account service stopped");
    Ok(())
}
