//! `outbox-bench`: measures, in one run and side by side, the machine's ceilings (raw producer,
//! raw source reads), the relay's backlog drain per source, commit → Kafka latency at fixed
//! arrival rates, the write-path cost of the outbox in a business transaction, the relay's CPU
//! and memory, how drain and write-path figures scale with the backlog and the writers, and
//! each sink (Kafka, NATS, RabbitMQ, Redis) against its own broker's raw client, and a backlog
//! drained by 1, 2 and 3 sharded relays.
//!
//! ```text
//! cargo run --release --bin outbox-bench -- [--quick] [--json FILE] [--events N] [--only SECTION]
//!     [--admin-load]
//! ```
//!
//! PostgreSQL and the broker come from `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS`; when either
//! is unset, private ones are started with `scripts/services.sh` in `.services/bench` and stopped
//! at the end. The other sinks' brokers come from `NATS_URL`, `REDIS_URL` and `AMQP_URL` (or
//! what the script found), else the standard loopback ports. Every section works in its own
//! database and topics, all dropped afterwards. The relay runs as a separate `outbox-relay`
//! process of the same build profile. See BENCHMARKS.md.

mod consumer;
mod db;
mod kafka;
mod relay;
mod report;
mod sections;
mod services;
mod shards;
mod sinks;
mod tables;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use outbox_core::WriteMode;

use report::{Machine, Report};
use sections::Ctx;

/// Benchmark of the outbox relay against this machine's own ceilings.
#[derive(Debug, Parser)]
#[command(name = "outbox-bench", version)]
struct Args {
    /// Smaller backlog, fewer rates, shorter runs, a scale curve without the 1M-event point
    /// (under two minutes in release).
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Backlog size for the ceilings and the drains (default 200000, quick 50000).
    #[arg(long, value_name = "N")]
    events: Option<u64>,
    /// Run only these sections (repeatable).
    #[arg(long, value_enum, value_name = "SECTION")]
    only: Vec<Section>,
    /// Run the relay sections only for these sources (repeatable; default both).
    #[arg(long, value_enum, value_name = "SOURCE")]
    source: Vec<Source>,
    /// Run the sinks section only for these sinks (repeatable; default all).
    #[arg(long, value_enum, value_name = "SINK")]
    sink: Vec<sinks::Sink>,
    /// Extra relay setting for every relay process, as its environment variable (repeatable):
    /// `--relay-env OUTBOX_BATCH_SIZE=5000`, `--relay-env OUTBOX_KAFKA__PROPERTIES__LINGER_MS=1`.
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_relay_env)]
    relay_env: Vec<(String, String)>,
    /// Also run the admin-endpoint load section (not in the default set): the polling drain of a
    /// 1M-row table (quick: 200k) quietly and under 200 requests/s to /status and /metrics for
    /// at most 30 s, twice each (quick: once), alternating; prints both and their ratio.
    #[arg(long)]
    admin_load: bool,
}

fn parse_relay_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if name.starts_with("OUTBOX_") => {
            Ok((name.to_owned(), value.to_owned()))
        }
        _ => Err(format!("expected OUTBOX_NAME=VALUE, got `{s}`")),
    }
}

/// A part of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    /// Raw producer, pg_recvlogical, polling claim + mark.
    Ceilings,
    /// Backlog drain per source (also CPU and RSS).
    Drain,
    /// Commit → consumer latency at fixed arrival rates.
    Latency,
    /// Business transaction with and without the outbox write.
    Write,
    /// The drain with and without load on the admin endpoint (also `--admin-load`).
    AdminLoad,
    /// The scale curve: drains at 10k, 100k and 1M backlog events (quick: 10k and 100k), the
    /// write path at 1, 8 and 32 writers.
    Scale,
    /// Per sink (kafka, nats, rabbitmq, redis): the raw client's ceiling, the relay's drain
    /// through the sink and its ratio to that ceiling, latency at 1k events/s (quick: 20k
    /// events per sink; full: 100k). A sink whose broker does not answer is skipped.
    Sinks,
    /// One backlog (quick: 30k, full: 200k events over 1000 aggregates) drained by 1, 2 and 3
    /// relay processes on one table with shards = 16, and by one relay with shards unset.
    Shards,
    /// One relay relaying the same backlog spread over 1, 10, 50 and 100 tables, with each
    /// `--source` (not in the default set; `--only tables`): drain, CPU, RSS and sessions per
    /// table.
    Tables,
    /// `InboxConsumer` throughput: 1 and 8 partitions at concurrency 1 and 8, then batches.
    Consumer,
}

/// A relay source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Source {
    /// The polling source.
    Polling,
    /// The logical-replication source.
    Logical,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Polling => "polling",
            Source::Logical => "logical",
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_owned();
    let mut services = match services::Services::acquire(&repo) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("outbox-bench: services: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut ctx = Ctx {
        admin_url: services.admin_url.clone(),
        bootstrap: services.bootstrap.clone(),
        pg_bin: services.pg_bin.clone(),
        registry: db::Registry::default(),
        relay_bin: None,
        repo,
        events: args
            .events
            .unwrap_or(if args.quick { 50_000 } else { 200_000 }),
        quick: args.quick,
        relay_extra: args.relay_env.clone(),
        brokers: services.brokers.clone(),
    };
    let code = runtime.block_on(async {
        let outcome = tokio::select! {
            r = run(&args, &mut ctx) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        ctx.registry.drop_all(&ctx.admin_url).await;
        match outcome {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("outbox-bench: {e:#}");
                ExitCode::FAILURE
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    if services.owned() {
        services.release();
    }
    code
}

/// Runs the selected sections; returns whether all of them succeeded.
async fn run(args: &Args, ctx: &mut Ctx) -> Result<bool> {
    let started = Instant::now();
    let wants = |s: Section| {
        if s == Section::AdminLoad || s == Section::Tables {
            (s == Section::AdminLoad && args.admin_load) || args.only.contains(&s)
        } else {
            args.only.is_empty() || args.only.contains(&s)
        }
    };
    let sources: Vec<Source> = if args.source.is_empty() {
        vec![Source::Polling, Source::Logical]
    } else {
        args.source.clone()
    };
    let mut report = Report {
        events: ctx.events,
        quick: ctx.quick,
        machine: Machine::read(),
        profile: if cfg!(debug_assertions) {
            "dev"
        } else {
            "release"
        },
        ..Default::default()
    };
    let mut failures: Vec<String> = Vec::new();
    let mut record = |what: &str, e: anyhow::Error| {
        eprintln!("bench: {what} FAILED: {e:#}");
        failures.push(format!("{what}: {e:#}"));
    };

    if wants(Section::Ceilings) {
        match sections::ceilings(ctx).await {
            Ok(c) => report.ceilings = c,
            Err(e) => record("ceilings", e),
        }
    }
    if wants(Section::Drain) {
        let mut runs: Vec<(Source, WriteMode)> =
            sources.iter().map(|s| (*s, WriteMode::Table)).collect();
        if !ctx.quick && sources.contains(&Source::Logical) {
            // Diagnostic: the logical source without the row marking of `table` mode.
            runs.push((Source::Logical, WriteMode::InsertDelete));
        }
        for (s, mode) in runs {
            match sections::drain(ctx, s.name(), mode).await {
                Ok(d) => report.drain_runs.push(d),
                Err(e) => record(&format!("drain ({}, {mode})", s.name()), e),
            }
        }
    }
    if wants(Section::Latency) {
        let rates: &[u64] = if ctx.quick { &[1000] } else { &[1000, 10_000] };
        let (warmup, duration) = if ctx.quick {
            (Duration::from_secs(1), Duration::from_secs(3))
        } else {
            (Duration::from_secs(2), Duration::from_secs(10))
        };
        for s in &sources {
            for &rate in rates {
                match sections::latency(ctx, s.name(), rate, warmup, duration).await {
                    Ok(l) => report.latency_runs.push(l),
                    Err(e) => record(&format!("latency ({}, {rate}/s)", s.name()), e),
                }
            }
        }
    }
    if wants(Section::Write) {
        match sections::write_path(ctx).await {
            Ok((runs, batch)) => {
                report.write_path = runs.first().cloned();
                report.write_path_runs = runs;
                report.batch_write = batch;
            }
            Err(e) => record("write path", e),
        }
    }
    if wants(Section::AdminLoad) {
        let (rows, repeats) = if ctx.quick {
            (200_000, 1)
        } else {
            (1_000_000, 2)
        };
        match sections::admin_load(ctx, rows, 200, Duration::from_secs(30), repeats).await {
            Ok(a) => report.admin_load = Some(a),
            Err(e) => record("admin load", e),
        }
    }
    if wants(Section::Scale) {
        let (backlogs, secs, rounds): (&[u64], f64, usize) = if ctx.quick {
            (&[10_000, 100_000], 2.0, 1)
        } else {
            (&[10_000, 100_000, 1_000_000], 5.0, 2)
        };
        let names: Vec<&str> = sources.iter().map(|s| s.name()).collect();
        match sections::scale(ctx, &names, backlogs, &[1, 8, 32], secs, rounds).await {
            Ok(s) => report.scale = Some(s),
            Err(e) => record("scale", e),
        }
    }
    if wants(Section::Sinks) {
        let (warmup, duration) = if ctx.quick {
            (Duration::from_secs(1), Duration::from_secs(3))
        } else {
            (Duration::from_secs(2), Duration::from_secs(10))
        };
        let plan = sinks::Plan {
            events: if ctx.quick { 20_000 } else { 100_000 },
            // The polling source always (the ratio's drain); the logical one too in a full run.
            sources: if ctx.quick {
                vec!["polling"]
            } else {
                sources.iter().map(|s| s.name()).collect()
            },
            sinks: args.sink.clone(),
            rate: 1000,
            warmup,
            duration,
        };
        let (runs, failed) = sinks::run(ctx, &plan).await;
        report.sinks = runs;
        for (what, e) in failed {
            record(&what, e);
        }
    }
    if wants(Section::Shards) {
        let plan = shards::Plan {
            events: if ctx.quick { 30_000 } else { 200_000 },
            shards: 16,
            instances: vec![1, 2, 3],
        };
        match shards::run(ctx, &plan).await {
            Ok(s) => report.shards = Some(s),
            Err(e) => record("shards", e),
        }
    }
    let mut many_tables = None;
    if wants(Section::Tables) {
        let plan = tables::Plan {
            events: ctx.events,
            tables: vec![1, 10, 50, 100],
            sources: sources.iter().map(|s| s.name()).collect(),
        };
        match tables::run(ctx, &plan).await {
            Ok(t) => many_tables = Some(t),
            Err(e) => record("tables", e),
        }
    }
    if wants(Section::Consumer) {
        match consumer::run(ctx).await {
            Ok(runs) => println!("{}", consumer::table(&runs)),
            Err(e) => record("consumer", e),
        }
    }
    report.duration_seconds = started.elapsed().as_secs_f64();
    report.machine.load_average_at_end = report::load_average();
    report.summarise();
    println!("{}", report.table());
    if let Some(t) = &many_tables {
        println!("{}", tables::table(t));
    }
    if !failures.is_empty() {
        println!("failed sections:");
        for f in &failures {
            println!("  {}", f.lines().next().unwrap_or_default());
        }
    }
    if let Some(path) = &args.json {
        let mut doc = serde_json::to_value(&report)?;
        doc["failures"] = serde_json::to_value(&failures)?;
        doc["tables"] = serde_json::to_value(&many_tables)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(failures.is_empty())
}
