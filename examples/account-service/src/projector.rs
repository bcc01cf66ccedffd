//! The projector process: two independent consumers of the account topic, each with its own
//! database, consumer group and inbox — the CQRS query model ([`crate::read_model`]) and the legacy
//! application's enabled list ([`crate::legacy`]) — plus a small HTTP query API. They read from
//! whichever broker the relay publishes to ([`crate::source`]).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use outbox_core::consumer::StatsSnapshot;
use outbox_core::{Inbox, InboxTable, MalformedPolicy};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::legacy::{self, LegacyList};
use crate::read_model::{self, ReadModelProjection};
use crate::source::{Consumer, EventSource, SourceStats};

/// The query model's name in its inbox. It names the state the inbox protects, so it stays the
/// same when the consumer group changes (a new group, or reset offsets, replays records that the
/// inbox must still recognise).
pub const QUERY_CONSUMER: &str = "account-query";
/// The legacy list's name in its inbox.
pub const LEGACY_CONSUMER: &str = "legacy-app";
/// Default consumer group of the query model.
pub const QUERY_GROUP: &str = "account-query";
/// Default consumer group of the legacy list.
pub const LEGACY_GROUP: &str = "legacy-app";

/// Settings of the projector.
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// The broker to read from.
    pub source: EventSource,
    /// The account topic (the relay's destination: Kafka topic, NATS subject, RabbitMQ routing
    /// key, Redis stream).
    pub topic: String,
    /// The query model's database.
    pub query_database_url: String,
    /// The legacy application's database.
    pub legacy_database_url: String,
    /// Consumer group of the query model (Kafka group, JetStream durable consumer, RabbitMQ
    /// queue, Redis consumer group: see [`crate::source`]).
    pub query_group: String,
    /// Consumer group of the legacy list.
    pub legacy_group: String,
    /// What to do with records that cannot be decoded.
    pub on_malformed: MalformedPolicy,
    /// Where to serve the query API (`None`: no HTTP).
    pub listen: Option<SocketAddr>,
}

impl ProjectorConfig {
    /// Settings with the default groups, parking malformed records, no HTTP.
    pub fn new(
        source: EventSource,
        topic: impl Into<String>,
        query_database_url: impl Into<String>,
        legacy_database_url: impl Into<String>,
    ) -> Self {
        Self {
            source,
            topic: topic.into(),
            query_database_url: query_database_url.into(),
            legacy_database_url: legacy_database_url.into(),
            query_group: QUERY_GROUP.to_owned(),
            legacy_group: LEGACY_GROUP.to_owned(),
            on_malformed: MalformedPolicy::Park,
            listen: None,
        }
    }
}

/// A running projector.
pub struct Projector {
    /// Counters of the query model's consumer.
    pub query_stats: SourceStats,
    /// Counters of the legacy list's consumer.
    pub legacy_stats: SourceStats,
    /// The query API's address, when serving.
    pub addr: Option<SocketAddr>,
    /// The query model's inbox.
    pub query_inbox: Inbox,
    /// The legacy list's inbox.
    pub legacy_inbox: Inbox,
    shutdown: CancellationToken,
    tasks: JoinSet<Result<()>>,
}

async fn pool(url: &str) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await
        .context("connecting to a projector database")
}

#[derive(Clone)]
struct Api {
    query: PgPool,
    legacy: PgPool,
    query_stats: SourceStats,
    legacy_stats: SourceStats,
}

#[derive(serde::Serialize)]
struct Stats {
    query: StatsSnapshot,
    legacy: StatsSnapshot,
}

impl Projector {
    /// Migrates both databases, then starts both consumers (and the HTTP API when configured).
    pub async fn start(config: ProjectorConfig) -> Result<Self> {
        let query_pool = pool(&config.query_database_url).await?;
        let legacy_pool = pool(&config.legacy_database_url).await?;
        let query_inbox = Inbox::new(InboxTable::parse(read_model::INBOX)?, QUERY_CONSUMER)?
            .with_malformed_policy(config.on_malformed);
        let legacy_inbox = Inbox::new(InboxTable::parse(legacy::INBOX)?, LEGACY_CONSUMER)?
            .with_malformed_policy(config.on_malformed)
            .ignoring_unknown_event_types(true);
        {
            let mut conn = query_pool.acquire().await?;
            read_model::migrate(&mut conn).await?;
            query_inbox.migrate(&mut conn).await?;
            let mut conn = legacy_pool.acquire().await?;
            legacy::migrate(&mut conn).await?;
            legacy_inbox.migrate(&mut conn).await?;
        }
        // A handler error here means an event the model cannot place (e.g. its account is
        // unknown): the consumer parks it with the reason rather than stall the aggregate forever.
        let query = Consumer::new(
            config.source.clone(),
            &config.topic,
            &config.query_group,
            query_inbox.clone(),
            query_pool.clone(),
            ReadModelProjection,
        );
        let legacy = Consumer::new(
            config.source.clone(),
            &config.topic,
            &config.legacy_group,
            legacy_inbox.clone(),
            legacy_pool.clone(),
            LegacyList,
        );
        let query_stats = query.stats();
        let legacy_stats = legacy.stats();
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let token = shutdown.clone();
        tasks.spawn(async move { query.run(token).await.context("query model consumer") });
        let token = shutdown.clone();
        tasks.spawn(async move { legacy.run(token).await.context("legacy list consumer") });
        let mut addr = None;
        if let Some(listen) = config.listen {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding the query API to {listen}"))?;
            addr = Some(listener.local_addr()?);
            let api = Api {
                query: query_pool,
                legacy: legacy_pool,
                query_stats: query_stats.clone(),
                legacy_stats: legacy_stats.clone(),
            };
            let app = Router::new()
                .route("/healthz", get(|| async { "ok" }))
                .route("/accounts", get(accounts))
                .route("/legacy/accounts", get(legacy_accounts))
                .route("/stats", get(stats))
                .with_state(api);
            let token = shutdown.clone();
            tasks.spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(token.cancelled_owned())
                    .await
                    .context("query API")
            });
        }
        Ok(Self {
            query_stats,
            legacy_stats,
            addr,
            query_inbox,
            legacy_inbox,
            shutdown,
            tasks,
        })
    }

    /// A token that stops the projector when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled or a part fails; stops the other parts then.
    pub async fn wait(mut self) -> Result<()> {
        let mut result = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            let outcome = joined.context("projector task panicked").and_then(|r| r);
            if let Err(e) = outcome {
                if result.is_ok() {
                    result = Err(e);
                }
                self.shutdown.cancel();
            } else if !self.shutdown.is_cancelled() {
                self.shutdown.cancel();
            }
        }
        result
    }

    /// Stops gracefully (positions committed) and returns how it ended.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

async fn accounts(State(api): State<Api>) -> Result<Json<Vec<read_model::AccountView>>, String> {
    read_model::load(&api.query)
        .await
        .map(Json)
        .map_err(|e| e.to_string())
}

async fn legacy_accounts(State(api): State<Api>) -> Result<Json<Vec<(uuid::Uuid, bool)>>, String> {
    legacy::load(&api.legacy)
        .await
        .map(Json)
        .map_err(|e| e.to_string())
}

async fn stats(State(api): State<Api>) -> Json<Stats> {
    Json(Stats {
        query: api.query_stats.snapshot(),
        legacy: api.legacy_stats.snapshot(),
    })
}
