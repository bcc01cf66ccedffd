//! Transaction decoding: the replication stream's events applied to the open transaction
//! ([`OpenTx`]), complete transactions (and chunks of huge ones) queued in `ready` as
//! [`SourceEvent`]s with their [`Position::Wal`].
//!
//! Guarantees enforced here:
//! - **Committed only, in commit order.** An event is queued only between a `Begin` and its
//!   `Commit` (pgoutput protocol 1 sends a transaction only once committed); only the last event
//!   of a transaction carries `last_in_transaction`, the position the slot may be confirmed to.
//!   Chunks of a transaction handed on early ([`TX_CHUNK_EVENTS`]) confirm nothing.
//! - **Rows decoded from the WAL**: inserts into the outbox table come from the `Insert` tuple.
//! - **No injected or phantom events.** An outbox-prefixed logical message is an event only in
//!   `logical_message` mode and only when transactional; elsewhere it is refused and counted
//!   (one warning a minute at most).
//! - **Idle confirmation.** A keepalive, heartbeat or empty transaction confirms its position only
//!   when nothing is pending ([`LogicalSource::idle`]).

use std::time::Duration;

use outbox_core::{MalformedEvent, StoredEvent, WriteMode};
use pgwire_replication::ReplicationEvent;
use tokio::time::Instant;
use uuid::Uuid;

use super::pgoutput::{self, PgOutputMessage, Relation};
use super::{LogicalError, LogicalSource, Lsn, slot};
use crate::source::{Position, SourceEvent};

pub(super) struct OpenTx {
    pub(super) commit_lsn: Lsn,
    /// Decoded events not handed on yet, malformed ones included (the relay parks those).
    pub(super) events: Vec<Result<StoredEvent, MalformedEvent>>,
    /// Multi-table mode: the table tag of each of `events` (empty otherwise).
    pub(super) tags: Vec<u16>,
    /// Payload bytes of `events`.
    pub(super) bytes: usize,
    /// Whether chunks of it were handed on already: a clean stop then reads on to its commit,
    /// so the relay can finish it (see [`LogicalSource::finishing_a_transaction`]).
    pub(super) handed_on: bool,
}

/// A transaction is handed on in chunks once it holds more than this many events, or
/// [`TX_CHUNK_BYTES`] of payload, before its commit arrives, so a huge transaction never sits in
/// memory whole. That is safe: pgoutput (protocol 1, no `streaming`) sends a transaction only
/// once it has committed, so every event between its Begin and Commit is committed already. The
/// last event received is always held back for the Commit, to carry the LSN the slot may be
/// confirmed to once the whole transaction is acknowledged; the chunks confirm nothing.
pub(super) const TX_CHUNK_EVENTS: usize = 1000;

/// See [`TX_CHUNK_EVENTS`]. Small, because what a transaction holds before a chunk is handed on
/// (and the rest of the last chunk, left in `ready` after a batch was cut at its byte bound) is
/// memory outside the relay's window bound.
const TX_CHUNK_BYTES: usize = 1 << 20;

/// The payload bytes an event (or what was salvaged of a malformed one) holds.
fn payload_bytes(event: &Result<StoredEvent, MalformedEvent>) -> usize {
    let e = match event {
        Ok(e) => e,
        Err(m) => &m.salvaged,
    };
    e.payload.as_ref().map_or(0, String::len)
}

/// At most one warning per this interval about refused outbox-prefixed messages.
const INJECTION_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// The id a malformed logical message whose own id cannot be read is parked under: unique per
/// message (its LSN) and recognisable (`6f7574626f780000-…`, "outbox" in hex).
fn malformed_message_id(lsn: Lsn) -> Uuid {
    Uuid::from_u64_pair(0x6f75_7462_6f78_0000, lsn.0)
}

impl LogicalSource {
    /// The tag of `rel` when it is one of our tables: 0 for the single table, its index in
    /// `tables` in multi-table mode.
    fn our_table(&self, rel: &Relation) -> Option<u16> {
        let is = |t: &slot::ResolvedTable| t.schema == rel.namespace && t.name == rel.name;
        if self.multi() {
            return self.tables.position(is);
        }
        self.table.as_ref().filter(|t| is(t)).map(|_| 0)
    }

    /// Queues a decoded event (with its table tag in multi-table mode).
    fn push_ready(&mut self, event: SourceEvent, tag: u16) {
        self.ready.push_back(event);
        if self.multi() {
            self.ready_tags.push_back(tag);
        }
    }

    /// Apply one replication event. Completed transactions land in `ready`.
    pub(super) fn handle(&mut self, ev: ReplicationEvent) -> Result<(), LogicalError> {
        match ev {
            ReplicationEvent::Begin { final_lsn, .. } => {
                if self.open.is_some() {
                    return Err(LogicalError::Replication(
                        "Begin inside an open transaction".into(),
                    ));
                }
                self.open = Some(OpenTx {
                    commit_lsn: Lsn(final_lsn.as_u64()),
                    events: Vec::new(),
                    tags: Vec::new(),
                    bytes: 0,
                    handed_on: false,
                });
            }
            ReplicationEvent::Commit { lsn, end_lsn, .. } => {
                let Some(tx) = self.open.take() else {
                    return Err(LogicalError::Replication("Commit without Begin".into()));
                };
                let commit_lsn = Lsn(lsn.as_u64());
                let end_lsn = Lsn(end_lsn.as_u64());
                if tx.commit_lsn != commit_lsn {
                    tracing::debug!(begin = %tx.commit_lsn, commit = %commit_lsn, "commit LSN differs from Begin's final LSN");
                }
                let n = tx.events.len();
                // (A transaction handed on in chunks always keeps its last event for here.)
                if n == 0 {
                    // Nothing of ours in it: confirmable once nothing earlier is pending.
                    if self.idle() {
                        self.confirm(end_lsn);
                    }
                    return Ok(());
                }
                self.metrics.events_streamed.inc_by(n as u64);
                let mut tags = tx.tags.into_iter();
                for (i, event) in tx.events.into_iter().enumerate() {
                    let event = SourceEvent::decoded(
                        event,
                        Position::Wal {
                            commit_lsn: commit_lsn.0,
                            end_lsn: end_lsn.0,
                            last_in_transaction: i + 1 == n,
                        },
                    );
                    self.push_ready(event, tags.next().unwrap_or(0));
                }
            }
            ReplicationEvent::XLogData { data, .. } => match pgoutput::decode(&data)? {
                PgOutputMessage::Relation(rel) => {
                    self.relations.insert(rel.id, rel);
                }
                PgOutputMessage::Insert { relation_id, tuple } => {
                    let Some(rel) = self.relations.get(&relation_id) else {
                        return Err(LogicalError::Replication(format!(
                            "Insert for unknown relation {relation_id}"
                        )));
                    };
                    let Some(tag) = self.our_table(rel) else {
                        tracing::debug!(table = %rel.name, "ignoring insert into another table");
                        return Ok(());
                    };
                    let named = rel.named_values(&tuple)?;
                    // A malformed row is handed on too: the relay parks it with its reason.
                    let event = StoredEvent::from_text_columns(named);
                    self.push_open(event, tag, "Insert outside a transaction")?;
                }
                PgOutputMessage::Update { relation_id }
                | PgOutputMessage::Delete { relation_id } => {
                    tracing::debug!(
                        relation_id,
                        "ignoring update/delete (publication marks or insert_delete)"
                    );
                }
                PgOutputMessage::Truncate { .. } => tracing::debug!("ignoring truncate"),
                PgOutputMessage::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                } => self.handle_message(transactional, lsn, &prefix, &content)?,
                PgOutputMessage::Begin { .. }
                | PgOutputMessage::Commit { .. }
                | PgOutputMessage::Origin
                | PgOutputMessage::Type => {}
            },
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => self.handle_message(transactional, Lsn(lsn.as_u64()), &prefix, &content)?,
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if self.idle() {
                    self.confirm(Lsn(wal_end.as_u64()));
                }
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    fn handle_message(
        &mut self,
        transactional: bool,
        lsn: Lsn,
        prefix: &str,
        content: &[u8],
    ) -> Result<(), LogicalError> {
        if prefix == self.heartbeat_prefix {
            if !transactional && self.idle() {
                self.confirm(lsn);
            }
            return Ok(());
        }
        if prefix != self.cfg.message_prefix {
            tracing::debug!(prefix, "ignoring logical message with another prefix");
            return Ok(());
        }
        if self.cfg.write_mode != WriteMode::LogicalMessage
            && !crate::faults::mutant("accept_messages_any_mode")
        {
            // Any role with EXECUTE on pg_logical_emit_message (PUBLIC by default) can write
            // one: outside logical_message mode it is never an event.
            self.refuse_message(lsn);
            return Ok(());
        }
        if !transactional {
            tracing::error!(%lsn, "refusing a NON-transactional outbox message: it is written even if its transaction rolls back; write events with pg_logical_emit_message(true, …)");
            return Ok(());
        }
        // A malformed message is handed on too: the relay parks it with its reason, under an
        // id derived from its LSN when its own cannot be read.
        let event = StoredEvent::from_logical_message(content).map_err(|mut m| {
            if m.id.is_none() {
                m.salvaged.id = malformed_message_id(lsn);
            }
            m
        });
        self.push_open(event, 0, "transactional message outside a transaction")
    }

    /// Whether part of the transaction being received was handed on already. A clean stop then
    /// reads on to its commit (it is committed and on its way: pgoutput sends only committed
    /// transactions), so the relay finishes it and the slot is confirmed past it; stopping in
    /// the middle would make the next start send the handed-on part again.
    pub(super) fn finishing_a_transaction(&self) -> bool {
        self.open.as_ref().is_some_and(|t| t.handed_on)
    }

    /// Adds an event to the open transaction; hands a chunk on when the transaction has grown
    /// past [`TX_CHUNK_EVENTS`] or [`TX_CHUNK_BYTES`] (see there why that is safe).
    fn push_open(
        &mut self,
        event: Result<StoredEvent, MalformedEvent>,
        tag: u16,
        outside: &'static str,
    ) -> Result<(), LogicalError> {
        let multi = self.multi();
        let Some(tx) = self.open.as_mut() else {
            return Err(LogicalError::Replication(outside.into()));
        };
        tx.bytes += payload_bytes(&event);
        tx.events.push(event);
        if multi {
            tx.tags.push(tag);
        }
        if tx.events.len() <= TX_CHUNK_EVENTS && tx.bytes <= TX_CHUNK_BYTES {
            return Ok(());
        }
        tx.handed_on = true;
        let last = tx.events.pop().expect("an event was just added");
        tx.bytes = payload_bytes(&last);
        let chunk = std::mem::replace(&mut tx.events, vec![last]);
        let chunk_tags = match tx.tags.pop() {
            Some(last_tag) => std::mem::replace(&mut tx.tags, vec![last_tag]),
            None => Vec::new(),
        };
        let commit_lsn = tx.commit_lsn.0;
        self.metrics.events_streamed.inc_by(chunk.len() as u64);
        let mut tags = chunk_tags.into_iter();
        for event in chunk {
            let event = SourceEvent::decoded(
                event,
                Position::Wal {
                    commit_lsn,
                    // Not known before the Commit, and never used: a chunk confirms nothing.
                    end_lsn: 0,
                    last_in_transaction: false,
                },
            );
            self.push_ready(event, tags.next().unwrap_or(0));
        }
        Ok(())
    }

    /// Counts a refused outbox-prefixed message and warns, at most once per
    /// [`INJECTION_WARN_INTERVAL`], with the LSN and the number refused since the last warning.
    fn refuse_message(&mut self, lsn: Lsn) {
        self.metrics.messages_refused.inc_by(1);
        self.refused_since_warning += 1;
        let now = Instant::now();
        if self
            .last_refusal_warning
            .is_none_or(|t| now.duration_since(t) >= INJECTION_WARN_INTERVAL)
        {
            tracing::warn!(
                %lsn,
                refused = self.refused_since_warning,
                write_mode = %self.cfg.write_mode,
                prefix = %self.cfg.message_prefix,
                "ignoring a logical decoding message with the outbox prefix: events are accepted \
                 from pg_logical_emit_message only in the logical_message write mode (someone \
                 emitted it by hand or a writer is misconfigured; it is never published)"
            );
            self.last_refusal_warning = Some(now);
            self.refused_since_warning = 0;
        }
    }
}
