//! The Prometheus exposition of the relay's figures, on `prometheus-client` (the Prometheus
//! project's Rust client): what each figure of [`crate::stats`] is called, what its `HELP` says,
//! and how `/metrics` encodes them (the text format, version 0.0.4).
//!
//! Names follow Prometheus conventions (`outbox_relay_…`, base units in the name, counters end in
//! `_total`, which the client appends); no label ever carries an aggregate id or an event id.
//!
//! A service that runs the relay in its own process can expose the relay's figures on its own
//! endpoint: [`register`] puts them into the service's [`Registry`].

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeMetric, MetricEncoder, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;

use crate::config::SourceKind;
use crate::stats::{LogicalMetrics, RelayStats};
use crate::status::{OutboxStatus, SlotStatus};

/// The prefix of every metric name of the relay (`outbox_relay_events_read_total`, …).
pub const PREFIX: &str = "outbox_relay";

/// The `Content-Type` of what [`encode`] writes: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Registers the relay's live figures from `stats` into `registry`, named `outbox_relay_…` (after
/// the registry's own prefix, if it has one). The registered metrics share their values with
/// `stats`: every scrape of `registry` reads the current figures, and registering costs the relay
/// nothing per event. The logical-replication figures are registered only when `source` is
/// [`SourceKind::Logical`].
///
/// Call it once per registry: a second call would expose every name twice. The outbox's own gauges (pending and parked events, slot lag, database up)
/// come from a database reading that only the admin endpoint takes, so they are not registered
/// here.
pub fn register(registry: &mut Registry, stats: &Arc<RelayStats>, source: SourceKind) {
    let r = registry.sub_registry_with_prefix(PREFIX);
    for (name, help, figure) in figures(stats) {
        r.register(name, help, figure);
    }
    r.register_collector(Box::new(RelayFlags(stats.clone())));
    if source == SourceKind::Logical {
        register_logical(r, &stats.logical);
    }
}

/// One of a pipeline's live figures, sharing its value with [`RelayStats`].
#[derive(Debug, Clone)]
enum Figure {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

impl EncodeMetric for Figure {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        match self {
            Figure::Counter(m) => m.encode(encoder),
            Figure::Gauge(m) => m.encode(encoder),
            Figure::Histogram(m) => m.encode(encoder),
        }
    }

    fn metric_type(&self) -> MetricType {
        match self {
            Figure::Counter(m) => m.metric_type(),
            Figure::Gauge(m) => m.metric_type(),
            Figure::Histogram(m) => m.metric_type(),
        }
    }
}

/// Every registered figure of one pipeline: name (after the prefix), help, metric.
fn figures(s: &RelayStats) -> [(&'static str, &'static str, Figure); 10] {
    use Figure::{Counter as C, Gauge as G, Histogram as H};
    [
        (
            "events_read",
            "Events taken from the source",
            C(s.read.clone()),
        ),
        (
            "events_published",
            "Events acknowledged by Kafka and recorded at the source",
            C(s.published.clone()),
        ),
        (
            "events_failed",
            "Events whose delivery failed transiently (they are sent again)",
            C(s.failed.clone()),
        ),
        (
            "events_parked",
            "Events parked as unpublishable or held behind one",
            C(s.parked.clone()),
        ),
        (
            "batches",
            "Read-produce-acknowledge rounds",
            C(s.batches.clone()),
        ),
        (
            "publish_duration_seconds",
            "Time from producing a batch to Kafka's last acknowledgement",
            H(s.publish_duration.histogram()),
        ),
        (
            "commit_to_ack_seconds",
            "Time from the event's creation to Kafka's acknowledgement",
            H(s.commit_to_ack.histogram()),
        ),
        (
            "leader_lease_lost",
            "Times this instance lost its leader lease and stepped down",
            C(s.lease_lost.clone()),
        ),
        (
            "shards_owned",
            "Shards of the outbox table this instance owns and relays (0 when the table is not \
             sharded)",
            G(s.shards_owned.clone()),
        ),
        (
            "producer_queue_messages",
            "Records queued in the producer, not yet acknowledged",
            G(s.producer_queue.clone()),
        ),
    ]
}

/// The tables of a multi-table relay with their figures, read at every scrape (tables come and
/// go while the relay runs).
pub type TableList = Arc<dyn Fn() -> Vec<(String, Arc<RelayStats>)> + Send + Sync>;

/// The `table` label of a multi-table relay's series.
type TableLabel<'a> = [(&'static str, &'a str); 1];

/// Registers the live figures of every table `tables` lists under the same names as
/// [`register`], each series labelled `table="<schema>.<table>"` (one HELP and TYPE per name,
/// one sample per table). For a multi-table relay ([`crate::config::RelayConfig::is_multi_table`]);
/// a single-table relay keeps the unlabelled names of [`register`].
///
/// With `slot` (the figures of the one replication slot of a multi-table relay with the logical
/// source) the logical-replication figures are registered too, under the names of a
/// single-table relay: what each table's feed counts (events streamed, rows and pages
/// re-published) labelled per table from its [`RelayStats::logical`], the slot's own figures
/// (sessions, heartbeats, confirmed LSN, `wal_status`, …) once, unlabelled, from `slot`. Without
/// it (a polling relay) there are no logical series.
pub fn register_tables(
    registry: &mut Registry,
    tables: TableList,
    slot: Option<&Arc<LogicalMetrics>>,
) {
    let r = registry.sub_registry_with_prefix(PREFIX);
    r.register_collector(Box::new(TableFigures {
        tables,
        logical: slot.is_some(),
    }));
    if let Some(slot) = slot {
        register_slot_figures(r, slot);
    }
}

/// The admin endpoint's registry for a multi-table relay ([`register_tables`]).
pub fn tables_registry(tables: TableList, slot: Option<&Arc<LogicalMetrics>>) -> Registry {
    let mut registry = Registry::default();
    register_tables(&mut registry, tables, slot);
    registry
}

struct TableFigures {
    tables: TableList,
    /// Whether each table's logical-replication figures ([`logical_per_table`]) are encoded too.
    logical: bool,
}

impl std::fmt::Debug for TableFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableFigures")
            .field("logical", &self.logical)
            .finish_non_exhaustive()
    }
}

impl TableFigures {
    /// The registered figures of one table: [`figures`], then the logical ones if wanted.
    fn of(&self, s: &RelayStats) -> Vec<(&'static str, &'static str, Figure)> {
        let mut all = figures(s).to_vec();
        if self.logical {
            all.extend(
                logical_per_table(&s.logical)
                    .into_iter()
                    .map(|(name, help, c)| (name, help, Figure::Counter(c))),
            );
        }
        all
    }
}

impl Collector for TableFigures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let tables = (self.tables)();
        if tables.is_empty() {
            return Ok(());
        }
        let per_table: Vec<_> = tables.iter().map(|(t, s)| (t, self.of(s))).collect();
        for k in 0..per_table[0].1.len() {
            let (name, help, first) = &per_table[0].1[k];
            let mut metric =
                encoder.encode_descriptor(name, &format!("{help}."), None, first.metric_type())?;
            for (table, figures) in &per_table {
                let label: TableLabel = [("table", table)];
                figures[k].2.encode(metric.encode_family(&label)?)?;
            }
        }
        let per_table: Vec<_> = tables.iter().map(|(t, s)| (t, flags(s))).collect();
        for k in 0..per_table[0].1.len() {
            let (name, help, _) = per_table[0].1[k];
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (table, flags) in &per_table {
                let label: TableLabel = [("table", table)];
                match flags[k].2 {
                    Some(Reading::Int(v)) => {
                        ConstGauge::new(v).encode(metric.encode_family(&label)?)?
                    }
                    Some(Reading::Float(v)) => {
                        ConstGauge::new(v).encode(metric.encode_family(&label)?)?
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }
}

/// The logical-replication source's figures (already under the relay's prefix): one series
/// each, for a single-table relay.
fn register_logical(r: &mut Registry, m: &LogicalMetrics) {
    for (name, help, counter) in logical_per_table(m) {
        r.register(name, help, counter);
    }
    register_slot_figures(r, m);
}

/// The logical-replication figures a multi-table relay counts per table (per feed of the slot,
/// labelled `table`): name (after the prefix), help, counter.
fn logical_per_table(m: &LogicalMetrics) -> [(&'static str, &'static str, Counter); 3] {
    [
        (
            "logical_events_streamed",
            "Events decoded from the replication stream",
            m.events_streamed.clone(),
        ),
        (
            "logical_rows_backfilled",
            "Rows re-published from the table while creating or recovering a slot, or as the \
             table joins a slot shared by several tables",
            m.rows_backfilled.clone(),
        ),
        (
            "logical_backfill_pages",
            "Pages read from the table by re-publications (each at most one batch)",
            m.backfill_pages.clone(),
        ),
    ]
}

/// The logical-replication figures of the slot itself (its sessions, heartbeats, confirmed
/// position and `wal_status`): one series each, unlabelled, in a multi-table relay too (one slot
/// carries every table).
fn register_slot_figures(r: &mut Registry, m: &LogicalMetrics) {
    r.register(
        "logical_heartbeats",
        "Idle heartbeats written so the slot keeps advancing",
        m.heartbeats.clone(),
    );
    r.register(
        "logical_slot_recoveries",
        "Lost replication slots recovered from the table",
        m.slot_recoveries.clone(),
    );
    r.register(
        "logical_messages_refused",
        "Logical messages with the outbox prefix refused because the write mode is not \
         logical_message (someone else emitting them?)",
        m.messages_refused.clone(),
    );
    r.register(
        "logical_sessions",
        "Replication sessions started",
        m.sessions.clone(),
    );
    r.register(
        "logical_confirmed_lsn",
        "The last LSN confirmed to the replication slot",
        m.confirmed_lsn.clone(),
    );
    r.register(
        "logical_slot_wal_status",
        "1 for the replication slot's wal_status at the source's last slot check, 0 for the \
         other statuses (unknown: not one PostgreSQL documents)",
        m.wal_status_set.clone(),
    );
}

/// The admin endpoint's registry: the relay's figures of `stats` ([`register`]).
pub fn registry(stats: &Arc<RelayStats>, source: SourceKind) -> Registry {
    let mut registry = Registry::default();
    register(&mut registry, stats, source);
    registry
}

/// Appends `registry` to `out` in the Prometheus text format ([`CONTENT_TYPE`]). Several
/// registries can be appended one after the other, as long as no metric name is in two of them.
pub fn encode(out: &mut String, registry: &Registry) {
    // Writing to a `String` cannot fail.
    let _ = prometheus_text::encode(out, registry);
}

/// The figures derived at scrape time from the relay's state flags and clocks.
#[derive(Debug)]
struct RelayFlags(Arc<RelayStats>);

/// A value read at scrape time.
#[derive(Debug, Clone, Copy)]
enum Reading {
    Int(i64),
    Float(f64),
}

/// The figures derived at scrape time from a pipeline's flags and clocks: name, help (with its
/// full stop), value (`None`: no value yet).
fn flags(s: &RelayStats) -> [(&'static str, &'static str, Option<Reading>); 5] {
    let flag = |up: bool| Some(Reading::Int(i64::from(u8::from(up))));
    let last = s.last_published_ms.load(Ordering::Relaxed);
    let since = (last > 0).then(|| {
        Reading::Float((chrono::Utc::now().timestamp_millis() - last).max(0) as f64 / 1000.0)
    });
    let connected =
        flag(s.sink_connected.load(Ordering::Relaxed) && s.sink_reachable.load(Ordering::Relaxed));
    [
        (
            "seconds_since_last_event",
            "Seconds since this instance last published an event.",
            since,
        ),
        (
            "leader",
            "1 while this instance holds the leader lock.",
            flag(s.active.load(Ordering::Relaxed)),
        ),
        (
            "source_connected",
            "1 while the source is open.",
            flag(s.source_running.load(Ordering::Relaxed)),
        ),
        (
            "sink_connected",
            "1 while the sink reaches its broker (last deliveries succeeded and, when idle, the \
             broker answers).",
            connected,
        ),
        (
            "kafka_connected",
            "The same as outbox_relay_sink_connected, under the name it had before other sinks \
             than Kafka existed.",
            connected,
        ),
    ]
}

impl Collector for RelayFlags {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in flags(&self.0) {
            match value {
                Some(Reading::Int(v)) => gauge(&mut encoder, name, help, v)?,
                Some(Reading::Float(v)) => gauge(&mut encoder, name, help, v)?,
                None => {}
            }
        }
        Ok(())
    }
}

/// Encodes one gauge whose value is read now. `help` is written as given (a registered
/// metric's gets its full stop from the client; a collector's does not).
fn gauge<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// The metrics of one reading of the outbox status (shared by `/status` and `/metrics`, see
/// [`crate::admin`]): `readings` taken so far, the served one `age_seconds` old, and what it
/// says, or only `outbox_relay_database_up 0` when it failed. A registry of its own, made for one
/// scrape and appended after the relay's ([`encode`]).
pub fn status_registry(
    reading: &Result<OutboxStatus, String>,
    age_seconds: f64,
    readings: u64,
) -> Registry {
    let mut r = Registry::with_prefix(PREFIX);
    r.register(
        "admin_status_queries",
        "Readings of the outbox status taken for /status and /metrics (at most one per \
         admin.status_refresh)",
        ConstCounter::new(readings),
    );
    r.register(
        "admin_status_age_seconds",
        "Age of the outbox status reading the figures below come from",
        ConstGauge::new(age_seconds),
    );
    r.register(
        "database_up",
        "1 when the database answered the last status reading",
        ConstGauge::new(i64::from(reading.is_ok())),
    );
    let Ok(st) = reading else {
        return r;
    };
    r.register(
        "pending_events",
        "Unpublished events in the outbox table",
        ConstGauge::new(st.pending_events),
    );
    r.register(
        "oldest_pending_age_seconds",
        "Age of the oldest unpublished event",
        ConstGauge::new(st.oldest_pending_age_seconds.unwrap_or(0.0)),
    );
    r.register(
        "parked_events",
        "Events currently parked",
        ConstGauge::new(st.parked_events),
    );
    if let Some(slot) = &st.slot {
        register_slot_status(&mut r, slot);
    }
    r
}

/// The replication slot's gauges of a status reading (unlabelled: a relay reads one slot).
fn register_slot_status(r: &mut Registry, slot: &SlotStatus) {
    r.register(
        "slot_lag_bytes",
        "WAL bytes between the server's position and the slot's confirmed flush LSN",
        ConstGauge::new(slot.lag_bytes.unwrap_or(0)),
    );
    r.register(
        "slot_lost",
        "1 when the slot's wal_status is lost",
        ConstGauge::new(i64::from(slot.wal_status.as_deref() == Some("lost"))),
    );
}

/// [`status_registry`] for a multi-table relay: the reading's own figures unlabelled,
/// `outbox_relay_database_up` 1 only when every table's reading succeeded, and the pending,
/// oldest-pending-age and parked figures once per table that was read, labelled
/// `table="<schema>.<table>"`. With the logical source the slot's lag and `lost` gauges come
/// once, unlabelled (every table is read from the one slot; from the first table whose
/// reading found it).
pub fn tables_status_registry(
    readings: &[(String, Result<OutboxStatus, String>)],
    age_seconds: f64,
    queries: u64,
) -> Registry {
    let mut r = Registry::with_prefix(PREFIX);
    r.register(
        "admin_status_queries",
        "Readings of the outbox status taken for /status and /metrics (at most one per \
         admin.status_refresh)",
        ConstCounter::new(queries),
    );
    r.register(
        "admin_status_age_seconds",
        "Age of the outbox status reading the figures below come from",
        ConstGauge::new(age_seconds),
    );
    r.register(
        "database_up",
        "1 when the database answered the last status reading (of every table)",
        ConstGauge::new(i64::from(readings.iter().all(|(_, s)| s.is_ok()))),
    );
    let read: Vec<(String, OutboxStatus)> = readings
        .iter()
        .filter_map(|(t, s)| s.as_ref().ok().map(|s| (t.clone(), s.clone())))
        .collect();
    if let Some(slot) = read.iter().find_map(|(_, s)| s.slot.as_ref()) {
        register_slot_status(&mut r, slot);
    }
    r.register_collector(Box::new(TableStatus(read)));
    r
}

#[derive(Debug)]
struct TableStatus(Vec<(String, OutboxStatus)>);

impl Collector for TableStatus {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.0.is_empty() {
            return Ok(());
        }
        type Value = fn(&OutboxStatus) -> Reading;
        let figures: [(&str, &str, Value); 3] = [
            (
                "pending_events",
                "Unpublished events in the outbox table.",
                |s| Reading::Int(s.pending_events),
            ),
            (
                "oldest_pending_age_seconds",
                "Age of the oldest unpublished event.",
                |s| Reading::Float(s.oldest_pending_age_seconds.unwrap_or(0.0)),
            ),
            ("parked_events", "Events currently parked.", |s| {
                Reading::Int(s.parked_events)
            }),
        ];
        for (name, help, value) in figures {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (table, status) in &self.0 {
                let label: TableLabel = [("table", table)];
                match value(status) {
                    Reading::Int(v) => ConstGauge::new(v).encode(metric.encode_family(&label)?)?,
                    Reading::Float(v) => {
                        ConstGauge::new(v).encode(metric.encode_family(&label)?)?
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::WAL_STATUSES;

    /// Every line of `text` that starts with `prefix`.
    fn lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn the_registry_encodes_counters_histograms_and_labelled_families() {
        let stats = Arc::new(RelayStats::default());
        let registry = registry(&stats, SourceKind::Logical);
        stats.published.inc_by(3);
        for seconds in [0.0005, 0.003, 0.004, 0.2, 100.0, -1.0] {
            stats.commit_to_ack.observe(seconds);
        }
        stats
            .logical
            .record_slot(Some(10), Some(20), Some("unreserved"));
        let mut out = String::new();
        encode(&mut out, &registry);

        // A counter: `_total` appended once, HELP with one full stop.
        assert_eq!(
            lines(&out, "outbox_relay_events_published_total"),
            ["outbox_relay_events_published_total 3"],
            "{out}"
        );
        assert!(
            out.contains(
                "# HELP outbox_relay_events_published_total Events acknowledged by Kafka and \
                 recorded at the source.\n# TYPE outbox_relay_events_published_total counter\n"
            ),
            "{out}"
        );

        // A histogram: cumulative buckets over LATENCY_BUCKETS, +Inf, _sum and _count; the
        // negative observation counted as 0.
        let buckets = lines(&out, "outbox_relay_commit_to_ack_seconds_bucket");
        assert_eq!(
            buckets.len(),
            crate::stats::LATENCY_BUCKETS.len() + 1,
            "{out}"
        );
        for (le, cumulative) in [
            ("0.001", 2),
            ("0.0025", 2),
            ("0.005", 4),
            ("0.25", 5),
            ("60", 5),
            ("+Inf", 6),
        ] {
            let line =
                format!("outbox_relay_commit_to_ack_seconds_bucket{{le=\"{le}\"}} {cumulative}");
            assert!(buckets.contains(&line.as_str()), "{line} in {buckets:?}");
        }
        let sum: f64 = lines(&out, "outbox_relay_commit_to_ack_seconds_sum ")[0]
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("a sum");
        assert!((sum - 100.2075).abs() < 1e-9, "{sum}");
        assert_eq!(
            lines(&out, "outbox_relay_commit_to_ack_seconds_count"),
            ["outbox_relay_commit_to_ack_seconds_count 6"]
        );
        assert!(out.contains("# TYPE outbox_relay_commit_to_ack_seconds histogram\n"));

        // A labelled family: one series per status, 1 for the current one.
        let mut states = lines(&out, "outbox_relay_logical_slot_wal_status{");
        states.sort_unstable();
        assert_eq!(
            states,
            [
                "outbox_relay_logical_slot_wal_status{status=\"extended\"} 0",
                "outbox_relay_logical_slot_wal_status{status=\"lost\"} 0",
                "outbox_relay_logical_slot_wal_status{status=\"reserved\"} 0",
                "outbox_relay_logical_slot_wal_status{status=\"unknown\"} 0",
                "outbox_relay_logical_slot_wal_status{status=\"unreserved\"} 1",
            ]
        );

        // The flags, read at scrape time; no last-event age before the first event.
        assert_eq!(
            lines(&out, "outbox_relay_leader "),
            ["outbox_relay_leader 0"]
        );
        assert!(lines(&out, "outbox_relay_seconds_since_last_event").is_empty());
        stats.active.store(true, Ordering::Relaxed);
        let mut out = String::new();
        encode(&mut out, &registry);
        assert_eq!(
            lines(&out, "outbox_relay_leader "),
            ["outbox_relay_leader 1"]
        );
    }

    #[test]
    fn a_multi_table_relay_labels_every_series_with_its_table_and_describes_each_name_once() {
        let a = Arc::new(RelayStats::default());
        let b = Arc::new(RelayStats::default());
        a.published.inc_by(2);
        b.published.inc_by(5);
        b.active.store(true, Ordering::Relaxed);
        let list = vec![("s1.outbox".to_owned(), a), ("s2.outbox".to_owned(), b)];
        let registry = tables_registry(Arc::new(move || list.clone()), None);
        let mut out = String::new();
        encode(&mut out, &registry);
        // A polling relay: no logical series.
        assert!(!out.contains("logical"), "{out}");
        assert_eq!(
            lines(&out, "outbox_relay_events_published_total"),
            [
                "outbox_relay_events_published_total{table=\"s1.outbox\"} 2",
                "outbox_relay_events_published_total{table=\"s2.outbox\"} 5"
            ],
            "{out}"
        );
        assert_eq!(
            lines(&out, "outbox_relay_leader{"),
            [
                "outbox_relay_leader{table=\"s1.outbox\"} 0",
                "outbox_relay_leader{table=\"s2.outbox\"} 1"
            ],
            "{out}"
        );
        assert!(
            out.contains(
                "outbox_relay_commit_to_ack_seconds_bucket{le=\"0.001\",table=\"s2.outbox\"} 0"
            ) || out.contains(
                "outbox_relay_commit_to_ack_seconds_bucket{table=\"s2.outbox\",le=\"0.001\"} 0"
            ),
            "{out}"
        );
        // Prometheus refuses a scrape that describes a name twice.
        let mut described = std::collections::BTreeSet::new();
        for l in lines(&out, "# TYPE ") {
            assert!(described.insert(l), "{l} twice in\n{out}");
        }
        assert!(lines(&out, "outbox_relay_events_published_total ").is_empty());

        let readings = vec![
            (
                "s1.outbox".to_owned(),
                Ok(OutboxStatus {
                    pending_events: 3,
                    ..OutboxStatus::default()
                }),
            ),
            ("s2.outbox".to_owned(), Err("gone".to_owned())),
        ];
        let mut out = String::new();
        encode(&mut out, &tables_status_registry(&readings, 0.5, 2));
        assert!(out.contains("outbox_relay_database_up 0\n"), "{out}");
        assert_eq!(
            lines(&out, "outbox_relay_pending_events"),
            ["outbox_relay_pending_events{table=\"s1.outbox\"} 3"],
            "{out}"
        );
    }

    #[test]
    fn a_multi_table_logical_relay_labels_each_feeds_figures_and_shows_the_slots_once() {
        let a = Arc::new(RelayStats::default());
        let b = Arc::new(RelayStats::default());
        a.logical.rows_backfilled.inc_by(7);
        a.logical.backfill_pages.inc_by(2);
        a.logical.events_streamed.inc_by(1);
        b.logical.events_streamed.inc_by(4);
        let slot = Arc::new(LogicalMetrics::default());
        slot.sessions.inc();
        slot.heartbeats.inc_by(3);
        slot.confirmed_lsn.set(99);
        slot.record_slot(Some(1), Some(2), Some("reserved"));
        // The slot's reader counts every table's events too: not exported in a multi-table relay.
        slot.events_streamed.inc_by(5);
        let list = vec![("s1.outbox".to_owned(), a), ("s2.outbox".to_owned(), b)];
        let tables = tables_registry(Arc::new(move || list.clone()), Some(&slot));
        let mut out = String::new();
        encode(&mut out, &tables);
        for (name, one, two) in [
            ("outbox_relay_logical_events_streamed_total", 1, 4),
            ("outbox_relay_logical_rows_backfilled_total", 7, 0),
            ("outbox_relay_logical_backfill_pages_total", 2, 0),
        ] {
            assert_eq!(
                lines(&out, name),
                [
                    format!("{name}{{table=\"s1.outbox\"}} {one}"),
                    format!("{name}{{table=\"s2.outbox\"}} {two}"),
                ],
                "{out}"
            );
        }
        for (name, value) in [
            ("outbox_relay_logical_sessions_total", 1),
            ("outbox_relay_logical_heartbeats_total", 3),
            ("outbox_relay_logical_confirmed_lsn", 99),
            ("outbox_relay_logical_slot_recoveries_total", 0),
            ("outbox_relay_logical_messages_refused_total", 0),
        ] {
            assert_eq!(lines(&out, name), [format!("{name} {value}")], "{out}");
        }
        let states = lines(&out, "outbox_relay_logical_slot_wal_status{");
        assert_eq!(states.len(), WAL_STATUSES.len(), "{out}");
        assert!(
            states.contains(&"outbox_relay_logical_slot_wal_status{status=\"reserved\"} 1"),
            "{out}"
        );
        let mut described = std::collections::BTreeSet::new();
        for l in lines(&out, "# TYPE ") {
            assert!(described.insert(l), "{l} twice in\n{out}");
        }
        // Names and HELP as a single-table logical relay's.
        let one = Arc::new(RelayStats::default());
        one.logical.record_slot(None, None, Some("reserved"));
        let mut single = String::new();
        encode(&mut single, &registry(&one, SourceKind::Logical));
        let help = lines(&single, "# HELP outbox_relay_logical_");
        assert_eq!(help.len(), 9, "{single}");
        for l in help {
            assert!(out.contains(&format!("{l}\n")), "{l} missing from\n{out}");
        }

        // The status gauges: the slot's once, unlabelled, the tables' labelled.
        let slot_status = crate::status::SlotStatus {
            name: "s".to_owned(),
            plugin: None,
            database: None,
            active: true,
            wal_status: Some("lost".to_owned()),
            confirmed_flush_lsn: None,
            lag_bytes: Some(123),
        };
        let reading = |pending| {
            Ok(OutboxStatus {
                pending_events: pending,
                slot: Some(slot_status.clone()),
                ..OutboxStatus::default()
            })
        };
        let readings = vec![
            ("s1.outbox".to_owned(), reading(1)),
            ("s2.outbox".to_owned(), reading(2)),
        ];
        let mut out = String::new();
        encode(&mut out, &tables_status_registry(&readings, 0.0, 1));
        assert_eq!(
            lines(&out, "outbox_relay_slot_lag_bytes"),
            ["outbox_relay_slot_lag_bytes 123"],
            "{out}"
        );
        assert_eq!(
            lines(&out, "outbox_relay_slot_lost"),
            ["outbox_relay_slot_lost 1"],
            "{out}"
        );
        assert_eq!(lines(&out, "outbox_relay_pending_events").len(), 2, "{out}");
    }

    #[test]
    fn a_polling_relay_exports_no_logical_figures() {
        let stats = Arc::new(RelayStats::default());
        let mut out = String::new();
        encode(&mut out, &registry(&stats, SourceKind::Polling));
        assert!(out.contains("outbox_relay_events_read_total 0\n"), "{out}");
        assert!(!out.contains("outbox_relay_logical_"), "{out}");
    }

    #[test]
    fn a_service_registry_takes_the_relay_figures_under_its_prefix() {
        let stats = Arc::new(RelayStats::default());
        let mut registry = Registry::with_prefix("shop");
        register(&mut registry, &stats, SourceKind::Polling);
        stats.batches.inc();
        let mut out = String::new();
        encode(&mut out, &registry);
        assert!(out.contains("shop_outbox_relay_batches_total 1\n"), "{out}");
        assert!(out.contains("shop_outbox_relay_leader 0\n"), "{out}");
    }

    #[test]
    fn a_failed_status_reading_says_only_that_the_database_is_down() {
        let mut out = String::new();
        encode(
            &mut out,
            &status_registry(&Err("refused".to_owned()), 1.5, 7),
        );
        assert!(out.contains("outbox_relay_database_up 0\n"), "{out}");
        assert!(
            out.contains("outbox_relay_admin_status_queries_total 7\n"),
            "{out}"
        );
        assert!(
            out.contains("outbox_relay_admin_status_age_seconds 1.5\n"),
            "{out}"
        );
        assert!(!out.contains("pending"), "{out}");
        let mut out = String::new();
        let ok = OutboxStatus {
            pending_events: 4,
            ..OutboxStatus::default()
        };
        encode(&mut out, &status_registry(&Ok(ok), 0.0, 8));
        assert!(out.contains("outbox_relay_database_up 1\n"), "{out}");
        assert!(out.contains("outbox_relay_pending_events 4\n"), "{out}");
        assert!(!out.contains("slot"), "{out}");
    }
}
