//! Unit tests of the logical source over hand-built replication events: decoding, chunking,
//! the batch byte bound, and the confirm window.

use super::*;
use crate::source::{Position, Source};
use decode::TX_CHUNK_EVENTS;
use lifecycle::marker_slot;
use outbox_core::OutboxTable;
use pgoutput::tests::{Buf, relation_msg};
use pgwire_replication::{Lsn as WLsn, ReplicationEvent};
use uuid::Uuid;

fn source(mode: WriteMode) -> LogicalSource {
    let url = "postgres://nobody@127.0.0.1:1/none";
    let table = ResolvedTable {
        schema: "public".into(),
        name: "outbox".into(),
        qualified: "\"public\".\"outbox\"".into(),
        table: OutboxTable::new(Some("public"), "outbox").unwrap(),
    };
    let mut s = LogicalSource::new(
        LogicalConfig::new(url, OutboxTable::default(), mode),
        PgPoolOptions::new().connect_lazy(url).unwrap(),
        None,
        ReplicationTarget::from_url(url).unwrap(),
        Some(table),
        None,
        Arc::default(),
    );
    s.confirmed = Lsn(100);
    let now = Instant::now();
    s.next_heartbeat = now;
    s.next_slot_check = now;
    s
}

fn xlog(data: Vec<u8>) -> ReplicationEvent {
    ReplicationEvent::XLogData {
        wal_start: WLsn::ZERO,
        wal_end: WLsn::ZERO,
        server_time_micros: 0,
        data: data.into(),
    }
}

fn insert(rel: u32, id: &str, agg: &str) -> ReplicationEvent {
    xlog(
        Buf::tag(b'I')
            .i32(rel as i32)
            .u8(b'N')
            .i16(5)
            .text(id)
            .text("order")
            .text(agg)
            .text("Created")
            .u8(b'n')
            .0,
    )
}

fn begin(lsn: u64) -> ReplicationEvent {
    ReplicationEvent::Begin {
        final_lsn: WLsn::from_u64(lsn),
        xid: 1,
        commit_time_micros: 0,
    }
}

fn commit(lsn: u64, end: u64) -> ReplicationEvent {
    ReplicationEvent::Commit {
        lsn: WLsn::from_u64(lsn),
        end_lsn: WLsn::from_u64(end),
        commit_time_micros: 0,
    }
}

fn keepalive(lsn: u64) -> ReplicationEvent {
    ReplicationEvent::KeepAlive {
        wal_end: WLsn::from_u64(lsn),
        reply_requested: true,
        server_time_micros: 0,
    }
}

const ID1: &str = "00000000-0000-0000-0000-000000000001";
const ID2: &str = "00000000-0000-0000-0000-000000000002";
const ID3: &str = "00000000-0000-0000-0000-000000000003";

/// Batches are cut at the byte bound set with `limit_batch_bytes`, not only at `max`: the
/// events whose preceding payloads stay under it go (the first one always, however large),
/// and order is kept across the cuts.
#[tokio::test]
async fn batches_are_cut_at_the_byte_bound() {
    let mut s = source(WriteMode::InsertDelete);
    let cols = ["id", "aggregatetype", "aggregateid", "type", "payload"];
    s.handle(begin(200)).unwrap();
    s.handle(xlog(relation_msg(7, "public", "outbox", &cols)))
        .unwrap();
    let blob = format!("\"{}\"", "x".repeat(998));
    let big = format!("\"{}\"", "y".repeat(9_998));
    let mut ids = Vec::new();
    for i in 0..10u128 {
        let id = Uuid::from_u128(i + 1).to_string();
        let payload = if i == 5 { &big } else { &blob };
        s.handle(xlog(
            Buf::tag(b'I')
                .i32(7)
                .u8(b'N')
                .i16(5)
                .text(&id)
                .text("order")
                .text("a")
                .text("Created")
                .text(payload)
                .0,
        ))
        .unwrap();
        ids.push(id);
    }
    s.handle(commit(200, 210)).unwrap();
    assert_eq!(s.ready.len(), 10);
    let sizes = |b: &[SourceEvent]| -> Vec<usize> {
        b.iter()
            .map(|e| e.event.payload.as_ref().map_or(0, String::len))
            .collect()
    };
    // Without a bound only `max` cuts.
    assert_eq!(s.take_batch(2).len(), 2);
    s.limit_batch_bytes(2500);
    let b = s.take_batch(100);
    assert_eq!(sizes(&b), vec![1000; 3], "cut once 2500 bytes are reached");
    let b = s.take_batch(100);
    assert_eq!(
        sizes(&b),
        vec![10_000],
        "a payload over the bound goes alone"
    );
    let b = s.take_batch(100);
    assert_eq!(sizes(&b), vec![1000; 3]);
    let b = s.take_batch(1);
    assert_eq!(b.len(), 1, "`max` still cuts");
    let b = s.take_batch(100);
    assert_eq!(b.len(), 0);
    let order: Vec<String> = s.inflight.iter().map(|f| f.id.to_string()).collect();
    assert_eq!(order, ids, "order is kept across the cuts");
}

/// A transaction larger than a chunk is handed on before its commit arrives, and still
/// confirms its end LSN only once its last event is acknowledged.
#[tokio::test]
async fn a_large_transaction_is_handed_on_in_chunks_and_confirmed_at_its_end() {
    let mut s = source(WriteMode::InsertDelete);
    let cols = ["id", "aggregatetype", "aggregateid", "type", "payload"];
    s.handle(begin(200)).unwrap();
    s.handle(xlog(relation_msg(7, "public", "outbox", &cols)))
        .unwrap();
    let n = 2 * TX_CHUNK_EVENTS + 500;
    let ids: Vec<String> = (0..n)
        .map(|i| Uuid::from_u128(i as u128 + 1).to_string())
        .collect();
    for id in &ids {
        s.handle(insert(7, id, "a")).unwrap();
    }
    let open = s.open.as_ref().map_or(0, |t| t.events.len());
    assert!(
        open <= TX_CHUNK_EVENTS,
        "{open} events of the open transaction buffered"
    );
    assert_eq!(s.ready.len() + open, n);
    assert!(
        s.ready.iter().all(|e| matches!(
            e.position,
            Position::Wal {
                commit_lsn: 200,
                last_in_transaction: false,
                ..
            }
        )),
        "chunks are never the end of their transaction"
    );
    let early = s.take_batch(n);
    s.acknowledge_inner(&early).await.unwrap();
    assert_eq!(
        s.confirmed,
        Lsn(100),
        "an unfinished transaction confirms nothing"
    );
    s.handle(keepalive(5000)).unwrap();
    assert_eq!(s.confirmed, Lsn(100), "nor does a keepalive inside it");
    s.handle(commit(200, 210)).unwrap();
    let rest = s.take_batch(n);
    assert_eq!(early.len() + rest.len(), n);
    let order: Vec<String> = early
        .iter()
        .chain(&rest)
        .map(|e| e.event.id.to_string())
        .collect();
    assert_eq!(order, ids, "the transaction's order is kept");
    assert_eq!(
        rest.last().unwrap().position,
        Position::Wal {
            commit_lsn: 200,
            end_lsn: 210,
            last_in_transaction: true
        }
    );
    s.acknowledge_inner(&rest).await.unwrap();
    assert_eq!(s.confirmed, Lsn(210));
}

#[tokio::test]
async fn confirmation_never_passes_the_acknowledged_prefix() {
    let mut s = source(WriteMode::InsertDelete);
    let cols = ["id", "aggregatetype", "aggregateid", "type", "payload"];
    s.handle(begin(200)).unwrap();
    s.handle(xlog(relation_msg(7, "public", "outbox", &cols)))
        .unwrap();
    s.handle(insert(7, ID1, "a")).unwrap();
    // A delete of the insert_delete trick is ignored.
    s.handle(xlog(Buf::tag(b'D').i32(7).u8(b'K').i16(1).text(ID1).0))
        .unwrap();
    s.handle(insert(7, ID2, "a")).unwrap();
    // A keepalive inside an open transaction never confirms.
    s.handle(keepalive(5000)).unwrap();
    assert_eq!(s.confirmed, Lsn(100));
    assert!(s.ready.is_empty(), "nothing is returned before the commit");
    s.handle(commit(200, 210)).unwrap();
    s.handle(begin(300)).unwrap();
    s.handle(insert(7, ID3, "b")).unwrap();
    s.handle(commit(300, 310)).unwrap();
    // Received but not acknowledged: keepalives must not confirm.
    s.handle(keepalive(400)).unwrap();
    assert_eq!(s.confirmed, Lsn(100));

    let batch = s.take_batch(10);
    assert_eq!(batch.len(), 3);
    assert_eq!(
        batch[0].position,
        Position::Wal {
            commit_lsn: 200,
            end_lsn: 210,
            last_in_transaction: false
        }
    );
    assert_eq!(
        batch[1].position,
        Position::Wal {
            commit_lsn: 200,
            end_lsn: 210,
            last_in_transaction: true
        }
    );
    s.handle(keepalive(400)).unwrap();
    assert_eq!(
        s.confirmed,
        Lsn(100),
        "in flight: keepalive must not confirm"
    );
    s.acknowledge_inner(&batch[..1]).await.unwrap();
    assert_eq!(s.confirmed, Lsn(100), "half a transaction confirms nothing");
    s.acknowledge_inner(&batch[1..2]).await.unwrap();
    assert_eq!(s.confirmed, Lsn(210));
    s.handle(keepalive(400)).unwrap();
    assert_eq!(s.confirmed, Lsn(210), "tx 2 still in flight");
    s.acknowledge_inner(&batch[2..]).await.unwrap();
    assert_eq!(s.confirmed, Lsn(310));
    // Now idle: a keepalive or heartbeat may be confirmed.
    s.handle(keepalive(400)).unwrap();
    assert_eq!(s.confirmed, Lsn(400));
    s.handle(ReplicationEvent::Message {
        transactional: false,
        lsn: WLsn::from_u64(450),
        prefix: "outbox-heartbeat".into(),
        content: Vec::new().into(),
    })
    .unwrap();
    assert_eq!(s.confirmed, Lsn(450));
    // An empty transaction while idle is confirmable at once.
    s.handle(begin(500)).unwrap();
    s.handle(commit(500, 510)).unwrap();
    assert_eq!(s.confirmed, Lsn(510));
    // Never backwards.
    s.handle(keepalive(10)).unwrap();
    assert_eq!(s.confirmed, Lsn(510));
}

#[tokio::test]
async fn acknowledging_out_of_order_or_too_much_is_refused() {
    let mut s = source(WriteMode::InsertDelete);
    let cols = ["id", "aggregatetype", "aggregateid", "type", "payload"];
    s.handle(xlog(relation_msg(7, "public", "outbox", &cols)))
        .unwrap();
    s.handle(begin(200)).unwrap();
    s.handle(insert(7, ID1, "a")).unwrap();
    s.handle(insert(7, ID2, "a")).unwrap();
    s.handle(commit(200, 210)).unwrap();
    let batch = s.take_batch(10);
    assert!(s.acknowledge_inner(&batch[1..]).await.is_err());
    let mut more = batch.clone();
    more.push(batch[0].clone());
    assert!(s.acknowledge_inner(&more).await.is_err());
    assert_eq!(s.confirmed, Lsn(100));
}

#[tokio::test]
async fn messages_and_other_tables() {
    let mut s = source(WriteMode::LogicalMessage);
    s.table = None;
    let content = format!(
        r#"{{"id":"{ID1}","aggregatetype":"order","aggregateid":"1","type":"Created","payload":{{"a":1}}}}"#
    );
    s.handle(begin(200)).unwrap();
    // insert into some other table is ignored
    s.handle(xlog(relation_msg(9, "public", "accounts", &["id"])))
        .unwrap();
    s.handle(xlog(Buf::tag(b'I').i32(9).u8(b'N').i16(1).text("x").0))
        .unwrap();
    for (prefix, transactional) in [("outbox", true), ("other", true), ("outbox", false)] {
        s.handle(ReplicationEvent::Message {
            transactional,
            lsn: WLsn::from_u64(205),
            prefix: prefix.into(),
            content: content.clone().into_bytes().into(),
        })
        .unwrap();
    }
    s.handle(commit(200, 210)).unwrap();
    let batch = s.take_batch(10);
    assert_eq!(
        batch.len(),
        1,
        "only the transactional message with our prefix"
    );
    assert_eq!(batch[0].event.payload.as_deref(), Some(r#"{"a":1}"#));
}

/// Outside `logical_message` mode an outbox-prefixed message is never an event (anyone with
/// EXECUTE on pg_logical_emit_message could write one); the transaction's real insert is.
#[tokio::test]
async fn messages_are_refused_outside_logical_message_mode() {
    for mode in [WriteMode::Table, WriteMode::InsertDelete] {
        let mut s = source(mode);
        let cols = ["id", "aggregatetype", "aggregateid", "type", "payload"];
        let content = format!(
            r#"{{"id":"{ID2}","aggregatetype":"order","aggregateid":"1","type":"Injected","payload":{{}}}}"#
        );
        s.handle(xlog(relation_msg(7, "public", "outbox", &cols)))
            .unwrap();
        s.handle(begin(200)).unwrap();
        s.handle(ReplicationEvent::Message {
            transactional: true,
            lsn: WLsn::from_u64(205),
            prefix: "outbox".into(),
            content: content.clone().into_bytes().into(),
        })
        .unwrap();
        s.handle(insert(7, ID1, "a")).unwrap();
        s.handle(commit(200, 210)).unwrap();
        let batch = s.take_batch(10);
        assert_eq!(batch.len(), 1, "{mode}");
        assert_eq!(batch[0].event.id.to_string(), ID1);
        assert_eq!(s.metrics.messages_refused.get(), 1);
        // A transaction holding only an injected message confirms like an empty one.
        s.acknowledge_inner(&batch).await.unwrap();
        s.handle(begin(300)).unwrap();
        s.handle(ReplicationEvent::Message {
            transactional: true,
            lsn: WLsn::from_u64(305),
            prefix: "outbox".into(),
            content: content.into_bytes().into(),
        })
        .unwrap();
        s.handle(commit(300, 310)).unwrap();
        assert!(s.ready.is_empty());
        assert_eq!(s.confirmed, Lsn(310));
    }
}

#[test]
fn default_names_are_valid_and_marker_fits() {
    // One name per thing: the library's defaults are the configuration file's.
    let settings = crate::config::LogicalSettings::default();
    assert_eq!(SlotName::default().as_str(), settings.slot);
    assert_eq!(PublicationName::default().as_str(), settings.publication);
    assert!(SlotName::parse(&settings.slot).is_ok());
    assert!(PublicationName::parse(&settings.publication).is_ok());
    let long = SlotName::parse(&"s".repeat(63)).unwrap();
    assert_eq!(marker_slot(&long).as_str().len(), 63);
    assert_eq!(marker_slot(&SlotName::parse("a").unwrap()).as_str(), "a_bf");
}
