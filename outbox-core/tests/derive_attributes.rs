//! `#[derive(OutboxEvent)]`'s event id, broker key, header, crate path and upcast attributes,
//! and how `NewEvent` and the inbox use them.

use outbox_core::inbox::decode_record;
use outbox_core::{
    DecodeError, DecodeEvent, IncomingRecord, KEY_HEADER, NewEvent, OutboxEvent, UpcastError,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

const ACCOUNT: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
const REQUEST: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_00aa);

/// An id newtype that opts into being a header value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TenantId(String);

impl outbox_core::HeaderValue for TenantId {
    fn to_header_value(&self) -> Option<String> {
        Some(format!("tenant-{}", self.0))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "payment")]
struct PaymentCaptured {
    #[outbox(aggregate_id)]
    payment_id: Uuid,
    #[outbox(id)]
    request_id: Uuid,
    #[outbox(key)]
    merchant: String,
    #[outbox(header = "tenant")]
    tenant: TenantId,
    #[outbox(header = "x-region")]
    region: Option<String>,
    #[outbox(header = "x-attempt")]
    attempt: u8,
    amount: i64,
}

fn captured() -> PaymentCaptured {
    PaymentCaptured {
        payment_id: ACCOUNT,
        request_id: REQUEST,
        merchant: "m-7".to_owned(),
        tenant: TenantId("acme".to_owned()),
        region: None,
        attempt: 2,
        amount: 100,
    }
}

#[test]
fn struct_id_key_and_headers_come_from_marked_fields() {
    let event = captured();
    assert_eq!(event.event_id(), Some(REQUEST));
    assert_eq!(event.message_key().as_deref(), Some("m-7"));
    assert_eq!(
        event.headers(),
        [
            ("tenant".to_owned(), "tenant-acme".to_owned()),
            ("x-attempt".to_owned(), "2".to_owned()),
        ]
    );
    let event = PaymentCaptured {
        region: Some("eu".to_owned()),
        ..captured()
    };
    assert_eq!(
        event.headers(),
        [
            ("tenant".to_owned(), "tenant-acme".to_owned()),
            ("x-region".to_owned(), "eu".to_owned()),
            ("x-attempt".to_owned(), "2".to_owned()),
        ]
    );
    // The marked fields stay in the payload: the attributes add metadata, they remove nothing.
    assert_eq!(event.to_payload().unwrap()["merchant"], "m-7");
}

#[test]
fn new_event_carries_id_key_and_headers() {
    let new = NewEvent::from_event(&captured()).unwrap();
    let expected = NewEvent::new(
        "payment",
        ACCOUNT.to_string(),
        "PaymentCaptured",
        Some(captured().to_payload().unwrap()),
    )
    .with_id(REQUEST)
    .with_header("tenant", "tenant-acme")
    .with_header("x-attempt", "2")
    .with_header(KEY_HEADER, "m-7");
    assert_eq!(new, expected);
}

#[test]
fn events_without_the_attributes_keep_the_defaults() {
    #[derive(Serialize, Deserialize, OutboxEvent)]
    #[outbox(aggregate_type = "plain")]
    struct Plain {
        #[outbox(aggregate_id)]
        id: u32,
    }
    let plain = Plain { id: 1 };
    assert_eq!(plain.event_id(), None);
    assert_eq!(plain.message_key(), None);
    assert!(plain.headers().is_empty());
    assert_eq!(
        NewEvent::from_event(&plain).unwrap(),
        NewEvent::new("plain", "1", "Plain", Some(json!({ "id": 1 })))
    );
}

#[derive(Debug, Clone, PartialEq, OutboxEvent)]
#[outbox(aggregate_type = "order", aggregate_id = "order_id")]
enum OrderEvent {
    Placed {
        order_id: u64,
        #[outbox(id)]
        command_id: Option<Uuid>,
        #[outbox(header = "channel")]
        channel: Box<str>,
    },
    Shipped {
        order_id: u64,
        #[outbox(key)]
        warehouse: u16,
        #[outbox(header = "carrier")]
        carrier: String,
        #[outbox(header = "channel")]
        channel: String,
    },
    Cancelled(Cancelled),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Cancelled {
    order_id: u64,
}

#[test]
fn enum_extras_are_per_variant() {
    let placed = OrderEvent::Placed {
        order_id: 1,
        command_id: Some(REQUEST),
        channel: "web".into(),
    };
    assert_eq!(placed.event_id(), Some(REQUEST));
    assert_eq!(placed.message_key(), None);
    assert_eq!(placed.headers(), [("channel".to_owned(), "web".to_owned())]);
    let anonymous = OrderEvent::Placed {
        order_id: 1,
        command_id: None,
        channel: "app".into(),
    };
    assert_eq!(anonymous.event_id(), None);

    let shipped = OrderEvent::Shipped {
        order_id: 1,
        warehouse: 4,
        carrier: "dhl".to_owned(),
        channel: "web".to_owned(),
    };
    assert_eq!(shipped.event_id(), None);
    assert_eq!(shipped.message_key().as_deref(), Some("4"));
    assert_eq!(
        shipped.headers(),
        [
            ("carrier".to_owned(), "dhl".to_owned()),
            ("channel".to_owned(), "web".to_owned()),
        ]
    );
    let cancelled = OrderEvent::Cancelled(Cancelled { order_id: 1 });
    assert_eq!(cancelled.event_id(), None);
    assert_eq!(cancelled.message_key(), None);
    assert!(cancelled.headers().is_empty());
}

// ---------------------------------------------------------------------------------------------
// crate = "..."

mod reexport {
    pub use outbox_core;
}

#[derive(Serialize, Deserialize, OutboxEvent)]
#[outbox(crate = "reexport::outbox_core", aggregate_type = "via")]
struct ViaReexport {
    #[outbox(aggregate_id)]
    id: u8,
    #[outbox(header = "h")]
    h: String,
}

#[derive(OutboxEvent)]
#[outbox(crate = "reexport::outbox_core", aggregate_type = "via")]
enum ViaReexportEnum {
    One {
        #[outbox(aggregate_id)]
        id: u8,
    },
}

#[test]
fn crate_path_compiles_through_a_reexport() {
    let event = ViaReexport {
        id: 3,
        h: "x".to_owned(),
    };
    assert_eq!(event.aggregate_id(), "3");
    assert_eq!(event.headers(), [("h".to_owned(), "x".to_owned())]);
    assert!(ViaReexport::decode("ViaReexport", br#"{"id":3,"h":"y"}"#).is_ok());
    assert_eq!(
        ViaReexportEnum::One { id: 1 }.to_payload().unwrap(),
        json!({ "id": 1 })
    );
}

// ---------------------------------------------------------------------------------------------
// upcast = path

/// Version 1 had `name`; version 2 splits it into `first` and `last`.
#[derive(Debug, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "customer", schema_version = 2, upcast = upcast_customer)]
struct CustomerRegistered {
    #[outbox(aggregate_id)]
    id: u32,
    first: String,
    last: String,
}

fn upcast_customer(event_type: &str, version: i32, mut payload: Value) -> Result<Value, String> {
    assert_eq!(event_type, "CustomerRegistered");
    assert_eq!(version, 1);
    let name = payload
        .get("name")
        .and_then(Value::as_str)
        .ok_or("version 1 payload has no `name`")?
        .to_owned();
    let (first, last) = name.split_once(' ').unwrap_or((&name, ""));
    payload["first"] = first.into();
    payload["last"] = last.into();
    Ok(payload)
}

fn record(event_type: &str, schema_version: Option<&str>, payload: &Value) -> IncomingRecord {
    let mut headers = vec![
        (
            "id".to_owned(),
            Some(Uuid::now_v7().to_string().into_bytes()),
        ),
        ("eventType".to_owned(), Some(event_type.as_bytes().to_vec())),
    ];
    if let Some(version) = schema_version {
        headers.push((
            "schemaVersion".to_owned(),
            Some(version.as_bytes().to_vec()),
        ));
    }
    IncomingRecord {
        topic: "t".to_owned(),
        payload: Some(serde_json::to_vec(payload).unwrap()),
        headers,
        ..IncomingRecord::default()
    }
}

#[test]
fn a_version_1_payload_decodes_through_the_upcast_hook() {
    let v1 = json!({ "id": 7, "name": "Ada Lovelace" });
    let expected = CustomerRegistered {
        id: 7,
        first: "Ada".to_owned(),
        last: "Lovelace".to_owned(),
    };
    assert_eq!(
        CustomerRegistered::decode_versioned(
            "CustomerRegistered",
            1,
            &serde_json::to_vec(&v1).unwrap()
        )
        .unwrap(),
        expected
    );
    // Through the inbox's decoding, with the relay's `schemaVersion` header.
    let (meta, event) =
        decode_record::<CustomerRegistered>(&record("CustomerRegistered", Some("1"), &v1)).unwrap();
    assert_eq!(meta.schema_version, 1);
    assert_eq!(event, expected);
    // Without the hook, the same record does not decode.
    assert!(matches!(
        CustomerRegistered::decode("CustomerRegistered", &serde_json::to_vec(&v1).unwrap()),
        Err(DecodeError::Payload { .. })
    ));
}

#[test]
fn current_payloads_skip_the_upcast_hook() {
    let v2 = json!({ "id": 7, "first": "Ada", "last": "L" });
    // The hook asserts version 1: reaching it with version 2 would panic.
    let (_, event) =
        decode_record::<CustomerRegistered>(&record("CustomerRegistered", Some("2"), &v2)).unwrap();
    assert_eq!(event.first, "Ada");
}

#[test]
fn a_failed_upcast_is_a_typed_decode_error() {
    let bad = json!({ "id": 7 });
    match CustomerRegistered::decode_versioned(
        "CustomerRegistered",
        1,
        &serde_json::to_vec(&bad).unwrap(),
    )
    .unwrap_err()
    {
        DecodeError::Upcast {
            event_type,
            target,
            from,
            to,
            source,
        } => {
            assert_eq!(event_type, "CustomerRegistered");
            assert_eq!(target, "CustomerRegistered");
            assert_eq!((from, to), (1, 2));
            assert_eq!(source.to_string(), "version 1 payload has no `name`");
        }
        other => panic!("expected Upcast, got {other:?}"),
    }
}

/// Per-variant versions: only `Renamed` is at version 3; the hook sees each variant's own
/// event type and old version.
#[derive(Debug, PartialEq, OutboxEvent)]
#[outbox(aggregate_type = "account", aggregate_id = "id", upcast = upcast_account)]
enum AccountEvent {
    Opened {
        id: u32,
    },
    #[outbox(schema_version = 3)]
    Renamed {
        id: u32,
        display_name: String,
    },
}

fn upcast_account(
    event_type: &str,
    version: i32,
    mut payload: Value,
) -> Result<Value, UpcastError> {
    match (event_type, version) {
        ("Renamed", 1 | 2) => {
            let old = payload
                .as_object_mut()
                .and_then(|o| o.remove("name"))
                .ok_or("no `name`")?;
            payload["display_name"] = old;
            Ok(payload)
        }
        _ => Err(format!("no upcast for {event_type} v{version}").into()),
    }
}

#[test]
fn enum_upcast_uses_each_variants_version() {
    let old = json!({ "id": 1, "name": "Ada" });
    let (_, event) = decode_record::<AccountEvent>(&record("Renamed", Some("2"), &old)).unwrap();
    assert_eq!(
        event,
        AccountEvent::Renamed {
            id: 1,
            display_name: "Ada".to_owned()
        }
    );
    // No header means version 1.
    let (_, event) = decode_record::<AccountEvent>(&record("Renamed", None, &old)).unwrap();
    assert!(matches!(event, AccountEvent::Renamed { .. }));
    // `Opened` is at version 1: a version 1 record never reaches the hook (which would refuse).
    let (_, event) =
        decode_record::<AccountEvent>(&record("Opened", Some("1"), &json!({ "id": 5 }))).unwrap();
    assert_eq!(event, AccountEvent::Opened { id: 5 });
}
