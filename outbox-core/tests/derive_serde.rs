//! Enum-level `#[serde(...)]` attributes and `#[derive(OutboxEvent)]`: the payload is what
//! serde's own derive writes for the same enum (`serde_json::to_value(&e) == e.to_payload()`),
//! except for serde's default, externally tagged layout (see the untagged tests).

use outbox_core::{DecodeError, DecodeEvent, OutboxEvent};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Closed {
    account_id: u32,
    reason: String,
}

/// Serializing with serde and writing through the outbox give the same JSON, and the payload
/// decodes back to the event.
fn assert_agrees<E>(event: &E, expected: &Value)
where
    E: OutboxEvent + DecodeEvent + Serialize + std::fmt::Debug + PartialEq,
{
    let payload = event.to_payload().unwrap();
    assert_eq!(&payload, expected, "{event:?}");
    assert_eq!(serde_json::to_value(event).unwrap(), payload, "{event:?}");
    let bytes = serde_json::to_vec(&payload).unwrap();
    assert_eq!(&E::decode(event.event_type(), &bytes).unwrap(), event);
}

// ---------------------------------------------------------------------------------------------
// tag = "..." (internally tagged)

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "account", aggregate_id = "account_id")]
#[serde(tag = "type", rename_all = "snake_case")]
enum Internal {
    AccountOpened {
        account_id: u32,
        email: String,
    },
    #[serde(rename = "closed.v1")]
    #[outbox(event_type = "AccountClosed")]
    Closed(Closed),
}

#[test]
fn internally_tagged_payloads_match_serde() {
    assert_agrees(
        &Internal::AccountOpened {
            account_id: 1,
            email: "a@example.com".into(),
        },
        &json!({ "type": "account_opened", "account_id": 1, "email": "a@example.com" }),
    );
    assert_agrees(
        &Internal::Closed(Closed {
            account_id: 1,
            reason: "moved".into(),
        }),
        &json!({ "type": "closed.v1", "account_id": 1, "reason": "moved" }),
    );
}

#[test]
fn serde_renames_change_the_tag_not_the_event_type() {
    let opened = Internal::AccountOpened {
        account_id: 1,
        email: String::new(),
    };
    assert_eq!(opened.event_type(), "AccountOpened");
    assert!(Internal::accepts("AccountOpened"));
    assert!(!Internal::accepts("account_opened"));
}

#[test]
fn a_tag_naming_another_event_type_is_refused() {
    let bytes = br#"{"type":"account_opened","account_id":1,"email":""}"#;
    match Internal::decode("AccountClosed", bytes).unwrap_err() {
        DecodeError::Payload { source, .. } => {
            let message = source.to_string();
            assert!(
                message.contains("`AccountOpened`, not `AccountClosed`"),
                "{message}"
            );
        }
        other => panic!("expected Payload, got {other:?}"),
    }
    assert!(matches!(
        Internal::decode("Nope", bytes),
        Err(DecodeError::UnknownEventType { .. })
    ));
    assert!(matches!(
        Internal::decode("AccountOpened", br#"{"account_id":1,"email":""}"#),
        Err(DecodeError::Payload { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// tag + content (adjacently tagged), rename_all_fields

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "account", aggregate_id = "account_id")]
#[serde(tag = "t", content = "c", rename_all_fields = "camelCase")]
enum Adjacent {
    Opened {
        account_id: u32,
        email_address: String,
    },
    Closed(Closed),
}

#[test]
fn adjacently_tagged_payloads_match_serde() {
    assert_agrees(
        &Adjacent::Opened {
            account_id: 2,
            email_address: "b@example.com".into(),
        },
        &json!({ "t": "Opened", "c": { "accountId": 2, "emailAddress": "b@example.com" } }),
    );
    assert_agrees(
        &Adjacent::Closed(Closed {
            account_id: 2,
            reason: "x".into(),
        }),
        &json!({ "t": "Closed", "c": { "account_id": 2, "reason": "x" } }),
    );
}

// ---------------------------------------------------------------------------------------------
// untagged, explicit and by default

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "account", aggregate_id = "account_id")]
#[serde(untagged, rename_all_fields = "camelCase")]
enum Untagged {
    Opened {
        account_id: u32,
        email_address: String,
    },
    #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
    Renamed {
        #[serde(rename = "accountId")]
        account_id: u32,
        new_name: String,
    },
    Closed(Closed),
}

#[test]
fn untagged_payloads_match_serde_and_decode_by_event_type() {
    assert_agrees(
        &Untagged::Opened {
            account_id: 3,
            email_address: "c@example.com".into(),
        },
        &json!({ "accountId": 3, "emailAddress": "c@example.com" }),
    );
    assert_agrees(
        &Untagged::Renamed {
            account_id: 3,
            new_name: "Ada".into(),
        },
        &json!({ "accountId": 3, "NEW_NAME": "Ada" }),
    );
    assert_agrees(
        &Untagged::Closed(Closed {
            account_id: 3,
            reason: "r".into(),
        }),
        &json!({ "account_id": 3, "reason": "r" }),
    );
}

/// Without enum-level serde attributes the payload is still the variant's content: the event
/// type travels in the envelope (`type` column, `eventType` header), so the payload of a variant
/// looks like the payload of an equivalent struct event. serde's own default (externally tagged)
/// wraps it in `{"Variant": ...}`; that is the one documented difference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "account", aggregate_id = "account_id")]
#[serde(rename_all_fields = "camelCase")]
enum Default {
    Opened {
        account_id: u32,
        email_address: String,
    },
}

#[test]
fn default_layout_is_untagged_and_honours_field_renames() {
    let event = Default::Opened {
        account_id: 4,
        email_address: "d@example.com".into(),
    };
    let payload = event.to_payload().unwrap();
    assert_eq!(
        payload,
        json!({ "accountId": 4, "emailAddress": "d@example.com" })
    );
    assert_eq!(
        serde_json::to_value(&event).unwrap(),
        json!({ "Opened": payload })
    );
    let bytes = serde_json::to_vec(&payload).unwrap();
    assert_eq!(Default::decode("Opened", &bytes).unwrap(), event);
}

/// The enum-level serde attributes work without a serde derive on the enum: the derive declares
/// `serde` as one of its attributes.
#[derive(Debug, PartialEq, OutboxEvent)]
#[outbox(aggregate_type = "cart", aggregate_id = "cart_id")]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum CartEvent {
    ItemAdded { cart_id: u32, sku: String },
}

#[test]
fn tagged_payloads_need_no_serde_derive_on_the_enum() {
    let event = CartEvent::ItemAdded {
        cart_id: 1,
        sku: "b-1".into(),
    };
    let payload = event.to_payload().unwrap();
    assert_eq!(
        payload,
        json!({ "kind": "item-added", "cart_id": 1, "sku": "b-1" })
    );
    let bytes = serde_json::to_vec(&payload).unwrap();
    assert_eq!(CartEvent::decode("ItemAdded", &bytes).unwrap(), event);
}
