#[derive(serde::Serialize, serde::Deserialize, outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account")]
struct AccountOpened<Id> {
    #[outbox(aggregate_id)]
    account_id: Id,
}

fn main() {}
