//! The bounds-checked reading of `pgoutput` messages: [`decode`] turns one message into a
//! [`PgOutputMessage`].
//!
//! Guarantee: every read checks the bytes left, so a malformed or truncated buffer yields a
//! [`DecodeError`], never a panic.

use super::{DecodeError, Lsn, PgOutputMessage, Relation, RelationColumn, TupleValue};

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
