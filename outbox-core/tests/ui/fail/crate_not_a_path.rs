use outbox_core::OutboxEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "payment", crate = "my events")]
struct PaymentCaptured {
    #[outbox(aggregate_id)]
    payment_id: u64,
}

fn main() {}
