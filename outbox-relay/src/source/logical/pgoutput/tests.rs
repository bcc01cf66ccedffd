//! Unit tests of the `pgoutput` decoder over hand-made buffers, and the buffer builder the
//! logical source's tests use.

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
