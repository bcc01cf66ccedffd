#[derive(outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account", aggregate_id = "account_id")]
enum AccountEvent {
    Opened {
        account_id: u64,
    },
    #[outbox(event_type = "Opened")]
    Reopened {
        account_id: u64,
    },
}

fn main() {}
