use outbox_core::OutboxEvent;

#[derive(OutboxEvent)]
#[outbox(aggregate_type = "payment")]
enum PaymentEvent {
    Captured {
        #[outbox(aggregate_id)]
        payment_id: u64,
        #[outbox(header = "tenant")]
        tenant: String,
        #[outbox(header = "tenant")]
        owner: String,
    },
}

fn main() {}
