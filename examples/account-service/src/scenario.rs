//! The scripted scenario, driven over HTTP, and the check that the read models converged to the
//! write model. Shared by the `account-demo` driver and the integration tests.
//!
//! The scenario is deterministic: account `i` goes through the same lifecycle on every run.
//! Rejected commands run one at a time while nothing else is written, and each one is checked to
//! have written no outbox row.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use anyhow::{Context, Result, bail, ensure};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::{Account, Status};
use crate::http::ErrorBody;
use crate::{legacy, read_model, store};

/// The phases, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Open every account (pending).
    Open,
    /// Validate (activate) three in four.
    Validate,
    /// Change the email of one in five.
    ChangeEmail,
    /// Deactivate some active accounts.
    Deactivate,
    /// Re-activate half of those.
    Reactivate,
    /// Close one in seven.
    Close,
    /// Open new accounts with the emails the closed ones freed.
    Reuse,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 7] = [
        Phase::Open,
        Phase::Validate,
        Phase::ChangeEmail,
        Phase::Deactivate,
        Phase::Reactivate,
        Phase::Close,
        Phase::Reuse,
    ];
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Open => "open accounts",
            Phase::Validate => "validate accounts",
            Phase::ChangeEmail => "change emails",
            Phase::Deactivate => "deactivate accounts",
            Phase::Reactivate => "re-activate accounts",
            Phase::Close => "close accounts",
            Phase::Reuse => "reuse freed emails",
        })
    }
}

/// A command the service rejected, as the scenario expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedCommand {
    /// What was tried.
    pub what: String,
    /// HTTP status.
    pub status: u16,
    /// The error code.
    pub code: String,
    /// Outbox rows written by it (must be 0).
    pub outbox_rows_written: i64,
}

/// What one phase did.
#[derive(Debug, Clone, Default)]
pub struct PhaseReport {
    /// Commands accepted (each wrote exactly one event).
    pub accepted: usize,
    /// Commands rejected.
    pub rejected: Vec<RejectedCommand>,
}

/// The scenario against one account service.
pub struct Scenario {
    http: reqwest::Client,
    base: String,
    write: PgPool,
    size: usize,
    concurrency: usize,
    accounts: Vec<Account>,
}

impl Scenario {
    /// A scenario of `size` accounts against the service at `base_url` (e.g.
    /// `http://127.0.0.1:8080`), whose database is `write` (used to check that rejected commands
    /// write nothing).
    pub fn new(base_url: &str, write: PgPool, size: usize) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base_url.trim_end_matches('/').to_owned(),
            write,
            size: size.max(8),
            concurrency: 8,
            accounts: Vec::new(),
        }
    }

    /// The accounts opened so far, in opening order.
    pub fn accounts(&self) -> &[Account] {
        &self.accounts
    }

    async fn outbox_rows(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.write)
            .await?)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<std::result::Result<T, (u16, ErrorBody)>> {
        let response = request
            .send()
            .await
            .context("calling the account service")?;
        let status = response.status();
        if status.is_success() {
            Ok(Ok(response.json().await?))
        } else {
            let body: ErrorBody = response
                .json()
                .await
                .with_context(|| format!("error response {status} without a JSON body"))?;
            Ok(Err((status.as_u16(), body)))
        }
    }

    fn open_request(&self, owner: &str, email: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/accounts", self.base))
            .json(&json!({ "owner": owner, "email": email }))
    }

    fn command_request(&self, id: Uuid, command: &str) -> reqwest::RequestBuilder {
        let url = format!("{}/accounts/{id}", self.base);
        match command {
            "activate" => self.http.post(format!("{url}/activate")),
            "deactivate" => self
                .http
                .post(format!("{url}/deactivate"))
                .json(&json!({ "reason": "suspicious activity" })),
            "close" => self
                .http
                .post(format!("{url}/close"))
                .json(&json!({ "reason": "customer request" })),
            email => self
                .http
                .put(format!("{url}/email"))
                .json(&json!({ "email": email })),
        }
    }

    /// Runs accepted commands concurrently (different accounts), each must succeed.
    async fn accept_all(&self, commands: Vec<(usize, String)>) -> Result<Vec<(usize, Account)>> {
        stream::iter(commands)
            .map(|(i, command)| async move {
                let id = self.accounts[i].id;
                match self
                    .send::<Account>(self.command_request(id, &command))
                    .await?
                {
                    Ok(account) => Ok((i, account)),
                    Err((status, body)) => bail!(
                        "`{command}` on account #{i} was rejected ({status} {}): {}",
                        body.error,
                        body.message
                    ),
                }
            })
            .buffer_unordered(self.concurrency)
            .try_collect()
            .await
    }

    /// Sends a command that must be rejected with `status`/`code` and must write no event.
    async fn reject(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
        status: u16,
        code: &str,
    ) -> Result<RejectedCommand> {
        let before = self.outbox_rows().await?;
        let outcome = self.send::<serde_json::Value>(request).await?;
        let after = self.outbox_rows().await?;
        match outcome {
            Ok(_) => bail!("`{what}` was accepted, but the rules must reject it"),
            Err((got, body)) => {
                ensure!(
                    got == status && body.error == code,
                    "`{what}`: expected {status} {code}, got {got} {} ({})",
                    body.error,
                    body.message
                );
                Ok(RejectedCommand {
                    what: format!("{what}: {}", body.message),
                    status: got,
                    code: body.error,
                    outbox_rows_written: after - before,
                })
            }
        }
    }

    fn email(i: usize) -> String {
        format!("user{i}@example.com")
    }

    fn indices(&self, keep: impl Fn(usize, &Account) -> bool) -> Vec<usize> {
        (0..self.accounts.len())
            .filter(|&i| keep(i, &self.accounts[i]))
            .collect()
    }

    fn update(&mut self, done: Vec<(usize, Account)>) -> usize {
        let n = done.len();
        for (i, account) in done {
            self.accounts[i] = account;
        }
        n
    }

    /// Runs one phase.
    pub async fn run(&mut self, phase: Phase) -> Result<PhaseReport> {
        let mut report = PhaseReport::default();
        match phase {
            Phase::Open => {
                let this = &*self;
                let opened: Vec<Account> = stream::iter(0..self.size)
                    .map(|i| async move {
                        match this
                            .send::<Account>(
                                this.open_request(&format!("Owner {i}"), &Self::email(i)),
                            )
                            .await?
                        {
                            Ok(a) => Ok(a),
                            Err((s, b)) => bail!("opening account #{i}: {s} {}", b.message),
                        }
                    })
                    .buffered(this.concurrency)
                    .try_collect()
                    .await?;
                report.accepted = opened.len();
                self.accounts = opened;
                report.rejected.push(
                    self.reject(
                        "open a second account with user0@example.com",
                        self.open_request("Impostor", "USER0@example.com"),
                        409,
                        "email_taken",
                    )
                    .await?,
                );
                report.rejected.push(
                    self.reject(
                        "open an account with an invalid email",
                        self.open_request("Nobody", "not-an-email"),
                        422,
                        "invalid_email",
                    )
                    .await?,
                );
            }
            Phase::Validate => {
                let todo = self.indices(|i, _| i % 4 != 3);
                let done = self
                    .accept_all(todo.into_iter().map(|i| (i, "activate".into())).collect())
                    .await?;
                report.accepted = self.update(done);
                report.rejected.push(
                    self.reject(
                        "activate an account that is already active",
                        self.command_request(self.accounts[0].id, "activate"),
                        409,
                        "invalid_transition",
                    )
                    .await?,
                );
                report.rejected.push(
                    self.reject(
                        "activate an account that does not exist",
                        self.command_request(Uuid::now_v7(), "activate"),
                        404,
                        "account_not_found",
                    )
                    .await?,
                );
            }
            Phase::ChangeEmail => {
                let todo = self.indices(|i, _| i % 5 == 0);
                let done = self
                    .accept_all(
                        todo.into_iter()
                            .map(|i| (i, format!("user{i}.new@example.com")))
                            .collect(),
                    )
                    .await?;
                report.accepted = self.update(done);
                report.rejected.push(
                    self.reject(
                        "take another account's email",
                        self.command_request(self.accounts[1].id, &Self::email(2)),
                        409,
                        "email_taken",
                    )
                    .await?,
                );
                let current = self.accounts[0].email.clone();
                report.rejected.push(
                    self.reject(
                        "change an email to the same email",
                        self.command_request(self.accounts[0].id, &current),
                        409,
                        "email_unchanged",
                    )
                    .await?,
                );
            }
            Phase::Deactivate => {
                let todo = self.indices(|i, a| a.status == Status::Active && i % 6 == 1);
                let done = self
                    .accept_all(todo.into_iter().map(|i| (i, "deactivate".into())).collect())
                    .await?;
                report.accepted = self.update(done);
                report.rejected.push(
                    self.reject(
                        "deactivate an account still pending validation",
                        self.command_request(self.accounts[3].id, "deactivate"),
                        409,
                        "invalid_transition",
                    )
                    .await?,
                );
            }
            Phase::Reactivate => {
                let inactive = self.indices(|_, a| a.status == Status::Inactive);
                let half = inactive.len().div_ceil(2);
                let done = self
                    .accept_all(
                        inactive
                            .into_iter()
                            .take(half)
                            .map(|i| (i, "activate".into()))
                            .collect(),
                    )
                    .await?;
                report.accepted = self.update(done);
            }
            Phase::Close => {
                let todo = self.indices(|i, _| i % 7 == 2);
                let first = *todo
                    .first()
                    .context("scenario too small to close accounts")?;
                let done = self
                    .accept_all(todo.into_iter().map(|i| (i, "close".into())).collect())
                    .await?;
                report.accepted = self.update(done);
                let closed = self.accounts[first].id;
                report.rejected.push(
                    self.reject(
                        "activate a closed account",
                        self.command_request(closed, "activate"),
                        409,
                        "account_closed",
                    )
                    .await?,
                );
                report.rejected.push(
                    self.reject(
                        "change the email of a closed account",
                        self.command_request(closed, "someone.else@example.com"),
                        409,
                        "account_closed",
                    )
                    .await?,
                );
                report.rejected.push(
                    self.reject(
                        "close a closed account",
                        self.command_request(closed, "close"),
                        409,
                        "account_closed",
                    )
                    .await?,
                );
            }
            Phase::Reuse => {
                let freed: Vec<String> = self
                    .accounts
                    .iter()
                    .filter(|a| a.status == Status::Closed)
                    .map(|a| a.email.clone())
                    .collect();
                for (n, email) in freed.into_iter().enumerate() {
                    match self
                        .send::<Account>(self.open_request(&format!("Newcomer {n}"), &email))
                        .await?
                    {
                        Ok(a) => self.accounts.push(a),
                        Err((s, b)) => bail!("re-using the freed email {email}: {s} {}", b.message),
                    }
                    report.accepted += 1;
                }
            }
        }
        for r in &report.rejected {
            ensure!(
                r.outbox_rows_written == 0,
                "rejected command `{}` wrote {} outbox rows",
                r.what,
                r.outbox_rows_written
            );
        }
        Ok(report)
    }
}

/// Where the write model and the read models stand relative to each other.
#[derive(Debug, Clone, Default)]
pub struct Convergence {
    /// Events in the write model (sum of account versions = outbox rows).
    pub events_written: i64,
    /// Accounts in the write model.
    pub accounts: usize,
    /// Accounts in the query model.
    pub read_accounts: usize,
    /// Events applied to the query model (sum of `events_applied`).
    pub read_events_applied: i64,
    /// Accounts in the legacy list.
    pub legacy_accounts: usize,
    /// Every difference, as a readable line; empty when converged.
    pub differences: Vec<String>,
}

impl Convergence {
    /// Whether the read models equal the write model.
    pub fn converged(&self) -> bool {
        self.differences.is_empty()
    }
}

/// Compares the write model (`write`) with the query model (`query`) and the legacy list
/// (`legacy`).
///
/// The query model must hold every account with the same owner, email, status and version, and
/// must have applied exactly `version` events to each (more means an event was applied twice).
/// The legacy list must hold exactly the accounts that are not closed, enabled iff active.
pub async fn compare(write: &PgPool, query: &PgPool, legacy_db: &PgPool) -> Result<Convergence> {
    let accounts = store::list(write).await?;
    let read = read_model::load(query).await?;
    let flags = legacy::load(legacy_db).await?;
    let mut c = Convergence {
        events_written: accounts.iter().map(|a| a.version).sum(),
        accounts: accounts.len(),
        read_accounts: read.len(),
        read_events_applied: read.iter().map(|r| r.events_applied).sum(),
        legacy_accounts: flags.len(),
        differences: Vec::new(),
    };
    let read: BTreeMap<Uuid, &read_model::AccountView> = read.iter().map(|r| (r.id, r)).collect();
    let flags: BTreeMap<Uuid, bool> = flags.into_iter().collect();
    let mut known = BTreeSet::new();
    for a in &accounts {
        known.insert(a.id);
        match read.get(&a.id) {
            None => c
                .differences
                .push(format!("account {} missing from the query model", a.id)),
            Some(r) => {
                if (
                    r.owner.as_str(),
                    r.email.as_str(),
                    r.status.as_str(),
                    r.version,
                ) != (
                    a.owner.as_str(),
                    a.email.as_str(),
                    a.status.as_str(),
                    a.version,
                ) {
                    c.differences.push(format!(
                        "account {}: write model ({}, {}, v{}) vs query model ({}, {}, v{})",
                        a.id,
                        a.email,
                        a.status.as_str(),
                        a.version,
                        r.email,
                        r.status,
                        r.version
                    ));
                }
                if r.events_applied != r.version {
                    c.differences.push(format!(
                        "account {}: {} events applied for version {} (an event applied twice?)",
                        a.id, r.events_applied, r.version
                    ));
                }
            }
        }
        let expected = (a.status != Status::Closed).then_some(a.status == Status::Active);
        let got = flags.get(&a.id).copied();
        if expected != got {
            c.differences.push(format!(
                "account {}: legacy list says {:?}, expected {:?} (enabled?)",
                a.id, got, expected
            ));
        }
    }
    for id in read.keys().filter(|id| !known.contains(id)) {
        c.differences.push(format!(
            "account {id} in the query model but not in the write model"
        ));
    }
    for id in flags.keys().filter(|id| !known.contains(id)) {
        c.differences.push(format!(
            "account {id} in the legacy list but not in the write model"
        ));
    }
    Ok(c)
}
