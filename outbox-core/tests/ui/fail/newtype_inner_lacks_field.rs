#[derive(serde::Serialize, serde::Deserialize)]
struct Closed {
    id: u64,
}

#[derive(outbox_core::OutboxEvent)]
#[outbox(aggregate_type = "account", aggregate_id = "account_id")]
enum AccountEvent {
    Opened { account_id: u64 },
    Closed(Closed),
}

fn main() {}
