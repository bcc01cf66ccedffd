#[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account")]
struct AccountOpened {
    #[outbox(aggregate_id)]
    account_id: u64,
    #[outbox(aggregate_id)]
    customer_id: u64,
}

fn main() {}
