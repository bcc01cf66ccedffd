//! Results: the JSON document and the readable table.

use std::fmt::Write;

use serde::Serialize;

/// Ceilings measured afresh on this machine.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Ceilings {
    /// Raw rdkafka producer, relay settings, relay-shaped records.
    pub producer_events_per_sec: Option<f64>,
    /// `pg_recvlogical` draining the backlog from a pgoutput slot.
    pub logical_source_rows_per_sec: Option<f64>,
    /// The relay's claim query + mark statement over the backlog, nothing produced.
    pub polling_source_rows_per_sec: Option<f64>,
    /// Producer run time.
    pub producer_seconds: Option<f64>,
    /// `pg_recvlogical` run time.
    pub logical_source_seconds: Option<f64>,
    /// Polling loop run time.
    pub polling_source_seconds: Option<f64>,
    /// Mean claim time (query + decode) per batch of 1000.
    pub polling_claim_ms_per_batch: Option<f64>,
    /// Mean mark (UPDATE) time per batch of 1000.
    pub polling_mark_ms_per_batch: Option<f64>,
    /// Time to insert the backlog server-side.
    pub fill_seconds: Option<f64>,
}

/// The relay's drain with and without requests against its admin endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct AdminLoadRun {
    /// Rows in the outbox table, all pending at the start: the drained backlog.
    pub rows: u64,
    /// Requests per second sent to the admin endpoint (half `/status`, half `/metrics`).
    pub rate: u64,
    /// Longest load window per drain.
    pub window_seconds: f64,
    /// Quiet/loaded pairs run, alternating.
    pub repeats: usize,
    /// Drain rate of each quiet run.
    pub quiet_events_per_sec: Vec<f64>,
    /// Drain rate of each run under load.
    pub loaded_events_per_sec: Vec<f64>,
    /// Mean loaded drain ÷ mean quiet drain (≥ 0.95 is the target).
    pub ratio: f64,
    /// Requests sent during the loaded drains.
    pub requests: u64,
    /// Requests that failed or did not answer 200.
    pub failed_requests: u64,
    /// Requests per second actually sent.
    pub achieved_rate: f64,
    /// Database readings the relay took for those requests (its counter).
    pub status_readings: f64,
    /// Seconds of load, summed over the loaded drains.
    pub load_seconds: f64,
    /// Relay CPU seconds, summed over the quiet drains.
    pub relay_cpu_seconds_quiet: f64,
    /// Relay CPU seconds, summed over the loaded drains.
    pub relay_cpu_seconds_loaded: f64,
}

/// One backlog drain by the relay process.
#[derive(Debug, Clone, Serialize)]
pub struct DrainRun {
    /// `polling` or `logical`.
    pub source: String,
    /// `table` (the figure) or `insert_delete` (diagnostic).
    pub write_mode: String,
    /// Backlog size.
    pub events: u64,
    /// From `relay started` to the last Kafka acknowledgement.
    pub seconds: f64,
    /// Events per second.
    pub events_per_sec: f64,
    /// Time to fill the backlog.
    pub fill_seconds: f64,
    /// Relay CPU (user + system) during the drain.
    pub relay_cpu_seconds: f64,
    /// Relay CPU per 100k events.
    pub relay_cpu_seconds_per_100k: f64,
    /// CPU seconds per wall second (2.0 = both cores).
    pub relay_cpu_utilisation: f64,
    /// Peak RSS of the relay process.
    pub relay_peak_rss_bytes: u64,
    /// Claim-produce-acknowledge rounds.
    pub batches: f64,
    /// Events per round.
    pub mean_batch: f64,
    /// Sum of the relay's `publish_duration` (produce → last ack of each batch).
    pub produce_seconds: f64,
    /// `produce_seconds` / drain time: the share of the loop spent waiting on Kafka.
    pub produce_share: f64,
    /// Rows not yet marked published at the last acknowledgement (the logical source marks
    /// them in the background, after their acknowledgement).
    pub unpublished_after: i64,
    /// From `relay started` until every row was marked published too (`table` mode).
    pub all_marked_seconds: Option<f64>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// 99.9th percentile.
    pub p999: Option<f64>,
    /// Largest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

impl Percentiles {
    /// Percentiles of sorted microsecond samples, in milliseconds.
    pub fn of(sorted_us: &[i64]) -> Self {
        let q = |q: f64| {
            if sorted_us.is_empty() {
                return None;
            }
            let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
            Some(sorted_us[rank - 1] as f64 / 1e3)
        };
        Self {
            p50: q(0.5),
            p99: q(0.99),
            p999: q(0.999),
            max: sorted_us.last().map(|v| *v as f64 / 1e3),
        }
    }
}

/// One latency run.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRun {
    /// `polling` or `logical`.
    pub source: String,
    /// Requested events per second.
    pub target_rate: u64,
    /// Events per second actually committed in the measurement window.
    pub achieved_rate: f64,
    /// Writer connections.
    pub writers: u64,
    /// Whether the outbox's NOTIFY trigger was enabled (polling needs it; logical does not).
    pub notify_trigger: bool,
    /// Samples in the window.
    pub samples: u64,
    /// Events written (warm-up included).
    pub written: u64,
    /// Records the consumer received.
    pub received: u64,
    /// Row `created_at` → consumer receive.
    pub commit_to_consumer_ms: Percentiles,
    /// The writer's `COMMIT` returned → consumer receive: leaves out the transaction's own
    /// duration (its WAL flush above all), which `created_at` (the transaction's start) includes.
    pub commit_returned_to_consumer_ms: Percentiles,
    /// The relay's commit→ack histogram over the window, interpolated inside its buckets.
    pub commit_to_ack_ms_from_histogram: Percentiles,
    /// Relay CPU per 100k events at this rate.
    pub relay_cpu_seconds_per_100k: Option<f64>,
    /// Peak RSS of the relay process.
    pub relay_peak_rss_bytes: u64,
}

/// The write-path measurement.
#[derive(Debug, Clone, Serialize)]
pub struct WriteRun {
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds measured per variant.
    pub seconds_per_variant: f64,
    /// Business transaction alone.
    pub baseline_tx_per_sec: f64,
    /// With one plain INSERT into a comparable table (the outbox's five Debezium columns and a
    /// `created_at`, primary key only): the floor of "one more row".
    pub plain_insert_tx_per_sec: f64,
    /// With an outbox row, default settings (no NOTIFY trigger).
    pub table_tx_per_sec: f64,
    /// With an inserted-and-deleted outbox row.
    pub insert_delete_tx_per_sec: f64,
    /// With a logical decoding message.
    pub logical_message_tx_per_sec: f64,
    /// `table` mode with the optional NOTIFY trigger installed and notifying.
    pub table_with_notify_tx_per_sec: f64,
    /// `table` mode with the optional NOTIFY trigger installed and `outbox.notify = off` (the
    /// trigger fires and sends nothing).
    pub table_with_trigger_notify_off_tx_per_sec: f64,
}

/// The batch-write measurement: transactions of many events, one `publish_all` against one
/// `publish` per event.
#[derive(Debug, Clone, Serialize)]
pub struct BatchWriteRun {
    /// Concurrent clients.
    pub clients: usize,
    /// Events per transaction.
    pub events_per_transaction: usize,
    /// Seconds measured per variant.
    pub seconds_per_variant: f64,
    /// Events per second written through `publish_all`.
    pub publish_all_events_per_sec: f64,
    /// Events per second written through one `publish` per event.
    pub publish_each_events_per_sec: f64,
}

/// The scale curve (issue 13 item 6): the drain at growing backlogs and the write path at growing
/// numbers of writers, so that a cost per event that grows with either shows.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Scale {
    /// The backlog sizes drained, smallest first.
    pub backlogs: Vec<u64>,
    /// One drain per source and backlog size.
    pub drain: Vec<ScaleDrainPoint>,
    /// The write path at each number of writers.
    pub write: Vec<ScaleWritePoint>,
    /// Per source: relay CPU per event at the largest backlog ÷ at the smallest (1.0 = flat).
    pub drain_cpu_per_event_growth: SourcePair,
    /// Per source: drain events/s at the largest backlog ÷ at the smallest (1.0 = flat).
    pub drain_rate_growth: SourcePair,
}

/// One drain of the scale curve: `events` pre-committed rows drained by `source` (`table` mode).
#[derive(Debug, Clone, Serialize)]
pub struct ScaleDrainPoint {
    /// `polling` or `logical`.
    pub source: String,
    /// Backlog size.
    pub events: u64,
    /// Events per second, relay start to last acknowledgement.
    pub events_per_sec: f64,
    /// Relay CPU (user + system) per event, microseconds.
    pub relay_cpu_us_per_event: f64,
    /// Peak RSS of the relay process.
    pub relay_peak_rss_bytes: u64,
    /// Seconds of the drain.
    pub seconds: f64,
    /// Seconds the server-side fill took.
    pub fill_seconds: f64,
}

/// The write path of the scale curve at one number of writers: the business transaction alone,
/// with one outbox event (default settings) into an empty outbox table, and with one into an
/// outbox table that holds the largest backlog of the curve, unpublished.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleWritePoint {
    /// Concurrent writers.
    pub writers: usize,
    /// Seconds measured per variant.
    pub seconds_per_variant: f64,
    /// Unpublished rows in the backlogged outbox table.
    pub backlog_rows: u64,
    /// Business transaction alone.
    pub baseline_tx_per_sec: f64,
    /// With one outbox event, empty table.
    pub table_tx_per_sec: f64,
    /// With one outbox event, table holding `backlog_rows` unpublished rows.
    pub table_with_backlog_tx_per_sec: f64,
    /// `table_tx_per_sec` ÷ `baseline_tx_per_sec`.
    pub table_ratio: f64,
    /// `table_with_backlog_tx_per_sec` ÷ `baseline_tx_per_sec`.
    pub table_with_backlog_ratio: f64,
    /// What the outbox event adds to one transaction, in microseconds of the machine's
    /// throughput: `1e6 / table_tx_per_sec − 1e6 / baseline_tx_per_sec` (flat across writer
    /// counts when the event's cost does not grow with concurrency; with one writer the commit's
    /// WAL flush dominates and this is mostly noise).
    pub outbox_us_per_event: f64,
}

/// One sink of the `sinks` section: its broker's raw client ceiling, the relay's drain through it
/// and latency at a fixed rate, all in the same run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SinkRun {
    /// `kafka`, `nats`, `rabbitmq` or `redis`.
    pub sink: String,
    /// Why the sink was not measured (its broker did not answer).
    pub skipped: Option<String>,
    /// Why a measurement failed (the broker answered).
    pub error: Option<String>,
    /// Broker settings that decide what an acknowledgement means (Redis: `appendonly`,
    /// `appendfsync`).
    pub broker: std::collections::BTreeMap<String, String>,
    /// Records of the ceiling and backlog of each drain.
    pub events: u64,
    /// The broker's own client publishing relay-shaped records with the sink's durability.
    pub ceiling_events_per_sec: Option<f64>,
    /// Ceiling run time.
    pub ceiling_seconds: Option<f64>,
    /// Variants of the ceiling that show where a sink's time goes, records/s (Redis:
    /// `append_script`, the sink's dedupe-and-append script per record with the ceiling's
    /// pipelining; `append_script_one_pipeline`, the same one pipeline at a time. RabbitMQ:
    /// `transient`, the ceiling with non-persistent messages).
    pub ceiling_diagnostics: std::collections::BTreeMap<String, f64>,
    /// Polling-source drain through the sink ÷ the ceiling.
    pub drain_to_ceiling: Option<f64>,
    /// Relay CPU per event during the polling drain, microseconds.
    pub relay_cpu_us_per_event: Option<f64>,
    /// The drains (polling first; logical too in a full run).
    pub drain_runs: Vec<DrainRun>,
    /// Latency at a fixed rate through the sink (polling source).
    pub latency: Option<LatencyRun>,
}

impl SinkRun {
    /// Fills the ratio and CPU figures from the polling drain.
    fn summarise(&mut self) {
        if let Some(d) = self.drain_runs.iter().find(|d| d.source == "polling") {
            self.drain_to_ceiling = self
                .ceiling_events_per_sec
                .map(|c| d.events_per_sec / c.max(1e-9));
            self.relay_cpu_us_per_event = Some(d.relay_cpu_seconds * 1e6 / d.events.max(1) as f64);
        }
    }
}

/// Everything a run measured.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    /// Ceilings.
    pub ceilings: Ceilings,
    /// Drain throughput per source.
    pub drain: DrainSummary,
    /// Latency at 1k events/s per source (commit → consumer).
    pub latency_ms: LatencySummary,
    /// Business-transaction throughput with the outbox write ÷ without.
    pub write_overhead_ratio: WriteRatios,
    /// Largest relay peak RSS over all relay processes of the run.
    pub relay_peak_rss_bytes: Option<u64>,
    /// Relay CPU seconds per 100k events, per source, during the drain.
    pub relay_cpu_seconds_per_100k: SourcePair,
    /// Backlog size.
    pub events: u64,
    /// Quick mode.
    pub quick: bool,
    /// Details of each drain.
    pub drain_runs: Vec<DrainRun>,
    /// Details of each latency run.
    pub latency_runs: Vec<LatencyRun>,
    /// Write-path details (8 clients).
    pub write_path: Option<WriteRun>,
    /// Write-path details at every measured number of clients (8 and 32).
    pub write_path_runs: Vec<WriteRun>,
    /// Batch writes: `publish_all` against one `publish` per event, with 1 and 8 clients.
    pub batch_write: Vec<BatchWriteRun>,
    /// The admin endpoint under load (`--admin-load`).
    pub admin_load: Option<AdminLoadRun>,
    /// The scale curve: drains at 10k, 100k and 1M (quick: 10k and 100k) backlog events, the
    /// write path at 1, 8 and 32 writers.
    pub scale: Option<Scale>,
    /// The `sinks` section: per sink, the raw client ceiling, the drain and its ratio, latency.
    pub sinks: Vec<SinkRun>,
    /// The `shards` section: one backlog drained by 1, 2 and 3 sharded relays and by one
    /// unsharded relay.
    pub shards: Option<crate::shards::Section>,
    /// The machine.
    pub machine: Machine,
    /// Wall time of the whole run.
    pub duration_seconds: f64,
    /// The build profile of the benchmark (and so of the relay it ran).
    pub profile: &'static str,
}

/// Drain figures.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DrainSummary {
    /// Polling source.
    pub polling_events_per_sec: Option<f64>,
    /// Logical source.
    pub logical_events_per_sec: Option<f64>,
}

/// Latency figures.
#[derive(Debug, Default, Clone, Serialize)]
pub struct LatencySummary {
    /// Polling source (adaptive polling, no NOTIFY trigger).
    pub polling: Percentiles,
    /// Logical source.
    pub logical: Percentiles,
}

/// Write-path ratios.
#[derive(Debug, Default, Clone, Serialize)]
pub struct WriteRatios {
    /// `table` mode.
    pub table: Option<f64>,
    /// `insert_delete` mode.
    pub insert_delete: Option<f64>,
    /// `logical_message` mode.
    pub logical_message: Option<f64>,
    /// `table` mode with the optional NOTIFY trigger installed and notifying.
    pub table_with_notify: Option<f64>,
    /// One plain INSERT into a comparable table.
    pub plain_insert: Option<f64>,
    /// `table` mode ÷ the plain INSERT (not ÷ the baseline).
    pub table_to_plain_insert: Option<f64>,
    /// 100 events per transaction, one writer: `publish_all` events/s ÷ one `publish` per event.
    pub publish_all_to_publish_each: Option<f64>,
}

/// A figure per source.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SourcePair {
    /// Polling source.
    pub polling: Option<f64>,
    /// Logical source.
    pub logical: Option<f64>,
}

/// The machine the run was on.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Machine {
    /// Online CPUs.
    pub cpus: usize,
    /// CPU model.
    pub cpu_model: String,
    /// 1-minute load average when the run started.
    pub load_average_at_start: f64,
    /// 1-minute load average when the run ended (other work on the machine skews every figure;
    /// the ratios to the ceilings measured in the same run less so).
    pub load_average_at_end: f64,
}

impl Machine {
    /// Reads `/proc`.
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
                .unwrap_or_default(),
            load_average_at_start: load_average(),
            load_average_at_end: 0.0,
        }
    }
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

impl Report {
    /// Fills the summary fields from the detailed runs.
    pub fn summarise(&mut self) {
        for d in self.drain_runs.iter().filter(|d| d.write_mode == "table") {
            let (rate, cpu) = match d.source.as_str() {
                "polling" => (
                    &mut self.drain.polling_events_per_sec,
                    &mut self.relay_cpu_seconds_per_100k.polling,
                ),
                _ => (
                    &mut self.drain.logical_events_per_sec,
                    &mut self.relay_cpu_seconds_per_100k.logical,
                ),
            };
            *rate = Some(d.events_per_sec);
            *cpu = Some(d.relay_cpu_seconds_per_100k);
        }
        for l in self.latency_runs.iter().filter(|l| l.target_rate == 1000) {
            match l.source.as_str() {
                "polling" => self.latency_ms.polling = l.commit_to_consumer_ms,
                _ => self.latency_ms.logical = l.commit_to_consumer_ms,
            }
        }
        if let Some(w) = &self.write_path {
            let r = |x: f64| Some(x / w.baseline_tx_per_sec.max(1e-9));
            self.write_overhead_ratio = WriteRatios {
                table: r(w.table_tx_per_sec),
                insert_delete: r(w.insert_delete_tx_per_sec),
                logical_message: r(w.logical_message_tx_per_sec),
                table_with_notify: r(w.table_with_notify_tx_per_sec),
                plain_insert: r(w.plain_insert_tx_per_sec),
                table_to_plain_insert: Some(
                    w.table_tx_per_sec / w.plain_insert_tx_per_sec.max(1e-9),
                ),
                publish_all_to_publish_each: None,
            };
        }
        if let Some(b) = self.batch_write.iter().find(|b| b.clients == 1) {
            self.write_overhead_ratio.publish_all_to_publish_each =
                Some(b.publish_all_events_per_sec / b.publish_each_events_per_sec.max(1e-9));
        }
        if let Some(scale) = &mut self.scale {
            scale.summarise();
        }
        for run in &mut self.sinks {
            run.summarise();
        }
        self.relay_peak_rss_bytes = self
            .drain_runs
            .iter()
            .map(|d| d.relay_peak_rss_bytes)
            .chain(self.latency_runs.iter().map(|l| l.relay_peak_rss_bytes))
            .chain(
                self.scale
                    .iter()
                    .flat_map(|s| s.drain.iter().map(|d| d.relay_peak_rss_bytes)),
            )
            .chain(self.sinks.iter().flat_map(|s| {
                s.drain_runs
                    .iter()
                    .map(|d| d.relay_peak_rss_bytes)
                    .chain(s.latency.iter().map(|l| l.relay_peak_rss_bytes))
            }))
            .max();
    }

    /// The readable table.
    pub fn table(&self) -> String {
        let mut t = Table::default();
        let c = &self.ceilings;
        let producer = c.producer_events_per_sec;
        t.row(
            "ceiling: raw producer (relay settings)",
            rate(producer, "ev/s"),
            "",
            "",
            "",
        );
        t.row(
            "ceiling: logical source (pg_recvlogical)",
            rate(c.logical_source_rows_per_sec, "rows/s"),
            "",
            "",
            "",
        );
        t.row(
            "ceiling: polling source (claim + mark)",
            rate(c.polling_source_rows_per_sec, "rows/s"),
            "",
            "",
            "",
        );
        if let (Some(cl), Some(mk)) = (c.polling_claim_ms_per_batch, c.polling_mark_ms_per_batch) {
            t.row(
                "  per batch of 1000: claim / mark",
                format!("{cl:.1} / {mk:.1} ms"),
                "",
                "",
                "",
            );
        }
        for (source, value, min, ceiling) in [
            (
                "polling",
                self.drain.polling_events_per_sec,
                50_000.0,
                c.polling_source_rows_per_sec,
            ),
            (
                "logical",
                self.drain.logical_events_per_sec,
                100_000.0,
                c.logical_source_rows_per_sec,
            ),
        ] {
            let lower = match (ceiling, producer) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let ratio = value.zip(lower).map(|(v, l)| v / l);
            let verdict = value.map(|v| verdict(v >= min && ratio.is_none_or(|r| r >= 0.5)));
            t.row(
                &format!("drain: {source}"),
                rate(value, "ev/s"),
                &format!("≥ {}k/s, ≥ 0.5× ceiling", min / 1000.0),
                &ratio
                    .map(|r| format!("{r:.2}× lower ceiling"))
                    .unwrap_or_default(),
                &verdict.unwrap_or_default(),
            );
        }
        for d in &self.drain_runs {
            t.row(
                &format!(
                    "  {}{}: {:.0} ev/s; batches / mean size / produce share",
                    d.source,
                    if d.write_mode == "table" {
                        String::new()
                    } else {
                        format!(" ({}, diagnostic)", d.write_mode)
                    },
                    d.events_per_sec
                ),
                format!(
                    "{:.0} / {:.0} / {:.0}%",
                    d.batches,
                    d.mean_batch,
                    d.produce_share * 100.0
                ),
                "",
                "",
                "",
            );
        }
        for d in self.drain_runs.iter().filter(|d| d.unpublished_after > 0) {
            if let Some(marked) = d.all_marked_seconds {
                t.row(
                    &format!(
                        "  {}: every row also marked published after (rows left at the last ack)",
                        d.source
                    ),
                    format!(
                        "{marked:.2} s = {:.0} ev/s ({})",
                        d.events as f64 / marked.max(1e-9),
                        d.unpublished_after
                    ),
                    "",
                    "",
                    "",
                );
            }
        }
        for l in &self.latency_runs {
            let p = &l.commit_to_consumer_ms;
            let h = &l.commit_to_ack_ms_from_histogram;
            let limit = match (l.source.as_str(), l.target_rate) {
                ("logical", 1000) => Some(20.0),
                ("polling", 1000) => Some(50.0),
                _ => None,
            };
            t.row(
                &format!(
                    "latency: {} @ {}/s (got {:.0}/s{}), p50/p99/p99.9",
                    l.source,
                    l.target_rate,
                    l.achieved_rate,
                    if l.notify_trigger { "" } else { ", no NOTIFY" }
                ),
                format!("{} / {} / {} ms", ms(p.p50), ms(p.p99), ms(p.p999)),
                &limit.map(|x| format!("p99 ≤ {x} ms")).unwrap_or_default(),
                "",
                &limit
                    .zip(p.p99)
                    .map(|(x, v)| verdict(v <= x))
                    .unwrap_or_default(),
            );
            let c = &l.commit_returned_to_consumer_ms;
            t.row(
                "  writer's COMMIT returned → consumer",
                format!("{} / {} / {} ms", ms(c.p50), ms(c.p99), ms(c.p999)),
                "",
                "",
                "",
            );
            t.row(
                "  relay commit→ack histogram (interpolated)",
                format!("{} / {} / {} ms", ms(h.p50), ms(h.p99), ms(h.p999)),
                "",
                "",
                "",
            );
        }
        for w in &self.write_path_runs {
            write_path_rows(&mut t, w);
        }
        for b in &self.batch_write {
            // The target is about one transaction's speed: judged with one writer.
            let ratio = b.publish_all_events_per_sec / b.publish_each_events_per_sec.max(1e-9);
            let judged = b.clients == 1;
            t.row(
                &format!(
                    "batch writes: {} events per tx, {} client(s), publish × {}",
                    b.events_per_transaction, b.clients, b.events_per_transaction
                ),
                format!("{:.0} ev/s", b.publish_each_events_per_sec),
                "",
                "",
                "",
            );
            t.row(
                &format!(
                    "batch writes: {} client(s), publish_all, one call per tx",
                    b.clients
                ),
                format!("{:.0} ev/s", b.publish_all_events_per_sec),
                if judged { "≥ 5× publish" } else { "" },
                &format!("{ratio:.2}× publish"),
                &if judged {
                    verdict(ratio >= 5.0)
                } else {
                    String::new()
                },
            );
        }
        if let Some(a) = &self.admin_load {
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
            t.row(
                &format!("admin load: polling drain of {} rows, quiet", a.rows),
                rate(Some(mean(&a.quiet_events_per_sec)), "ev/s"),
                "",
                "",
                "",
            );
            t.row(
                &format!(
                    "admin load: same, {:.0} req/s /status+/metrics ({} requests, {} failed, {} readings)",
                    a.achieved_rate, a.requests, a.failed_requests, a.status_readings
                ),
                rate(Some(mean(&a.loaded_events_per_sec)), "ev/s"),
                "ratio ≥ 0.95",
                &format!("{:.3}× quiet", a.ratio),
                &verdict(a.ratio >= 0.95),
            );
        }
        if let Some(scale) = &self.scale {
            scale_rows(&mut t, scale);
        }
        for (source, v) in [
            ("polling", self.relay_cpu_seconds_per_100k.polling),
            ("logical", self.relay_cpu_seconds_per_100k.logical),
        ] {
            if let Some(v) = v {
                t.row(
                    &format!("resources: relay CPU per 100k events ({source} drain)"),
                    format!("{v:.2} s"),
                    "",
                    "",
                    "",
                );
            }
        }
        if let Some(rss) = self.relay_peak_rss_bytes {
            t.row(
                "resources: relay peak RSS (largest of all runs)",
                format!("{:.1} MB", rss as f64 / 1048576.0),
                "≤ 64 MB",
                "",
                &verdict(rss <= 64 * 1048576),
            );
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "outbox-bench: {} events, {}-byte payloads, {} aggregates, {} partitions, {} run, {} profile, {} CPUs ({}), load {:.2} at start, {:.2} at end, {:.0} s",
            self.events,
            crate::db::PAYLOAD_BYTES,
            crate::db::AGGREGATES,
            crate::kafka::PARTITIONS,
            if self.quick { "quick" } else { "full" },
            self.profile,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.load_average_at_start,
            self.machine.load_average_at_end,
            self.duration_seconds,
        );
        out.push_str(&t.render());
        if !self.sinks.is_empty() {
            out.push('\n');
            out.push_str(&sinks_table(&self.sinks));
        }
        if let Some(shards) = &self.shards {
            out.push('\n');
            out.push_str(&crate::shards::table(shards));
        }
        out
    }
}

/// The rows of one write-path run: the baseline, the plain INSERT, and each outbox variant with
/// its ratio to the baseline (the default `table` mode also to the plain INSERT, with its
/// verdict: ≥ 0.8× the baseline and ≥ 0.9× the plain INSERT).
fn write_path_rows(t: &mut Table, w: &WriteRun) {
    let base = w.baseline_tx_per_sec.max(1e-9);
    let plain = w.plain_insert_tx_per_sec.max(1e-9);
    let n = w.clients;
    t.row(
        &format!("write path: {n} clients, no outbox"),
        format!("{:.0} tx/s", w.baseline_tx_per_sec),
        "",
        "",
        "",
    );
    t.row(
        &format!("write path: {n} clients, + plain INSERT (comparable table)"),
        format!("{:.0} tx/s", w.plain_insert_tx_per_sec),
        "",
        &format!("{:.3}× baseline", w.plain_insert_tx_per_sec / base),
        "",
    );
    let table = w.table_tx_per_sec;
    t.row(
        &format!("write path: {n} clients, + outbox (table, default)"),
        format!("{table:.0} tx/s"),
        "≥ 0.8× baseline, ≥ 0.9× plain",
        &format!("{:.3}× baseline, {:.3}× plain", table / base, table / plain),
        &verdict(table / base >= 0.8 && table / plain >= 0.9),
    );
    for (mode, tps) in [
        ("insert_delete", w.insert_delete_tx_per_sec),
        ("logical_message", w.logical_message_tx_per_sec),
        ("table, NOTIFY trigger", w.table_with_notify_tx_per_sec),
        (
            "table, NOTIFY trigger, outbox.notify=off",
            w.table_with_trigger_notify_off_tx_per_sec,
        ),
    ] {
        t.row(
            &format!("write path: {n} clients, + outbox ({mode})"),
            format!("{tps:.0} tx/s"),
            "",
            &format!("{:.3}× baseline", tps / base),
            "",
        );
    }
}

impl Scale {
    /// Fills the growth figures from the drain points.
    fn summarise(&mut self) {
        for source in ["polling", "logical"] {
            let points: Vec<&ScaleDrainPoint> =
                self.drain.iter().filter(|d| d.source == source).collect();
            let smallest = points.iter().min_by_key(|d| d.events);
            let largest = points.iter().max_by_key(|d| d.events);
            let (cpu, rate) = match (smallest, largest) {
                (Some(s), Some(l)) if l.events > s.events => (
                    Some(l.relay_cpu_us_per_event / s.relay_cpu_us_per_event.max(1e-9)),
                    Some(l.events_per_sec / s.events_per_sec.max(1e-9)),
                ),
                _ => (None, None),
            };
            let (cpu_slot, rate_slot) = match source {
                "polling" => (
                    &mut self.drain_cpu_per_event_growth.polling,
                    &mut self.drain_rate_growth.polling,
                ),
                _ => (
                    &mut self.drain_cpu_per_event_growth.logical,
                    &mut self.drain_rate_growth.logical,
                ),
            };
            *cpu_slot = cpu;
            *rate_slot = rate;
        }
    }
}

/// The rows of the scale curve: each drain point, the growth per source, each writer count.
fn scale_rows(t: &mut Table, scale: &Scale) {
    for d in &scale.drain {
        t.row(
            &format!(
                "scale: drain {} of {} events; CPU/event, peak RSS",
                d.source,
                thousands(d.events as f64)
            ),
            rate(Some(d.events_per_sec), "ev/s"),
            "",
            &format!(
                "{:.2} µs/ev, {:.1} MB",
                d.relay_cpu_us_per_event,
                d.relay_peak_rss_bytes as f64 / 1048576.0
            ),
            "",
        );
    }
    for (source, cpu, rate) in [
        (
            "polling",
            scale.drain_cpu_per_event_growth.polling,
            scale.drain_rate_growth.polling,
        ),
        (
            "logical",
            scale.drain_cpu_per_event_growth.logical,
            scale.drain_rate_growth.logical,
        ),
    ] {
        if let (Some(cpu), Some(rate)) = (cpu, rate) {
            t.row(
                &format!("scale: {source}, largest ÷ smallest backlog: CPU/event, ev/s"),
                format!("{cpu:.2}× / {rate:.2}×"),
                "flat (≈ 1×)",
                "",
                "",
            );
        }
    }
    for w in &scale.write {
        t.row(
            &format!(
                "scale: write path, {} writer(s): none / outbox / outbox over {} rows",
                w.writers,
                thousands(w.backlog_rows as f64)
            ),
            format!(
                "{:.0} / {:.0} / {:.0} tx/s",
                w.baseline_tx_per_sec, w.table_tx_per_sec, w.table_with_backlog_tx_per_sec
            ),
            "",
            &format!(
                "{:.3}× / {:.3}× baseline, {:+.0} µs/tx",
                w.table_ratio, w.table_with_backlog_ratio, w.outbox_us_per_event
            ),
            "",
        );
    }
}

/// The sinks' own table: per sink and drain source, the raw client ceiling, the drain, their
/// ratio, relay CPU per event and peak RSS, and latency; then why a sink was skipped or failed.
fn sinks_table(runs: &[SinkRun]) -> String {
    let header = [
        "sink",
        "source",
        "ceiling ev/s",
        "drain ev/s",
        "drain/ceiling",
        "CPU µs/ev",
        "peak RSS",
        "latency p50 / p99",
    ]
    .map(str::to_owned);
    let mut rows: Vec<[String; 8]> = vec![header];
    let mut notes = Vec::new();
    for run in runs {
        let sink = &run.sink;
        if let Some(why) = &run.skipped {
            notes.push(format!("{sink}: skipped: {why}"));
            continue;
        }
        let latency = run
            .latency
            .as_ref()
            .map(|l| {
                format!(
                    "{} / {} ms @ {:.0}/s",
                    ms(l.commit_to_consumer_ms.p50),
                    ms(l.commit_to_consumer_ms.p99),
                    l.achieved_rate
                )
            })
            .unwrap_or_else(|| "-".into());
        if run.drain_runs.is_empty() {
            rows.push([
                sink.clone(),
                "-".into(),
                run.ceiling_events_per_sec
                    .map(thousands)
                    .unwrap_or_else(|| "-".into()),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                latency.clone(),
            ]);
        }
        for (i, d) in run.drain_runs.iter().enumerate() {
            let ratio = run
                .ceiling_events_per_sec
                .map(|c| format!("{:.2}×", d.events_per_sec / c.max(1e-9)))
                .unwrap_or_else(|| "-".into());
            rows.push([
                sink.clone(),
                d.source.clone(),
                run.ceiling_events_per_sec
                    .map(thousands)
                    .unwrap_or_else(|| "-".into()),
                thousands(d.events_per_sec),
                ratio,
                format!("{:.1}", d.relay_cpu_seconds * 1e6 / d.events.max(1) as f64),
                format!("{:.1} MB", d.relay_peak_rss_bytes as f64 / 1048576.0),
                if i == 0 {
                    latency.clone()
                } else {
                    String::new()
                },
            ]);
        }
        for (name, v) in &run.ceiling_diagnostics {
            let ratio = run
                .drain_runs
                .first()
                .map(|d| format!(" (drain {:.2}× this)", d.events_per_sec / v.max(1e-9)))
                .unwrap_or_default();
            notes.push(format!(
                "{sink}: ceiling variant {name}: {} ev/s{ratio}",
                thousands(*v)
            ));
        }
        if !run.broker.is_empty() {
            let settings: Vec<String> =
                run.broker.iter().map(|(k, v)| format!("{k} {v}")).collect();
            notes.push(format!("{sink}: {}", settings.join(", ")));
        }
        if let Some(e) = &run.error {
            notes.push(format!(
                "{sink}: FAILED: {}",
                e.lines().next().unwrap_or_default()
            ));
        }
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let events = runs.iter().map(|r| r.events).max().unwrap_or(0);
    let _ = writeln!(
        out,
        "sinks: {} records per ceiling and drain; latency through the polling source",
        thousands(events as f64)
    );
    for (n, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
        if n == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            let _ = writeln!(out, "{}", "-".repeat(total));
        }
    }
    for note in notes {
        let _ = writeln!(out, "  {note}");
    }
    out
}

fn verdict(ok: bool) -> String {
    if ok { "met" } else { "MISSED" }.to_owned()
}

fn rate(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) => format!("{} {unit}", thousands(v)),
        None => "-".into(),
    }
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[derive(Default)]
struct Table {
    rows: Vec<[String; 5]>,
}

impl Table {
    fn row(&mut self, figure: &str, value: String, target: &str, ratio: &str, verdict: &str) {
        self.rows.push([
            figure.to_owned(),
            value,
            target.to_owned(),
            ratio.to_owned(),
            verdict.to_owned(),
        ]);
    }

    fn render(&self) -> String {
        let header = ["figure", "value", "target", "vs ceiling", "verdict"].map(str::to_owned);
        let all: Vec<&[String; 5]> = std::iter::once(&header).chain(&self.rows).collect();
        let widths: Vec<usize> = (0..5)
            .map(|i| all.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (n, r) in all.iter().enumerate() {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
                .collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
            if n == 0 {
                let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                let _ = writeln!(out, "{}", "-".repeat(total));
            }
        }
        out
    }
}
