//! Many outbox tables in one relay: the `[[outbox]]` list, the `tables` pattern and the bound on
//! both (`max_tables`), and how each table's own configuration is derived from the relay's
//! ([`RelayConfig::table_config`]). The group runner ([`crate::RelayGroup`]) runs one pipeline per
//! derived configuration.
//!
//! Guarantees: every table name and pattern is validated as PostgreSQL identifiers before any
//! connection is made; every error names the key as written (`outbox[2].table`, `tables`,
//! `max_tables`); a derived configuration passes the same [`RelayConfig::validate`] as a
//! single-table relay's.

use std::collections::BTreeMap;
use std::time::Duration;

use outbox_core::{OutboxTable, WriteMode};

use super::{ConfigError, RelayConfig, SourceKind};
use crate::route::RouteSettings;

/// The default of `max_tables`: how many tables one relay may relay at once.
pub const DEFAULT_MAX_TABLES: usize = 256;

/// The largest `max_tables` accepted: every table holds a few database sessions
/// (see docs/operations.md), and its `table` label is one more series per metric.
pub const MAX_TABLES_LIMIT: usize = 4096;

/// One `[[outbox]]` section of `relay.toml`: a table and what it does differently from the
/// relay's top-level settings. A setting left out is the top-level one.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxEntry {
    /// The outbox table, `table` or `schema.table` (required).
    pub table: String,
    /// How services write this table's events (`table`, `insert_delete`, `logical_message`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_mode: Option<String>,
    /// This table's routing: an `[outbox.route]` section replaces the whole top-level `[route]`
    /// (its unset keys take the defaults, not the top-level values).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteSettings>,
    /// This table's shard count (see the top-level `shards`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<u32>,
    /// The topic this table's parked events are announced on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
}

/// A `tables` pattern: `<schema glob>.<table>`, e.g. `tenant_*.outbox` — every table named
/// `<table>` in a schema whose name matches the glob (`*` any run of characters, `?` one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePattern {
    schema_glob: String,
    table: outbox_core::Identifier,
}

impl TablePattern {
    /// Parses and validates a pattern; the error text says what is wrong (the caller names the
    /// key).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (schema, table) = text.split_once('.').ok_or_else(|| {
            format!("`{text}`: a pattern is `<schema glob>.<table>`, e.g. `tenant_*.outbox`")
        })?;
        let table = outbox_core::Identifier::parse("table name", table)
            .map_err(|e| format!("`{text}`: {e}"))?;
        let ok = !schema.is_empty()
            && schema.len() <= 63
            && schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '*' || c == '?')
            && !schema.starts_with(|c: char| c.is_ascii_digit());
        if !ok {
            return Err(format!(
                "`{text}`: the schema part is 1 to 63 characters of ASCII letters, digits, `_` \
                 and the wildcards `*` and `?`, not starting with a digit"
            ));
        }
        Ok(Self {
            schema_glob: schema.to_owned(),
            table,
        })
    }

    /// The table name every matching table has.
    pub fn table(&self) -> &outbox_core::Identifier {
        &self.table
    }

    /// The schema glob as a SQL `LIKE` pattern with `\` as the escape character (`_` and `%`
    /// escaped, `*` → `%`, `?` → `_`).
    pub fn schema_like(&self) -> String {
        let mut like = String::with_capacity(self.schema_glob.len() + 4);
        for c in self.schema_glob.chars() {
            match c {
                '*' => like.push('%'),
                '?' => like.push('_'),
                '_' | '%' | '\\' => {
                    like.push('\\');
                    like.push(c);
                }
                c => like.push(c),
            }
        }
        like
    }

    /// Whether `schema` matches the glob (the same test as [`Self::schema_like`] in SQL).
    pub fn matches_schema(&self, schema: &str) -> bool {
        fn glob(p: &[u8], s: &[u8]) -> bool {
            match (p.first(), s.first()) {
                (None, None) => true,
                (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
                (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
                (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
                _ => false,
            }
        }
        glob(self.schema_glob.as_bytes(), schema.as_bytes())
    }
}

impl std::fmt::Display for TablePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema_glob, self.table)
    }
}

/// Where a pipeline's table came from, for error keys and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableOrigin {
    /// The top-level `table` (single-table mode).
    Single,
    /// The `[[outbox]]` entry with this index.
    Listed(usize),
    /// A match of the `tables` pattern.
    Pattern,
}

impl TableOrigin {
    /// The configuration key of `setting` for a table of this origin (`outbox[2].table`).
    fn key(self, setting: &str, overridden: bool) -> String {
        match self {
            TableOrigin::Listed(i) if overridden => format!("outbox[{i}].{setting}"),
            TableOrigin::Pattern if setting == "table" => "tables".to_owned(),
            _ => setting.to_owned(),
        }
    }
}

impl RelayConfig {
    /// Whether this configuration relays several tables (`[[outbox]]` sections or a `tables`
    /// pattern) through [`crate::RelayGroup`] rather than the single top-level `table`.
    pub fn is_multi_table(&self) -> bool {
        !self.outbox.is_empty() || self.tables.is_some()
    }

    /// The parsed `tables` pattern, if one is set.
    pub fn table_pattern(&self) -> Result<Option<TablePattern>, ConfigError> {
        self.tables
            .as_deref()
            .map(|t| TablePattern::parse(t).map_err(|e| ConfigError::new("tables", e)))
            .transpose()
    }

    /// The configuration of one table's pipeline: the relay's settings with `table` and the
    /// overrides of `entry` applied, no further tables and no admin endpoint of its own (the
    /// group serves one). Validated like a single-table configuration; an error names the key as
    /// written for `origin` (`outbox[1].write_mode` when the entry set it, `write_mode` when it
    /// came from the top level).
    pub fn table_config(
        &self,
        entry: &OutboxEntry,
        origin: TableOrigin,
    ) -> Result<RelayConfig, ConfigError> {
        let mut derived = self.clone();
        derived.outbox = Vec::new();
        derived.tables = None;
        derived.admin_addr = None;
        derived.table = entry.table.clone();
        if entry.table.is_empty() {
            return Err(ConfigError::new(
                origin.key("table", true),
                "is required in every [[outbox]] section",
            ));
        }
        if let Some(mode) = &entry.write_mode {
            derived.write_mode = WriteMode::parse(mode).ok_or_else(|| {
                ConfigError::new(
                    origin.key("write_mode", true),
                    format!("unknown write mode `{mode}` (table, insert_delete, logical_message)"),
                )
            })?;
        }
        if let Some(route) = &entry.route {
            derived.route = route.clone();
        }
        if entry.shards.is_some() {
            derived.shards = entry.shards;
        }
        if entry.dead_letter_topic.is_some() {
            derived.dead_letter_topic = entry.dead_letter_topic.clone();
        }
        derived.validate().map_err(|e| {
            let setting = e.key.split('.').next().unwrap_or_default();
            let overridden = match setting {
                "table" => true,
                "write_mode" => entry.write_mode.is_some(),
                "route" => entry.route.is_some(),
                "shards" => entry.shards.is_some(),
                "dead_letter_topic" => entry.dead_letter_topic.is_some(),
                _ => false,
            };
            ConfigError::new(origin.key(&e.key, overridden), e.reason)
        })?;
        Ok(derived)
    }

    /// The configurations of the `[[outbox]]` tables, in order ([`Self::table_config`]).
    pub fn listed_tables(&self) -> Result<Vec<RelayConfig>, ConfigError> {
        self.outbox
            .iter()
            .enumerate()
            .map(|(i, e)| self.table_config(e, TableOrigin::Listed(i)))
            .collect()
    }

    /// The configuration of a table found by the `tables` pattern.
    pub fn pattern_table_config(&self, table: &OutboxTable) -> Result<RelayConfig, ConfigError> {
        let entry = OutboxEntry {
            table: table.to_string(),
            ..OutboxEntry::default()
        };
        self.table_config(&entry, TableOrigin::Pattern)
    }

    /// The multi-table checks of [`Self::validate`] (nothing to check in single-table mode).
    pub(super) fn validate_tables(&self) -> Result<(), ConfigError> {
        if self.max_tables == 0 || self.max_tables > MAX_TABLES_LIMIT {
            return Err(ConfigError::new(
                "max_tables",
                format!("must be between 1 and {MAX_TABLES_LIMIT}"),
            ));
        }
        if self.tables_rescan_interval < Duration::from_secs(1)
            || self.tables_rescan_interval > Duration::from_secs(24 * 3600)
        {
            return Err(ConfigError::new(
                "tables_rescan_interval",
                "must be between 1s and 24h",
            ));
        }
        if !self.is_multi_table() {
            return Ok(());
        }
        if self.source == SourceKind::Logical {
            // One slot carries every table's inserts; a logical message names no table.
            let message = |key: String| {
                ConfigError::new(
                    key,
                    "write_mode = \"logical_message\" cannot share the slot of a multi-table \
                     relay (a message names no table): use table or insert_delete, or relay \
                     that table with a relay of its own",
                )
            };
            for (i, e) in self.outbox.iter().enumerate() {
                if e.write_mode.as_deref() == Some("logical_message") {
                    return Err(message(format!("outbox[{i}].write_mode")));
                }
            }
            if self.write_mode == WriteMode::LogicalMessage {
                return Err(message("write_mode".to_owned()));
            }
        }
        if self.table != OutboxTable::DEFAULT_NAME {
            return Err(ConfigError::new(
                "table",
                "set either the top-level `table` or `[[outbox]]` sections / `tables`, not both \
                 (add the table as one more [[outbox]] section)",
            ));
        }
        if self.outbox.len() > self.max_tables {
            return Err(ConfigError::new(
                "max_tables",
                format!(
                    "{} [[outbox]] sections exceed max_tables = {} (it bounds the `table` label \
                     of every metric and the database sessions the relay holds): raise \
                     max_tables or split the tables over several relays",
                    self.outbox.len(),
                    self.max_tables
                ),
            ));
        }
        self.table_pattern()?;
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (i, derived) in self.listed_tables()?.iter().enumerate() {
            let table = OutboxTable::parse(&derived.table)
                .map_err(|e| ConfigError::new(format!("outbox[{i}].table"), e.to_string()))?;
            // Unqualified names are compared as in the default schema; the runner compares the
            // tables as PostgreSQL resolves them too.
            let name = match table.schema() {
                Some(s) => format!("{s}.{}", table.name()),
                None => format!("public.{}", table.name()),
            };
            if let Some(first) = seen.insert(name.clone(), i) {
                return Err(ConfigError::new(
                    format!("outbox[{i}].table"),
                    format!("`{}` is already listed as outbox[{first}]", derived.table),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(table: &str) -> OutboxEntry {
        OutboxEntry {
            table: table.into(),
            ..OutboxEntry::default()
        }
    }

    #[test]
    fn patterns_match_schemas_like_the_sql_does() {
        let p = TablePattern::parse("tenant_*.outbox").unwrap();
        assert_eq!(p.schema_like(), "tenant\\_%");
        assert!(p.matches_schema("tenant_a"));
        assert!(p.matches_schema("tenant_"));
        assert!(!p.matches_schema("tenantx"));
        assert!(!p.matches_schema("other_tenant_a"));
        let p = TablePattern::parse("t?.events").unwrap();
        assert_eq!(p.schema_like(), "t_");
        assert!(p.matches_schema("t1") && !p.matches_schema("t12"));
        for bad in [
            "tenant_*",
            "tenant_*.out-box",
            "ten;ant.outbox",
            ".outbox",
            "1x.outbox",
        ] {
            assert!(TablePattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_name_the_entry() {
        let mut c = RelayConfig::default();
        c.outbox = vec![entry("a"), entry("b"), entry("x; drop")];
        assert_eq!(c.validate().unwrap_err().key, "outbox[2].table");

        c.outbox = vec![entry("a"), entry("s.b"), entry("public.a")];
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "outbox[2].table");
        assert!(e.reason.contains("outbox[0]"), "{e}");

        c.outbox = vec![
            entry("a"),
            OutboxEntry {
                write_mode: Some("insert_delete".into()),
                ..entry("b")
            },
        ];
        assert_eq!(c.validate().unwrap_err().key, "outbox[1].write_mode");

        let mut route = RouteSettings::default();
        route.topic = "bad/{aggregatetype}".into();
        c.outbox = vec![OutboxEntry {
            route: Some(route),
            ..entry("a")
        }];
        assert_eq!(c.validate().unwrap_err().key, "outbox[0].route.topic");

        c.outbox = vec![OutboxEntry {
            dead_letter_topic: Some("bad topic".into()),
            ..entry("a")
        }];
        assert_eq!(c.validate().unwrap_err().key, "outbox[0].dead_letter_topic");

        c.outbox = vec![entry("")];
        assert_eq!(c.validate().unwrap_err().key, "outbox[0].table");

        c.outbox = (0..3).map(|i| entry(&format!("t{i}"))).collect();
        c.max_tables = 2;
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "max_tables");
        assert!(e.reason.contains("max_tables = 2"), "{e}");

        c.max_tables = 3;
        assert!(c.validate().is_ok());
        // The logical source relays several tables through one slot.
        c.source = SourceKind::Logical;
        assert!(c.validate().is_ok());
        c.outbox[1].write_mode = Some("logical_message".into());
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "outbox[1].write_mode");
        assert!(e.reason.contains("names no table"), "{e}");
        c.outbox[1].write_mode = None;
        c.write_mode = WriteMode::LogicalMessage;
        assert_eq!(c.validate().unwrap_err().key, "write_mode");
        c.write_mode = WriteMode::Table;
        c.source = SourceKind::Polling;

        let mut c = RelayConfig::default();
        c.tables = Some("tenant_*".into());
        assert_eq!(c.validate().unwrap_err().key, "tables");
        c.tables = Some("tenant_*.outbox".into());
        c.table = "other".into();
        assert_eq!(c.validate().unwrap_err().key, "table");
    }

    #[test]
    fn derived_configurations_take_the_overrides_and_nothing_else() {
        let mut c = RelayConfig::default();
        c.dead_letter_topic = Some("parked".into());
        c.admin_addr = Some("127.0.0.1:0".parse().unwrap());
        let mut route = RouteSettings::default();
        route.topic = "orders.{aggregatetype}".into();
        c.outbox = vec![
            entry("a"),
            OutboxEntry {
                route: Some(route.clone()),
                shards: Some(4),
                dead_letter_topic: Some("b.parked".into()),
                ..entry("s.b")
            },
        ];
        let derived = c.listed_tables().unwrap();
        assert_eq!(derived[0].table, "a");
        assert_eq!(derived[0].route, RouteSettings::default());
        assert_eq!(derived[0].dead_letter_topic.as_deref(), Some("parked"));
        assert_eq!(derived[1].table, "s.b");
        assert_eq!(derived[1].route, route);
        assert_eq!(derived[1].shards, Some(4));
        assert_eq!(derived[1].dead_letter_topic.as_deref(), Some("b.parked"));
        for d in &derived {
            assert!(d.outbox.is_empty() && d.tables.is_none() && d.admin_addr.is_none());
            assert!(!d.is_multi_table());
        }
    }
}
