//! The relay's guarantees, proven for every sink and both sources through a real relay process,
//! a real PostgreSQL and the real broker: late commits and rollbacks, SIGKILL and graceful
//! restarts, a standby taking over, and a poison event parked per aggregate.
//!
//! Every scenario reads the destination back from its start and judges it with one
//! [`Verdict`]: no committed event lost, no rolled-back event published, no per-aggregate order
//! inversion, duplicates only where a fault was injected (and then bounded, detected by id).

mod logical_common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use logical_common::{LONG, QUIET, drop_slots, env_refs, logical_env};
use outbox_core::WriteMode;
use outbox_tests::writers::Workload;
use outbox_tests::writers::{commit_events, padded_event};
use outbox_tests::*;
use uuid::Uuid;

/// Which source the relay runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Polling,
    Logical,
}

/// One scenario's database, workload and relay environment.
struct Setup {
    sink: SinkUnderTest,
    db: TestDb,
    work: Workload,
    env: Vec<(&'static str, String)>,
    slot: Option<String>,
}

impl Setup {
    async fn new(sink: SinkUnderTest, src: Src, name: &str, accounts: usize) -> Result<Self> {
        let db = TestDb::migrated(name).await?;
        let work = Workload::create(&db, name, accounts, 2).await?;
        sink.prepare(&work.topic).await?;
        let mut env = sink.relay_env();
        let slot = match src {
            Src::Polling => None,
            Src::Logical => {
                let slot = unique("sg");
                env.extend(logical_env(WriteMode::Table, &slot));
                Some(slot)
            }
        };
        Ok(Self {
            sink,
            db,
            work,
            env,
            slot,
        })
    }

    async fn start(&self, extra: &[(&'static str, String)]) -> Result<RelayProcess> {
        let mut env = self.env.clone();
        env.extend(extra.iter().cloned());
        let relay = RelayProcess::start(&self.db, &[], &env_refs(&env)).await?;
        Ok(relay)
    }

    /// Reads the workload's destination back until every committed event is there, or until
    /// `LONG` has passed (the [`Verdict`] then counts what is missing as lost). A count of records
    /// is not enough: after a fault, duplicates can make up the count while events are still
    /// on their way.
    async fn read_back(&self, ledger: &Ledger) -> Result<Vec<Consumed>> {
        let deadline = Instant::now() + LONG;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let records = self
                .sink
                .consume(&self.work.topic, ledger.committed.len(), QUIET, left)
                .await?;
            let seen: HashSet<Uuid> = records.iter().map(Consumed::event_id).collect();
            if ledger.committed.is_subset(&seen) || left.is_zero() {
                return Ok(records);
            }
        }
    }

    async fn finish(self) -> Result<()> {
        if let Some(slot) = &self.slot {
            drop_slots(&self.db.pool, slot).await?;
        }
        Ok(())
    }
}

/// Waits until the writers committed at least `n` events.
async fn committed_at_least(work: &Workload, n: usize) -> Result<()> {
    let deadline = Instant::now() + LONG;
    while work.ledger.lock().unwrap().committed.len() < n {
        ensure!(Instant::now() < deadline, "the writers stalled below {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Concurrent writers, a transaction that commits after all of them, one in ten rolled back;
/// small batches with several in flight: every committed event once, in per-aggregate order.
async fn late_commits_and_rollbacks(sink: SinkUnderTest, src: Src) -> Result<()> {
    let s = Setup::new(sink, src, "sg_commits", 10).await?;
    let relay = s
        .start(&[
            ("OUTBOX_BATCH_SIZE", "25".into()),
            ("OUTBOX_MAX_IN_FLIGHT_BATCHES", "4".into()),
        ])
        .await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let held = s.work.spawn_long_open_tx(Duration::from_secs(2)).await?;
    s.work.write(WriteMode::Table, 6, 30).await?;
    held.await??;
    let ledger = s.work.ledger();
    ensure!(
        !ledger.rolled_back.is_empty(),
        "the workload rolled nothing back"
    );
    let records = s.read_back(&ledger).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    let v = Verdict::check(&ledger, &records);
    println!("{sink:?}/{src:?} late commits and rollbacks: {v:?}");
    v.assert_exactly_once(&ledger);
    s.finish().await
}

/// Writers keep committing while the relay is SIGKILLed, restarted, stopped gracefully and
/// started again: nothing lost or inverted, duplicates bounded by the window in flight.
async fn kill_and_restart(sink: SinkUnderTest, src: Src) -> Result<()> {
    let s = Setup::new(sink, src, "sg_restart", 10).await?;
    let window = [("OUTBOX_BATCH_SIZE", "50".to_owned())];
    let relay = s.start(&window).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let writers = s.work.spawn_writers(WriteMode::Table, 4, 120);
    committed_at_least(&s.work, 100).await?;
    relay.kill9().await?;
    let relay = s.start(&window).await?;
    committed_at_least(&s.work, 250).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "a graceful stop exits 0:\n{log}");
    let relay = s.start(&window).await?;
    writers.await??;
    let ledger = s.work.ledger();
    let records = s.read_back(&ledger).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    let v = Verdict::check(&ledger, &records);
    println!("{sink:?}/{src:?} SIGKILL and restarts: {v:?}");
    v.assert_safe();
    assert!(
        v.duplicates <= 3 * 50 + 200,
        "duplicates beyond the window a SIGKILL can repeat: {v:?}"
    );
    s.finish().await
}

/// A standby waits while the active relay runs and takes over when it is SIGKILLed.
async fn standby_takes_over(sink: SinkUnderTest, src: Src) -> Result<()> {
    let s = Setup::new(sink, src, "sg_standby", 5).await?;
    let first = s.start(&[]).await?;
    first.wait_for_log("this relay is active", LONG).await?;
    let second = s.start(&[]).await?;
    second.wait_for_log("standing by", LONG).await?;
    s.work.write(WriteMode::Table, 2, 30).await?;
    let part = s.work.ledger();
    s.read_back(&part).await?;
    assert!(
        !second.log().contains("this relay is active"),
        "the standby became active while the first relay was alive:\n{}",
        second.log()
    );
    first.kill9().await?;
    second
        .wait_for_log("this relay is active", LONG)
        .await
        .context("the standby never took over")?;
    s.work.write(WriteMode::Table, 2, 30).await?;
    let ledger = s.work.ledger();
    let records = s.read_back(&ledger).await?;
    let (code, log) = second.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    let v = Verdict::check(&ledger, &records);
    println!("{sink:?}/{src:?} standby takeover: {v:?}");
    v.assert_safe();
    s.finish().await
}

/// A record the broker refuses for good (larger than the sink accepts) is parked, the events of
/// its aggregate after it are held behind it, and every other aggregate keeps flowing.
async fn poison_is_parked_per_aggregate(sink: SinkUnderTest, src: Src) -> Result<()> {
    let s = Setup::new(sink, src, "sg_poison", 1).await?;
    let relay = s.start(&sink.size_limit_env(20_000)).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let t = s.work.aggregate_type.clone();
    let a1 = commit_events(&s.db, vec![padded_event(&t, "A", 1, 10)]).await?[0];
    let a2 = commit_events(&s.db, vec![padded_event(&t, "A", 2, 30_000)]).await?[0];
    let a3 = commit_events(&s.db, vec![padded_event(&t, "A", 3, 10)]).await?[0];
    let mut others = Vec::new();
    for seq in 1..=5 {
        others.extend(commit_events(&s.db, vec![padded_event(&t, "B", seq, 10)]).await?);
    }
    let records = s.sink.consume(&s.work.topic, 6, QUIET, LONG).await?;
    let ids: Vec<Uuid> = records.iter().map(Consumed::event_id).collect();
    assert!(ids.contains(&a1), "{ids:?}");
    for id in &others {
        assert!(ids.contains(id), "other aggregates keep flowing: {ids:?}");
    }
    assert!(
        !ids.contains(&a2) && !ids.contains(&a3),
        "the poison event and the one behind it are not published: {ids:?}"
    );
    let b: Vec<usize> = others
        .iter()
        .map(|id| ids.iter().position(|x| x == id).unwrap())
        .collect();
    assert!(b.windows(2).all(|w| w[0] < w[1]), "B in order: {ids:?}");

    let deadline = Instant::now() + LONG;
    let parked = loop {
        let out = relay_cli_on(&s.db, &["parked", "list", "--json"], &[]).await?;
        assert_eq!(out.code, 0, "{}", out.stderr);
        let parked: Vec<serde_json::Value> = serde_json::from_str(&out.stdout)?;
        if parked.len() >= 2 || Instant::now() > deadline {
            break parked;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let parked_ids: Vec<&str> = parked.iter().filter_map(|p| p["id"].as_str()).collect();
    assert_eq!(
        parked_ids,
        [a2.to_string(), a3.to_string()],
        "the poison event parked, the next of its aggregate behind it"
    );
    assert_eq!(parked[1]["blocked_by"], a2.to_string());
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    s.finish().await
}

/// The suite for one sink, both sources.
macro_rules! suite {
    ($name:ident, $sink:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn polling_late_commits_and_rollbacks() -> Result<()> {
                late_commits_and_rollbacks($sink, Src::Polling).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn logical_late_commits_and_rollbacks() -> Result<()> {
                late_commits_and_rollbacks($sink, Src::Logical).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn polling_kill_and_restart() -> Result<()> {
                kill_and_restart($sink, Src::Polling).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn logical_kill_and_restart() -> Result<()> {
                kill_and_restart($sink, Src::Logical).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn polling_standby_takes_over() -> Result<()> {
                standby_takes_over($sink, Src::Polling).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn logical_standby_takes_over() -> Result<()> {
                standby_takes_over($sink, Src::Logical).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn polling_poison_is_parked_per_aggregate() -> Result<()> {
                poison_is_parked_per_aggregate($sink, Src::Polling).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn logical_poison_is_parked_per_aggregate() -> Result<()> {
                poison_is_parked_per_aggregate($sink, Src::Logical).await
            }
        }
    };
}

suite!(kafka, SinkUnderTest::Kafka);
suite!(nats, SinkUnderTest::Nats);
suite!(redis, SinkUnderTest::Redis);
suite!(rabbitmq, SinkUnderTest::Rabbitmq);
