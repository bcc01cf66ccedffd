//! Every struct attribute, ids named on the container, a public type in a module.

mod events {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, outbox_core::OutboxEvent)]
    #[outbox(
        aggregate_type = "account",
        event_type = "AccountOpened",
        topic = "accounts.v1-x_y"
    )]
    #[outbox(schema_version = 3, aggregate_id = "r#type", sequence = "version")]
    pub struct Opened {
        pub r#type: String,
        pub version: u8,
    }
}

fn assert_event<T: outbox_core::OutboxEvent + outbox_core::DecodeEvent>() {}

fn main() {
    assert_event::<events::Opened>();
}
