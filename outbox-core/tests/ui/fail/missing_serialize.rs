#[derive(outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account")]
struct AccountOpened {
    #[outbox(aggregate_id)]
    account_id: u64,
}

fn main() {}
