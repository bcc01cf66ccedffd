//! What only the NATS JetStream sink has to prove, through a real relay process and a real
//! `nats-server`: a destination no stream captures stops the relay with the operator's fix and
//! `topics ensure --sink nats` is that fix; the stream's own `max_msg_size` parks an event per
//! aggregate; and the server SIGKILLed and restarted mid-run (a private server on a free port)
//! loses nothing and inverts nothing, its duplicates dropped by `Nats-Msg-Id`; and a server that
//! speaks only TLS and admits one user by password gets every event, while a wrong CA or password
//! stops the relay with the reason and never shows the password.

mod logical_common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use logical_common::{LONG, QUIET, env_refs};
use outbox_core::WriteMode;
use outbox_tests::certs;
use outbox_tests::sinks::nats;
use outbox_tests::writers::Workload;
use outbox_tests::writers::{commit_events, padded_event};
use outbox_tests::*;
use uuid::Uuid;

/// A workload whose destination exists only on NATS (no Kafka topic is made for it).
async fn workload(db: &TestDb, prefix: &str, accounts: usize) -> Result<Workload> {
    let accounts = outbox_tests::writers::create_accounts(&db.pool, accounts).await?;
    let aggregate_type = unique(prefix);
    Ok(Workload {
        pool: db.pool.clone(),
        topic: format!("outbox.event.{aggregate_type}"),
        aggregate_type,
        accounts,
        ledger: Default::default(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_stream_stops_the_relay_and_topics_ensure_fixes_it() -> Result<()> {
    let db = TestDb::migrated("nats_nostream").await?;
    // A subject space of its own, so no stream on the shared server captures it yet.
    let prefix = unique("ntest");
    let stream = unique("NTEST");
    let work = workload(&db, "nats_nostream", 3).await?;
    let subject = format!("{prefix}.{}", work.aggregate_type);
    let mut env = nats::relay_env();
    env.extend([
        ("OUTBOX_TOPIC", format!("{prefix}.{{aggregatetype}}")),
        ("OUTBOX_NATS__STREAM__NAME", stream.clone()),
        ("OUTBOX_NATS__STREAM__SUBJECTS", format!("{prefix}.>")),
    ]);
    work.write(WriteMode::Table, 1, 5).await?;
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    let (code, log) = relay.wait_exit(LONG).await?;
    assert_ne!(code, 0, "the relay stops on a missing stream:\n{log}");
    assert!(
        log.contains("NO_STREAM") && log.contains("outbox-relay topics ensure --sink nats"),
        "the stop names the fault and the fix:\n{log}"
    );

    let out = relay_cli_on(&db, &["topics", "ensure"], &env_refs(&env)).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    assert!(
        out.stdout.contains(&format!("created  stream {stream}")),
        "{}",
        out.text()
    );
    assert!(
        out.stdout.contains(&format!("captured {subject}")),
        "{}",
        out.text()
    );
    let again = relay_cli_on(&db, &["topics", "ensure"], &env_refs(&env)).await?;
    assert!(
        again.stdout.contains(&format!("exists   stream {stream}")),
        "{}",
        again.text()
    );

    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    let ledger = work.ledger();
    let records = nats::consume(&subject, ledger.committed.len(), QUIET, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    let v = Verdict::check(&ledger, &records);
    println!("NATS after topics ensure: {v:?}");
    v.assert_exactly_once(&ledger);
    for r in &records {
        assert!(
            r.key.as_deref().is_some_and(|k| k.starts_with("acct-")),
            "{r:?}"
        );
        assert_eq!(r.headers.get("Nats-Msg-Id"), r.headers.get("id"), "{r:?}");
        assert_eq!(
            r.headers.get("eventType").map(String::as_str),
            Some("BalanceChanged")
        );
    }
    nats::jetstream().await?.delete_stream(&stream).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_streams_size_limit_parks_the_event_per_aggregate() -> Result<()> {
    let db = TestDb::migrated("nats_limit").await?;
    let work = workload(&db, "nats_limit", 1).await?;
    nats::prepare_limited(&work.topic, Some(20_000)).await?;
    let relay = RelayProcess::start(&db, &[], &env_refs(&nats::relay_env())).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let t = work.aggregate_type.clone();
    let a1 = commit_events(&db, vec![padded_event(&t, "A", 1, 10)]).await?[0];
    let a2 = commit_events(&db, vec![padded_event(&t, "A", 2, 30_000)]).await?[0];
    let a3 = commit_events(&db, vec![padded_event(&t, "A", 3, 10)]).await?[0];
    let mut others = Vec::new();
    for seq in 1..=4 {
        others.extend(commit_events(&db, vec![padded_event(&t, "B", seq, 10)]).await?);
    }
    let records = nats::consume(&work.topic, 5, QUIET, LONG).await?;
    let ids: Vec<Uuid> = records.iter().map(Consumed::event_id).collect();
    assert!(ids.contains(&a1), "{ids:?}");
    for id in &others {
        assert!(ids.contains(id), "other aggregates keep flowing: {ids:?}");
    }
    assert!(!ids.contains(&a2) && !ids.contains(&a3), "{ids:?}");
    let deadline = Instant::now() + LONG;
    let parked = loop {
        let out = relay_cli_on(&db, &["parked", "list", "--json"], &[]).await?;
        let parked: Vec<serde_json::Value> = serde_json::from_str(&out.stdout)?;
        if parked.len() >= 2 || Instant::now() > deadline {
            break parked;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let parked_ids: Vec<&str> = parked.iter().filter_map(|p| p["id"].as_str()).collect();
    assert_eq!(parked_ids, [a2.to_string(), a3.to_string()]);
    let reason = parked[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("max_msg_size"), "{reason}");
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    Ok(())
}

/// A private `nats-server` with JetStream on a free loopback port.
struct PrivateServer {
    port: u16,
    dir: std::path::PathBuf,
    config: Option<std::path::PathBuf>,
    child: Option<tokio::process::Child>,
}

impl PrivateServer {
    async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// A server that also reads the configuration file `config` (TLS, authorization, …).
    async fn start_with(config: Option<std::path::PathBuf>) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(unique("nats-store"));
        std::fs::create_dir_all(&dir)?;
        let mut server = Self {
            port,
            dir,
            config,
            child: None,
        };
        server.run().await?;
        Ok(server)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn run(&mut self) -> Result<()> {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let mut command = tokio::process::Command::new(&bin);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin} (set NATS_SERVER_BIN)"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            ensure!(Instant::now() < deadline, "nats-server did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_killed_and_restarted_mid_run_loses_and_inverts_nothing() -> Result<()> {
    let mut server = PrivateServer::start().await?;
    let db = TestDb::migrated("nats_restart").await?;
    let work = workload(&db, "nats_restart", 10).await?;
    nats::prepare_at(&server.url(), &work.topic, None).await?;
    let env = vec![
        ("OUTBOX_SINK", "nats".to_owned()),
        ("OUTBOX_NATS_URL", server.url()),
        ("OUTBOX_NATS__DELIVERY_TIMEOUT", "3s".to_owned()),
        ("OUTBOX_NATS__CONNECT_TIMEOUT", "1s".to_owned()),
        ("OUTBOX_BATCH_SIZE", "50".to_owned()),
    ];
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let writers = work.spawn_writers(WriteMode::Table, 4, 150);
    let deadline = Instant::now() + LONG;
    while work.ledger.lock().unwrap().committed.len() < 150 {
        ensure!(Instant::now() < deadline, "the writers stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.run().await?;
    writers.await??;
    let ledger = work.ledger();
    let records = nats::consume_at(
        &server.url(),
        &work.topic,
        ledger.committed.len(),
        QUIET,
        LONG,
    )
    .await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("delivery failed") || log.contains("NATS connection lost"),
        "the outage was noticed:\n{log}"
    );
    let v = Verdict::check(&ledger, &records);
    println!("NATS server SIGKILLed and restarted: {v:?}");
    v.assert_safe();
    assert!(
        v.duplicates <= 3 * 50,
        "duplicates beyond the window in flight: {v:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_is_dropped_by_the_streams_duplicate_window() -> Result<()> {
    let db = TestDb::migrated("nats_dedupe").await?;
    let work = workload(&db, "nats_dedupe", 4).await?;
    nats::prepare(&work.topic).await?;
    let env = nats::relay_env();
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    work.write(WriteMode::Table, 2, 10).await?;
    let ledger = work.ledger();
    let first = nats::consume(&work.topic, ledger.committed.len(), QUIET, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    Verdict::check(&ledger, &first).assert_exactly_once(&ledger);

    // Every event again, with its original id: the stream acknowledges each as a duplicate.
    let out = relay_cli_on(
        &db,
        &["replay", "--aggregate-type", &work.aggregate_type],
        &env_refs(&env),
    )
    .await?;
    assert_eq!(out.code, 0, "{}", out.text());
    assert!(
        out.stdout
            .contains(&format!("replayed {} events", ledger.committed.len())),
        "{}",
        out.text()
    );
    let after = nats::consume(&work.topic, ledger.committed.len(), QUIET, LONG).await?;
    let v = Verdict::check(&ledger, &after);
    println!("NATS replay of every event: {v:?}");
    v.assert_exactly_once(&ledger);
    assert_eq!(
        after.iter().map(|r| r.offset).collect::<Vec<_>>(),
        first.iter().map(|r| r.offset).collect::<Vec<_>>(),
        "no new stream sequence"
    );
    Ok(())
}

/// A TCP proxy on a free loopback port in front of `upstream` whose connections can be cut (both
/// sockets closed at once, as a server closing the connection would).
struct CuttableProxy {
    port: u16,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    async fn start(upstream: String) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cut, watch) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let mut watch = watch.clone();
                watch.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.changed() => {}
                    }
                });
            }
        });
        Ok(Self { port, cut, task })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Closes every connection open now.
    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_cut_mid_run_lose_and_invert_nothing() -> Result<()> {
    let upstream = nats::url()
        .trim_start_matches("nats://")
        .trim_end_matches('/')
        .to_owned();
    let proxy = CuttableProxy::start(upstream).await?;
    let db = TestDb::migrated("nats_cut").await?;
    let work = workload(&db, "nats_cut", 10).await?;
    nats::prepare(&work.topic).await?;
    let env = vec![
        ("OUTBOX_SINK", "nats".to_owned()),
        ("OUTBOX_NATS_URL", proxy.url()),
        ("OUTBOX_NATS__DELIVERY_TIMEOUT", "20s".to_owned()),
        ("OUTBOX_BATCH_SIZE", "50".to_owned()),
    ];
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let writers = work.spawn_writers(WriteMode::Table, 4, 150);
    let started = Instant::now();
    for at in [100, 250, 400] {
        while work.ledger.lock().unwrap().committed.len() < at {
            ensure!(started.elapsed() < LONG, "the writers stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        proxy.cut();
    }
    writers.await??;
    let ledger = work.ledger();
    let records = nats::consume(&work.topic, ledger.committed.len(), QUIET, LONG).await?;
    let took = started.elapsed();
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("NATS connection lost"),
        "the cuts were noticed:\n{log}"
    );
    let v = Verdict::check(&ledger, &records);
    println!("NATS connections cut three times: {v:?} in {took:?}");
    if v.inversions > 0 {
        // Which records overtook which, for the failure message's reader.
        let mut high: std::collections::HashMap<String, (i64, i64, String)> = Default::default();
        for r in &records {
            let seq: i64 = r.headers["outbox-aggregate-seq"].parse().unwrap();
            let key = r.key.clone().unwrap();
            if let Some((h, off, id)) = high.get(&key).cloned()
                && seq < h
            {
                println!(
                    "INVERSION key={key} seq={seq} id={} offset={} after seq={h} offset={off} id={id}",
                    r.headers["id"], r.offset
                );
            }
            let e = high.entry(key).or_insert((i64::MIN, 0, String::new()));
            if seq > e.0 {
                *e = (seq, r.offset, r.headers["id"].clone());
            }
        }
    }
    v.assert_safe();
    assert!(v.duplicates <= 3 * 3 * 50, "{v:?}");
    // A lost connection fails the window at once, not at the 20 s delivery timeout.
    assert!(
        took < Duration::from_secs(20),
        "recovery waited for the timeout: {took:?}\n{log}"
    );
    Ok(())
}

/// A private server that speaks only TLS (a certificate for 127.0.0.1 from a private CA) and
/// admits one user by password.
struct TlsServer {
    server: PrivateServer,
    pki: std::path::PathBuf,
    password: String,
}

impl TlsServer {
    async fn start() -> Result<Self> {
        let pki = std::env::temp_dir().join(unique("nats-tls"));
        std::fs::create_dir_all(&pki)?;
        certs::make_ca(&pki, "nats")?;
        certs::make_ca(&pki, "other")?;
        certs::make_cert(
            &pki,
            "nats",
            "server",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )?;
        let password = format!("pw-{}", Uuid::new_v4().simple());
        let config = pki.join("server.conf");
        std::fs::write(
            &config,
            format!(
                "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n\
                 authorization {{\n  user: outbox\n  password: \"{password}\"\n}}\n",
                pki.join("server.crt").display(),
                pki.join("server.key").display()
            ),
        )?;
        let server = PrivateServer::start_with(Some(config)).await?;
        Ok(Self {
            server,
            pki,
            password,
        })
    }

    fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.server.port)
    }

    fn ca(&self, name: &str) -> String {
        self.pki
            .join(format!("{name}-ca.crt"))
            .display()
            .to_string()
    }

    /// The relay's settings for this server, trusting `ca`'s certificates, with `password`.
    fn relay_env(&self, ca: &str, password: &str) -> Vec<(&'static str, String)> {
        vec![
            ("OUTBOX_SINK", "nats".to_owned()),
            ("OUTBOX_NATS_URL", self.url()),
            ("OUTBOX_NATS__USER", "outbox".to_owned()),
            ("OUTBOX_NATS__PASSWORD", password.to_owned()),
            ("OUTBOX_NATS__CA_PATH", self.ca(ca)),
            ("OUTBOX_NATS__CONNECT_TIMEOUT", "5s".to_owned()),
        ]
    }

    /// The test's own JetStream client: TLS with the right CA, the right password.
    async fn jetstream(&self) -> Result<async_nats::jetstream::Context> {
        // The client's rustls needs a process-wide provider (more than one is compiled in).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = async_nats::ConnectOptions::with_user_and_password(
            "outbox".to_owned(),
            self.password.clone(),
        )
        .add_root_certificates(self.ca("nats").into())
        .require_tls(true)
        .connect(self.url())
        .await
        .context("connecting the test's client over TLS")?;
        Ok(async_nats::jetstream::new(client))
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pki);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_and_a_password_carry_every_event_and_a_wrong_ca_or_password_stop_the_relay()
-> Result<()> {
    let server = TlsServer::start().await?;
    let db = TestDb::migrated("nats_tls").await?;
    let work = workload(&db, "nats_tls", 3).await?;
    let password = server.password.clone();

    // A certificate from another CA: refused at start, with the reason.
    let env = server.relay_env("other", &password);
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    let (code, log) = relay.wait_exit(LONG).await?;
    assert_ne!(
        code, 0,
        "a server certificate of an unknown CA stops the relay:\n{log}"
    );
    assert!(
        log.to_lowercase().contains("certificate") || log.contains("TLS"),
        "the stop names the TLS failure:\n{log}"
    );

    // The wrong password: refused at start, the password never shown (neither one).
    let wrong = format!("wrong-{}", Uuid::new_v4().simple());
    let env = server.relay_env("nats", &wrong);
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    let (code, log) = relay.wait_exit(LONG).await?;
    assert_ne!(code, 0, "a wrong password stops the relay:\n{log}");
    assert!(
        log.to_lowercase().contains("authori") || log.to_lowercase().contains("authenticat"),
        "the stop names the authentication failure:\n{log}"
    );
    assert!(!log.contains(&wrong) && !log.contains(&password), "{log}");

    // The right CA and password: `topics ensure` makes the stream over TLS, and every event is
    // delivered exactly once.
    let env = server.relay_env("nats", &password);
    let out = relay_cli_on(&db, &["topics", "ensure"], &env_refs(&env)).await?;
    assert_eq!(out.code, 0, "{}", out.text());
    work.write(WriteMode::Table, 3, 10).await?;
    let relay = RelayProcess::start(&db, &[], &env_refs(&env)).await?;
    let ledger = work.ledger();
    let js = server.jetstream().await?;
    let records = nats::consume_from(&js, &work.topic, ledger.committed.len(), QUIET, LONG).await?;
    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains(&password), "{log}");
    let v = Verdict::check(&ledger, &records);
    println!("NATS over TLS with a password: {v:?}");
    v.assert_exactly_once(&ledger);
    Ok(())
}
