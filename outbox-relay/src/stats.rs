//! The relay's live figures: counters, gauges and histograms (the `prometheus-client` types, each
//! an atomic or a small lock behind an `Arc`), shared between the code that updates them
//! (pipeline, sources, broker watch) and the code that reads them (the admin endpoint). Nothing
//! here knows where the figures come from; [`crate::metrics`] names them and registers them for
//! the Prometheus exposition.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// Buckets for latencies: 1 ms to 60 s, with edges at 20 ms and 50 ms (the commit → ack targets
/// of the logical and polling sources) and steps of at most 15 ms below 50 ms, so a p99 read from
/// the histogram is good to a few milliseconds where it matters.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A histogram of durations in seconds over [`LATENCY_BUCKETS`]. A negative duration (clocks
/// that disagree: an event's `created_at` comes from the database's clock) counts as 0 instead
/// of lowering the sum.
#[derive(Debug, Clone)]
pub struct DurationHistogram(Histogram);

impl Default for DurationHistogram {
    fn default() -> Self {
        Self(Histogram::new(LATENCY_BUCKETS.iter().copied()))
    }
}

impl DurationHistogram {
    /// Records one observation (negative ones as 0).
    pub fn observe(&self, seconds: f64) {
        self.0.observe(seconds.max(0.0));
    }

    /// The histogram itself, to register (a clone shares the observations).
    pub fn histogram(&self) -> Histogram {
        self.0.clone()
    }
}

/// Counters the relay keeps while it runs (read by status and metrics). Every field is updated
/// with relaxed atomics: each figure is current on its own, not consistent with the others.
#[derive(Debug)]
pub struct RelayStats {
    /// Events taken from the source.
    pub read: Counter,
    /// Events Kafka acknowledged and the source recorded.
    pub published: Counter,
    /// Events whose delivery failed transiently: the in-flight window dropped after a failure,
    /// sent again.
    pub failed: Counter,
    /// Events parked (poison events and the events held behind them).
    pub parked: Counter,
    /// Completed rounds.
    pub batches: Counter,
    /// Unix time in milliseconds of the last acknowledged event, 0 before the first.
    pub last_published_ms: AtomicI64,
    /// Whether this instance holds the leader lock.
    pub active: AtomicBool,
    /// Times this instance lost its leader lease and stepped down.
    pub lease_lost: Counter,
    /// Shards this instance owns (`shards` set; 0 otherwise).
    pub shards_owned: Gauge,
    /// Whether the source is open.
    pub source_running: AtomicBool,
    /// Whether the sink reached its broker (start-up check, then each round's outcome).
    pub sink_connected: AtomicBool,
    /// Whether the broker answered the sink's last idle-time probe ([`crate::sink::Sink::watch`];
    /// for Kafka a metadata request, [`crate::sink::kafka::watch_brokers`]).
    pub sink_reachable: AtomicBool,
    /// Records in the producer's queue after the last round.
    pub producer_queue: Gauge,
    /// Batch produce time.
    pub publish_duration: DurationHistogram,
    /// Event creation → Kafka acknowledgement.
    pub commit_to_ack: DurationHistogram,
    /// The logical-replication source's figures: handed to every logical source the relay
    /// opens, so they survive its reopening and are readable before the first one opens. For a
    /// table of a multi-table relay (whose slot is the group's) only this table's share: the
    /// events its feed was handed and the rows its backfill re-published; the slot's own figures
    /// are the group's ([`crate::admin::AdminTables::slot_metrics`]).
    pub logical: Arc<LogicalMetrics>,
}

impl Default for RelayStats {
    fn default() -> Self {
        Self {
            read: Counter::default(),
            published: Counter::default(),
            failed: Counter::default(),
            parked: Counter::default(),
            batches: Counter::default(),
            last_published_ms: AtomicI64::new(0),
            active: AtomicBool::new(false),
            lease_lost: Counter::default(),
            shards_owned: Gauge::default(),
            source_running: AtomicBool::new(false),
            sink_connected: AtomicBool::new(false),
            sink_reachable: AtomicBool::new(true),
            producer_queue: Gauge::default(),
            publish_duration: DurationHistogram::default(),
            commit_to_ack: DurationHistogram::default(),
            logical: Arc::default(),
        }
    }
}

/// Live figures of the logical-replication source, for metrics and health endpoints. The
/// source only adds to them; whoever opens it owns the `Arc` and reads them.
///
/// A multi-table relay keeps one for its slot (every figure but the per-table ones, which its
/// slot's reader counts for all tables together and which are not exported) and one per table
/// ([`RelayStats::logical`]), where the table's feed counts [`Self::events_streamed`],
/// [`Self::rows_backfilled`] and [`Self::backfill_pages`] (the other figures stay 0 there).
#[derive(Debug, Default)]
pub struct LogicalMetrics {
    /// Last LSN confirmed to the slot (as u64).
    pub confirmed_lsn: Gauge<u64, AtomicU64>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn` at the last slot check, bytes (-1 unknown).
    pub slot_lag_bytes: AtomicI64,
    /// Bytes of WAL the slot retains at the last check (-1 unknown).
    pub slot_retained_bytes: AtomicI64,
    /// `wal_status` at the last check: 0 unknown, 1 reserved, 2 extended, 3 unreserved, 4 lost.
    pub wal_status: AtomicU64,
    /// The same `wal_status` as a state set: one gauge per [`WAL_STATUSES`] entry, 1 for the
    /// status of the last check and 0 for the others; empty before the first check.
    pub wal_status_set: Family<WalStatusLabel, Gauge>,
    /// Events decoded from the stream.
    pub events_streamed: Counter,
    /// Rows re-published from the table during slot creation/recovery (and, for a table of a
    /// multi-table relay, when it joins the slot's stream).
    pub rows_backfilled: Counter,
    /// Pages read from the table by re-publications (each at most a batch, by count and bytes).
    pub backfill_pages: Counter,
    /// Heartbeat messages written.
    pub heartbeats: Counter,
    /// Lost slots recovered.
    pub slot_recoveries: Counter,
    /// Outbox-prefixed logical messages ignored because the write mode is not `logical_message`.
    pub messages_refused: Counter,
    /// Replication sessions started.
    pub sessions: Counter,
}

/// The `wal_status` values of `pg_replication_slots`, in the order of their codes in
/// [`LogicalMetrics::wal_status`] (`unknown` is code 0: no check yet, or a value this relay does
/// not know).
pub const WAL_STATUSES: [&str; 5] = ["unknown", "reserved", "extended", "unreserved", "lost"];

/// The label of [`LogicalMetrics::wal_status_set`]: one of [`WAL_STATUSES`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct WalStatusLabel {
    /// The slot's `wal_status`.
    pub status: &'static str,
}

impl LogicalMetrics {
    /// Records a slot check: its lag and retained WAL in bytes (`None`: unknown) and its
    /// `wal_status` as PostgreSQL reports it (coded as documented on [`Self::wal_status`]).
    pub fn record_slot(
        &self,
        lag_bytes: Option<i64>,
        retained_bytes: Option<i64>,
        wal_status: Option<&str>,
    ) {
        self.slot_lag_bytes
            .store(lag_bytes.unwrap_or(-1), Ordering::Relaxed);
        self.slot_retained_bytes
            .store(retained_bytes.unwrap_or(-1), Ordering::Relaxed);
        let code = match wal_status {
            Some("reserved") => 1,
            Some("extended") => 2,
            Some("unreserved") => 3,
            Some("lost") => 4,
            _ => 0,
        };
        self.wal_status.store(code, Ordering::Relaxed);
        for (i, status) in WAL_STATUSES.iter().enumerate() {
            self.wal_status_set
                .get_or_create(&WalStatusLabel { status })
                .set(i64::from(i as u64 == code));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_checks_are_coded() {
        let m = LogicalMetrics::default();
        m.record_slot(Some(10), None, Some("lost"));
        assert_eq!(m.slot_lag_bytes.load(Ordering::Relaxed), 10);
        assert_eq!(m.slot_retained_bytes.load(Ordering::Relaxed), -1);
        assert_eq!(m.wal_status.load(Ordering::Relaxed), 4);
        let state = |status| {
            m.wal_status_set
                .get(&WalStatusLabel { status })
                .map(|g| g.get())
        };
        assert_eq!(state("lost"), Some(1));
        assert_eq!(state("reserved"), Some(0));
        m.record_slot(None, Some(5), Some("something new"));
        assert_eq!(m.wal_status.load(Ordering::Relaxed), 0);
        assert_eq!(state("lost"), Some(0));
        assert_eq!(state("unknown"), Some(1));
    }
}
