//! Validated, quoted names of the outbox table and the objects around it.

use std::fmt;

use crate::error::IdentifierError;

/// A PostgreSQL identifier that has been validated and is always emitted quoted.
///
/// Guarantee: only `[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes, is accepted, and the value is
/// always written as a double-quoted identifier, so a configured name can never inject SQL. Quoting
/// makes names case-sensitive: `Outbox` and `outbox` are different tables.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identifier(String);

impl Identifier {
    /// Validates `value` as an identifier; `what` names the setting in the error message.
    pub fn parse(what: &'static str, value: &str) -> Result<Self, IdentifierError> {
        let err = |reason| IdentifierError {
            what,
            value: value.to_owned(),
            reason,
        };
        let mut chars = value.chars();
        match chars.next() {
            None => return Err(err("must not be empty")),
            Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
                return Err(err("must start with a letter or `_`"));
            }
            _ => {}
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(err("only ASCII letters, digits and `_` are allowed"));
        }
        if value.len() > 63 {
            return Err(err("longer than PostgreSQL's 63-byte identifier limit"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The bare name, e.g. for `pg_class.relname` comparisons.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the outbox lives: an optional schema and a table name (default `outbox` in the
/// connection's default schema, Debezium's layout).
///
/// Guarantee: every SQL statement this project builds for the table takes the names from here,
/// validated and quoted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutboxTable {
    schema: Option<Identifier>,
    name: Identifier,
}

impl Default for OutboxTable {
    fn default() -> Self {
        Self {
            schema: None,
            name: Identifier("outbox".to_owned()),
        }
    }
}

impl OutboxTable {
    /// The default table name.
    pub const DEFAULT_NAME: &'static str = "outbox";

    /// A table `name` in `schema` (or in the connection's default schema when `None`).
    pub fn new(schema: Option<&str>, name: &str) -> Result<Self, IdentifierError> {
        Ok(Self {
            schema: schema
                .map(|s| Identifier::parse("schema name", s))
                .transpose()?,
            name: Identifier::parse("table name", name)?,
        })
    }

    /// Parses `table` or `schema.table`.
    pub fn parse(qualified: &str) -> Result<Self, IdentifierError> {
        match qualified.split_once('.') {
            Some((schema, name)) => Self::new(Some(schema), name),
            None => Self::new(None, qualified),
        }
    }

    /// The schema, if one was configured.
    pub fn schema(&self) -> Option<&Identifier> {
        self.schema.as_ref()
    }

    /// The table name.
    pub fn name(&self) -> &Identifier {
        &self.name
    }

    /// The quoted, possibly schema-qualified name for SQL.
    pub fn qualified(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", s.quoted(), self.name.quoted()),
            None => self.name.quoted(),
        }
    }

    /// A quoted name for an object derived from the table's name (index, trigger, function…),
    /// in the table's schema. Names are shortened to fit the 63-byte limit.
    pub(crate) fn derived(&self, suffix: &str) -> String {
        let base = format!("{}_{}", self.name.as_str(), suffix);
        let base = if base.len() > 63 {
            // Keep it deterministic and unique enough: truncate the table part.
            let keep = 63 - suffix.len() - 1;
            format!("{}_{}", &self.name.as_str()[..keep], suffix)
        } else {
            base
        };
        match &self.schema {
            Some(s) => format!("{}.\"{}\"", s.quoted(), base),
            None => format!("\"{base}\""),
        }
    }

    /// The unqualified derived name, quoted (for `CREATE INDEX name ON …`).
    pub(crate) fn derived_unqualified(&self, suffix: &str) -> String {
        let full = self.derived(suffix);
        match full.rsplit_once('.') {
            Some((_, n)) => n.to_owned(),
            None => full,
        }
    }

    /// The quoted name of the table holding parked (poison) events: `<table>_parked`, in the
    /// same schema.
    pub fn parked_qualified(&self) -> String {
        self.derived("parked")
    }

    /// The LISTEN/NOTIFY channel the insert trigger notifies and the polling relay listens on:
    /// `outbox_<schema>_<table>`, cut to PostgreSQL's 63-byte identifier limit. Call it on a
    /// [resolved](Self::resolve) table: the trigger (migration 5) names the channel after the
    /// schema the table really is in, whatever spelling configured it.
    pub fn notify_channel(&self) -> String {
        let mut channel = match &self.schema {
            Some(s) => format!("outbox_{}_{}", s.as_str(), self.name.as_str()),
            None => format!("outbox_{}", self.name.as_str()),
        };
        // Identifiers are ASCII (validated), so bytes are characters.
        channel.truncate(63);
        channel
    }

    /// The same table with its schema spelled out as PostgreSQL resolves it on `conn` (through
    /// the `search_path` when none was configured).
    ///
    /// Guarantee: every spelling of one table (`outbox`, `public.outbox`) resolves to the same
    /// value, so the names derived from it — the relay's leader lock key, the NOTIFY channel —
    /// agree between processes configured differently. A table that does not exist (yet, or in
    /// `logical_message` mode) resolves into the schema `CREATE TABLE` would put it in
    /// (`current_schema()`); with no usable schema the table is returned as it is.
    pub async fn resolve(&self, conn: &mut sqlx::PgConnection) -> Result<Self, sqlx::Error> {
        if self.schema.is_some() {
            return Ok(self.clone());
        }
        let schema: Option<String> = sqlx::query_scalar(
            "SELECT coalesce(
                 (SELECT n.nspname::text FROM pg_class c
                  JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = to_regclass($1)),
                 current_schema()::text)",
        )
        .bind(self.qualified())
        .fetch_one(conn)
        .await?;
        Ok(match schema.map(|s| Identifier::parse("schema name", &s)) {
            Some(Ok(schema)) => Self {
                schema: Some(schema),
                name: self.name.clone(),
            },
            _ => self.clone(),
        })
    }

    /// A 64-bit key for `pg_advisory_lock`, stable across processes, derived from the name.
    pub fn lock_key(&self, purpose: &str) -> i64 {
        // FNV-1a: stable, dependency-free, good enough to separate a handful of tables.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in purpose
            .bytes()
            .chain([0])
            .chain(
                self.schema
                    .as_ref()
                    .map(|s| s.as_str())
                    .unwrap_or("")
                    .bytes(),
            )
            .chain([0])
            .chain(self.name.as_str().bytes())
        {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash as i64
    }
}

impl fmt::Display for OutboxTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names_and_quotes_them() {
        let t = OutboxTable::new(Some("billing"), "outbox_events").unwrap();
        assert_eq!(t.qualified(), "\"billing\".\"outbox_events\"");
        assert_eq!(OutboxTable::default().qualified(), "\"outbox\"");
        assert_eq!(
            OutboxTable::parse("a.b").unwrap().qualified(),
            "\"a\".\"b\""
        );
    }

    #[test]
    fn rejects_injection_and_bad_names() {
        for bad in [
            "",
            "outbox; drop table x",
            "out\"box",
            "1abc",
            "a-b",
            "é",
            &"x".repeat(64),
        ] {
            let e = OutboxTable::new(None, bad).unwrap_err();
            assert_eq!(e.what, "table name", "{bad}");
        }
        assert!(OutboxTable::parse("a.b.c").is_err());
    }

    #[test]
    fn notify_channels_fit_the_identifier_limit() {
        let t = OutboxTable::new(Some("public"), "outbox").unwrap();
        assert_eq!(t.notify_channel(), "outbox_public_outbox");
        let long = OutboxTable::new(Some(&"s".repeat(63)), &"t".repeat(63)).unwrap();
        assert_eq!(long.notify_channel().len(), 63);
    }

    #[test]
    fn lock_keys_differ_per_table_and_purpose() {
        let a = OutboxTable::new(None, "a").unwrap();
        let b = OutboxTable::new(None, "b").unwrap();
        assert_ne!(a.lock_key("relay"), b.lock_key("relay"));
        assert_ne!(a.lock_key("relay"), a.lock_key("migrate"));
        assert_eq!(a.lock_key("relay"), a.lock_key("relay"));
    }
}
