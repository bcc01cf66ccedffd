//! Many outbox tables in one relay publishing to NATS, Redis or RabbitMQ over ONE connection to
//! the broker (`outbox_relay::sink::select::SharedClient`): every table's events arrive, exactly
//! once and in per-aggregate order, while the relay holds a single connection, and a shared
//! connection cut from the server side mid-drain is replaced once for every table with nothing
//! lost. See docs/operations.md, "Many tables per relay".
//!
//! How connections are counted: Redis by the server's `CLIENT LIST` (the relay names its
//! connections `outbox-relay-<pid>`); NATS and RabbitMQ (no monitoring port, no management
//! plugin here) by the relay process's established TCP connections to the broker's port
//! ([`outbox_tests::sink_connections`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use outbox_tests::sink_connections::{port_of, redis_client_ids, redis_kill, tcp_connections};
use outbox_tests::sinks::{SinkUnderTest, nats, rabbitmq};
use outbox_tests::tables::*;
use outbox_tests::*;
use uuid::Uuid;

const TABLES: usize = 6;
const AGGREGATES: usize = 4;
const PER_AGGREGATE: usize = 40;
const QUIET: Duration = Duration::from_millis(1500);

/// A database with `TABLES` outbox tables (`tenant_<i>.outbox`), each routed to a destination
/// of its own that the broker is prepared for, and the relay configuration listing them.
struct Tenants {
    db: TestDb,
    tables: Vec<String>,
    destinations: Vec<String>,
    toml: String,
}

async fn tenants(sink: SinkUnderTest, name: &str) -> Result<Tenants> {
    let db = TestDb::create(name).await?;
    let tag = unique("mts");
    let mut tables = Vec::new();
    let mut destinations = Vec::new();
    let mut toml = String::new();
    for i in 0..TABLES {
        let table = format!("tenant_{i}.outbox");
        migrate_table(&db, &table).await?;
        let destination = format!("{tag}.t{i}.Acct");
        sink.prepare(&destination).await?;
        toml.push_str(&format!(
            "[[outbox]]\ntable = \"{table}\"\n[outbox.route]\ntopic = \"{tag}.t{i}.{{aggregatetype}}\"\n\n"
        ));
        tables.push(table);
        destinations.push(destination);
    }
    Ok(Tenants {
        db,
        tables,
        destinations,
        toml,
    })
}

/// The relay process's connections to the broker of `sink`.
async fn connections(sink: SinkUnderTest, pid: u32) -> Result<usize> {
    match sink {
        SinkUnderTest::Redis => Ok(redis_client_ids(pid).await?.len()),
        SinkUnderTest::Nats => tcp_connections(pid, port_of(&nats::url())?),
        SinkUnderTest::Rabbitmq => tcp_connections(pid, port_of(&rabbitmq::url())?),
        SinkUnderTest::Kafka => anyhow::bail!("Kafka shares one producer (see multi_table.rs)"),
    }
}

/// Writes every table's events at once (one aggregate → event ids map per table), then sets
/// `done`.
async fn write_all(
    db: &TestDb,
    tables: &[String],
    done: &AtomicBool,
) -> Result<Vec<BTreeMap<String, Vec<Uuid>>>> {
    let writes = tables
        .iter()
        .map(|t| write_events(db, t, "Acct", AGGREGATES, PER_AGGREGATE));
    let written = futures::future::try_join_all(writes).await;
    done.store(true, Ordering::SeqCst);
    written
}

/// Events of `tables` not yet published.
async fn pending_in(db: &TestDb, tables: &[String]) -> Result<i64> {
    let mut left = 0;
    for table in tables {
        left += pending(db, table).await?;
    }
    Ok(left)
}

/// `env` as the borrowed pairs the relay helpers take.
fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Every table's events reach its destination exactly once and in order, every table's
/// published count is its own, and while they drain — and after — the relay holds one
/// connection to the broker (not one or two per table).
async fn tables_share_one_connection(sink: SinkUnderTest, name: &str) -> Result<()> {
    let t = tenants(sink, name).await?;
    let mut env = sink.relay_env();
    env.push(("OUTBOX_BATCH_SIZE", "20".to_owned()));
    let (relay, addr, _config) = start_relay(&t.db, &t.toml, &env_refs(&env)).await?;
    let pid = relay.child.pid();

    let done = AtomicBool::new(false);
    let watch = async {
        let mut most = 0;
        let mut samples = 0;
        let deadline = Instant::now() + LONG;
        loop {
            most = most.max(connections(sink, pid).await?);
            samples += 1;
            let left = pending_in(&t.db, &t.tables).await?;
            if done.load(Ordering::SeqCst) && left == 0 {
                return Ok::<_, anyhow::Error>((most, samples));
            }
            ensure!(Instant::now() < deadline, "{left} events still pending");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (written, watched) = tokio::join!(write_all(&t.db, &t.tables, &done), watch);
    let (written, (most, samples)) = (written?, watched?);
    let after = connections(sink, pid).await?;
    println!(
        "{sink:?}: {TABLES} tables drained; at most {most} connection(s) over {samples} samples, {after} after"
    );
    ensure!(
        most <= 1 && after == 1,
        "{sink:?}: the relay held up to {most} connections while its tables drained, and {after} after (expected one)"
    );

    for (i, destination) in t.destinations.iter().enumerate() {
        let records = sink
            .consume(destination, AGGREGATES * PER_AGGREGATE, QUIET, LONG)
            .await?;
        check_exact_and_ordered(&records, &written[i], destination)?;
    }
    let (code, scrape) = http_get(&addr, "/metrics").await?;
    assert_eq!(code, 200, "{scrape}");
    for table in &t.tables {
        assert_eq!(
            table_metric(&scrape, "outbox_relay_events_published_total", table),
            Some((AGGREGATES * PER_AGGREGATE) as f64),
            "{table}"
        );
    }
    assert_eq!(
        connections(sink, pid).await?,
        1,
        "{sink:?}: still one connection"
    );
    stop_cleanly(relay).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_tables_publish_everything_over_one_connection() -> Result<()> {
    tables_share_one_connection(SinkUnderTest::Nats, "mts_nats").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_tables_publish_everything_over_one_connection() -> Result<()> {
    tables_share_one_connection(SinkUnderTest::Redis, "mts_redis").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_tables_publish_everything_over_one_connection() -> Result<()> {
    tables_share_one_connection(SinkUnderTest::Rabbitmq, "mts_rabbit").await
}

/// The shared Redis connection is killed by the server mid-drain: every table recovers and
/// delivers all its events exactly once (the dedupe check drops the re-sent ones) and in order,
/// the relay opens exactly one new connection for all of them, and holds one afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_redis_connection_killed_mid_drain_is_replaced_once_for_every_table() -> Result<()>
{
    let sink = SinkUnderTest::Redis;
    let t = tenants(sink, "mts_redis_kill").await?;
    let mut env = sink.relay_env();
    env.push(("OUTBOX_BATCH_SIZE", "5".to_owned()));
    let (relay, _addr, _config) = start_relay(&t.db, &t.toml, &env_refs(&env)).await?;
    let pid = relay.child.pid();

    let done = AtomicBool::new(false);
    // Mid-drain: the relay publishes over its one connection (the first table has published)
    // and events are still pending.
    let cut = async {
        let deadline = Instant::now() + LONG;
        loop {
            ensure!(Instant::now() < deadline, "the relay never published");
            let ids = redis_client_ids(pid).await?;
            let left = pending_in(&t.db, &t.tables).await?;
            ensure!(
                left > 0 || !done.load(Ordering::SeqCst),
                "drained before the connection could be cut"
            );
            if let [id] = ids.as_slice()
                && left > 0
            {
                let published: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*) FROM {} WHERE published_at IS NOT NULL",
                    outbox_core::OutboxTable::parse(&t.tables[0])?.qualified()
                )))
                .fetch_one(&t.db.pool)
                .await?;
                if published > 0 {
                    return Ok::<_, anyhow::Error>((redis_kill(id).await?, left));
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let (written, cut) = tokio::join!(write_all(&t.db, &t.tables, &done), cut);
    let (written, (killed, left)) = (written?, cut?);
    ensure!(killed, "the relay's connection was not killed");
    println!("killed the shared Redis connection with {left} events pending");

    for table in &t.tables {
        wait_table_drained(&t.db, table, LONG).await?;
    }
    for (i, destination) in t.destinations.iter().enumerate() {
        let records = sink
            .consume(destination, AGGREGATES * PER_AGGREGATE, QUIET, LONG)
            .await?;
        check_exact_and_ordered(&records, &written[i], destination)?;
    }
    assert_eq!(connections(sink, pid).await?, 1, "one connection again");
    let log = stop_cleanly(relay).await?;
    let reconnects = log.matches("opened a new shared Redis connection").count();
    assert_eq!(
        reconnects, 1,
        "one reconnect for every table after one cut:\n{log}"
    );
    assert_eq!(
        log.matches("the shared Redis connection failed").count(),
        1,
        "{log}"
    );
    Ok(())
}
