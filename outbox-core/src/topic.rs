//! Kafka topic-name rules, shared by the write path and the relay's router.

/// The longest topic name Kafka accepts.
pub const MAX_TOPIC_LEN: usize = 249;

/// Checks a concrete topic name against Kafka's rules: 1 to 249 characters of ASCII letters,
/// digits, `.`, `_` and `-`, and not `.` or `..`.
///
/// Returns the reason when the name is not legal, naming the first offending character.
pub fn validate_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("a topic name must not be empty".to_owned());
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(format!(
            "a topic name is at most {MAX_TOPIC_LEN} characters, this one has {}",
            topic.len()
        ));
    }
    if topic == "." || topic == ".." {
        return Err("`.` and `..` are not legal topic names".to_owned());
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "character {c:?} is not allowed (only ASCII letters, digits, `.`, `_` and `-`)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_topic;

    #[test]
    fn topic_rules() {
        assert!(validate_topic("outbox.event.account").is_ok());
        assert!(validate_topic("a-b_c.D9").is_ok());
        assert!(validate_topic(&"x".repeat(249)).is_ok());
        assert!(validate_topic(&"x".repeat(250)).is_err());
        assert!(validate_topic("").is_err());
        assert!(validate_topic("..").is_err());
        let e = validate_topic("orders/eu").unwrap_err();
        assert!(e.contains("'/'"), "{e}");
        assert!(validate_topic("a b").is_err());
    }
}
