//! `outbox-chaos`: the fault-injection harness of the outbox relay.
//!
//! ```text
//! cargo run --release --bin outbox-chaos -- [--quick] [--json FILE] [--scenario NAME]
//!     [--runs N] [--source polling|logical] [--seed S] [--no-mutants]
//! ```
//!
//! Starts PostgreSQL and Tansu (unless `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS` are set),
//! builds the relay with its `failpoints` feature (and, in its own target directory, with
//! `failpoints,mutants`), then for each scenario and source mode: creates a database and a
//! topic, runs the relay as a separate process, drives writers that keep a ledger, injects the
//! scenario's faults, waits for quiescence, reads every record back and compares: lost,
//! phantom, duplicates (total and per fault), per-aggregate order inversions, recovery time.
//! Then runs deliberately broken relays (mutants) and checks that their scenario fails.
//! The NATS, RabbitMQ and Redis scenarios run the relay with that sink against private broker
//! processes ([`sinks`]). See `RELIABILITY.md`.

mod env;
mod live;
mod mock;
mod partition;
mod relay;
mod scenario;
mod sinks;
mod workload;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::scenario::{SCENARIOS, Scenario, Settings, SourceMode};

#[derive(Parser, Debug)]
#[command(
    name = "outbox-chaos",
    about = "Fault-injection harness for the outbox relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Every scenario with small workloads and one run each (CI).
    #[arg(long)]
    quick: bool,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these scenarios (and mutants, named `mutant-<name>`); repeatable.
    #[arg(long = "scenario")]
    scenarios: Vec<String>,
    /// Runs per scenario and source mode (default: 1 with --quick, 3 otherwise).
    #[arg(long)]
    runs: Option<usize>,
    /// Only this source mode.
    #[arg(long, value_parser = ["polling", "logical"])]
    source: Option<String>,
    /// Base seed of the workload and fault timing.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Skip the mutant runs.
    #[arg(long)]
    no_mutants: bool,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Host librdkafka's mock cluster for the relay process (used by the harness).
    MockBroker {
        /// Where to write the bootstrap servers.
        #[arg(long)]
        port_file: PathBuf,
    },
    /// List the scenarios and mutants.
    List,
}

/// Figures of one scenario in one source mode, over its runs.
#[derive(Debug, Serialize)]
struct ScenarioReport {
    name: String,
    source: String,
    runs: usize,
    committed: usize,
    rolled_back: usize,
    lost: usize,
    /// Lost slots in insert_delete/logical_message modes: committed events never read before
    /// the operator accepted the loss (documented; not counted in `lost`).
    accepted_loss: usize,
    phantom: usize,
    duplicates: usize,
    max_duplicates_per_crash: usize,
    inversions: usize,
    recovery_ms_p95: f64,
    passed: bool,
    /// Runs skipped because the sink's broker binary is missing.
    skipped: usize,
    faults: usize,
    records: usize,
    notes: Vec<String>,
}

/// Whether a mutant was caught.
#[derive(Debug, Serialize)]
struct MutantReport {
    name: String,
    caught: bool,
    /// Not run: its scenario's broker binary is missing.
    skipped: bool,
    scenario: String,
    source: String,
    detail: String,
}

#[derive(Debug, Serialize)]
struct Report {
    scenarios: Vec<ScenarioReport>,
    mutants: Vec<MutantReport>,
    seed: u64,
    quick: bool,
    duration_s: f64,
}

/// A deliberately broken relay behaviour and the scenario that must catch it.
struct Mutant {
    /// Its name in the report and for `--scenario mutant-<name>`.
    name: &'static str,
    /// The broken behaviour turned on (`OUTBOX_MUTANT`).
    behaviour: &'static str,
    /// (scenario, source) pairs tried in order until one catches it.
    tries: &'static [(&'static str, SourceMode)],
    /// The check expected to fire.
    check: Check,
}

#[derive(Clone, Copy, Debug)]
enum Check {
    Lost,
    Phantom,
    Inversions,
    /// Events that had to be parked (poison, and the events of its aggregate behind it) were
    /// not all in the parked table.
    NotParked,
    /// A deposed leader produced records after it was resumed ([`scenario::ZOMBIE_PRODUCE`]).
    ZombieProduce,
    /// Duplicates where the scenario allows none (a sink whose broker drops re-sent ids).
    Duplicates,
}

const MUTANTS: &[Mutant] = &[
    Mutant {
        name: "cursor",
        behaviour: "cursor",
        tries: &[("late-commits", SourceMode::Polling)],
        check: Check::Lost,
    },
    Mutant {
        name: "ack_before_kafka",
        behaviour: "ack_before_kafka",
        tries: &[
            ("broker-down", SourceMode::Polling),
            ("kill-loop", SourceMode::Polling),
        ],
        check: Check::Lost,
    },
    Mutant {
        name: "confirm_on_receipt",
        behaviour: "confirm_on_receipt",
        tries: &[("broker-down-kill-insert-delete", SourceMode::Logical)],
        check: Check::Lost,
    },
    Mutant {
        name: "accept_messages_any_mode",
        behaviour: "accept_messages_any_mode",
        tries: &[("message-injection", SourceMode::Logical)],
        check: Check::Phantom,
    },
    Mutant {
        name: "park_without_blocking",
        behaviour: "park_without_blocking",
        tries: &[
            ("poison-events", SourceMode::Polling),
            ("poison-events", SourceMode::Logical),
        ],
        check: Check::NotParked,
    },
    Mutant {
        name: "skip_lease_check",
        behaviour: "skip_lease_check",
        tries: &[
            ("leader-paused-at-produce", SourceMode::Polling),
            ("leader-paused-at-produce", SourceMode::Logical),
        ],
        check: Check::ZombieProduce,
    },
    Mutant {
        name: "retry_failed_only",
        behaviour: "retry_failed_only",
        tries: &[("broker-error-in-flight", SourceMode::Polling)],
        check: Check::Inversions,
    },
    Mutant {
        name: "dedupe_off_nats",
        behaviour: sinks::DEDUPE_OFF,
        tries: &[
            ("nats-connection-cut", SourceMode::Polling),
            ("nats-broker-killed", SourceMode::Polling),
        ],
        check: Check::Duplicates,
    },
    Mutant {
        name: "dedupe_off_redis",
        behaviour: sinks::DEDUPE_OFF,
        tries: &[
            ("redis-connection-cut", SourceMode::Polling),
            ("redis-broker-killed", SourceMode::Polling),
        ],
        check: Check::Duplicates,
    },
    Mutant {
        name: "park_without_blocking_nats",
        behaviour: "park_without_blocking",
        tries: &[("nats-publish-refused", SourceMode::Polling)],
        check: Check::NotParked,
    },
    Mutant {
        name: "park_without_blocking_rabbitmq",
        behaviour: "park_without_blocking",
        tries: &[("rabbitmq-publish-refused", SourceMode::Polling)],
        check: Check::NotParked,
    },
    Mutant {
        name: "park_without_blocking_redis",
        behaviour: "park_without_blocking",
        tries: &[("redis-publish-refused", SourceMode::Logical)],
        check: Check::NotParked,
    },
];

fn p95(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let idx = ((samples.len() as f64) * 0.95).ceil() as usize;
    samples[idx.clamp(1, samples.len()) - 1]
}

fn selected(filter: &[String], name: &str) -> bool {
    filter.is_empty() || filter.iter().any(|f| f == name)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Sub::MockBroker { port_file }) => return mock::serve(&port_file),
        Some(Sub::List) => {
            for s in SCENARIOS {
                let sources: Vec<&str> = s.sources.iter().map(|m| m.as_str()).collect();
                println!("{:28} [{}] {}", s.name, sources.join(","), s.about);
            }
            for m in MUTANTS {
                println!(
                    "mutant-{:21} caught by {:?} in {:?}",
                    m.name, m.check, m.tries
                );
            }
            return Ok(());
        }
        None => {}
    }
    // A panic of the session itself (on the main thread: a failed write to stderr panics) ends
    // the process without unwinding: private brokers must not outlive it. (A task's panic on a
    // worker thread is reported by its join handle and the session goes on.)
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some("main") {
            sinks::kill_leftovers();
        }
        default_hook(info);
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    runtime.block_on(chaos(cli))
}

async fn chaos(cli: Cli) -> Result<()> {
    let started = Instant::now();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    for f in &cli.scenarios {
        let known = SCENARIOS.iter().any(|s| s.name == f)
            || MUTANTS.iter().any(|m| format!("mutant-{}", m.name) == *f);
        if !known {
            bail!("unknown scenario `{f}` (see `outbox-chaos list`)");
        }
    }
    let run_mutants = !cli.no_mutants
        && MUTANTS
            .iter()
            .any(|m| selected(&cli.scenarios, &format!("mutant-{}", m.name)));
    let bins = relay::Binaries::ensure(&repo, run_mutants)?;
    let env = env::Env::acquire(&repo)?;
    let result = session(&cli, &env, &bins).await;
    sinks::shutdown().await;
    env.release();
    let report = result?;
    let failed: Vec<String> = report
        .scenarios
        .iter()
        .filter(|s| !s.passed)
        .map(|s| format!("{}/{}", s.name, s.source))
        .chain(
            report
                .mutants
                .iter()
                .filter(|m| !m.caught && !m.skipped)
                .map(|m| format!("mutant {} not caught", m.name)),
        )
        .collect();
    eprintln!(
        "chaos: finished in {:.0}s: {} scenario runs, {} mutants",
        started.elapsed().as_secs_f64(),
        report.scenarios.len(),
        report.mutants.len()
    );
    if let Some(path) = &cli.json {
        let mut report = report;
        report.duration_s = started.elapsed().as_secs_f64();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).ok();
        }
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("chaos: figures written to {}", path.display());
    }
    if !failed.is_empty() {
        eprintln!("chaos: FAILED: {}", failed.join(", "));
        std::process::exit(1);
    }
    Ok(())
}

async fn session(cli: &Cli, env: &env::Env, bins: &relay::Binaries) -> Result<Report> {
    let runs = cli.runs.unwrap_or(if cli.quick { 1 } else { 3 });
    let settings = Settings {
        quick: cli.quick,
        seed: cli.seed,
        batch_size: 50,
        in_flight: 3,
        partitions: 3,
    };
    let mut report = Report {
        scenarios: Vec::new(),
        mutants: Vec::new(),
        seed: cli.seed,
        quick: cli.quick,
        duration_s: 0.0,
    };
    let source_ok = |m: SourceMode| cli.source.as_deref().is_none_or(|s| s == m.as_str());
    for sc in SCENARIOS {
        if !selected(&cli.scenarios, sc.name) {
            continue;
        }
        for &source in sc.sources.iter().filter(|&&m| source_ok(m)) {
            let r = scenario_runs(env, &settings, sc, source, &bins.relay, runs).await;
            report.scenarios.push(r);
        }
    }
    if let Some(mutant_bin) = &bins.mutant {
        for m in MUTANTS {
            if !selected(&cli.scenarios, &format!("mutant-{}", m.name)) {
                continue;
            }
            report
                .mutants
                .push(mutant_run(env, &settings, m, mutant_bin).await);
        }
    }
    Ok(report)
}

async fn scenario_runs(
    env: &env::Env,
    settings: &Settings,
    sc: &Scenario,
    source: SourceMode,
    bin: &std::path::Path,
    runs: usize,
) -> ScenarioReport {
    let mut rep = ScenarioReport {
        name: sc.name.to_owned(),
        source: source.as_str().to_owned(),
        runs: 0,
        committed: 0,
        rolled_back: 0,
        lost: 0,
        accepted_loss: 0,
        phantom: 0,
        duplicates: 0,
        max_duplicates_per_crash: 0,
        inversions: 0,
        recovery_ms_p95: 0.0,
        passed: true,
        skipped: 0,
        faults: 0,
        records: 0,
        notes: Vec::new(),
    };
    let mut recovery = Vec::new();
    for k in 0..runs {
        let seed = settings.seed.wrapping_add(k as u64);
        let t = Instant::now();
        eprint!(
            "chaos: {:28} {:8} run {}/{} seed {seed} … ",
            sc.name,
            source.as_str(),
            k + 1,
            runs
        );
        let r = match scenario::run_once(env, settings, sc, source, bin, None, seed).await {
            Ok(r) if r.skipped.is_some() => {
                let why = r.skipped.unwrap_or_default();
                eprintln!("skipped: {why}");
                rep.skipped += 1;
                rep.notes
                    .push(format!("run {} (seed {seed}): skipped: {why}", k + 1));
                continue;
            }
            Ok(r) => r,
            Err(e) => {
                eprintln!("setup failed: {e:#}");
                rep.passed = false;
                rep.notes
                    .push(format!("run {} (seed {seed}): setup failed: {e:#}", k + 1));
                continue;
            }
        };
        let v = &r.verdict;
        let max_pf = r.per_fault.iter().copied().max().unwrap_or(0);
        eprintln!(
            "{} in {:.1}s: committed {} rolled back {} read {} lost {} (accepted {}) phantom {} dup {} (max/fault {max_pf}, per fault {:?}, re-published {:?}, since slot save {:?}, faults {}) inversions {}",
            if r.passed { "pass" } else { "FAIL" },
            t.elapsed().as_secs_f64(),
            r.committed,
            r.rolled_back,
            v.records,
            v.lost,
            r.accepted_loss,
            v.phantom + r.unidentified,
            v.duplicates,
            r.per_fault,
            r.republished_per_fault,
            r.since_slot_save,
            r.faults,
            v.inversions
        );
        for f in &r.failures {
            eprintln!("chaos:     failure: {f}");
        }
        for n in &r.notes {
            eprintln!("chaos:     note: {n}");
        }
        if !r.passed {
            for l in &r.log_tail {
                eprintln!("chaos:     relay log: {l}");
            }
        }
        rep.runs += 1;
        rep.committed += r.committed;
        rep.rolled_back += r.rolled_back;
        rep.lost += v.lost;
        rep.accepted_loss += r.accepted_loss;
        rep.phantom += v.phantom + r.unidentified;
        rep.duplicates += v.duplicates;
        rep.inversions += v.inversions;
        rep.records += v.records;
        rep.faults += r.faults;
        rep.max_duplicates_per_crash = rep.max_duplicates_per_crash.max(max_pf);
        rep.passed &= r.passed;
        recovery.extend(r.recovery_ms.iter().copied());
        for f in r.failures.iter().chain(&r.notes) {
            rep.notes.push(format!("run {} (seed {seed}): {f}", k + 1));
        }
    }
    rep.recovery_ms_p95 = p95(&mut recovery);
    rep
}

async fn mutant_run(
    env: &env::Env,
    settings: &Settings,
    m: &Mutant,
    bin: &std::path::Path,
) -> MutantReport {
    let mut detail = Vec::new();
    for &(name, source) in m.tries {
        let Some(sc) = SCENARIOS.iter().find(|s| s.name == name) else {
            continue;
        };
        for k in 0..2u64 {
            let seed = settings.seed.wrapping_add(1000 + k);
            eprint!(
                "chaos: mutant {:20} in {name}/{} seed {seed} … ",
                m.name,
                source.as_str()
            );
            match scenario::run_once(env, settings, sc, source, bin, Some(m.behaviour), seed).await
            {
                Ok(r) if r.skipped.is_some() => {
                    let why = r.skipped.unwrap_or_default();
                    eprintln!("skipped: {why}");
                    return MutantReport {
                        name: m.name.to_owned(),
                        caught: false,
                        skipped: true,
                        scenario: name.to_owned(),
                        source: source.as_str().to_owned(),
                        detail: format!("skipped: {why}"),
                    };
                }
                Ok(r) => {
                    let v = &r.verdict;
                    let fired = match m.check {
                        Check::Lost => v.lost > 0,
                        Check::Phantom => v.phantom > 0,
                        Check::Inversions => v.inversions > 0,
                        Check::Duplicates => r
                            .failures
                            .iter()
                            .any(|f| f.contains("where none are allowed")),
                        Check::NotParked => r
                            .failures
                            .iter()
                            .any(|f| f.contains("are not in the parked table")),
                        Check::ZombieProduce => r
                            .failures
                            .iter()
                            .any(|f| f.contains(scenario::ZOMBIE_PRODUCE)),
                    };
                    let line = format!(
                        "{name}/{}: lost {} phantom {} dup {} inversions {} passed {}",
                        source.as_str(),
                        v.lost,
                        v.phantom,
                        v.duplicates,
                        v.inversions,
                        r.passed
                    );
                    eprintln!("{}", if fired { "caught" } else { "not caught" });
                    eprintln!("chaos:     {line}");
                    if fired {
                        return MutantReport {
                            name: m.name.to_owned(),
                            caught: true,
                            skipped: false,
                            scenario: name.to_owned(),
                            source: source.as_str().to_owned(),
                            detail: format!("{:?} check fired: {line}", m.check),
                        };
                    }
                    detail.push(line);
                }
                Err(e) => {
                    eprintln!("setup failed: {e:#}");
                    detail.push(format!("{name}: setup failed: {e:#}"));
                }
            }
        }
    }
    MutantReport {
        name: m.name.to_owned(),
        caught: false,
        skipped: false,
        scenario: String::new(),
        source: String::new(),
        detail: detail.join("; "),
    }
}
