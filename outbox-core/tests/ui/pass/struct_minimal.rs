//! The smallest struct event: an aggregate type and an id field.

use outbox_core::{DecodeEvent, OutboxEvent};

#[derive(serde::Serialize, serde::Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "account")]
struct AccountOpened {
    #[outbox(aggregate_id)]
    account_id: u64,
}

fn main() {
    let event = AccountOpened { account_id: 1 };
    assert_eq!(event.aggregate_id(), "1");
    assert!(AccountOpened::accepts("AccountOpened"));
}
