use outbox_core::OutboxEvent;
use serde::{Deserialize, Serialize};

fn upcast(payload: serde_json::Value) -> serde_json::Value {
    payload
}

#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "payment", schema_version = 2, upcast = upcast)]
struct PaymentCaptured {
    #[outbox(aggregate_id)]
    payment_id: u64,
}

fn main() {}
