//! The `sinks` section (issue 14): for each sink — Kafka, NATS JetStream, RabbitMQ, Redis
//! Streams — in one run, (a) the raw client's ceiling: the same number of relay-shaped records
//! published with that broker's own client and the durability the sink waits for, (b) the
//! relay's backlog drain through the sink and its ratio to that ceiling, (c) commit → consumer
//! latency at a fixed rate, read back with the broker's client.
//!
//! | sink | ceiling: what is published and awaited | read back by |
//! |---|---|---|
//! | kafka | [`crate::kafka::producer_ceiling`] (the relay's producer settings; its start-up not counted) | a consumer per partition |
//! | nats | JetStream publishes with `Nats-Msg-Id`, up to [`WINDOW`] acknowledgements outstanding | an ordered consumer |
//! | rabbitmq | persistent, `mandatory` publishes on a confirm-mode channel, up to [`WINDOW`] confirms outstanding, routed to a durable queue | `basic.consume` (auto-ack) on that queue |
//! | redis | `XADD` in pipelines of 1000 (the relay's batch), up to 4 pipelines outstanding | `XREAD BLOCK` |
//!
//! Every destination (topic, subject + stream, exchange + queue, stream key) is the section's own,
//! named uniquely, and deleted afterwards with the relay's Redis dedupe keys. A broker that does
//! not answer is skipped with the reason; it fails nothing.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation, ExchangeKind};
use outbox_core::WriteMode;
use outbox_relay::sink::redis::APPEND_SCRIPT;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::Producer;

use crate::db::{AGGREGATES, EVENT_TYPES, payload_json, unique};
use crate::kafka::{LatencyConsumer, Seen, create_topic, producer_ceiling};
use crate::report::SinkRun;
use crate::sections::{Ctx, drain_into, latency_through, reader_limit};
use crate::services::BrokerUrls;

/// Publishes (NATS) or confirms (RabbitMQ) a ceiling keeps outstanding: the relay's in-flight
/// window (`batch_size` 1000 × up to 3 batches in flight, plus the one being enqueued).
pub const WINDOW: usize = 4000;

/// Records per Redis pipeline in the ceiling (the relay's batch).
const REDIS_PIPELINE: usize = 1000;

/// Redis pipelines the ceiling keeps outstanding.
const REDIS_PIPELINES_IN_FLIGHT: usize = 4;

/// How long a broker may take to answer the section's first connection before it is skipped.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A sink of the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sink {
    /// The default: a Kafka-protocol broker.
    Kafka,
    /// NATS JetStream.
    Nats,
    /// RabbitMQ, AMQP 0-9-1.
    Rabbitmq,
    /// Redis Streams.
    Redis,
}

impl Sink {
    /// Every sink, in the order the section runs them.
    pub const ALL: [Sink; 4] = [Sink::Kafka, Sink::Nats, Sink::Rabbitmq, Sink::Redis];

    /// `OUTBOX_SINK`'s value.
    pub fn name(self) -> &'static str {
        match self {
            Sink::Kafka => "kafka",
            Sink::Nats => "nats",
            Sink::Rabbitmq => "rabbitmq",
            Sink::Redis => "redis",
        }
    }
}

/// What the section measures, per sink.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Records of the ceiling and backlog of the drain.
    pub events: u64,
    /// Sources drained (the first is the one the ratio uses).
    pub sources: Vec<&'static str>,
    /// The sinks measured (all when empty).
    pub sinks: Vec<Sink>,
    /// Arrival rate of the latency run, events/s.
    pub rate: u64,
    /// Warm-up of the latency run (not measured).
    pub warmup: Duration,
    /// Measured part of the latency run.
    pub duration: Duration,
}

/// Runs the section for every sink; the runs, and the failures of sinks whose broker answered
/// (a broker that does not answer is a skipped run, not a failure).
pub async fn run(ctx: &mut Ctx, plan: &Plan) -> (Vec<SinkRun>, Vec<(String, anyhow::Error)>) {
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    for sink in Sink::ALL {
        if !plan.sinks.is_empty() && !plan.sinks.contains(&sink) {
            continue;
        }
        let mut run = SinkRun {
            sink: sink.name().to_owned(),
            events: plan.events,
            ..SinkRun::default()
        };
        let broker = Broker::new(sink, &ctx.bootstrap, &ctx.brokers);
        if let Err(e) = broker.probe().await {
            let reason = format!("{e:#}");
            eprintln!(
                "bench: sinks: {} skipped: {} does not answer: {reason}",
                sink.name(),
                broker.shown()
            );
            run.skipped = Some(format!("{} does not answer: {reason}", broker.shown()));
            runs.push(run);
            continue;
        }
        run.broker = broker.describe().await;
        let mut created = Vec::new();
        let outcome = measure(ctx, plan, &broker, &mut run, &mut created).await;
        for d in created.iter().rev() {
            if let Err(e) = broker.remove(d).await {
                eprintln!(
                    "bench: warning: sinks: could not delete {} on {}: {e:#}",
                    d.name,
                    sink.name()
                );
            }
        }
        if let Err(e) = outcome {
            eprintln!("bench: sinks: {} FAILED: {e:#}", sink.name());
            run.error = Some(format!("{e:#}"));
            failures.push((format!("sinks ({})", sink.name()), e));
        }
        runs.push(run);
    }
    (runs, failures)
}

/// The three measurements of one sink, filling `run` as they complete; every destination made
/// is pushed on `created` first, so it is deleted even after a failure.
async fn measure(
    ctx: &mut Ctx,
    plan: &Plan,
    broker: &Broker,
    run: &mut SinkRun,
    created: &mut Vec<Destination>,
) -> Result<()> {
    let sink = broker.sink;
    let n = plan.events;
    let label = format!("{}: ", sink.name());

    eprintln!(
        "bench: sinks: {} raw client ceiling, {n} records",
        sink.name()
    );
    let dest = Destination::new(sink, "ceiling");
    created.push(dest.clone());
    broker.prepare(&dest).await?;
    let elapsed = broker.ceiling(&dest, n).await?;
    run.ceiling_events_per_sec = Some(n as f64 / elapsed.as_secs_f64().max(1e-9));
    run.ceiling_seconds = Some(elapsed.as_secs_f64());
    eprintln!(
        "bench: sinks: {} ceiling {:.0} records/s ({:.2} s)",
        sink.name(),
        n as f64 / elapsed.as_secs_f64().max(1e-9),
        elapsed.as_secs_f64()
    );
    broker.remove(&dest).await?;
    created.pop();

    if sink == Sink::Redis {
        // Diagnostics: the sink's own append script instead of a plain XADD, with the ceiling's
        // pipelining and with one pipeline at a time (as the sink sends its batches).
        for (name, in_flight) in [
            ("append_script", REDIS_PIPELINES_IN_FLIGHT),
            ("append_script_one_pipeline", 1),
        ] {
            let dest = Destination::new(sink, name);
            created.push(dest.clone());
            let elapsed = broker.redis_ceiling(&dest, n, true, in_flight).await?;
            let rate = n as f64 / elapsed.as_secs_f64().max(1e-9);
            eprintln!("bench: sinks: redis ceiling, {name}: {rate:.0} records/s");
            run.ceiling_diagnostics.insert(name.to_owned(), rate);
            broker.remove(&dest).await?;
            created.pop();
        }
    }

    if sink == Sink::Rabbitmq {
        // Diagnostic: what persisting costs the broker (the sink always publishes persistent).
        let dest = Destination::new(sink, "transient");
        created.push(dest.clone());
        broker.prepare(&dest).await?;
        let elapsed = broker.rabbitmq_ceiling(&dest, n, false).await?;
        let rate = n as f64 / elapsed.as_secs_f64().max(1e-9);
        eprintln!("bench: sinks: rabbitmq ceiling, transient: {rate:.0} records/s");
        run.ceiling_diagnostics.insert("transient".to_owned(), rate);
        broker.remove(&dest).await?;
        created.pop();
    }

    for &source in &plan.sources {
        let dest = Destination::new(sink, &format!("drain_{source}"));
        created.push(dest.clone());
        broker.prepare(&dest).await?;
        let d = drain_into(
            ctx,
            source,
            WriteMode::Table,
            n,
            &dest.name,
            &broker.relay_env(&dest),
            &label,
        )
        .await?;
        run.drain_runs.push(d);
        broker.remove(&dest).await?;
        created.pop();
    }

    let dest = Destination::new(sink, "latency");
    created.push(dest.clone());
    broker.prepare(&dest).await?;
    let limit = reader_limit(plan.rate, plan.warmup, plan.duration);
    let reader = broker.reader(&dest, limit);
    let l = latency_through(
        ctx,
        plan.sources.first().copied().unwrap_or("polling"),
        plan.rate,
        plan.warmup,
        plan.duration,
        &dest.name,
        &broker.relay_env(&dest),
        &label,
        reader,
    )
    .await?;
    run.latency = Some(l);
    broker.remove(&dest).await?;
    created.pop();
    Ok(())
}

/// One destination of the section: the name the relay publishes to (topic, subject, routing key,
/// stream key), and for Redis the prefix of the relay's dedupe keys.
#[derive(Debug, Clone)]
struct Destination {
    /// Topic / subject / routing key and queue / stream key; also the NATS stream's name and
    /// the RabbitMQ exchange's suffix.
    name: String,
    /// `redis.dedupe_prefix` of the relay runs into it.
    dedupe_prefix: String,
}

impl Destination {
    fn new(sink: Sink, phase: &str) -> Self {
        Self {
            name: unique(&format!("bench_sinks_{}_{phase}", sink.name())),
            dedupe_prefix: unique("bench_sinks_dedupe"),
        }
    }

    /// The RabbitMQ exchange the relay publishes this destination's records to.
    fn exchange(&self) -> String {
        format!("{}_x", self.name)
    }
}

/// A sink's broker and how the section talks to it.
struct Broker {
    sink: Sink,
    bootstrap: String,
    urls: BrokerUrls,
}

impl Broker {
    fn new(sink: Sink, bootstrap: &str, urls: &BrokerUrls) -> Self {
        Self {
            sink,
            bootstrap: bootstrap.to_owned(),
            urls: urls.clone(),
        }
    }

    /// The broker's address for messages (credentials hidden).
    fn shown(&self) -> String {
        let url = match self.sink {
            Sink::Kafka => return format!("Kafka at {}", self.bootstrap),
            Sink::Nats => &self.urls.nats,
            Sink::Rabbitmq => &self.urls.amqp,
            Sink::Redis => &self.urls.redis,
        };
        outbox_relay::config::redact_url(url)
    }

    /// Fails unless the broker answers within [`PROBE_TIMEOUT`].
    async fn probe(&self) -> Result<()> {
        let check = async {
            match self.sink {
                Sink::Kafka => {
                    let bootstrap = self.bootstrap.clone();
                    tokio::task::spawn_blocking(move || {
                        let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
                            .set("bootstrap.servers", &bootstrap)
                            .create()?;
                        producer.client().fetch_metadata(None, PROBE_TIMEOUT)?;
                        anyhow::Ok(())
                    })
                    .await??;
                }
                Sink::Nats => {
                    // The raw API (as the relay's start-up check): the client's typed answer
                    // does not parse every server version's.
                    let client = self.nats().await?;
                    let reply = client
                        .request("$JS.API.INFO", "".into())
                        .await
                        .context("JetStream ($JS.API.INFO)")?;
                    let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
                        .context("an unreadable JetStream answer")?;
                    if let Some(error) = answer.get("error") {
                        bail!("JetStream refused: {error}");
                    }
                }
                Sink::Rabbitmq => {
                    let c = self.amqp().await?;
                    let _ = c.close(200, "probe".into()).await;
                }
                Sink::Redis => {
                    let mut c = self.redis().await?;
                    let _: String = redis::cmd("PING").query_async(&mut c).await?;
                }
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(PROBE_TIMEOUT, check)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {PROBE_TIMEOUT:?}"))?
    }

    /// What the report says about the broker's durability settings (Redis: `appendonly` and
    /// `appendfsync`, which decide what its reply means).
    async fn describe(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if self.sink == Sink::Redis
            && let Ok(mut c) = self.redis().await
        {
            for setting in ["appendonly", "appendfsync"] {
                let v: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(setting)
                    .query_async(&mut c)
                    .await;
                if let Ok(v) = v
                    && let Some(value) = v.get(1)
                {
                    out.insert(setting.to_owned(), value.clone());
                }
            }
        }
        out
    }

    /// `OUTBOX_SINK` and the settings the relay needs for `dest`.
    fn relay_env(&self, dest: &Destination) -> Vec<(String, String)> {
        let pairs: Vec<(&str, String)> = match self.sink {
            Sink::Kafka => vec![("OUTBOX_SINK", "kafka".into())],
            Sink::Nats => vec![
                ("OUTBOX_SINK", "nats".into()),
                ("OUTBOX_NATS_URL", self.urls.nats.clone()),
            ],
            Sink::Rabbitmq => vec![
                ("OUTBOX_SINK", "rabbitmq".into()),
                ("OUTBOX_RABBITMQ__URL", self.urls.amqp.clone()),
                ("OUTBOX_RABBITMQ__EXCHANGE", dest.exchange()),
            ],
            Sink::Redis => vec![
                ("OUTBOX_SINK", "redis".into()),
                ("OUTBOX_REDIS_URL", self.urls.redis.clone()),
                ("OUTBOX_REDIS__DEDUPE_PREFIX", dest.dedupe_prefix.clone()),
            ],
        };
        pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    async fn nats(&self) -> Result<async_nats::Client> {
        async_nats::ConnectOptions::new()
            .name("outbox-bench")
            .connection_timeout(PROBE_TIMEOUT)
            .connect(self.urls.nats.as_str())
            .await
            .with_context(|| format!("connecting to {}", self.shown()))
    }

    async fn jetstream(&self) -> Result<jetstream::Context> {
        Ok(jetstream::new(self.nats().await?))
    }

    async fn amqp(&self) -> Result<lapin::Connection> {
        lapin::Connection::connect(&self.urls.amqp, lapin::ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to {}", self.shown()))
    }

    async fn redis(&self) -> Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.urls.redis.as_str())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(PROBE_TIMEOUT))
            .set_response_timeout(Some(Duration::from_secs(30)));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .with_context(|| format!("connecting to {}", self.shown()))
    }

    /// Creates what the relay needs to publish to `dest`: the Kafka topic, a JetStream stream
    /// capturing the subject (file storage, 2 minutes of duplicate window: `topics ensure`'s
    /// defaults), the exchange (durable, topic: as the relay declares it) with a durable queue
    /// bound for the routing key. Redis needs nothing.
    async fn prepare(&self, dest: &Destination) -> Result<()> {
        match self.sink {
            Sink::Kafka => create_topic(&self.bootstrap, &dest.name).await,
            Sink::Nats => {
                let js = self.jetstream().await?;
                js.create_stream(stream::Config {
                    name: dest.name.clone(),
                    subjects: vec![dest.name.clone()],
                    storage: stream::StorageType::File,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating stream {}", dest.name))?;
                Ok(())
            }
            Sink::Rabbitmq => {
                let connection = self.amqp().await?;
                let channel = connection.create_channel().await?;
                channel
                    .exchange_declare(
                        dest.exchange().as_str().into(),
                        ExchangeKind::Topic,
                        ExchangeDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                let mut arguments = FieldTable::default();
                // Gone by itself 30 minutes after its last use, should the deletion not happen.
                arguments.insert("x-expires".into(), AMQPValue::LongLongInt(30 * 60 * 1000));
                channel
                    .queue_declare(
                        dest.name.as_str().into(),
                        QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        arguments,
                    )
                    .await?;
                channel
                    .queue_bind(
                        dest.name.as_str().into(),
                        dest.exchange().as_str().into(),
                        dest.name.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                let _ = connection.close(200, "prepared".into()).await;
                Ok(())
            }
            Sink::Redis => Ok(()),
        }
    }

    /// Deletes `dest`: the topic (when the broker supports it), the stream, the queue and the
    /// exchange, the stream key and the relay's dedupe keys.
    async fn remove(&self, dest: &Destination) -> Result<()> {
        match self.sink {
            Sink::Kafka => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", &self.bootstrap)
                    .create()?;
                let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
                for result in admin.delete_topics(&[dest.name.as_str()], &options).await? {
                    if let Err((topic, code)) = result {
                        bail!("deleting topic {topic}: {code}");
                    }
                }
            }
            Sink::Nats => {
                let js = self.jetstream().await?;
                js.delete_stream(&dest.name)
                    .await
                    .with_context(|| format!("deleting stream {}", dest.name))?;
            }
            Sink::Rabbitmq => {
                let connection = self.amqp().await?;
                let channel = connection.create_channel().await?;
                channel
                    .queue_delete(dest.name.as_str().into(), QueueDeleteOptions::default())
                    .await?;
                channel
                    .exchange_delete(
                        dest.exchange().as_str().into(),
                        ExchangeDeleteOptions::default(),
                    )
                    .await?;
                let _ = connection.close(200, "removed".into()).await;
            }
            Sink::Redis => {
                let mut c = self.redis().await?;
                let _: i64 = redis::cmd("DEL")
                    .arg(&dest.name)
                    .query_async(&mut c)
                    .await?;
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{}:*", dest.dedupe_prefix))
                        .arg("COUNT")
                        .arg(10_000)
                        .query_async(&mut c)
                        .await?;
                    if !keys.is_empty() {
                        let _: i64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut c).await?;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
        Ok(())
    }

    /// The raw client's ceiling: `n` relay-shaped records into `dest`; from the first send to the
    /// last acknowledgement.
    async fn ceiling(&self, dest: &Destination, n: u64) -> Result<Duration> {
        match self.sink {
            Sink::Kafka => {
                let (bootstrap, topic) = (self.bootstrap.clone(), dest.name.clone());
                tokio::task::spawn_blocking(move || producer_ceiling(&bootstrap, &topic, n, true))
                    .await?
            }
            Sink::Nats => self.nats_ceiling(dest, n).await,
            Sink::Rabbitmq => self.rabbitmq_ceiling(dest, n, true).await,
            Sink::Redis => {
                self.redis_ceiling(dest, n, false, REDIS_PIPELINES_IN_FLIGHT)
                    .await
            }
        }
    }

    /// JetStream publishes (headers as the sink sets them, `Nats-Msg-Id` included), each
    /// acknowledged by the stream; at most [`WINDOW`] outstanding.
    async fn nats_ceiling(&self, dest: &Destination, n: u64) -> Result<Duration> {
        let js = self.jetstream().await?;
        let shape = Shape::new();
        let started = Instant::now();
        let mut pending = VecDeque::with_capacity(WINDOW);
        for i in 0..n {
            let r = shape.record(i);
            let mut headers = async_nats::HeaderMap::new();
            for (name, value) in &r.headers {
                headers.insert(*name, value.as_str());
            }
            headers.insert("Outbox-Key", r.key.as_str());
            headers.insert("Nats-Msg-Id", r.id.as_str());
            let message = jetstream::message::PublishMessage::build()
                .payload(shape.payload.clone().into())
                .headers(headers);
            let ack = js
                .send_publish(dest.name.clone(), message)
                .await
                .context("NATS ceiling: publish")?;
            pending.push_back(ack);
            if pending.len() >= WINDOW
                && let Some(ack) = pending.pop_front()
            {
                ack.await.context("NATS ceiling: acknowledgement")?;
            }
        }
        while let Some(ack) = pending.pop_front() {
            ack.await.context("NATS ceiling: acknowledgement")?;
        }
        Ok(started.elapsed())
    }

    /// Persistent, `mandatory` publishes with the sink's properties and headers on a channel in
    /// confirm mode, each confirmed (`basic.ack`, not returned); at most [`WINDOW`] outstanding.
    async fn rabbitmq_ceiling(
        &self,
        dest: &Destination,
        n: u64,
        persistent: bool,
    ) -> Result<Duration> {
        let connection = self.amqp().await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let shape = Shape::new();
        let exchange = dest.exchange();
        let check = |c: Confirmation| match c {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => {
                bail!("RabbitMQ ceiling: a message was returned unrouted")
            }
            Confirmation::Nack(_) => bail!("RabbitMQ ceiling: a message was nacked"),
            Confirmation::NotRequested => {
                bail!("RabbitMQ ceiling: the channel is not in confirm mode")
            }
        };
        let started = Instant::now();
        let mut pending = VecDeque::with_capacity(WINDOW);
        for i in 0..n {
            let r = shape.record(i);
            let mut headers = FieldTable::default();
            for (name, value) in &r.headers {
                headers.insert(
                    ShortString::from(*name),
                    AMQPValue::LongString(LongString::from(value.as_bytes())),
                );
            }
            headers.insert(
                "aggregateId".into(),
                AMQPValue::LongString(LongString::from(r.key.as_bytes())),
            );
            let properties = BasicProperties::default()
                .with_delivery_mode(if persistent { 2 } else { 1 })
                .with_app_id("outbox-relay".into())
                .with_content_type("application/json".into())
                .with_message_id(r.id.as_str().into())
                .with_type(r.event_type.into())
                .with_timestamp(shape.time_ms / 1000)
                .with_headers(headers);
            let confirm = channel
                .basic_publish(
                    exchange.as_str().into(),
                    dest.name.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &shape.payload,
                    properties,
                )
                .await
                .context("RabbitMQ ceiling: publish")?;
            pending.push_back(confirm);
            if pending.len() >= WINDOW
                && let Some(c) = pending.pop_front()
            {
                check(c.await?)?;
            }
        }
        while let Some(c) = pending.pop_front() {
            check(c.await?)?;
        }
        let elapsed = started.elapsed();
        let _ = connection.close(200, "ceiling".into()).await;
        Ok(elapsed)
    }

    /// `XADD <stream> * key … value … ts … h:<name> …` (the sink's fields, in its order) in
    /// pipelines of [`REDIS_PIPELINE`], at most `in_flight` outstanding on one multiplexed
    /// connection. With `script`, each record is instead appended as the sink appends it: one
    /// `EVALSHA` of its dedupe-and-append script ([`APPEND_SCRIPT`]) with a dedupe key (24 h, the
    /// sink's default), after a `SCRIPT LOAD` at the head of each pipeline.
    async fn redis_ceiling(
        &self,
        dest: &Destination,
        n: u64,
        script: bool,
        in_flight: usize,
    ) -> Result<Duration> {
        let conn = self.redis().await?;
        let shape = Shape::new();
        let sha = redis::Script::new(APPEND_SCRIPT).get_hash().to_owned();
        let started = Instant::now();
        let mut pending = VecDeque::new();
        let mut i = 0u64;
        while i < n {
            let end = (i + REDIS_PIPELINE as u64).min(n);
            let mut pipe = redis::pipe();
            if script {
                pipe.cmd("SCRIPT").arg("LOAD").arg(APPEND_SCRIPT);
            }
            for j in i..end {
                let r = shape.record(j);
                let cmd = if script {
                    pipe.cmd("EVALSHA")
                        .arg(&sha)
                        .arg(2)
                        .arg(&dest.name)
                        .arg(format!("{}:{}", dest.dedupe_prefix, r.id))
                        .arg(24 * 3600 * 1000)
                        .arg(0)
                        .arg("1")
                        .arg("0")
                } else {
                    pipe.cmd("XADD").arg(&dest.name).arg("*")
                };
                cmd.arg("key")
                    .arg(&r.key)
                    .arg("value")
                    .arg(&shape.payload)
                    .arg("ts")
                    .arg(shape.time_ms);
                for (name, value) in &r.headers {
                    cmd.arg(format!("h:{name}")).arg(value);
                }
            }
            let mut c = conn.clone();
            pending.push_back(tokio::spawn(async move {
                let replies: Vec<redis::Value> = pipe.query_async(&mut c).await?;
                anyhow::Ok(replies.len())
            }));
            if pending.len() >= in_flight
                && let Some(t) = pending.pop_front()
            {
                t.await??;
            }
            i = end;
        }
        while let Some(t) = pending.pop_front() {
            t.await??;
        }
        let elapsed = started.elapsed();
        let mut c = conn.clone();
        let len: u64 = redis::cmd("XLEN")
            .arg(&dest.name)
            .query_async(&mut c)
            .await?;
        if len != n {
            bail!("Redis ceiling: the stream holds {len} entries, not {n}");
        }
        Ok(elapsed)
    }

    /// Starts reading `dest` from its start with the broker's client (at most `limit` records
    /// kept).
    async fn reader(&self, dest: &Destination, limit: usize) -> Result<Reader> {
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        let task = match self.sink {
            Sink::Kafka => {
                return Ok(Reader::Kafka(LatencyConsumer::start(
                    &self.bootstrap,
                    &dest.name,
                    limit,
                )?));
            }
            Sink::Nats => {
                let js = self.jetstream().await?;
                let stream = js.get_stream(&dest.name).await?;
                let reader = stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        filter_subject: dest.name.clone(),
                        deliver_policy: consumer::DeliverPolicy::All,
                        ..Default::default()
                    })
                    .await?;
                let mut messages = reader.messages().await?;
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while !s.load(Ordering::Relaxed) {
                        let Ok(next) =
                            tokio::time::timeout(Duration::from_millis(100), messages.next()).await
                        else {
                            continue;
                        };
                        let Some(message) = next else { break };
                        let message = message.map_err(|e| anyhow::anyhow!("NATS reader: {e}"))?;
                        let received_us = chrono::Utc::now().timestamp_micros();
                        let header = |name: &str| {
                            message
                                .headers
                                .as_ref()
                                .and_then(|h| h.get(name))
                                .map(|v| v.as_str().to_owned())
                        };
                        note(
                            &mut seen,
                            limit,
                            header("id"),
                            header("ce_time"),
                            received_us,
                        );
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    anyhow::Ok(seen)
                })
            }
            Sink::Rabbitmq => {
                let connection = self.amqp().await?;
                let channel = connection.create_channel().await?;
                let mut consumer = channel
                    .basic_consume(
                        dest.name.as_str().into(),
                        "outbox-bench".into(),
                        BasicConsumeOptions {
                            no_ack: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while !s.load(Ordering::Relaxed) {
                        let Ok(next) =
                            tokio::time::timeout(Duration::from_millis(100), consumer.next()).await
                        else {
                            continue;
                        };
                        let Some(delivery) = next else { break };
                        let delivery = delivery?;
                        let received_us = chrono::Utc::now().timestamp_micros();
                        let header = |name: &str| {
                            delivery.properties.headers().as_ref().and_then(|t| {
                                t.inner().iter().find_map(|(k, v)| match v {
                                    AMQPValue::LongString(s) if k.as_str() == name => {
                                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                                    }
                                    _ => None,
                                })
                            })
                        };
                        note(
                            &mut seen,
                            limit,
                            header("id"),
                            header("ce_time"),
                            received_us,
                        );
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(consumer);
                    let _ = channel.close(200, "read".into()).await;
                    let _ = connection.close(200, "read".into()).await;
                    anyhow::Ok(seen)
                })
            }
            Sink::Redis => {
                // A connection of its own: `XREAD BLOCK` holds it.
                let mut conn = self.redis().await?;
                let key = dest.name.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut last = "0-0".to_owned();
                    while !s.load(Ordering::Relaxed) {
                        let reply: Option<Vec<(String, Entries)>> = redis::cmd("XREAD")
                            .arg("COUNT")
                            .arg(1000)
                            .arg("BLOCK")
                            .arg(100)
                            .arg("STREAMS")
                            .arg(&key)
                            .arg(&last)
                            .query_async(&mut conn)
                            .await?;
                        let received_us = chrono::Utc::now().timestamp_micros();
                        for (_, entries) in reply.unwrap_or_default() {
                            for (id, fields) in entries {
                                let field = |name: &str| {
                                    fields
                                        .iter()
                                        .find(|(k, _)| k == name)
                                        .map(|(_, v)| v.clone())
                                };
                                note(
                                    &mut seen,
                                    limit,
                                    field("h:id"),
                                    field("h:ce_time"),
                                    received_us,
                                );
                                c.fetch_add(1, Ordering::Relaxed);
                                last = id;
                            }
                        }
                    }
                    anyhow::Ok(seen)
                })
            }
        };
        Ok(Reader::Task { count, stop, task })
    }
}

/// The entries of one stream in an `XREAD` reply: (entry id, [(field, value)]).
type Entries = Vec<(String, Vec<(String, String)>)>;

/// Keeps a record's event id and `ce_time` with its receive time (at most `limit` records).
fn note(
    seen: &mut Vec<Seen>,
    limit: usize,
    id: Option<String>,
    ce_time: Option<String>,
    received_us: i64,
) {
    let created = ce_time.and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok());
    if let Some(t) = created
        && seen.len() < limit
    {
        seen.push(Seen {
            id: id.and_then(|v| uuid::Uuid::parse_str(&v).ok()),
            created_us: t.timestamp_micros(),
            received_us,
        });
    }
}

/// A latency run's consumer: reads a destination from its start, noting each record's event id,
/// `ce_time` and receive time.
pub enum Reader {
    /// The Kafka consumer thread.
    Kafka(LatencyConsumer),
    /// A task reading another broker.
    Task {
        /// Records received so far.
        count: Arc<AtomicU64>,
        /// Set to stop the task.
        stop: Arc<AtomicBool>,
        /// The task; what it saw.
        task: tokio::task::JoinHandle<Result<Vec<Seen>>>,
    },
}

impl Reader {
    /// Records received so far.
    pub fn received(&self) -> u64 {
        match self {
            Reader::Kafka(c) => c.received(),
            Reader::Task { count, .. } => count.load(Ordering::Relaxed),
        }
    }

    /// Stops reading and returns what was seen.
    pub async fn finish(self) -> Result<Vec<Seen>> {
        match self {
            Reader::Kafka(c) => c.finish(),
            Reader::Task { stop, task, .. } => {
                stop.store(true, Ordering::Relaxed);
                tokio::time::timeout(Duration::from_secs(10), task)
                    .await
                    .context("the latency reader did not stop within 10 s")??
            }
        }
    }
}

/// Relay-shaped records: a ~200-byte JSON payload, a key over [`AGGREGATES`] aggregates, the
/// relay's id and CloudEvents headers (as [`producer_ceiling`] sends them to Kafka).
struct Shape {
    payload: Vec<u8>,
    time: String,
    time_ms: u64,
}

/// One record of a [`Shape`].
struct Record {
    key: String,
    id: String,
    event_type: &'static str,
    headers: Vec<(&'static str, String)>,
}

impl Shape {
    fn new() -> Self {
        let now = chrono::Utc::now();
        Self {
            payload: payload_json("acct-0", 1).to_string().into_bytes(),
            time: now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            time_ms: u64::try_from(now.timestamp_millis()).unwrap_or_default(),
        }
    }

    fn record(&self, i: u64) -> Record {
        let key = format!("acct-{}", i % AGGREGATES);
        let id = uuid::Uuid::now_v7().to_string();
        let event_type = EVENT_TYPES[(i % EVENT_TYPES.len() as u64) as usize];
        let headers = vec![
            ("id", id.clone()),
            ("eventType", event_type.to_owned()),
            ("schemaVersion", "1".to_owned()),
            ("ce_specversion", "1.0".to_owned()),
            ("ce_id", id.clone()),
            ("ce_source", "/outbox/account".to_owned()),
            ("ce_type", event_type.to_owned()),
            ("ce_subject", key.clone()),
            ("ce_time", self.time.clone()),
            ("content-type", "application/json".to_owned()),
        ];
        Record {
            key,
            id,
            event_type,
            headers,
        }
    }
}
