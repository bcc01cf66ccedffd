//! The `shards` section: one pre-filled backlog drained by 1, 2 and 3 `outbox-relay` processes
//! on one table with `shards` set (and by one unsharded relay, the baseline).
//!
//! Each run works in its own database: `outbox-relay migrate --shards N` builds the shard index,
//! the relays start on the empty table and are waited for until the shards are settled (every
//! instance owns its fair share, `outbox_relay_shards_owned`), then the whole backlog is committed
//! in one transaction (with `ANALYZE`, so the claims are planned on real statistics). The drain
//! runs from that commit until the relays together report every event acknowledged, the end
//! being the latest instance's own timestamp of its last acknowledgement. CPU time and peak RSS
//! are read per process from `/proc`; the CPU counted is only the drain's.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::db::{AGGREGATES, BenchDb, unique};
use crate::kafka::create_topic;
use crate::relay::RelayProcess;
use crate::sections::{Ctx, per_sec};

/// The lease of every relay of the section: heartbeats, hence rebalancing, every second, so
/// the shards settle quickly before the backlog is committed (the drain itself does not
/// rebalance: nobody joins or leaves during it).
const LEADER_LEASE: &str = "4s";

/// What the section runs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Backlog size.
    pub events: u64,
    /// The `shards` setting of the sharded runs.
    pub shards: u32,
    /// Numbers of sharded relay processes, one run each.
    pub instances: Vec<usize>,
}

/// One relay process of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    /// Events it published (acknowledged) during the drain.
    pub published: u64,
    /// Shards it owned during the drain (`None`: unsharded).
    pub shards_owned: Option<u64>,
    /// Its user + system CPU time during the drain.
    pub cpu_seconds: f64,
    /// Its CPU time per event it published, µs.
    pub cpu_us_per_event: f64,
    /// Its CPU time ÷ the drain's wall time (1.0 = one core busy all the time).
    pub cpu_utilisation: f64,
    /// Its peak resident set size, bytes.
    pub peak_rss_bytes: u64,
}

/// One drain.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Relay processes.
    pub instances: usize,
    /// The `shards` setting (`None`: unset, the single-active-relay baseline).
    pub shards: Option<u32>,
    /// Backlog size.
    pub events: u64,
    /// Wall time from the backlog's commit to the last acknowledgement, seconds.
    pub seconds: f64,
    /// Events per second.
    pub events_per_sec: f64,
    /// `events_per_sec` ÷ the unsharded baseline's.
    pub speedup_vs_unsharded: Option<f64>,
    /// Time from the first relay's start until the shards were settled, seconds (set-up, not
    /// part of the drain).
    pub settle_seconds: f64,
    /// Time to commit the backlog (one transaction, with `ANALYZE`), seconds.
    pub fill_seconds: f64,
    /// CPU time of all relay processes together, seconds.
    pub cpu_seconds_total: f64,
    /// All relays' CPU per event, µs.
    pub cpu_us_per_event_total: f64,
    /// All relays' CPU ÷ wall time, in cores.
    pub cpu_cores_busy: f64,
    /// CPU time of the whole machine (relays, PostgreSQL, the broker, anything else running)
    /// ÷ wall time, in cores, from `/proc/stat`.
    pub machine_cores_busy: Option<f64>,
    /// Unpublished rows left after the drain (0 expected).
    pub unpublished_after: i64,
    /// Per relay process, in start order.
    pub per_instance: Vec<Instance>,
}

/// The section's result.
#[derive(Debug, Clone, Serialize)]
pub struct Section {
    /// Backlog size of every run.
    pub events: u64,
    /// Aggregates the backlog is spread over.
    pub aggregates: u64,
    /// The `shards` setting of the sharded runs.
    pub shards: u32,
    /// The relays' `leader_lease`.
    pub leader_lease: &'static str,
    /// CPUs of the machine (relays, PostgreSQL and the broker share them).
    pub cpus: usize,
    /// The unsharded baseline first, then each number of sharded instances.
    pub runs: Vec<Run>,
}

/// Runs the section: the unsharded baseline, then `plan.instances` sharded runs.
pub async fn run(ctx: &mut Ctx, plan: &Plan) -> Result<Section> {
    let mut runs = Vec::new();
    let baseline = drain(ctx, plan.events, 1, None).await?;
    let base_rate = baseline.events_per_sec;
    runs.push(baseline);
    for &k in &plan.instances {
        let mut r = drain(ctx, plan.events, k, Some(plan.shards)).await?;
        r.speedup_vs_unsharded = Some(r.events_per_sec / base_rate.max(1e-9));
        runs.push(r);
    }
    Ok(Section {
        events: plan.events,
        aggregates: AGGREGATES,
        shards: plan.shards,
        leader_lease: LEADER_LEASE,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        runs,
    })
}

/// The label of a run in the progress lines and the table.
fn label(instances: usize, shards: Option<u32>) -> String {
    match shards {
        Some(n) => format!(
            "{instances} relay{}, shards = {n}",
            if instances == 1 { "" } else { "s" }
        ),
        None => "1 relay, shards unset".to_owned(),
    }
}

/// One drain of `events` by `instances` relays with `shards`.
async fn drain(ctx: &mut Ctx, events: u64, instances: usize, shards: Option<u32>) -> Result<Run> {
    let what = label(instances, shards);
    let bin = ctx.relay_bin()?;
    let db = BenchDb::create(&ctx.admin_url, "shards", &ctx.registry).await?;
    let topic = unique("bench_shards");
    create_topic(&ctx.bootstrap, &topic).await?;
    let mut env = ctx.relay_env(&db, "polling", &topic, "unused_slot");
    env.push(("OUTBOX_LEADER_LEASE".to_owned(), LEADER_LEASE.to_owned()));
    if let Some(n) = shards {
        env.push(("OUTBOX_SHARDS".to_owned(), n.to_string()));
        let out = outbox_tests::relay_process::relay_command(&bin, &["migrate"])
            .env("RUST_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .await
            .context("running outbox-relay migrate")?;
        if !out.status.success() {
            bail!(
                "shards ({what}): `outbox-relay migrate` with OUTBOX_SHARDS={n} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    eprintln!("bench: shards ({what}): starting the relays");
    let first_start = Instant::now();
    let mut relays = Vec::with_capacity(instances);
    for _ in 0..instances {
        relays.push(RelayProcess::start(&bin, &env).await?);
    }
    let owned = settle(&mut relays, shards, &what).await?;
    let settle_seconds = first_start.elapsed().as_secs_f64();
    let cpu0: Vec<Duration> = relays.iter().map(|r| r.cpu()).collect::<Result<_>>()?;
    eprintln!("bench: shards ({what}): settled ({owned:?}); committing {events} events");
    let fill = db.fill_backlog_at_once(events).await?;
    let committed = Instant::now();
    let machine0 = machine_busy();
    let deadline = committed + Duration::from_secs(60 + events / 1000);
    let (end, published) = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut published = Vec::with_capacity(relays.len());
        let mut last = committed;
        for r in &mut relays {
            r.check_alive()?;
            let asked = Instant::now();
            let m = r.metrics().await?;
            let p = m.get("outbox_relay_events_published_total");
            if p > 0.0 {
                let since = Duration::from_secs_f64(
                    m.get("outbox_relay_seconds_since_last_event").max(0.0),
                );
                last = last.max(asked.checked_sub(since).unwrap_or(asked));
            }
            published.push(p as u64);
        }
        let total: u64 = published.iter().sum();
        if total >= events {
            break (last, published);
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = relays.iter().map(|r| r.log_tail()).collect();
            bail!(
                "shards ({what}): {total} of {events} published before the deadline; logs:\n{}",
                logs.join("\n---\n")
            );
        }
    };
    // Read when the total was seen, up to 100 ms after the last acknowledgement.
    let machine = machine_busy()
        .zip(machine0)
        .map(|(b, b0)| (b - b0) / committed.elapsed().as_secs_f64().max(1e-9));
    let elapsed = end.saturating_duration_since(committed);
    let wall = elapsed.as_secs_f64().max(1e-9);
    let mut per_instance = Vec::with_capacity(relays.len());
    for ((r, c0), (p, o)) in relays.iter().zip(&cpu0).zip(published.iter().zip(&owned)) {
        let cpu = r.cpu()?.saturating_sub(*c0).as_secs_f64();
        per_instance.push(Instance {
            published: *p,
            shards_owned: *o,
            cpu_seconds: cpu,
            cpu_us_per_event: cpu * 1e6 / (*p).max(1) as f64,
            cpu_utilisation: cpu / wall,
            peak_rss_bytes: r.peak_rss()?,
        });
    }
    // Every row acknowledged is marked by then; a short grace for the last marks.
    let mut unpublished = db.unpublished().await?;
    let grace = Instant::now() + Duration::from_secs(5);
    while unpublished > 0 && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(50)).await;
        unpublished = db.unpublished().await?;
    }
    for r in relays {
        r.stop().await?;
    }
    db.drop().await?;
    let cpu_total: f64 = per_instance.iter().map(|i| i.cpu_seconds).sum();
    let run = Run {
        instances,
        shards,
        events,
        seconds: elapsed.as_secs_f64(),
        events_per_sec: per_sec(events, elapsed),
        speedup_vs_unsharded: None,
        settle_seconds,
        fill_seconds: fill.as_secs_f64(),
        cpu_seconds_total: cpu_total,
        cpu_us_per_event_total: cpu_total * 1e6 / events.max(1) as f64,
        cpu_cores_busy: cpu_total / wall,
        machine_cores_busy: machine,
        unpublished_after: unpublished,
        per_instance,
    };
    eprintln!(
        "bench: shards ({what}): {:.0} events/s ({:.2} s), relays' CPU {:.2} cores",
        run.events_per_sec, run.seconds, run.cpu_cores_busy
    );
    Ok(run)
}

/// Busy CPU seconds of the whole machine so far (all CPUs, `/proc/stat`: everything but idle
/// and iowait).
fn machine_busy() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((total - idle) as f64 / crate::relay::clock_ticks() as f64)
}

/// Waits until the relays are ready to drain: the unsharded one leads; sharded ones own all
/// `shards` between them, each at most its fair share and at least one. Returns each relay's
/// shard count.
async fn settle(
    relays: &mut [RelayProcess],
    shards: Option<u32>,
    what: &str,
) -> Result<Vec<Option<u64>>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut owned = Vec::with_capacity(relays.len());
        let mut leaders = 0;
        for r in relays.iter_mut() {
            r.check_alive()?;
            let m = r.metrics().await?;
            leaders += usize::from(m.get("outbox_relay_leader") >= 1.0);
            owned.push(m.get("outbox_relay_shards_owned") as u64);
        }
        let ready = match shards {
            None => leaders == 1,
            Some(n) => {
                let share = (n as usize).div_ceil(relays.len()) as u64;
                owned.iter().sum::<u64>() == u64::from(n)
                    && owned.iter().all(|&o| o >= 1 && o <= share)
            }
        };
        if ready {
            return Ok(owned.into_iter().map(|o| shards.map(|_| o)).collect());
        }
        if Instant::now() > deadline {
            bail!("shards ({what}): the relays did not settle within 60 s (owned {owned:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The section as a table of its own.
pub fn table(s: &Section) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "shards: drain of {} events over {} aggregates, shards = {}, leader_lease {}, {} CPUs shared by relays, PostgreSQL and the broker",
        s.events, s.aggregates, s.shards, s.leader_lease, s.cpus
    );
    let header = [
        "relays",
        "ev/s",
        "× unsharded",
        "relays' CPU (cores)",
        "machine CPU (cores)",
        "CPU µs/ev (sum)",
        "per instance: shards, events, CPU µs/ev, CPU %, peak RSS",
    ];
    let rows: Vec<[String; 7]> = s
        .runs
        .iter()
        .map(|r| {
            let per: Vec<String> = r
                .per_instance
                .iter()
                .map(|i| {
                    format!(
                        "[{}{} ev, {:.1} µs, {:.0}%, {:.1} MB]",
                        i.shards_owned
                            .map(|o| format!("{o} sh, "))
                            .unwrap_or_default(),
                        i.published,
                        i.cpu_us_per_event,
                        i.cpu_utilisation * 100.0,
                        i.peak_rss_bytes as f64 / 1048576.0
                    )
                })
                .collect();
            [
                label(r.instances, r.shards),
                format!("{:.0}", r.events_per_sec),
                r.speedup_vs_unsharded
                    .map(|x| format!("{x:.2}"))
                    .unwrap_or_else(|| "1.00".into()),
                format!("{:.2}", r.cpu_cores_busy),
                r.machine_cores_busy
                    .map(|m| format!("{m:.2}"))
                    .unwrap_or_else(|| "-".into()),
                format!("{:.1}", r.cpu_us_per_event_total),
                per.join(" "),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..7)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let header = header.map(str::to_owned);
    for (n, r) in std::iter::once(&header).chain(&rows).enumerate() {
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
    let left: i64 = s.runs.iter().map(|r| r.unpublished_after).sum();
    if left > 0 {
        let _ = writeln!(
            out,
            "WARNING: {left} rows left unpublished after the drains"
        );
    }
    out
}
