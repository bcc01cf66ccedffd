//! One active relay per outbox table: a PostgreSQL advisory lock held by a dedicated session,
//! with a lease that fences a paused leader.
//!
//! Two relays reading the same outbox would interleave and reorder an aggregate's events, so only
//! the holder of the table's leader lock reads and acknowledges; other instances wait as standbys
//! and take over as soon as the holder's session ends (graceful stop, crash or `kill -9`: the
//! server releases a session's advisory locks when the session goes away).
//!
//! The polling source runs its claims **on the lock-holding session itself**, so a relay that
//! lost its session cannot claim anything afterwards. Row acknowledgements (both sources, `table`
//! mode) run beside the pipeline on connections of their own ([`crate::source::row_marks`]);
//! each checks the lease right before its statement, so a relay whose lease is gone marks nothing
//! more — and a mark only ever records rows that Kafka already acknowledged.
//!
//! # The lease: fencing a paused leader
//!
//! A process that is paused (SIGSTOP, a frozen container or VM, a debugger, a long GC-like stall)
//! keeps its TCP connection, so its session — and the lock — would live forever and the standby
//! would never take over. So the lock session runs with `idle_session_timeout` (and
//! `idle_in_transaction_session_timeout`) set to `leader_lease`: the server terminates the session
//! of a leader that stopped talking for that long, which releases the lock for a standby.
//!
//! The active relay keeps its session busy with a heartbeat every `leader_lease / 4` (a statement
//! that also checks the lock is still held) and tracks the lease on the monotonic clock: the lease
//! is good until **three quarters** of `leader_lease` after the last heartbeat that succeeded was
//! *sent*. The server cannot end the session sooner than a full `leader_lease` after that
//! heartbeat, so while the relay's own view says "held", no standby can hold the lock. The relay
//! checks the lease ([`Lease::check`]) immediately before it hands a batch to the producer and
//! before every acknowledgement; a failed heartbeat or an expired lease makes every later check
//! fail. What the relay then does (purge the producer, step down to standby) is described in
//! [`crate::relay`].
//!
//! # Sharded: several active relays
//!
//! With `shards` set, the lock session holds the table's relay lock in *shared* mode, next to
//! the locks of the shards this instance owns ([`crate::shard`]): every sharded instance is
//! active for its shards, an unsharded relay cannot take the lock while any of them runs (nor
//! they while it runs), and the lease, the heartbeat and the fencing below cover the shard locks
//! too, since they live and die with the same session. The heartbeat rebalances the shards
//! ([`crate::shard::rebalance`]) right after each successful check.
//!
//! PostgreSQL before 14 has no `idle_session_timeout`: the relay logs a warning and still stops
//! itself when its lease expires, but the server does not end a paused leader's session, so the
//! standby takes over only when that session really ends (safe, not available).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::{Duration, Instant};

use outbox_core::OutboxTable;
use prometheus_client::metrics::gauge::Gauge;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use tokio::sync::{Mutex, MutexGuard, OwnedMutexGuard};
use tokio_util::sync::CancellationToken;

use crate::shard::{Ownership, ShardKeys};

/// The lease of the active relay, shared by the heartbeat and the relay's checks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Lease {
    state: Arc<LeaseState>,
}

#[derive(Debug)]
struct LeaseState {
    /// The lease as configured (the server-side idle timeout).
    length: Duration,
    /// Monotonic origin for `valid_until_ns`.
    origin: Instant,
    /// Nanoseconds after `origin` until which the lease holds.
    valid_until_ns: AtomicU64,
    /// Set once the lease is known to be lost (the heartbeat failed).
    lost: AtomicBool,
    reason: StdMutex<Option<String>>,
    /// Asks the heartbeat to run now rather than at its next tick.
    kick: tokio::sync::Notify,
}

/// A gap this long between reading a batch and producing it means the relay may have been
/// paused (stopped, starved) meanwhile: see [`Lease::check_after`].
const PAUSE_SUSPECT: Duration = Duration::from_millis(250);

/// The active relay may no longer act as the leader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("leader lease lost: {reason}")]
pub struct LeaseLost {
    /// Why: the heartbeat's error, or how long ago the lease ran out.
    pub reason: String,
}

impl Lease {
    /// A lease of `length` granted by a statement sent at `sent`.
    pub fn new(length: Duration, sent: Instant) -> Self {
        let lease = Self {
            state: Arc::new(LeaseState {
                length,
                origin: sent,
                valid_until_ns: AtomicU64::new(0),
                lost: AtomicBool::new(false),
                reason: StdMutex::new(None),
                kick: tokio::sync::Notify::new(),
            }),
        };
        lease.renew(sent);
        lease
    }

    /// The part of the lease the relay uses: three quarters of it.
    fn usable(&self) -> Duration {
        self.state.length * 3 / 4
    }

    /// The heartbeat sent at `sent` succeeded: the lease holds until `sent` + ¾ lease.
    pub fn renew(&self, sent: Instant) {
        let until = sent.saturating_duration_since(self.state.origin) + self.usable();
        self.state
            .valid_until_ns
            .fetch_max(until.as_nanos() as u64, Ordering::AcqRel);
    }

    /// Marks the lease lost for good.
    pub fn lose(&self, reason: impl Into<String>) {
        if let Ok(mut slot) = self.state.reason.lock()
            && slot.is_none()
        {
            *slot = Some(reason.into());
        }
        self.state.lost.store(true, Ordering::Release);
    }

    /// How long the lease still holds (zero once lost or expired).
    pub fn remaining(&self) -> Duration {
        if self.state.lost.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        let until = Duration::from_nanos(self.state.valid_until_ns.load(Ordering::Acquire));
        until.saturating_sub(self.state.origin.elapsed())
    }

    /// [`Lease::check`] for a batch read at `obtained`. When the relay may have been paused
    /// since (`PAUSE_SUSPECT`, 250 ms, or more ago), the local lease is not enough: a session ended while
    /// the process was stopped — by an operator, a restart, a failover — frees the lock for a
    /// standby at once, long before the local lease runs out. Then a heartbeat sent after this
    /// call began must succeed first (one is requested at once), so a relay that lost its lock
    /// while paused never produces what it had read. A heartbeat sent before the call does not
    /// count even if it was sent after `obtained`: its answer may have been given before the
    /// pause and the session ended after it.
    pub async fn check_after(&self, obtained: Instant) -> Result<(), LeaseLost> {
        self.check()?;
        if obtained.elapsed() < PAUSE_SUSPECT {
            return Ok(());
        }
        // Renewed by a heartbeat sent after now ⟺ valid until past now + ¾ lease.
        let now = Instant::now();
        let needed =
            (now.saturating_duration_since(self.state.origin) + self.usable()).as_nanos() as u64;
        let deadline = Instant::now() + self.state.length;
        loop {
            self.check()?;
            if self.state.valid_until_ns.load(Ordering::Acquire) > needed {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LeaseLost {
                    reason: "no heartbeat confirmed the leader lock after a pause".into(),
                });
            }
            self.state.kick.notify_one();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `Ok` while this relay may still act as the leader: call it immediately before producing
    /// and before acknowledging.
    pub fn check(&self) -> Result<(), LeaseLost> {
        if self.state.lost.load(Ordering::Acquire) {
            let reason = self
                .state
                .reason
                .lock()
                .ok()
                .and_then(|r| r.clone())
                .unwrap_or_else(|| "the heartbeat failed".into());
            return Err(LeaseLost { reason });
        }
        let until = Duration::from_nanos(self.state.valid_until_ns.load(Ordering::Acquire));
        let now = self.state.origin.elapsed();
        if now >= until {
            return Err(LeaseLost {
                reason: format!(
                    "no successful heartbeat for {} ms (the lease is {} ms; the server may already have ended the lock session)",
                    (now - until + self.usable()).as_millis(),
                    self.state.length.as_millis()
                ),
            });
        }
        Ok(())
    }
}

/// The lock-holding session of the active relay.
#[derive(Debug)]
pub struct Leadership {
    conn: Arc<Mutex<PgConnection>>,
    key: i64,
    lease: Lease,
    heartbeat: tokio::task::JoinHandle<()>,
    /// Set when this leadership is dropped: every [`LeaderSession`] refuses from then on.
    ended: Arc<AtomicBool>,
    /// The shards this instance owns, when the table is sharded.
    ownership: Option<Arc<Ownership>>,
}

/// How a sharded instance joins ([`Leadership::acquire_sharded`]).
#[derive(Debug, Clone)]
pub struct Sharding {
    /// The table's shard count (`shards`).
    pub count: u32,
    /// Set to the number of shards this instance owns.
    pub owned: Gauge,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.ended.store(true, Ordering::Release);
        self.heartbeat.abort();
    }
}

/// A shared handle to the lock-holding session of a [`Leadership`], for statements that must be
/// fenced by leadership but are run by someone other than the leadership's owner (the park
/// store, [`crate::park::ParkStore`]). Cheap to clone.
///
/// Guarantee: the handle never outlives the leadership it came from. It does not keep the
/// session alive (it holds no strong reference), and once the [`Leadership`] is dropped
/// [`LeaderSession::connection`] fails with [`LeadershipEnded`] — even while the session itself
/// is still being closed — so nothing written through it can run on a session that may no
/// longer hold the leader lock. Like [`Leadership::connection`], it does not check the lease:
/// the caller does that before each write ([`Lease::check`]).
#[derive(Debug, Clone)]
pub struct LeaderSession {
    conn: Weak<Mutex<PgConnection>>,
    ended: Arc<AtomicBool>,
}

/// The [`Leadership`] a [`LeaderSession`] came from was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the leader lock's session ended: this relay no longer holds the leader lock")]
pub struct LeadershipEnded;

impl LeaderSession {
    /// The lock-holding session, while the leadership lasts. Hold it only for the statements
    /// themselves: the heartbeat waits for it.
    pub async fn connection(&self) -> Result<OwnedMutexGuard<PgConnection>, LeadershipEnded> {
        if self.ended.load(Ordering::Acquire) {
            return Err(LeadershipEnded);
        }
        let conn = self.conn.upgrade().ok_or(LeadershipEnded)?;
        let guard = conn.lock_owned().await;
        // The leadership may have been dropped while this waited for the session.
        if self.ended.load(Ordering::Acquire) {
            return Err(LeadershipEnded);
        }
        Ok(guard)
    }
}

/// Takes the advisory lock `key` and, when given, `also`; holds neither unless both were free.
async fn try_lock(
    conn: &mut PgConnection,
    key: i64,
    also: Option<i64>,
) -> Result<bool, sqlx::Error> {
    let try_one = |k: i64| sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)").bind(k);
    if !try_one(key).fetch_one(&mut *conn).await? {
        return Ok(false);
    }
    let Some(also) = also else { return Ok(true) };
    if try_one(also).fetch_one(&mut *conn).await? {
        return Ok(true);
    }
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    Ok(false)
}

const HOLDS_LOCK: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
     AND pid = pg_backend_pid()
     AND ((classid::bigint << 32) | objid::bigint) = $1)";

impl Leadership {
    /// Waits until this process holds the leader lock of `table`, checking every
    /// `standby_interval`, then starts the lease of length `lease` (see the [module
    /// docs](self)). Returns `Ok(None)` when `shutdown` fires first.
    pub async fn acquire(
        options: &PgConnectOptions,
        table: &OutboxTable,
        standby_interval: Duration,
        lease: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Option<Self>, sqlx::Error> {
        Self::acquire_sharded(options, table, standby_interval, lease, None, shutdown).await
    }

    /// [`Leadership::acquire`], or with `sharding` set: waits until this process has joined the
    /// sharded relays of `table` (see the [module docs](self) and [`crate::shard`]) and took its
    /// first shards; [`Leadership::ownership`] then tells which shards it may claim from.
    pub async fn acquire_sharded(
        options: &PgConnectOptions,
        table: &OutboxTable,
        standby_interval: Duration,
        lease: Duration,
        sharding: Option<Sharding>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Self>, sqlx::Error> {
        let mut conn = options
            .clone()
            .application_name("outbox-relay")
            .connect()
            .await?;
        // The key of the table as PostgreSQL resolves it, so `outbox` and `public.outbox`
        // contend for one lock; while relays of earlier versions (which keyed the lock on the
        // configured spelling) may still run, that key is taken too.
        let resolved = table.resolve(&mut conn).await?;
        let key = resolved.lock_key("relay");
        let spelled = Some(table.lock_key("relay")).filter(|k| *k != key);
        let mut announced = None;
        loop {
            let sent = Instant::now();
            let refused = match &sharding {
                None => (!try_lock(&mut conn, key, spelled).await?)
                    .then(|| "another relay holds the leader lock: standing by".to_owned()),
                Some(sharding) => {
                    match crate::shard::join(&mut conn, &resolved, sharding.count, spelled).await? {
                        Ok(()) => None,
                        Err(crate::shard::Refusal::Joining) => Some(String::new()),
                        Err(why) => Some(why.to_string()),
                    }
                }
            };
            if refused.is_none() {
                let version: i32 =
                    sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
                        .fetch_one(&mut conn)
                        .await?;
                let ms = format!("{}ms", lease.as_millis());
                if version >= 140_000 {
                    sqlx::query(
                        "SELECT set_config('idle_session_timeout', $1, false),
                                set_config('idle_in_transaction_session_timeout', $1, false)",
                    )
                    .bind(&ms)
                    .execute(&mut conn)
                    .await?;
                } else {
                    sqlx::query(
                        "SELECT set_config('idle_in_transaction_session_timeout', $1, false)",
                    )
                    .bind(&ms)
                    .execute(&mut conn)
                    .await?;
                    tracing::warn!(
                        server_version = version,
                        "PostgreSQL before 14 has no idle_session_timeout: a paused active relay stops itself when its lease expires, but its session keeps the leader lock until it really ends"
                    );
                }
                let lease = Lease::new(lease, sent);
                let ownership = match sharding {
                    Some(sharding) => {
                        let own = Arc::new(Ownership::new(
                            sharding.count,
                            ShardKeys::new(&resolved, sharding.count),
                            sharding.owned,
                        ));
                        crate::shard::rebalance(&mut conn, &own).await?;
                        Some(own)
                    }
                    None => None,
                };
                let conn = Arc::new(Mutex::new(conn));
                // In the caller's span, so the rebalancing it logs names the table.
                let heartbeat = tokio::spawn(tracing::Instrument::instrument(
                    heartbeat(conn.clone(), key, lease.clone(), ownership.clone()),
                    tracing::Span::current(),
                ));
                match &ownership {
                    None => tracing::info!(
                        table = %table,
                        lease_ms = lease.state.length.as_millis() as u64,
                        "acquired the leader lock: this relay is active"
                    ),
                    Some(own) => tracing::info!(
                        table = %table,
                        lease_ms = lease.state.length.as_millis() as u64,
                        shards = own.count(),
                        owned = ?own.held(),
                        "joined the sharded relays of this table: this relay is active for the shards it owns"
                    ),
                }
                return Ok(Some(Self {
                    conn,
                    key,
                    lease,
                    heartbeat,
                    ended: Arc::new(AtomicBool::new(false)),
                    ownership,
                }));
            }
            let reason = refused.unwrap_or_default();
            if !reason.is_empty() && announced.as_ref() != Some(&reason) {
                tracing::info!(table = %table, "{reason}");
                announced = Some(reason);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(standby_interval) => {}
            }
        }
    }

    /// The shards this instance owns, when the table is sharded ([`Leadership::acquire_sharded`]).
    pub fn ownership(&self) -> Option<Arc<Ownership>> {
        self.ownership.clone()
    }

    /// The lease of this leadership, to check before producing and acknowledging.
    pub fn lease(&self) -> Lease {
        self.lease.clone()
    }

    /// Confirms that this session still holds the lock (fails when the session is gone).
    pub async fn check(&self) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(HOLDS_LOCK)
            .bind(self.key)
            .fetch_one(&mut *self.conn.lock().await)
            .await
    }

    /// The lock-holding session, for statements that must be fenced by leadership
    /// (`&mut *leader.connection().await`). Hold it only for the statements themselves: the
    /// heartbeat waits for it.
    pub async fn connection(&self) -> MutexGuard<'_, PgConnection> {
        self.conn.lock().await
    }

    /// A shared handle to the lock-holding session that stops working when this leadership is
    /// dropped ([`LeaderSession`]).
    pub fn session(&self) -> LeaderSession {
        LeaderSession {
            conn: Arc::downgrade(&self.conn),
            ended: self.ended.clone(),
        }
    }
}

/// Keeps the lock session busy and the lease renewed until a heartbeat fails; with `ownership`,
/// rebalances the shards after each successful check, on the same session.
async fn heartbeat(
    conn: Arc<Mutex<PgConnection>>,
    key: i64,
    lease: Lease,
    ownership: Option<Arc<Ownership>>,
) {
    let every = (lease.state.length / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = lease.state.kick.notified() => {}
        }
        let mut session = conn.lock().await;
        let sent = Instant::now();
        let answer = tokio::time::timeout(lease.remaining().max(Duration::from_millis(1)), async {
            let held = sqlx::query_scalar::<_, bool>(HOLDS_LOCK)
                .bind(key)
                .fetch_one(&mut *session)
                .await?;
            if held && let Some(own) = &ownership {
                crate::shard::rebalance(&mut session, own).await?;
            }
            Ok::<bool, sqlx::Error>(held)
        })
        .await;
        drop(session);
        match answer {
            Ok(Ok(true)) => lease.renew(sent),
            Ok(Ok(false)) => {
                lease.lose("this session no longer holds the leader lock");
                return;
            }
            Ok(Err(e)) => {
                lease.lose(format!("the heartbeat on the lock session failed: {e}"));
                return;
            }
            Err(_) => {
                lease.lose(
                    "the heartbeat on the lock session got no answer before the lease ran out",
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn after_a_pause_only_a_newer_heartbeat_lets_the_relay_produce() {
        // No pause: the local lease is enough.
        let lease = Lease::new(Duration::from_secs(1), Instant::now());
        assert!(lease.check_after(Instant::now()).await.is_ok());

        // A pause since the read: a heartbeat sent after it must succeed first; it is asked for.
        let read = Instant::now() - Duration::from_millis(300);
        let lease = Lease::new(Duration::from_secs(1), read - Duration::from_millis(10));
        let beat = lease.clone();
        let heartbeat = tokio::spawn(async move {
            beat.state.kick.notified().await;
            beat.renew(Instant::now());
        });
        assert!(lease.check_after(read).await.is_ok());
        heartbeat.await.unwrap();

        // The heartbeat after the pause finds the session gone: the relay produces nothing.
        let lease = Lease::new(Duration::from_secs(1), read - Duration::from_millis(10));
        let beat = lease.clone();
        let heartbeat = tokio::spawn(async move {
            beat.state.kick.notified().await;
            beat.lose("the heartbeat on the lock session failed: terminated");
        });
        let e = lease.check_after(read).await.unwrap_err();
        assert!(e.reason.contains("terminated"), "{e}");
        heartbeat.await.unwrap();

        // No heartbeat at all: refused too (at the latest when the local lease runs out).
        let lease = Lease::new(Duration::from_secs(1), read - Duration::from_millis(10));
        assert!(lease.check_after(read).await.is_err());
    }

    #[test]
    fn a_lease_holds_for_three_quarters_of_its_length_after_the_last_renewal() {
        let start = Instant::now() - Duration::from_millis(700);
        let lease = Lease::new(Duration::from_secs(1), start);
        assert!(lease.check().is_ok(), "700 ms < 750 ms");
        let lease = Lease::new(Duration::from_secs(1), start - Duration::from_millis(100));
        let e = lease.check().unwrap_err();
        assert!(e.reason.contains("no successful heartbeat"), "{e}");
        lease.renew(Instant::now());
        assert!(lease.check().is_ok(), "renewed");
        assert!(lease.remaining() > Duration::from_millis(700));
        // Renewals never move the lease backwards.
        lease.renew(start);
        assert!(lease.check().is_ok());
        lease.lose("the heartbeat on the lock session failed: gone");
        assert_eq!(lease.remaining(), Duration::ZERO);
        assert!(lease.check().unwrap_err().reason.contains("gone"));
    }
}
