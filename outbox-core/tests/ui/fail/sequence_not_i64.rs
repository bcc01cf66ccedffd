#[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account")]
struct AccountOpened {
    #[outbox(aggregate_id)]
    account_id: u64,
    #[outbox(sequence)]
    version: u64,
}

fn main() {}
