#[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
struct AccountOpened {
    #[outbox(aggregate_id)]
    account_id: u64,
}

fn main() {}
