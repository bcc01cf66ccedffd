//! An enum of struct and newtype variants. Neither the enum nor this file uses serde directly:
//! the generated code reaches serde through outbox_core.

use outbox_core::{DecodeEvent, OutboxEvent};

#[derive(OutboxEvent)]
#[outbox(
    aggregate_type = "account",
    aggregate_id = "account_id",
    topic = "accounts"
)]
enum AccountEvent {
    Opened {
        account_id: u64,
        email: String,
    },
    #[outbox(event_type = "AccountClosed", schema_version = 2, topic = "closed")]
    Closed {
        account_id: u64,
    },
    #[outbox(aggregate_id = "id")]
    Renamed {
        id: u64,
        #[outbox(sequence)]
        version: i64,
    },
}

fn main() {
    let event = AccountEvent::Opened {
        account_id: 1,
        email: String::new(),
    };
    assert_eq!(event.event_type(), "Opened");
    assert!(AccountEvent::accepts("AccountClosed"));
    let _ = AccountEvent::decode("Renamed", b"{}");
}
