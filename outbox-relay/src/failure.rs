//! The relay's one error policy: every failure is given an [`ErrorKind`] by the typed error that
//! reports it (`LogicalError::kind`, `MarkError::kind`, `SinkError::kind`, …), and [`decide`]
//! turns the kind into the one thing the relay does about it ([`Action`]). No other module
//! decides whether an error is retried, restarts the source, steps down or stops the process.
//!
//! | kind | action | exit code |
//! |---|---|---|
//! | [`ErrorKind::Unavailable`] (a service is unreachable or ended the session) | [`Action::RestartSource`] | — |
//! | [`ErrorKind::Contended`] (another session holds what the source needs) | [`Action::RestartSource`] | — |
//! | [`ErrorKind::SlotLost`] with `recoverable` (table mode, `recover_lost_slot`) | [`Action::RestartSource`] | — |
//! | [`ErrorKind::LeaseLost`] (or any error once the lease is gone) | [`Action::StepDown`] | — |
//! | [`ErrorKind::Config`] | [`Action::Stop`] | 2 |
//! | [`ErrorKind::Setup`], [`ErrorKind::SlotLost`], [`ErrorKind::Contract`], [`ErrorKind::Refused`] | [`Action::Stop`] | 1 |
//!
//! Within one round the same table holds one level down: the logical source restarts its
//! replication session in place for exactly the errors whose action is
//! [`Action::RestartSource`]. What happens to a single record the broker refused (send it alone,
//! park it, or treat the window as failed) is the sink's verdict on the record
//! ([`crate::sink::ErrorClass`]); a refusal that stops the relay becomes a
//! [`ErrorKind::Refused`] error here.
//!
//! Errors keep their cause as [`std::error::Error::source`] and do not repeat it in their own
//! message; [`Report`] prints the whole chain, and every log line and the final exit message use it.

use std::error::Error;
use std::fmt;

/// What kind of failure an error is: the input of the policy ([`decide`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// PostgreSQL, the replication stream or a background task went away or refused a
    /// statement: transient, the source resumes from its durable position.
    Unavailable,
    /// Another session holds what the source needs (the replication slot is active elsewhere).
    Contended,
    /// This relay's leader lease ran out or its heartbeat failed.
    LeaseLost,
    /// A setting is invalid.
    Config,
    /// The database is reachable but not set up for the relay: a missing table, privilege,
    /// `wal_level`, publication or an unusable slot.
    Setup,
    /// The replication slot was dropped or invalidated. `recoverable` when the source can
    /// re-publish from the table (`table` write mode with `recover_lost_slot`).
    SlotLost {
        /// Whether reopening the source recovers from it.
        recoverable: bool,
    },
    /// A peer broke its contract: a stream message that cannot be decoded, a table whose rows
    /// are not outbox rows.
    Contract,
    /// The broker refuses the records for a reason only an operator can fix (permissions, a
    /// missing topic, an error that persisted).
    Refused,
}

/// What the relay does about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Fence the producer, drop the source and its leader lock, back off, take the lock again
    /// and reopen the source from its durable position (nothing unacknowledged is lost: it is
    /// read again).
    RestartSource,
    /// Fence the producer and go back to standby without producing or acknowledging anything
    /// more: another relay may already be the leader.
    StepDown,
    /// Stop the process with the error's message, which says what the operator must do.
    Stop,
}

/// The policy table: what the relay does about a failure of `kind`, given whether its leader
/// lease still holds. Once the lease is gone every failure steps down, whatever caused it (often
/// a statement on the session the server ended): nothing this relay still holds may reach the
/// broker.
pub fn decide(kind: ErrorKind, lease_held: bool) -> Action {
    if !lease_held {
        return Action::StepDown;
    }
    match kind {
        ErrorKind::Unavailable
        | ErrorKind::Contended
        | ErrorKind::SlotLost { recoverable: true } => Action::RestartSource,
        ErrorKind::LeaseLost => Action::StepDown,
        ErrorKind::Config
        | ErrorKind::Setup
        | ErrorKind::SlotLost { recoverable: false }
        | ErrorKind::Contract
        | ErrorKind::Refused => Action::Stop,
    }
}

impl ErrorKind {
    /// Whether reopening the source (or, within the logical source, restarting its replication
    /// session) may get past a failure of this kind.
    pub fn restarts_source(self) -> bool {
        decide(self, true) == Action::RestartSource
    }

    /// The process exit code when the relay stops on a failure of this kind: 2 for a
    /// configuration problem, 1 otherwise.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Config => 2,
            _ => 1,
        }
    }
}

/// Displays an error with its whole chain of causes: `message: cause: cause's cause`.
pub struct Report<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_lease_steps_down_whatever_the_kind() {
        for kind in [
            ErrorKind::Unavailable,
            ErrorKind::Config,
            ErrorKind::Contract,
            ErrorKind::SlotLost { recoverable: false },
        ] {
            assert_eq!(decide(kind, false), Action::StepDown, "{kind:?}");
        }
        assert_eq!(decide(ErrorKind::LeaseLost, true), Action::StepDown);
    }

    #[test]
    fn transient_kinds_restart_the_source_and_the_rest_stop() {
        assert!(ErrorKind::Unavailable.restarts_source());
        assert!(ErrorKind::Contended.restarts_source());
        assert!(ErrorKind::SlotLost { recoverable: true }.restarts_source());
        for kind in [
            ErrorKind::Config,
            ErrorKind::Setup,
            ErrorKind::SlotLost { recoverable: false },
            ErrorKind::Contract,
            ErrorKind::Refused,
        ] {
            assert_eq!(decide(kind, true), Action::Stop, "{kind:?}");
            assert!(!kind.restarts_source());
        }
        assert_eq!(ErrorKind::Config.exit_code(), 2);
        assert_eq!(ErrorKind::Setup.exit_code(), 1);
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn the_report_prints_every_cause_once() {
        let e = Outer(Inner(std::io::Error::other("root")));
        assert_eq!(Report(&e).to_string(), "outer: inner: root");
    }
}
