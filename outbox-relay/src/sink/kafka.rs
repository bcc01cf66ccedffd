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
}

/// A batch handed to the producer, whose outcomes are not all known yet.
pub struct Pending {
    slots: Vec<Slot>,
    /// When the batch's records count as timed out (enqueue time + `delivery_timeout`).
    deadline: tokio::time::Instant,
    /// The producer the records were handed to, to drop its queue when the deadline passes.
    producer: FutureProducer<SinkContext>,
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
    pub async fn wait(self) -> Vec<Outcome> {
        let Pending {
            slots,
            deadline,
            producer,
        } = self;
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
        })
    }

    /// Fetches cluster metadata to prove the brokers are reachable (and the credentials work).
    pub async fn check_connection(&self) -> Result<(), SinkError> {
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
    pub fn recreate(&mut self) -> Result<(), SinkError> {
        self.producer = self
            .settings
            .client_config()?
            .create_with_context(self.context.clone())
            .map_err(create_error)?;
        Ok(())
    }

    /// Drops every record queued in the producer or in flight to a broker, without waiting for
    /// Kafka's answer (their delivery futures fail); returns how many there were. A record already
    /// on the wire may still be written by the broker.
    pub fn purge(&self) -> i32 {
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
        }
    }

    /// Number of records queued in the producer and not yet acknowledged.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
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
        KafkaSink::recreate(self)
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
        watch_brokers(&self.settings, stats, shutdown).map(Some)
    }
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
    let mut config = settings.client_config()?;
    // It only asks for metadata; librdkafka's own logs about it stay out of the relay's log.
    config
        .set("enable.idempotence", "false")
        .set("enable.gapless.guarantee", "false")
        .set("client.id", "outbox-relay-probe")
        .set_log_level(RDKafkaLogLevel::Emerg);
    let client: rdkafka::producer::BaseProducer = config.create().map_err(create_error)?;
    let client = Arc::new(client);
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
