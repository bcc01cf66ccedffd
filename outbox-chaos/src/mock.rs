//! librdkafka's mock cluster hosted in a helper process (`outbox-chaos mock-broker`), so that the
//! relay — a separate process — can connect to it while the harness injects broker faults.
//!
//! Line protocol on the helper's stdin, one answer line (`ok` or `err <reason>`) on its stdout:
//!
//! | command                 | effect                                                        |
//! |-------------------------|---------------------------------------------------------------|
//! | `topic NAME PARTITIONS` | create a topic                                                |
//! | `down` / `up`           | broker 1 goes down (connections refused/closed) / comes back  |
//! | `rtt MS`                | add `MS` milliseconds of round-trip time to broker 1          |
//! | `errors NAME…`          | the next Produce requests fail with these errors, in order    |
//! | `clear`                 | forget injected Produce errors                                |
//!
//! Error names: `not_enough_replicas`, `request_timed_out` (retriable),
//! `invalid_producer_epoch`, `cluster_authorization_failed`, `topic_authorization_failed`,
//! `unknown_server_error` (not retriable). The helper exits when its stdin closes.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

fn error_code(name: &str) -> Option<RDKafkaRespErr> {
    use RDKafkaRespErr::*;
    Some(match name {
        "not_enough_replicas" => RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        "request_timed_out" => RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        "invalid_producer_epoch" => RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH,
        "cluster_authorization_failed" => RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED,
        "topic_authorization_failed" => RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        "unknown_server_error" => RD_KAFKA_RESP_ERR_UNKNOWN,
        _ => return None,
    })
}

/// The helper process's main: hosts the cluster and serves the line protocol until EOF.
pub fn serve(port_file: &Path) -> Result<()> {
    let mock = MockCluster::new(1).context("creating the mock cluster")?;
    std::fs::write(port_file, mock.bootstrap_servers())?;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let result: Result<()> = match words.as_slice() {
            ["topic", name, parts] => mock
                .create_topic(name, parts.parse()?, 1)
                .map_err(Into::into),
            ["down"] => mock.broker_down(1).map_err(Into::into),
            ["up"] => mock.broker_up(1).map_err(Into::into),
            ["rtt", ms] => mock
                .broker_round_trip_time(1, Duration::from_millis(ms.parse()?))
                .map_err(Into::into),
            ["errors", names @ ..] => {
                let codes: Option<Vec<RDKafkaRespErr>> =
                    names.iter().map(|n| error_code(n)).collect();
                match codes {
                    Some(codes) => {
                        mock.request_errors(RDKafkaApiKey::Produce, &codes);
                        Ok(())
                    }
                    None => Err(anyhow::anyhow!("unknown error name in {names:?}")),
                }
            }
            ["clear"] => {
                mock.clear_request_errors(RDKafkaApiKey::Produce);
                Ok(())
            }
            _ => Err(anyhow::anyhow!("unknown command `{line}`")),
        };
        match result {
            Ok(()) => writeln!(out, "ok")?,
            Err(e) => writeln!(out, "err {e}")?,
        }
        out.flush()?;
    }
    Ok(())
}

/// A running mock-broker helper, driven by the harness.
pub struct MockBroker {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The cluster's bootstrap servers (127.0.0.1 ports).
    pub bootstrap: String,
    _port_file: PathBuf,
}

impl MockBroker {
    /// Starts `<self exe> mock-broker --port-file F` and waits for its address.
    pub async fn start() -> Result<Self> {
        let exe = std::env::current_exe()?;
        let port_file =
            std::env::temp_dir().join(format!("outbox-chaos-mock-{}", uuid::Uuid::new_v4()));
        let mut child = Command::new(exe)
            .arg("mock-broker")
            .arg("--port-file")
            .arg(&port_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("spawning the mock-broker helper")?;
        let stdin = child.stdin.take().context("helper stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("helper stdout")?);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let bootstrap = loop {
            if let Ok(s) = std::fs::read_to_string(&port_file)
                && !s.is_empty()
            {
                break s;
            }
            if std::time::Instant::now() > deadline {
                bail!("the mock-broker helper never wrote its address");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let _ = std::fs::remove_file(&port_file);
        Ok(Self {
            _child: child,
            stdin,
            stdout,
            bootstrap,
            _port_file: port_file,
        })
    }

    /// Sends one command and waits for its answer.
    pub async fn command(&mut self, line: &str) -> Result<()> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).await?;
        match answer.trim() {
            "ok" => Ok(()),
            other => bail!("mock broker: `{line}`: {other}"),
        }
    }
}
