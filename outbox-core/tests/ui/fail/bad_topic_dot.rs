#[derive(outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account", aggregate_id = "account_id")]
enum AccountEvent {
    #[outbox(topic = "..")]
    Opened { account_id: u64 },
}

fn main() {}
