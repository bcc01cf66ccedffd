//! The admin HTTP endpoint, on its own address (`admin_addr`, `OUTBOX_ADMIN_ADDR`; off when
//! unset; the container image sets `0.0.0.0:9187` so that kubelet probes reach it):
//!
//! | path | answers |
//! |---|---|
//! | `/healthz` | 200 while the process runs its loop (liveness); always open |
//! | `/readyz` | 200 when the database answers, the producer reached Kafka (its last deliveries succeeded and, while idle, the brokers answer a metadata request every second), and this instance is either streaming or a standby waiting for the leader lock; 503 with the reason otherwise; always open |
//! | `/metrics` | Prometheus text format; behind the token with `admin.metrics_auth` |
//! | `/status` | the JSON of `outbox-relay status --json`, plus this instance's `role`, `published_by_this_instance` and `status_age_seconds` (age of the shared reading); behind the token when `admin.token` is set |
//!
//! Guarantees:
//! - **Bounded database load.** `/status` and `/metrics` share one reading of the outbox status,
//!   taken at most once per `admin.status_refresh` (default 5 s) whatever the request rate:
//!   concurrent requests on a stale reading wait for the single refresh in flight instead of
//!   starting their own (a failed reading is kept for the interval too, so a sick database is
//!   not hammered). `/readyz` pings the database at most once a second. Every status query is
//!   index-backed ([`crate::status`]). `outbox_relay_admin_status_queries_total` counts the
//!   readings.
//! - **Authentication.** With `admin.token` set, `/status` (and `/metrics` with
//!   `admin.metrics_auth`) answer 401 unless the request carries `Authorization: Bearer
//!   <token>`; the comparison takes the same time wherever the first difference is.
//! - Nothing it serves contains a secret, a payload or an event id beyond the last published
//!   event's id and type.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use outbox_core::OutboxTable;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::metrics::{histogram, sample};
use crate::stats::RelayStats;
use crate::status::OutboxStatus;

/// One reading of the outbox status and when it was taken.
struct Reading {
    at: Instant,
    value: Arc<Result<OutboxStatus, String>>,
}

/// A single-flight cache with a time to live: the lock is held across the refresh, so callers
/// that find the reading stale queue behind the one refreshing it and then see its result.
struct Cached<T> {
    ttl: Duration,
    slot: tokio::sync::Mutex<Option<(Instant, T)>>,
    refreshes: AtomicU64,
}

impl<T: Clone> Cached<T> {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            slot: tokio::sync::Mutex::new(None),
            refreshes: AtomicU64::new(0),
        }
    }

    /// The cached value if younger than the TTL, else the result of `refresh` (run by one
    /// caller at a time); with the instant the returned value was taken.
    async fn get<F: Future<Output = T>>(&self, refresh: impl FnOnce() -> F) -> (Instant, T) {
        let mut slot = self.slot.lock().await;
        if let Some((at, value)) = slot.as_ref()
            && at.elapsed() < self.ttl
        {
            return (*at, value.clone());
        }
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        let value = refresh().await;
        let at = Instant::now();
        *slot = Some((at, value.clone()));
        (at, value)
    }
}

#[derive(Clone)]
struct AdminState {
    config: Arc<RelayConfig>,
    table: OutboxTable,
    pool: PgPool,
    stats: Arc<RelayStats>,
    status: Arc<Cached<Arc<Result<OutboxStatus, String>>>>,
    db_ping: Arc<Cached<bool>>,
}

/// Binds the admin endpoint and serves it until `shutdown`; returns the bound address (useful
/// with port 0).
pub async fn serve(
    addr: SocketAddr,
    config: Arc<RelayConfig>,
    table: OutboxTable,
    options: &PgConnectOptions,
    stats: Arc<RelayStats>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy_with(options.clone());
    let refresh = config.admin.status_refresh;
    let state = AdminState {
        config,
        table,
        pool,
        stats,
        status: Arc::new(Cached::new(refresh)),
        db_ping: Arc::new(Cached::new(refresh.min(Duration::from_secs(1)))),
    };
    if state.config.admin.token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            addr = %addr,
            "the admin endpoint listens beyond loopback without admin.token: anyone who reaches \
             it can read /status and /metrics; set OUTBOX_ADMIN__TOKEN_FILE (or bind 127.0.0.1)"
        );
    }
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "admin endpoint listening");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(bound)
}

/// `None` when the request may proceed; the 401 answer otherwise.
fn check_token(state: &AdminState, headers: &HeaderMap) -> Option<Response> {
    let token = state.config.admin.token.as_ref()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.expose().as_bytes())) {
        return None;
    }
    Some(
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"outbox-relay\"")],
            "missing or wrong bearer token (admin.token)\n",
        )
            .into_response(),
    )
}

/// Equality whose time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The shared status reading (at most one database round per `admin.status_refresh`).
async fn read_status(state: &AdminState) -> Reading {
    let (at, value) = state
        .status
        .get(|| async {
            let fut = async {
                let mut conn = state.pool.acquire().await.map_err(|e| e.to_string())?;
                crate::status::read(&mut conn, &state.config, &state.table)
                    .await
                    .map_err(|e| e.to_string())
            };
            Arc::new(
                tokio::time::timeout(Duration::from_secs(3), fut)
                    .await
                    .unwrap_or_else(|_| Err("database did not answer within 3 s".to_owned())),
            )
        })
        .await;
    Reading { at, value }
}

fn role(stats: &RelayStats) -> &'static str {
    if stats.active.load(Ordering::Relaxed) {
        "active"
    } else {
        "standby"
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let (_, db_ok) = state
        .db_ping
        .get(|| async {
            let db = tokio::time::timeout(
                Duration::from_secs(2),
                sqlx::query("SELECT 1").execute(&state.pool),
            )
            .await;
            matches!(db, Ok(Ok(_)))
        })
        .await;
    let mut problems = Vec::new();
    if !db_ok {
        problems.push("database unreachable");
    }
    if !state.stats.kafka_connected.load(Ordering::Relaxed) {
        problems.push("producer not connected to Kafka");
    } else if !state.stats.kafka_reachable.load(Ordering::Relaxed) {
        problems.push("Kafka brokers do not answer");
    }
    if state.stats.active.load(Ordering::Relaxed)
        && !state.stats.source_running.load(Ordering::Relaxed)
    {
        problems.push("source not running");
    }
    if problems.is_empty() {
        (StatusCode::OK, format!("ready ({})\n", role(&state.stats))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join(", ")),
        )
            .into_response()
    }
}

async fn status(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(refused) = check_token(&state, &headers) {
        return refused;
    }
    let reading = read_status(&state).await;
    match reading.value.as_ref() {
        Ok(s) => {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            v["role"] = role(&state.stats).into();
            v["published_by_this_instance"] = state.stats.published.load(Ordering::Relaxed).into();
            v["status_age_seconds"] = reading.at.elapsed().as_secs_f64().into();
            axum::Json(v).into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

async fn metrics(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if state.config.admin.metrics_auth
        && let Some(refused) = check_token(&state, &headers)
    {
        return refused;
    }
    let s = &state.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let flag = |a: &std::sync::atomic::AtomicBool| f64::from(u8::from(a.load(Ordering::Relaxed)));
    let mut out = String::with_capacity(4096);
    sample(
        &mut out,
        "outbox_relay_events_read_total",
        "counter",
        "Events taken from the source.",
        load(&s.read),
    );
    sample(
        &mut out,
        "outbox_relay_events_published_total",
        "counter",
        "Events acknowledged by Kafka and recorded at the source.",
        load(&s.published),
    );
    sample(
        &mut out,
        "outbox_relay_events_failed_total",
        "counter",
        "Events whose delivery failed transiently (they are retried).",
        load(&s.failed),
    );
    sample(
        &mut out,
        "outbox_relay_events_parked_total",
        "counter",
        "Events parked as unpublishable or held behind one.",
        load(&s.parked),
    );
    sample(
        &mut out,
        "outbox_relay_batches_total",
        "counter",
        "Claim-produce-acknowledge rounds.",
        load(&s.batches),
    );
    histogram(
        &mut out,
        "outbox_relay_publish_duration_seconds",
        "Time from producing a batch to Kafka's last acknowledgement.",
        &s.publish_duration,
    );
    histogram(
        &mut out,
        "outbox_relay_commit_to_ack_seconds",
        "Time from the event's creation to Kafka's acknowledgement.",
        &s.commit_to_ack,
    );
    let last = s.last_published_ms.load(Ordering::Relaxed);
    if last > 0 {
        let since = (chrono::Utc::now().timestamp_millis() - last).max(0) as f64 / 1000.0;
        sample(
            &mut out,
            "outbox_relay_seconds_since_last_event",
            "gauge",
            "Seconds since this instance last published an event.",
            since,
        );
    }
    sample(
        &mut out,
        "outbox_relay_leader",
        "gauge",
        "1 while this instance holds the leader lock.",
        flag(&s.active),
    );
    sample(
        &mut out,
        "outbox_relay_leader_lease_lost_total",
        "counter",
        "Times this instance lost its leader lease and stepped down.",
        load(&s.lease_lost),
    );
    sample(
        &mut out,
        "outbox_relay_source_connected",
        "gauge",
        "1 while the source is open.",
        flag(&s.source_running),
    );
    sample(
        &mut out,
        "outbox_relay_kafka_connected",
        "gauge",
        "1 while the producer reaches Kafka (last deliveries succeeded and, when idle, the brokers answer).",
        f64::from(u8::from(
            s.kafka_connected.load(Ordering::Relaxed) && s.kafka_reachable.load(Ordering::Relaxed),
        )),
    );
    sample(
        &mut out,
        "outbox_relay_producer_queue_messages",
        "gauge",
        "Records queued in the producer, not yet acknowledged.",
        s.producer_queue.load(Ordering::Relaxed) as f64,
    );
    if state.config.source == crate::config::SourceKind::Logical {
        let m = &s.logical;
        sample(
            &mut out,
            "outbox_relay_logical_events_streamed_total",
            "counter",
            "Events decoded from the replication stream.",
            load(&m.events_streamed),
        );
        sample(
            &mut out,
            "outbox_relay_logical_heartbeats_total",
            "counter",
            "Idle heartbeats written so the slot keeps advancing.",
            load(&m.heartbeats),
        );
        sample(
            &mut out,
            "outbox_relay_logical_slot_recoveries_total",
            "counter",
            "Lost replication slots recovered from the table.",
            load(&m.slot_recoveries),
        );
        sample(
            &mut out,
            "outbox_relay_logical_rows_backfilled_total",
            "counter",
            "Rows re-published from the table while recovering a slot.",
            load(&m.rows_backfilled),
        );
        sample(
            &mut out,
            "outbox_relay_logical_backfill_pages_total",
            "counter",
            "Pages read from the table by re-publications (each at most one batch).",
            load(&m.backfill_pages),
        );
        sample(
            &mut out,
            "outbox_relay_logical_messages_refused_total",
            "counter",
            "Logical messages with the outbox prefix refused because the write mode is not logical_message (someone else emitting them?).",
            load(&m.messages_refused),
        );
        sample(
            &mut out,
            "outbox_relay_logical_sessions_total",
            "counter",
            "Replication sessions started.",
            load(&m.sessions),
        );
        sample(
            &mut out,
            "outbox_relay_logical_confirmed_lsn",
            "gauge",
            "The last LSN confirmed to the replication slot.",
            load(&m.confirmed_lsn),
        );
    }
    let reading = read_status(&state).await;
    sample(
        &mut out,
        "outbox_relay_admin_status_queries_total",
        "counter",
        "Readings of the outbox status taken for /status and /metrics (at most one per admin.status_refresh).",
        state.status.refreshes.load(Ordering::Relaxed) as f64,
    );
    sample(
        &mut out,
        "outbox_relay_admin_status_age_seconds",
        "gauge",
        "Age of the outbox status reading the figures below come from.",
        reading.at.elapsed().as_secs_f64(),
    );
    match reading.value.as_ref() {
        Ok(st) => {
            sample(
                &mut out,
                "outbox_relay_database_up",
                "gauge",
                "1 when the database answered the last status reading.",
                1.0,
            );
            sample(
                &mut out,
                "outbox_relay_pending_events",
                "gauge",
                "Unpublished events in the outbox table.",
                st.pending_events as f64,
            );
            sample(
                &mut out,
                "outbox_relay_oldest_pending_age_seconds",
                "gauge",
                "Age of the oldest unpublished event.",
                st.oldest_pending_age_seconds.unwrap_or(0.0),
            );
            sample(
                &mut out,
                "outbox_relay_parked_events",
                "gauge",
                "Events currently parked.",
                st.parked_events as f64,
            );
            if let Some(slot) = &st.slot {
                sample(
                    &mut out,
                    "outbox_relay_slot_lag_bytes",
                    "gauge",
                    "WAL bytes between the server's position and the slot's confirmed flush LSN.",
                    slot.lag_bytes.unwrap_or(0) as f64,
                );
                sample(
                    &mut out,
                    "outbox_relay_slot_lost",
                    "gauge",
                    "1 when the slot's wal_status is lost.",
                    f64::from(u8::from(slot.wal_status.as_deref() == Some("lost"))),
                );
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "metrics scrape could not read the outbox status");
            sample(
                &mut out,
                "outbox_relay_database_up",
                "gauge",
                "1 when the database answered the last status reading.",
                0.0,
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_refresh_per_ttl() {
        let cache = Arc::new(Cached::new(Duration::from_millis(300)));
        let calls = Arc::new(AtomicU64::new(0));
        let round = |cache: Arc<Cached<u64>>, calls: Arc<AtomicU64>| async move {
            let tasks = (0..100).map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    cache
                        .get(|| async {
                            // A slow reading: every other caller arrives while it runs.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            calls.fetch_add(1, Ordering::Relaxed) + 1
                        })
                        .await
                        .1
                })
            });
            futures::future::join_all(tasks)
                .await
                .into_iter()
                .map(|r| r.expect("task"))
                .collect::<Vec<u64>>()
        };
        let first = round(cache.clone(), calls.clone()).await;
        assert_eq!(
            calls.load(Ordering::Relaxed),
            1,
            "one refresh for 100 callers"
        );
        assert!(first.iter().all(|v| *v == 1), "all see that reading");
        assert_eq!(cache.refreshes.load(Ordering::Relaxed), 1);
        // Once the reading is older than the TTL, the next callers share one new refresh.
        tokio::time::sleep(Duration::from_millis(350)).await;
        let second = round(cache.clone(), calls.clone()).await;
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert!(second.iter().all(|v| *v == 2));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abcdefghijklmnop", b"abcdefghijklmnop"));
        assert!(!constant_time_eq(b"abcdefghijklmnop", b"abcdefghijklmnoq"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
