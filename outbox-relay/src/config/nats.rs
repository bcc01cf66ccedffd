//! The `[nats]` settings: where the NATS JetStream sink connects, how it authenticates, how
//! long a publish may take to be acknowledged, and the stream `topics ensure --sink nats`
//! creates.

use std::time::Duration;

use super::{ConfigError, Secret, redact_url};

/// NATS JetStream sink settings (`[nats]`, `OUTBOX_NATS__*`, `OUTBOX_NATS_URL`). Credentials are
/// [`Secret`]s: `Debug`, `config print` and the logs never show them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated (`nats://host:4222`, `tls://host:4222`). May carry
    /// `user:password@` or `token@`; secret because of that.
    pub url: Secret,
    /// Path of a `.creds` file (JWT and NKey seed) to authenticate with. (Named `_path`, not
    /// `_file`: a variable ending in `_FILE` is read as a file holding the value.)
    pub credentials_path: Option<String>,
    /// A token to authenticate with. Secret.
    pub token: Option<Secret>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password of `user`. Secret.
    pub password: Option<Secret>,
    /// Refuse a connection that is not TLS (also implied by a `tls://` URL or `ca_path`).
    pub tls_required: bool,
    /// PEM file of the certificate authorities the server's certificate is checked against
    /// (otherwise the system's roots).
    pub ca_path: Option<String>,
    /// How long connecting (and the start-up check) may take before the server counts as
    /// unreachable.
    #[serde(with = "super::duration")]
    pub connect_timeout: Duration,
    /// How long a publish may wait for the stream's acknowledgement before it counts as failed
    /// (and the relay re-sends it, in order, from a new connection).
    #[serde(with = "super::duration")]
    pub delivery_timeout: Duration,
    /// Largest message (headers and body, in bytes) the relay publishes; a larger one is
    /// refused for good and parked. `0`: only the server's `max_payload` and the stream's
    /// `max_msg_size` apply (both are always checked).
    pub max_message_bytes: usize,
    /// The JetStream stream `outbox-relay topics ensure --sink nats` creates.
    pub stream: NatsStreamSettings,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("nats://127.0.0.1:4222"),
            credentials_path: None,
            token: None,
            user: None,
            password: None,
            tls_required: false,
            ca_path: None,
            connect_timeout: Duration::from_secs(10),
            delivery_timeout: Duration::from_secs(30),
            max_message_bytes: 0,
            stream: NatsStreamSettings::default(),
        }
    }
}

/// The stream `topics ensure --sink nats` creates or checks (`[nats.stream]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsStreamSettings {
    /// Stream name (no `.`, `*`, `>` or whitespace).
    pub name: String,
    /// Subjects the stream captures, comma-separated (wildcards allowed).
    pub subjects: String,
    /// `file` (durable across server restarts) or `memory`.
    pub storage: String,
    /// How long the stream remembers a `Nats-Msg-Id` to drop a re-sent event.
    #[serde(with = "super::duration")]
    pub duplicate_window: Duration,
    /// Replicas (1 on a single server; 3 in a cluster for durability against a node loss).
    pub replicas: usize,
}

impl Default for NatsStreamSettings {
    fn default() -> Self {
        Self {
            name: "OUTBOX".to_owned(),
            subjects: "outbox.event.>".to_owned(),
            storage: "file".to_owned(),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
        }
    }
}

impl NatsStreamSettings {
    /// The subjects, split at commas and trimmed.
    pub fn subject_list(&self) -> Vec<String> {
        self.subjects
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

impl NatsSettings {
    /// The server URLs, split at commas and trimmed.
    pub fn urls(&self) -> Vec<String> {
        self.url
            .expose()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The URLs with credentials replaced by `***`, for messages.
    pub fn redacted_urls(&self) -> String {
        self.urls()
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Checks every setting that needs no connection; errors name the setting
    /// (`nats.url`, `nats.password`, …) and never show a secret.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let urls = self.urls();
        if urls.is_empty() {
            return Err(ConfigError::new("nats.url", "must not be empty"));
        }
        for u in &urls {
            let parsed = url::Url::parse(u).map_err(|e| {
                ConfigError::new("nats.url", format!("`{}` is not a URL: {e}", redact_url(u)))
            })?;
            if !matches!(parsed.scheme(), "nats" | "tls") {
                return Err(ConfigError::new(
                    "nats.url",
                    format!("`{}`: the scheme must be nats:// or tls://", redact_url(u)),
                ));
            }
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(ConfigError::new(
                    "nats.url",
                    format!("`{}` has no host", redact_url(u)),
                ));
            }
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(ConfigError::new(
                if self.user.is_some() {
                    "nats.password"
                } else {
                    "nats.user"
                },
                "nats.user and nats.password go together",
            ));
        }
        let methods = [
            self.credentials_path.is_some(),
            self.token.is_some(),
            self.user.is_some(),
        ]
        .iter()
        .filter(|m| **m)
        .count();
        if methods > 1 {
            return Err(ConfigError::new(
                "nats",
                "choose one way to authenticate: credentials_path, token, or user and password",
            ));
        }
        for (key, path) in [
            ("nats.credentials_path", &self.credentials_path),
            ("nats.ca_path", &self.ca_path),
        ] {
            if let Some(path) = path
                && path.trim().is_empty()
            {
                return Err(ConfigError::new(key, "must not be empty when set"));
            }
        }
        if self.connect_timeout < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "nats.connect_timeout",
                "must be at least 100ms",
            ));
        }
        if self.delivery_timeout < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "nats.delivery_timeout",
                "must be at least 1s",
            ));
        }
        let name = &self.stream.name;
        if name.is_empty()
            || name
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
        {
            return Err(ConfigError::new(
                "nats.stream.name",
                format!(
                    "`{name}`: a stream name is not empty and has no `.`, `*`, `>`, `/`, `\\` or whitespace"
                ),
            ));
        }
        let subjects = self.stream.subject_list();
        if subjects.is_empty() {
            return Err(ConfigError::new(
                "nats.stream.subjects",
                "must name at least one subject",
            ));
        }
        for s in &subjects {
            subject_problem(s, true)
                .map_err(|reason| ConfigError::new("nats.stream.subjects", reason))?;
        }
        if !matches!(self.stream.storage.as_str(), "file" | "memory") {
            return Err(ConfigError::new(
                "nats.stream.storage",
                format!("`{}`: must be `file` or `memory`", self.stream.storage),
            ));
        }
        if self.stream.duplicate_window < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "nats.stream.duplicate_window",
                "must be at least 1s (it is what drops a re-sent event)",
            ));
        }
        if !(1..=5).contains(&self.stream.replicas) {
            return Err(ConfigError::new(
                "nats.stream.replicas",
                "must be between 1 and 5",
            ));
        }
        Ok(())
    }
}

/// Why `subject` is not a subject the relay can publish to (or, with `wildcards`, that a stream
/// can capture): it must be dot-separated non-empty tokens of printable ASCII without
/// whitespace; `*` and `>` are wildcards, allowed only as whole tokens (`>` last) and only
/// with `wildcards`.
pub fn subject_problem(subject: &str, wildcards: bool) -> Result<(), String> {
    if subject.is_empty() {
        return Err("a NATS subject must not be empty".to_owned());
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(format!(
                "`{subject}` is not a NATS subject: it has an empty token (a leading, trailing or doubled `.`)"
            ));
        }
        if let Some(c) = token
            .chars()
            .find(|c| !c.is_ascii_graphic() || c.is_ascii_whitespace())
        {
            return Err(format!(
                "`{subject}` is not a NATS subject: character {c:?} is not allowed (printable ASCII without whitespace)"
            ));
        }
        let wild = *token == "*" || *token == ">";
        if token.contains(['*', '>']) && !(wildcards && wild) {
            return Err(format!(
                "`{subject}` is not a NATS subject to publish to: `*` and `>` are wildcards"
            ));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Err(format!("`{subject}`: `>` must be the last token"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_nats_rules() {
        assert!(subject_problem("outbox.event.account", false).is_ok());
        assert!(subject_problem("outbox.event.Account-Type_1", false).is_ok());
        for bad in [
            "",
            ".outbox",
            "outbox.",
            "outbox..event",
            "outbox event",
            "outbox.*",
            "outbox.>",
            "a\tb",
            "ünïcode",
        ] {
            assert!(subject_problem(bad, false).is_err(), "{bad:?}");
        }
        assert!(subject_problem("outbox.event.>", true).is_ok());
        assert!(subject_problem("outbox.*.x", true).is_ok());
        assert!(subject_problem("outbox.>.x", true).is_err());
        assert!(subject_problem("outbox.a*", true).is_err());
    }

    #[test]
    fn settings_errors_name_the_setting_and_hide_secrets() {
        assert!(NatsSettings::default().validate().is_ok());
        let with = |f: &dyn Fn(&mut NatsSettings)| {
            let mut s = NatsSettings::default();
            f(&mut s);
            s.validate().unwrap_err()
        };
        let e = with(&|s| s.url = Secret::new("http://u:s3cret@h:4222"));
        assert_eq!(e.key, "nats.url");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert_eq!(with(&|s| s.url = Secret::new("")).key, "nats.url");
        assert_eq!(
            with(&|s| s.user = Some("relay".into())).key,
            "nats.password"
        );
        let e = with(&|s| {
            s.token = Some(Secret::new("t0ken"));
            s.credentials_path = Some("relay.creds".into());
        });
        assert_eq!(e.key, "nats");
        assert_eq!(
            with(&|s| s.delivery_timeout = Duration::from_millis(10)).key,
            "nats.delivery_timeout"
        );
        assert_eq!(
            with(&|s| s.stream.name = "OUT.BOX".into()).key,
            "nats.stream.name"
        );
        assert_eq!(
            with(&|s| s.stream.subjects = "outbox..x".into()).key,
            "nats.stream.subjects"
        );
        assert_eq!(
            with(&|s| s.stream.storage = "disk".into()).key,
            "nats.stream.storage"
        );
        let mut s = NatsSettings::default();
        s.url = Secret::new("nats://a:4222, tls://relay:pw@b:4222");
        s.validate().unwrap();
        assert_eq!(s.redacted_urls(), "nats://a:4222,tls://relay:***@b:4222");
        s.password = Some(Secret::new("hunter2"));
        s.user = Some("relay".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn secrets_are_never_printed() {
        let s = NatsSettings {
            url: Secret::new("nats://relay:s3cret@h:4222"),
            token: Some(Secret::new("t0ken")),
            password: Some(Secret::new("hunter2")),
            user: Some("relay".into()),
            ..Default::default()
        };
        let printed = format!("{s:?}\n{}", toml::to_string(&s).unwrap());
        for secret in ["s3cret", "t0ken", "hunter2"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        let loaded = crate::config::load::load(
            None,
            vec![
                ("OUTBOX_SINK".to_owned(), "nats".to_owned()),
                ("OUTBOX_NATS_URL".to_owned(), "nats://n1:4222".to_owned()),
                (
                    "OUTBOX_NATS__STREAM__SUBJECTS".to_owned(),
                    "a.>, b.*".to_owned(),
                ),
            ],
            &[],
        )
        .unwrap()
        .0;
        assert_eq!(loaded.nats.url.expose(), "nats://n1:4222");
        assert_eq!(loaded.nats.stream.subject_list(), ["a.>", "b.*"]);
    }
}
