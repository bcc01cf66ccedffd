//! The `rebalance` scenario ([`Fault::Rebalance`](super::Fault::Rebalance)): relays join, leave and are paused past their
//! lease while writers commit on [`AGGREGATES`] aggregates, and who relays what is read from
//! PostgreSQL's lock table throughout.
//!
//! - **Polling**: the table is split into [`SHARDS`] shards (`shards`, `migrate` builds the shard
//!   index) and three relays share it. Then, per round: a fourth relay joins; the oldest one
//!   leaves (SIGTERM, exit 0); the newest one is SIGSTOPped until the server has ended its lock
//!   session (the lease) and the others own all its shards, then resumed: it must step down
//!   (`leader lease lost`), produce nothing until it has joined again, and get its share back.
//! - **Logical**: `shards` is refused with the logical source (one slot, one reader), so one
//!   leader streams the slot and the other relays stand by. Per round: a standby joins; the
//!   leader leaves (SIGTERM, exit 0) and a standby takes over; the new leader is SIGSTOPped
//!   until a standby holds the lock and streams the slot (the paused walsender lets go after
//!   `wal_sender_timeout`, set to the lease on the run's database), then resumed: it must step
//!   down and produce nothing.
//!
//! Every relay runs with a [`LEASE`] lease (heartbeats and rebalancing every 500 ms) and stamps
//! its records with its pid and the time it enqueued them (`OUTBOX_FAILPOINT_PROVENANCE`), so a
//! resumed relay's records between its resume and its next activation are found
//! ([`super::ZOMBIE_PRODUCE`]). A graceful join or leave must repeat nothing: no duplicate may
//! be first read after its fault marker. A [`LockSampler`] reads `pg_locks` every 20 ms: no
//! shard — logical: no leader lock — may ever have two holders, nor a holder that is not a
//! member.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outbox_core::OutboxTable;
use outbox_relay::shard::{ShardKeys, holders};
use outbox_relay::status::ShardsStatus;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use super::{Deposed, Run, SourceMode, kv, strip_ansi};
use crate::env::pause;
use crate::relay::RelayProc;
use crate::workload::RunDb;

/// Aggregates the writers spread their events over.
pub const AGGREGATES: usize = 200;
/// Shards of the table (polling).
pub const SHARDS: u32 = 16;
/// The lease of every relay: the server ends a paused relay's lock session after it.
const LEASE: &str = "2s";
/// What a sharded relay logs when it has joined.
pub const JOINED: &str = "joined the sharded relays of this table";
/// What an unsharded relay logs when it has won the leader lock.
const LEADS: &str = "acquired the leader lock";
/// What an unsharded relay logs while another one leads.
const STANDS_BY: &str = "another relay holds the leader lock: standing by";
/// What the logical source logs when it streams.
const STREAMS: &str = "replication stream started";
/// What a resumed relay logs when it finds its lease gone.
const LEASE_LOST: &str = "leader lease lost: stepped down";
/// How long the relays may take to settle after a change.
const SETTLE: Duration = Duration::from_secs(30);
/// How long a paused relay stays stopped once the others took over.
const STOPPED_AFTER_TAKEOVER: u64 = 500;

/// Runs before the first relay starts: the relays' settings (lease, provenance stamps, and for
/// the polling source the shard count), the shard index (polling: `outbox-relay migrate` with
/// the run's settings) or the walsender timeout (logical: on the run's database, so that a
/// paused leader's walsender lets go of the slot after about the lease).
pub async fn prepare(
    db: &RunDb,
    source: SourceMode,
    bin: &Path,
    base_env: &[(String, String)],
) -> Result<Vec<(String, String)>> {
    let mut env = vec![
        kv("OUTBOX_LEADER_LEASE", LEASE),
        kv("OUTBOX_FAILPOINT_PROVENANCE", "1"),
    ];
    match source {
        SourceMode::Polling => {
            env.push(kv("OUTBOX_SHARDS", SHARDS.to_string()));
            let out = tokio::process::Command::new(bin)
                .arg("migrate")
                .env_clear()
                .envs(base_env.iter().chain(&env).map(|(k, v)| (k, v)))
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "`outbox-relay migrate` with shards = {SHARDS} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        SourceMode::Logical => {
            sqlx::query(AssertSqlSafe(format!(
                "ALTER DATABASE \"{}\" SET wal_sender_timeout = '{LEASE}'",
                db.name
            )))
            .execute(&db.pool)
            .await?;
        }
    }
    Ok(env)
}

/// What sampling the lock table found.
#[derive(Debug, Default)]
pub struct Samples {
    /// Readings of `pg_locks`.
    pub taken: usize,
    /// A shard (logical: the leader lock) held by two sessions at once, or a shard held by a
    /// session that is not a member.
    pub violations: Vec<String>,
    /// Lock sessions (backend pids) seen owning shards (logical: holding the leader lock).
    pub owners: BTreeSet<i32>,
}

/// Reads the run's table locks every 20 ms until [`LockSampler::finish`].
pub struct LockSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<Samples>>,
}

impl LockSampler {
    /// Starts sampling the locks of the `outbox` table of the database at `url`, split into
    /// `shards` shards (`None`: unsharded, one leader).
    pub async fn start(url: &str, shards: Option<u32>) -> Result<Self> {
        let mut conn = PgConnection::connect(url).await?;
        let table = OutboxTable::default().resolve(&mut conn).await?;
        let members = table.lock_key("relay");
        let shard_keys = shards
            .map(|n| ShardKeys::new(&table, n).shards)
            .unwrap_or_default();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut samples = Samples::default();
            let mut wanted = shard_keys.clone();
            wanted.push(members);
            while !stopped.load(Ordering::Relaxed) {
                // One reading for both: the members and the shard holders.
                let (member_locks, held): (Vec<_>, Vec<_>) = holders(&mut conn, &wanted)
                    .await?
                    .into_iter()
                    .partition(|(key, _)| *key == members);
                let member_pids: BTreeSet<i32> = member_locks.iter().map(|(_, p)| *p).collect();
                if shard_keys.is_empty() {
                    if member_pids.len() > 1 {
                        samples
                            .violations
                            .push(format!("the leader lock held by {member_pids:?} at once"));
                    }
                    samples.owners.extend(&member_pids);
                }
                let mut by_shard: BTreeMap<i64, Vec<i32>> = BTreeMap::new();
                for (key, pid) in held {
                    by_shard.entry(key).or_default().push(pid);
                    samples.owners.insert(pid);
                }
                for (key, pids) in &by_shard {
                    let shard = shard_keys
                        .iter()
                        .position(|k| k == key)
                        .unwrap_or(usize::MAX);
                    if pids.len() > 1 {
                        samples
                            .violations
                            .push(format!("shard {shard} held by {pids:?} at once"));
                    }
                    if pids.iter().any(|p| !member_pids.contains(p)) {
                        samples.violations.push(format!(
                            "shard {shard} held by {pids:?}, members {member_pids:?}"
                        ));
                    }
                }
                samples.taken += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = conn.close().await;
            Ok(samples)
        });
        Ok(Self { stop, task })
    }

    /// Stops sampling; what it found.
    pub async fn finish(self) -> Result<Samples> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.context("lock sampler")?
    }
}

/// The wall-clock time (unix ms) of a relay log line (`2026-12-06T20:10:50.123456Z  INFO …`).
fn log_time_ms(line: &str) -> Option<i64> {
    let plain = strip_ansi(line);
    let stamp = plain.split_whitespace().next()?;
    chrono::DateTime::parse_from_rfc3339(stamp)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// When the relay whose log this is became active after `after_ms`: the time of the first
/// line at or after it saying it won the lock or joined the shards.
fn active_again_ms(log: &str, after_ms: i64) -> Option<i64> {
    log.lines()
        .filter(|l| l.contains(LEADS) || l.contains(JOINED))
        .filter_map(log_time_ms)
        .find(|ms| *ms >= after_ms)
}

/// The wall-clock time now (unix ms), as the provenance stamps count it.
fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Waits until `relay`'s log contains `needle` at least `n` times (false when it exits first or
/// `timeout` passes).
async fn wait_count(relay: &mut RelayProc, needle: &str, n: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if relay.log().matches(needle).count() >= n {
            return true;
        }
        if relay.exit_code().is_some() {
            return false;
        }
        pause(25).await;
    }
    false
}

impl Run<'_> {
    /// The scenario: see the [module docs](self).
    pub(super) async fn rebalance(
        &mut self,
        writers: &tokio::task::JoinHandle<Result<()>>,
    ) -> Result<()> {
        let shards = (self.source == SourceMode::Polling).then_some(SHARDS);
        self.sampler = Some(LockSampler::start(&self.db.url, shards).await?);
        match self.source {
            SourceMode::Polling => self.rebalance_shards(writers).await?,
            SourceMode::Logical => self.rebalance_leader(writers).await?,
        }
        self.result.notes.push(format!(
            "{} of {} faults began while the writers were committing",
            self.under_load, self.result.faults
        ));
        Ok(())
    }

    /// Sets a fault marker, counting whether the writers are still at work.
    fn mark_fault(
        &mut self,
        writers: &tokio::task::JoinHandle<Result<()>>,
        clean: Option<&'static str>,
    ) {
        if let Some(what) = clean {
            self.clean_marks
                .push((self.republished_at_marks.len(), what));
        }
        if !writers.is_finished() {
            self.under_load += 1;
        }
        self.mark();
    }

    /// Starts one more relay (`b`, `c`, …).
    fn spawn_next(&mut self) -> Result<RelayProc> {
        let name = char::from(b'a' + (self.started % 26) as u8).to_string();
        self.started += 1;
        self.spawn(&name, &[])
    }

    /// Waits until `relay` logs `needle` (`n` times in all); a failure naming `what` otherwise.
    async fn expect_log(
        &mut self,
        relay: &mut RelayProc,
        needle: &str,
        n: usize,
        what: &str,
    ) -> bool {
        if wait_count(relay, needle, n, SETTLE).await {
            return true;
        }
        let log = relay.log();
        let last: Vec<&str> = log.lines().rev().take(3).collect();
        self.result.failures.push(format!(
            "relay {} never {what} within {SETTLE:?}: {}",
            relay.name,
            last.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
        false
    }

    /// Waits until `members` sharded relays have joined and own every shard, each at most its
    /// fair share (from the lock table); a failure otherwise.
    async fn balanced(&mut self, members: usize) -> Result<Option<ShardsStatus>> {
        let mut conn = PgConnection::connect(&self.db.url).await?;
        let share = (SHARDS as usize).div_ceil(members);
        let deadline = Instant::now() + SETTLE;
        let outcome = loop {
            let s =
                outbox_relay::status::shards(&mut conn, &OutboxTable::default(), SHARDS).await?;
            if s.members == members
                && s.unowned.is_empty()
                && s.owners.len() == members
                && s.owners.iter().all(|o| o.shards.len() <= share)
            {
                break Some(s);
            }
            if Instant::now() > deadline {
                self.result.failures.push(format!(
                    "the shards never settled over {members} relays within {SETTLE:?}: {} members, unowned {:?}, owners {:?}",
                    s.members, s.unowned, s.owners
                ));
                break None;
            }
            pause(50).await;
        };
        let _ = conn.close().await;
        Ok(outcome)
    }

    /// Resumes a relay SIGSTOPped while it was active, after the others took over, and waits
    /// until it has noticed its lease is gone; returns whether it did.
    async fn resume_deposed(&mut self, relay: &mut RelayProc) -> Result<bool> {
        let stepped_down = relay.log().matches(LEASE_LOST).count();
        self.deposed.push(Deposed {
            pid: relay.pid(),
            resumed_ms: now_ms(),
            until_ms: None,
        });
        relay.signal("CONT").await?;
        Ok(self
            .expect_log(
                relay,
                LEASE_LOST,
                stepped_down + 1,
                "stepped down after its resume",
            )
            .await)
    }

    /// Polling: see the [module docs](self).
    async fn rebalance_shards(
        &mut self,
        writers: &tokio::task::JoinHandle<Result<()>>,
    ) -> Result<()> {
        let rounds = if self.settings.quick { 1 } else { 2 };
        for _ in 0..2 {
            let mut r = self.spawn_next()?;
            let joined = self.expect_log(&mut r, JOINED, 1, "joined").await;
            self.members.push(r);
            if !joined {
                return Ok(());
            }
        }
        if self.balanced(3).await?.is_none() {
            return Ok(());
        }
        for _ in 0..rounds {
            // A fourth relay joins: the others drain their surplus and hand it over.
            let g = self.gap(300, 900);
            pause(g).await;
            self.mark_fault(writers, Some("a relay joined"));
            let mut r = self.spawn_next()?;
            let joined = self.expect_log(&mut r, JOINED, 1, "joined").await;
            self.members.push(r);
            self.result.faults += 1;
            if !joined || self.balanced(4).await?.is_none() {
                return Ok(());
            }
            self.recovered().await?;

            // The oldest one leaves: it drains its shards, hands them over and exits 0.
            let g = self.gap(300, 900);
            pause(g).await;
            self.mark_fault(writers, Some("a relay left with SIGTERM"));
            let mut gone = self.members.remove(0);
            let code = gone.terminate(Duration::from_secs(25)).await;
            if code != Some(0) {
                self.result.failures.push(format!(
                    "relay {} left with exit {code:?}, not 0",
                    gone.name
                ));
            }
            self.left.push(gone);
            self.result.faults += 1;
            if self.balanced(3).await?.is_none() {
                return Ok(());
            }
            self.recovered().await?;

            // The newest one is paused past its lease: the server ends its lock session, the
            // others take its shards; then it is resumed.
            let g = self.gap(300, 900);
            pause(g).await;
            self.mark_fault(writers, None);
            let mut paused = self.members.pop().context("a member to pause")?;
            let joined = paused.log().matches(JOINED).count();
            paused.signal("STOP").await?;
            let stopped = Instant::now();
            let took_over = self.balanced(2).await?.is_some();
            self.result.notes.push(format!(
                "relay {} paused: the other two owned all {SHARDS} shards after {} ms",
                paused.name,
                stopped.elapsed().as_millis()
            ));
            if took_over {
                pause(STOPPED_AFTER_TAKEOVER).await;
            }
            let stepped_down = self.resume_deposed(&mut paused).await?;
            let rejoined = stepped_down
                && self
                    .expect_log(&mut paused, JOINED, joined + 1, "joined again")
                    .await;
            self.members.push(paused);
            self.result.faults += 1;
            if !took_over || !rejoined || self.balanced(3).await?.is_none() {
                return Ok(());
            }
            self.recovered().await?;
        }
        Ok(())
    }

    /// Logical: see the [module docs](self).
    async fn rebalance_leader(
        &mut self,
        writers: &tokio::task::JoinHandle<Result<()>>,
    ) -> Result<()> {
        let rounds = if self.settings.quick { 1 } else { 2 };
        let mut r = self.spawn_next()?;
        let waiting = self.expect_log(&mut r, STANDS_BY, 1, "stood by").await;
        self.members.push(r);
        if !waiting {
            return Ok(());
        }
        for _ in 0..rounds {
            // A standby joins.
            let g = self.gap(300, 900);
            pause(g).await;
            self.mark_fault(writers, Some("a standby joined"));
            let mut r = self.spawn_next()?;
            let waiting = self.expect_log(&mut r, STANDS_BY, 1, "stood by").await;
            self.members.push(r);
            self.result.faults += 1;
            if !waiting {
                return Ok(());
            }
            self.recovered().await?;

            // The leader leaves: it drains, confirms, exits 0; a standby takes over.
            let g = self.gap(300, 900);
            pause(g).await;
            self.mark_fault(writers, Some("the leader left with SIGTERM"));
            let leads_before = self.leads();
            let mut gone = self.relay.take().context("leader")?;
            let code = gone.terminate(Duration::from_secs(25)).await;
            if code != Some(0) {
                self.result.failures.push(format!(
                    "leader {} left with exit {code:?}, not 0",
                    gone.name
                ));
            }
            self.left.push(gone);
            self.result.faults += 1;
            let Some(next) = self.new_leader(&leads_before).await else {
                return Ok(());
            };
            self.relay = Some(self.members.remove(next));
            self.recovered().await?;

            // The leader is paused past its lease: a standby wins the lock, then the slot once
            // the paused walsender is gone; then the old leader is resumed.
            let g = self.gap(300, 900);
            pause(g).await;
            self.mark_fault(writers, None);
            let leads_before = self.leads();
            let mut paused = self.relay.take().context("leader")?;
            paused.signal("STOP").await?;
            let stopped = Instant::now();
            let next = self.new_leader(&leads_before).await;
            let streams = match next {
                Some(k) => {
                    let mut leader = self.members.remove(k);
                    let n = leader.log().matches(STREAMS).count() + 1;
                    let ok = self
                        .expect_log(
                            &mut leader,
                            STREAMS,
                            n,
                            "streamed the slot after taking over",
                        )
                        .await;
                    self.relay = Some(leader);
                    ok
                }
                None => false,
            };
            self.result.notes.push(format!(
                "leader {} paused: a standby streamed after {} ms",
                paused.name,
                stopped.elapsed().as_millis()
            ));
            if streams {
                pause(STOPPED_AFTER_TAKEOVER).await;
            }
            let stepped_down = self.resume_deposed(&mut paused).await?;
            self.members.push(paused);
            self.result.faults += 1;
            if !streams || !stepped_down {
                return Ok(());
            }
            self.recovered().await?;
        }
        Ok(())
    }

    /// How often each standby has logged winning the leader lock.
    fn leads(&self) -> Vec<usize> {
        self.members
            .iter()
            .map(|r| r.log().matches(LEADS).count())
            .collect()
    }

    /// Waits until one of the standbys wins the leader lock anew; its index in `members`.
    async fn new_leader(&mut self, before: &[usize]) -> Option<usize> {
        let deadline = Instant::now() + SETTLE;
        while Instant::now() < deadline {
            let now = self.leads();
            if let Some(k) = (0..now.len()).find(|&k| now[k] > before.get(k).copied().unwrap_or(0))
            {
                return Some(k);
            }
            pause(25).await;
        }
        self.result.failures.push(format!(
            "no standby took over the leader lock within {SETTLE:?}"
        ));
        None
    }

    /// Records what the lock sampler found: any violation fails the run.
    pub(super) fn check_samples(&mut self, samples: Samples) {
        let what = match self.source {
            SourceMode::Polling => "sessions seen owning shards",
            SourceMode::Logical => "sessions seen holding the leader lock",
        };
        self.result.notes.push(format!(
            "lock table read {} times: {} {what}, {} violations",
            samples.taken,
            samples.owners.len(),
            samples.violations.len()
        ));
        if samples.taken < 50 {
            self.result.failures.push(format!(
                "the lock table was read only {} times: ownership was not watched",
                samples.taken
            ));
        }
        let mut seen = BTreeSet::new();
        for v in samples.violations {
            if seen.insert(v.clone()) && seen.len() <= 5 {
                self.result
                    .failures
                    .push(format!("ownership violated: {v}"));
            }
        }
    }

    /// Fills in when each deposed relay became active again, from its log.
    pub(super) fn deposed_until(&mut self) {
        let relays: Vec<&RelayProc> = [self.relay.as_ref(), self.standby.as_ref()]
            .into_iter()
            .flatten()
            .chain(&self.members)
            .chain(&self.left)
            .collect();
        for d in &mut self.deposed {
            if let Some(r) = relays.iter().find(|r| r.pid() == d.pid) {
                d.until_ms = active_again_ms(&r.log(), d.resumed_ms);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{active_again_ms, log_time_ms};

    #[test]
    fn log_lines_are_timed_and_the_next_activation_found() {
        let log = "\
2026-12-06T20:10:50.100000Z  INFO outbox_relay::leader: joined the sharded relays of this table: this relay is active for the shards it owns
\u{1b}[2m2026-12-06T20:10:52.000000Z\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m outbox_relay::relay: leader lease lost: stepped down to standby
2026-12-06T20:10:53.250000Z  INFO outbox_relay::leader: joined the sharded relays of this table: this relay is active for the shards it owns";
        let first = log_time_ms(log.lines().next().unwrap()).unwrap();
        assert_eq!(log_time_ms(log.lines().nth(1).unwrap()), Some(first + 1900));
        assert_eq!(active_again_ms(log, first + 1000), Some(first + 3150));
        assert_eq!(active_again_ms(log, first + 4000), None);
        assert_eq!(log_time_ms("no time here"), None);
    }
}
