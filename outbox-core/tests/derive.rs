//! Behaviour of `#[derive(OutboxEvent)]`: the metadata, payloads and decoding it generates.

use outbox_core::{DecodeError, DecodeEvent, OutboxEvent};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

const ACCOUNT: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
const ACCOUNT_STR: &str = "01900000-0000-7000-8000-000000000001";

// ---------------------------------------------------------------------------------------------
// Structs

/// Every container attribute, field markers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(
    aggregate_type = "account",
    event_type = "AccountOpened.v2",
    topic = "accounts.v1",
    schema_version = 2
)]
struct AccountOpened {
    #[outbox(aggregate_id)]
    account_id: Uuid,
    #[outbox(sequence)]
    version: u32,
    email: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    referrer: Option<String>,
}

/// Defaults everywhere, ids named on the container, a non-`Uuid` id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "order", aggregate_id = "order_no", sequence = "seq")]
struct OrderPlaced {
    order_no: u64,
    seq: i64,
    lines: Vec<String>,
}

/// No sequence at all.
#[derive(Debug, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "session")]
#[serde(rename_all = "camelCase")]
struct SessionStarted {
    #[outbox(aggregate_id)]
    session_key: String,
    user_agent: String,
}

/// The service's own version type as the sequence, through `SequenceValue`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Version(u32);

impl outbox_core::SequenceValue for Version {
    fn to_sequence(&self) -> i64 {
        i64::from(self.0)
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "account")]
struct EmailChanged {
    #[outbox(aggregate_id)]
    account_id: Uuid,
    #[outbox(sequence)]
    version: Version,
}

#[derive(Debug, PartialEq, Serialize, Deserialize, OutboxEvent)]
#[outbox(aggregate_type = "account")]
struct AccountFrozen {
    #[outbox(aggregate_id)]
    account_id: Uuid,
    #[outbox(sequence)]
    version: std::num::NonZeroI64,
}

#[test]
fn a_sequence_can_be_the_services_own_version_type_or_a_non_zero_integer() {
    let changed = EmailChanged {
        account_id: ACCOUNT,
        version: Version(4_000_000_000),
    };
    assert_eq!(changed.aggregate_sequence(), Some(4_000_000_000));
    let frozen = AccountFrozen {
        account_id: ACCOUNT,
        version: std::num::NonZeroI64::new(-7).unwrap(),
    };
    assert_eq!(frozen.aggregate_sequence(), Some(-7));
}

fn opened() -> AccountOpened {
    AccountOpened {
        account_id: ACCOUNT,
        version: 1,
        email: "ada@example.com".to_owned(),
        referrer: None,
    }
}

#[test]
fn struct_metadata_comes_from_the_attributes() {
    let event = opened();
    assert_eq!(event.aggregate_type(), "account");
    assert_eq!(event.aggregate_id(), ACCOUNT_STR);
    assert_eq!(event.event_type(), "AccountOpened.v2");
    assert_eq!(event.schema_version(), 2);
    assert_eq!(event.topic(), Some("accounts.v1"));
    assert_eq!(event.aggregate_sequence(), Some(1));
}

#[test]
fn struct_metadata_defaults() {
    let event = OrderPlaced {
        order_no: 42,
        seq: -3,
        lines: vec!["book".to_owned()],
    };
    assert_eq!(event.aggregate_type(), "order");
    assert_eq!(event.aggregate_id(), "42");
    assert_eq!(event.event_type(), "OrderPlaced");
    assert_eq!(event.schema_version(), 1);
    assert_eq!(event.topic(), None);
    assert_eq!(event.aggregate_sequence(), Some(-3));

    let session = SessionStarted {
        session_key: "s-1".to_owned(),
        user_agent: "curl".to_owned(),
    };
    assert_eq!(session.aggregate_id(), "s-1");
    assert_eq!(session.event_type(), "SessionStarted");
    assert_eq!(session.aggregate_sequence(), None);
}

#[test]
fn struct_payload_is_the_structs_serde_json() {
    assert_eq!(
        opened().to_payload().unwrap(),
        json!({ "account_id": ACCOUNT_STR, "version": 1, "email": "ada@example.com" })
    );
    let session = SessionStarted {
        session_key: "s-1".to_owned(),
        user_agent: "curl".to_owned(),
    };
    assert_eq!(
        session.to_payload().unwrap(),
        json!({ "sessionKey": "s-1", "userAgent": "curl" })
    );
}

#[test]
fn struct_round_trips_through_decode() {
    let mut event = opened();
    event.referrer = Some("newsletter".to_owned());
    let bytes = serde_json::to_vec(&event.to_payload().unwrap()).unwrap();
    let decoded = AccountOpened::decode(event.event_type(), &bytes).unwrap();
    assert_eq!(decoded, event);

    let order = OrderPlaced {
        order_no: 7,
        seq: 1,
        lines: vec![],
    };
    let bytes = serde_json::to_vec(&order.to_payload().unwrap()).unwrap();
    assert_eq!(OrderPlaced::decode("OrderPlaced", &bytes).unwrap(), order);
}

#[test]
fn struct_accepts_only_its_event_type() {
    assert!(AccountOpened::accepts("AccountOpened.v2"));
    assert!(!AccountOpened::accepts("AccountOpened"));
    assert!(!AccountOpened::accepts(""));
    assert!(OrderPlaced::accepts("OrderPlaced"));
    assert!(!OrderPlaced::accepts("orderplaced"));
}

#[test]
fn struct_decode_rejects_other_event_types() {
    let err = AccountOpened::decode("AccountClosed", b"{}").unwrap_err();
    match err {
        DecodeError::UnknownEventType { event_type, target } => {
            assert_eq!(event_type, "AccountClosed");
            assert_eq!(target, "AccountOpened");
        }
        other => panic!("expected UnknownEventType, got {other:?}"),
    }
}

#[test]
fn struct_decode_reports_bad_payloads() {
    for bad in [&b"not json"[..], br#"{"account_id": 5}"#, b"[]"] {
        match AccountOpened::decode("AccountOpened.v2", bad).unwrap_err() {
            DecodeError::Payload {
                event_type, target, ..
            } => {
                assert_eq!(event_type, "AccountOpened.v2");
                assert_eq!(target, "AccountOpened");
            }
            other => panic!("expected Payload, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Enums

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AccountClosed {
    account_id: Uuid,
    version: u16,
    reason: String,
}

mod unix_seconds {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&value.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The enum itself has no serde derive: payloads come from the generated helpers.
#[derive(Debug, Clone, PartialEq, OutboxEvent)]
#[outbox(
    aggregate_type = "account",
    aggregate_id = "account_id",
    sequence = "version",
    topic = "accounts.v1",
    schema_version = 4
)]
enum AccountEvent {
    Opened {
        account_id: Uuid,
        version: u16,
        #[serde(rename = "emailAddress")]
        email: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        referrer: Option<String>,
    },
    #[outbox(
        event_type = "AccountRenamed",
        schema_version = 7,
        topic = "accounts.renames",
        aggregate_id = "id"
    )]
    Renamed {
        id: Uuid,
        version: u16,
        #[serde(with = "unix_seconds")]
        at: u64,
        name: String,
    },
    Closed(AccountClosed),
    #[outbox(event_type = "AccountFrozen")]
    Frozen {
        #[outbox(aggregate_id)]
        key: String,
        #[outbox(sequence)]
        generation: i32,
    },
}

/// No enum-level id: each variant brings its own; no sequence, topic or schema version.
#[derive(Debug, PartialEq, OutboxEvent)]
#[outbox(aggregate_type = "ledger")]
enum LedgerEvent {
    Posted {
        #[outbox(aggregate_id)]
        ledger: u32,
        amount: i64,
    },
    #[outbox(aggregate_id = "account_id")]
    AccountLinked(AccountClosed),
}

fn variants() -> Vec<AccountEvent> {
    vec![
        AccountEvent::Opened {
            account_id: ACCOUNT,
            version: 1,
            email: "ada@example.com".to_owned(),
            referrer: None,
        },
        AccountEvent::Opened {
            account_id: ACCOUNT,
            version: 1,
            email: "ada@example.com".to_owned(),
            referrer: Some("ad".to_owned()),
        },
        AccountEvent::Renamed {
            id: ACCOUNT,
            version: 2,
            at: 1_700_000_000,
            name: "Ada L.".to_owned(),
        },
        AccountEvent::Closed(AccountClosed {
            account_id: ACCOUNT,
            version: 3,
            reason: "moved".to_owned(),
        }),
        AccountEvent::Frozen {
            key: "frozen-1".to_owned(),
            generation: -1,
        },
    ]
}

#[test]
fn enum_metadata_per_variant() {
    // (event type, schema version, topic, aggregate id, sequence)
    let expected = [
        ("Opened", 4, "accounts.v1", ACCOUNT_STR, 1),
        ("Opened", 4, "accounts.v1", ACCOUNT_STR, 1),
        ("AccountRenamed", 7, "accounts.renames", ACCOUNT_STR, 2),
        ("Closed", 4, "accounts.v1", ACCOUNT_STR, 3),
        ("AccountFrozen", 4, "accounts.v1", "frozen-1", -1),
    ];
    for (event, (event_type, version, topic, id, seq)) in variants().iter().zip(expected) {
        assert_eq!(event.aggregate_type(), "account");
        assert_eq!(event.event_type(), event_type, "{event:?}");
        assert_eq!(event.schema_version(), version, "{event:?}");
        assert_eq!(event.topic(), Some(topic), "{event:?}");
        assert_eq!(event.aggregate_id(), id, "{event:?}");
        assert_eq!(event.aggregate_sequence(), Some(seq), "{event:?}");
    }
}

#[test]
fn enum_metadata_defaults() {
    let posted = LedgerEvent::Posted {
        ledger: 9,
        amount: -5,
    };
    assert_eq!(posted.aggregate_type(), "ledger");
    assert_eq!(posted.aggregate_id(), "9");
    assert_eq!(posted.event_type(), "Posted");
    assert_eq!(posted.schema_version(), 1);
    assert_eq!(posted.topic(), None);
    assert_eq!(posted.aggregate_sequence(), None);

    let linked = LedgerEvent::AccountLinked(AccountClosed {
        account_id: ACCOUNT,
        version: 1,
        reason: String::new(),
    });
    assert_eq!(linked.aggregate_id(), ACCOUNT_STR);
    assert_eq!(linked.event_type(), "AccountLinked");
}

#[test]
fn enum_payloads_are_untagged_variant_json() {
    let payloads: Vec<_> = variants()
        .iter()
        .map(|event| event.to_payload().unwrap())
        .collect();
    assert_eq!(
        payloads,
        [
            json!({ "account_id": ACCOUNT_STR, "version": 1, "emailAddress": "ada@example.com" }),
            json!({
                "account_id": ACCOUNT_STR,
                "version": 1,
                "emailAddress": "ada@example.com",
                "referrer": "ad",
            }),
            json!({ "id": ACCOUNT_STR, "version": 2, "at": "1700000000", "name": "Ada L." }),
            json!({ "account_id": ACCOUNT_STR, "version": 3, "reason": "moved" }),
            json!({ "key": "frozen-1", "generation": -1 }),
        ]
    );
    assert_eq!(
        LedgerEvent::Posted {
            ledger: 1,
            amount: 2
        }
        .to_payload()
        .unwrap(),
        json!({ "ledger": 1, "amount": 2 })
    );
}

#[test]
fn enum_round_trips_through_decode() {
    for event in variants() {
        let bytes = serde_json::to_vec(&event.to_payload().unwrap()).unwrap();
        let decoded = AccountEvent::decode(event.event_type(), &bytes).unwrap();
        assert_eq!(decoded, event);
    }
    let linked = LedgerEvent::AccountLinked(AccountClosed {
        account_id: ACCOUNT,
        version: 1,
        reason: "x".to_owned(),
    });
    let bytes = serde_json::to_vec(&linked.to_payload().unwrap()).unwrap();
    assert_eq!(
        LedgerEvent::decode("AccountLinked", &bytes).unwrap(),
        linked
    );
}

#[test]
fn enum_decode_dispatches_on_event_type_not_shape() {
    // A `Closed` payload decoded as `Opened` fails even though both carry `account_id`.
    let closed = json!({ "account_id": ACCOUNT_STR, "version": 3, "reason": "moved" });
    let bytes = serde_json::to_vec(&closed).unwrap();
    assert!(matches!(
        AccountEvent::decode("Opened", &bytes),
        Err(DecodeError::Payload { .. })
    ));
    assert!(matches!(
        AccountEvent::decode("Closed", &bytes),
        Ok(AccountEvent::Closed(_))
    ));
}

#[test]
fn enum_accepts_every_variant_event_type_and_nothing_else() {
    for event_type in ["Opened", "AccountRenamed", "Closed", "AccountFrozen"] {
        assert!(AccountEvent::accepts(event_type), "{event_type}");
    }
    for event_type in ["Renamed", "Frozen", "opened", "", "AccountOpened.v2"] {
        assert!(!AccountEvent::accepts(event_type), "{event_type}");
    }
}

#[test]
fn enum_decode_rejects_unknown_event_types() {
    // "Renamed" is the variant's name, but its event type is "AccountRenamed".
    match AccountEvent::decode("Renamed", b"{}").unwrap_err() {
        DecodeError::UnknownEventType { event_type, target } => {
            assert_eq!(event_type, "Renamed");
            assert_eq!(target, "AccountEvent");
        }
        other => panic!("expected UnknownEventType, got {other:?}"),
    }
}

#[test]
fn enum_decode_reports_bad_payloads() {
    let cases: [(&str, &[u8]); 4] = [
        ("Opened", b"{"),
        ("Opened", br#"{"account_id": "not a uuid", "version": 1, "emailAddress": "a"}"#),
        ("AccountRenamed", br#"{"id": "01900000-0000-7000-8000-000000000001", "version": 1, "at": 5, "name": "a"}"#),
        ("Closed", b"null"),
    ];
    for (event_type, payload) in cases {
        match AccountEvent::decode(event_type, payload).unwrap_err() {
            DecodeError::Payload {
                event_type: found,
                target,
                ..
            } => {
                assert_eq!(found, event_type);
                assert_eq!(target, "AccountEvent");
            }
            other => panic!("expected Payload for {event_type}, got {other:?}"),
        }
    }
}

#[test]
fn events_work_as_trait_objects() {
    let events: Vec<Box<dyn OutboxEvent>> = vec![
        Box::new(opened()),
        Box::new(AccountEvent::Frozen {
            key: "k".to_owned(),
            generation: 0,
        }),
    ];
    let types: Vec<_> = events.iter().map(|event| event.event_type()).collect();
    assert_eq!(types, ["AccountOpened.v2", "AccountFrozen"]);
}
