//! Decoder for the `pgoutput` logical decoding output plugin, protocol version 1.
//!
//! Only what the outbox needs is decoded in full: `Begin`, `Commit`, `Relation`, `Insert` (text
//! tuple data) and logical decoding `Message`s. `Update`, `Delete` and `Truncate` are recognised
//! (their relation id is kept so they can be logged and ignored); `Origin` and `Type` are skipped.
//!
//! Every read is bounds-checked: a malformed or truncated buffer yields a [`DecodeError`], never a
//! panic, whatever bytes arrive from the network.

use std::fmt;

/// A PostgreSQL log sequence number (byte position in the WAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid / "start from the slot's confirmed position" LSN.
    pub const ZERO: Lsn = Lsn(0);

    /// Parse PostgreSQL's `X/Y` text form (as returned by `pg_lsn` columns).
    pub fn parse(text: &str) -> Option<Lsn> {
        let (hi, lo) = text.trim().split_once('/')?;
        let hi = u32::from_str_radix(hi, 16).ok()?;
        let lo = u32::from_str_radix(lo, 16).ok()?;
        Some(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// A `pgoutput` message could not be decoded: the stream is corrupt or speaks another protocol
/// version. Not retryable on the same data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput decode error in {message} message: {reason}")]
pub struct DecodeError {
    /// Which message kind was being decoded.
    pub message: &'static str,
    /// What was wrong.
    pub reason: String,
}

/// One column of a [`Relation`] as announced by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Flags; bit 1 = part of the replica identity key.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_modifier: i32,
}

/// A `Relation` message: the schema of a table, sent before its first change in each session
/// and again whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation OID, the key that `Insert`/`Update`/`Delete` refer to.
    pub id: u32,
    /// Schema name (`pg_catalog` is sent as an empty string by the server).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting (`d`, `n`, `f`, `i`).
    pub replica_identity: u8,
    /// Columns in tuple order.
    pub columns: Vec<RelationColumn>,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// SQL NULL (`n`).
    Null,
    /// Unchanged TOASTed value (`u`); only appears in updates.
    UnchangedToast,
    /// Text-format value (`t`).
    Text(String),
    /// Binary-format value (`b`); only with the `binary` option, which this relay does not use.
    Binary(Vec<u8>),
}

/// A decoded `pgoutput` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    /// Start of a committed transaction.
    Begin {
        /// LSN of the commit record (the transaction's commit LSN).
        final_lsn: Lsn,
        /// Commit timestamp, microseconds since 2000-01-01.
        commit_time_micros: i64,
        /// Transaction id.
        xid: u32,
    },
    /// End of a transaction.
    Commit {
        /// Flags (unused, 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End LSN of the transaction: the position to confirm once it is fully processed.
        end_lsn: Lsn,
        /// Commit timestamp, microseconds since 2000-01-01.
        commit_time_micros: i64,
    },
    /// Replication origin of the transaction (ignored).
    Origin,
    /// Table schema.
    Relation(Relation),
    /// Custom type description (ignored).
    Type,
    /// A row inserted into a published table.
    Insert {
        /// Relation OID.
        relation_id: u32,
        /// The new tuple.
        tuple: Vec<TupleValue>,
    },
    /// A row updated in a published table (ignored by the outbox: updates mark publication).
    Update {
        /// Relation OID.
        relation_id: u32,
    },
    /// A row deleted from a published table (ignored: the `insert_delete` write mode's delete).
    Delete {
        /// Relation OID.
        relation_id: u32,
    },
    /// Tables truncated (ignored).
    Truncate {
        /// Relation OIDs.
        relation_ids: Vec<u32>,
    },
    /// A logical decoding message from `pg_logical_emit_message`.
    Message {
        /// Emitted with `transactional = true` (delivered inside its transaction).
        transactional: bool,
        /// LSN of the message record.
        lsn: Lsn,
        /// Application prefix.
        prefix: String,
        /// Raw content.
        content: Vec<u8>,
    },
}

struct Reader<'a> {
    buf: &'a [u8],
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError {
            message: self.message,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.err(format!(
                "truncated: needed {n} bytes, {} left",
                self.buf.len()
            )));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(self.i32()? as u32)
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        Ok(Lsn(self.i64()? as u64))
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.err("string without NUL terminator"))?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|e| self.err(format!("string is not UTF-8: {e}")))?
            .to_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    fn len_prefixed(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.i32()?;
        let len = usize::try_from(len).map_err(|_| self.err(format!("negative length {len}")))?;
        self.take(len)
    }

    fn tuple(&mut self) -> Result<Vec<TupleValue>, DecodeError> {
        let n = self.i16()?;
        let n = usize::try_from(n).map_err(|_| self.err(format!("negative column count {n}")))?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let kind = self.u8()?;
            values.push(match kind {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' => {
                    let raw = self.len_prefixed()?;
                    TupleValue::Text(
                        std::str::from_utf8(raw)
                            .map_err(|e| self.err(format!("text value is not UTF-8: {e}")))?
                            .to_owned(),
                    )
                }
                b'b' => TupleValue::Binary(self.len_prefixed()?.to_vec()),
                other => {
                    return Err(self.err(format!("unknown tuple value kind 0x{other:02x}")));
                }
            });
        }
        Ok(values)
    }

    /// Skip an optional old-key (`K`) or old-tuple (`O`) section, then expect `N` + new tuple.
    fn skip_tuple(&mut self) -> Result<(), DecodeError> {
        self.tuple().map(|_| ())
    }
}

/// Decode one `pgoutput` (protocol version 1) message.
///
/// Guarantee: never panics on arbitrary input; trailing bytes after a complete message are
/// tolerated (future protocol additions), a truncated message is an error.
pub fn decode(buf: &[u8]) -> Result<PgOutputMessage, DecodeError> {
    let Some((&tag, rest)) = buf.split_first() else {
        return Err(DecodeError {
            message: "(empty)",
            reason: "empty pgoutput message".into(),
        });
    };
    let message = match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        _ => "(unknown)",
    };
    let mut r = Reader { buf: rest, message };
    Ok(match tag {
        b'B' => PgOutputMessage::Begin {
            final_lsn: r.lsn()?,
            commit_time_micros: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => PgOutputMessage::Commit {
            flags: r.u8()?,
            commit_lsn: r.lsn()?,
            end_lsn: r.lsn()?,
            commit_time_micros: r.i64()?,
        },
        b'O' => {
            r.lsn()?;
            r.cstr()?;
            PgOutputMessage::Origin
        }
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let n = usize::try_from(n).map_err(|_| r.err(format!("negative column count {n}")))?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                columns.push(RelationColumn {
                    flags: r.u8()?,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            PgOutputMessage::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => {
            r.u32()?;
            r.cstr()?;
            r.cstr()?;
            PgOutputMessage::Type
        }
        b'I' => {
            let relation_id = r.u32()?;
            match r.u8()? {
                b'N' => {}
                other => {
                    return Err(r.err(format!("expected 'N' before new tuple, got 0x{other:02x}")));
                }
            }
            PgOutputMessage::Insert {
                relation_id,
                tuple: r.tuple()?,
            }
        }
        b'U' => {
            let relation_id = r.u32()?;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                r.skip_tuple()?;
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(r.err(format!("expected 'N' before new tuple, got 0x{kind:02x}")));
            }
            r.skip_tuple()?;
            PgOutputMessage::Update { relation_id }
        }
        b'D' => {
            let relation_id = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => r.skip_tuple()?,
                other => return Err(r.err(format!("expected 'K' or 'O', got 0x{other:02x}"))),
            }
            PgOutputMessage::Delete { relation_id }
        }
        b'T' => {
            let n = r.i32()?;
            let n =
                usize::try_from(n).map_err(|_| r.err(format!("negative relation count {n}")))?;
            r.u8()?;
            let mut relation_ids = Vec::with_capacity(n.min(4096));
            for _ in 0..n {
                relation_ids.push(r.u32()?);
            }
            PgOutputMessage::Truncate { relation_ids }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = r.lsn()?;
            let prefix = r.cstr()?;
            let content = r.len_prefixed()?.to_vec();
            PgOutputMessage::Message {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content,
            }
        }
        other => {
            return Err(r.err(format!(
                "unknown pgoutput message tag 0x{other:02x} (streaming or protocol > 1?)"
            )));
        }
    })
}

impl Relation {
    /// Pair an `Insert` tuple with this relation's column names, in column order.
    ///
    /// Guarantee: errors (rather than guessing) when the tuple's width differs from the relation's,
    /// or when a value is in a form the outbox cannot use (unchanged TOAST or binary).
    pub fn named_values<'a>(
        &'a self,
        tuple: &'a [TupleValue],
    ) -> Result<Vec<(&'a str, Option<&'a str>)>, DecodeError> {
        let err = |reason: String| DecodeError {
            message: "Insert",
            reason,
        };
        if tuple.len() != self.columns.len() {
            return Err(err(format!(
                "tuple has {} columns but relation {}.{} has {}",
                tuple.len(),
                self.namespace,
                self.name,
                self.columns.len()
            )));
        }
        self.columns
            .iter()
            .zip(tuple)
            .map(|(col, value)| match value {
                TupleValue::Null => Ok((col.name.as_str(), None)),
                TupleValue::Text(t) => Ok((col.name.as_str(), Some(t.as_str()))),
                TupleValue::UnchangedToast => Err(err(format!(
                    "column {} is an unchanged TOAST value in an insert",
                    col.name
                ))),
                TupleValue::Binary(_) => Err(err(format!(
                    "column {} arrived in binary format; the relay requests text",
                    col.name
                ))),
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builder for hand-made pgoutput buffers.
    #[derive(Default)]
    pub(crate) struct Buf(pub Vec<u8>);

    impl Buf {
        pub(crate) fn tag(t: u8) -> Self {
            Buf(vec![t])
        }
        pub(crate) fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub(crate) fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn cstr(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        pub(crate) fn text(self, s: &str) -> Self {
            let mut b = self.u8(b't').i32(s.len() as i32);
            b.0.extend_from_slice(s.as_bytes());
            b
        }
    }

    pub(crate) fn relation_msg(id: u32, ns: &str, name: &str, cols: &[&str]) -> Vec<u8> {
        let mut b = Buf::tag(b'R')
            .i32(id as i32)
            .cstr(ns)
            .cstr(name)
            .u8(b'd')
            .i16(cols.len() as i16);
        for (i, c) in cols.iter().enumerate() {
            b = b.u8(u8::from(i == 0)).cstr(c).i32(25).i32(-1);
        }
        b.0
    }

    #[test]
    fn begin_and_commit() {
        let b = Buf::tag(b'B').i64(0x1_0000_0010).i64(42).i32(777).0;
        assert_eq!(
            decode(&b).unwrap(),
            PgOutputMessage::Begin {
                final_lsn: Lsn(0x1_0000_0010),
                commit_time_micros: 42,
                xid: 777
            }
        );
        let c = Buf::tag(b'C').u8(0).i64(100).i64(130).i64(5).0;
        assert_eq!(
            decode(&c).unwrap(),
            PgOutputMessage::Commit {
                flags: 0,
                commit_lsn: Lsn(100),
                end_lsn: Lsn(130),
                commit_time_micros: 5
            }
        );
    }

    #[test]
    fn relation_and_insert_with_nulls() {
        let r = relation_msg(
            16384,
            "public",
            "outbox",
            &["id", "aggregatetype", "payload"],
        );
        let PgOutputMessage::Relation(rel) = decode(&r).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(rel.id, 16384);
        assert_eq!(rel.name, "outbox");
        assert_eq!(rel.columns.len(), 3);
        assert_eq!(rel.columns[2].name, "payload");

        let i = Buf::tag(b'I')
            .i32(16384)
            .u8(b'N')
            .i16(3)
            .text("6f1c…")
            .text("Order")
            .u8(b'n')
            .0;
        let PgOutputMessage::Insert { relation_id, tuple } = decode(&i).unwrap() else {
            panic!("not an insert")
        };
        assert_eq!(relation_id, 16384);
        let named = rel.named_values(&tuple).unwrap();
        assert_eq!(
            named,
            vec![
                ("id", Some("6f1c…")),
                ("aggregatetype", Some("Order")),
                ("payload", None)
            ]
        );
    }

    #[test]
    fn width_mismatch_and_toast_are_errors() {
        let rel = match decode(&relation_msg(1, "public", "t", &["a", "b"])).unwrap() {
            PgOutputMessage::Relation(r) => r,
            _ => panic!(),
        };
        assert!(rel.named_values(&[TupleValue::Null]).is_err());
        assert!(
            rel.named_values(&[TupleValue::Null, TupleValue::UnchangedToast])
                .is_err()
        );
    }

    #[test]
    fn update_delete_truncate_are_recognised() {
        let u = Buf::tag(b'U')
            .i32(9)
            .u8(b'K')
            .i16(1)
            .text("k")
            .u8(b'N')
            .i16(2)
            .text("a")
            .u8(b'u')
            .0;
        assert_eq!(
            decode(&u).unwrap(),
            PgOutputMessage::Update { relation_id: 9 }
        );
        let u2 = Buf::tag(b'U').i32(9).u8(b'N').i16(1).u8(b'n').0;
        assert_eq!(
            decode(&u2).unwrap(),
            PgOutputMessage::Update { relation_id: 9 }
        );
        let d = Buf::tag(b'D').i32(9).u8(b'K').i16(1).text("k").0;
        assert_eq!(
            decode(&d).unwrap(),
            PgOutputMessage::Delete { relation_id: 9 }
        );
        let t = Buf::tag(b'T').i32(2).u8(0).i32(9).i32(10).0;
        assert_eq!(
            decode(&t).unwrap(),
            PgOutputMessage::Truncate {
                relation_ids: vec![9, 10]
            }
        );
    }

    #[test]
    fn logical_message() {
        let mut m = Buf::tag(b'M').u8(1).i64(500).cstr("outbox").i32(3);
        m.0.extend_from_slice(b"{}x");
        assert_eq!(
            decode(&m.0).unwrap(),
            PgOutputMessage::Message {
                transactional: true,
                lsn: Lsn(500),
                prefix: "outbox".into(),
                content: b"{}x".to_vec()
            }
        );
    }

    #[test]
    fn origin_and_type_are_skipped() {
        assert_eq!(
            decode(&Buf::tag(b'O').i64(1).cstr("o").0).unwrap(),
            PgOutputMessage::Origin
        );
        assert_eq!(
            decode(&Buf::tag(b'Y').i32(1).cstr("s").cstr("t").0).unwrap(),
            PgOutputMessage::Type
        );
    }

    #[test]
    fn every_truncation_of_valid_messages_is_an_error_not_a_panic() {
        let mut m = Buf::tag(b'M').u8(0).i64(500).cstr("p").i32(2);
        m.0.extend_from_slice(b"ab");
        let samples = vec![
            Buf::tag(b'B').i64(1).i64(2).i32(3).0,
            Buf::tag(b'C').u8(0).i64(1).i64(2).i64(3).0,
            relation_msg(1, "public", "outbox", &["id", "payload"]),
            Buf::tag(b'I').i32(1).u8(b'N').i16(2).text("x").u8(b'n').0,
            Buf::tag(b'D').i32(1).u8(b'K').i16(1).text("k").0,
            m.0,
        ];
        for s in samples {
            assert!(decode(&s).is_ok());
            for cut in 0..s.len() {
                assert!(decode(&s[..cut]).is_err(), "prefix of len {cut} of {s:?}");
            }
        }
    }

    #[test]
    fn hostile_lengths_and_tags() {
        // negative text length
        let i = Buf::tag(b'I').i32(1).u8(b'N').i16(1).u8(b't').i32(-5).0;
        assert!(decode(&i).is_err());
        // huge text length
        let i = Buf::tag(b'I')
            .i32(1)
            .u8(b'N')
            .i16(1)
            .u8(b't')
            .i32(i32::MAX)
            .0;
        assert!(decode(&i).is_err());
        // unknown value kind
        let i = Buf::tag(b'I').i32(1).u8(b'N').i16(1).u8(b'z').0;
        assert!(decode(&i).is_err());
        // invalid utf-8 text
        let mut i = Buf::tag(b'I').i32(1).u8(b'N').i16(1).u8(b't').i32(2);
        i.0.extend_from_slice(&[0xff, 0xfe]);
        assert!(decode(&i.0).is_err());
        // streaming tags are not protocol v1
        assert!(decode(&[b'S', 0, 0, 0, 1, 0]).is_err());
        assert!(decode(&[]).is_err());
        // negative truncate count
        assert!(decode(&Buf::tag(b'T').i32(-1).u8(0).0).is_err());
    }

    #[test]
    fn lsn_text_roundtrip() {
        let l = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!(Lsn::parse("nope").is_none());
    }
}
