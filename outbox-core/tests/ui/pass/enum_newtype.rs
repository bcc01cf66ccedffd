//! Newtype variants wrap payload structs that need not implement OutboxEvent.

use outbox_core::OutboxEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {
    account_id: String,
    version: u32,
}

#[derive(Serialize, Deserialize)]
struct Closed {
    id: String,
    version: u32,
}

#[derive(OutboxEvent)]
#[outbox(
    aggregate_type = "account",
    aggregate_id = "account_id",
    sequence = "version"
)]
pub enum AccountEvent {
    Opened(Opened),
    #[outbox(aggregate_id = "id")]
    Closed(#[serde(default = "closed")] Closed),
}

fn closed() -> Closed {
    Closed {
        id: String::new(),
        version: 0,
    }
}

fn main() {
    let event = AccountEvent::Closed(closed());
    assert_eq!(event.aggregate_sequence(), Some(0));
}
