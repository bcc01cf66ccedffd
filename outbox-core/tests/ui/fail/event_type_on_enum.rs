#[derive(outbox_core::OutboxEvent)]
#[outbox(
    aggregate_type = "account",
    aggregate_id = "account_id",
    event_type = "AccountEvent"
)]
enum AccountEvent {
    Opened { account_id: u64 },
}

fn main() {}
