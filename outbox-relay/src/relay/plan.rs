//! The decisions of a pump round that need no I/O: which events of a batch are sent and which
//! parked, what became of each event once the broker answered, what must be parked then, and how
//! many events are sent one at a time after a record-level refusal. Each function is decided by
//! its arguments alone.

use std::collections::HashMap;
use std::fmt::Display;

use uuid::Uuid;

use crate::park::{AggregateKey, ParkRequest};
use crate::route::{OutboundRecord, Router};
use crate::sink::{ErrorClass, Outcome, UNLISTED_ERROR_ROUNDS};
use crate::source::SourceEvent;

/// What the relay does with one event of a batch.
#[derive(Debug)]
pub(super) enum Plan {
    /// Produce the record at this index of the batch's records.
    Send(usize),
    /// Park it without sending.
    Park(Box<ParkRequest>),
}

/// Decides, for each event of `batch` in order, whether it is sent or parked; returns the plan
/// (one entry per event) and the records to send.
///
/// An event of an aggregate in `blocked` is parked behind that aggregate's first parked event;
/// a malformed event, or one that cannot be routed, is parked for its own reason and — with
/// `hold` — blocks its aggregate in `blocked` for the rest of the batch and the caller's later
/// batches. So an aggregate never overtakes an event of its own that was parked. (`hold` is off
/// only in the `park_without_blocking` mutant.) A sent event's payload moves into its record
/// where the record carries it unchanged ([`Router::route_moving_payload`]).
pub(super) fn plan_batch(
    router: &Router,
    batch: &mut [SourceEvent],
    blocked: &mut HashMap<AggregateKey, Uuid>,
    hold: bool,
) -> (Vec<Plan>, Vec<OutboundRecord>) {
    let mut plan: Vec<Plan> = Vec::with_capacity(batch.len());
    let mut records = Vec::with_capacity(batch.len());
    let key_of = |e: &SourceEvent| (e.event.aggregate_type.clone(), e.event.aggregate_id.clone());
    for e in batch {
        if let Some(defect) = &e.defect {
            // Malformed: never published; parked like a poison event, its aggregate held.
            if hold {
                blocked.entry(key_of(e)).or_insert(e.event.id);
            }
            plan.push(Plan::Park(Box::new(ParkRequest {
                event: e.event.clone(),
                reason: defect.clone(),
                blocked_by: None,
            })));
            continue;
        }
        // Nothing blocked (the usual case): no key to build.
        let first = if blocked.is_empty() {
            None
        } else {
            blocked.get(&key_of(e)).copied()
        };
        if let Some(first) = first {
            plan.push(Plan::Park(Box::new(ParkRequest {
                event: e.event.clone(),
                reason: format!("held behind parked event {first} of the same aggregate"),
                blocked_by: Some(first),
            })));
            continue;
        }
        // The record takes the payload where it is sent unchanged; an unroutable event keeps it.
        match router.route_moving_payload(&mut e.event) {
            Ok(record) => {
                plan.push(Plan::Send(records.len()));
                records.push(record);
            }
            Err(error) => {
                if hold {
                    blocked.insert(key_of(e), e.event.id);
                }
                plan.push(Plan::Park(Box::new(ParkRequest {
                    event: e.event.clone(),
                    reason: error.reason,
                    blocked_by: None,
                })));
            }
        }
    }
    (plan, records)
}

/// The index in the batch of the event whose record is `record`.
pub(super) fn event_of_record(plan: &[Plan], record: usize) -> Option<usize> {
    plan.iter()
        .position(|p| matches!(p, Plan::Send(j) if *j == record))
}

/// What became of each event, in batch order: its record's outcome (`sent`, indexed like the
/// records), or [`Outcome::Held`] for an event planned to be parked — handled without a send.
pub(super) fn outcomes_per_event<E: Clone>(plan: &[Plan], sent: &[Outcome<E>]) -> Vec<Outcome<E>> {
    plan.iter()
        .map(|p| match p {
            Plan::Send(i) => sent[*i].clone(),
            Plan::Park(_) => Outcome::Held { behind: usize::MAX },
        })
        .collect()
}

/// After a record-level refusal of a produce request at event `handled`: how many events, from
/// that one to the last [`Outcome::Suspect`] of the batch, are sent one at a time to find the
/// record at fault (at least the one at `handled`).
fn suspects_from<E>(outcomes: &[Outcome<E>], handled: usize) -> usize {
    let last = outcomes
        .iter()
        .rposition(|o| matches!(o, Outcome::Suspect(_)))
        .unwrap_or(handled);
    last + 1 - handled
}

/// What the pump does about the first event of a round it could not handle.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Setback {
    /// Rewind to that event and produce it again (after a backoff unless `isolate` is set).
    Retry {
        /// Send this many events one at a time from there, to find the record at fault
        /// ([`ErrorClass::Record`]); 0 keeps batching.
        isolate: usize,
    },
    /// Stop the relay; the text tells the operator what to fix.
    Stop(String),
}

/// Decides the [`Setback`] for event `handled`, the first of `outcomes` that is
/// [`Outcome::Failed`] or [`Outcome::Suspect`], given the class the sink gives its error.
///
/// `unlisted_rounds` counts failed rounds in a row caused by an error the relay does not know;
/// it is incremented here, and the relay stops once it reaches [`UNLISTED_ERROR_ROUNDS`] (the
/// caller resets it when a round delivers something).
pub(super) fn setback<E>(
    outcomes: &[Outcome<E>],
    handled: usize,
    unlisted_rounds: &mut u32,
    classify: impl Fn(&E) -> ErrorClass,
) -> Setback {
    match &outcomes[handled] {
        Outcome::Suspect(_) => Setback::Retry {
            isolate: suspects_from(outcomes, handled),
        },
        Outcome::Failed(e) => match classify(e) {
            ErrorClass::Stop(fix) => Setback::Stop(fix.to_owned()),
            ErrorClass::Record => Setback::Retry {
                isolate: suspects_from(outcomes, handled),
            },
            ErrorClass::Unlisted => {
                *unlisted_rounds += 1;
                if *unlisted_rounds >= UNLISTED_ERROR_ROUNDS {
                    Setback::Stop(format!(
                        "the relay does not know this error as transient and it persisted over {unlisted_rounds} attempts with nothing delivered: look it up in the brokers' logs, fix the cause, then restart the relay"
                    ))
                } else {
                    Setback::Retry { isolate: 0 }
                }
            }
            ErrorClass::Retry => Setback::Retry { isolate: 0 },
        },
        _ => Setback::Retry { isolate: 0 },
    }
}

/// The events of a handled prefix (`handled` events of `batch`) that must be parked: planned
/// parks, records the broker refused for good, and records held behind a refused one. A sent
/// event gets back the payload the pump moved into its record.
pub(super) fn parks_in<E: Display>(
    plan: &[Plan],
    outcomes: &[Outcome<E>],
    batch: &[SourceEvent],
    records: &[OutboundRecord],
    handled: usize,
) -> Vec<ParkRequest> {
    let event_of = |e: &SourceEvent, record: usize| {
        let mut event = e.event.clone();
        if event.payload.is_none() {
            // Only JSON values are moved (schema'd events keep their own payload).
            event.payload = records
                .get(record)
                .and_then(|r| r.payload.clone())
                .and_then(|p| String::from_utf8(p).ok());
        }
        event
    };
    let mut parks = Vec::new();
    for (i, (p, e)) in plan.iter().zip(batch).enumerate().take(handled) {
        match (p, &outcomes[i]) {
            (Plan::Park(request), _) => parks.push((**request).clone()),
            (Plan::Send(j), Outcome::Rejected(error)) => parks.push(ParkRequest {
                event: event_of(e, *j),
                reason: format!("the broker refused the record for good: {error}"),
                blocked_by: None,
            }),
            (Plan::Send(j), Outcome::Held { behind }) => {
                let first = event_of_record(plan, *behind).map(|k| batch[k].event.id);
                parks.push(ParkRequest {
                    event: event_of(e, *j),
                    reason: "held behind a rejected event of the same aggregate".into(),
                    blocked_by: first,
                });
            }
            _ => {}
        }
    }
    parks
}

#[cfg(test)]
mod tests {
    use outbox_core::StoredEvent;

    use super::*;
    use crate::route::RouteSettings;
    use crate::sink::Delivered;
    use crate::source::Position;

    type Error = &'static str;

    fn event(aggregate_type: &str, aggregate_id: &str) -> SourceEvent {
        let mut e = StoredEvent::new(Uuid::new_v4(), aggregate_type, aggregate_id, "Happened");
        e.payload = Some(format!("{{\"of\":\"{aggregate_id}\"}}"));
        SourceEvent::new(e, Position::Row)
    }

    fn malformed(aggregate_id: &str) -> SourceEvent {
        let mut e = event("orders", aggregate_id);
        e.defect = Some("malformed outbox event: headers are not an object".into());
        e
    }

    fn router() -> Router {
        Router::new(&RouteSettings::default()).expect("the default route")
    }

    fn delivered() -> Outcome<Error> {
        Outcome::Delivered(Delivered {
            partition: 0,
            offset: 0,
        })
    }

    fn sends(plan: &[Plan]) -> Vec<Option<usize>> {
        plan.iter()
            .map(|p| match p {
                Plan::Send(i) => Some(*i),
                Plan::Park(_) => None,
            })
            .collect()
    }

    fn park(p: &Plan) -> &ParkRequest {
        match p {
            Plan::Park(request) => request,
            Plan::Send(i) => panic!("record {i} is sent, not parked"),
        }
    }

    #[test]
    fn routable_events_are_sent_in_order() {
        let mut batch = [event("orders", "1"), event("payments", "2")];
        let (plan, records) = plan_batch(&router(), &mut batch, &mut HashMap::new(), true);
        assert_eq!(sends(&plan), [Some(0), Some(1)]);
        assert_eq!(records[0].topic, "outbox.event.orders");
        assert_eq!(records[1].topic, "outbox.event.payments");
        assert_eq!(event_of_record(&plan, 1), Some(1));
    }

    #[test]
    fn a_blocked_aggregate_is_parked_behind_its_first_parked_event() {
        let first = Uuid::new_v4();
        let mut blocked = HashMap::from([(("orders".to_owned(), "1".to_owned()), first)]);
        let mut batch = [event("orders", "1"), event("orders", "2")];
        let (plan, records) = plan_batch(&router(), &mut batch, &mut blocked, true);
        assert_eq!(sends(&plan), [None, Some(0)]);
        assert_eq!(records.len(), 1);
        assert_eq!(park(&plan[0]).blocked_by, Some(first));
        assert!(park(&plan[0]).reason.contains(&first.to_string()));
        assert_eq!(event_of_record(&plan, 0), Some(1));
    }

    #[test]
    fn a_malformed_or_unroutable_event_is_parked_and_holds_its_aggregate() {
        let mut batch = [
            malformed("1"),
            event("orders", "1"),
            event("orders/eu", "2"),
            event("orders/eu", "2"),
            event("orders", "3"),
        ];
        let mut blocked = HashMap::new();
        let (plan, records) = plan_batch(&router(), &mut batch, &mut blocked, true);
        assert_eq!(sends(&plan), [None, None, None, None, Some(0)]);
        assert_eq!(records.len(), 1);
        assert_eq!(park(&plan[0]).blocked_by, None);
        assert!(park(&plan[0]).reason.starts_with("malformed"));
        assert_eq!(park(&plan[1]).blocked_by, Some(batch[0].event.id));
        assert_eq!(park(&plan[2]).blocked_by, None);
        assert!(park(&plan[2]).reason.contains("outbox.event.orders/eu"));
        assert_eq!(park(&plan[3]).blocked_by, Some(batch[2].event.id));
        assert_eq!(
            blocked.len(),
            2,
            "both aggregates stay held for later batches"
        );
    }

    #[test]
    fn a_sent_events_payload_moves_into_its_record_and_a_parked_one_keeps_it() {
        let mut batch = [event("orders", "1"), event("orders/eu", "2")];
        let (plan, records) = plan_batch(&router(), &mut batch, &mut HashMap::new(), true);
        assert_eq!(sends(&plan), [Some(0), None]);
        assert_eq!(records[0].payload.as_deref(), Some(&br#"{"of":"1"}"#[..]));
        assert_eq!(batch[0].event.payload, None, "one copy: the record's");
        assert_eq!(
            park(&plan[1]).event.payload.as_deref(),
            Some(r#"{"of":"2"}"#)
        );
        assert_eq!(batch[1].event.payload.as_deref(), Some(r#"{"of":"2"}"#));
    }

    #[test]
    fn without_hold_a_parked_event_does_not_block_its_aggregate() {
        let mut batch = [malformed("1"), event("orders", "1")];
        let mut blocked = HashMap::new();
        let (plan, _) = plan_batch(&router(), &mut batch, &mut blocked, false);
        assert_eq!(sends(&plan), [None, Some(0)]);
        assert!(blocked.is_empty());
    }

    #[test]
    fn planned_parks_count_as_held_and_sent_events_take_their_records_outcome() {
        let plan = [
            Plan::Send(0),
            Plan::Park(Box::new(ParkRequest {
                event: malformed("1").event,
                reason: "malformed".into(),
                blocked_by: None,
            })),
            Plan::Send(1),
        ];
        let sent = [delivered(), Outcome::Failed("timed out")];
        let outcomes = outcomes_per_event(&plan, &sent);
        assert!(matches!(outcomes[0], Outcome::Delivered(_)));
        assert!(matches!(outcomes[1], Outcome::Held { .. }));
        assert!(matches!(outcomes[2], Outcome::Failed("timed out")));
    }

    #[test]
    fn suspects_are_isolated_up_to_the_last_one() {
        let outcomes = [
            delivered(),
            Outcome::Suspect("too large"),
            delivered(),
            Outcome::Suspect("too large"),
            Outcome::Failed("timed out"),
        ];
        assert_eq!(suspects_from(&outcomes, 1), 3);
        assert_eq!(suspects_from(&[delivered(), Outcome::Failed("x")], 1), 1);
    }

    #[test]
    fn refused_and_held_records_are_parked_with_their_payload_within_the_handled_prefix() {
        let mut batch = vec![
            event("orders", "1"),
            event("orders", "1"),
            malformed("2"),
            event("orders", "3"),
        ];
        let (plan, records) = plan_batch(&router(), &mut batch, &mut HashMap::new(), true);
        assert_eq!(sends(&plan), [Some(0), Some(1), None, Some(2)]);
        // The pump keeps a sent event's payload only in its record.
        for (e, p) in batch.iter_mut().zip(&plan) {
            if matches!(p, Plan::Send(_)) {
                e.event.payload = None;
            }
        }
        let sent = [
            Outcome::Rejected("too large"),
            Outcome::Held { behind: 0 },
            Outcome::Rejected("too large"),
        ];
        let outcomes = outcomes_per_event(&plan, &sent);
        let parks = parks_in(&plan, &outcomes, &batch, &records, 3);
        assert_eq!(parks.len(), 3, "{parks:#?}");
        assert_eq!(parks[0].event.id, batch[0].event.id);
        assert_eq!(
            parks[0].reason,
            "the broker refused the record for good: too large"
        );
        assert_eq!(parks[0].event.payload.as_deref(), Some("{\"of\":\"1\"}"));
        assert_eq!(parks[1].blocked_by, Some(batch[0].event.id));
        assert_eq!(parks[1].event.payload.as_deref(), Some("{\"of\":\"1\"}"));
        assert_eq!(parks[2].event.id, batch[2].event.id);
        assert!(parks[2].reason.starts_with("malformed"));
        assert!(parks_in(&plan, &outcomes, &batch, &records, 0).is_empty());
    }

    fn by_message(e: &Error) -> ErrorClass {
        match *e {
            "too large" => ErrorClass::Record,
            "forbidden" => ErrorClass::Stop("grant the relay's principal write access"),
            "strange" => ErrorClass::Unlisted,
            _ => ErrorClass::Retry,
        }
    }

    #[test]
    fn a_transient_failure_retries_and_a_refusal_for_good_stops_with_its_fix() {
        let mut rounds = 0;
        let retry = [delivered(), Outcome::Failed("timed out")];
        assert_eq!(
            setback(&retry, 1, &mut rounds, by_message),
            Setback::Retry { isolate: 0 }
        );
        let stop = [Outcome::Failed("forbidden")];
        assert_eq!(
            setback(&stop, 0, &mut rounds, by_message),
            Setback::Stop("grant the relay's principal write access".into())
        );
        assert_eq!(rounds, 0, "only unknown errors are counted");
    }

    #[test]
    fn a_record_level_refusal_isolates_the_suspects_without_stopping() {
        let mut rounds = 0;
        let suspects = [
            delivered(),
            Outcome::Suspect("too large"),
            Outcome::Suspect("too large"),
            delivered(),
        ];
        assert_eq!(
            setback(&suspects, 1, &mut rounds, by_message),
            Setback::Retry { isolate: 2 }
        );
        let failed = [Outcome::Failed("too large"), Outcome::Failed("too large")];
        assert_eq!(
            setback(&failed, 0, &mut rounds, by_message),
            Setback::Retry { isolate: 1 }
        );
    }

    #[test]
    fn an_unknown_error_stops_the_relay_once_it_persists() {
        let mut rounds = 0;
        let unknown = [Outcome::Failed("strange")];
        for round in 1..UNLISTED_ERROR_ROUNDS {
            assert_eq!(
                setback(&unknown, 0, &mut rounds, by_message),
                Setback::Retry { isolate: 0 },
                "round {round} retries"
            );
        }
        match setback(&unknown, 0, &mut rounds, by_message) {
            Setback::Stop(fix) => assert!(fix.contains("persisted over"), "{fix}"),
            other => panic!("an unknown error persisting for {rounds} rounds must stop: {other:?}"),
        }
    }
}
