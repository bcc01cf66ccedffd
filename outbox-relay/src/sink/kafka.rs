//! The Kafka sink: an idempotent rdkafka producer.
//!
//! Guarantees it gives the relay:
//! - `enable.idempotence=true` and `acks=all` always (configuration that would weaken them is
//!   refused): the broker deduplicates the producer's own retries, and a record is acknowledged
//!   only once all in-sync replicas have it.
//! - Records of one batch are enqueued in order; with idempotence librdkafka keeps per-partition
//!   order across its internal retries, so an aggregate's records (one key, one partition) land
//!   in order.
//! - Each record's outcome is reported individually; the relay acknowledges only the contiguous
//!   prefix of successes ([`crate::ack`]) and, after any failure, drops the producer and
//!   [`KafkaSink::recreate`]s it rather than retrying one record out of order.
//! - Keys are partitioned with `murmur2_random`, the Java client's partitioner, so a key lands on
//!   the same partition as it would from Debezium/Kafka Connect.
//!
//! ## One producer for many tables
//!
//! The tables of one relay ([`crate::RelayGroup`]) share one producer ([`SharedProducer`]) and
//! one idle probe: each table's sink is a handle that counts its own records still unanswered,
//! so a table's delivery results, `in_flight` and fencing stay its own. What a table does after
//! a failure changes with sharing, and stays as safe:
//! - **recreate** (before re-sending from the first unacknowledged event): waits until none of
//!   the table's own records is unanswered — each was delivered or failed, so none can land
//!   after the re-sent copies — instead of replacing the producer under the other tables. Only
//!   when they stay unanswered for `delivery_timeout` (a broker out of reach) is the producer's
//!   queue dropped, which fails the other tables' queued records too (they re-send them in
//!   order, like after any failure). A producer in librdkafka's fatal state is replaced, once,
//!   by the first table that sees it; each table moves to the new one only once its own records
//!   on the old one are answered.
//! - **fence** (before a table lets go of its leader lock): waits, within the lease, until the
//!   table's records are answered, and drops the producer's queue only if they are not.
//! - A timed-out record ([`Pending::wait`]) drops the producer's queue, as before: every table's
//!   queued records fail and are re-sent, so each partition still receives a prefix.

use crate::sink::{published_within, record_probe};
use std::time::Duration;

use std::sync::{Arc, Mutex};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::{KafkaPropertyError, KafkaSettings};
use crate::route::OutboundRecord;
use crate::sink::{
    Delivered, DeliveryError, DeliveryFault, ErrorClass, Fenced, PendingBatch, Sink, SinkError,
    SinkKind,
};

/// The broker's name in this sink's errors.
const KAFKA: &str = "Kafka";

impl From<KafkaPropertyError> for SinkError {
    fn from(e: KafkaPropertyError) -> Self {
        SinkError::Config {
            broker: KAFKA,
            key: e.key,
            reason: e.reason,
        }
    }
}

impl KafkaSettings {
    /// The librdkafka configuration: defaults, then user properties, then the guarantees this
    /// relay depends on (refusing user properties that contradict them).
    pub fn client_config(&self) -> Result<ClientConfig, SinkError> {
        self.check()?;
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", "outbox-relay")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "500000")
            .set("partitioner", "murmur2_random")
            // Infinite: the relay times deliveries out itself ([`Pending::wait`]).
            .set("delivery.timeout.ms", "0");
        for (key, value) in &self.properties {
            cfg.set(key, value);
        }
        // Gap-less: when a Produce request fails for good while later requests of the same
        // partition are in flight, the producer stops (a fatal error) instead of delivering the
        // later records; the relay then re-sends from the failed record, in order. Without it the
        // later records reach the topic first (per-aggregate order inversion; found by the fault
        // suite's `broker-error-in-flight`).
        cfg.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("enable.gapless.guarantee", "true");
        // librdkafka's own warnings and errors reach the client context (and the logs); its
        // default follows the `log` crate's level, which is off under `tracing`.
        cfg.set_log_level(RDKafkaLogLevel::Warning);
        Ok(cfg)
    }
}

/// The producer's client context: forwards librdkafka's logs to `tracing` and remembers the
/// last broker-level error, so "unreachable" can say why (TLS handshake, SASL, DNS…).
#[derive(Clone, Default)]
pub struct SinkContext {
    last_error: Arc<Mutex<Option<String>>>,
}

impl SinkContext {
    /// The last error librdkafka reported, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    fn remember(&self, text: String) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = Some(text);
        }
    }
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                self.remember(format!("{fac}: {message}"));
                tracing::error!(target: "librdkafka", "{fac}: {message}");
            }
            RDKafkaLogLevel::Warning => {
                self.remember(format!("{fac}: {message}"));
                tracing::warn!(target: "librdkafka", "{fac}: {message}");
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "{fac}: {message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "{fac}: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.remember(format!("{error}: {reason}"));
        tracing::warn!(target: "librdkafka", "{error}: {reason}");
    }
}

/// An idempotent Kafka producer with per-record outcomes. See the [module docs](self).
pub struct KafkaSink {
    settings: KafkaSettings,
    producer: FutureProducer<SinkContext>,
    context: SinkContext,
    /// The group's producer this sink is a handle of, if it shares one.
    shared: Option<Handle>,
}

/// One table's share of a [`SharedProducer`].
struct Handle {
    group: Arc<SharedProducer>,
    /// The generation of `KafkaSink::producer`.
    generation: u64,
    /// This table's records handed to the producer and not yet answered.
    outstanding: Arc<Outstanding>,
}

/// Records of one table handed to a shared producer and not yet answered.
#[derive(Debug, Default)]
struct Outstanding {
    count: std::sync::atomic::AtomicUsize,
}

impl Outstanding {
    fn get(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    fn add(&self, n: usize) {
        self.count.fetch_add(n, std::sync::atomic::Ordering::AcqRel);
    }

    fn answered(&self) {
        self.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Waits up to `wait` until nothing is outstanding; whether that happened.
    async fn drained(&self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while self.get() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

/// One idempotent producer (and one idle probe) for every table of a relay: see the [module
/// docs](self). Cheap to share (`Arc`).
pub struct SharedProducer {
    settings: KafkaSettings,
    context: SinkContext,
    /// The producer new handles get, and its generation (bumped when a fatal one is replaced).
    current: Mutex<(u64, FutureProducer<SinkContext>)>,
    /// The tables the idle probe reports to, and the probe's task once started.
    probe: Mutex<Probe>,
    /// When the brokers last answered a start-up check ([`KafkaSink::check_connection`]): the
    /// tables of a group starting together share one metadata fetch instead of each holding a
    /// blocking thread for its own.
    checked: tokio::sync::Mutex<Option<std::time::Instant>>,
}

/// How long a shared producer's successful connection check stands for the tables starting
/// after it.
const SHARED_CHECK_VALID: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Probe {
    watchers: Vec<(
        std::sync::Weak<crate::stats::RelayStats>,
        tokio_util::sync::CancellationToken,
    )>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for SharedProducer {
    fn drop(&mut self) {
        if let Ok(probe) = self.probe.get_mut()
            && let Some(task) = probe.task.take()
        {
            task.abort();
        }
    }
}

impl SharedProducer {
    /// Creates the producer (no connection is made yet).
    pub fn new(settings: KafkaSettings) -> Result<Arc<Self>, SinkError> {
        let context = SinkContext::default();
        let producer = settings
            .client_config()?
            .create_with_context(context.clone())
            .map_err(create_error)?;
        Ok(Arc::new(Self {
            settings,
            context,
            current: Mutex::new((0, producer)),
            probe: Mutex::new(Probe::default()),
            checked: tokio::sync::Mutex::new(None),
        }))
    }

    /// A sink for one table, producing through this producer.
    pub fn sink(self: &Arc<Self>) -> KafkaSink {
        let (generation, producer) = self.current();
        KafkaSink {
            settings: self.settings.clone(),
            producer,
            context: self.context.clone(),
            shared: Some(Handle {
                group: self.clone(),
                generation,
                outstanding: Arc::default(),
            }),
        }
    }

    fn current(&self) -> (u64, FutureProducer<SinkContext>) {
        match self.current.lock() {
            Ok(c) => (c.0, c.1.clone()),
            Err(poisoned) => {
                let c = poisoned.into_inner();
                (c.0, c.1.clone())
            }
        }
    }

    /// The producer after `generation`: a fresh one when `generation` is still the current one
    /// and it is in librdkafka's fatal state, else the current one.
    fn after_fatal(
        &self,
        generation: u64,
    ) -> Result<(u64, FutureProducer<SinkContext>), SinkError> {
        let mut current = self.current.lock().map_err(|_| SinkError::Config {
            broker: KAFKA,
            key: "producer".into(),
            reason: "the shared producer's lock was poisoned".into(),
        })?;
        if current.0 == generation && current.1.client().fatal_error().is_some() {
            let fresh = self
                .settings
                .client_config()?
                .create_with_context(self.context.clone())
                .map_err(create_error)?;
            *current = (generation + 1, fresh);
            tracing::warn!("the shared Kafka producer hit a fatal error: replaced it");
        }
        Ok((current.0, current.1.clone()))
    }

    /// Reports the brokers' reachability to `stats` until `shutdown` (one probe for every
    /// table: see [`watch_brokers`]).
    fn watch(
        self: &Arc<Self>,
        stats: &Arc<crate::stats::RelayStats>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<(), SinkError> {
        let mut probe = self.probe.lock().map_err(|_| SinkError::Config {
            broker: KAFKA,
            key: "producer".into(),
            reason: "the shared producer's probe lock was poisoned".into(),
        })?;
        probe.watchers.push((Arc::downgrade(stats), shutdown));
        if probe.task.is_none() {
            let client = probe_client(&self.settings)?;
            let servers = self.settings.bootstrap_servers.clone();
            let group = Arc::downgrade(self);
            probe.task = Some(tokio::spawn(async move {
                let mut reachable = true;
                loop {
                    tokio::time::sleep(BROKER_PROBE_INTERVAL).await;
                    let Some(group) = group.upgrade() else { return };
                    let watchers: Vec<Arc<crate::stats::RelayStats>> = match group.probe.lock() {
                        Ok(mut p) => {
                            p.watchers
                                .retain(|(s, stop)| s.strong_count() > 0 && !stop.is_cancelled());
                            p.watchers.iter().filter_map(|(s, _)| s.upgrade()).collect()
                        }
                        Err(_) => return,
                    };
                    drop(group);
                    let idle: Vec<_> = watchers
                        .iter()
                        .filter(|s| !published_within(s, BROKER_PROBE_INTERVAL))
                        .collect();
                    if idle.is_empty() {
                        continue;
                    }
                    let c = client.clone();
                    let answer = tokio::task::spawn_blocking(move || {
                        c.client()
                            .fetch_metadata(None, BROKER_PROBE_TIMEOUT)
                            .map(drop)
                            .map_err(|e| e.to_string())
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                    for stats in idle {
                        stats
                            .sink_reachable
                            .store(answer.is_ok(), std::sync::atomic::Ordering::Relaxed);
                    }
                    match (reachable, &answer) {
                        (true, Err(error)) => {
                            tracing::warn!(servers = %servers, %error, "Kafka brokers do not answer: reporting the idle tables not ready until they do")
                        }
                        (false, Ok(())) => {
                            tracing::info!(servers = %servers, "Kafka brokers answer again")
                        }
                        _ => {}
                    }
                    reachable = answer.is_ok();
                }
            }));
        }
        Ok(())
    }
}

/// A batch handed to the producer, whose outcomes are not all known yet.
pub struct Pending {
    slots: Vec<Slot>,
    /// When the batch's records count as timed out (enqueue time + `delivery_timeout`).
    deadline: tokio::time::Instant,
    /// The producer the records were handed to, to drop its queue when the deadline passes.
    producer: FutureProducer<SinkContext>,
    /// The table's count of unanswered records, when the producer is shared: each record
    /// counts until its delivery report arrives, even if the batch is dropped unanswered.
    outstanding: Option<Arc<Outstanding>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(outstanding) = self.outstanding.clone() else {
            return;
        };
        let sent: Vec<rdkafka::producer::DeliveryFuture> = std::mem::take(&mut self.slots)
            .into_iter()
            .filter_map(|s| match s {
                Slot::Sent(d) => Some(d),
                Slot::Done(_) => None,
            })
            .collect();
        if sent.is_empty() {
            return;
        }
        // Dropped unanswered (a window abandoned after a failure): the records are still in the
        // producer until their reports arrive.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for delivery in sent {
                    let _ = delivery.await;
                    outstanding.answered();
                }
            });
        }
    }
}

/// How long a timed-out record's produce request, already sent to a broker, may still be
/// answered before it is dropped as well (it may then still be written: a duplicate at most).
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(1);

enum Slot {
    Sent(rdkafka::producer::DeliveryFuture),
    Done(Outcome),
}

impl Pending {
    /// Records that were refused for good at enqueue time (and so are known already), by index.
    pub fn rejected_now(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Done(Outcome::Rejected(_))))
            .map(|(i, _)| i)
    }

    /// Records handed to the producer whose verdict is still to come, by index (the others
    /// were refused, held or not sent at enqueue time).
    pub fn accepted(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Sent(..)))
            .map(|(i, _)| i)
    }

    /// Waits for Kafka's verdict on every record; one outcome per record, in order.
    ///
    /// A record not acknowledged by the batch's deadline is [`Outcome::Failed`] with
    /// `MessageTimedOut`, and so is every record the producer holds that is not yet part of a
    /// produce request, whichever batch it belongs to: they are all dropped at once (one purge,
    /// atomic per partition), so the records that still reach a partition after a timeout are
    /// always a prefix of what was enqueued for it. librdkafka's own per-record timeout cannot
    /// promise that: a later record, enqueued a few milliseconds after one that timed out, could
    /// be delivered when the broker came back in between, ahead of the re-sent earlier one.
    pub async fn wait(mut self) -> Vec<Outcome> {
        let slots = std::mem::take(&mut self.slots);
        let (deadline, producer, outstanding) = (
            self.deadline,
            self.producer.clone(),
            self.outstanding.clone(),
        );
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            out.push(match slot {
                Slot::Done(o) => o,
                Slot::Sent(mut delivery) => {
                    let (result, timed_out) =
                        match tokio::time::timeout_at(deadline, &mut delivery).await {
                            Ok(result) => (result, false),
                            Err(_) => (expire(&producer, &mut delivery).await, true),
                        };
                    if let Some(o) = &outstanding {
                        o.answered();
                    }
                    match result {
                        Ok(Ok(d)) => Outcome::Delivered(Delivered {
                            partition: d.partition,
                            offset: d.offset,
                        }),
                        Ok(Err((error, _))) if timed_out && is_purged(&error) => Outcome::Failed(
                            KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
                        ),
                        // A broker answers per produce request, not per record: a record-level
                        // error may belong to another record of the same request.
                        Ok(Err((error, _))) if classify(&error) == ErrorClass::Record => {
                            Outcome::Suspect(error)
                        }
                        Ok(Err((error, _))) => Outcome::Failed(error),
                        Err(_canceled) => Outcome::Failed(KafkaError::Canceled),
                    }
                }
            });
        }
        out
    }
}

type DeliveryResult = <rdkafka::producer::DeliveryFuture as std::future::Future>::Output;

/// The deadline of a record passed: drops every record the producer holds that is not yet in a
/// produce request (so nothing later of any partition is sent), gives the requests already on
/// the wire [`IN_FLIGHT_GRACE`] to be answered, drops them too, and returns the record's verdict.
async fn expire(
    producer: &FutureProducer<SinkContext>,
    delivery: &mut rdkafka::producer::DeliveryFuture,
) -> DeliveryResult {
    use rdkafka::producer::PurgeConfig;
    producer.purge(PurgeConfig::default().queue());
    if let Ok(result) = tokio::time::timeout(IN_FLIGHT_GRACE, &mut *delivery).await {
        return result;
    }
    producer.purge(PurgeConfig::default().queue().inflight());
    delivery.await
}

/// Whether a delivery failed because the relay dropped the record from the producer.
fn is_purged(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
    )
}

/// What became of one record produced to Kafka ([`crate::sink::Outcome`] with the client's
/// error).
pub type Outcome = crate::sink::Outcome<KafkaError>;

impl DeliveryError for KafkaError {
    fn kind(&self) -> String {
        self.rdkafka_error_code()
            .map(|c| format!("{c:?}"))
            .unwrap_or_else(|| "_OTHER".to_owned())
    }
}

/// Classifies a producer error (at enqueue time or in a delivery report). See [`ErrorClass`].
pub fn classify(error: &KafkaError) -> ErrorClass {
    use rdkafka::types::RDKafkaErrorCode as C;
    let Some(code) = error.rdkafka_error_code() else {
        // The delivery future was dropped (the producer went away) or a client-side problem
        // without a code: the window is retried.
        return ErrorClass::Retry;
    };
    match code {
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        | C::InvalidRecord
        | C::InvalidTimestamp
        | C::InvalidMessage
        | C::InvalidTopic
        | C::PolicyViolation
        | C::BadMessage
        | C::KeySerialization
        | C::ValueSerialization => ErrorClass::Record,
        C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => ErrorClass::Stop(
            "grant the relay's Kafka principal WRITE (and DESCRIBE) on the topic and IDEMPOTENT_WRITE on the cluster, then restart the relay",
        ),
        C::SaslAuthenticationFailed
        | C::Authentication
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState => ErrorClass::Stop(
            "fix the relay's Kafka credentials (kafka.properties sasl.* / ssl.*), then restart the relay",
        ),
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => ErrorClass::Stop(
            "create the topic (outbox-relay topics create), enable auto.create.topics.enable on the brokers, or route the events to an existing topic; then restart the relay",
        ),
        C::UnsupportedVersion
        | C::UnsupportedForMessageFormat
        | C::UnsupportedCompressionType
        | C::InvalidRequiredAcks
        | C::InvalidConfig => ErrorClass::Stop(
            "the brokers cannot take the relay's records as configured (message format, compression, acks=all with idempotence): check the broker version and the relay's kafka.properties",
        ),
        C::MessageTimedOut
        | C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::BrokerDestroy
        | C::DestroyBroker
        | C::Fail
        | C::QueueFull
        | C::TimedOutQueue
        | C::OperationTimedOut
        | C::Retry
        | C::PurgeQueue
        | C::PurgeInflight
        | C::Fatal
        | C::GaplessGuarantee
        | C::Inconsistent
        | C::ISRInsufficient
        | C::SSL
        | C::UnknownBroker
        | C::InProgress
        | C::PreviousInProgress
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::RequestTimedOut
        | C::BrokerNotAvailable
        | C::ReplicaNotAvailable
        | C::NetworkException
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::NotController
        | C::KafkaStorageError
        | C::OutOfOrderSequenceNumber
        | C::DuplicateSequenceNumber
        | C::InvalidProducerEpoch
        | C::UnknownProducerId
        | C::ProducerFenced
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::PreferredLeaderNotAvailable
        | C::EligibleLeadersNotAvailable
        | C::ThrottlingQuotaExceeded
        | C::ReassignmentInProgress
        | C::CoordinatorLoadInProgress
        | C::CoordinatorNotAvailable
        | C::NotCoordinator
        | C::ConcurrentTransactions => ErrorClass::Retry,
        _ => ErrorClass::Unlisted,
    }
}

/// Whether Kafka will never accept this record as it is: [`ErrorClass::Record`].
pub fn is_permanent(error: &KafkaError) -> bool {
    classify(error) == ErrorClass::Record
}

/// The Kafka protocol name of an error's code (`TOPIC_AUTHORIZATION_FAILED`), or its text when
/// it has none.
pub fn error_name(error: &KafkaError) -> String {
    let Some(code) = error.rdkafka_error_code() else {
        return error.to_string();
    };
    let camel = format!("{code:?}");
    let mut name = String::with_capacity(camel.len() + 8);
    if (code as i32) < 0 {
        // librdkafka's own (local) errors are spelled with a leading underscore.
        name.push('_');
    }
    let chars: Vec<char> = camel.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        // A word starts at an upper-case letter after a lower-case one, or at the last capital
        // of an acronym followed by a lower-case letter (`SASLMechanism` → `SASL_MECHANISM`).
        let boundary = i > 0
            && c.is_ascii_uppercase()
            && (chars[i - 1].is_ascii_lowercase()
                || chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase()));
        if boundary {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// The broker-neutral form of a producer error: its class ([`classify`]), its protocol name
/// ([`error_name`]) and the client's description.
pub fn fault(error: &KafkaError) -> DeliveryFault {
    DeliveryFault {
        class: classify(error),
        name: error_name(error),
        detail: error.to_string(),
    }
}

fn create_error(error: KafkaError) -> SinkError {
    SinkError::Create {
        broker: KAFKA,
        source: Box::new(error),
    }
}

impl KafkaSink {
    /// Creates the producer (no connection is made yet; see [`KafkaSink::check_connection`]).
    pub fn new(settings: KafkaSettings) -> Result<Self, SinkError> {
        let context = SinkContext::default();
        let producer = settings
            .client_config()?
            .create_with_context(context.clone())
            .map_err(create_error)?;
        Ok(Self {
            settings,
            producer,
            context,
            shared: None,
        })
    }

    /// Fetches cluster metadata to prove the brokers are reachable (and the credentials work).
    ///
    /// Through a [`SharedProducer`], one check runs at a time and a success stands for
    /// five seconds: a hundred tables starting at once make one metadata fetch, not a
    /// hundred concurrent ones each on a blocking thread of its own.
    pub async fn check_connection(&self) -> Result<(), SinkError> {
        let Some(handle) = &self.shared else {
            return self.fetch_metadata().await;
        };
        let mut checked = handle.group.checked.lock().await;
        if checked.is_some_and(|at| at.elapsed() < SHARED_CHECK_VALID) {
            return Ok(());
        }
        self.fetch_metadata().await?;
        *checked = Some(std::time::Instant::now());
        Ok(())
    }

    async fn fetch_metadata(&self) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        let timeout = self.settings.connect_timeout;
        let servers = self.settings.bootstrap_servers.clone();
        let context = self.context.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|error| SinkError::Unreachable {
                    broker: KAFKA,
                    servers,
                    detail: match context.last_error() {
                        Some(cause) => format!("{error} (last client error: {cause})"),
                        None => error.to_string(),
                    },
                })
        })
        .await
        .unwrap_or_else(|join| {
            Err(SinkError::Config {
                broker: KAFKA,
                key: "bootstrap.servers".into(),
                reason: format!("metadata check panicked: {join}"),
            })
        })
    }

    /// Replaces the producer with a fresh one: drops whatever the old one still had queued, so
    /// nothing it held can be delivered out of order after the relay resumes.
    ///
    /// A handle of a [`SharedProducer`] does not wait here: it drops the shared producer's
    /// queue if records of its own are still unanswered, and moves to a fresh producer if the
    /// shared one is in librdkafka's fatal state. The relay calls [`KafkaSink::renew`] instead.
    pub fn recreate(&mut self) -> Result<(), SinkError> {
        if let Some(handle) = &mut self.shared {
            if handle.outstanding.get() > 0 {
                self.producer
                    .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
            }
            let (generation, producer) = handle.group.after_fatal(handle.generation)?;
            handle.generation = generation;
            self.producer = producer;
            return Ok(());
        }
        self.producer = self
            .settings
            .client_config()?
            .create_with_context(self.context.clone())
            .map_err(create_error)?;
        Ok(())
    }

    /// What the relay calls after a failure ([`Sink::recreate`]): [`KafkaSink::recreate`], except
    /// that a handle of a [`SharedProducer`] first waits until its own records are answered (see
    /// the [module docs](self)).
    pub async fn renew(&mut self) -> Result<(), SinkError> {
        if let Some(handle) = &mut self.shared {
            if !handle
                .outstanding
                .drained(self.settings.delivery_timeout)
                .await
            {
                tracing::warn!(
                    unanswered = handle.outstanding.get(),
                    "records of this table still unanswered after the delivery timeout: dropping the shared producer's queue (every table re-sends its queued records)"
                );
                self.producer
                    .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
                handle.outstanding.drained(IN_FLIGHT_GRACE).await;
            }
            let (generation, producer) = handle.group.after_fatal(handle.generation)?;
            handle.generation = generation;
            self.producer = producer;
            return Ok(());
        }
        self.recreate()
    }

    /// Drops every record queued in the producer or in flight to a broker, without waiting for
    /// Kafka's answer (their delivery futures fail); returns how many there were. A record already
    /// on the wire may still be written by the broker.
    pub fn purge(&self) -> i32 {
        if let Some(handle) = &self.shared {
            // Shared: the other tables' records are not this table's to drop unless its own
            // are still there (after a fence, they are not).
            let own = handle.outstanding.get();
            if own > 0 {
                self.producer
                    .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
            }
            return i32::try_from(own).unwrap_or(i32::MAX);
        }
        let queued = self.producer.in_flight_count();
        self.producer
            .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
        queued
    }

    /// Fences the producer before the relay lets go of its source: drops every record not yet
    /// sent to a broker, then waits up to `wait` for the produce requests already on the wire
    /// to be answered (so none of them is appended later, after another producer resumed from
    /// the durable position), then drops whatever is still unanswered. The producer should be
    /// [`KafkaSink::recreate`]d afterwards.
    pub async fn fence(&self, wait: Duration) -> Fenced {
        use rdkafka::producer::PurgeConfig;
        if let Some(handle) = &self.shared {
            let held = handle.outstanding.get();
            if handle.outstanding.drained(wait).await {
                return Fenced {
                    held,
                    unanswered: 0,
                };
            }
            let unanswered = handle.outstanding.get();
            self.producer
                .purge(PurgeConfig::default().queue().inflight());
            handle.outstanding.drained(IN_FLIGHT_GRACE).await;
            return Fenced { held, unanswered };
        }
        let before = self.producer.in_flight_count();
        self.producer.purge(PurgeConfig::default().queue());
        let producer = self.producer.clone();
        let unanswered = tokio::task::spawn_blocking(move || {
            // Serves the delivery reports of the purged records and waits for the rest.
            let _ = producer.flush(wait);
            let left = producer.in_flight_count();
            producer.purge(PurgeConfig::default().queue().inflight());
            left
        })
        .await
        .unwrap_or(0);
        Fenced {
            held: usize::try_from(before).unwrap_or(0),
            unanswered: usize::try_from(unanswered).unwrap_or(0),
        }
    }

    /// The underlying producer (for metrics and the `topics` commands).
    pub fn producer(&self) -> &FutureProducer<SinkContext> {
        &self.producer
    }

    /// Produces `records` in order and waits for every outcome; the result has one entry per
    /// record, in the same order. Equivalent to [`KafkaSink::enqueue`] then [`Pending::wait`].
    pub async fn send_batch(&self, records: &[OutboundRecord]) -> Vec<Outcome> {
        self.enqueue(records).await.wait().await
    }

    /// Hands `records` to the producer in order without waiting for Kafka, so several batches
    /// can be in flight; [`Pending::wait`] then yields one outcome per record.
    ///
    /// A record refused for good when it is enqueued (e.g. larger than `message.max.bytes`) is
    /// [`Outcome::Rejected`] and the later records with the same topic and key are not sent at
    /// all ([`Outcome::Held`]), so an aggregate never overtakes its own poison event. After a
    /// transient enqueue failure nothing further is sent.
    pub async fn enqueue(&self, records: &[OutboundRecord]) -> Pending {
        let deadline = tokio::time::Instant::now() + self.settings.delivery_timeout;
        let mut slots: Vec<Slot> = Vec::with_capacity(records.len());
        let mut poisoned: Vec<(&str, &str, usize)> = Vec::new();
        let mut stopped: Option<KafkaError> = None;
        for (i, r) in records.iter().enumerate() {
            if let Some(error) = &stopped {
                slots.push(Slot::Done(Outcome::Failed(error.clone())));
                continue;
            }
            if let Some(&(_, _, behind)) = poisoned
                .iter()
                .filter(|_| !crate::faults::mutant("park_without_blocking"))
                .find(|(t, k, _)| *t == r.topic && *k == r.key)
            {
                slots.push(Slot::Done(Outcome::Held { behind }));
                continue;
            }
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 1);
            for (name, value) in &r.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value),
                });
            }
            let provenance = crate::faults::provenance();
            if let Some(p) = &provenance {
                headers = headers.insert(Header {
                    key: crate::faults::PROVENANCE_HEADER,
                    value: Some(p.as_bytes()),
                });
            }
            let mut record = FutureRecord::to(&r.topic).key(&r.key).headers(headers);
            if let Some(p) = &r.payload {
                record = record.payload(p);
            }
            if let Some(ts) = r.timestamp_ms {
                record = record.timestamp(ts);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        if let Some(h) = &self.shared {
                            h.outstanding.add(1);
                        }
                        slots.push(Slot::Sent(delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((error, _)) if is_permanent(&error) => {
                        poisoned.push((&r.topic, &r.key, i));
                        let outcome = Outcome::Rejected(error);
                        slots.push(Slot::Done(outcome));
                        break;
                    }
                    Err((error, _)) => {
                        let outcome = Outcome::Failed(error.clone());
                        slots.push(Slot::Done(outcome));
                        stopped = Some(error);
                        break;
                    }
                }
            }
        }
        Pending {
            slots,
            deadline,
            producer: self.producer.clone(),
            outstanding: self.shared.as_ref().map(|h| h.outstanding.clone()),
        }
    }

    /// Number of records queued in the producer and not yet acknowledged (this table's own,
    /// when the producer is shared).
    pub fn in_flight(&self) -> i32 {
        match &self.shared {
            Some(h) => i32::try_from(h.outstanding.get()).unwrap_or(i32::MAX),
            None => self.producer.in_flight_count(),
        }
    }
}

#[async_trait::async_trait]
impl PendingBatch for Pending {
    fn rejected_now(&self) -> Vec<usize> {
        Pending::rejected_now(self).collect()
    }

    fn accepted(&self) -> Vec<usize> {
        Pending::accepted(self).collect()
    }

    async fn wait(self: Box<Self>) -> Vec<crate::sink::Outcome> {
        Pending::wait(*self)
            .await
            .into_iter()
            .map(|o| o.map_err(|e| fault(&e)))
            .collect()
    }
}

#[async_trait::async_trait]
impl Sink for KafkaSink {
    fn kind(&self) -> SinkKind {
        SinkKind::Kafka
    }

    async fn check_connection(&self) -> Result<(), SinkError> {
        KafkaSink::check_connection(self).await
    }

    async fn enqueue(&self, records: &[OutboundRecord]) -> Box<dyn PendingBatch> {
        Box::new(KafkaSink::enqueue(self, records).await)
    }

    fn in_flight(&self) -> usize {
        usize::try_from(KafkaSink::in_flight(self)).unwrap_or(0)
    }

    fn delivery_timeout(&self) -> Duration {
        self.settings.delivery_timeout
    }

    async fn recreate(&mut self) -> Result<(), SinkError> {
        KafkaSink::renew(self).await
    }

    fn purge(&self) -> usize {
        usize::try_from(KafkaSink::purge(self)).unwrap_or(0)
    }

    async fn fence(&self, wait: Duration) -> Fenced {
        KafkaSink::fence(self, wait).await
    }

    fn watch(
        &self,
        stats: Arc<crate::stats::RelayStats>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, SinkError> {
        match &self.shared {
            Some(h) => h.group.watch(&stats, shutdown).map(|()| None),
            None => watch_brokers(&self.settings, stats, shutdown).map(Some),
        }
    }
}

/// The idle probe's client: same servers, TLS and SASL settings as the producer, never producing.
fn probe_client(
    settings: &KafkaSettings,
) -> Result<Arc<rdkafka::producer::BaseProducer>, SinkError> {
    let mut config = settings.client_config()?;
    // It only asks for metadata; librdkafka's own logs about it stay out of the relay's log.
    config
        .set("enable.idempotence", "false")
        .set("enable.gapless.guarantee", "false")
        .set("client.id", "outbox-relay-probe")
        .set_log_level(RDKafkaLogLevel::Emerg);
    Ok(Arc::new(config.create().map_err(create_error)?))
}

/// How often an idle relay asks the brokers for metadata, and how long it waits for an answer.
pub const BROKER_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// See [`BROKER_PROBE_INTERVAL`].
pub const BROKER_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Keeps [`crate::stats::RelayStats::sink_reachable`] current while the relay is idle, so
/// `/readyz` notices a broker outage (and the recovery) with no traffic: every
/// [`BROKER_PROBE_INTERVAL`] without a published event, a metadata request on a client of its
/// own (same bootstrap servers, TLS and SASL settings as the producer, never producing) must
/// answer within [`BROKER_PROBE_TIMEOUT`]. While events are being published their acknowledgements
/// are the evidence and no request is made. Stops when `shutdown` fires.
pub fn watch_brokers(
    settings: &KafkaSettings,
    stats: Arc<crate::stats::RelayStats>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, SinkError> {
    let client = probe_client(settings)?;
    let servers = settings.bootstrap_servers.clone();
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(BROKER_PROBE_INTERVAL) => {}
            }
            let answer = if published_within(&stats, BROKER_PROBE_INTERVAL) {
                Ok(())
            } else {
                let c = client.clone();
                tokio::task::spawn_blocking(move || {
                    c.client()
                        .fetch_metadata(None, BROKER_PROBE_TIMEOUT)
                        .map(drop)
                        .map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
            };
            record_probe(
                &stats,
                &servers,
                answer,
                "Kafka brokers do not answer: reporting not ready until they do",
                "Kafka brokers answer again",
            );
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::{classify, error_name};
    use crate::sink::ErrorClass;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};

    fn delivery(code: C) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn errors_are_named_as_in_the_kafka_protocol() {
        assert_eq!(
            error_name(&delivery(C::TopicAuthorizationFailed)),
            "TOPIC_AUTHORIZATION_FAILED"
        );
        assert_eq!(error_name(&delivery(C::UnknownTopic)), "_UNKNOWN_TOPIC");
        assert_eq!(
            error_name(&delivery(C::UnsupportedSASLMechanism)),
            "UNSUPPORTED_SASL_MECHANISM"
        );
        assert_eq!(
            error_name(&delivery(C::ISRInsufficient)),
            "_ISR_INSUFFICIENT"
        );
    }

    fn threads() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap()
    }

    /// The tables of a group starting together share one metadata fetch: twenty start-up checks
    /// at once do not each hold a blocking thread (a relay of 100 tables had ~100 threads).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tables_starting_together_share_one_connection_check() {
        use crate::config::KafkaSettings;
        use crate::sink::kafka::SharedProducer;
        use rdkafka::mocking::MockCluster;

        let mock = MockCluster::new(1).unwrap();
        let shared = SharedProducer::new(KafkaSettings {
            bootstrap_servers: mock.bootstrap_servers(),
            ..KafkaSettings::default()
        })
        .unwrap();
        let sinks: Vec<_> = (0..20).map(|_| shared.sink()).collect();
        let before = threads();
        let checks = sinks.iter().map(|s| s.check_connection());
        for result in futures::future::join_all(checks).await {
            result.unwrap();
        }
        let grown = threads() - before;
        // One blocking thread for the fetch and one librdkafka thread for the broker it learnt.
        assert!(grown <= 3, "20 checks grew the process by {grown} threads");
    }

    /// A failed check is not remembered: the next table checks again (and fails, naming the
    /// brokers).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_shared_check_is_not_remembered() {
        use crate::config::KafkaSettings;
        use crate::sink::SinkError;
        use crate::sink::kafka::SharedProducer;
        use std::time::{Duration, Instant};

        let shared = SharedProducer::new(KafkaSettings {
            bootstrap_servers: "127.0.0.1:1".into(),
            connect_timeout: Duration::from_millis(300),
            ..KafkaSettings::default()
        })
        .unwrap();
        for _ in 0..2 {
            let started = Instant::now();
            let error = shared.sink().check_connection().await.unwrap_err();
            assert!(matches!(error, SinkError::Unreachable { .. }), "{error}");
            assert!(error.to_string().contains("127.0.0.1:1"), "{error}");
            assert!(started.elapsed() >= Duration::from_millis(250));
        }
    }

    #[test]
    fn one_place_decides_retry_park_or_stop() {
        assert_eq!(
            classify(&delivery(C::MessageSizeTooLarge)),
            ErrorClass::Record
        );
        assert_eq!(classify(&delivery(C::InvalidTimestamp)), ErrorClass::Record);
        assert_eq!(classify(&delivery(C::MessageTimedOut)), ErrorClass::Retry);
        assert_eq!(classify(&delivery(C::NotEnoughReplicas)), ErrorClass::Retry);
        assert_eq!(classify(&KafkaError::Canceled), ErrorClass::Retry);
        assert!(matches!(
            classify(&delivery(C::TopicAuthorizationFailed)),
            ErrorClass::Stop(_)
        ));
        assert!(matches!(
            classify(&delivery(C::UnknownTopicOrPartition)),
            ErrorClass::Stop(_)
        ));
        assert_eq!(classify(&delivery(C::InvalidRequest)), ErrorClass::Unlisted);
    }
}
