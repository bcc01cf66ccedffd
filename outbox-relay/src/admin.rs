//! The admin HTTP endpoint, on its own address (`admin_addr`, `OUTBOX_ADMIN_ADDR`; off when
//! unset; the container image sets `0.0.0.0:9187` so that kubelet probes reach it):
//!
//! | path | answers |
//! |---|---|
//! | `/healthz` | 200 while the process runs its loop (liveness); always open |
//! | `/readyz` | 200 when the database answers, the producer reached Kafka (its last deliveries succeeded and, while idle, the brokers answer a metadata request every second), and this instance is either streaming or a standby waiting for the leader lock; 503 with the reason otherwise; always open |
//! | `/metrics` | Prometheus text format (0.0.4), encoded by [`crate::metrics`]; behind the token with `admin.metrics_auth` |
//! | `/status` | the JSON of `outbox-relay status --json`, plus this instance's `role`, `published_by_this_instance` and `status_age_seconds` (age of the shared reading); behind the token when `admin.token` is set |
//!
//! A multi-table relay ([`crate::RelayGroup`]) serves one endpoint for all its tables
//! ([`AdminTables::multi`]): `/readyz` is ready only when every table's pipeline is, and names
//! each table that is not; `/status` answers `{"tables": [...], "status_age_seconds": …}`;
//! every per-table metric carries a `table` label. With the logical source, the figures of the
//! one slot the tables share (its sessions, heartbeats, confirmed LSN, `wal_status`, lag) are
//! exported once, unlabelled. A single-table relay answers as before.
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
use crate::metrics::Registry;
use crate::stats::{LogicalMetrics, RelayStats};
use crate::status::OutboxStatus;

/// One reading of the outbox status of every table and when it was taken.
struct Reading {
    at: Instant,
    value: Arc<TableReadings>,
}

/// Each table's status (by its name as configured), or why it could not be read.
type TableReadings = Vec<(String, Result<OutboxStatus, String>)>;

/// One table an admin endpoint reports on: its pipeline's configuration and live figures.
#[derive(Debug, Clone)]
pub struct AdminTable {
    /// The outbox table.
    pub table: OutboxTable,
    /// The pipeline's configuration (its write mode, shards, …).
    pub config: Arc<RelayConfig>,
    /// The pipeline's live figures.
    pub stats: Arc<RelayStats>,
    /// Why the pipeline stopped, once it has (`/readyz` then names the table).
    pub stopped: Option<String>,
}

/// The tables an admin endpoint reports on, updated while it serves: a multi-table relay adds a
/// table when its pipeline starts and removes it when the pipeline ended on purpose.
///
/// A single-table relay's endpoint ([`AdminTables::single`]) answers exactly as before there
/// were several tables: unlabelled metric names, the `/status` object of that table. A
/// multi-table relay's ([`AdminTables::multi`]) labels every per-table series with
/// `table="<name as configured>"` and answers `/status` with a `tables` list.
#[derive(Debug)]
pub struct AdminTables {
    labelled: bool,
    /// The figures of the replication slot every table of a multi-table logical relay shares.
    slot: Option<Arc<LogicalMetrics>>,
    entries: std::sync::RwLock<std::collections::BTreeMap<String, AdminTable>>,
}

impl AdminTables {
    /// The one table of a single-table relay.
    pub fn single(table: AdminTable) -> Arc<Self> {
        let tables = Self {
            labelled: false,
            slot: None,
            entries: Default::default(),
        };
        tables.insert(table);
        Arc::new(tables)
    }

    /// An empty set for a multi-table relay.
    pub fn multi() -> Arc<Self> {
        Arc::new(Self {
            labelled: true,
            slot: None,
            entries: Default::default(),
        })
    }

    /// An empty set for a multi-table relay with the logical source: `slot` holds the figures
    /// of the one replication slot its tables share, exported once, unlabelled, beside the
    /// tables' own ([`crate::metrics::register_tables`]).
    pub fn multi_logical(slot: Arc<LogicalMetrics>) -> Arc<Self> {
        Arc::new(Self {
            labelled: true,
            slot: Some(slot),
            entries: Default::default(),
        })
    }

    /// The slot's figures of a multi-table logical relay ([`Self::multi_logical`]): the group
    /// hands them to every opening of its slot.
    pub fn slot_metrics(&self) -> Option<Arc<LogicalMetrics>> {
        self.slot.clone()
    }

    /// Adds (or replaces) a table, keyed by its configured name.
    pub fn insert(&self, table: AdminTable) {
        let name = table.config.table.clone();
        self.write().insert(name, table);
    }

    /// Records that the pipeline of `name` stopped, and why.
    pub fn set_stopped(&self, name: &str, reason: impl Into<String>) {
        if let Some(t) = self.write().get_mut(name) {
            t.stopped = Some(reason.into());
        }
    }

    /// Removes a table (its pipeline was stopped on purpose).
    pub fn remove(&self, name: &str) {
        self.write().remove(name);
    }

    /// The tables, by name.
    pub fn snapshot(&self) -> Vec<(String, AdminTable)> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, std::collections::BTreeMap<String, AdminTable>> {
        self.entries.write().unwrap_or_else(|e| e.into_inner())
    }
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
    tables: Arc<AdminTables>,
    pool: PgPool,
    /// The relay's figures, registered once ([`crate::metrics::registry`], or
    /// [`crate::metrics::tables_registry`] for a multi-table relay).
    registry: Arc<Registry>,
    status: Arc<Cached<Arc<TableReadings>>>,
    db_ping: Arc<Cached<bool>>,
}

/// Binds the admin endpoint and serves it until `shutdown`; returns the bound address (useful
/// with port 0). `config` gives the endpoint's own settings (`admin`, `sink`); `tables` what it
/// reports on.
pub async fn serve(
    addr: SocketAddr,
    config: Arc<RelayConfig>,
    tables: Arc<AdminTables>,
    options: &PgConnectOptions,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy_with(options.clone().application_name("outbox-relay-admin"));
    let refresh = config.admin.status_refresh;
    let registry = if tables.labelled {
        let listed = tables.clone();
        Arc::new(crate::metrics::tables_registry(
            Arc::new(move || {
                listed
                    .snapshot()
                    .into_iter()
                    .map(|(name, t)| (name, t.stats))
                    .collect()
            }),
            tables.slot.as_ref(),
        ))
    } else {
        let stats = tables
            .snapshot()
            .into_iter()
            .next()
            .map(|(_, t)| t.stats)
            .unwrap_or_default();
        Arc::new(crate::metrics::registry(&stats, config.source))
    };
    let state = AdminState {
        config,
        tables,
        pool,
        registry,
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

/// The shared status reading of every table (at most one database round per
/// `admin.status_refresh`).
async fn read_status(state: &AdminState) -> Reading {
    let (at, value) = state
        .status
        .get(|| async {
            let tables = state.tables.snapshot();
            // Each table's queries are index-backed; give a long list a little more time.
            let budget = Duration::from_secs(3) + Duration::from_millis(50) * tables.len() as u32;
            let fut = async {
                let mut conn = state.pool.acquire().await.map_err(|e| e.to_string())?;
                let mut out = Vec::with_capacity(tables.len());
                for (name, t) in &tables {
                    let status = crate::status::read(&mut conn, &t.config, &t.table)
                        .await
                        .map_err(|e| e.to_string());
                    out.push((name.clone(), status));
                }
                Ok::<_, String>(out)
            };
            let all = match tokio::time::timeout(budget, fut).await {
                Ok(Ok(readings)) => readings,
                Ok(Err(e)) => tables
                    .iter()
                    .map(|(n, _)| (n.clone(), Err(e.clone())))
                    .collect(),
                Err(_) => {
                    let e = format!("database did not answer within {} s", budget.as_secs_f64());
                    tables
                        .iter()
                        .map(|(n, _)| (n.clone(), Err(e.clone())))
                        .collect()
                }
            };
            Arc::new(all)
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
        problems.push("database unreachable".to_owned());
    }
    let broker = state.config.sink.broker();
    let tables = state.tables.snapshot();
    if state.tables.labelled && tables.is_empty() {
        problems.push("no outbox table found yet".to_owned());
    }
    for (name, t) in &tables {
        let mut mine = Vec::new();
        if let Some(why) = &t.stopped {
            mine.push(format!("pipeline stopped ({why})"));
        } else if !t.stats.sink_connected.load(Ordering::Relaxed) {
            mine.push(format!("producer not connected to {broker}"));
        } else if !t.stats.sink_reachable.load(Ordering::Relaxed) {
            mine.push(format!("{broker} brokers do not answer"));
        }
        if t.stopped.is_none()
            && t.stats.active.load(Ordering::Relaxed)
            && !t.stats.source_running.load(Ordering::Relaxed)
        {
            mine.push("source not running".to_owned());
        }
        if state.tables.labelled {
            problems.extend(mine.into_iter().map(|p| format!("table {name}: {p}")));
        } else {
            problems.extend(mine);
        }
    }
    if problems.is_empty() {
        let shown = if state.tables.labelled {
            let active = tables
                .iter()
                .filter(|(_, t)| t.stats.active.load(Ordering::Relaxed))
                .count();
            format!("{} tables, {active} active", tables.len())
        } else {
            tables
                .first()
                .map_or("standby", |(_, t)| role(&t.stats))
                .to_owned()
        };
        (StatusCode::OK, format!("ready ({shown})\n")).into_response()
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
    let tables = state.tables.snapshot();
    let age = reading.at.elapsed().as_secs_f64();
    let shown = |name: &str, status: &OutboxStatus| {
        let mut v = serde_json::to_value(status).unwrap_or_default();
        if let Some((_, t)) = tables.iter().find(|(n, _)| n == name) {
            v["role"] = role(&t.stats).into();
            v["published_by_this_instance"] = t.stats.published.get().into();
        }
        v
    };
    if !state.tables.labelled {
        return match reading.value.first() {
            Some((name, Ok(s))) => {
                let mut v = shown(name, s);
                v["status_age_seconds"] = age.into();
                axum::Json(v).into_response()
            }
            Some((_, Err(e))) => {
                (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
            }
            None => (StatusCode::SERVICE_UNAVAILABLE, "no table\n").into_response(),
        };
    }
    let list: Vec<serde_json::Value> = reading
        .value
        .iter()
        .map(|(name, status)| match status {
            Ok(s) => shown(name, s),
            Err(e) => serde_json::json!({ "table": name, "error": e }),
        })
        .collect();
    axum::Json(serde_json::json!({ "tables": list, "status_age_seconds": age })).into_response()
}

async fn metrics(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if state.config.admin.metrics_auth
        && let Some(refused) = check_token(&state, &headers)
    {
        return refused;
    }
    let mut out = String::with_capacity(8192);
    crate::metrics::encode(&mut out, &state.registry);
    let reading = read_status(&state).await;
    for (table, e) in reading
        .value
        .iter()
        .filter_map(|(t, r)| Some((t, r.as_ref().err()?)))
    {
        tracing::debug!(%table, error = %e, "metrics scrape could not read the outbox status");
    }
    let age = reading.at.elapsed().as_secs_f64();
    let queries = state.status.refreshes.load(Ordering::Relaxed);
    let status = if state.tables.labelled {
        crate::metrics::tables_status_registry(&reading.value, age, queries)
    } else {
        let none = Err("no table".to_owned());
        let first = reading.value.first().map_or(&none, |(_, r)| r);
        crate::metrics::status_registry(first, age, queries)
    };
    crate::metrics::encode(&mut out, &status);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], out).into_response()
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

    #[tokio::test]
    async fn readiness_names_each_table_that_is_not_ready() {
        let config = Arc::new(RelayConfig::default());
        let tables = AdminTables::multi();
        for (name, stopped) in [("a.outbox", None), ("b.outbox", Some("it broke"))] {
            let stats = Arc::new(RelayStats::default());
            stats.sink_connected.store(true, Ordering::Relaxed);
            tables.insert(AdminTable {
                table: OutboxTable::parse(name).unwrap(),
                config: Arc::new(RelayConfig {
                    table: name.to_owned(),
                    ..RelayConfig::default()
                }),
                stats,
                stopped: stopped.map(str::to_owned),
            });
        }
        let options: PgConnectOptions = "postgres://nobody@127.0.0.1:1/none".parse().unwrap();
        let state = AdminState {
            config,
            tables: tables.clone(),
            pool: PgPoolOptions::new()
                .acquire_timeout(Duration::from_millis(200))
                .connect_lazy_with(options),
            registry: Arc::new(Registry::default()),
            status: Arc::new(Cached::new(Duration::from_secs(1))),
            db_ping: Arc::new(Cached::new(Duration::from_secs(1))),
        };
        let body = |r: Response| async move {
            let bytes = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
            String::from_utf8(bytes.to_vec()).unwrap()
        };
        let answer = readyz(State(state.clone())).await;
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        let text = body(answer).await;
        assert!(
            text.contains("table b.outbox: pipeline stopped (it broke)"),
            "{text}"
        );
        assert!(!text.contains("table a.outbox"), "{text}");
        // The other table alone: only the database is missing here.
        tables.remove("b.outbox");
        let text = body(readyz(State(state)).await).await;
        assert_eq!(text, "not ready: database unreachable\n");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abcdefghijklmnop", b"abcdefghijklmnop"));
        assert!(!constant_time_eq(b"abcdefghijklmnop", b"abcdefghijklmnoq"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
