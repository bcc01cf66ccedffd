//! What only the RabbitMQ sink does, against the real broker (`AMQP_URL`): the AMQP properties
//! and headers a consumer sees, an unroutable message stopping the relay loudly until
//! `topics ensure --sink rabbitmq` binds a queue, and connections cut from under the relay
//! mid-run (through a loopback TCP relay that the test severs) without loss or inversion.

mod logical_common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::AMQPValue;
use lapin::{Connection, ConnectionProperties};
use logical_common::{LONG, QUIET, env_refs};
use outbox_core::WriteMode;
use outbox_tests::sinks::rabbitmq;
use outbox_tests::writers::Workload;
use outbox_tests::writers::{commit_events, padded_event};
use outbox_tests::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn relay_env() -> Vec<(&'static str, String)> {
    rabbitmq::relay_env()
}

/// The AMQP message a consumer receives carries the event: `message_id` = event id, persistent,
/// `type` = event type, the record's headers and the aggregate id as headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_carry_the_event_as_amqp_properties_and_headers() -> Result<()> {
    let db = TestDb::migrated("rmq_props").await?;
    let work = Workload::create(&db, "rmq_props", 1, 1).await?;
    rabbitmq::prepare(&work.topic).await?;
    let relay = RelayProcess::start(&db, &[], &env_refs(&relay_env())).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    // The workload rolls back one transaction in ten: write until one event is committed.
    while work.ledger().committed.is_empty() {
        work.write(WriteMode::Table, 1, 1).await?;
    }
    let ledger = work.ledger();
    let records = rabbitmq::consume(&work.topic, ledger.committed.len(), QUIET, LONG).await?;
    Verdict::check(&ledger, &records).assert_exactly_once(&ledger);

    let connection = Connection::connect(&rabbitmq::url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let message = channel
        .basic_get(work.topic.as_str().into(), BasicGetOptions::default())
        .await?
        .context("the queue is empty")?;
    let p = &message.delivery.properties;
    let headers = p.headers().clone().unwrap_or_default();
    let header = |name: &str| match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    };
    let id = header("id").context("no id header")?;
    assert_eq!(
        p.message_id().as_ref().map(|s| s.as_str()),
        Some(id.as_str())
    );
    assert_eq!(p.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        p.kind().as_ref().map(|s| s.to_string()),
        header("eventType"),
        "type = eventType"
    );
    assert_eq!(header("aggregateId"), records[0].key);
    assert!(work.accounts.contains(&header("aggregateId").unwrap()));
    assert_eq!(message.delivery.routing_key.as_str(), work.topic);
    assert_eq!(message.delivery.exchange.as_str(), rabbitmq::EXCHANGE);
    message
        .delivery
        .acker
        .ack(BasicAckOptions::default())
        .await?;
    connection.close(200, "done".into()).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    Ok(())
}

/// With no queue bound for the destination, the first message comes back unroutable: the
/// relay stops with the fix and acknowledges nothing; `topics ensure --sink rabbitmq` binds the
/// queue, and a restarted relay delivers every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unroutable_messages_stop_the_relay_until_a_queue_is_bound() -> Result<()> {
    let db = TestDb::migrated("rmq_noroute").await?;
    let work = Workload::create(&db, "rmq_noroute", 3, 1).await?;
    work.write(WriteMode::Table, 2, 10).await?;
    let relay = RelayProcess::start(&db, &[], &env_refs(&relay_env())).await?;
    let (code, log) = relay.wait_exit(LONG).await?;
    assert_ne!(code, 0, "the relay must stop:\n{log}");
    assert!(log.contains("NO_ROUTE"), "{log}");
    assert!(
        !log.contains(&"x".repeat(50)),
        "no payload in the log at info:\n{log}"
    );
    assert!(
        log.contains("outbox-relay topics ensure --sink rabbitmq"),
        "the fix is named:\n{log}"
    );
    let ledger = work.ledger();
    assert_eq!(
        unpublished(&db.pool).await?,
        ledger.committed.len() as i64,
        "nothing was acknowledged"
    );

    let env = relay_env();
    let out = relay_cli_on(&db, &["topics", "ensure"], &env_refs(&env)).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    assert!(out.stdout.contains(&work.topic), "{}", out.stdout);
    // Idempotent.
    let again = relay_cli_on(&db, &["topics", "ensure"], &env_refs(&env)).await?;
    assert_eq!(again.code, 0, "{}", again.text());

    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    let records = rabbitmq::consume(&work.topic, ledger.committed.len(), QUIET, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    Verdict::check(&ledger, &records).assert_exactly_once(&ledger);
    Ok(())
}

/// A loopback TCP relay to the broker whose connections the test can sever at once.
struct Severable {
    port: u16,
    cut: Arc<Mutex<CancellationToken>>,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
}

impl Severable {
    async fn start(upstream: String) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (c, s) = (cut.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = s.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                let token = c.lock().unwrap().clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                    // Dropped: both sockets close, as when a network path fails.
                });
            }
        });
        Ok(Self {
            port,
            cut,
            cuts: Arc::default(),
            stop,
        })
    }

    /// Closes every connection open through the relay now; new ones go through.
    fn sever(&self) {
        let mut token = self.cut.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
        self.cuts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Severable {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut.lock().unwrap().cancel();
    }
}

/// The relay's connection is cut three times while writers commit: it reconnects and resends
/// from the first unconfirmed event; nothing is lost or inverted, duplicates stay within the
/// window in flight and are told apart by their ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_cuts_mid_run_lose_nothing() -> Result<()> {
    let db = TestDb::migrated("rmq_cut").await?;
    let work = Workload::create(&db, "rmq_cut", 10, 1).await?;
    rabbitmq::prepare(&work.topic).await?;
    let broker = url::Url::parse(&rabbitmq::url())?;
    let upstream = format!(
        "{}:{}",
        broker.host_str().unwrap_or("127.0.0.1"),
        broker.port().unwrap_or(5672)
    );
    let proxy = Severable::start(upstream).await?;
    let mut through = broker.clone();
    through
        .set_port(Some(proxy.port))
        .map_err(|()| anyhow::anyhow!("cannot set the port"))?;
    let mut env = relay_env();
    env.retain(|(k, _)| *k != "OUTBOX_RABBITMQ__URL");
    env.push(("OUTBOX_RABBITMQ__URL", through.to_string()));
    env.push(("OUTBOX_BATCH_SIZE", "50".into()));
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let writers = work.spawn_writers(WriteMode::Table, 4, 150);
    for n in [100, 250, 400] {
        let deadline = Instant::now() + LONG;
        while work.ledger.lock().unwrap().committed.len() < n {
            ensure!(Instant::now() < deadline, "the writers stalled below {n}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy.sever();
    }
    writers.await??;
    let ledger = work.ledger();
    let records = rabbitmq::consume(&work.topic, ledger.committed.len(), QUIET, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    let v = Verdict::check(&ledger, &records);
    println!("RabbitMQ connection cuts: {v:?}");
    v.assert_safe();
    assert!(
        log.contains("delivery failed"),
        "the cuts were noticed (else the test proves nothing):\n{log}"
    );
    assert!(
        v.duplicates <= 3 * 3 * 50,
        "duplicates beyond the window each cut can repeat: {v:?}"
    );
    drop(proxy);
    Ok(())
}

/// The RabbitMQ node behind `AMQP_URL`, for `rabbitmqctl -n`: the machine's own server on the
/// standard port, or the private one `scripts/services.sh` started (`outbox<port>@localhost`).
fn node() -> Option<String> {
    let port = url::Url::parse(&rabbitmq::url())
        .ok()?
        .port()
        .unwrap_or(5672);
    if port == 5672 {
        return None;
    }
    Some(format!("outbox{port}@localhost"))
}

/// Runs `rabbitmqctl eval <expr>` on the test broker's node.
fn rabbitmqctl_eval(expr: &str) -> Result<String> {
    let mut cmd = std::process::Command::new("rabbitmqctl");
    if let Some(node) = node() {
        cmd.args(["-n", &node]);
    }
    let out = cmd
        .args(["-q", "eval", expr])
        .output()
        .context("running rabbitmqctl")?;
    ensure!(
        out.status.success(),
        "rabbitmqctl eval {expr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Lowers the broker's `max_message_size` while it lives; restores the previous value on drop.
struct BrokerMaxMessageSize(String);

impl BrokerMaxMessageSize {
    fn set(bytes: usize) -> Result<Self> {
        let before = rabbitmqctl_eval("application:get_env(rabbit, max_message_size).")?;
        let before = before
            .strip_prefix("{ok,")
            .and_then(|v| v.strip_suffix('}'))
            .unwrap_or("134217728")
            .to_owned();
        rabbitmqctl_eval(&format!(
            "application:set_env(rabbit, max_message_size, {bytes})."
        ))?;
        Ok(Self(before))
    }
}

impl Drop for BrokerMaxMessageSize {
    fn drop(&mut self) {
        let _ = rabbitmqctl_eval(&format!(
            "application:set_env(rabbit, max_message_size, {}).",
            self.0
        ));
    }
}

/// A body within the relay's `max_message_size` but above the broker's own: RabbitMQ closes
/// the channel (`PRECONDITION_FAILED`), the relay sends the suspects one at a time, parks the
/// record at fault and the one behind it, and every other record is delivered once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_the_broker_refuses_is_parked_while_the_others_flow() -> Result<()> {
    let db = TestDb::migrated("rmq_large").await?;
    let work = Workload::create(&db, "rmq_large", 1, 1).await?;
    rabbitmq::prepare(&work.topic).await?;
    let limit = BrokerMaxMessageSize::set(1024 * 1024)?;
    let t = work.aggregate_type.clone();
    // All in the table before the relay starts, so they share its first batch.
    let a1 = commit_events(&db, vec![padded_event(&t, "A", 1, 10)]).await?[0];
    let b1 = commit_events(&db, vec![padded_event(&t, "B", 1, 10)]).await?[0];
    let a2 = commit_events(&db, vec![padded_event(&t, "A", 2, 2 * 1024 * 1024)]).await?[0];
    let a3 = commit_events(&db, vec![padded_event(&t, "A", 3, 10)]).await?[0];
    let mut others = vec![b1];
    for seq in 2..=5 {
        others.extend(commit_events(&db, vec![padded_event(&t, "B", seq, 10)]).await?);
    }
    let relay = RelayProcess::start(&db, &[], &env_refs(&relay_env())).await?;
    let records = rabbitmq::consume(&work.topic, 6, QUIET, LONG).await?;
    let ids: Vec<Uuid> = records.iter().map(Consumed::event_id).collect();
    assert!(ids.contains(&a1), "{ids:?}");
    let b: Vec<usize> = others
        .iter()
        .map(|id| {
            ids.iter()
                .position(|x| x == id)
                .context("a B event is missing")
        })
        .collect::<Result<_>>()?;
    assert!(b.windows(2).all(|w| w[0] < w[1]), "B in order: {ids:?}");
    assert!(
        !ids.contains(&a2) && !ids.contains(&a3),
        "the refused event and the one behind it are not published: {ids:?}"
    );
    let deadline = Instant::now() + LONG;
    let parked = loop {
        let out = relay_cli_on(&db, &["parked", "list", "--json"], &[]).await?;
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
        "{}",
        relay.log()
    );
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    drop(limit);
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("PRECONDITION_FAILED") || log.contains("message size"),
        "the broker refused it (not the relay's own limit):\n{log}"
    );
    Ok(())
}

/// Wrong credentials: the relay does not start, says why, and never shows the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_credentials_stop_the_start_without_showing_them() -> Result<()> {
    let db = TestDb::migrated("rmq_auth").await?;
    let mut broker = url::Url::parse(&rabbitmq::url())?;
    broker
        .set_password(Some("n0t-the-pa55word"))
        .map_err(|()| anyhow::anyhow!("cannot set the password"))?;
    let mut env = relay_env();
    env.retain(|(k, _)| *k != "OUTBOX_RABBITMQ__URL");
    env.push(("OUTBOX_RABBITMQ__URL", broker.to_string()));
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    let (code, log) = relay.wait_exit(LONG).await?;
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("RabbitMQ"), "{log}");
    assert!(
        log.contains("fix the user and password in rabbitmq.url"),
        "{log}"
    );
    assert!(!log.contains("n0t-the-pa55word"), "{log}");
    Ok(())
}

/// `/readyz` follows RabbitMQ while the relay is idle: ready while the broker answers, not ready
/// (naming RabbitMQ) once the path to it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_the_broker_while_idle() -> Result<()> {
    let db = TestDb::migrated("rmq_ready").await?;
    let broker = url::Url::parse(&rabbitmq::url())?;
    let upstream = format!(
        "{}:{}",
        broker.host_str().unwrap_or("127.0.0.1"),
        broker.port().unwrap_or(5672)
    );
    let proxy = Severable::start(upstream).await?;
    let mut through = broker.clone();
    through
        .set_port(Some(proxy.port))
        .map_err(|()| anyhow::anyhow!("cannot set the port"))?;
    let mut env = relay_env();
    env.retain(|(k, _)| *k != "OUTBOX_RABBITMQ__URL");
    env.push(("OUTBOX_RABBITMQ__URL", through.to_string()));
    env.push(("OUTBOX_ADMIN_ADDR", "127.0.0.1:0".into()));
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let addr = admin_addr(&relay.log()).context("no admin address in the log")?;
    assert_eq!(wait_for_status(&addr, "/readyz", 200, LONG).await?, 200);
    // No new connection can be made, and the open ones are cut.
    drop(proxy);
    assert_eq!(
        wait_for_status(&addr, "/readyz", 503, LONG).await?,
        503,
        "{}",
        relay.log()
    );
    let (_, body) = http_get(&addr, "/readyz").await?;
    assert!(body.contains("RabbitMQ"), "{body}");
    relay.wait_for_log("RabbitMQ does not answer", LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    Ok(())
}
