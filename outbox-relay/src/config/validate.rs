//! [`RelayConfig::validate`]: every check that needs no connection, each error naming the
//! setting.

use std::time::Duration;

use outbox_core::{OutboxTable, WriteMode};

use super::{ConfigError, RelayConfig, SourceKind, is_secret_key, redact_url};

impl RelayConfig {
    /// Checks every setting that can be checked without connecting; returns the parsed table.
    pub fn validate(&self) -> Result<OutboxTable, ConfigError> {
        let table = OutboxTable::parse(&self.table)
            .map_err(|e| ConfigError::new("table", e.to_string()))?;
        if !self.database_url.expose().starts_with("postgres://")
            && !self.database_url.expose().starts_with("postgresql://")
        {
            return Err(ConfigError::new(
                "database_url",
                format!(
                    "`{}` is not a postgres:// URL",
                    redact_url(self.database_url.expose())
                ),
            ));
        }
        validate_database_url(self.database_url.expose())?;
        if self.batch_size == 0 || self.batch_size > 100_000 {
            return Err(ConfigError::new(
                "batch_size",
                "must be between 1 and 100000",
            ));
        }
        if self.pool_size == 0 || self.pool_size > 1000 {
            return Err(ConfigError::new(
                "pool_size",
                "must be between 1 and 1000 (sessions shared by every table's acknowledgements)",
            ));
        }
        if self.max_in_flight_batches == 0 || self.max_in_flight_batches > 64 {
            return Err(ConfigError::new(
                "max_in_flight_batches",
                "must be between 1 and 64",
            ));
        }
        if self.max_in_flight_bytes < 1024 {
            return Err(ConfigError::new(
                "max_in_flight_bytes",
                "must be at least 1024 (bytes of event payload in flight)",
            ));
        }
        if self.leader_lease < Duration::from_secs(1)
            || self.leader_lease > Duration::from_secs(3600)
        {
            return Err(ConfigError::new(
                "leader_lease",
                "must be between 1s and 1h",
            ));
        }
        if let Some(shards) = self.shards {
            if shards == 0 || shards > crate::shard::MAX_SHARDS {
                return Err(ConfigError::new(
                    "shards",
                    format!(
                        "{shards}: must be between 1 and {} (leave it unset for a single active relay)",
                        crate::shard::MAX_SHARDS
                    ),
                ));
            }
            if self.source == SourceKind::Logical {
                return Err(ConfigError::new(
                    "shards",
                    "is not supported with source = \"logical\" (one replication slot streams the whole table to one reader, which keeps up with the slot; see \"Sharding and the logical source\" in docs/operations.md): unset it, or use source = \"polling\"",
                ));
            }
        }
        if self.source == SourceKind::Polling && self.write_mode != WriteMode::Table {
            return Err(ConfigError::new(
                "write_mode",
                format!(
                    "`{}` leaves nothing in the table to poll: use source = \"logical\"",
                    self.write_mode
                ),
            ));
        }
        self.router()?;
        if let Some(topic) = &self.dead_letter_topic {
            outbox_core::validate_topic(topic)
                .map_err(|reason| ConfigError::new("dead_letter_topic", reason))?;
        }
        self.kafka
            .check()
            .map_err(|e| ConfigError::new("kafka", e.to_string()))?;
        self.redis.validate()?;
        if self.sink == super::SinkKind::Rabbitmq {
            self.rabbitmq.validate()?;
        }
        let slot_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !slot_ok(&self.logical.slot) {
            return Err(ConfigError::new(
                "logical.slot",
                format!(
                    "`{}`: slot names are 1 to 63 characters of a-z, 0-9 and _",
                    self.logical.slot
                ),
            ));
        }
        if !slot_ok(&self.logical.publication)
            || self
                .logical
                .publication
                .starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(ConfigError::new(
                "logical.publication",
                format!(
                    "`{}`: publication names are 1 to 63 characters of a-z, 0-9 and _, not starting with a digit",
                    self.logical.publication
                ),
            ));
        }
        outbox_core::Identifier::parse("message prefix", &self.logical.message_prefix)
            .map_err(|e| ConfigError::new("logical.message_prefix", e.to_string()))?;
        self.telemetry.validate()?;
        self.nats.validate()?;
        self.validate_tables()?;
        if let Some(token) = &self.admin.token
            && token.expose().trim().len() < 16
        {
            return Err(ConfigError::new(
                "admin.token",
                "must be at least 16 characters (e.g. `openssl rand -hex 32`)",
            ));
        }
        if self.admin.metrics_auth && self.admin.token.is_none() {
            return Err(ConfigError::new(
                "admin.metrics_auth",
                "needs admin.token (OUTBOX_ADMIN__TOKEN or OUTBOX_ADMIN__TOKEN_FILE)",
            ));
        }
        if self.admin.status_refresh < Duration::from_millis(100)
            || self.admin.status_refresh > Duration::from_secs(3600)
        {
            return Err(ConfigError::new(
                "admin.status_refresh",
                "must be between 100ms and 1h",
            ));
        }
        Ok(table)
    }
}

/// The checks on `database_url` that make the SQL pool and the replication connection equally
/// protected: TLS modes and parameters that one of them could not honour are refused here,
/// naming the fix, instead of silently weakening one connection.
fn validate_database_url(url: &str) -> Result<(), ConfigError> {
    use sqlx::ConnectOptions;
    let err = |reason: String| ConfigError::new("database_url", reason);
    // A URL the url crate cannot parse is refused by sqlx below (it parses the same way).
    if let Ok(parsed) = url::Url::parse(url) {
        for (key, _) in parsed.query_pairs() {
            // sqlx would log an unknown parameter with its value: refuse secrets it ignores.
            if is_secret_key(&key) && key != "password" {
                return Err(err(format!(
                    "URL parameter `{key}` is not supported (an encrypted client key cannot be \
                     used): give `sslkey` an unencrypted key file readable only by the relay"
                )));
            }
        }
    }
    let opts: sqlx::postgres::PgConnectOptions = url
        .parse()
        .map_err(|e| err(format!("`{}`: {e}", redact_url(url))))?;
    if matches!(opts.get_ssl_mode(), sqlx::postgres::PgSslMode::Allow) {
        return Err(err(
            "`sslmode=allow` is not supported (sqlx never upgrades it to TLS, libpq would): \
             use `disable`, `prefer`, `require`, `verify-ca` or `verify-full`"
                .into(),
        ));
    }
    let resolved = opts.to_url_lossy();
    let has = |name: &str| resolved.query_pairs().any(|(k, _)| k == name);
    if has("sslcert") != has("sslkey") {
        return Err(err(
            "`sslcert` and `sslkey` go together (a client certificate needs its key; sqlx would \
             silently send none): set both or neither"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn validation_names_the_setting() {
        let mut c = RelayConfig::default();
        c.table = "x; drop table y".into();
        assert_eq!(c.validate().unwrap_err().key, "table");
        let mut c = RelayConfig::default();
        c.write_mode = WriteMode::InsertDelete;
        assert_eq!(c.validate().unwrap_err().key, "write_mode");
        let mut c = RelayConfig::default();
        c.route.topic = "bad/{aggregatetype}".into();
        assert_eq!(c.validate().unwrap_err().key, "route.topic");
        let mut c = RelayConfig::default();
        c.kafka
            .properties
            .insert("enable.idempotence".into(), "false".into());
        assert_eq!(c.validate().unwrap_err().key, "kafka");
        // The relay times deliveries out itself, for the whole produce queue at once.
        for key in ["delivery.timeout.ms", "message.timeout.ms"] {
            let mut c = RelayConfig::default();
            c.kafka.properties.insert(key.into(), "5000".into());
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, "kafka", "{key}");
            assert!(e.to_string().contains("kafka.delivery_timeout"), "{e}");
        }
        let mut c = RelayConfig::default();
        c.logical.slot = "Bad-Slot".into();
        assert_eq!(c.validate().unwrap_err().key, "logical.slot");
        for url in [
            "postgres://u@h/d?sslmode=allow",
            "postgres://u@h/d?sslmode=require&sslcert=/c.pem",
            "postgres://u@h/d?sslmode=require&sslpassword=k3y",
        ] {
            let c = RelayConfig {
                database_url: Secret::new(url),
                ..Default::default()
            };
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, "database_url", "{url}");
            assert!(!e.to_string().contains("k3y"), "{e}");
        }
        let mut c = RelayConfig::default();
        c.leader_lease = Duration::from_millis(500);
        assert_eq!(c.validate().unwrap_err().key, "leader_lease");
        for shards in [0, 1025, u32::MAX] {
            let mut c = RelayConfig::default();
            c.shards = Some(shards);
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, "shards", "{shards}");
            assert!(e.reason.contains("between 1 and 1024"), "{e}");
        }
        let mut c = RelayConfig::default();
        c.shards = Some(16);
        c.source = SourceKind::Logical;
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "shards");
        assert!(e.reason.contains("logical"), "{e}");
        for shards in [1, 16, 1024] {
            let mut c = RelayConfig::default();
            c.shards = Some(shards);
            assert!(c.validate().is_ok(), "{shards}");
        }
        assert!(RelayConfig::default().validate().is_ok());
    }
}
