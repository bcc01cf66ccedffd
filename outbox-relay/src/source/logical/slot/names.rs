//! Validated replication slot and publication names, safe to embed in replication commands and
//! SQL.

use std::fmt;

/// A validated replication slot name.
///
/// Guarantee: matches `[a-z0-9_]{1,63}`, the rule PostgreSQL itself enforces for slot names, so it
/// can be embedded in replication commands (`START_REPLICATION SLOT name …`) without quoting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SlotName(String);

/// A validated publication name.
///
/// Guarantee: matches `[a-z_][a-z0-9_]{0,62}`; it is always written double-quoted in SQL and is
/// safe inside the `publication_names '…'` option of `START_REPLICATION`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PublicationName(String);

/// A configured slot or publication name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct NameError {
    /// Which setting.
    pub what: &'static str,
    /// The rejected value.
    pub value: String,
    /// Why.
    pub reason: &'static str,
}

fn check_name(what: &'static str, value: &str, first_digit_ok: bool) -> Result<(), NameError> {
    let err = |reason| NameError {
        what,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(err("must not be empty"));
    }
    if value.len() > 63 {
        return Err(err("longer than 63 bytes"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(err(
            "only lower-case ASCII letters, digits and `_` are allowed",
        ));
    }
    if !first_digit_ok && value.as_bytes()[0].is_ascii_digit() {
        return Err(err("must not start with a digit"));
    }
    Ok(())
}

impl SlotName {
    /// Validate a slot name.
    pub fn parse(value: &str) -> Result<Self, NameError> {
        check_name("replication slot name", value, true)?;
        Ok(Self(value.to_owned()))
    }

    /// The bare name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SlotName {
    /// `outbox_relay`, as in the configuration file (`logical.slot`).
    fn default() -> Self {
        Self("outbox_relay".to_owned())
    }
}

impl Default for PublicationName {
    /// `outbox_relay`, as in the configuration file (`logical.publication`).
    fn default() -> Self {
        Self("outbox_relay".to_owned())
    }
}

impl PublicationName {
    /// Validate a publication name.
    pub fn parse(value: &str) -> Result<Self, NameError> {
        check_name("publication name", value, false)?;
        Ok(Self(value.to_owned()))
    }

    /// The bare name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for SlotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for PublicationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_follow_postgres_rules() {
        for ok in ["outbox", "outbox_slot_1", "1slot", &"a".repeat(63)] {
            assert!(SlotName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Outbox",
            "out-box",
            "a b",
            "x'; DROP",
            "é",
            &"a".repeat(64),
        ] {
            assert!(SlotName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn publication_names_are_quoted_and_strict() {
        assert_eq!(
            PublicationName::parse("outbox_pub").unwrap().quoted(),
            "\"outbox_pub\""
        );
        for bad in ["", "1pub", "Pub", "p\"ub", "p,ub", "p'ub", &"p".repeat(64)] {
            assert!(PublicationName::parse(bad).is_err(), "{bad}");
        }
    }
}
