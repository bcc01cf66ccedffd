#[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account")]
struct AccountOpened {
    account_id: u64,
}

fn main() {}
