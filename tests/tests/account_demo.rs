//! The account-service demo as integration tests: the scripted scenario over HTTP, the relay as a
//! sidecar process, the projector (query model + legacy list) consuming through the inbox; and the
//! `account-demo` driver run end to end on each sink (`demo_on_*`).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use account_service::projector::Projector;
use account_service::scenario::{Phase, Scenario};
use account_service::source::Sink;
use account_service::{legacy, read_model};
use anyhow::{Result, bail};
use outbox_core::consumer::StatsSnapshot;
use outbox_tests::demo::{DemoEnv, run_account_demo};
use outbox_tests::{consume, services};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

const ACCOUNTS: usize = 24;
const CONVERGE: Duration = Duration::from_secs(90);

async fn run_phases(scenario: &mut Scenario, phases: &[Phase]) -> Result<usize> {
    let mut rejected = 0;
    for &phase in phases {
        let report = scenario.run(phase).await?;
        for r in &report.rejected {
            assert_eq!(
                r.outbox_rows_written, 0,
                "rejected command wrote events: {r:?}"
            );
            assert!(
                r.status == 404 || r.status == 409 || r.status == 422,
                "{r:?}"
            );
        }
        rejected += report.rejected.len();
    }
    Ok(rejected)
}

async fn wait_stats(
    what: &str,
    stats: impl Fn() -> StatsSnapshot,
    done: impl Fn(&StatsSnapshot) -> bool,
) -> Result<StatsSnapshot> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let s = stats();
        if done(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("{what}: never got there: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_read_model_equals_write_model_and_rejected_commands_emit_nothing() -> Result<()> {
    let env = DemoEnv::start("demo_main").await?;
    let projector = env.projector("main").await?;
    let mut scenario = Scenario::new(&env.service_url, env.write.pool.clone(), ACCOUNTS);
    let rejected = run_phases(&mut scenario, &Phase::ALL).await?;
    assert!(
        rejected >= 10,
        "the scenario exercises the rules: {rejected}"
    );

    let c = env.wait_converged(CONVERGE).await?;
    assert_eq!(c.accounts, c.read_accounts);
    assert_eq!(
        c.events_written,
        env.outbox_rows().await?,
        "one event per accepted command"
    );
    assert_eq!(
        c.read_events_applied, c.events_written,
        "each event applied exactly once"
    );
    let active = account_service::store::list(&env.write.pool)
        .await?
        .iter()
        .filter(|a| a.status == account_service::domain::Status::Active)
        .count();
    let flags = legacy::load(&env.legacy.pool).await?;
    assert_eq!(flags.iter().filter(|(_, enabled)| *enabled).count(), active);

    // What is on the topic: exactly the outbox rows (nothing from rejected commands), each
    // account's sequence 1..=version, in order within its partition.
    let records = consume(
        &[&env.topic],
        c.events_written as usize,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await?;
    let ids: HashSet<Uuid> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(
        records.len() as i64,
        c.events_written,
        "no duplicates, nothing extra"
    );
    assert_eq!(ids.len() as i64, c.events_written);
    let mut seqs: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut sorted = records.clone();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in &sorted {
        let seq = r.header("outbox-aggregate-seq").expect("sequence header");
        seqs.entry(r.key.clone().expect("key"))
            .or_default()
            .push(seq.parse()?);
    }
    for (account, s) in &seqs {
        let expected: Vec<i64> = (1..=s.len() as i64).collect();
        assert_eq!(
            s, &expected,
            "account {account}: sequence in order, no gaps"
        );
    }
    let q = projector.query_stats.snapshot();
    assert_eq!(
        (q.duplicates, q.gaps, q.out_of_order, q.malformed),
        (0, 0, 0, 0),
        "{q:?}"
    );
    projector.stop().await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_restarted_mid_stream_catches_up_without_double_applying() -> Result<()> {
    let env = DemoEnv::start("demo_restart").await?;
    let projector = env.projector("restart").await?;
    let mut scenario = Scenario::new(&env.service_url, env.write.pool.clone(), ACCOUNTS);
    run_phases(&mut scenario, &[Phase::Open, Phase::Validate]).await?;
    // Stop it while events are still in flight: wait only until it has applied some.
    wait_stats(
        "first projector",
        || projector.query_stats.snapshot(),
        |s| s.applied >= 5,
    )
    .await?;
    let first_stats = projector.query_stats.clone();
    projector.stop().await?;
    let before_stop = first_stats.snapshot().applied;
    // Commands continue while the projector is down.
    run_phases(
        &mut scenario,
        &[Phase::ChangeEmail, Phase::Deactivate, Phase::Reactivate],
    )
    .await?;
    let projector = env.projector("restart").await?;
    run_phases(&mut scenario, &[Phase::Close, Phase::Reuse]).await?;
    let c = env.wait_converged(CONVERGE).await?;
    // Converged means: every account equal, and events_applied == version for every account —
    // a double-applied event would have bumped a counter past its version.
    for view in read_model::load(&env.query.pool).await? {
        assert_eq!(view.events_applied, view.version, "{view:?}");
    }
    let after = projector.query_stats.snapshot();
    assert_eq!(
        before_stop as i64 + after.applied as i64,
        c.events_written,
        "the two runs together applied each event once (first {before_stop}, second {after:?})"
    );
    projector.stop().await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_every_record_from_the_beginning_changes_nothing() -> Result<()> {
    let env = DemoEnv::start("demo_replay").await?;
    let projector = env.projector("replay").await?;
    let mut scenario = Scenario::new(&env.service_url, env.write.pool.clone(), ACCOUNTS);
    run_phases(&mut scenario, &Phase::ALL).await?;
    let c = env.wait_converged(CONVERGE).await?;
    projector.stop().await?;
    let read_before = read_model::load(&env.query.pool).await?;
    let legacy_before = legacy::load(&env.legacy.pool).await?;

    // New consumer groups = offsets reset to the beginning: every record is delivered again.
    let replay: Projector = env.projector("replay-again").await?;
    let total = c.events_written as u64;
    let q = wait_stats(
        "replayed query model",
        || replay.query_stats.snapshot(),
        |s| s.records() >= total,
    )
    .await?;
    let l = wait_stats(
        "replayed legacy list",
        || replay.legacy_stats.snapshot(),
        |s| s.records() >= total,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!((q.applied, q.duplicates), (0, total), "{q:?}");
    assert_eq!(l.applied, 0, "{l:?}");
    assert_eq!(l.duplicates + l.ignored, total, "{l:?}");
    assert_eq!(read_model::load(&env.query.pool).await?, read_before);
    assert_eq!(legacy::load(&env.legacy.pool).await?, legacy_before);
    assert!(env.compare().await?.converged());
    replay.stop().await?;
    env.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_on_the_topic_are_parked_and_the_projector_keeps_going() -> Result<()> {
    let env = DemoEnv::start("demo_garbage").await?;
    let projector = env.projector("garbage").await?;
    let mut scenario = Scenario::new(&env.service_url, env.write.pool.clone(), ACCOUNTS);
    run_phases(&mut scenario, &[Phase::Open]).await?;
    let victim = scenario.accounts()[0].id.to_string();

    // Garbage produced by someone else on the account topic, keyed like a real account.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", services().bootstrap)
        .create()?;
    producer
        .send(
            FutureRecord::to(&env.topic)
                .key(&victim)
                .payload("this is not an event"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    let id = Uuid::now_v7().to_string();
    producer
        .send(
            FutureRecord::to(&env.topic)
                .key(&victim)
                .payload(r#"{"account_id": "not-a-uuid", "version": 2}"#)
                .headers(
                    OwnedHeaders::new()
                        .insert(Header {
                            key: "id",
                            value: Some(&id),
                        })
                        .insert(Header {
                            key: "eventType",
                            value: Some("AccountActivated"),
                        }),
                ),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;

    run_phases(
        &mut scenario,
        &[
            Phase::Validate,
            Phase::ChangeEmail,
            Phase::Close,
            Phase::Reuse,
        ],
    )
    .await?;
    let c = env.wait_converged(CONVERGE).await?;
    assert_eq!(c.read_events_applied, c.events_written);
    let q = wait_stats(
        "query model",
        || projector.query_stats.snapshot(),
        |s| s.parked >= 2,
    )
    .await?;
    let l = wait_stats(
        "legacy list",
        || projector.legacy_stats.snapshot(),
        |s| s.parked >= 2,
    )
    .await?;
    assert_eq!((q.malformed, q.parked), (2, 2), "{q:?}");
    assert_eq!((l.malformed, l.parked), (2, 2), "{l:?}");
    let mut conn = env.query.pool.acquire().await?;
    let parked = projector.query_inbox.parked(&mut conn).await?;
    assert_eq!(parked.len(), 2);
    assert!(
        parked[0].reason.contains("no `id` header"),
        "{}",
        parked[0].reason
    );
    assert_eq!(parked[0].key.as_deref(), Some(victim.as_bytes()));
    assert_eq!(parked[1].event_id.map(|u| u.to_string()), Some(id));
    assert!(
        parked[1].reason.contains("does not match"),
        "{}",
        parked[1].reason
    );
    projector.stop().await?;
    env.stop().await
}

/// `account-demo --sink <sink>`: relay on that sink, projector processes reading back through the
/// matching client, stopped and restarted mid-scenario; the demo exits 0 only when the query model
/// and the legacy list equal the write model, each event applied exactly once.
async fn demo_on(sink: Sink) -> Result<()> {
    let run = run_account_demo(sink, &["--accounts", "16"], Duration::from_secs(240)).await?;
    let out = &run.output;
    assert_eq!(run.code, 0, "account-demo --sink {sink} failed:\n{out}");
    assert!(
        out.contains(&format!("[setup] sink {sink}")),
        "the relay was not set up for {sink}:\n{out}"
    );
    assert!(
        out.contains("[projector] stopped mid-stream") && out.contains("[projector] restarted"),
        "the projector was not restarted mid-stream:\n{out}"
    );
    assert!(
        out.contains("[verify] query model: identical to the write model")
            && out.contains("matches the write model")
            && out.contains("RESULT: read models == write model"),
        "{out}"
    );
    assert!(
        out.contains("; 0 records parked"),
        "every event applied in order, nothing parked:\n{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_kafka_converges() -> Result<()> {
    demo_on(Sink::Kafka).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_nats_converges() -> Result<()> {
    demo_on(Sink::Nats).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_rabbitmq_converges() -> Result<()> {
    demo_on(Sink::Rabbitmq).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_redis_converges() -> Result<()> {
    demo_on(Sink::Redis).await
}
