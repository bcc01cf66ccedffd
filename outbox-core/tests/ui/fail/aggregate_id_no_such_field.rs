#[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account", aggregate_id = "acount_id")]
struct AccountOpened {
    account_id: u64,
}

fn main() {}
