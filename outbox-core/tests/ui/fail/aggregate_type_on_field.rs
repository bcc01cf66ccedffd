#[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account")]
struct AccountOpened {
    #[outbox(aggregate_id, aggregate_type = "customer")]
    account_id: u64,
}

fn main() {}
