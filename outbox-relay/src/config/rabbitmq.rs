//! The `[rabbitmq]` settings of the RabbitMQ sink ([`crate::sink::rabbitmq`]): where it
//! connects, which exchange it publishes to and how long it waits.

use std::path::PathBuf;
use std::time::Duration;

use super::{ConfigError, Secret, redact_url};

/// RabbitMQ (AMQP 0-9-1) settings (`[rabbitmq]`, `OUTBOX_RABBITMQ__URL`, …). `Debug` never shows
/// the URL's password.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitmqSettings {
    /// The broker's AMQP URL, `amqp://user:password@host:5672/vhost` (the vhost percent-encoded:
    /// `%2f` is `/`), or `amqps://…` for TLS. Query parameters of the URL (`heartbeat`,
    /// `frame_max`, `channel_max`) are passed to the client. Secret: shown redacted.
    pub url: Secret,
    /// The exchange every record is published to, with the destination name as routing key.
    /// Empty: the default exchange, which delivers to the queue named like the destination.
    pub exchange: String,
    /// Whether the relay declares `exchange` itself (durable, type `topic`) when it connects.
    /// Off: the exchange must exist; publishing to a missing one stops the relay.
    pub declare_exchange: bool,
    /// PEM file of the certificate authorities that sign the broker's certificate, for
    /// `amqps://` URLs (unset: the system's roots).
    pub ca_path: Option<PathBuf>,
    /// How long connecting (TCP, TLS, AMQP handshake, channel and confirm mode) may take.
    #[serde(with = "super::duration")]
    pub connect_timeout: Duration,
    /// How long a published record may wait for the broker's confirm before it counts as
    /// failed (the relay then reconnects and sends again from the first unconfirmed event).
    #[serde(with = "super::duration")]
    pub delivery_timeout: Duration,
    /// The largest message body the relay publishes, in bytes; a larger record is parked
    /// without being sent. Keep it at or below the broker's own `max_message_size` (16 MiB by
    /// default since RabbitMQ 4.0, 128 MiB before): a body the broker refuses closes the
    /// channel, and the relay then needs to find the record at fault by sending one at a time.
    pub max_message_size: usize,
}

impl Default for RabbitmqSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            exchange: "outbox".to_owned(),
            declare_exchange: true,
            ca_path: None,
            connect_timeout: Duration::from_secs(10),
            delivery_timeout: Duration::from_secs(30),
            max_message_size: 16 * 1024 * 1024,
        }
    }
}

/// RabbitMQ's limit on exchange names and routing keys (an AMQP short string).
pub const MAX_SHORT_STRING: usize = 255;

impl RabbitmqSettings {
    /// Checks the settings without connecting: an `amqp://`/`amqps://` URL the client can parse,
    /// a CA file only for `amqps://` and readable, an exchange name RabbitMQ accepts, timeouts
    /// and size within bounds. Each error names the setting (`rabbitmq.url`, …) and never
    /// shows the URL's password.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose();
        let tls = if url.starts_with("amqps://") {
            true
        } else if url.starts_with("amqp://") {
            false
        } else {
            return Err(ConfigError::new(
                "rabbitmq.url",
                format!("`{}` is not an amqp:// or amqps:// URL", redact_url(url)),
            ));
        };
        url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            // The client's message may quote the URL: it is not shown.
            let _ = e;
            ConfigError::new(
                "rabbitmq.url",
                format!(
                    "`{}` is not a valid AMQP URL (amqp://user:password@host:port/vhost, the vhost percent-encoded)",
                    redact_url(url)
                ),
            )
        })?;
        if let Some(ca) = &self.ca_path {
            if !tls {
                return Err(ConfigError::new(
                    "rabbitmq.ca_path",
                    "is used only with an amqps:// URL",
                ));
            }
            std::fs::read_to_string(ca).map_err(|e| {
                ConfigError::new(
                    "rabbitmq.ca_path",
                    format!("cannot read {}: {e}", ca.display()),
                )
            })?;
        }
        let name_ok = self.exchange.len() <= MAX_SHORT_STRING
            && self
                .exchange
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !name_ok || self.exchange.starts_with("amq.") && self.declare_exchange {
            return Err(ConfigError::new(
                "rabbitmq.exchange",
                format!(
                    "`{}`: exchange names are at most 255 characters of a-z, A-Z, 0-9, -, _, . and : (and `amq.*` names are the broker's own: set declare_exchange = false to use one)",
                    self.exchange
                ),
            ));
        }
        for (key, value) in [
            ("rabbitmq.connect_timeout", self.connect_timeout),
            ("rabbitmq.delivery_timeout", self.delivery_timeout),
        ] {
            if value < Duration::from_millis(100) || value > Duration::from_secs(3600) {
                return Err(ConfigError::new(key, "must be between 100ms and 1h"));
            }
        }
        if self.max_message_size < 1024 || self.max_message_size > 512 * 1024 * 1024 {
            return Err(ConfigError::new(
                "rabbitmq.max_message_size",
                "must be between 1024 and 536870912 bytes (RabbitMQ's hard limit is 512 MiB)",
            ));
        }
        Ok(())
    }

    /// Whether the URL asks for TLS.
    pub fn tls(&self) -> bool {
        self.url.expose().starts_with("amqps://")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_error_names_its_setting() {
        assert!(RabbitmqSettings::default().validate().is_ok());
        let cases: Vec<(RabbitmqSettings, &str)> = vec![
            (
                RabbitmqSettings {
                    url: Secret::new("http://guest:s3cret@h/"),
                    ..Default::default()
                },
                "rabbitmq.url",
            ),
            (
                RabbitmqSettings {
                    url: Secret::new("amqp://guest:s3cret@h:notaport/"),
                    ..Default::default()
                },
                "rabbitmq.url",
            ),
            (
                RabbitmqSettings {
                    ca_path: Some("/nonexistent/ca.pem".into()),
                    ..Default::default()
                },
                "rabbitmq.ca_path",
            ),
            (
                RabbitmqSettings {
                    url: Secret::new("amqps://guest:s3cret@h/%2f"),
                    ca_path: Some("/nonexistent/ca.pem".into()),
                    ..Default::default()
                },
                "rabbitmq.ca_path",
            ),
            (
                RabbitmqSettings {
                    exchange: "bad exchange".into(),
                    ..Default::default()
                },
                "rabbitmq.exchange",
            ),
            (
                RabbitmqSettings {
                    exchange: "amq.topic".into(),
                    ..Default::default()
                },
                "rabbitmq.exchange",
            ),
            (
                RabbitmqSettings {
                    delivery_timeout: Duration::from_millis(1),
                    ..Default::default()
                },
                "rabbitmq.delivery_timeout",
            ),
            (
                RabbitmqSettings {
                    max_message_size: 10,
                    ..Default::default()
                },
                "rabbitmq.max_message_size",
            ),
        ];
        for (settings, key) in cases {
            let e = settings.validate().unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
        let broker_exchange = RabbitmqSettings {
            exchange: "amq.topic".into(),
            declare_exchange: false,
            ..Default::default()
        };
        assert!(broker_exchange.validate().is_ok());
        let default_exchange = RabbitmqSettings {
            exchange: String::new(),
            ..Default::default()
        };
        assert!(default_exchange.validate().is_ok());
    }

    #[test]
    fn the_url_is_never_shown() {
        let s = RabbitmqSettings {
            url: Secret::new("amqp://relay:s3cret@h/%2f"),
            ..Default::default()
        };
        assert!(!format!("{s:?}").contains("s3cret"));
    }
}
