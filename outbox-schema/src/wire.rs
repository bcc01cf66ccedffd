//! The Confluent wire format of a schema'd record value: magic byte `0`, the schema id as a
//! 4-byte big-endian integer, then the encoded body (Avro binary, JSON text for JSON Schema, or
//! for Protobuf the message-index array ([`encode_message_indexes`]) and the message's binary).
//!
//! Consumers decode with [`decode`]: it returns the schema id (look the schema up with
//! [`crate::RegistryClient::schema_by_id`]) and the body.

/// The first byte of every value in the Confluent wire format.
pub const MAGIC_BYTE: u8 = 0;

/// Length of the header: the magic byte and the 4-byte schema id.
pub const HEADER_LEN: usize = 5;

/// A value that is not in the Confluent wire format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer than [`HEADER_LEN`] bytes.
    #[error("value of {0} bytes is shorter than the 5-byte Confluent header")]
    TooShort(usize),
    /// The first byte is not [`MAGIC_BYTE`].
    #[error("value starts with byte {0}, not the Confluent magic byte 0")]
    BadMagic(u8),
    /// A Protobuf body whose message-index array is cut short or malformed.
    #[error("malformed Protobuf message-index array: {0}")]
    BadMessageIndexes(&'static str),
}

/// The 5-byte header for `schema_id`.
///
/// Guarantee: `header(id)[0] == MAGIC_BYTE` and `header(id)[1..5] == id.to_be_bytes()`.
pub fn header(schema_id: u32) -> [u8; HEADER_LEN] {
    let id = schema_id.to_be_bytes();
    [MAGIC_BYTE, id[0], id[1], id[2], id[3]]
}

/// The header for `schema_id` followed by `body`, in one allocation.
///
/// Guarantee: [`decode`] of the result returns `(schema_id, body)`.
pub fn encode(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&header(schema_id));
    out.extend_from_slice(body);
    out
}

/// Splits a wire-format value into its schema id and body.
///
/// Guarantee: fails, without panicking, on any value shorter than the header or not starting
/// with [`MAGIC_BYTE`]; the body may be empty.
pub fn decode(value: &[u8]) -> Result<(u32, &[u8]), WireError> {
    if value.len() < HEADER_LEN {
        return Err(WireError::TooShort(value.len()));
    }
    if value[0] != MAGIC_BYTE {
        return Err(WireError::BadMagic(value[0]));
    }
    let id = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
    Ok((id, &value[HEADER_LEN..]))
}

/// Appends a zig-zag varint (the encoding of Avro `int`/`long` and of Confluent's Protobuf
/// message indexes).
fn put_zigzag(n: i32, out: &mut Vec<u8>) {
    let mut v = ((n << 1) ^ (n >> 31)) as u32;
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a zig-zag varint of at most 32 bits from the front of `bytes`.
fn take_zigzag(bytes: &mut &[u8]) -> Result<i32, WireError> {
    let mut v: u32 = 0;
    for shift in (0..35).step_by(7) {
        let (&b, rest) = bytes
            .split_first()
            .ok_or(WireError::BadMessageIndexes("cut short"))?;
        *bytes = rest;
        if shift == 28 && b > 0x0f {
            return Err(WireError::BadMessageIndexes("varint over 32 bits"));
        }
        v |= u32::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(((v >> 1) as i32) ^ -((v & 1) as i32));
        }
    }
    Err(WireError::BadMessageIndexes("varint over 32 bits"))
}

/// Appends the Confluent message-index array of a Protobuf value: which message of the schema's
/// file the value is, as its index path (`[i]` for the i-th top-level message, `[i, j]` for the
/// j-th message nested in it, …). Written as the count then each index, all zig-zag varints; the
/// first message (`[0]`) is the single byte `0` (a count of 0), as Confluent writes it.
///
/// Guarantee: [`decode_message_indexes`] reads back `indexes` (an empty slice reads back as
/// `[0]`).
pub fn encode_message_indexes(indexes: &[i32], out: &mut Vec<u8>) {
    if indexes == [0] || indexes.is_empty() {
        out.push(0);
        return;
    }
    put_zigzag(
        i32::try_from(indexes.len()).expect("nesting depth fits in i32"),
        out,
    );
    for &i in indexes {
        put_zigzag(i, out);
    }
}

/// Splits a Protobuf value body into its message-index array and the message's bytes.
///
/// Guarantee: fails, without panicking, on a cut-short or over-long array or a negative count;
/// a count of 0 gives `[0]`.
pub fn decode_message_indexes(body: &[u8]) -> Result<(Vec<i32>, &[u8]), WireError> {
    let mut rest = body;
    let count = take_zigzag(&mut rest)?;
    if count == 0 {
        return Ok((vec![0], rest));
    }
    let count =
        usize::try_from(count).map_err(|_| WireError::BadMessageIndexes("negative count"))?;
    if count > rest.len() {
        return Err(WireError::BadMessageIndexes("count exceeds the body"));
    }
    let mut indexes = Vec::with_capacity(count);
    for _ in 0..count {
        indexes.push(take_zigzag(&mut rest)?);
    }
    Ok((indexes, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_indexes_round_trip_in_confluent_form() {
        let cases: [(&[i32], &[u8]); 5] = [
            (&[0], &[0]),
            (&[1], &[2, 2]),
            (&[0, 2], &[4, 0, 4]),
            (&[1, 0, 3], &[6, 2, 0, 6]),
            // 64 zig-zags to 128: two varint bytes.
            (&[64], &[2, 0x80, 0x01]),
        ];
        for (indexes, bytes) in cases {
            let mut out = Vec::new();
            encode_message_indexes(indexes, &mut out);
            assert_eq!(out, bytes, "{indexes:?}");
            out.extend_from_slice(b"msg");
            assert_eq!(
                decode_message_indexes(&out).unwrap(),
                (indexes.to_vec(), &b"msg"[..])
            );
        }
        for i in [i32::MAX, i32::MIN, -1, 300] {
            let mut out = Vec::new();
            encode_message_indexes(&[1, i], &mut out);
            assert_eq!(decode_message_indexes(&out).unwrap().0, vec![1, i]);
        }
        let bad: [&[u8]; 5] = [
            &[],
            &[4, 2],
            &[0x80],
            &[1],
            &[2, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ];
        for b in bad {
            assert!(
                matches!(
                    decode_message_indexes(b),
                    Err(WireError::BadMessageIndexes(_))
                ),
                "{b:?}"
            );
        }
    }

    #[test]
    fn header_round_trips() {
        let v = encode(0x0102_0304, b"body");
        assert_eq!(&v[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(decode(&v).unwrap(), (0x0102_0304, &b"body"[..]));
        assert_eq!(decode(&encode(7, b"")).unwrap(), (7, &b""[..]));
        assert_eq!(decode(&[0, 0, 0]), Err(WireError::TooShort(3)));
        assert_eq!(decode(b"{\"a\":1}"), Err(WireError::BadMagic(b'{')));
    }
}
