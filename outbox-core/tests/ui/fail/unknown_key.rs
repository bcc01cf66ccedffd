#[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account", partition = 3)]
struct AccountOpened {
    #[outbox(aggregate_id)]
    account_id: u64,
}

fn main() {}
