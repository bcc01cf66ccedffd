//! Test-only fault hooks, compiled in only with the `failpoints` and `mutants` features (the
//! fault-injection suite builds the relay with them; a normal build has neither, and these
//! functions are then constant no-ops).
//!
//! - **Failpoints** (`failpoints` feature): `OUTBOX_FAILPOINT=<name>[:<n>]` aborts the process —
//!   no cleanup, like `kill -9` — the n-th time (default the first) it passes the named point:
//!   `before_produce`, `after_kafka_ack`, `after_source_ack`; `<name>:<n>:stop` stops it with
//!   SIGSTOP there instead (a pause at an exact point). With `OUTBOX_FAILPOINT_PROVENANCE` set,
//!   every record also carries the header [`PROVENANCE_HEADER`] (`<pid> <unix ms>` of the
//!   enqueue), so the suite can tell which process produced a record and when.
//! - **Mutants** (`mutants` feature): `OUTBOX_MUTANT=<name>` turns on one deliberately broken
//!   behaviour, so the fault suite can prove its checker catches it: `cursor`,
//!   `ack_before_kafka`, `confirm_on_receipt`, `retry_failed_only`, `park_without_blocking`
//!   (a parked poison event does not hold back the later events of its aggregate),
//!   `accept_messages_any_mode` (the logical source publishes outbox-prefixed logical messages in
//!   every write mode), `skip_lease_check` (a batch read before a pause is produced without
//!   proving the leader lock is still held).

/// Passes the failpoint `name`; when it is armed and due, aborts the process — or, armed as
/// `<name>:<n>:stop`, stops it with SIGSTOP (resumed by SIGCONT, it carries on from here).
#[cfg(feature = "failpoints")]
pub fn failpoint(name: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static ARMED: OnceLock<Option<(String, u64, bool)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let armed = ARMED.get_or_init(|| {
        let spec = std::env::var("OUTBOX_FAILPOINT").ok()?;
        let mut parts = spec.split(':');
        let point = parts.next()?.to_owned();
        let due = parts.next().and_then(|n| n.parse().ok()).unwrap_or(1);
        let stop = parts.next() == Some("stop");
        Some((point, due, stop))
    });
    if let Some((armed, due, stop)) = armed
        && armed == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *due
    {
        if *stop {
            eprintln!("outbox-relay: failpoint `{name}` reached: stopping");
            let _ = std::process::Command::new("kill")
                .args(["-STOP", &std::process::id().to_string()])
                .status();
            return;
        }
        eprintln!("outbox-relay: failpoint `{name}` reached: aborting");
        std::process::abort();
    }
}

/// Passes the failpoint `name` (failpoints are compiled out).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn failpoint(_name: &str) {}

/// The header naming the producing process and the enqueue time (see [`provenance`]).
pub const PROVENANCE_HEADER: &str = "outbox-failpoint-provenance";

/// `<pid> <unix ms>` for the record being enqueued now, when `OUTBOX_FAILPOINT_PROVENANCE` is set
/// in a build with failpoints: lets the fault suite prove a deposed leader produced nothing after
/// it resumed.
#[cfg(feature = "failpoints")]
pub fn provenance() -> Option<String> {
    use std::sync::OnceLock;
    static ON: OnceLock<bool> = OnceLock::new();
    if !*ON.get_or_init(|| std::env::var_os("OUTBOX_FAILPOINT_PROVENANCE").is_some()) {
        return None;
    }
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    Some(format!("{} {ms}", std::process::id()))
}

/// Provenance headers are compiled out without failpoints.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn provenance() -> Option<String> {
    None
}

/// Whether the deliberately broken behaviour `name` is on.
#[cfg(feature = "mutants")]
pub fn mutant(name: &str) -> bool {
    use std::sync::OnceLock;
    static ACTIVE: OnceLock<Option<String>> = OnceLock::new();
    let active = ACTIVE.get_or_init(|| {
        let m = std::env::var("OUTBOX_MUTANT").ok();
        if let Some(m) = &m {
            tracing::warn!(mutant = %m, "THIS RELAY IS A DELIBERATELY BROKEN TEST BUILD");
        }
        m
    });
    active.as_deref() == Some(name)
}

/// Whether the deliberately broken behaviour `name` is on (mutants are compiled out).
#[cfg(not(feature = "mutants"))]
#[inline(always)]
pub fn mutant(_name: &str) -> bool {
    false
}
