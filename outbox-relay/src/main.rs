//! The `outbox-relay` binary: parses the command line, sets up logging, runs the command and maps
//! the outcome to an exit code (0 success, 1 runtime failure, 2 bad configuration, 3 shutdown
//! timed out).

use std::process::ExitCode;

use clap::Parser;
use outbox_relay::cli::{Cli, Command, ConfigAction, LogFormat};
use outbox_relay::config::RelayConfig;
use outbox_relay::failure::Report;
use outbox_relay::{RelayError, RelayGroup};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(try_main(cli));
    // Do not wait for lingering blocking tasks (e.g. a metadata fetch) at exit.
    runtime.shutdown_background();
    ExitCode::from(code as u8)
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,rdkafka=warn"))
        // lapin logs a returned (unroutable) message whole, payload included, at WARN; the
        // RabbitMQ sink reports it itself without the payload.
        .add_directive(
            "lapin::returned_messages=off"
                .parse()
                .expect("a valid directive"),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log collector gets plain lines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

async fn try_main(cli: Cli) -> i32 {
    use outbox_relay::cli::{ParkedAction, SlotAction, TopicsAction};
    use outbox_relay::commands as cmd;

    let (settings, action) = match cli.command {
        None => (Box::new(cli.settings), Action::Run),
        Some(Command::Run(s)) => (s, Action::Run),
        Some(Command::Migrate(s)) => (s, Action::Migrate),
        Some(Command::Status { json, settings }) => (settings, Action::Status(json)),
        Some(Command::Topics {
            action:
                TopicsAction::Ensure {
                    topics,
                    partitions,
                    replication_factor,
                    topic_configs,
                    settings,
                },
        }) => {
            let mut configs = Vec::new();
            for c in topic_configs {
                match c.split_once('=') {
                    Some((k, v)) => configs.push((k.to_owned(), v.to_owned())),
                    None => {
                        tracing::error!("--topic-config `{c}` is not key=value");
                        return 2;
                    }
                }
            }
            let spec = cmd::TopicSpec {
                topics,
                partitions,
                replication: replication_factor,
                configs,
            };
            (settings, Action::Topics(spec))
        }
        Some(Command::Replay { filter, settings }) => {
            let parse = |t: &Option<String>| t.as_deref().map(cmd::parse_time).transpose();
            match (parse(&filter.from), parse(&filter.to)) {
                (Ok(from), Ok(to)) => (
                    settings,
                    Action::Replay(cmd::ReplayFilter {
                        from,
                        to,
                        from_id: filter.from_id,
                        to_id: filter.to_id,
                        event_types: filter.event_types,
                        aggregate_type: filter.aggregate_type,
                    }),
                ),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!("{e}");
                    return 2;
                }
            }
        }
        Some(Command::Parked { action }) => match action {
            ParkedAction::List { json, settings } => (settings, Action::ParkedList(json)),
            ParkedAction::Retry { ids, all, settings } => match selection(ids, all) {
                Some(sel) => (settings, Action::ParkedRetry(sel)),
                None => return 2,
            },
            ParkedAction::Drop { ids, all, settings } => match selection(ids, all) {
                Some(sel) => (settings, Action::ParkedDrop(sel)),
                None => return 2,
            },
        },
        Some(Command::Slot { action }) => match action {
            SlotAction::List { json, settings } => (settings, Action::SlotList(json)),
            SlotAction::Drop { name, settings } => (settings, Action::SlotDrop(name)),
        },
        Some(Command::Config {
            action: ConfigAction::Validate(s),
        }) => (s, Action::Validate),
        Some(Command::Config {
            action: ConfigAction::Print(s),
        }) => (s, Action::Print),
    };
    // `replay` and `parked …` take `--table` as the selector of one of several tables.
    let loaded = if action.selects_table() {
        settings.load_selecting_table()
    } else {
        settings.load().map(|c| (c, None))
    };
    let (config, selector) = match loaded {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{}", Report(&e));
            return 2;
        }
    };
    let selector = selector.as_deref();
    let result = match action {
        Action::Run => return run(config).await,
        Action::Migrate => cmd::migrate(&config).await,
        Action::Status(json) => cmd::status(&config, json).await,
        Action::Topics(spec) => cmd::topics_ensure(&config, &spec).await,
        Action::Replay(filter) => cmd::replay(&config, selector, &filter).await.map(drop),
        Action::ParkedList(json) => cmd::parked_list(&config, selector, json).await,
        Action::ParkedRetry(sel) => cmd::parked_retry(&config, selector, &sel).await.map(drop),
        Action::ParkedDrop(sel) => cmd::parked_drop(&config, selector, &sel).await.map(drop),
        Action::SlotList(json) => cmd::slot_list(&config, json).await,
        Action::SlotDrop(name) => cmd::slot_drop(&config, &name).await,
        Action::Validate => {
            println!("configuration is valid");
            Ok(())
        }
        Action::Print => {
            print!("{}", outbox_relay::config::load::render_redacted(&config));
            Ok(())
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{}", Report(&e));
            e.code
        }
    }
}

fn selection(ids: Vec<uuid::Uuid>, all: bool) -> Option<outbox_relay::commands::Selection> {
    use outbox_relay::commands::Selection;
    match (all, ids.is_empty()) {
        (true, _) => Some(Selection::All),
        (false, false) => Some(Selection::Ids(ids)),
        (false, true) => {
            tracing::error!("name the parked event ids, or pass --all");
            None
        }
    }
}

enum Action {
    Run,
    Migrate,
    Status(bool),
    Topics(outbox_relay::commands::TopicSpec),
    Replay(outbox_relay::commands::ReplayFilter),
    ParkedList(bool),
    ParkedRetry(outbox_relay::commands::Selection),
    ParkedDrop(outbox_relay::commands::Selection),
    SlotList(bool),
    SlotDrop(String),
    Validate,
    Print,
}

impl Action {
    /// Whether `--table` selects one of several configured tables for this action.
    fn selects_table(&self) -> bool {
        matches!(
            self,
            Action::Replay(_)
                | Action::ParkedList(_)
                | Action::ParkedRetry(_)
                | Action::ParkedDrop(_)
        )
    }
}

async fn run(config: RelayConfig) -> i32 {
    // The OTLP exporter's blocking HTTP client must be built and shut down off the runtime.
    let settings = config.telemetry.clone();
    let telemetry =
        match std::thread::spawn(move || outbox_relay::telemetry::install(&settings)).join() {
            Ok(Ok(guard)) => guard,
            Ok(Err(e)) => {
                tracing::error!("{}", Report(&e));
                return 2;
            }
            Err(_) => {
                tracing::error!("setting up OpenTelemetry export panicked");
                return 1;
            }
        };
    let code = run_relay(config).await;
    if let Some(guard) = telemetry {
        let _ = std::thread::spawn(move || guard.shutdown()).join();
    }
    code
}

async fn run_relay(config: RelayConfig) -> i32 {
    let shutdown_timeout = config.shutdown_timeout;
    // Value schemas whose subject is known now are checked and registered before anything
    // else: an incompatible schema or an unreachable registry stops the start, loudly. (Other
    // subjects are registered at first use; a configuration error is reported just below.)
    if let Ok(router) = config.router() {
        match router.register_static_schemas().await {
            Ok(registered) => {
                for (subject, id) in registered {
                    tracing::info!(
                        subject,
                        schema_id = id,
                        "value schema checked and registered"
                    );
                }
            }
            Err(e) => {
                tracing::error!("cannot start: {}", Report(&e));
                return if e.source.is_transient() { 1 } else { 2 };
            }
        }
    }
    // One table, or one pipeline per table ([[outbox]] sections, a `tables` pattern).
    let relay = match RelayGroup::new(config) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{}", Report(&e));
            return e.exit_code();
        }
    };
    let shutdown = CancellationToken::new();
    let mut task = tokio::spawn(relay.run(shutdown.clone()));
    tokio::select! {
        result = &mut task => return outcome(result),
        _ = termination() => {
            tracing::info!("stop requested: draining in-flight events");
            shutdown.cancel();
        }
    }
    match tokio::time::timeout(shutdown_timeout, task).await {
        Ok(result) => outcome(result),
        Err(_) => {
            tracing::error!(
                "drain did not finish within the shutdown timeout; unacknowledged events will be published again by the next relay"
            );
            3
        }
    }
}

fn outcome(result: Result<Result<(), RelayError>, tokio::task::JoinError>) -> i32 {
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            tracing::error!("{}", Report(&e));
            e.exit_code()
        }
        Err(e) => {
            tracing::error!("relay task failed: {e}");
            1
        }
    }
}

async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
