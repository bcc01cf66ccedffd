#[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account", schema_version = 0)]
struct AccountOpened {
    #[outbox(aggregate_id)]
    account_id: u64,
}

fn main() {}
