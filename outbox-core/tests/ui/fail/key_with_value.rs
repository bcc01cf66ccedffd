use outbox_core::OutboxEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "payment", key = "merchant")]
struct PaymentCaptured {
    #[outbox(aggregate_id)]
    payment_id: u64,
    #[outbox(key = "merchant")]
    merchant: String,
}

fn main() {}
