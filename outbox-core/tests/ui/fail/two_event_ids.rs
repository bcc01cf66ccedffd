use outbox_core::OutboxEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "payment")]
struct PaymentCaptured {
    #[outbox(aggregate_id)]
    payment_id: Uuid,
    #[outbox(id)]
    request_id: Uuid,
    #[outbox(id)]
    command_id: Uuid,
}

fn main() {}
