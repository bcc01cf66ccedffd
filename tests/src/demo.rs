//! The account-service demo wired up for tests: three databases (write model, query model, legacy
//! list), a run-specific account topic, the account service in-process, the relay as a sidecar
//! process configured by `OUTBOX_*` variables, and projectors started on demand.

use std::time::{Duration, Instant};

use account_service::projector::{Projector, ProjectorConfig};
use account_service::scenario::{self, Convergence};
use account_service::store::{self, Accounts};
use anyhow::{Result, bail};

use crate::{RelayProcess, TestDb, create_topic, services, unique};

/// Everything the demo runs, for one test.
pub struct DemoEnv {
    /// The account service's database (accounts + outbox).
    pub write: TestDb,
    /// The query model's database.
    pub query: TestDb,
    /// The legacy application's database.
    pub legacy: TestDb,
    /// The account topic of this test.
    pub topic: String,
    /// The account service's base URL.
    pub service_url: String,
    /// The relay sidecar.
    pub relay: RelayProcess,
    service: tokio::task::JoinHandle<()>,
}

impl DemoEnv {
    /// Creates the databases and the topic (3 partitions), starts the service and the relay.
    pub async fn start(prefix: &str) -> Result<Self> {
        let write = TestDb::create(&format!("{prefix}_w")).await?;
        let query = TestDb::create(&format!("{prefix}_q")).await?;
        let legacy = TestDb::create(&format!("{prefix}_l")).await?;
        let topic = unique("outbox.event.account");
        create_topic(&topic, 3).await?;
        store::migrate(&mut *write.pool.acquire().await?).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let service_url = format!("http://{}", listener.local_addr()?);
        let app = account_service::http::router(Accounts::new(write.pool.clone()));
        let service = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let relay = RelayProcess::start(&write, &[], &[("OUTBOX_TOPIC", topic.as_str())]).await?;
        Ok(Self {
            write,
            query,
            legacy,
            topic,
            service_url,
            relay,
            service,
        })
    }

    /// Projector settings for this environment; `groups` distinguishes consumer groups (a new
    /// suffix = offsets reset to the beginning).
    pub fn projector_config(&self, groups: &str) -> ProjectorConfig {
        let mut c = ProjectorConfig::new(
            services().bootstrap,
            self.topic.clone(),
            self.query.url.clone(),
            self.legacy.url.clone(),
        );
        c.query_group = format!("account-query-{groups}");
        c.legacy_group = format!("legacy-app-{groups}");
        c
    }

    /// Starts a projector.
    pub async fn projector(&self, groups: &str) -> Result<Projector> {
        Projector::start(self.projector_config(groups)).await
    }

    /// Compares the read models with the write model now.
    pub async fn compare(&self) -> Result<Convergence> {
        scenario::compare(&self.write.pool, &self.query.pool, &self.legacy.pool).await
    }

    /// Waits until the read models equal the write model.
    pub async fn wait_converged(&self, timeout: Duration) -> Result<Convergence> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.compare().await?;
            if c.converged() {
                return Ok(c);
            }
            if Instant::now() > deadline {
                bail!(
                    "read models did not converge in {timeout:?}: {:#?}\nrelay log:\n{}",
                    &c.differences[..c.differences.len().min(10)],
                    self.relay.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Outbox rows written so far.
    pub async fn outbox_rows(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.write.pool)
            .await?)
    }

    /// Stops the service and the relay.
    pub async fn stop(self) -> Result<()> {
        self.service.abort();
        let (code, log) = self.relay.terminate(Duration::from_secs(20)).await?;
        if code != 0 {
            bail!("relay exited with {code}:\n{log}");
        }
        Ok(())
    }
}
