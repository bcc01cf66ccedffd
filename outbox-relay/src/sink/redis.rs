//! The Redis Streams sink (`sink = "redis"`, settings in `[redis]`,
//! [`crate::config::RedisSettings`]).
//!
//! # How a record maps onto Redis
//! - **Destination → stream.** Each destination (`outbox.event.<aggregatetype>` by default; the
//!   route template, routes and the `topic` column apply as for every sink) is one stream, whose
//!   key is the destination name. The stream is created by its first entry: there is nothing to
//!   create up front (`topics ensure` only checks that no key of another type holds a
//!   destination's name, [`RedisSink::key_types`]).
//! - **Record → one entry**, appended with `XADD <destination> [MAXLEN ~ <redis.maxlen>] * …`
//!   (the server assigns the entry id), with these fields in this order:
//!
//!   | field | holds |
//!   |---|---|
//!   | `key` | the key: the aggregate id |
//!   | `value` | the payload (absent for a null payload) |
//!   | `ts` | the event's creation time, milliseconds since the epoch (absent when unknown) |
//!   | `h:<name>` | one field per header, in the record's order: `h:id` (the event id), `h:eventType`, `h:schemaVersion`, `h:traceparent`, `h:outbox-aggregate-seq`, CloudEvents' `h:ce_*`, the row's own headers |
//!
//!   A consumer reads the stream with `XREAD`/`XREADGROUP` and finds the event id in `h:id`.
//!
//! # Delivery and duplicates
//! Every record is appended by one Lua script (`EVALSHA`; the script is loaded with
//! `SCRIPT LOAD` at the head of every batch, so a restarted or flushed server never answers
//! `NOSCRIPT`). Atomically, the script
//! 1. refuses the record (`OUTBOXGAP`) when the previous record of the same destination and key
//!    in the same batch was not appended (its dedupe key holds no entry id), so a refused record is never overtaken by a later one
//!    of its aggregate (Redis goes on executing a pipeline after one command fails);
//! 2. looks up `<redis.dedupe_prefix>:<event id>`: when it exists, the event was appended before
//!    (by an earlier attempt, or a relay that died before it could acknowledge) and the script
//!    appends nothing and returns the earlier entry's id, which is reported as delivered;
//! 3. otherwise appends the entry and stores its id under that key with the TTL
//!    `redis.dedupe_ttl` (24 h by default).
//!
//! So a re-send after a failure, a restart or a standby's takeover is dropped as long as it
//! comes within `redis.dedupe_ttl` of the first append: that is the duplicate window. Only a
//! re-send later than that (a relay down for longer, a parked event retried a day later)
//! appends a second entry, which carries the same `h:id`. A record without an `id` header
//! (the relay always sets one) is appended without this check. A re-send within the window is
//! dropped even when the stream was trimmed or deleted meanwhile. The window costs memory: one
//! small string key (the prefix, the event id and an entry id, roughly 140 bytes with Redis's
//! overhead) per event for `redis.dedupe_ttl`, e.g. about 140 MB for a million events a day.
//!
//! # Order
//! A batch is one pipeline written on one connection, so Redis executes its records in order,
//! and records of one destination and key are appended in the order the relay enqueued them.
//! Batches go out one after the other on that connection, each only after the previous one was
//! answered in full; once any record of a batch failed, nothing further is sent on that
//! connection: later batches fail unsent until the relay [`Sink::recreate`]s the sink, which
//! opens a new connection and resumes from the first unacknowledged event. A batch of the old
//! connection that is still executing on the server cannot overtake anything either: both
//! connections send the same records in the same order, and each record is appended once, at
//! its first execution.
//!
//! # Many tables, one connection
//! The tables of one relay send on one multiplexed connection ([`RedisConnection`], see
//! [`crate::sink::shared`]). Each table has its own writer task, so its batches still go out one
//! at a time, each after the previous one was answered in full, and its failure flag, in-flight
//! count and purge epoch are its own. A batch that fails for the connection's sake (I/O, no
//! reply within the delivery timeout, a reply the sink cannot read) replaces the connection —
//! once, however many tables see it — and the next batch of every table goes out on the new one;
//! a refusal by the server (`OOM`, `WRONGTYPE`, too few replicas) fails only that table's batch
//! and leaves the connection in place. The argument above holds across tables: what a table
//! re-sends is appended once, whichever connection carries it. The start-up check and the idle
//! probes of a shared connection use it rather than connections of their own. A single-table
//! relay has a connection of its own of the same kind, so the failure path is the same code.
//!
//! # Durability
//! A record counts as delivered once the script's reply arrived (and, with
//! `redis.wait_replicas > 0`, once `WAIT <n> <redis.wait_timeout>` after the batch reported at
//! least that many replicas; fewer fails the batch, which is sent again and deduplicated).
//! **Redis acknowledges writes from memory.** Without one of the following, a server crash can
//! lose entries the relay already acknowledged to PostgreSQL:
//! - `appendonly yes` and `appendfsync always` in `redis.conf` (or `CONFIG SET appendonly yes`,
//!   `CONFIG SET appendfsync always`, then `CONFIG REWRITE`): every write is fsynced to the
//!   append-only file before the reply (with `everysec`, up to a second of writes can be lost);
//! - replicas and `redis.wait_replicas = <n>`: a record counts only once `n` replicas have it
//!   (a crash of the primary then loses nothing a replica has, as long as one is promoted).
//!
//! Start-up logs a warning when the server has neither (when `CONFIG GET` is allowed). The
//! dedupe keys are written in the same script as the entry, so they are exactly as durable.
//!
//! # Errors
//! | what | class |
//! |---|---|
//! | connection refused, I/O error, connection dropped, no reply within `redis.delivery_timeout`, `LOADING`, `BUSY`, `READONLY` (a failover), `MASTERDOWN`, `MISCONF`, `OOM` (`maxmemory` reached: it concerns every record, so it is retried rather than parking each event) | [`ErrorClass::Retry`] |
//! | a record larger than `redis.max_record_bytes` (or the server's `proto-max-bulk-len`), checked before it is sent | [`ErrorClass::Record`]: parked |
//! | `NOAUTH`, `WRONGPASS`, `NOPERM` | [`ErrorClass::Stop`] with the credentials/ACL fix |
//! | `WRONGTYPE` (a key that is not a stream holds the destination's name) | [`ErrorClass::Stop`] |
//! | `MOVED`, `ASK`, `CROSSSLOT` (a Redis Cluster) | [`ErrorClass::Stop`]: the sink talks to one server |
//! | anything else | [`ErrorClass::Unlisted`] |
//!
//! The server refuses a bulk string longer than its `proto-max-bulk-len` by closing the
//! connection, which would look like a transient failure: start-up reads that limit
//! (`CONFIG GET`) so such a record is refused before it is sent. Where `CONFIG` is not allowed,
//! keep `redis.max_record_bytes` at or below the server's limit.
//!
//! # The client
//! The [`redis`] crate (redis-rs): the most widely used Redis client for Rust, maintained by
//! the redis-rs organisation with regular releases, a tokio multiplexed connection, pipelines
//! with per-command replies (`ignore_errors`) and TLS through native-tls (which the relay
//! already links for PostgreSQL). `fred` was the alternative; it is maintained too but much
//! less used, and its automatic reconnection and retry machinery is something this sink has to
//! turn off rather than use: a connection that silently reconnects and replays would let a
//! later batch through after an earlier one was lost. For the same reason the sink does not use
//! redis-rs's `ConnectionManager`: the relay's own [`Sink::recreate`] is the reconnect.
//! Redis Cluster is not supported (one server, or a primary with replicas through `WAIT`).
//! The relay's connections are named `outbox-relay-<pid>` (`CLIENT LIST` shows them).

use crate::sink::{published_within, record_probe};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{Cmd, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::RedisSettings;
use crate::config::redis::REDIS_MAX_BULK;
use crate::route::OutboundRecord;
use crate::sink::shared::{Generation, SharedConnection};
use crate::sink::{
    Delivered, DeliveryError, DeliveryFault, ErrorClass, Fenced, PendingBatch, Sink, SinkError,
    SinkKind,
};

/// The broker's name in this sink's errors.
const REDIS: &str = "Redis";

/// The append script (see the [module docs](self)). `KEYS`: the stream, then the dedupe key
/// (when `ARGV[3]` is `1`), then the previous record's dedupe key (when `ARGV[4]` is `1`).
/// `ARGV`: the dedupe TTL in ms, `MAXLEN` (`0`: none), the two flags, then the entry's fields.
/// Replies `{1, id}` when it appended, `{0, id}` with the earlier entry's id when the event was
/// appended before, or an `OUTBOXGAP` error.
pub const APPEND_SCRIPT: &str = r#"
local n = 1
local dedupe, previous
if ARGV[3] == '1' then n = n + 1; dedupe = KEYS[n] end
if ARGV[4] == '1' then n = n + 1; previous = KEYS[n] end
if previous and type(redis.pcall('GET', previous)) ~= 'string' then
  return redis.error_reply('OUTBOXGAP the previous record of this key in the batch was not appended')
end
if dedupe then
  local seen = redis.call('GET', dedupe)
  if seen then return {0, seen} end
end
local id
if ARGV[2] ~= '0' then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 5))
else
  id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5))
end
if dedupe then redis.call('SET', dedupe, id, 'PX', ARGV[1]) end
return {1, id}
"#;

/// The prefix of a header's field name in an entry (`h:id`, `h:eventType`, …).
pub const HEADER_FIELD_PREFIX: &str = "h:";

/// How long a batch's waiter gives the connection beyond the delivery timeout before it stops
/// waiting and stops the table's writer itself.
const WAIT_GRACE: Duration = Duration::from_secs(1);

/// Why a record was not delivered, before it is classified ([`classify`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The record is larger than the sink sends.
    #[error(
        "the record is {size} bytes, more than the {limit} bytes Redis takes from this relay (redis.max_record_bytes, or the server's proto-max-bulk-len)"
    )]
    TooLarge {
        /// The record's size.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The server answered the record's command with an error.
    #[error("{code}: {detail}")]
    Server {
        /// The error's code (`WRONGTYPE`, `OOM`, `NOAUTH`, …).
        code: String,
        /// The rest of the server's message.
        detail: String,
    },
    /// The connection failed (refused, dropped, I/O, TLS) or the client refused the command.
    #[error("{detail}")]
    Connection {
        /// The client's error code when it has one (`WRONGPASS` from the handshake, …),
        /// otherwise its category (`IO`, `AUTH`, `CLIENT`, …).
        code: String,
        /// The client's description.
        detail: String,
        /// Whether it is an I/O failure (connection refused, reset, closed, timed out).
        io: bool,
    },
    /// No reply within `redis.delivery_timeout`.
    #[error("no reply from Redis within redis.delivery_timeout ({0:?})")]
    Timeout(Duration),
    /// `WAIT` reported fewer replicas than `redis.wait_replicas`.
    #[error(
        "only {acked} of the {wanted} replicas (redis.wait_replicas) acknowledged the batch within redis.wait_timeout"
    )]
    Replicas {
        /// Replicas that acknowledged.
        acked: i64,
        /// `redis.wait_replicas`.
        wanted: u32,
    },
    /// Not sent: the connection had failed, the sink was recreated or purged.
    #[error("not sent: {0}")]
    NotSent(String),
    /// A reply the sink does not understand.
    #[error("unexpected reply from Redis: {0}")]
    Reply(String),
}

impl DeliveryError for SendError {
    fn kind(&self) -> String {
        error_name(self)
    }
}

/// The stable name of a send error: the server's error code (`WRONGTYPE`, `OOM`, …) or the
/// sink's own (`VALUE_TOO_LARGE`, `TIMEOUT`, `WAIT_REPLICAS`, `NOT_SENT`, `UNEXPECTED_REPLY`).
pub fn error_name(error: &SendError) -> String {
    match error {
        SendError::TooLarge { .. } => "VALUE_TOO_LARGE".into(),
        SendError::Server { code, .. } | SendError::Connection { code, .. } => code.clone(),
        SendError::Timeout(_) => "TIMEOUT".into(),
        SendError::Replicas { .. } => "WAIT_REPLICAS".into(),
        SendError::NotSent(_) => "NOT_SENT".into(),
        SendError::Reply(_) => "UNEXPECTED_REPLY".into(),
    }
}

const CREDENTIALS_FIX: &str = "fix the user and password in redis.url (OUTBOX_REDIS__URL or OUTBOX_REDIS__URL_FILE; redis://user:password@host:port), then restart the relay";
const ACL_FIX: &str = "grant the relay's Redis user the commands +evalsha +script|load +xadd +set +get +exists +wait +ping on the destination streams and the dedupe keys (ACL SETUSER <user> +@stream +@string +@scripting +wait +ping ~outbox.* ~outbox:*), then restart the relay";
const WRONGTYPE_FIX: &str = "a key that is not a stream holds the destination's name: rename or delete that key, or route the events to another destination, then restart the relay";
const CLUSTER_FIX: &str = "the Redis sink talks to one server (or a primary with replicas, redis.wait_replicas), not a Redis Cluster: point redis.url at a standalone primary";

/// Classifies a send error code by code. See the [module docs](self).
fn classify_code(code: &str) -> ErrorClass {
    match code {
        "NOAUTH" | "WRONGPASS" | "AUTH" => ErrorClass::Stop(CREDENTIALS_FIX),
        "NOPERM" => ErrorClass::Stop(ACL_FIX),
        "WRONGTYPE" => ErrorClass::Stop(WRONGTYPE_FIX),
        "MOVED" | "ASK" | "CROSSSLOT" | "CLUSTERDOWN" => ErrorClass::Stop(CLUSTER_FIX),
        "OOM" | "LOADING" | "BUSY" | "READONLY" | "MASTERDOWN" | "MISCONF" | "TRYAGAIN"
        | "NOSCRIPT" | "OUTBOXGAP" | "NOREPLICAS" | "IO" => ErrorClass::Retry,
        _ => ErrorClass::Unlisted,
    }
}

/// What the relay does about a record Redis did not take: retry, park or stop. See the
/// [module docs](self) for the table.
pub fn classify(error: &SendError) -> ErrorClass {
    match error {
        SendError::TooLarge { .. } => ErrorClass::Record,
        SendError::Server { code, .. } => classify_code(code),
        SendError::Connection { code, io, .. } => match classify_code(code) {
            ErrorClass::Unlisted if *io => ErrorClass::Retry,
            class => class,
        },
        SendError::Timeout(_) | SendError::Replicas { .. } | SendError::NotSent(_) => {
            ErrorClass::Retry
        }
        SendError::Reply(_) => ErrorClass::Unlisted,
    }
}

/// The broker-neutral form of a send error: its class ([`classify`]), name ([`error_name`]) and
/// description.
pub fn fault(error: &SendError) -> DeliveryFault {
    DeliveryFault {
        class: classify(error),
        name: error_name(error),
        detail: error.to_string(),
    }
}

impl SendError {
    /// A client error (connecting, or a pipeline that got no replies), with `settings`'s
    /// password scrubbed from its text.
    fn from_client(error: &redis::RedisError, settings: &RedisSettings) -> Self {
        let io = error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout();
        let code = match error.code() {
            Some(code) => code.to_owned(),
            None if error.kind() == redis::ErrorKind::AuthenticationFailed => "AUTH".to_owned(),
            None if io => "IO".to_owned(),
            None => format!("{:?}", error.kind()).to_ascii_uppercase(),
        };
        SendError::Connection {
            code,
            detail: settings.scrub(&error.to_string()),
            io,
        }
    }

    /// An error reply to one command.
    fn from_reply(error: &redis::ServerError) -> Self {
        SendError::Server {
            code: error.code().to_owned(),
            detail: error.details().unwrap_or_default().to_owned(),
        }
    }
}

/// What became of one record sent to Redis ([`crate::sink::Outcome`] with the sink's error).
pub type Outcome = crate::sink::Outcome<SendError>;

/// The offset reported for an entry id `<ms>-<seq>`: `ms << 20 | seq` (the sequence capped at
/// 2^20 - 1), increasing in stream order for any realistic append rate. Informational: logs and
/// spans show it; nothing relies on it.
pub fn entry_offset(id: &str) -> i64 {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    let ms = ms.parse::<i64>().unwrap_or(0);
    let seq = seq.parse::<i64>().unwrap_or(0).min((1 << 20) - 1);
    (ms << 20) | seq
}

/// The bytes a record puts into its entry (key, value, timestamp, header names and values),
/// compared with `redis.max_record_bytes`.
pub fn record_size(r: &OutboundRecord) -> usize {
    r.key.len()
        + r.payload.as_ref().map_or(0, Vec::len)
        + r.headers
            .iter()
            .map(|(n, v)| HEADER_FIELD_PREFIX.len() + n.len() + v.len())
            .sum::<usize>()
        + 20
}

/// The fields of a record's entry, in order (see the [module docs](self)): `key`, `value`,
/// `ts`, then `h:<name>` per header.
pub fn entry_fields(r: &OutboundRecord) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut fields = Vec::with_capacity(r.headers.len() + 5);
    fields.push((b"key".to_vec(), r.key.as_bytes().to_vec()));
    if let Some(p) = &r.payload {
        fields.push((b"value".to_vec(), p.clone()));
    }
    if let Some(ts) = r.timestamp_ms {
        fields.push((b"ts".to_vec(), ts.to_string().into_bytes()));
    }
    let header = |name: &str| format!("{HEADER_FIELD_PREFIX}{name}").into_bytes();
    for (name, value) in &r.headers {
        fields.push((header(name), value.clone()));
    }
    if let Some(p) = crate::faults::provenance() {
        fields.push((header(crate::faults::PROVENANCE_HEADER), p.into_bytes()));
    }
    fields
}

/// One batch for the connection's writer task.
struct Job {
    /// The purge epoch it was enqueued in ([`RedisSink::purge`] drops older ones unsent).
    epoch: u64,
    /// One `EVALSHA` of [`APPEND_SCRIPT`] per record.
    calls: Vec<Cmd>,
    deadline: Instant,
    reply: oneshot::Sender<Vec<Result<Delivered, SendError>>>,
    /// Keeps [`RedisSink::in_flight`] counting the job until it is answered or dropped.
    _counted: Counted,
}

/// Records counted in flight for as long as it lives.
struct Counted {
    n: usize,
    counter: Arc<AtomicUsize>,
}

impl Counted {
    fn new(n: usize, counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(n, Ordering::SeqCst);
        Self {
            n,
            counter: counter.clone(),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.n, Ordering::SeqCst);
    }
}

/// The handle of one connection's writer task.
struct Writer {
    jobs: mpsc::UnboundedSender<Job>,
    /// Set when the sink is recreated (or a waiter gave up): the task sends nothing more.
    closed: Arc<AtomicBool>,
}

/// What the writer task needs besides its jobs.
struct WriterSetup {
    connection: Arc<RedisConnection>,
    settings: RedisSettings,
    script_sha: String,
    closed: Arc<AtomicBool>,
    epoch: Arc<AtomicU64>,
}

impl Writer {
    fn spawn(setup: WriterSetup) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        let closed = setup.closed.clone();
        tokio::spawn(run_writer(setup, rx));
        Self { jobs, closed }
    }
}

/// The writer task of one table: sends each batch as one pipeline on the shared connection
/// (opened when the first batch of any table comes), one batch at a time, and answers it; after
/// any failure it sends nothing more (the relay recreates the sink, which starts a new writer).
async fn run_writer(setup: WriterSetup, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut broken: Option<String> = None;
    while let Some(job) = jobs.recv().await {
        let n = job.calls.len();
        let unsent = if setup.closed.load(Ordering::SeqCst) {
            Some(SendError::NotSent("the sink was recreated".into()))
        } else if job.epoch != setup.epoch.load(Ordering::SeqCst) {
            Some(SendError::NotSent(
                "dropped by the relay before it was sent".into(),
            ))
        } else if let Some(why) = &broken {
            Some(SendError::NotSent(format!(
                "an earlier batch on this connection failed ({why})"
            )))
        } else if Instant::now() >= job.deadline {
            Some(SendError::Timeout(setup.settings.delivery_timeout))
        } else {
            None
        };
        let results = match unsent {
            Some(error) => vec![Err(error); n],
            None => {
                let (results, generation) = send(&setup, job.calls, job.deadline).await;
                if let Some(Err(error)) = results.iter().find(|r| r.is_err()) {
                    broken = Some(error.to_string());
                    // A connection that failed (rather than a server that refused a command on
                    // it) is replaced, once, for every table sharing it.
                    if let Some(number) = generation
                        && matches!(
                            error,
                            SendError::Connection { .. }
                                | SendError::Timeout(_)
                                | SendError::Reply(_)
                        )
                    {
                        setup.connection.retire(number);
                    }
                }
                results
            }
        };
        let _ = job.reply.send(results);
    }
}

/// The name the relay's connections carry (`CLIENT SETNAME`): `outbox-relay-<pid>`.
pub fn connection_name() -> String {
    format!("outbox-relay-{}", std::process::id())
}

/// Opens a connection within `timeout`, named [`connection_name`].
async fn connect(
    client: &redis::Client,
    settings: &RedisSettings,
    timeout: Duration,
) -> Result<MultiplexedConnection, SendError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(None);
    match tokio::time::timeout(
        timeout,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    {
        Ok(Ok(mut c)) => {
            // Best effort (an ACL may refuse CLIENT): lets an operator find the relay's
            // connections in CLIENT LIST.
            let _ = tokio::time::timeout(
                timeout,
                redis::cmd("CLIENT")
                    .arg("SETNAME")
                    .arg(connection_name())
                    .query_async::<()>(&mut c),
            )
            .await;
            Ok(c)
        }
        Ok(Err(e)) => Err(SendError::from_client(&e, settings)),
        Err(_) => Err(SendError::Connection {
            code: "IO".into(),
            detail: format!("no connection within {timeout:?}"),
            io: true,
        }),
    }
}

/// Sends one batch as a pipeline (`SCRIPT LOAD`, one `EVALSHA` per record, `WAIT` when
/// configured) on the current shared connection and reads one result per record from the
/// replies; also returns the connection's generation (none when no connection could be made).
async fn send(
    setup: &WriterSetup,
    calls: Vec<Cmd>,
    deadline: Instant,
) -> (Vec<Result<Delivered, SendError>>, Option<u64>) {
    let n = calls.len();
    let settings = &setup.settings;
    let left = deadline.saturating_duration_since(Instant::now());
    let generation = match setup
        .connection
        .get(settings.connect_timeout.min(left))
        .await
    {
        Ok(g) => g,
        Err(e) => return (vec![Err(e); n], None),
    };
    let number = Some(generation.number);
    let mut conn = generation.connection;
    let conn = &mut conn;
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    pipe.cmd("SCRIPT").arg("LOAD").arg(APPEND_SCRIPT);
    for call in calls {
        pipe.add_command(call);
    }
    let wait = settings.wait_replicas > 0;
    if wait {
        pipe.cmd("WAIT")
            .arg(settings.wait_replicas)
            .arg(u64::try_from(settings.wait_timeout.as_millis()).unwrap_or(u64::MAX));
    }
    let replies: Vec<Value> = match tokio::time::timeout_at(deadline, pipe.query_async(conn)).await
    {
        Ok(Ok(replies)) => replies,
        Ok(Err(e)) => return (vec![Err(SendError::from_client(&e, settings)); n], number),
        Err(_) => {
            return (
                vec![Err(SendError::Timeout(settings.delivery_timeout)); n],
                number,
            );
        }
    };
    let results = read_replies(
        replies,
        n,
        wait.then_some(settings.wait_replicas),
        &setup.script_sha,
    );
    (results, number)
}

/// The per-record results of a batch's replies: `[SCRIPT LOAD, EVALSHA × n, (WAIT)]`.
fn read_replies(
    replies: Vec<Value>,
    n: usize,
    wait_replicas: Option<u32>,
    script_sha: &str,
) -> Vec<Result<Delivered, SendError>> {
    let expected = 1 + n + usize::from(wait_replicas.is_some());
    if replies.len() != expected {
        let e = SendError::Reply(format!(
            "{} replies to a pipeline of {expected} commands",
            replies.len()
        ));
        return vec![Err(e); n];
    }
    let mut replies = replies.into_iter();
    let load_error = match replies.next() {
        Some(Value::ServerError(e)) => Some(SendError::from_reply(&e)),
        Some(Value::BulkString(sha)) if sha != script_sha.as_bytes() => Some(SendError::Reply(
            "SCRIPT LOAD returned another digest than the script's".into(),
        )),
        _ => None,
    };
    let mut results: Vec<Result<Delivered, SendError>> = replies
        .by_ref()
        .take(n)
        .map(|reply| match reply {
            Value::Array(items) => match items.as_slice() {
                [Value::Int(_), Value::BulkString(id)] => Ok(Delivered {
                    partition: 0,
                    offset: entry_offset(&String::from_utf8_lossy(id)),
                }),
                _ => Err(SendError::Reply(format!("{items:?}"))),
            },
            Value::ServerError(e) => match (&load_error, SendError::from_reply(&e)) {
                (Some(load), SendError::Server { code, .. }) if code == "NOSCRIPT" => {
                    Err(load.clone())
                }
                (_, e) => Err(e),
            },
            other => Err(SendError::Reply(format!("{other:?}"))),
        })
        .collect();
    if let Some(wanted) = wait_replicas {
        let acked = match replies.next() {
            Some(Value::Int(acked)) => Ok(acked),
            Some(Value::ServerError(e)) => Err(SendError::from_reply(&e)),
            other => Err(SendError::Reply(format!("WAIT answered {other:?}"))),
        };
        let failure = match acked {
            Ok(acked) if acked >= i64::from(wanted) => None,
            Ok(acked) => Some(SendError::Replicas { acked, wanted }),
            Err(e) => Some(e),
        };
        if let Some(failure) = failure {
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(failure.clone());
            }
        }
    }
    results
}

/// The connection the tables of one relay send on (see [`crate::sink::shared`]): opened by the
/// first batch of any table, replaced once when a batch on it fails for the connection's sake
/// (I/O, no reply in time); every table's writer takes the current one for each batch.
pub struct RedisConnection {
    settings: RedisSettings,
    client: redis::Client,
    connection: SharedConnection<MultiplexedConnection>,
}

impl RedisConnection {
    /// Checks the settings and prepares the client (nothing connects yet).
    pub fn new(settings: RedisSettings) -> Result<Arc<Self>, SinkError> {
        settings.validate().map_err(|e| SinkError::Config {
            broker: REDIS,
            key: e.key,
            reason: e.reason,
        })?;
        let client = match &settings.ca_path {
            None => redis::Client::open(settings.url.expose()),
            Some(ca) => {
                let root_cert = std::fs::read(ca).map_err(|e| SinkError::Config {
                    broker: REDIS,
                    key: "redis.ca_path".into(),
                    reason: format!("cannot read {}: {e}", ca.display()),
                })?;
                redis::Client::build_with_tls(
                    settings.url.expose(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )
            }
        }
        .map_err(|e| SinkError::Config {
            broker: REDIS,
            key: if settings.ca_path.is_some() {
                "redis.ca_path".into()
            } else {
                "redis.url".into()
            },
            reason: settings.scrub(&e.to_string()),
        })?;
        Ok(Arc::new(Self {
            settings,
            client,
            connection: SharedConnection::default(),
        }))
    }

    /// A sink for one table, sending on this connection.
    pub fn sink(self: &Arc<Self>) -> RedisSink {
        RedisSink::build(self.clone(), true)
    }

    /// The current connection, or a new one within `timeout`.
    async fn get(&self, timeout: Duration) -> Result<Generation<MultiplexedConnection>, SendError> {
        self.connection
            .get_or_open(|_| false, || connect(&self.client, &self.settings, timeout))
            .await
    }

    /// Drops generation `number` when it is still the current one (the next batch of any table
    /// opens a new connection); the old one closes once the batches on it are answered.
    fn retire(&self, number: u64) {
        self.connection.retire(number);
    }
}

/// The Redis Streams sink. See the [module docs](self).
pub struct RedisSink {
    settings: RedisSettings,
    connection: Arc<RedisConnection>,
    /// Whether other tables send on [`RedisSink::connection`] too (then the start-up check and
    /// the idle probe use it rather than connections of their own).
    shared: bool,
    script_sha: String,
    /// The writer of this table, started by the first batch after `new` or
    /// [`RedisSink::recreate`].
    writer: Mutex<Option<Writer>>,
    in_flight: Arc<AtomicUsize>,
    epoch: Arc<AtomicU64>,
    /// The server's `proto-max-bulk-len` as read by [`RedisSink::check_connection`].
    server_limit: Arc<AtomicUsize>,
}

/// A batch handed to the sink whose outcomes are not all known yet.
pub struct Pending {
    slots: Vec<Slot>,
    reply: Option<oneshot::Receiver<Vec<Result<Delivered, SendError>>>>,
    deadline: Instant,
    delivery_timeout: Duration,
    /// The writer's flag, to stop it when the reply does not come.
    closed: Option<Arc<AtomicBool>>,
}

enum Slot {
    /// Sent as the job's call at this index.
    Sent(usize),
    Done(Outcome),
}

impl Pending {
    /// Records refused for good at enqueue time, by index.
    pub fn rejected_now(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Done(Outcome::Rejected(_))))
            .map(|(i, _)| i)
    }

    /// Records handed to the connection whose verdict is still to come, by index.
    pub fn accepted(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Sent(..)))
            .map(|(i, _)| i)
    }

    /// Waits for Redis's verdict on every record: one outcome per record, in order. A batch
    /// not answered within `redis.delivery_timeout` fails as a whole (and the table's writer is
    /// stopped, so nothing later of it is sent).
    pub async fn wait(self) -> Vec<Outcome> {
        let Pending {
            slots,
            reply,
            deadline,
            delivery_timeout,
            closed,
        } = self;
        // The per-record results, or why there are none.
        let answer: Result<Vec<Result<Delivered, SendError>>, SendError> = match reply {
            None => Ok(Vec::new()),
            Some(reply) => match tokio::time::timeout_at(deadline + WAIT_GRACE, reply).await {
                Ok(Ok(results)) => Ok(results),
                Ok(Err(_)) => Err(SendError::NotSent(
                    "the sink's connection task stopped".into(),
                )),
                Err(_) => {
                    // Nothing more may go out on that connection: later batches would overtake
                    // this one when it is sent again.
                    if let Some(closed) = &closed {
                        closed.store(true, Ordering::SeqCst);
                    }
                    Err(SendError::Timeout(delivery_timeout))
                }
            },
        };
        slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Done(outcome) => outcome,
                Slot::Sent(i) => {
                    let result = match &answer {
                        Ok(results) => results.get(i).cloned().unwrap_or_else(|| {
                            Err(SendError::Reply("no result for the record".into()))
                        }),
                        Err(e) => Err(e.clone()),
                    };
                    match result {
                        Ok(d) => Outcome::Delivered(d),
                        // A reply is the record's own: a refusal for what it is parks it.
                        Err(e) if classify(&e) == ErrorClass::Record => Outcome::Rejected(e),
                        Err(e) => Outcome::Failed(e),
                    }
                }
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl PendingBatch for Pending {
    fn rejected_now(&self) -> Vec<usize> {
        Pending::rejected_now(self).collect()
    }

    fn accepted(&self) -> Vec<usize> {
        Pending::accepted(self).collect()
    }

    async fn wait(self: Box<Self>) -> Vec<crate::sink::Outcome> {
        Pending::wait(*self)
            .await
            .into_iter()
            .map(|o| o.map_err(|e| fault(&e)))
            .collect()
    }
}

impl RedisSink {
    /// Checks the settings and prepares the client (no connection is made yet; see
    /// [`RedisSink::check_connection`]).
    pub fn new(settings: RedisSettings) -> Result<Self, SinkError> {
        Ok(Self::build(RedisConnection::new(settings)?, false))
    }

    fn build(connection: Arc<RedisConnection>, shared: bool) -> Self {
        Self {
            script_sha: redis::Script::new(APPEND_SCRIPT).get_hash().to_owned(),
            settings: connection.settings.clone(),
            connection,
            shared,
            writer: Mutex::new(None),
            in_flight: Arc::new(AtomicUsize::new(0)),
            epoch: Arc::new(AtomicU64::new(0)),
            server_limit: Arc::new(AtomicUsize::new(REDIS_MAX_BULK)),
        }
    }

    /// The largest record sent: `redis.max_record_bytes`, capped by the server's
    /// `proto-max-bulk-len` when start-up could read it.
    pub fn record_limit(&self) -> usize {
        self.settings
            .max_record_bytes
            .min(self.server_limit.load(Ordering::Relaxed))
    }

    /// Connects within `redis.connect_timeout` and pings, proving the server is reachable and
    /// the credentials work; reads `proto-max-bulk-len` and warns when the server would lose
    /// acknowledged writes in a crash (no `appendfsync always`, no `redis.wait_replicas`).
    pub async fn check_connection(&self) -> Result<(), SinkError> {
        let s = &self.settings;
        let refused = |e: SendError| match classify(&e) {
            ErrorClass::Stop(fix) => SinkError::Refused {
                broker: REDIS,
                destination: s.shown_url(),
                name: error_name(&e),
                detail: e.to_string(),
                fix: fix.to_owned(),
            },
            _ => SinkError::Unreachable {
                broker: REDIS,
                servers: s.shown_url(),
                detail: e.to_string(),
            },
        };
        let mut conn = if self.shared {
            self.connection
                .get(s.connect_timeout)
                .await
                .map_err(refused)?
                .connection
        } else {
            connect(&self.connection.client, s, s.connect_timeout)
                .await
                .map_err(refused)?
        };
        let ping = tokio::time::timeout(
            s.connect_timeout,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        match ping {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(refused(SendError::from_client(&e, s))),
            Err(_) => {
                return Err(refused(SendError::Timeout(s.connect_timeout)));
            }
        }
        let config = |name: &'static str| {
            let mut conn = conn.clone();
            async move {
                let reply = tokio::time::timeout(
                    s.connect_timeout,
                    redis::cmd("CONFIG")
                        .arg("GET")
                        .arg(name)
                        .query_async::<Vec<String>>(&mut conn),
                )
                .await;
                match reply {
                    Ok(Ok(pair)) => pair.get(1).cloned(),
                    _ => None,
                }
            }
        };
        if let Some(limit) = config("proto-max-bulk-len")
            .await
            .and_then(|v| v.parse::<usize>().ok())
        {
            self.server_limit.store(limit, Ordering::Relaxed);
        }
        let appendonly = config("appendonly").await;
        let appendfsync = config("appendfsync").await;
        if s.wait_replicas == 0 {
            match (appendonly.as_deref(), appendfsync.as_deref()) {
                (Some("yes"), Some("always")) => {}
                (Some(appendonly), Some(appendfsync)) => tracing::warn!(
                    server = %s.shown_url(),
                    appendonly,
                    appendfsync,
                    "Redis acknowledges writes from memory: a server crash can lose events the relay already acknowledged; set appendonly yes and appendfsync always on the server, or redis.wait_replicas with replicas"
                ),
                _ => tracing::info!(
                    server = %s.shown_url(),
                    "cannot read the server's appendonly/appendfsync (CONFIG GET refused): events are durable only with appendfsync always or redis.wait_replicas"
                ),
            }
        }
        Ok(())
    }

    /// The type of the key under each destination name (`TYPE`): `none` (the stream will be
    /// created by its first entry), `stream`, or another type, which would stop the relay with
    /// `WRONGTYPE`. What `topics ensure` reports for Redis, where there is nothing to create.
    pub async fn key_types(&self, names: &[String]) -> Result<Vec<(String, String)>, SinkError> {
        let s = &self.settings;
        let unreachable = |e: SendError| SinkError::Unreachable {
            broker: REDIS,
            servers: s.shown_url(),
            detail: e.to_string(),
        };
        let mut conn = connect(&self.connection.client, s, s.connect_timeout)
            .await
            .map_err(unreachable)?;
        let mut pipe = redis::pipe();
        for name in names {
            pipe.cmd("TYPE").arg(name);
        }
        let types: Vec<String> =
            match tokio::time::timeout(s.connect_timeout, pipe.query_async(&mut conn)).await {
                Ok(Ok(types)) => types,
                Ok(Err(e)) => return Err(unreachable(SendError::from_client(&e, s))),
                Err(_) => return Err(unreachable(SendError::Timeout(s.connect_timeout))),
            };
        Ok(names.iter().cloned().zip(types).collect())
    }

    /// Starts a new writer for the batches that follow; the old writer sends nothing more
    /// (batches still queued for it fail unsent). A connection that failed was replaced already
    /// by the writer that saw it fail; a healthy one (after a refusal by the server) is kept.
    pub fn recreate(&self) {
        if let Ok(mut writer) = self.writer.lock()
            && let Some(old) = writer.take()
        {
            old.closed.store(true, Ordering::SeqCst);
        }
    }

    /// Drops every batch not yet written to the connection (they fail unsent) and returns how
    /// many records the sink held, the batch on the wire included (Redis may still append it:
    /// a duplicate at most, dropped by the dedupe check when re-sent).
    pub fn purge(&self) -> usize {
        let held = self.in_flight();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        held
    }

    /// Fences the sink before the relay lets go of its source: drops the batches not yet
    /// written, waits up to `wait` for the one on the wire to be answered, then stops this
    /// table's writer so nothing else of it is sent (other tables sharing the connection go on).
    pub async fn fence(&self, wait: Duration) -> Fenced {
        let held = self.purge();
        let deadline = Instant::now() + wait;
        while self.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let unanswered = self.in_flight();
        self.recreate();
        Fenced { held, unanswered }
    }

    /// Records handed to the sink and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Hands `records` to the connection in order, without waiting for Redis: one pipeline, sent
    /// after the batches before it were answered. A record larger than [`RedisSink::record_limit`]
    /// is [`Outcome::Rejected`] on the spot and the later records of its destination and key are
    /// [`Outcome::Held`], never sent.
    pub async fn enqueue(&self, records: &[OutboundRecord]) -> Pending {
        let deadline = Instant::now() + self.settings.delivery_timeout;
        let limit = self.record_limit();
        let mut slots = Vec::with_capacity(records.len());
        let mut calls = Vec::with_capacity(records.len());
        let mut poisoned: Vec<(&str, &str, usize)> = Vec::new();
        let mut previous: HashMap<(&str, &str), String> = HashMap::new();
        for (i, r) in records.iter().enumerate() {
            if let Some(&(_, _, behind)) = poisoned
                .iter()
                .filter(|_| !crate::faults::mutant("park_without_blocking"))
                .find(|(t, k, _)| *t == r.topic && *k == r.key)
            {
                slots.push(Slot::Done(Outcome::Held { behind }));
                continue;
            }
            let size = record_size(r);
            if size > limit {
                poisoned.push((&r.topic, &r.key, i));
                slots.push(Slot::Done(Outcome::Rejected(SendError::TooLarge {
                    size,
                    limit,
                })));
                continue;
            }
            let header = |n: &str| {
                r.headers
                    .iter()
                    .find(|(k, _)| k == n)
                    .and_then(|(_, v)| std::str::from_utf8(v).ok())
            };
            let dedupe = header("id").map(|id| format!("{}:{id}", self.settings.dedupe_prefix));
            let before = previous.get(&(r.topic.as_str(), r.key.as_str()));
            calls.push(self.append_call(r, dedupe.as_deref(), before.map(String::as_str)));
            match dedupe {
                Some(d) => previous.insert((&r.topic, &r.key), d),
                None => previous.remove(&(r.topic.as_str(), r.key.as_str())),
            };
            slots.push(Slot::Sent(calls.len() - 1));
        }
        if calls.is_empty() {
            return Pending {
                slots,
                reply: None,
                deadline,
                delivery_timeout: self.settings.delivery_timeout,
                closed: None,
            };
        }
        let (reply, receiver) = oneshot::channel();
        let job = Job {
            epoch: self.epoch.load(Ordering::SeqCst),
            _counted: Counted::new(calls.len(), &self.in_flight),
            calls,
            deadline,
            reply,
        };
        let closed = match self.writer.lock() {
            Ok(mut writer) => {
                let writer = writer.get_or_insert_with(|| {
                    Writer::spawn(WriterSetup {
                        connection: self.connection.clone(),
                        settings: self.settings.clone(),
                        script_sha: self.script_sha.clone(),
                        closed: Arc::new(AtomicBool::new(false)),
                        epoch: self.epoch.clone(),
                    })
                });
                // A send error drops the job, and with it the reply: the batch fails unsent.
                let _ = writer.jobs.send(job);
                Some(writer.closed.clone())
            }
            Err(_) => None,
        };
        Pending {
            slots,
            reply: Some(receiver),
            deadline,
            delivery_timeout: self.settings.delivery_timeout,
            closed,
        }
    }

    /// The `EVALSHA` of [`APPEND_SCRIPT`] that appends `r`.
    fn append_call(&self, r: &OutboundRecord, dedupe: Option<&str>, previous: Option<&str>) -> Cmd {
        let s = &self.settings;
        let mut cmd = redis::cmd("EVALSHA");
        let keys = 1 + usize::from(dedupe.is_some()) + usize::from(previous.is_some());
        cmd.arg(&self.script_sha).arg(keys).arg(&r.topic);
        if let Some(d) = dedupe {
            cmd.arg(d);
        }
        if let Some(p) = previous {
            cmd.arg(p);
        }
        cmd.arg(u64::try_from(s.dedupe_ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(s.maxlen.unwrap_or(0))
            .arg(if dedupe.is_some() { "1" } else { "0" })
            .arg(if previous.is_some() { "1" } else { "0" });
        for (name, value) in entry_fields(r) {
            cmd.arg(name).arg(value);
        }
        cmd
    }
}

#[async_trait::async_trait]
impl Sink for RedisSink {
    fn kind(&self) -> SinkKind {
        SinkKind::Redis
    }

    async fn check_connection(&self) -> Result<(), SinkError> {
        RedisSink::check_connection(self).await
    }

    async fn enqueue(&self, records: &[OutboundRecord]) -> Box<dyn PendingBatch> {
        Box::new(RedisSink::enqueue(self, records).await)
    }

    fn in_flight(&self) -> usize {
        RedisSink::in_flight(self)
    }

    fn delivery_timeout(&self) -> Duration {
        self.settings.delivery_timeout
    }

    async fn recreate(&mut self) -> Result<(), SinkError> {
        RedisSink::recreate(self);
        Ok(())
    }

    fn purge(&self) -> usize {
        RedisSink::purge(self)
    }

    async fn fence(&self, wait: Duration) -> Fenced {
        RedisSink::fence(self, wait).await
    }

    fn watch(
        &self,
        stats: Arc<crate::stats::RelayStats>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Option<tokio::task::JoinHandle<()>>, SinkError> {
        if self.shared {
            return Ok(Some(watch_shared(self.connection.clone(), stats, shutdown)));
        }
        Ok(Some(watch_server(
            self.connection.client.clone(),
            self.settings.clone(),
            stats,
            shutdown,
        )))
    }
}

/// How often an idle relay pings the server, and how long it waits for the answer.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// See [`PROBE_INTERVAL`].
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Keeps [`crate::stats::RelayStats::sink_reachable`] (the broker's reachability for
/// `/readyz`) current while the relay is idle: every [`PROBE_INTERVAL`] without a published
/// event, a `PING` on a connection of its own must answer within [`PROBE_TIMEOUT`]. While events
/// are being published their replies are the evidence. Stops when `shutdown` fires.
pub fn watch_server(
    client: redis::Client,
    settings: RedisSettings,
    stats: Arc<crate::stats::RelayStats>,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conn: Option<MultiplexedConnection> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            }
            let answer = if published_within(&stats, PROBE_INTERVAL) {
                Ok(())
            } else {
                ping(&client, &settings, &mut conn).await
            };
            if answer.is_err() {
                conn = None;
            }
            record_probe(
                &stats,
                &settings.shown_url().to_string(),
                answer,
                "Redis does not answer: reporting not ready until it does",
                "Redis answers again",
            );
        }
    })
}

/// [`watch_server`] for a table sharing its connection: the `PING` goes on the shared
/// connection (opening it when no table has yet; one that does not answer is replaced), so the
/// relay holds one connection to the server however many tables it relays.
fn watch_shared(
    connection: Arc<RedisConnection>,
    stats: Arc<crate::stats::RelayStats>,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            }
            let answer = if published_within(&stats, PROBE_INTERVAL) {
                Ok(())
            } else {
                match connection.get(PROBE_TIMEOUT).await {
                    Err(e) => Err(e),
                    Ok(generation) => {
                        let mut conn = generation.connection;
                        let pong = tokio::time::timeout(
                            PROBE_TIMEOUT,
                            redis::cmd("PING").query_async::<String>(&mut conn),
                        )
                        .await;
                        let answer = match pong {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err(e)) => Err(SendError::from_client(&e, &connection.settings)),
                            Err(_) => Err(SendError::Timeout(PROBE_TIMEOUT)),
                        };
                        if answer.is_err() {
                            connection.retire(generation.number);
                        }
                        answer
                    }
                }
            };
            record_probe(
                &stats,
                &connection.settings.shown_url().to_string(),
                answer,
                "Redis does not answer: reporting not ready until it does",
                "Redis answers again",
            );
        }
    })
}

async fn ping(
    client: &redis::Client,
    settings: &RedisSettings,
    conn: &mut Option<MultiplexedConnection>,
) -> Result<(), SendError> {
    if conn.is_none() {
        *conn = Some(connect(client, settings, PROBE_TIMEOUT).await?);
    }
    let Some(c) = conn.as_mut() else {
        return Err(SendError::NotSent("no connection".into()));
    };
    match tokio::time::timeout(PROBE_TIMEOUT, redis::cmd("PING").query_async::<String>(c)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(SendError::from_client(&e, settings)),
        Err(_) => Err(SendError::Timeout(PROBE_TIMEOUT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: &[(&str, &str)], payload: Option<&str>) -> OutboundRecord {
        OutboundRecord {
            topic: "outbox.event.Account".into(),
            key: "acct-1".into(),
            payload: payload.map(|p| p.as_bytes().to_vec()),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            timestamp_ms: Some(1_733_450_000_123),
        }
    }

    fn server(code: &str) -> SendError {
        SendError::Server {
            code: code.into(),
            detail: "…".into(),
        }
    }

    #[test]
    fn one_place_decides_retry_park_or_stop() {
        assert_eq!(
            classify(&SendError::TooLarge { size: 2, limit: 1 }),
            ErrorClass::Record
        );
        for code in [
            "OOM",
            "LOADING",
            "BUSY",
            "READONLY",
            "MASTERDOWN",
            "MISCONF",
            "NOSCRIPT",
            "OUTBOXGAP",
        ] {
            assert_eq!(classify(&server(code)), ErrorClass::Retry, "{code}");
        }
        for code in ["NOAUTH", "WRONGPASS"] {
            let ErrorClass::Stop(fix) = classify(&server(code)) else {
                panic!("{code} must stop the relay");
            };
            assert!(fix.contains("redis.url"), "{fix}");
        }
        let ErrorClass::Stop(fix) = classify(&server("WRONGTYPE")) else {
            panic!("WRONGTYPE must stop the relay");
        };
        assert!(fix.contains("not a stream"), "{fix}");
        assert!(matches!(classify(&server("NOPERM")), ErrorClass::Stop(_)));
        assert!(matches!(classify(&server("MOVED")), ErrorClass::Stop(_)));
        assert_eq!(classify(&server("ERR")), ErrorClass::Unlisted);
        let refused = SendError::Connection {
            code: "IO".into(),
            detail: "Connection refused (os error 111)".into(),
            io: true,
        };
        assert_eq!(classify(&refused), ErrorClass::Retry);
        let handshake = SendError::Connection {
            code: "WRONGPASS".into(),
            detail: "invalid username-password pair".into(),
            io: false,
        };
        assert!(matches!(classify(&handshake), ErrorClass::Stop(_)));
        assert_eq!(
            classify(&SendError::Timeout(Duration::from_secs(1))),
            ErrorClass::Retry
        );
        assert_eq!(
            classify(&SendError::Replicas {
                acked: 0,
                wanted: 1
            }),
            ErrorClass::Retry
        );
        assert_eq!(error_name(&server("WRONGTYPE")), "WRONGTYPE");
        assert_eq!(
            error_name(&SendError::TooLarge { size: 2, limit: 1 }),
            "VALUE_TOO_LARGE"
        );
    }

    #[test]
    fn client_errors_are_classified_by_what_the_client_saw() {
        let settings = RedisSettings {
            url: Secret::new("redis://relay:s3cret@127.0.0.1:1"),
            ..Default::default()
        };
        let io = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused by redis://relay:s3cret@127.0.0.1:1",
        ));
        let e = SendError::from_client(&io, &settings);
        assert_eq!(classify(&e), ErrorClass::Retry, "{e:?}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let wrongpass = redis::make_extension_error(
            "WRONGPASS".into(),
            Some("invalid username-password pair or user is disabled.".into()),
        );
        let e = SendError::from_client(&wrongpass, &settings);
        assert!(matches!(classify(&e), ErrorClass::Stop(_)), "{e:?}");
    }

    use crate::config::Secret;

    #[test]
    fn headers_become_h_fields_after_key_value_and_ts() {
        let r = record(
            &[
                ("id", "e-1"),
                ("eventType", "Opened"),
                ("traceparent", "00-a-b-01"),
            ],
            Some("{\"n\":1}"),
        );
        let fields: Vec<(String, String)> = entry_fields(&r)
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect();
        let expected = [
            ("key", "acct-1"),
            ("value", "{\"n\":1}"),
            ("ts", "1733450000123"),
            ("h:id", "e-1"),
            ("h:eventType", "Opened"),
            ("h:traceparent", "00-a-b-01"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(fields, expected);
        // A null payload has no `value`.
        let r = record(&[("id", "e-2")], None);
        let fields = entry_fields(&r);
        let names: Vec<&[u8]> = fields.iter().map(|(n, _)| n.as_slice()).collect();
        assert_eq!(names, [&b"key"[..], b"ts", b"h:id"]);
    }

    #[test]
    fn a_record_is_one_evalsha_with_its_fields_as_single_arguments() {
        let sink = RedisSink::new(RedisSettings::default()).unwrap();
        let r = record(&[("id", "e-1")], Some("{}"));
        let cmd = sink.append_call(&r, Some("outbox:dedupe:e-1"), Some("outbox:dedupe:e-0"));
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let text: Vec<String> = args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(
            text,
            [
                "EVALSHA",
                &sink.script_sha,
                "3",
                "outbox.event.Account",
                "outbox:dedupe:e-1",
                "outbox:dedupe:e-0",
                "86400000",
                "0",
                "1",
                "1",
                "key",
                "acct-1",
                "value",
                "{}",
                "ts",
                "1733450000123",
                "h:id",
                "e-1",
            ]
        );
    }

    #[test]
    fn entry_ids_map_to_increasing_offsets() {
        assert!(entry_offset("1733450000123-0") < entry_offset("1733450000123-1"));
        assert!(entry_offset("1733450000123-999999") < entry_offset("1733450000124-0"));
        assert_eq!(entry_offset("5-3"), (5 << 20) | 3);
    }

    #[test]
    fn replies_map_to_per_record_results() {
        let ok = |id: &str| Value::Array(vec![Value::Int(1), Value::BulkString(id.into())]);
        let seen = |id: &str| Value::Array(vec![Value::Int(0), Value::BulkString(id.into())]);
        let sha = "abc";
        let out = read_replies(
            vec![
                Value::BulkString(sha.into()),
                ok("10-0"),
                seen("9-1"),
                Value::ServerError(server_error("WRONGTYPE")),
            ],
            3,
            None,
            sha,
        );
        assert_eq!(
            out[0],
            Ok(Delivered {
                partition: 0,
                offset: entry_offset("10-0")
            })
        );
        assert_eq!(
            out[1],
            Ok(Delivered {
                partition: 0,
                offset: entry_offset("9-1")
            })
        );
        assert!(matches!(&out[2], Err(SendError::Server { code, .. }) if code == "WRONGTYPE"));
        // Too few replicas: the appended records fail too (they are sent again, deduplicated).
        let out = read_replies(
            vec![Value::BulkString(sha.into()), ok("10-0"), Value::Int(0)],
            1,
            Some(1),
            sha,
        );
        assert_eq!(
            out[0],
            Err(SendError::Replicas {
                acked: 0,
                wanted: 1
            })
        );
        // A refused SCRIPT LOAD explains the NOSCRIPT that follows.
        let out = read_replies(
            vec![
                Value::ServerError(server_error("NOPERM")),
                Value::ServerError(server_error("NOSCRIPT")),
            ],
            1,
            None,
            sha,
        );
        assert!(matches!(&out[0], Err(SendError::Server { code, .. }) if code == "NOPERM"));
    }

    fn server_error(code: &str) -> redis::ServerError {
        let reply = format!("-{code} detail\r\n");
        match redis::parse_redis_value(reply.as_bytes()) {
            Ok(Value::ServerError(e)) => e,
            other => panic!("{other:?}"),
        }
    }
}
