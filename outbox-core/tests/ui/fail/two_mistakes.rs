// Independent mistakes are each reported once, at their own place.
#[derive(outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account", aggregate_id = "account_id")]
enum AccountEvent {
    #[outbox(schema_version = -1)]
    Opened {
        account_id: u64,
    },
    Closed,
}

fn main() {}
