//! The `[redis]` settings: where the Redis Streams sink connects, how long its duplicate window
//! is, and what it waits for before it reports a record delivered ([`crate::sink::redis`]).
//!
//! Every setting is also an environment variable (`OUTBOX_REDIS__URL`, `OUTBOX_REDIS__DEDUPE_TTL`,
//! …; `OUTBOX_REDIS_URL` is a short alias for the URL, and `OUTBOX_REDIS__URL_FILE` reads it
//! from a file).

use std::path::PathBuf;
use std::time::Duration;

use super::{ConfigError, Secret, redact_url};

/// The Redis Streams sink's settings. `Debug` shows the URL with its password replaced.
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// The server: `redis://[user:password@]host:port[/db]`, `rediss://…` for TLS (the system's
    /// trust store unless `ca_path` is set; `#insecure` at the end turns certificate checks off),
    /// or `redis+unix:///path/to/socket`. Secret: never logged, `<redacted>` in `config print`.
    pub url: Secret,
    /// PEM file of the certificate authorities that sign the server's certificate, for
    /// `rediss://` URLs (unset: the system's roots).
    pub ca_path: Option<PathBuf>,
    /// The duplicate window: how long the id of every appended event is remembered
    /// (`SET <dedupe_prefix>:<event id> <entry id> PX <ttl>`), so that the relay sending it again
    /// after a failure or a restart appends nothing. A re-send later than this appends a second
    /// entry (with the same `h:id`).
    #[serde(with = "super::duration")]
    pub dedupe_ttl: Duration,
    /// The prefix of the dedupe keys (`<prefix>:<event id>`).
    pub dedupe_prefix: String,
    /// `XADD … MAXLEN ~ <n>`: trims each stream to about this many entries as it appends
    /// (entries not yet read by a consumer are trimmed too). Unset: streams are never trimmed.
    pub maxlen: Option<u64>,
    /// The largest record the sink sends: the bytes of its key, value, timestamp and header
    /// names and values together. A larger record is refused for good and parked (its aggregate
    /// held behind it). The server's own `proto-max-bulk-len`, when it can be read, caps it too.
    pub max_record_bytes: usize,
    /// Replicas that must acknowledge each batch (`WAIT <n> <wait_timeout>` after it) before its
    /// records count as delivered; fewer is a delivery failure and the batch is sent again
    /// (its appended records are then dropped as duplicates). `0`: the primary's reply is enough.
    pub wait_replicas: u32,
    /// How long `WAIT` waits for `wait_replicas` acknowledgements.
    #[serde(with = "super::duration")]
    pub wait_timeout: Duration,
    /// How long a connection attempt (and start-up's check) may take.
    #[serde(with = "super::duration")]
    pub connect_timeout: Duration,
    /// How long a batch may take, from being handed to the sink to the last reply (and the
    /// `WAIT`), before its unanswered records count as failed and the relay sends them again.
    #[serde(with = "super::duration")]
    pub delivery_timeout: Duration,
}

/// Where the relay looks for Redis unless told otherwise.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: Secret::new(DEFAULT_REDIS_URL),
            ca_path: None,
            dedupe_ttl: Duration::from_secs(24 * 3600),
            dedupe_prefix: "outbox:dedupe".to_owned(),
            maxlen: None,
            max_record_bytes: 1024 * 1024,
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(10),
            delivery_timeout: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(self.url.expose()))
            .field("ca_path", &self.ca_path)
            .field("dedupe_ttl", &self.dedupe_ttl)
            .field("dedupe_prefix", &self.dedupe_prefix)
            .field("maxlen", &self.maxlen)
            .field("max_record_bytes", &self.max_record_bytes)
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("delivery_timeout", &self.delivery_timeout)
            .finish()
    }
}

/// The largest bulk string a Redis server accepts by default (`proto-max-bulk-len`, 512 MiB).
pub const REDIS_MAX_BULK: usize = 512 * 1024 * 1024;

impl RedisSettings {
    /// The URL with its password replaced by `***`, for messages.
    pub fn shown_url(&self) -> String {
        redact_url(self.url.expose())
    }

    /// `text` (a client's error message) with the URL's password replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        without_secret(text, self.url.expose())
    }

    /// Checks every `[redis]` setting without connecting; each error names the setting
    /// (`redis.url`, …) and never shows the URL's password.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose();
        let scheme = url.split_once("://").map(|(s, _)| s);
        if !matches!(
            scheme,
            Some("redis" | "rediss" | "redis+unix" | "unix" | "valkey" | "valkeys")
        ) {
            return Err(ConfigError::new(
                "redis.url",
                format!(
                    "`{}` is not a redis://, rediss:// (TLS) or redis+unix:// URL",
                    self.shown_url()
                ),
            ));
        }
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url) {
            return Err(ConfigError::new(
                "redis.url",
                format!(
                    "`{}`: {}",
                    self.shown_url(),
                    without_secret(&e.to_string(), url)
                ),
            ));
        }
        if let Some(ca) = &self.ca_path {
            if !matches!(scheme, Some("rediss" | "valkeys")) {
                return Err(ConfigError::new(
                    "redis.ca_path",
                    "is used only with a rediss:// (TLS) URL",
                ));
            }
            std::fs::read_to_string(ca).map_err(|e| {
                ConfigError::new(
                    "redis.ca_path",
                    format!("cannot read {}: {e}", ca.display()),
                )
            })?;
        }
        if self.dedupe_ttl < Duration::from_secs(1)
            || self.dedupe_ttl > Duration::from_secs(365 * 86_400)
        {
            return Err(ConfigError::new(
                "redis.dedupe_ttl",
                "must be between 1s and 365d (it is the window in which a re-sent event is dropped as a duplicate)",
            ));
        }
        if self.dedupe_prefix.is_empty()
            || self
                .dedupe_prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ConfigError::new(
                "redis.dedupe_prefix",
                "must be a non-empty key prefix without spaces",
            ));
        }
        if self.maxlen == Some(0) {
            return Err(ConfigError::new(
                "redis.maxlen",
                "must be at least 1 (leave it unset to never trim the streams)",
            ));
        }
        if self.max_record_bytes < 1024 || self.max_record_bytes > REDIS_MAX_BULK {
            return Err(ConfigError::new(
                "redis.max_record_bytes",
                format!("must be between 1024 and {REDIS_MAX_BULK} bytes"),
            ));
        }
        if self.connect_timeout < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "redis.connect_timeout",
                "must be at least 100ms",
            ));
        }
        if self.delivery_timeout < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "redis.delivery_timeout",
                "must be at least 100ms",
            ));
        }
        if self.wait_replicas > 0 && self.wait_timeout >= self.delivery_timeout {
            return Err(ConfigError::new(
                "redis.wait_timeout",
                "must be shorter than redis.delivery_timeout (the batch's WAIT is part of its delivery)",
            ));
        }
        if self.wait_replicas > 0 && self.wait_timeout.is_zero() {
            return Err(ConfigError::new(
                "redis.wait_timeout",
                "must not be 0 with wait_replicas (WAIT 0 blocks until the replicas answer)",
            ));
        }
        Ok(())
    }
}

/// `text` with every occurrence of the URL's password removed (client errors may quote it).
fn without_secret(text: &str, url: &str) -> String {
    match url::Url::parse(url)
        .ok()
        .and_then(|u| u.password().map(str::to_owned))
    {
        Some(password) if !password.is_empty() => text.replace(&password, "***"),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_the_password_is_never_shown() {
        assert!(RedisSettings::default().validate().is_ok());
        let s = RedisSettings {
            url: Secret::new("redis://relay:s3cret@cache:6380/2"),
            ..Default::default()
        };
        assert!(s.validate().is_ok());
        let debug = format!("{s:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("redis://relay:***@cache:6380/2"), "{debug}");
    }

    #[test]
    fn every_error_names_its_setting() {
        type Change = fn(&mut RedisSettings);
        let cases: [(&str, Change); 10] = [
            ("redis.ca_path", |s| {
                s.ca_path = Some("/nonexistent/ca.pem".into())
            }),
            ("redis.ca_path", |s| {
                s.url = Secret::new("rediss://u:s3cret@h:6380");
                s.ca_path = Some("/nonexistent/ca.pem".into());
            }),
            ("redis.url", |s| s.url = Secret::new("http://u:s3cret@h")),
            ("redis.url", |s| {
                s.url = Secret::new("redis://u:s3cret@h:notaport")
            }),
            ("redis.dedupe_ttl", |s| s.dedupe_ttl = Duration::ZERO),
            ("redis.dedupe_prefix", |s| s.dedupe_prefix = "a b".into()),
            ("redis.maxlen", |s| s.maxlen = Some(0)),
            ("redis.max_record_bytes", |s| s.max_record_bytes = 10),
            ("redis.delivery_timeout", |s| {
                s.delivery_timeout = Duration::from_millis(10)
            }),
            ("redis.wait_timeout", |s| {
                s.wait_replicas = 1;
                s.wait_timeout = s.delivery_timeout;
            }),
        ];
        for (key, change) in cases {
            let mut s = RedisSettings::default();
            change(&mut s);
            let e = s.validate().unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
        for url in [
            "rediss://cache:6380",
            "redis+unix:///run/redis.sock",
            "redis://h/3",
        ] {
            let s = RedisSettings {
                url: Secret::new(url),
                ..Default::default()
            };
            assert!(s.validate().is_ok(), "{url}");
        }
    }

    #[test]
    fn every_setting_comes_from_the_environment_and_the_url_stays_secret() {
        let vars = [
            ("OUTBOX_SINK", "redis"),
            ("OUTBOX_REDIS_URL", "rediss://relay:s3cret@cache:6380"),
            ("OUTBOX_REDIS__DEDUPE_TTL", "2h"),
            ("OUTBOX_REDIS__DEDUPE_PREFIX", "svc:seen"),
            ("OUTBOX_REDIS__MAXLEN", "100000"),
            ("OUTBOX_REDIS__MAX_RECORD_BYTES", "20000"),
            ("OUTBOX_REDIS__WAIT_REPLICAS", "1"),
            ("OUTBOX_REDIS__WAIT_TIMEOUT", "250ms"),
            ("OUTBOX_REDIS__CONNECT_TIMEOUT", "3s"),
            ("OUTBOX_REDIS__DELIVERY_TIMEOUT", "5s"),
        ];
        let env = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let (c, sources) = crate::config::load::load(None, env, &[]).unwrap();
        assert!(sources.warnings.is_empty(), "{:?}", sources.warnings);
        assert_eq!(c.sink, crate::config::SinkKind::Redis);
        let r = &c.redis;
        assert_eq!(r.url.expose(), "rediss://relay:s3cret@cache:6380");
        assert_eq!(r.dedupe_ttl, Duration::from_secs(7200));
        assert_eq!(r.dedupe_prefix, "svc:seen");
        assert_eq!(r.maxlen, Some(100_000));
        assert_eq!(r.max_record_bytes, 20_000);
        assert_eq!(r.wait_replicas, 1);
        assert_eq!(r.wait_timeout, Duration::from_millis(250));
        assert_eq!(r.connect_timeout, Duration::from_secs(3));
        assert_eq!(r.delivery_timeout, Duration::from_secs(5));
        let printed = crate::config::load::render_redacted(&c);
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(!format!("{c:?}").contains("s3cret"));
        let bad = [("OUTBOX_REDIS__URL", "http://relay:s3cret@cache")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let e = crate::config::load::load(None, bad, &[]).unwrap_err();
        assert_eq!(e.key, "redis.url");
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
}
