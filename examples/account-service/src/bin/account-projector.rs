//! The projector: the CQRS query model and the legacy enabled list, fed only by account events.

use std::net::SocketAddr;
use std::process::ExitCode;

use account_service::projector::{LEGACY_GROUP, Projector, ProjectorConfig, QUERY_GROUP};
use account_service::source::SourceArgs;
use clap::Parser;
use outbox_core::MalformedPolicy;

/// Account projector: consumes the account events through an inbox into a query model and a
/// legacy enabled/disabled list, each in its own database.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The broker and how to reach it.
    #[command(flatten)]
    source: SourceArgs,
    /// The account events topic (NATS subject, RabbitMQ routing key, Redis stream).
    #[arg(long, env = "ACCOUNT_TOPIC", default_value = "outbox.event.account")]
    topic: String,
    /// PostgreSQL URL of the query model's database.
    #[arg(long, env = "QUERY_DATABASE_URL")]
    query_database_url: String,
    /// PostgreSQL URL of the legacy application's database.
    #[arg(long, env = "LEGACY_DATABASE_URL")]
    legacy_database_url: String,
    /// Consumer group of the query model.
    #[arg(long, default_value = QUERY_GROUP)]
    query_group: String,
    /// Consumer group of the legacy list.
    #[arg(long, default_value = LEGACY_GROUP)]
    legacy_group: String,
    /// Records that cannot be decoded are parked in `<inbox>_parked` (default) or skipped.
    #[arg(long, default_value = "park", value_parser = ["park", "skip"])]
    on_malformed: String,
    /// Address of the query API (port 0 picks a free one; printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

fn main() -> ExitCode {
    let args = Args::parse();
    account_service::init_logging("info");
    account_service::run_main("account-projector", run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = ProjectorConfig::new(
        args.source.source()?,
        args.topic,
        args.query_database_url,
        args.legacy_database_url,
    );
    config.query_group = args.query_group;
    config.legacy_group = args.legacy_group;
    config.on_malformed = if args.on_malformed == "skip" {
        MalformedPolicy::Skip
    } else {
        MalformedPolicy::Park
    };
    config.listen = Some(args.listen);
    let projector = Projector::start(config).await?;
    if let Some(addr) = projector.addr {
        println!("listening on http://{addr}");
    }
    let token = projector.shutdown_token();
    tokio::spawn(async move {
        account_service::shutdown_signal().await;
        token.cancel();
    });
    projector.wait().await
}
