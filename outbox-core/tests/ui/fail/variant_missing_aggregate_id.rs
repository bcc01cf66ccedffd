#[derive(outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account")]
enum AccountEvent {
    Opened {
        #[outbox(aggregate_id)]
        account_id: u64,
    },
    Closed {
        account_id: u64,
    },
}

fn main() {}
