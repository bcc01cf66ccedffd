//! The Confluent wire format of a schema'd record value: magic byte `0`, the schema id as a
//! 4-byte big-endian integer, then the encoded body (Avro binary, or JSON text for JSON Schema).
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

#[cfg(test)]
mod tests {
    use super::*;

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
