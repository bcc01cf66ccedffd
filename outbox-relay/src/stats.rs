//! The relay's live figures: plain counters, gauges and histograms, shared by `Arc` between the
//! code that updates them (pipeline, sources, broker watch) and the code that reads them (the
//! admin endpoint). Nothing here knows where the figures come from or how they are exposed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// A fixed-bucket histogram of seconds, safe to update from any thread.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Buckets for latencies: 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Histogram {
    /// A histogram with these upper bounds (seconds, increasing).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation (negative ones as 0).
    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// How many observations were recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The sum of all observations, in seconds (microsecond resolution).
    pub fn sum_seconds(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Each upper bound with the number of observations at or below it (cumulative, like
    /// Prometheus' `le` buckets); observations above the last bound only count in [`Self::count`].
    pub fn cumulative_buckets(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        let mut cumulative = 0;
        self.bounds
            .iter()
            .zip(&self.buckets)
            .map(move |(bound, bucket)| {
                cumulative += bucket.load(Ordering::Relaxed);
                (*bound, cumulative)
            })
    }
}

/// Counters the relay keeps while it runs (read by status and metrics). Every field is updated
/// with relaxed atomics: each figure is current on its own, not consistent with the others.
#[derive(Debug)]
pub struct RelayStats {
    /// Events taken from the source.
    pub read: AtomicU64,
    /// Events Kafka acknowledged and the source recorded.
    pub published: AtomicU64,
    /// Records that failed to be delivered (and were retried).
    pub failed: AtomicU64,
    /// Events parked (poison events and the events held behind them).
    pub parked: AtomicU64,
    /// Completed rounds.
    pub batches: AtomicU64,
    /// Unix time in milliseconds of the last acknowledged event, 0 before the first.
    pub last_published_ms: AtomicI64,
    /// Whether this instance holds the leader lock.
    pub active: AtomicBool,
    /// Times this instance lost its leader lease and stepped down.
    pub lease_lost: AtomicU64,
    /// Whether the source is open.
    pub source_running: AtomicBool,
    /// Whether the producer reached Kafka (start-up check, then each round's outcome).
    pub kafka_connected: AtomicBool,
    /// Whether the brokers answered the last idle-time metadata request
    /// ([`crate::sink::kafka::watch_brokers`]).
    pub kafka_reachable: AtomicBool,
    /// Records in the producer's queue after the last round.
    pub producer_queue: AtomicI64,
    /// Batch produce time.
    pub publish_duration: Histogram,
    /// Event creation → Kafka acknowledgement.
    pub commit_to_ack: Histogram,
    /// The logical-replication source's figures: handed to every logical source the relay
    /// opens, so they survive its reopening and are readable before the first one opens.
    pub logical: Arc<LogicalMetrics>,
}

impl Default for RelayStats {
    fn default() -> Self {
        Self {
            read: AtomicU64::new(0),
            published: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            last_published_ms: AtomicI64::new(0),
            active: AtomicBool::new(false),
            lease_lost: AtomicU64::new(0),
            source_running: AtomicBool::new(false),
            kafka_connected: AtomicBool::new(false),
            kafka_reachable: AtomicBool::new(true),
            producer_queue: AtomicI64::new(0),
            publish_duration: Histogram::new(LATENCY_BUCKETS),
            commit_to_ack: Histogram::new(LATENCY_BUCKETS),
            logical: Arc::default(),
        }
    }
}

/// Live figures of the logical-replication source, for metrics and health endpoints. The
/// source only adds to them; whoever opens it owns the `Arc` and reads them.
#[derive(Debug, Default)]
pub struct LogicalMetrics {
    /// Last LSN confirmed to the slot (as u64).
    pub confirmed_lsn: AtomicU64,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn` at the last slot check, bytes (-1 unknown).
    pub slot_lag_bytes: AtomicI64,
    /// Bytes of WAL the slot retains at the last check (-1 unknown).
    pub slot_retained_bytes: AtomicI64,
    /// `wal_status` at the last check: 0 unknown, 1 reserved, 2 extended, 3 unreserved, 4 lost.
    pub wal_status: AtomicU64,
    /// Events decoded from the stream.
    pub events_streamed: AtomicU64,
    /// Rows re-published from the table during slot creation/recovery.
    pub rows_backfilled: AtomicU64,
    /// Pages read from the table by re-publications (each at most a batch, by count and bytes).
    pub backfill_pages: AtomicU64,
    /// Heartbeat messages written.
    pub heartbeats: AtomicU64,
    /// Lost slots recovered.
    pub slot_recoveries: AtomicU64,
    /// Outbox-prefixed logical messages ignored because the write mode is not `logical_message`.
    pub messages_refused: AtomicU64,
    /// Replication sessions started.
    pub sessions: AtomicU64,
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.01, 0.1, 1.0]);
        h.observe(0.005);
        h.observe(0.05);
        h.observe(0.07);
        h.observe(5.0);
        let buckets: Vec<_> = h.cumulative_buckets().collect();
        assert_eq!(buckets, vec![(0.01, 1), (0.1, 3), (1.0, 3)]);
        assert_eq!(h.count(), 4);
        assert!((h.sum_seconds() - 5.125).abs() < 1e-6);
    }

    #[test]
    fn slot_checks_are_coded() {
        let m = LogicalMetrics::default();
        m.record_slot(Some(10), None, Some("lost"));
        assert_eq!(m.slot_lag_bytes.load(Ordering::Relaxed), 10);
        assert_eq!(m.slot_retained_bytes.load(Ordering::Relaxed), -1);
        assert_eq!(m.wal_status.load(Ordering::Relaxed), 4);
        m.record_slot(None, Some(5), Some("something new"));
        assert_eq!(m.wal_status.load(Ordering::Relaxed), 0);
    }
}
