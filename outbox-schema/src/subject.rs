//! Subject name strategies: under which registry subject a topic's value schema is registered.
//! The names and rules are those of Confluent's serializers (`TopicNameStrategy`,
//! `RecordNameStrategy`, `TopicRecordNameStrategy`), so consumers configured with the same
//! strategy find the schemas.

/// How the subject of a value schema is named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectStrategy {
    /// `<topic>-value` (Confluent's default): one schema lineage per topic.
    #[default]
    Topic,
    /// The record name (Avro: the record's full name; JSON Schema: its `title`), whatever the
    /// topic: one lineage per record type across topics.
    Record,
    /// `<topic>-<record name>`: one lineage per record type per topic.
    TopicRecord,
}

impl SubjectStrategy {
    /// The subject for a value published to `topic` with a schema whose record name is `record`.
    ///
    /// Guarantee: `Topic` never needs the record name; `Record` and `TopicRecord` return `None`
    /// when `record` is `None` (a schema without a name).
    pub fn subject(self, topic: &str, record: Option<&str>) -> Option<String> {
        match self {
            SubjectStrategy::Topic => Some(format!("{topic}-value")),
            SubjectStrategy::Record => record.map(str::to_owned),
            SubjectStrategy::TopicRecord => record.map(|r| format!("{topic}-{r}")),
        }
    }

    /// Whether the subject depends on the topic.
    pub fn uses_topic(self) -> bool {
        !matches!(self, SubjectStrategy::Record)
    }

    /// The name used in settings (`topic`, `record`, `topic_record`).
    pub fn name(self) -> &'static str {
        match self {
            SubjectStrategy::Topic => "topic",
            SubjectStrategy::Record => "record",
            SubjectStrategy::TopicRecord => "topic_record",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        let t = "accounts";
        assert_eq!(
            SubjectStrategy::Topic.subject(t, None).as_deref(),
            Some("accounts-value")
        );
        assert_eq!(
            SubjectStrategy::Record
                .subject(t, Some("com.example.Opened"))
                .as_deref(),
            Some("com.example.Opened")
        );
        assert_eq!(
            SubjectStrategy::TopicRecord
                .subject(t, Some("com.example.Opened"))
                .as_deref(),
            Some("accounts-com.example.Opened")
        );
        assert_eq!(SubjectStrategy::Record.subject(t, None), None);
    }
}
