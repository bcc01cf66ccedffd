//! Kafka topic name rules, checked at compile time for `topic = "..."`.

/// The longest topic name Kafka accepts.
const MAX_LEN: usize = 249;

/// Checks `name` against Kafka's topic naming rules: 1 to 249 characters out of
/// `[A-Za-z0-9._-]`, and neither `.` nor `..`.
///
/// Returns a message that names the problem (and the offending character, if any).
pub(crate) fn check(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("Kafka topic name must not be empty".to_owned());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "invalid Kafka topic name `{name}`: character {bad:?} is not allowed; use only ASCII \
             letters, digits, `.`, `_` and `-`"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!(
            "invalid Kafka topic name `{name}`: `.` and `..` are reserved"
        ));
    }
    let len = name.len();
    if len > MAX_LEN {
        return Err(format!(
            "invalid Kafka topic name: {len} characters long, Kafka allows at most {MAX_LEN}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn accepts_legal_names() {
        for name in ["accounts.v1", "a", "A-b_c.9", &"x".repeat(249)] {
            assert_eq!(check(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn rejects_illegal_names() {
        assert!(check("").unwrap_err().contains("empty"));
        assert!(check(".").unwrap_err().contains("reserved"));
        assert!(check("..").unwrap_err().contains("reserved"));
        assert!(check("...").is_ok());
        assert!(check("orders v1").unwrap_err().contains("character ' '"));
        assert!(check("orders/v1").unwrap_err().contains("character '/'"));
        assert!(check("café").unwrap_err().contains("character 'é'"));
        assert!(
            check(&"x".repeat(250))
                .unwrap_err()
                .contains("250 characters")
        );
    }
}
