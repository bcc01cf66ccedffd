//! Parked events: events that can never be produced, and the events of the same aggregate held
//! behind them.
//!
//! An event whose topic is illegal, or that Kafka refuses for good (too large, topic not allowed),
//! would otherwise stall every aggregate behind it. The relay instead moves it to the
//! `<table>_parked` table with the reason, and parks every later event of **the same aggregate**
//! behind it (`blocked_by`), so that aggregate's order survives while all other aggregates keep
//! flowing. A transient problem (broker down, timeouts, leader elections) never parks anything:
//! it makes the relay retry the batch.
//!
//! Operators list, retry (after fixing the cause, e.g. raising the size limit) or drop parked
//! events with `outbox-relay parked …`; a retry publishes an aggregate's parked events in their
//! original order before the aggregate is unblocked.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use outbox_core::{OutboxTable, StoredEvent, parse_headers};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use uuid::Uuid;

/// An aggregate: its type and id.
pub type AggregateKey = (String, String);

/// An event to park.
#[derive(Debug, Clone)]
pub struct ParkRequest {
    /// The event.
    pub event: StoredEvent,
    /// Why it cannot be published.
    pub reason: String,
    /// For an event held behind a poison event of its aggregate: that event's id.
    pub blocked_by: Option<Uuid>,
}

/// A parked event as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParkedEvent {
    /// The event id.
    pub id: Uuid,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Event type.
    pub event_type: String,
    /// Why it was parked.
    pub reason: String,
    /// The poison event it is held behind, if any.
    pub blocked_by: Option<Uuid>,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
    /// Payload size in bytes.
    pub payload_bytes: i64,
}

/// Stores parked events durably. Must be called before the source acknowledges past them.
pub async fn park(
    conn: &mut PgConnection,
    table: &OutboxTable,
    requests: &[ParkRequest],
) -> Result<(), sqlx::Error> {
    if requests.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(requests.len());
    let mut types = Vec::new();
    let mut agg_ids = Vec::new();
    let mut event_types = Vec::new();
    let mut payloads = Vec::new();
    let mut seqs = Vec::new();
    let mut created = Vec::new();
    let mut traces = Vec::new();
    let mut headers = Vec::new();
    let mut versions = Vec::new();
    let mut topics = Vec::new();
    let mut agg_seqs = Vec::new();
    let mut reasons = Vec::new();
    let mut blocked = Vec::new();
    for r in requests {
        let e = &r.event;
        ids.push(e.id);
        types.push(e.aggregate_type.clone());
        agg_ids.push(e.aggregate_id.clone());
        event_types.push(e.event_type.clone());
        payloads.push(e.payload.clone());
        seqs.push(e.seq);
        created.push(e.created_at);
        traces.push(e.traceparent.clone());
        headers.push(
            serde_json::to_string(
                &e.headers
                    .iter()
                    .cloned()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )
            .expect("string map serializes"),
        );
        versions.push(e.schema_version);
        topics.push(e.topic.clone());
        agg_seqs.push(e.aggregate_seq);
        reasons.push(r.reason.clone());
        blocked.push(r.blocked_by);
    }
    let sql = format!(
        "INSERT INTO {} (id, aggregatetype, aggregateid, type, payload, seq, created_at,
                         tracingspancontext, headers, schema_version, topic, aggregate_seq,
                         reason, blocked_by)
         SELECT id, at, ai, ty, pl::jsonb, sq, ca, tp, hd::jsonb, sv, tc, asq, rs, bb
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[],
                     $7::timestamptz[], $8::text[], $9::text[], $10::int4[], $11::text[],
                     $12::int8[], $13::text[], $14::uuid[])
              WITH ORDINALITY AS p(id, at, ai, ty, pl, sq, ca, tp, hd, sv, tc, asq, rs, bb, ord)
         ORDER BY ord
         ON CONFLICT (id) DO NOTHING",
        table.parked_qualified()
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(&ids)
        .bind(&types)
        .bind(&agg_ids)
        .bind(&event_types)
        .bind(&payloads)
        .bind(&seqs)
        .bind(&created)
        .bind(&traces)
        .bind(&headers)
        .bind(&versions)
        .bind(&topics)
        .bind(&agg_seqs)
        .bind(&reasons)
        .bind(&blocked)
        .execute(conn)
        .await?;
    Ok(())
}

/// The aggregates that currently have parked events, each with its first parked event's id
/// (their new events must be parked behind it).
pub async fn blocked_aggregates(
    conn: &mut PgConnection,
    table: &OutboxTable,
) -> Result<HashMap<AggregateKey, Uuid>, sqlx::Error> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT DISTINCT ON (aggregatetype, aggregateid) aggregatetype, aggregateid, id
         FROM {} ORDER BY aggregatetype, aggregateid, park_seq",
        table.parked_qualified()
    )))
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), r.try_get(2)?)))
        .collect()
}

/// Lists parked events in replay order.
pub async fn list(
    conn: &mut PgConnection,
    table: &OutboxTable,
) -> Result<Vec<ParkedEvent>, sqlx::Error> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT id, aggregatetype, aggregateid, type, reason, blocked_by, parked_at,
                coalesce(octet_length(payload::text), 0)::int8 AS payload_bytes
         FROM {} ORDER BY park_seq",
        table.parked_qualified()
    )))
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ParkedEvent {
                id: r.try_get("id")?,
                aggregate_type: r.try_get("aggregatetype")?,
                aggregate_id: r.try_get("aggregateid")?,
                event_type: r.try_get("type")?,
                reason: r.try_get("reason")?,
                blocked_by: r.try_get("blocked_by")?,
                parked_at: r.try_get("parked_at")?,
                payload_bytes: r.try_get("payload_bytes")?,
            })
        })
        .collect()
}

/// The parked events of one aggregate, in replay order, as full events.
pub async fn events_of(
    conn: &mut PgConnection,
    table: &OutboxTable,
    aggregate: &AggregateKey,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT id, aggregatetype, aggregateid, type, payload::text AS payload, seq, created_at,
                tracingspancontext, headers::text AS headers, schema_version, topic, aggregate_seq
         FROM {} WHERE aggregatetype = $1 AND aggregateid = $2 ORDER BY park_seq",
        table.parked_qualified()
    )))
    .bind(&aggregate.0)
    .bind(&aggregate.1)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            let headers: Option<String> = r.try_get("headers")?;
            Ok(StoredEvent {
                id: r.try_get("id")?,
                aggregate_type: r.try_get("aggregatetype")?,
                aggregate_id: r.try_get("aggregateid")?,
                event_type: r.try_get("type")?,
                payload: r.try_get("payload")?,
                seq: r.try_get("seq")?,
                created_at: r.try_get("created_at")?,
                traceparent: r.try_get("tracingspancontext")?,
                headers: headers
                    .and_then(|h| parse_headers(&h).ok())
                    .unwrap_or_default(),
                schema_version: r.try_get("schema_version")?,
                topic: r.try_get("topic")?,
                aggregate_seq: r.try_get("aggregate_seq")?,
            })
        })
        .collect()
}

/// The aggregate of a parked event, if it is parked.
pub async fn aggregate_of(
    conn: &mut PgConnection,
    table: &OutboxTable,
    id: Uuid,
) -> Result<Option<AggregateKey>, sqlx::Error> {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT aggregatetype, aggregateid FROM {} WHERE id = $1",
        table.parked_qualified()
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
}

/// Removes parked events (after they were published by a retry, or when dropped).
pub async fn remove(
    conn: &mut PgConnection,
    table: &OutboxTable,
    ids: &[Uuid],
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {} WHERE id = ANY($1)",
        table.parked_qualified()
    )))
    .bind(ids)
    .execute(conn)
    .await?
    .rows_affected())
}
