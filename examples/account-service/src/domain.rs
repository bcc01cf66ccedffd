//! The account aggregate: its states, its events, and the rules that decide which commands are
//! accepted. Pure functions; the database and the outbox are in [`crate::store`].

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where an account is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Opened, waiting for validation.
    Pending,
    /// Validated and usable.
    Active,
    /// Temporarily disabled; can be activated again.
    Inactive,
    /// Closed for good; its email can be used by a new account.
    Closed,
}

impl Status {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Inactive => "inactive",
            Self::Closed => "closed",
        }
    }

    /// Parses a stored name.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "pending" => Some(Self::Pending),
            "active" => Some(Self::Active),
            "inactive" => Some(Self::Inactive),
            "closed" => Some(Self::Closed),
            _ => None,
        }
    }
}

/// The account as the write model stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Account id (the aggregate id, the Kafka key).
    pub id: Uuid,
    /// Who owns it.
    pub owner: String,
    /// Its email, unique among accounts that are not closed.
    pub email: String,
    /// Lifecycle state.
    pub status: Status,
    /// Number of events the account has emitted; the sequence of its last event.
    pub version: i64,
}

/// Every event an account emits. Each variant is one event type (the variant's name); all of them
/// go to the `account` aggregate's topic (`outbox.event.account` by default), keyed by account id,
/// with the account's version after the event as the per-aggregate sequence.
#[derive(Debug, Clone, PartialEq, Eq, outbox_core::OutboxEvent)]
#[outbox(
    aggregate_type = "account",
    aggregate_id = "account_id",
    sequence = "version"
)]
pub enum AccountEvent {
    /// A new account, pending validation.
    AccountOpened {
        /// The account.
        account_id: Uuid,
        /// Always 1.
        version: i64,
        /// Owner name.
        owner: String,
        /// Email.
        email: String,
    },
    /// The account was validated (from pending) or re-enabled (from inactive).
    AccountActivated {
        /// The account.
        account_id: Uuid,
        /// Version after the event.
        version: i64,
    },
    /// The account was disabled.
    AccountDeactivated {
        /// The account.
        account_id: Uuid,
        /// Version after the event.
        version: i64,
        /// Why.
        reason: String,
    },
    /// The account's email changed.
    AccountEmailChanged {
        /// The account.
        account_id: Uuid,
        /// Version after the event.
        version: i64,
        /// The new email.
        email: String,
    },
    /// The account was closed for good.
    AccountClosed {
        /// The account.
        account_id: Uuid,
        /// Version after the event.
        version: i64,
        /// Why.
        reason: String,
    },
}

impl AccountEvent {
    /// The account the event belongs to.
    pub fn account_id(&self) -> Uuid {
        match self {
            Self::AccountOpened { account_id, .. }
            | Self::AccountActivated { account_id, .. }
            | Self::AccountDeactivated { account_id, .. }
            | Self::AccountEmailChanged { account_id, .. }
            | Self::AccountClosed { account_id, .. } => *account_id,
        }
    }

    /// The account's version after the event.
    pub fn version(&self) -> i64 {
        match self {
            Self::AccountOpened { version, .. }
            | Self::AccountActivated { version, .. }
            | Self::AccountDeactivated { version, .. }
            | Self::AccountEmailChanged { version, .. }
            | Self::AccountClosed { version, .. } => *version,
        }
    }
}

/// A command on an existing account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Validate a pending account, or re-enable an inactive one.
    Activate,
    /// Disable an active account.
    Deactivate {
        /// Why.
        reason: String,
    },
    /// Change the email.
    ChangeEmail {
        /// The new email.
        email: String,
    },
    /// Close the account.
    Close {
        /// Why.
        reason: String,
    },
}

impl Command {
    /// A verb for messages.
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Activate => "activate",
            Self::Deactivate { .. } => "deactivate",
            Self::ChangeEmail { .. } => "change the email of",
            Self::Close { .. } => "close",
        }
    }
}

/// A command the rules reject (nothing is written, no event is emitted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// No such account.
    #[error("account {0} does not exist")]
    NotFound(Uuid),
    /// Not a plausible email address.
    #[error("`{0}` is not a valid email address")]
    InvalidEmail(String),
    /// Owner name empty or too long.
    #[error("the owner name must be 1 to 200 characters")]
    InvalidOwner,
    /// Another open account uses this email.
    #[error("email `{0}` is already used by another account")]
    EmailTaken(String),
    /// The new email is the current one.
    #[error("the account already has email `{0}`")]
    EmailUnchanged(String),
    /// The account is closed: nothing can be done with it any more.
    #[error("account {id} is closed: cannot {verb} it")]
    AccountClosed {
        /// The account.
        id: Uuid,
        /// What was attempted.
        verb: &'static str,
    },
    /// The command does not apply in the account's current state.
    #[error("cannot {verb} account {id}: it is {status}")]
    InvalidTransition {
        /// The account.
        id: Uuid,
        /// What was attempted.
        verb: &'static str,
        /// Its state.
        status: &'static str,
    },
}

impl Rejection {
    /// A stable machine-readable code for API clients.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "account_not_found",
            Self::InvalidEmail(_) => "invalid_email",
            Self::InvalidOwner => "invalid_owner",
            Self::EmailTaken(_) => "email_taken",
            Self::EmailUnchanged(_) => "email_unchanged",
            Self::AccountClosed { .. } => "account_closed",
            Self::InvalidTransition { .. } => "invalid_transition",
        }
    }
}

/// Checks an email address the way a sign-up form would: one `@`, something on both sides, a dot
/// in the domain, no spaces, at most 254 bytes.
pub fn validate_email(email: &str) -> Result<(), Rejection> {
    let ok = email.len() <= 254
        && !email.contains(char::is_whitespace)
        && match email.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.contains('@')
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
            }
            None => false,
        };
    if ok {
        Ok(())
    } else {
        Err(Rejection::InvalidEmail(email.to_owned()))
    }
}

/// The event that opening an account emits, after validating its input.
pub fn open(account_id: Uuid, owner: &str, email: &str) -> Result<AccountEvent, Rejection> {
    let owner = owner.trim();
    if owner.is_empty() || owner.chars().count() > 200 {
        return Err(Rejection::InvalidOwner);
    }
    validate_email(email)?;
    Ok(AccountEvent::AccountOpened {
        account_id,
        version: 1,
        owner: owner.to_owned(),
        email: email.to_owned(),
    })
}

/// Decides whether `command` is accepted for `account` and which event it emits. Email uniqueness
/// needs the database and is checked by the store.
pub fn decide(account: &Account, command: &Command) -> Result<AccountEvent, Rejection> {
    let id = account.id;
    let verb = command.verb();
    let version = account.version + 1;
    if account.status == Status::Closed {
        return Err(Rejection::AccountClosed { id, verb });
    }
    let invalid = || Rejection::InvalidTransition {
        id,
        verb,
        status: account.status.as_str(),
    };
    match command {
        Command::Activate => match account.status {
            Status::Pending | Status::Inactive => Ok(AccountEvent::AccountActivated {
                account_id: id,
                version,
            }),
            _ => Err(invalid()),
        },
        Command::Deactivate { reason } => match account.status {
            Status::Active => Ok(AccountEvent::AccountDeactivated {
                account_id: id,
                version,
                reason: reason.clone(),
            }),
            _ => Err(invalid()),
        },
        Command::ChangeEmail { email } => {
            validate_email(email)?;
            if email.eq_ignore_ascii_case(&account.email) {
                return Err(Rejection::EmailUnchanged(email.clone()));
            }
            Ok(AccountEvent::AccountEmailChanged {
                account_id: id,
                version,
                email: email.clone(),
            })
        }
        Command::Close { reason } => Ok(AccountEvent::AccountClosed {
            account_id: id,
            version,
            reason: reason.clone(),
        }),
    }
}

/// The account after `event` (the write model's own state transition).
pub fn apply(mut account: Account, event: &AccountEvent) -> Account {
    account.version = event.version();
    match event {
        AccountEvent::AccountOpened { .. } => {}
        AccountEvent::AccountActivated { .. } => account.status = Status::Active,
        AccountEvent::AccountDeactivated { .. } => account.status = Status::Inactive,
        AccountEvent::AccountEmailChanged { email, .. } => account.email = email.clone(),
        AccountEvent::AccountClosed { .. } => account.status = Status::Closed,
    }
    account
}

#[cfg(test)]
mod tests {
    use outbox_core::{DecodeEvent, OutboxEvent};

    use super::*;

    fn account(status: Status) -> Account {
        Account {
            id: Uuid::nil(),
            owner: "Ada".into(),
            email: "ada@example.com".into(),
            status,
            version: 3,
        }
    }

    #[test]
    fn lifecycle_rules() {
        let e = decide(&account(Status::Pending), &Command::Activate).unwrap();
        assert_eq!(e.version(), 4);
        assert_eq!(apply(account(Status::Pending), &e).status, Status::Active);
        assert!(matches!(
            decide(&account(Status::Closed), &Command::Activate),
            Err(Rejection::AccountClosed { .. })
        ));
        assert!(matches!(
            decide(&account(Status::Active), &Command::Activate),
            Err(Rejection::InvalidTransition { .. })
        ));
        assert!(matches!(
            decide(
                &account(Status::Pending),
                &Command::Deactivate { reason: "x".into() }
            ),
            Err(Rejection::InvalidTransition { .. })
        ));
        assert!(matches!(
            decide(
                &account(Status::Active),
                &Command::ChangeEmail {
                    email: "ADA@example.com".into()
                }
            ),
            Err(Rejection::EmailUnchanged(_))
        ));
        assert!(validate_email("a@b.c").is_ok());
        for bad in ["", "a", "a@b", "@b.c", "a b@c.d", "a@@b.c", "a@.c", "a@c."] {
            assert!(validate_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn events_round_trip_through_the_derive() {
        let e = AccountEvent::AccountEmailChanged {
            account_id: Uuid::nil(),
            version: 5,
            email: "b@example.com".into(),
        };
        assert_eq!(e.aggregate_type(), "account");
        assert_eq!(e.aggregate_sequence(), Some(5));
        let payload = serde_json::to_vec(&e.to_payload().unwrap()).unwrap();
        assert_eq!(
            AccountEvent::decode("AccountEmailChanged", &payload).unwrap(),
            e
        );
    }
}
