//! The scenarios and the run loop: set up a database and a topic, start the relay, drive the
//! writers while the scenario's faults are injected, wait for quiescence, read the topic back
//! and compare with the ledger.

mod rebalance;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use outbox_core::WriteMode;
use outbox_relay::source::row_marks::MAX_PENDING_ACKNOWLEDGEMENTS;
use outbox_tests::{Consumed, Verdict};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use sqlx::{Connection, PgConnection};

use crate::env::{Env, pause};
use crate::live::LiveReader;
use crate::mock::MockBroker;
use crate::partition::Partition;
use crate::relay::RelayProc;
use crate::sinks::{self, Broker, Sink};
use crate::workload::{self, Book, RunDb, SharedBook, Workload};

/// Which source the relay runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceMode {
    /// `OUTBOX_SOURCE=polling`.
    Polling,
    /// `OUTBOX_SOURCE=logical`.
    Logical,
}

impl SourceMode {
    /// `polling` or `logical`.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceMode::Polling => "polling",
            SourceMode::Logical => "logical",
        }
    }
}

/// A pause the relay notices (its `PAUSE_SUSPECT` is 250 ms), with a margin.
const PAUSE_NOTICED: Duration = Duration::from_millis(400);

/// The failure a deposed leader's records produced after it resumed are reported with.
pub const ZOMBIE_PRODUCE: &str = "produced after it was resumed";

/// How long a graceful stop under load may take ([`Fault::RollingUnderLoad`]).
const ROLLING_STOP_LIMIT: Duration = Duration::from_secs(2);

const BOTH: &[SourceMode] = &[SourceMode::Polling, SourceMode::Logical];
const LOGICAL: &[SourceMode] = &[SourceMode::Logical];

/// The fault a scenario injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No fault: the workload itself is the test (late commits, rollbacks, huge transactions).
    None,
    /// SIGTERM and restart.
    Graceful,
    /// SIGTERM and restart while writers commit as fast as they can (the relay is behind): the
    /// relay must stop within [`ROLLING_STOP_LIMIT`], exit 0 and re-send nothing.
    RollingUnderLoad,
    /// The relay aborts at a failpoint; restarted.
    Failpoint(&'static str),
    /// SIGKILL at random moments; restarted.
    KillLoop,
    /// `pg_ctl stop -m immediate`, then start.
    PgImmediate,
    /// `pg_terminate_backend` of the relay's sessions.
    TerminateBackend,
    /// Mock broker down, then up.
    BrokerDown,
    /// Mock broker down; the relay is SIGKILLed during the outage, restarted, broker up.
    BrokerDownKill,
    /// Mock broker with added round-trip time.
    BrokerSlow,
    /// Mock broker answering produce requests with retriable errors.
    BrokerRetriable,
    /// Mock broker answering produce requests with fatal errors.
    BrokerFatal,
    /// Mock broker with added round-trip time (several Produce requests in flight) answering
    /// one Produce request with an error: a batch fails while later ones are delivered.
    BrokerErrorInFlight,
    /// Two relays; the active one is SIGSTOPped past its lease (its session is cut) and resumed.
    TwoRelaysStop,
    /// Two relays; the active one stops itself between reading a batch and producing it
    /// (failpoint `before_produce:<n>:stop`, after its last database call for that batch), is
    /// partitioned from PostgreSQL ([`crate::partition`]), its sessions are ended on the server,
    /// the standby takes over, and the old one is resumed at once, well within its local lease;
    /// the partition heals 1.5 s later. Nothing it enqueues after the resume may reach the
    /// topic: only the lease stops it.
    PausedAtProduce,
    /// Several relays on one table while writers commit: one joins, one leaves (SIGTERM), one
    /// is SIGSTOPped past its lease and resumed. Polling: the table is sharded and every relay
    /// is active for its shards; logical: one leader streams the slot, the others stand by
    /// ([`rebalance`]).
    Rebalance,
    /// The replication slot is dropped under the relay.
    SlotDropped,
    /// The replication slot is invalidated (`max_slot_wal_keep_size` exceeded).
    SlotInvalidated,
    /// Transactional logical messages with the outbox prefix written by a role that is not a
    /// writer, in a write mode where messages are not events: never to be published.
    MessageInjection,
    /// Oversized and unroutable events among healthy ones.
    Poison,
    /// Hostile configuration (must be refused) and hostile row data (must be relayed).
    Hostile,
    /// The scenario's private broker (NATS, RabbitMQ, Redis) SIGKILLed mid-run, events committed
    /// while it is down, then started again on the same port and data.
    SinkKill,
    /// The relay's connections to its broker cut from the server side mid-run.
    SinkCut,
    /// Events the broker refuses for good (over its size limit) and the route refuses
    /// (illegal or not allowed destinations) among healthy ones: parked, loudly, the rest
    /// delivered.
    SinkRefused,
}

/// A scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Its name (`--scenario`).
    pub name: &'static str,
    /// What it injects.
    pub fault: Fault,
    /// The source modes it runs in.
    pub sources: &'static [SourceMode],
    /// Duplicates must be zero (no crash involved).
    pub no_duplicates: bool,
    /// How the writers write events (the relay is configured to match): `table`, or
    /// `insert_delete` (logical only), where nothing can be recovered from the table, so a
    /// position confirmed too early shows up as lost events.
    pub write_mode: WriteMode,
    /// The sink the relay publishes with; every sink but Kafka runs on a private broker
    /// ([`crate::sinks`]).
    pub sink: Sink,
    /// What it shows, for the report.
    pub about: &'static str,
}

impl Scenario {
    /// Whether the broker is librdkafka's mock cluster (else Tansu).
    pub fn mock(&self) -> bool {
        matches!(
            self.fault,
            Fault::BrokerDown
                | Fault::BrokerDownKill
                | Fault::BrokerSlow
                | Fault::BrokerRetriable
                | Fault::BrokerFatal
                | Fault::BrokerErrorInFlight
        )
    }
}

/// Every scenario, in run order.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "graceful-restart",
        fault: Fault::Graceful,
        sources: BOTH,
        no_duplicates: true,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "SIGTERM mid-stream and restart, repeatedly: drain, acknowledge, exit 0",
    },
    Scenario {
        name: "rolling-restart-under-load",
        fault: Fault::RollingUnderLoad,
        sources: BOTH,
        no_duplicates: true,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "SIGTERM while unpaced writers keep the relay behind, restart, repeatedly: stop within 2 s, exit 0, no duplicates",
    },
    Scenario {
        name: "late-commits",
        fault: Fault::None,
        sources: BOTH,
        no_duplicates: true,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "half the transactions linger before commit (commit order != seq order), two long-open transactions",
    },
    Scenario {
        name: "rollbacks-huge-tx",
        fault: Fault::None,
        sources: BOTH,
        no_duplicates: true,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "30% rollbacks, one huge committed and one huge rolled-back transaction",
    },
    Scenario {
        name: "failpoint-before-produce",
        fault: Fault::Failpoint("before_produce"),
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "abort after a batch is claimed, before anything is produced",
    },
    Scenario {
        name: "failpoint-after-kafka-ack",
        fault: Fault::Failpoint("after_kafka_ack"),
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "abort after Kafka acknowledged a batch, before the source is acknowledged",
    },
    Scenario {
        name: "failpoint-after-source-ack",
        fault: Fault::Failpoint("after_source_ack"),
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "abort right after the source acknowledgement",
    },
    Scenario {
        name: "kill-loop",
        fault: Fault::KillLoop,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "SIGKILL at random moments, restart",
    },
    Scenario {
        name: "pg-immediate-restart",
        fault: Fault::PgImmediate,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "pg_ctl stop -m immediate and start, under load (harness-owned cluster only)",
    },
    Scenario {
        name: "terminate-backend",
        fault: Fault::TerminateBackend,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "pg_terminate_backend of every relay session (leader lock, listener, walsender)",
    },
    Scenario {
        name: "broker-down",
        fault: Fault::BrokerDown,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "mock broker down longer than the delivery timeout, then up",
    },
    Scenario {
        name: "broker-down-kill",
        fault: Fault::BrokerDownKill,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "mock broker down, relay SIGKILLed during the outage and restarted, broker up",
    },
    Scenario {
        name: "broker-down-kill-insert-delete",
        fault: Fault::BrokerDownKill,
        sources: LOGICAL,
        no_duplicates: false,
        write_mode: WriteMode::InsertDelete,
        sink: Sink::Kafka,
        about: "broker-down-kill with the insert_delete write mode: the replication stream is the only copy of an event",
    },
    Scenario {
        name: "broker-slow",
        fault: Fault::BrokerSlow,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "mock broker with 400 ms added round-trip time",
    },
    Scenario {
        name: "broker-retriable-errors",
        fault: Fault::BrokerRetriable,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "produce answered with NOT_ENOUGH_REPLICAS / REQUEST_TIMED_OUT (one request in flight: see RELIABILITY.md)",
    },
    Scenario {
        name: "broker-fatal-errors",
        fault: Fault::BrokerFatal,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "produce answered with INVALID_PRODUCER_EPOCH (fatal for an idempotent producer), then UNKNOWN_SERVER_ERROR",
    },
    Scenario {
        name: "broker-error-in-flight",
        fault: Fault::BrokerErrorInFlight,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "mock broker with 200 ms round-trip time fails one Produce request while later ones are in flight",
    },
    Scenario {
        name: "two-relays-sigstop",
        fault: Fault::TwoRelaysStop,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "active relay SIGSTOPped, its session cut (lease lost), standby takes over, old one resumed",
    },
    Scenario {
        name: "leader-paused-at-produce",
        fault: Fault::PausedAtProduce,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "active relay stopped between reading a batch and producing it, partitioned from PostgreSQL, its sessions ended, standby takes over, old one resumed within its local lease: it must produce nothing it held",
    },
    Scenario {
        name: "rebalance",
        fault: Fault::Rebalance,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "writers on 200 aggregates; polling: 3 relays over 16 shards, logical: a leader and standbys; a relay joins, one leaves (SIGTERM), one is SIGSTOPped past its lease and resumed: fenced, no shard (no lock) with two owners, nothing repeated by a join or a leave",
    },
    Scenario {
        name: "slot-dropped",
        fault: Fault::SlotDropped,
        sources: LOGICAL,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "the replication slot is dropped under a running relay",
    },
    Scenario {
        name: "slot-dropped-insert-delete",
        fault: Fault::SlotDropped,
        sources: LOGICAL,
        no_duplicates: false,
        write_mode: WriteMode::InsertDelete,
        sink: Sink::Kafka,
        about: "slot dropped under the relay in insert_delete mode: loud exit on every restart, no slot re-created, until `slot drop` accepts the loss",
    },
    Scenario {
        name: "slot-dropped-logical-message",
        fault: Fault::SlotDropped,
        sources: LOGICAL,
        no_duplicates: false,
        write_mode: WriteMode::LogicalMessage,
        sink: Sink::Kafka,
        about: "slot dropped under the relay in logical_message mode: loud exit on every restart, no slot re-created, until `slot drop` accepts the loss",
    },
    Scenario {
        name: "slot-invalidated",
        fault: Fault::SlotInvalidated,
        sources: LOGICAL,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "the slot is invalidated by max_slot_wal_keep_size while the relay is stopped (harness-owned cluster only)",
    },
    Scenario {
        name: "slot-invalidated-insert-delete",
        fault: Fault::SlotInvalidated,
        sources: LOGICAL,
        no_duplicates: false,
        write_mode: WriteMode::InsertDelete,
        sink: Sink::Kafka,
        about: "slot invalidated in insert_delete mode: loud exit on every restart until `slot drop` accepts the loss (harness-owned cluster only)",
    },
    Scenario {
        name: "slot-invalidated-logical-message",
        fault: Fault::SlotInvalidated,
        sources: LOGICAL,
        no_duplicates: false,
        write_mode: WriteMode::LogicalMessage,
        sink: Sink::Kafka,
        about: "slot invalidated in logical_message mode: loud exit on every restart until `slot drop` accepts the loss (harness-owned cluster only)",
    },
    Scenario {
        name: "message-injection",
        fault: Fault::MessageInjection,
        sources: LOGICAL,
        no_duplicates: true,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "another role emits outbox-prefixed pg_logical_emit_message events in table mode: none may be published (phantoms otherwise)",
    },
    Scenario {
        name: "poison-events",
        fault: Fault::Poison,
        sources: BOTH,
        no_duplicates: true,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "an oversized and an unroutable event, each followed by a healthy event of the same aggregate",
    },
    Scenario {
        name: "hostile",
        fault: Fault::Hostile,
        sources: BOTH,
        no_duplicates: true,
        write_mode: WriteMode::Table,
        sink: Sink::Kafka,
        about: "hostile settings refused with exit 2/1 and no secret logged; hostile ids, types, headers, payloads relayed",
    },
    Scenario {
        name: "nats-broker-killed",
        fault: Fault::SinkKill,
        sources: BOTH,
        no_duplicates: true,
        write_mode: WriteMode::Table,
        sink: Sink::Nats,
        about: "private nats-server (JetStream, file store) SIGKILLed mid-run, events committed while it is down, restarted on the same port and store: nothing lost or inverted, re-sends dropped by Nats-Msg-Id",
    },
    Scenario {
        name: "nats-connection-cut",
        fault: Fault::SinkCut,
        sources: BOTH,
        no_duplicates: true,
        write_mode: WriteMode::Table,
        sink: Sink::Nats,
        about: "the relay's NATS connection closed under it mid-run (a forwarder in front of a private nats-server closes its sockets), every other time after the stream's acks were swallowed",
    },
    Scenario {
        name: "nats-publish-refused",
        fault: Fault::SinkRefused,
        sources: BOTH,
        no_duplicates: true,
        write_mode: WriteMode::Table,
        sink: Sink::Nats,
        about: "events over the stream's max_msg_size (256 KiB) and the server's max_payload, and unroutable destinations, among healthy ones: parked with their aggregates, loudly, the rest delivered",
    },
    Scenario {
        name: "rabbitmq-broker-killed",
        fault: Fault::SinkKill,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Rabbitmq,
        about: "private RabbitMQ node SIGKILLed mid-run, events committed while it is down, restarted on the same port and data: nothing lost or inverted, duplicates within the window (message_id = event id)",
    },
    Scenario {
        name: "rabbitmq-connection-cut",
        fault: Fault::SinkCut,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Rabbitmq,
        about: "the relay's AMQP connection closed under it mid-run (a forwarder in front of the private node closes its sockets), every other time after the publisher confirms were swallowed",
    },
    Scenario {
        name: "rabbitmq-publish-refused",
        fault: Fault::SinkRefused,
        sources: BOTH,
        no_duplicates: false,
        write_mode: WriteMode::Table,
        sink: Sink::Rabbitmq,
        about: "events over the private node's max_message_size (256 KiB; the broker closes the channel), and unroutable destinations, among healthy ones: parked with their aggregates, loudly, the rest delivered",
    },
    Scenario {
        name: "redis-broker-killed",
        fault: Fault::SinkKill,
        sources: BOTH,
        no_duplicates: true,
        write_mode: WriteMode::Table,
        sink: Sink::Redis,
        about: "private redis-server (appendfsync always) SIGKILLed mid-run, events committed while it is down, restarted: nothing lost or inverted, re-sends dropped by the dedupe script",
    },
    Scenario {
        name: "redis-connection-cut",
        fault: Fault::SinkCut,
        sources: BOTH,
        no_duplicates: true,
        write_mode: WriteMode::Table,
        sink: Sink::Redis,
        about: "the relay's connections killed by a private redis-server mid-run (CLIENT KILL TYPE normal), every other time after its replies were swallowed (the relay connects through a forwarder)",
    },
    Scenario {
        name: "redis-publish-refused",
        fault: Fault::SinkRefused,
        sources: BOTH,
        no_duplicates: true,
        write_mode: WriteMode::Table,
        sink: Sink::Redis,
        about: "events over the server's proto-max-bulk-len (1 MiB), and unroutable destinations, among healthy ones: parked with their aggregates, loudly, the rest delivered",
    },
];

/// The relay's standby status update interval in every run (`logical.status_interval`): the
/// logical duplicate bound counts one interval's acknowledgements (see [`Settings::window`]).
pub const STATUS_INTERVAL_MS: u64 = 50;

/// Rows a relay's log says it re-published from the table *without* a consistent snapshot
/// (`re-publishing unpublished rows … rows=N consistent_snapshot=false`): after a crash or rewind
/// during a re-publication, every unpublished row is published again while the rows committed
/// after the slot's position also arrive through the stream — duplicates beyond the window, as
/// the relay documents. With a snapshot (a new or lost slot) nothing is published twice.
pub fn republished_without_snapshot(log: &str) -> usize {
    let mut total = 0;
    for line in log.lines() {
        let plain = strip_ansi(line);
        if !plain.contains("re-publishing unpublished rows from the outbox table")
            || !plain.contains("consistent_snapshot=false")
        {
            continue;
        }
        if let Some(n) = plain
            .split_whitespace()
            .find_map(|w| w.strip_prefix("rows="))
            .and_then(|n| n.parse::<usize>().ok())
        {
            total += n;
        }
    }
    total
}

/// `line` without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Knobs of a whole chaos session.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Small workloads.
    pub quick: bool,
    /// Base seed; run k of a scenario uses `seed + k`.
    pub seed: u64,
    /// Relay batch size.
    pub batch_size: usize,
    /// Batches the relay keeps in flight (for the duplicate bound).
    pub in_flight: usize,
    /// Partitions of each run's topic.
    pub partitions: i32,
}

impl Settings {
    /// The duplicate bound of one fault, besides re-publication from the table and a slot
    /// rewound by a PostgreSQL crash (both measured per run): at most this many events are
    /// re-sent after one crash, rewind or lost connection.
    ///
    /// Polling: the batches in flight (produced, not yet acknowledged). Logical: the same, plus
    /// what the relay acknowledged after its last standby status update — the server resumes
    /// from the slot's confirmed position, which only moves with a status update. The chaos
    /// relay sends one every [`STATUS_INTERVAL_MS`]; the pump acknowledges a batch only after
    /// Kafka's verdict on it, and a whole window can be acknowledged at once (its batches were
    /// delivered together), so one status interval is charged one more window.
    ///
    /// Both, in `table` mode: the acknowledged batches whose row marks were still running
    /// ([`MAX_PENDING_ACKNOWLEDGEMENTS`]): the relay had handed them over, but neither had the
    /// rows marked nor the slot confirmed past them.
    pub fn window(&self, source: SourceMode) -> usize {
        let marking = self.batch_size * MAX_PENDING_ACKNOWLEDGEMENTS;
        match source {
            SourceMode::Polling => self.batch_size * self.in_flight + marking,
            SourceMode::Logical => 2 * self.batch_size * self.in_flight + marking,
        }
    }

    fn workload(&self, fault: Fault) -> Workload {
        let (writers, txs) = if self.quick { (4, 30) } else { (6, 120) };
        let mut w = Workload {
            writers,
            txs,
            accounts: 12,
            max_events: 3,
            rollback_pct: 10,
            linger_pct: 20,
            linger_max_ms: 40,
            pace_ms: 30,
            long_open_ms: vec![2500],
            huge: Vec::new(),
            hostile: false,
            write_mode: WriteMode::Table,
        };
        match fault {
            Fault::None => {
                w.linger_pct = 50;
                w.linger_max_ms = 200;
                w.long_open_ms = vec![2000, 4000];
            }
            Fault::Hostile => w.hostile = true,
            // The writers keep going through the loss, the restart loop and the acceptance, so
            // that events committed after the new slot streams are checked too.
            Fault::SlotDropped | Fault::SlotInvalidated => w.txs *= 3,
            // Writers still committing while the broker goes away and comes back.
            Fault::SinkKill | Fault::SinkCut => w.txs *= 2,
            // Writers still running once the restarted relay is active and has paused itself.
            // The relay is restarted first (the logical one may take seconds to stream again):
            // quick writers must outlast that to reach the failpoint.
            Fault::PausedAtProduce => w.txs *= if self.quick { 12 } else { 4 },
            // Writers on many aggregates (spread over the shards), still committing through
            // every join, leave and pause, each of which waits for the relays to settle.
            Fault::Rebalance => {
                w.accounts = rebalance::AGGREGATES;
                w.txs *= if self.quick { 12 } else { 6 };
            }
            Fault::RollingUnderLoad => {
                // As fast as the writers can commit, beside a backlog of 2,500-event
                // transactions: the relay is behind when it is stopped. (A graceful stop of the
                // logical source finishes the transaction it has begun: one far larger than
                // these takes longer than ROLLING_STOP_LIMIT to finish.)
                w.writers = if self.quick { 6 } else { 10 };
                w.txs = if self.quick { 800 } else { 2500 };
                w.huge = vec![(2_500, true); if self.quick { 8 } else { 24 }];
                w.pace_ms = 0;
                w.linger_pct = 5;
                w.long_open_ms = Vec::new();
            }
            _ => {}
        }
        w
    }
}

/// What one run showed.
#[derive(Debug, Default, Clone)]
pub struct RunResult {
    /// Committed events (ledger).
    pub committed: usize,
    /// Rolled-back events (ledger).
    pub rolled_back: usize,
    /// The comparison.
    pub verdict: Verdict,
    /// Records whose `id` header is missing or not a UUID (counted as phantoms).
    pub unidentified: usize,
    /// Faults injected.
    pub faults: usize,
    /// Duplicates attributed to each fault.
    pub per_fault: Vec<usize>,
    /// Per fault, the rows re-published from the table without a consistent snapshot by the
    /// relays that ran after it (added to that fault's duplicate bound).
    pub republished_per_fault: Vec<usize>,
    /// The same rows re-published before the first fault marker.
    pub republished_before: usize,
    /// Per fault, PostgreSQL restarts only: records read since the slot was last saved to disk,
    /// seen as a change of its restart position or catalog xmin (added to the logical source's
    /// bound: the slot rewinds to that save).
    pub since_slot_save: Vec<usize>,
    /// Lost slots in `insert_delete`/`logical_message` modes: committed events never read that
    /// were committed before the operator accepted the loss (`outbox-relay slot drop`) and the
    /// new slot streamed — the documented, accepted loss; taken out of the ledger, so `lost`
    /// counts only events the relay should have delivered.
    pub accepted_loss: usize,
    /// Recovery times after each fault, ms.
    pub recovery_ms: Vec<f64>,
    /// Problems that fail the run besides the figures.
    pub failures: Vec<String>,
    /// Observations.
    pub notes: Vec<String>,
    /// Whether the run passed.
    pub passed: bool,
    /// Why the run did not happen (a broker binary is missing); it counts as passed.
    pub skipped: Option<String>,
    /// The last lines of the current relay's log (shown when the run failed).
    pub log_tail: Vec<String>,
}

/// A hostile setting: what it is, the variables, the exit code it must cause (any non-zero
/// when `None`).
type HostileCase = (&'static str, Vec<(String, String)>, Option<i32>);

/// One run's moving parts.
struct Run<'a> {
    env: &'a Env,
    settings: &'a Settings,
    scenario: &'a Scenario,
    bin: PathBuf,
    db: Arc<RunDb>,
    topic: String,
    aggregate_type: String,
    bootstrap: String,
    slot: String,
    base_env: Vec<(String, String)>,
    /// The source the relays run.
    source: SourceMode,
    /// Relays stopped as leaders and resumed after another relay took over
    /// ([`Fault::PausedAtProduce`], [`Fault::Rebalance`]).
    deposed: Vec<Deposed>,
    /// The forwarder a partitioned relay connects through; kept for the run.
    partition: Option<Arc<Partition>>,
    relay: Option<RelayProc>,
    standby: Option<RelayProc>,
    /// The other running relays of a [`Fault::Rebalance`] run.
    members: Vec<RelayProc>,
    /// Relays of a [`Fault::Rebalance`] run that have left (their logs are kept for the report).
    left: Vec<RelayProc>,
    /// Relays started so far (names the next one).
    started: usize,
    /// Fault markers after which no duplicate may be read (graceful joins and leaves), with
    /// what happened there.
    clean_marks: Vec<(usize, &'static str)>,
    /// Reads the lock table during a [`Fault::Rebalance`] run.
    sampler: Option<rebalance::LockSampler>,
    /// Faults of a [`Fault::Rebalance`] run begun while the writers were still committing.
    under_load: usize,
    /// The live reader of the Kafka topic (none for the other sinks: their duplicates are
    /// counted over the whole run).
    live: Option<LiveReader>,
    book: SharedBook,
    mock: Option<MockBroker>,
    /// The private broker of a NATS, RabbitMQ or Redis scenario.
    broker: Option<Broker>,
    rng: StdRng,
    result: RunResult,
    probes: usize,
    /// Rows re-published without a snapshot by relay processes already replaced.
    republished_retired: usize,
    /// The running total of those rows at each fault marker.
    republished_at_marks: Vec<usize>,
    /// Per fault marker, records read since the slot was last saved to disk (PostgreSQL
    /// restarts only; 0 otherwise).
    since_slot_save: Vec<usize>,
    /// A deliberately broken relay runs: expected to lose events, so waits for them are short.
    mutant: bool,
    /// The poison event only the broker's size limit refuses ([`Fault::SinkRefused`]).
    broker_poison: Option<uuid::Uuid>,
}

fn kv(k: &str, v: impl Into<String>) -> (String, String) {
    (k.to_owned(), v.into())
}

impl<'a> Run<'a> {
    async fn setup(
        env: &'a Env,
        settings: &'a Settings,
        scenario: &'a Scenario,
        source: SourceMode,
        bin: &Path,
        mutant: Option<&str>,
        seed: u64,
    ) -> Result<Self> {
        let tag = &outbox_tests::unique("c")[2..];
        let db_name = format!("chaos_{}_{tag}", scenario.name.replace('-', "_"));
        let accounts = settings.workload(scenario.fault).accounts;
        let db = Arc::new(RunDb::create(&env.admin_url, &db_name, accounts).await?);
        let aggregate_type = format!("chaos_{tag}");
        let topic = format!("outbox.event.{aggregate_type}");
        let mut mock = None;
        let mut broker = None;
        let bootstrap = if scenario.sink != Sink::Kafka {
            let forwarder = scenario.fault == Fault::SinkCut;
            let dedupe_off = mutant == Some(sinks::DEDUPE_OFF);
            broker = Some(Broker::start(scenario.sink, &topic, forwarder, dedupe_off, tag).await?);
            env.tansu.clone()
        } else if scenario.mock() {
            let mut m = MockBroker::start().await?;
            m.command(&format!("topic {topic} {}", settings.partitions))
                .await?;
            let b = m.bootstrap.clone();
            mock = Some(m);
            b
        } else {
            outbox_tests::create_topic_on(&env.tansu, &topic, settings.partitions).await?;
            env.tansu.clone()
        };
        let slot = format!("chaos_{tag}");
        let delivery_timeout = if scenario.mock() { "3s" } else { "10s" };
        let mut base_env = vec![
            kv("OUTBOX_DATABASE_URL", db.url.clone()),
            kv("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", bootstrap.clone()),
            kv("OUTBOX_SOURCE", source.as_str()),
            kv("OUTBOX_SLOT", slot.clone()),
            kv("OUTBOX_PUBLICATION", slot.clone()),
            kv("OUTBOX_POLL_INTERVAL", "200ms"),
            kv("OUTBOX_STANDBY_INTERVAL", "200ms"),
            kv("OUTBOX_BATCH_SIZE", settings.batch_size.to_string()),
            kv(
                "OUTBOX_MAX_IN_FLIGHT_BATCHES",
                settings.in_flight.to_string(),
            ),
            kv("OUTBOX_STATUS_INTERVAL", format!("{STATUS_INTERVAL_MS}ms")),
            kv("OUTBOX_HEARTBEAT_INTERVAL", "2s"),
            kv("OUTBOX_SHUTDOWN_TIMEOUT", "20s"),
            kv("OUTBOX_RETENTION", "0s"),
            kv("OUTBOX_KAFKA__DELIVERY_TIMEOUT", delivery_timeout),
            kv("OUTBOX_WRITE_MODE", scenario.write_mode.as_str()),
            kv(
                "RUST_LOG",
                std::env::var("OUTBOX_CHAOS_RELAY_LOG")
                    .unwrap_or_else(|_| "info,sqlx=warn,rdkafka=warn".into()),
            ),
        ];
        if let Some(m) = mutant.filter(|m| *m != sinks::DEDUPE_OFF) {
            base_env.push(kv("OUTBOX_MUTANT", m));
        }
        if let Some(b) = &broker {
            base_env.extend(b.relay_env(tag).await?);
        }
        if scenario.fault == Fault::PausedAtProduce {
            // Each record names the process that enqueued it and when (failpoint builds only).
            base_env.push(kv("OUTBOX_FAILPOINT_PROVENANCE", "1"));
        }
        if scenario.fault == Fault::Rebalance {
            base_env.extend(rebalance::prepare(&db, source, bin, &base_env).await?);
        }
        if scenario.fault == Fault::BrokerRetriable {
            // One Produce request in flight. When a request fails with a retriable error while a
            // later one of the same partition succeeds, librdkafka acknowledges the failed
            // request's records implicitly (a real broker refuses a sequence that does not
            // follow the last stored one, so they must have been stored). The mock cluster does
            // not check sequences for a non-transactional producer and never stored them: the
            // run would report a loss the mock, not the relay, made.
            base_env.push(kv("OUTBOX_KAFKA__PROPERTIES__MAX_IN_FLIGHT", "1"));
        }
        let live = if scenario.sink == Sink::Kafka {
            Some(LiveReader::start(&bootstrap, &topic, settings.partitions)?)
        } else {
            None
        };
        Ok(Self {
            env,
            settings,
            scenario,
            bin: bin.to_path_buf(),
            db,
            topic,
            aggregate_type,
            bootstrap,
            slot,
            base_env,
            source,
            deposed: Vec::new(),
            partition: None,
            relay: None,
            standby: None,
            members: Vec::new(),
            left: Vec::new(),
            started: 1,
            clean_marks: Vec::new(),
            sampler: None,
            under_load: 0,
            live,
            book: Arc::new(Mutex::new(Book::default())),
            mock,
            broker,
            rng: StdRng::seed_from_u64(seed),
            result: RunResult::default(),
            probes: 0,
            republished_retired: 0,
            republished_at_marks: Vec::new(),
            since_slot_save: Vec::new(),
            mutant: mutant.is_some(),
            broker_poison: None,
        })
    }

    fn spawn(&self, name: &str, extra: &[(String, String)]) -> Result<RelayProc> {
        let mut env = self.base_env.clone();
        env.extend_from_slice(extra);
        RelayProc::start(&self.bin, name, &env)
    }

    async fn start_relay(&mut self, extra: &[(String, String)]) -> Result<()> {
        let r = self.spawn("a", extra)?;
        if let Some(old) = self.relay.replace(r) {
            self.republished_retired += republished_without_snapshot(&old.log());
        }
        Ok(())
    }

    /// Rows re-published without a snapshot so far, by every relay process of the run.
    fn republished_so_far(&self) -> usize {
        let mut n = self.republished_retired;
        for r in [self.relay.as_ref(), self.standby.as_ref()]
            .into_iter()
            .flatten()
            .chain(&self.members)
            .chain(&self.left)
        {
            n += republished_without_snapshot(&r.log());
        }
        n
    }

    /// Waits `ms` while polling the slot's restart position and catalog xmin every 20 ms;
    /// returns the records read before the last poll that did not yet see the latest change (the
    /// slot was saved after it), or 0 when no change was seen.
    async fn watch_slot_saves(&mut self, ms: u64) -> Result<usize> {
        let mut admin = PgConnection::connect(&self.env.admin_url).await?;
        let started = Instant::now();
        let mut last: Option<(Option<String>, Option<String>)> = None;
        let mut read_at_previous_poll = 0;
        let mut read_before_save = 0;
        while started.elapsed() < Duration::from_millis(ms) {
            let read_now = self.live_count();
            let row: Option<(Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT restart_lsn::text, catalog_xmin::text FROM pg_replication_slots \
                 WHERE slot_name = $1",
            )
            .bind(&self.slot)
            .fetch_optional(&mut admin)
            .await?;
            if let Some(row) = row {
                if last.as_ref().is_some_and(|l| *l != row) {
                    read_before_save = read_at_previous_poll;
                }
                last = Some(row);
            }
            read_at_previous_poll = read_now;
            pause(20).await;
        }
        let _ = admin.close().await;
        Ok(read_before_save)
    }

    /// Records read by the live reader so far (0 without one).
    fn live_count(&self) -> usize {
        self.live.as_ref().map_or(0, LiveReader::count)
    }

    /// Whether the live reader has read `id` (never without one).
    fn live_seen(&self, id: uuid::Uuid) -> bool {
        self.live.as_ref().is_some_and(|l| l.seen(id))
    }

    /// Sets a fault marker now (see [`LiveReader::mark`]).
    fn mark(&mut self) {
        if let Some(l) = self.live.as_mut() {
            l.mark();
        }
        self.republished_at_marks.push(self.republished_so_far());
        self.since_slot_save.push(0);
    }

    /// Sets a fault marker once the stream went quiet (see [`LiveReader::mark_after_quiet`]).
    async fn mark_after_quiet(&mut self, quiet: Duration, max: Duration) {
        if let Some(l) = self.live.as_mut() {
            l.mark_after_quiet(quiet, max).await;
        }
        self.republished_at_marks.push(self.republished_so_far());
        self.since_slot_save.push(0);
    }

    /// Restarts the relay if it exited on its own (a supervisor would), noting it.
    async fn supervise(&mut self) -> Result<()> {
        let exited = match self.relay.as_mut() {
            Some(r) => r.exit_code(),
            None => return Ok(()),
        };
        if let Some(code) = exited {
            let log = self.relay.as_ref().map(|r| r.log()).unwrap_or_default();
            let last: Vec<&str> = log.lines().rev().take(3).collect();
            let name = self
                .relay
                .as_ref()
                .map(|r| r.name.clone())
                .unwrap_or_default();
            self.result.notes.push(format!(
                "relay {name} exited on its own with code {code} (restarted): {}",
                last.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ));
            self.start_relay(&[]).await?;
        }
        Ok(())
    }

    /// A fault has ended: measure the time until a fresh event is acknowledged.
    async fn recovered(&mut self) -> Result<()> {
        let started = Instant::now();
        self.probes += 1;
        let mode = self.scenario.write_mode;
        let id = workload::probe(
            &self.db,
            mode,
            &self.aggregate_type,
            self.probes,
            &self.book,
        )
        .await?;
        let deadline = Duration::from_secs(if self.mutant {
            10
        } else if self.settings.quick {
            30
        } else {
            60
        });
        loop {
            let done = if mode == WriteMode::Table {
                workload::wait_published(&self.db, id, Duration::from_millis(500))
                    .await
                    .is_some()
            } else {
                // No row to look at: the probe is through once it is on the topic.
                let until = Instant::now() + Duration::from_millis(500);
                while !self.live_seen(id) && Instant::now() < until {
                    pause(20).await;
                }
                self.live_seen(id)
            };
            if done {
                self.result
                    .recovery_ms
                    .push(started.elapsed().as_secs_f64() * 1000.0);
                return Ok(());
            }
            self.supervise().await?;
            if started.elapsed() > deadline {
                self.result.failures.push(format!(
                    "no recovery: a probe committed after fault {} was not acknowledged within {deadline:?}",
                    self.result.faults
                ));
                return Ok(());
            }
        }
    }

    fn gap(&mut self, lo: u64, hi: u64) -> u64 {
        self.rng.random_range(lo..=hi)
    }

    async fn terminate_relay_sessions(&self) -> Result<u64> {
        let mut admin = PgConnection::connect(&self.env.admin_url).await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()
               AND (application_name LIKE 'outbox-relay%' OR backend_type = 'walsender')",
        )
        .bind(&self.db.name)
        .fetch_one(&mut admin)
        .await?;
        let _ = admin.close().await;
        Ok(n as u64)
    }

    /// Cuts the sessions of the leader-lock holder and every walsender of the database.
    async fn cut_leader(&self) -> Result<u64> {
        let mut admin = PgConnection::connect(&self.env.admin_url).await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a
             WHERE a.datname = $1 AND a.pid <> pg_backend_pid()
               AND (a.backend_type = 'walsender'
                    OR a.pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted))",
        )
        .bind(&self.db.name)
        .fetch_one(&mut admin)
        .await?;
        let _ = admin.close().await;
        Ok(n as u64)
    }

    async fn fault_loop(&mut self, writers: &tokio::task::JoinHandle<Result<()>>) -> Result<()> {
        let quick = self.settings.quick;
        let max_faults = if quick { 3 } else { 6 };
        let quiet = Duration::from_millis(800);
        let max_quiet = Duration::from_secs(3);
        match self.scenario.fault {
            Fault::None | Fault::Hostile => {}
            Fault::Poison => {
                pause(500).await;
                let notes = workload::poison(&self.db, &self.aggregate_type, &self.book).await?;
                self.result.failures.extend(notes);
            }
            Fault::SinkRefused => {
                pause(500).await;
                let sink = self.scenario.sink;
                let id = sinks::broker_poison(
                    &self.db,
                    &self.aggregate_type,
                    sink.broker_poison_bytes(),
                    &self.book,
                )
                .await?;
                self.broker_poison = Some(id);
                pause(300).await;
                let notes = workload::poison(&self.db, &self.aggregate_type, &self.book).await?;
                self.result.failures.extend(notes);
                // RabbitMQ answers an oversized body by closing the channel: every publish in
                // flight on it is re-sent (duplicates within the window for each). The others
                // refuse only the record.
                if sink == Sink::Rabbitmq {
                    self.result.faults += 2;
                }
            }
            Fault::SinkKill => {
                // Each restart of a RabbitMQ node takes seconds: fewer rounds in full mode.
                let faults = match (self.scenario.sink, quick) {
                    (_, true) => 2,
                    (Sink::Rabbitmq, false) => 3,
                    (_, false) => 4,
                };
                while self.result.faults < faults {
                    let g = self.gap(400, 1000);
                    pause(g).await;
                    self.mark();
                    let broker = self.broker.as_mut().context("private broker")?;
                    broker.kill9().await?;
                    // Events committed while the broker is down: the relay has something to
                    // deliver into the outage whether or not the writers are still running.
                    workload::huge_tx(
                        &self.db,
                        self.scenario.write_mode,
                        &self.aggregate_type,
                        &format!("outage-{}", self.result.faults),
                        25,
                        true,
                        &self.book,
                    )
                    .await?;
                    pause(800).await;
                    broker.restart().await?;
                    self.result.faults += 1;
                    self.recovered().await?;
                }
                self.fault_noticed();
            }
            Fault::SinkCut => {
                let faults = if quick { 3 } else { 6 };
                let deadline = Instant::now() + Duration::from_secs(if quick { 45 } else { 120 });
                while self.result.faults < faults && Instant::now() < deadline {
                    let g = self.gap(250, 800);
                    pause(g).await;
                    self.mark();
                    // Every other cut: first the broker's acknowledgements are swallowed while
                    // events are published (the broker stores them, the relay never hears of
                    // it), then the connection closes: everything in flight is re-sent.
                    let broker = self.broker.as_ref().context("private broker")?;
                    if self.result.faults % 2 == 1 && broker.swallow_acks() {
                        workload::huge_tx(
                            &self.db,
                            self.scenario.write_mode,
                            &self.aggregate_type,
                            &format!("unacknowledged-{}", self.result.faults),
                            25,
                            true,
                            &self.book,
                        )
                        .await?;
                        pause(500).await;
                    }
                    let broker = self.broker.as_ref().context("private broker")?;
                    let n = broker.cut().await?;
                    if n > 0 {
                        self.result.faults += 1;
                        self.recovered().await?;
                    } else {
                        // No connection to cut (the relay was between two): no fault either.
                        self.republished_at_marks.pop();
                        self.since_slot_save.pop();
                    }
                }
                if self.result.faults < faults {
                    self.result.failures.push(format!(
                        "only {} of {faults} cuts found a relay connection to close",
                        self.result.faults
                    ));
                }
                self.fault_noticed();
            }
            Fault::Graceful | Fault::RollingUnderLoad | Fault::KillLoop => {
                while self.result.faults < max_faults && !writers.is_finished() {
                    let g = self.gap(400, 1500);
                    pause(g).await;
                    self.supervise().await?;
                    let relay = self.relay.as_mut().context("relay")?;
                    if self.scenario.fault != Fault::KillLoop {
                        let asked = std::time::Instant::now();
                        let code = relay.terminate(Duration::from_secs(25)).await;
                        let took = asked.elapsed();
                        if self.scenario.fault == Fault::RollingUnderLoad
                            && took > ROLLING_STOP_LIMIT
                        {
                            self.result.failures.push(format!(
                                "a graceful stop under load took {took:?} (limit {ROLLING_STOP_LIMIT:?})"
                            ));
                        }
                        match code {
                            Some(0) => {}
                            other => self.result.failures.push(format!(
                                "graceful stop exited with {other:?}: {}",
                                relay
                                    .log()
                                    .lines()
                                    .rev()
                                    .take(2)
                                    .collect::<Vec<_>>()
                                    .join(" | ")
                            )),
                        }
                    } else {
                        relay.kill9().await;
                    }
                    self.result.faults += 1;
                    self.mark_after_quiet(quiet, max_quiet).await;
                    self.start_relay(&[]).await?;
                    self.recovered().await?;
                }
            }
            Fault::Failpoint(point) => {
                let n = self.gap(1, 4);
                if let Some(mut r) = self.relay.take() {
                    r.kill9().await;
                }
                self.start_relay(&[kv("OUTBOX_FAILPOINT", format!("{point}:{n}"))])
                    .await?;
                let mut idle_since: Option<Instant> = None;
                loop {
                    pause(20).await;
                    let relay = self.relay.as_mut().context("relay")?;
                    if relay.exit_code().is_some() {
                        self.result.faults += 1;
                        idle_since = None;
                        self.mark_after_quiet(quiet, max_quiet).await;
                        if self.result.faults < max_faults {
                            let n = self.gap(1, 4);
                            self.start_relay(&[kv("OUTBOX_FAILPOINT", format!("{point}:{n}"))])
                                .await?;
                        } else {
                            self.start_relay(&[]).await?;
                            self.recovered().await?;
                            break;
                        }
                    } else if writers.is_finished() {
                        let since = *idle_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_secs(5) {
                            // The point was not reached again: carry on without it.
                            self.relay.as_mut().unwrap().kill9().await;
                            self.start_relay(&[]).await?;
                            self.recovered().await?;
                            break;
                        }
                    }
                }
                if self.result.faults == 0 {
                    self.result
                        .failures
                        .push(format!("the failpoint `{point}` never fired (built without the `failpoints` feature?)"));
                }
            }
            Fault::PgImmediate => {
                let Some(own) = self.env.own.clone() else {
                    self.result
                        .notes
                        .push("skipped: the cluster is not the harness's own".into());
                    return Ok(());
                };
                let faults = if quick { 2 } else { 3 };
                while self.result.faults < faults && !writers.is_finished() {
                    let g = self.gap(700, 1500);
                    // PostgreSQL 15 writes a logical slot's confirmed position to disk only when
                    // its restart position or catalog xmin moves (then at once); a crash rewinds
                    // the slot to that save, and the relay re-streams what it acknowledged since.
                    // Watch for the save until the crash: what was read since bounds it.
                    let read_before_save = self.watch_slot_saves(g).await?;
                    own.stop_immediate()?;
                    self.mark();
                    let since_save = self.live_count() - read_before_save;
                    if let Some(last) = self.since_slot_save.last_mut() {
                        *last = since_save;
                    }
                    pause(1000).await;
                    own.start()?;
                    self.result.faults += 1;
                    self.recovered().await?;
                }
            }
            Fault::TerminateBackend => {
                while self.result.faults < max_faults + 1 && !writers.is_finished() {
                    let g = self.gap(300, 1200);
                    pause(g).await;
                    let n = self.terminate_relay_sessions().await?;
                    if n > 0 {
                        self.result.faults += 1;
                        self.mark();
                        self.recovered().await?;
                    }
                }
            }
            Fault::BrokerDown
            | Fault::BrokerDownKill
            | Fault::BrokerSlow
            | Fault::BrokerRetriable
            | Fault::BrokerFatal
            | Fault::BrokerErrorInFlight => {
                let faults = if quick { 2 } else { 4 };
                while self.result.faults < faults && !writers.is_finished() {
                    let g = self.gap(500, 1200);
                    pause(g).await;
                    self.mark();
                    let mock = self.mock.as_mut().context("mock broker")?;
                    match self.scenario.fault {
                        Fault::BrokerDown => {
                            mock.command("down").await?;
                            pause(4000).await;
                            mock.command("up").await?;
                        }
                        Fault::BrokerDownKill => {
                            mock.command("down").await?;
                            pause(1500).await;
                            if let Some(r) = self.relay.as_mut() {
                                r.kill9().await;
                            }
                            self.start_relay(&[]).await?;
                            pause(1000).await;
                            let mock = self.mock.as_mut().context("mock broker")?;
                            mock.command("up").await?;
                        }
                        Fault::BrokerSlow => {
                            mock.command("rtt 400").await?;
                            pause(3000).await;
                            mock.command("rtt 0").await?;
                        }
                        Fault::BrokerRetriable => {
                            mock.command("errors not_enough_replicas request_timed_out not_enough_replicas request_timed_out").await?;
                            pause(2000).await;
                            mock.command("clear").await?;
                        }
                        Fault::BrokerErrorInFlight => {
                            // A burst on one aggregate fills the relay's window: several
                            // batches of that key in flight when one request fails.
                            mock.command("rtt 200").await?;
                            let account = format!("burst-{}", self.result.faults);
                            workload::huge_tx(
                                &self.db,
                                self.scenario.write_mode,
                                &self.aggregate_type,
                                &account,
                                600,
                                true,
                                &self.book,
                            )
                            .await?;
                            pause(250).await;
                            let mock = self.mock.as_mut().context("mock broker")?;
                            mock.command("errors unknown_server_error").await?;
                            pause(2000).await;
                            mock.command("clear").await?;
                            mock.command("rtt 0").await?;
                        }
                        _ => {
                            // Alternately a fatal idempotence error and a non-retriable error of
                            // single Produce requests (later requests of the partition succeed).
                            if self.result.faults.is_multiple_of(2) {
                                mock.command("errors invalid_producer_epoch").await?;
                            } else {
                                mock.command("errors unknown_server_error unknown_server_error")
                                    .await?;
                            }
                            pause(2000).await;
                            mock.command("clear").await?;
                        }
                    }
                    self.result.faults += 1;
                    self.recovered().await?;
                }
            }
            Fault::TwoRelaysStop => {
                let standby = self.spawn("b", &[])?;
                self.standby = Some(standby);
                let faults = if quick { 1 } else { 2 };
                while self.result.faults < faults && !writers.is_finished() {
                    let g = self.gap(500, 1200);
                    pause(g).await;
                    let active = self.relay.as_mut().context("relay")?;
                    active.signal("STOP").await?;
                    self.mark();
                    pause(300).await;
                    let leads = |r: &Option<RelayProc>| {
                        r.as_ref()
                            .map(|r| r.log().matches("acquired the leader lock").count())
                            .unwrap_or(0)
                    };
                    let before = leads(&self.standby);
                    self.cut_leader().await?;
                    let deadline = Instant::now() + Duration::from_secs(15);
                    while leads(&self.standby) == before {
                        if Instant::now() > deadline {
                            self.result.failures.push("the standby never took over after the active relay's session was cut".into());
                            break;
                        }
                        pause(25).await;
                    }
                    // The new leader works for a while; then the old one wakes up.
                    pause(1500).await;
                    let active = self.relay.as_mut().context("relay")?;
                    active.signal("CONT").await?;
                    self.result.faults += 1;
                    pause(1500).await;
                    std::mem::swap(&mut self.relay, &mut self.standby);
                    self.recovered().await?;
                }
            }
            Fault::PausedAtProduce => {
                let faults = if quick { 1 } else { 2 };
                let partition = Arc::new(Partition::start(&self.db.url).await?);
                self.partition = Some(Arc::clone(&partition));
                let leads = |r: &Option<RelayProc>| {
                    r.as_ref()
                        .map(|r| r.log().matches("acquired the leader lock").count())
                        .unwrap_or(0)
                };
                while self.result.faults < faults && !writers.is_finished() {
                    // The active relay, restarted to stop itself at the n-th batch it produces
                    // (a standby left from the previous round stopped first, so it is the one).
                    if let Some(mut r) = self.standby.take() {
                        r.terminate(Duration::from_secs(15)).await;
                    }
                    if let Some(mut r) = self.relay.take() {
                        r.terminate(Duration::from_secs(15)).await;
                    }
                    let n = self.gap(2, 5);
                    self.start_relay(&[
                        kv("OUTBOX_FAILPOINT", format!("before_produce:{n}:stop")),
                        kv("OUTBOX_DATABASE_URL", partition.url(&self.db.url)),
                    ])
                    .await?;
                    let active = self.relay.as_mut().context("relay")?;
                    if !active
                        .wait_for_log("this relay is active", Duration::from_secs(30))
                        .await
                    {
                        self.result
                            .failures
                            .push("the restarted relay never became active".into());
                        break;
                    }
                    self.standby = Some(self.spawn("b", &[])?);
                    let active = self.relay.as_mut().context("relay")?;
                    if !active
                        .wait_for_log("reached: stopping", Duration::from_secs(30))
                        .await
                    {
                        // Writers done before the n-th batch: nothing to pause at.
                        break;
                    }
                    let stopped_at = Instant::now();
                    self.mark();
                    let before = leads(&self.standby);
                    // Partitioned from PostgreSQL, its sessions ended on the server: it cannot
                    // see that it lost the lock, only its lease says so.
                    partition.cut();
                    self.cut_leader().await?;
                    let deadline = Instant::now() + Duration::from_secs(15);
                    while leads(&self.standby) == before {
                        if Instant::now() > deadline {
                            self.result
                                .failures
                                .push("the standby never took over from the paused relay".into());
                            break;
                        }
                        pause(5).await;
                    }
                    // Resumed at once: its local lease still runs, the standby is just starting.
                    // (A pause shorter than the relay's pause detection is not looked for: a
                    // standby taking over within it is the window RELIABILITY.md documents.)
                    if let Some(rest) = PAUSE_NOTICED.checked_sub(stopped_at.elapsed()) {
                        tokio::time::sleep(rest).await;
                    }
                    let old = self.relay.as_mut().context("relay")?;
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)?
                        .as_millis() as i64;
                    self.deposed.push(Deposed {
                        pid: old.pid(),
                        resumed_ms: now_ms,
                        until_ms: None,
                    });
                    old.signal("CONT").await?;
                    self.result.faults += 1;
                    pause(1500).await;
                    // The partition heals: the old relay learns its sessions were ended.
                    partition.heal();
                    std::mem::swap(&mut self.relay, &mut self.standby);
                    self.recovered().await?;
                }
                if self.result.faults == 0 {
                    self.result
                        .notes
                        .push("the failpoint was not reached before the writers finished".into());
                }
            }
            Fault::Rebalance => self.rebalance(writers).await?,
            Fault::SlotDropped => {
                let faults = if quick { 1 } else { 2 };
                while self.result.faults < faults && !writers.is_finished() {
                    let g = self.gap(800, 1500);
                    pause(g).await;
                    if self.drop_slot().await? {
                        self.result.faults += 1;
                        self.mark();
                        self.after_slot_loss().await?;
                    }
                }
            }
            Fault::MessageInjection => {
                // Messages written before the slot's consistent point are never streamed: a
                // mutant would go unnoticed. Inject once the stream runs.
                if let Some(r) = self.relay.as_mut()
                    && !r
                        .wait_for_log("replication stream started", Duration::from_secs(30))
                        .await
                {
                    self.result
                        .failures
                        .push("the replication stream never started".into());
                }
                // A fixed number of rounds, with or without writers still running.
                let faults = if quick { 2 } else { 4 };
                while self.result.faults < faults {
                    let g = self.gap(300, 900);
                    pause(g).await;
                    self.inject_messages(5).await?;
                    self.result.faults += 1;
                    self.mark();
                    self.recovered().await?;
                }
            }
            Fault::SlotInvalidated => {
                let Some(_own) = self.env.own.clone() else {
                    self.result
                        .notes
                        .push("skipped: the cluster is not the harness's own".into());
                    return Ok(());
                };
                pause(1000).await;
                self.invalidate_slot().await?;
                self.result.faults += 1;
                self.mark();
                self.after_slot_loss().await?;
            }
        }
        Ok(())
    }

    /// A broker fault that the relay never saw proves nothing: its log must show at least one
    /// failed delivery (`delivery failed: dropping the in-flight window`).
    fn fault_noticed(&mut self) {
        let failed = self
            .relay
            .as_ref()
            .map(|r| {
                r.log()
                    .matches("delivery failed: dropping the in-flight window")
                    .count()
            })
            .unwrap_or(0);
        if failed == 0 {
            self.result.failures.push(format!(
                "the relay logged no failed delivery across {} broker faults: the faults went \
                 unnoticed and the run proves nothing",
                self.result.faults
            ));
        } else {
            self.result.notes.push(format!(
                "the relay logged {failed} failed deliveries across {} broker faults",
                self.result.faults
            ));
        }
    }

    /// Writes `n` well-formed events for the run's topic as transactional logical messages with
    /// the outbox prefix, as a role without any grant would: recorded as never committed, so
    /// one on the topic is a phantom.
    async fn inject_messages(&mut self, n: usize) -> Result<()> {
        use outbox_core::{NewEvent, Outbox};
        let injector = Outbox::default().with_write_mode(WriteMode::LogicalMessage);
        let events = (0..n)
            .map(|i| {
                NewEvent::new(
                    &self.aggregate_type,
                    format!("intruder-{}-{i}", self.result.faults),
                    "Injected",
                    None,
                )
            })
            .collect();
        let mut tx = self.db.pool.begin().await?;
        let ids = injector.publish_new(&mut tx, events).await?;
        tx.commit().await?;
        self.book.lock().unwrap().ledger.rolled_back.extend(ids);
        Ok(())
    }

    /// After the slot was lost. `table` mode: the relay recovers from the table on its own, and
    /// keeps working through two graceful restarts (a restart loop must not lose or re-lose
    /// anything). `insert_delete`/`logical_message`: the relay must exit non-zero naming the
    /// loss, and so must each of three restarts (a supervisor's loop), without creating a slot;
    /// then the operator accepts the loss (`outbox-relay slot drop`) and the relay streams from a
    /// new slot. Committed events never read from before that point are the accepted loss.
    async fn after_slot_loss(&mut self) -> Result<()> {
        if self.scenario.write_mode == WriteMode::Table {
            self.recovered().await?;
            for _ in 0..2 {
                let relay = self.relay.as_mut().context("relay")?;
                match relay.terminate(Duration::from_secs(25)).await {
                    Some(0) => {}
                    other => self.result.failures.push(format!(
                        "graceful restart after the slot loss exited with {other:?}"
                    )),
                }
                self.start_relay(&[]).await?;
                self.recovered().await?;
            }
            return Ok(());
        }
        let loud = |r: &mut RelayProc, code: Option<i32>| {
            matches!(code, Some(c) if c != 0)
                && r.logged("REPLICATION SLOT LOST")
                && r.logged("outbox-relay slot drop")
        };
        let relay = self.relay.as_mut().context("relay")?;
        let code = relay.wait_exit(Duration::from_secs(60)).await;
        if !loud(relay, code) {
            self.result.failures.push(format!(
                "after the slot loss the relay did not exit loudly (exit {code:?}): it must never \
                 continue from a new slot on its own"
            ));
            relay.kill9().await;
        }
        for attempt in 1..=3 {
            self.start_relay(&[]).await?;
            let relay = self.relay.as_mut().context("relay")?;
            let code = relay.wait_exit(Duration::from_secs(30)).await;
            if !loud(relay, code) {
                self.result.failures.push(format!(
                    "restart {attempt} after the slot loss did not exit loudly (exit {code:?})"
                ));
                relay.kill9().await;
            }
            if self.slot_usable().await? {
                self.result.failures.push(format!(
                    "restart {attempt} after the slot loss re-created a usable slot"
                ));
            }
        }
        // The operator accepts the loss.
        let out = tokio::process::Command::new(&self.bin)
            .args(["slot", "drop", &self.slot])
            .env_clear()
            .envs(self.base_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .await?;
        if !out.status.success() {
            self.result.failures.push(format!(
                "`outbox-relay slot drop` failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        self.start_relay(&[]).await?;
        if let Some(r) = self.relay.as_mut()
            && !r
                .wait_for_log("replication stream started", Duration::from_secs(30))
                .await
        {
            self.result
                .failures
                .push("the relay did not stream again after the loss was accepted".into());
        }
        let before: Vec<uuid::Uuid> = self
            .book
            .lock()
            .unwrap()
            .ledger
            .committed
            .iter()
            .copied()
            .collect();
        // Events committed from now on must all arrive: a transaction of 50 (whatever the
        // writers still do), then a probe, which is read only after everything committed before
        // it that the new slot streams; a second of slack for the other partitions.
        workload::huge_tx(
            &self.db,
            self.scenario.write_mode,
            &self.aggregate_type,
            &format!("after-loss-{}", self.result.faults),
            50,
            true,
            &self.book,
        )
        .await?;
        self.recovered().await?;
        pause(1000).await;
        let accepted: Vec<uuid::Uuid> = before
            .into_iter()
            .filter(|id| !self.live_seen(*id))
            .collect();
        let mut book = self.book.lock().unwrap();
        for id in &accepted {
            book.ledger.committed.remove(id);
        }
        drop(book);
        self.result.accepted_loss += accepted.len();
        self.result.notes.push(format!(
            "slot loss {}: {} committed events never read before the loss was accepted (expected: \
             no table to recover them from)",
            self.result.faults,
            accepted.len()
        ));
        Ok(())
    }

    /// Whether the run's slot exists and is not invalidated.
    async fn slot_usable(&self) -> Result<bool> {
        let mut admin = PgConnection::connect(&self.env.admin_url).await?;
        let usable: Option<bool> = sqlx::query_scalar(
            "SELECT wal_status IS DISTINCT FROM 'lost' FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_optional(&mut admin)
        .await?;
        let _ = admin.close().await;
        Ok(usable == Some(true))
    }

    async fn drop_slot(&self) -> Result<bool> {
        let mut admin = PgConnection::connect(&self.env.admin_url).await?;
        for _ in 0..100 {
            let _ = sqlx::query(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                 WHERE slot_name = $1 AND active_pid IS NOT NULL",
            )
            .bind(&self.slot)
            .execute(&mut admin)
            .await;
            let r = sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(&self.slot)
                .execute(&mut admin)
                .await;
            match r {
                Ok(_) => return Ok(true),
                Err(e) if e.to_string().contains("does not exist") => return Ok(false),
                Err(_) => pause(5).await,
            }
        }
        Ok(false)
    }

    async fn invalidate_slot(&mut self) -> Result<()> {
        let relay = self.relay.as_mut().context("relay")?;
        relay.signal("STOP").await?;
        let mut admin = PgConnection::connect(&self.env.admin_url).await?;
        sqlx::query("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
            .execute(&mut admin)
            .await?;
        sqlx::query("SELECT pg_reload_conf()")
            .execute(&mut admin)
            .await?;
        let mut conn = PgConnection::connect(&self.db.url).await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS chaos_wal (x text)")
            .execute(&mut conn)
            .await?;
        let mut lost = false;
        for _ in 0..10 {
            sqlx::query(
                "INSERT INTO chaos_wal SELECT repeat('w', 1000) FROM generate_series(1, 20000)",
            )
            .execute(&mut conn)
            .await?;
            sqlx::query("SELECT pg_switch_wal()")
                .execute(&mut admin)
                .await?;
            sqlx::query("CHECKPOINT").execute(&mut admin).await?;
            let status: Option<String> = sqlx::query_scalar(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(&self.slot)
            .fetch_optional(&mut admin)
            .await?
            .flatten();
            if status.as_deref() == Some("lost") || status.is_none() {
                lost = true;
                break;
            }
        }
        sqlx::query("ALTER SYSTEM RESET max_slot_wal_keep_size")
            .execute(&mut admin)
            .await?;
        sqlx::query("SELECT pg_reload_conf()")
            .execute(&mut admin)
            .await?;
        sqlx::query("TRUNCATE chaos_wal").execute(&mut conn).await?;
        if !lost {
            self.result
                .failures
                .push("could not invalidate the slot (wal_status never became `lost`)".into());
        }
        let relay = self.relay.as_mut().context("relay")?;
        relay.signal("CONT").await?;
        Ok(())
    }

    /// Waits until every committed row is acknowledged, or progress stops.
    async fn quiesce(&mut self) -> Result<bool> {
        let cap = Duration::from_secs(if self.settings.quick { 60 } else { 120 });
        let stall = Duration::from_secs(if self.mutant { 5 } else { 10 });
        let started = Instant::now();
        let mut last = (i64::MAX, Instant::now());
        loop {
            self.supervise().await?;
            let n = if self.scenario.write_mode == WriteMode::Table {
                match self.db.unpublished().await {
                    Ok(n) => n,
                    Err(_) => {
                        pause(200).await;
                        continue;
                    }
                }
            } else {
                // No rows to count: committed events not yet read from the topic.
                let committed = self.book.lock().unwrap().ledger.committed.clone();
                self.live.as_ref().map_or(0, |l| l.missing(&committed)) as i64
            };
            if n == 0 {
                return Ok(true);
            }
            if n < last.0 {
                last = (n, Instant::now());
            }
            if last.1.elapsed() > stall || started.elapsed() > cap {
                self.result.notes.push(format!(
                    "{n} rows still unacknowledged when the run stopped waiting"
                ));
                return Ok(false);
            }
            pause(100).await;
        }
    }

    async fn hostile_config(&mut self) -> Result<()> {
        let secret = "S3cr3t-Chaos-Pw";
        let cases: Vec<HostileCase> = vec![
            (
                "table name with SQL injection",
                vec![kv("OUTBOX_TABLE", "outbox\"; DROP TABLE accounts; --")],
                Some(2),
            ),
            (
                "illegal topic template",
                vec![kv("OUTBOX_TOPIC", "bad topic/{aggregatetype}")],
                Some(2),
            ),
            (
                "slot name with injection",
                vec![kv("OUTBOX_SLOT", "Bad-Slot; DROP")],
                Some(2),
            ),
            (
                "idempotence turned off",
                vec![kv("OUTBOX_KAFKA__PROPERTIES__ENABLE_IDEMPOTENCE", "false")],
                Some(2),
            ),
            (
                "TLS against a plaintext broker, bogus CA",
                vec![
                    kv("OUTBOX_KAFKA__PROPERTIES__SECURITY_PROTOCOL", "ssl"),
                    kv("OUTBOX_KAFKA__PROPERTIES__SSL_CA_LOCATION", "/etc/hostname"),
                    kv("OUTBOX_KAFKA__CONNECT_TIMEOUT", "3s"),
                ],
                None,
            ),
            (
                "unreachable database with a password",
                vec![
                    kv(
                        "OUTBOX_DATABASE_URL",
                        format!("postgres://postgres:{secret}@127.0.0.1:1/{}", self.db.name),
                    ),
                    kv("OUTBOX_CONNECT_TIMEOUT", "3s"),
                    kv("RUST_LOG", "debug"),
                ],
                None,
            ),
        ];
        for (what, extra, code) in cases {
            let mut r = self.spawn("hostile", &extra)?;
            let got = r.wait_exit(Duration::from_secs(30)).await;
            let log = r.log();
            match (got, code) {
                (None, _) => {
                    r.kill9().await;
                    self.result
                        .failures
                        .push(format!("{what}: the relay did not exit within 30s"));
                }
                (Some(0), _) => self
                    .result
                    .failures
                    .push(format!("{what}: the relay accepted it (exit 0)")),
                (Some(c), Some(want)) if c != want => self
                    .result
                    .failures
                    .push(format!("{what}: exit {c}, expected {want}")),
                _ => {}
            }
            if log.contains(secret) {
                self.result
                    .failures
                    .push(format!("{what}: the password appears in the relay's log"));
            }
        }
        let accounts: Option<String> = sqlx::query_scalar("SELECT to_regclass('accounts')::text")
            .fetch_one(&self.db.pool)
            .await?;
        if accounts.is_none() {
            self.result
                .failures
                .push("the accounts table is gone: an identifier was injected".into());
        }
        // The run itself uses a URL with a password and debug logging: it must never be logged.
        let url = self
            .db
            .url
            .replacen("postgres@", &format!("postgres:{secret}@"), 1);
        self.base_env.push(kv("OUTBOX_DATABASE_URL", url));
        self.base_env
            .push(kv("RUST_LOG", "debug,rdkafka=info,sqlx=debug"));
        Ok(())
    }

    async fn execute(&mut self) -> Result<()> {
        if self.scenario.fault == Fault::Hostile {
            self.hostile_config().await?;
        }
        self.start_relay(&[]).await?;
        // Without a table, events committed before the slot exists are never streamed (by
        // design): the writers start once the stream runs.
        let ready = if self.scenario.fault == Fault::Rebalance && self.source == SourceMode::Polling
        {
            rebalance::JOINED
        } else if self.scenario.write_mode == WriteMode::Table {
            "acquired the leader lock"
        } else {
            "replication stream started"
        };
        if let Some(r) = self.relay.as_mut()
            && !r.wait_for_log(ready, Duration::from_secs(30)).await
        {
            self.result.notes.push(format!(
                "the relay did not become active: {}",
                r.log()
                    .lines()
                    .rev()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
        }
        let workload = self.settings.workload(self.scenario.fault);
        let mut workload = workload;
        workload.write_mode = self.scenario.write_mode;
        if self.scenario.name == "rollbacks-huge-tx" {
            workload.rollback_pct = 30;
            workload.huge = if self.settings.quick {
                vec![(2000, true), (1000, false)]
            } else {
                vec![(10_000, true), (5000, false)]
            };
        }
        let db = self.db.clone();
        let at = self.aggregate_type.clone();
        let book = self.book.clone();
        let seed = self.rng.random();
        let writers =
            tokio::spawn(
                async move { workload::run_writers(&db, &at, &workload, seed, book).await },
            );
        let fault_result = self.fault_loop(&writers).await;
        let writers_result = writers.await;
        fault_result?;
        writers_result.context("writers")??;
        if self.scenario.fault == Fault::Hostile
            && let Some(r) = self.relay.as_ref()
            && r.log().contains("S3cr3t-Chaos-Pw")
        {
            self.result
                .failures
                .push("the database password appears in the running relay's debug log".into());
        }
        // Every faulted relay is back; wait for the backlog to drain.
        if let Some(r) = self.relay.as_mut()
            && r.exit_code().is_some()
        {
            self.supervise().await?;
        }
        let quiesced = self.quiesce().await?;
        if let Some(sampler) = self.sampler.take() {
            self.check_samples(sampler.finish().await?);
        }
        if self.scenario.write_mode == WriteMode::Table {
            Book::resolve(&self.book, &self.db.pool).await?;
        } else {
            let doubt = std::mem::take(&mut self.book.lock().unwrap().in_doubt);
            if !doubt.is_empty() {
                self.result.notes.push(format!(
                    "{} events whose commit outcome is unknown were left out (no table to look them up in)",
                    doubt.len()
                ));
            }
        }
        let (ledger, expected_parked, tx_errors) = {
            let b = self.book.lock().unwrap();
            (b.ledger.clone(), b.expected_parked.clone(), b.tx_errors)
        };
        if tx_errors > 0 {
            self.result.notes.push(format!(
                "{tx_errors} writer transactions failed with an error (counted from their outcome)"
            ));
        }
        let records = match &self.broker {
            Some(b) => {
                let read = b
                    .read_all(
                        ledger.committed.len(),
                        Duration::from_secs(if quiesced { 5 } else { 15 }),
                    )
                    .await?;
                if read.id_mismatch > 0 {
                    self.result.failures.push(format!(
                        "{} records carry no broker-level message id equal to their `id` header: \
                         their duplicates would not be detectable by the event id",
                        read.id_mismatch
                    ));
                }
                read.records
            }
            None => {
                outbox_tests::consume_from(
                    &self.bootstrap,
                    &[&self.topic],
                    ledger.committed.len(),
                    Duration::from_millis(if quiesced { 1500 } else { 3000 }),
                    Duration::from_secs(30),
                )
                .await?
            }
        };
        let (good, bad): (Vec<Consumed>, Vec<Consumed>) = records.into_iter().partition(|r| {
            r.header("id")
                .is_some_and(|id| uuid::Uuid::parse_str(id).is_ok())
        });
        self.result.unidentified = bad.len();
        self.deposed_until();
        if let Some(f) = zombie_records(&self.deposed, &good) {
            self.result.failures.push(f);
        }
        self.result.verdict = Verdict::check(&ledger, &good);
        self.result.committed = ledger.committed.len();
        if self.result.verdict.lost > 0 {
            let read: HashSet<uuid::Uuid> = good.iter().map(|r| r.event_id()).collect();
            let lost: Vec<uuid::Uuid> = ledger
                .committed
                .iter()
                .filter(|id| !read.contains(id))
                .copied()
                .collect();
            let rows: Vec<(uuid::Uuid, String, i64, Option<i64>, bool)> = sqlx::query_as(
                "SELECT id, aggregateid, seq, aggregate_seq, published_at IS NOT NULL FROM outbox
                 WHERE id = ANY($1) ORDER BY seq LIMIT 8",
            )
            .bind(&lost)
            .fetch_all(&self.db.pool)
            .await
            .unwrap_or_default();
            for (id, agg, seq, aseq, published) in rows {
                self.result.failures.push(format!(
                    "lost {id}: aggregate {agg:?} seq {seq} aggregate_seq {aseq:?} marked published: {published}"
                ));
            }
        }
        self.result.rolled_back = ledger.rolled_back.len();
        if !expected_parked.is_empty() {
            let parked = self.db.parked().await?;
            let missing = expected_parked.difference(&parked).count();
            if missing > 0 {
                self.result.failures.push(format!(
                    "{missing} of {} poison/held events are not in the parked table",
                    expected_parked.len()
                ));
            }
            let stray: HashSet<_> = parked.difference(&expected_parked).collect();
            if !stray.is_empty() {
                self.result
                    .failures
                    .push(format!("{} healthy events were parked", stray.len()));
            }
        }
        if self.scenario.fault == Fault::SinkRefused {
            self.refusals_loud(expected_parked.len() / 2).await?;
        }
        Ok(())
    }

    /// A refusal for good must be loud: one `event parked` error per poison event in the relay's
    /// log, and the broker-limit poison parked with a reason naming the broker's refusal.
    async fn refusals_loud(&mut self, roots: usize) -> Result<()> {
        let logged = self
            .relay
            .as_ref()
            .map(|r| {
                r.log()
                    .matches("event parked: it cannot be published")
                    .count()
            })
            .unwrap_or(0);
        if logged < roots {
            self.result.failures.push(format!(
                "{logged} `event parked` errors in the relay's log for {roots} refused events"
            ));
        }
        let Some(id) = self.broker_poison else {
            return Ok(());
        };
        let reason: Option<String> =
            sqlx::query_scalar("SELECT reason FROM outbox_parked WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.db.pool)
                .await?;
        let words = self.scenario.sink.refusal_words();
        match reason {
            None => self
                .result
                .failures
                .push("the event over the broker's size limit is not in the parked table".into()),
            Some(r) if !words.iter().any(|w| r.contains(w)) => self.result.failures.push(format!(
                "the event over the broker's size limit was parked for another reason: {r}"
            )),
            Some(r) => self
                .result
                .notes
                .push(format!("broker refusal parked with reason: {r}")),
        }
        Ok(())
    }

    async fn teardown(mut self) -> RunResult {
        if !self.result.failures.is_empty()
            || self.result.verdict.lost > 0
            || std::env::var_os("OUTBOX_CHAOS_KEEP_LOGS").is_some()
        {
            for r in [self.relay.as_ref(), self.standby.as_ref()]
                .into_iter()
                .flatten()
                .chain(&self.members)
                .chain(&self.left)
            {
                let path = std::env::temp_dir()
                    .join(format!("outbox-chaos-{}-{}.log", self.db.name, r.name));
                if std::fs::write(&path, r.log()).is_ok() {
                    self.result
                        .notes
                        .push(format!("relay {} log: {}", r.name, path.display()));
                }
            }
        }
        if let Some(r) = self.relay.as_ref() {
            let log = r.log();
            let lines: Vec<&str> = log.lines().collect();
            self.result.log_tail = lines[lines.len().saturating_sub(8)..]
                .iter()
                .map(|l| l.to_string())
                .collect();
        }
        for r in [self.relay.as_mut(), self.standby.as_mut()]
            .into_iter()
            .flatten()
            .chain(&mut self.members)
        {
            r.terminate(Duration::from_secs(10)).await;
        }
        let republished_end = self.republished_so_far();
        let per_fault = self.live.take().map(LiveReader::finish).unwrap_or_default();
        self.result.per_fault = per_fault;
        for &(k, what) in &self.clean_marks {
            if let Some(&d) = self.result.per_fault.get(k)
                && d > 0
            {
                self.result.failures.push(format!(
                    "{d} duplicates read after fault {} ({what}): a graceful join or leave must repeat nothing",
                    k + 1
                ));
            }
        }
        let marks = &self.republished_at_marks;
        self.result.republished_before = marks.first().copied().unwrap_or(republished_end);
        self.result.republished_per_fault = (0..marks.len())
            .map(|k| marks.get(k + 1).copied().unwrap_or(republished_end) - marks[k])
            .collect();
        self.result.since_slot_save = std::mem::take(&mut self.since_slot_save);
        drop(self.mock.take());
        if let Some(b) = self.broker.take() {
            b.cleanup().await;
        }
        let db = Arc::try_unwrap(self.db).ok();
        if let Some(db) = db
            && let Err(e) = db.destroy(&self.env.admin_url).await
        {
            self.result.notes.push(format!("cleanup: {e}"));
        }
        self.result
    }
}

/// Runs one scenario once in one source mode with `bin`; `mutant` names the broken behaviour
/// turned on (mutant runs only).
pub async fn run_once(
    env: &Env,
    settings: &Settings,
    scenario: &Scenario,
    source: SourceMode,
    bin: &Path,
    mutant: Option<&str>,
    seed: u64,
) -> Result<RunResult> {
    if scenario.sink != Sink::Kafka
        && let Err(why) = sinks::server_binary(scenario.sink)
    {
        let required = std::env::var(sinks::REQUIRE_ENV).is_ok_and(|v| v == "1");
        let mut r = RunResult {
            passed: !required,
            ..RunResult::default()
        };
        if required {
            r.failures
                .push(format!("{why} ({} is set)", sinks::REQUIRE_ENV));
        } else {
            r.skipped = Some(format!(
                "{why}; set {}=1 to fail instead",
                sinks::REQUIRE_ENV
            ));
        }
        return Ok(r);
    }
    let mut run = Run::setup(env, settings, scenario, source, bin, mutant, seed).await?;
    let outcome = tokio::time::timeout(
        Duration::from_secs(if settings.quick { 240 } else { 600 }),
        run.execute(),
    )
    .await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => run.result.failures.push(format!("harness error: {e:#}")),
        Err(_) => run.result.failures.push("the run timed out".into()),
    }
    let mut result = run.teardown().await;
    let v = &result.verdict;
    let window = settings.window(source);
    let max_per_fault = result.per_fault.iter().copied().max().unwrap_or(0);
    // What one fault may add to the events delivered but not acknowledged (each re-sent once
    // by the next relay, or again after a further fault if that one is not acknowledged either):
    // one window, the rows re-published without a snapshot after it, and for the logical source
    // after a PostgreSQL restart, what was read since the slot was last saved.
    let since_save = |k: usize| match source {
        SourceMode::Logical => result.since_slot_save.get(k).copied().unwrap_or(0),
        SourceMode::Polling => 0,
    };
    let added_by = |k: usize| {
        window + result.republished_per_fault.get(k).copied().unwrap_or(0) + since_save(k)
    };
    // Before the first marker: a relay killed without one (the failpoint scenarios replace the
    // first relay) and re-publications by the first relay.
    let unmarked_kills = usize::from(matches!(scenario.fault, Fault::Failpoint(_)));
    let before = window * unmarked_kills + result.republished_before;
    // Every duplicate is a re-send of an event some fault left delivered but unacknowledged, so
    // the duplicates charged to faults 1..=k never exceed what faults 1..=k (and the time
    // before them) added. A single fault may exceed one window when the previous fault's
    // leftovers were not re-sent and acknowledged before it (faults ~1 s apart).
    let mut allowed = before;
    let mut charged = 0;
    let mut over = None;
    for (k, &d) in result.per_fault.iter().enumerate() {
        allowed += added_by(k);
        charged += d;
        if charged > allowed && over.is_none() {
            over = Some(format!("faults 1–{}: {charged} > {allowed}", k + 1));
        }
    }
    let total_bound = before + (0..result.faults.max(1)).map(added_by).sum::<usize>();
    let dup_ok = if scenario.no_duplicates {
        v.duplicates == 0
    } else {
        v.duplicates <= total_bound && over.is_none()
    };
    if !dup_ok {
        result.failures.push(if scenario.no_duplicates {
            format!("duplicates {} where none are allowed", v.duplicates)
        } else {
            format!(
                "duplicates {} (max {max_per_fault} per fault over {} faults) exceed the bound \
                 (whole run {total_bound}: window {window} per fault, plus rows re-published \
                 without a snapshot and records read since the slot's last save; {})",
                v.duplicates,
                result.faults,
                over.unwrap_or_else(|| "every prefix of faults within".to_owned())
            )
        });
    }
    result.passed = v.lost == 0
        && v.phantom == 0
        && result.unidentified == 0
        && v.inversions == 0
        && result.failures.is_empty();
    Ok(result)
}

/// A relay stopped while it was active and resumed after another relay took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Deposed {
    /// Its process id.
    pid: u32,
    /// The wall-clock time (unix ms) just before it was resumed.
    resumed_ms: i64,
    /// When it became active again by winning the lock (or joining the shards) anew, if it did:
    /// what it enqueues from then on is legitimate.
    until_ms: Option<i64>,
}

/// Records enqueued by a deposed leader after it was resumed and before it became active again
/// (by the provenance header of a failpoint build): a relay that lost its lock while paused must
/// produce nothing it held. What it had enqueued before the pause may still be delivered (the
/// documented window); anything stamped in between is a fencing failure.
fn zombie_records(deposed: &[Deposed], records: &[Consumed]) -> Option<String> {
    if deposed.is_empty() {
        return None;
    }
    let late: Vec<(u32, usize)> = deposed
        .iter()
        .map(|d| {
            let n = records
                .iter()
                .filter_map(|r| r.header(outbox_relay::faults::PROVENANCE_HEADER))
                .filter_map(|p| p.split_once(' '))
                .filter(|(p, ms)| {
                    p.parse() == Ok(d.pid)
                        && ms.parse::<i64>().is_ok_and(|ms| {
                            ms >= d.resumed_ms && d.until_ms.is_none_or(|until| ms < until)
                        })
                })
                .count();
            (d.pid, n)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    (!late.is_empty()).then(|| {
        let list: Vec<String> = late
            .iter()
            .map(|(pid, n)| format!("{n} by pid {pid}"))
            .collect();
        format!(
            "records a deposed leader {ZOMBIE_PRODUCE} ({}): a relay that lost its lock while paused must produce nothing it held",
            list.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::{Deposed, republished_without_snapshot, zombie_records};
    use outbox_relay::faults::PROVENANCE_HEADER;
    use outbox_tests::Consumed;

    fn record(provenance: Option<&str>) -> Consumed {
        Consumed {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            value: None,
            headers: provenance
                .map(|p| (PROVENANCE_HEADER.to_owned(), p.to_owned()))
                .into_iter()
                .collect(),
            timestamp_ms: None,
        }
    }

    #[test]
    fn only_records_the_deposed_relay_enqueued_after_its_resume_count() {
        let records = [
            record(Some("41 999")),  // before the resume
            record(Some("41 1000")), // at it: counts
            record(Some("41 1500")), // after it: counts
            record(Some("42 5000")), // another process
            record(Some("garbage")),
            record(None),
        ];
        let deposed = |resumed_ms, until_ms| Deposed {
            pid: 41,
            resumed_ms,
            until_ms,
        };
        assert_eq!(zombie_records(&[], &records), None);
        let f = zombie_records(&[deposed(1000, None)], &records).expect("two late records");
        assert!(f.contains("2 by pid 41"), "{f}");
        assert_eq!(zombie_records(&[deposed(2000, None)], &records), None);
        // Active again from 1500 on (it won the lock anew): only the record at 1000 counts.
        let f = zombie_records(&[deposed(1000, Some(1500))], &records).expect("one late record");
        assert!(f.contains("1 by pid 41"), "{f}");
    }

    #[test]
    fn counts_only_rows_republished_without_a_snapshot() {
        let log = "\
2026-11-22T04:48:12Z \u{1b}[33m WARN\u{1b}[0m outbox_relay::source::logical: re-publishing unpublished rows from the outbox table \u{1b}[3mrows\u{1b}[0m\u{1b}[2m=\u{1b}[0m929 \u{1b}[3mconsistent_snapshot\u{1b}[0m\u{1b}[2m=\u{1b}[0mfalse
2026-11-22T04:48:13Z  WARN outbox_relay::source::logical: re-publishing unpublished rows from the outbox table rows=665 consistent_snapshot=true
2026-11-22T04:48:14Z  WARN outbox_relay::source::logical: re-publishing unpublished rows from the outbox table rows=12 consistent_snapshot=false
2026-11-22T04:48:15Z  INFO outbox_relay::source::logical: re-publishing unpublished rows from the outbox table: none";
        assert_eq!(republished_without_snapshot(log), 941);
        assert_eq!(republished_without_snapshot(""), 0);
    }
}
