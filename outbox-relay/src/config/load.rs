//! Loading the configuration: defaults < TOML file < `OUTBOX_*` environment < command-line flags.
//!
//! - File: `--config FILE` or `OUTBOX_CONFIG`; keys as in [`RelayConfig`] (`[kafka]`,
//!   `[kafka.properties]`, `[route]`, `[route.routes]`, `[logical]` tables). Unknown keys are
//!   errors naming the key and the file.
//! - Environment: `OUTBOX_<KEY>` with `__` for nesting (`OUTBOX_KAFKA__DELIVERY_TIMEOUT=10s`);
//!   librdkafka properties as `OUTBOX_KAFKA__PROPERTIES__SASL_MECHANISM=PLAIN` (`_` becomes `.`)
//!   or as a list in `OUTBOX_KAFKA_PROPERTIES=k=v,k=v`; short aliases for the common settings
//!   (`OUTBOX_KAFKA_BOOTSTRAP_SERVERS`, `OUTBOX_TOPIC`, `OUTBOX_ROUTES`, `OUTBOX_SLOT`, …). Any
//!   variable may instead end in `_FILE` and name a file holding the value (for secrets mounted
//!   by the orchestrator). Variables that match no setting are reported and ignored.
//! - Flags: the dedicated flags of `outbox-relay run`, and `--set key=value` for any key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use figment::providers::Format;
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::{ConfigError, RelayConfig};

/// Environment variables of the relay that are not configuration keys.
const NOT_SETTINGS: &[&str] = &["OUTBOX_CONFIG", "OUTBOX_LOG_FORMAT"];

/// Short environment names for nested keys (`OUTBOX_<ALIAS>` → key).
const ALIASES: &[(&str, &str)] = &[
    ("kafka_bootstrap_servers", "kafka.bootstrap_servers"),
    ("nats_url", "nats.url"),
    ("redis_url", "redis.url"),
    ("topic", "route.topic"),
    ("cloudevents", "route.cloudevents"),
    ("cloudevents_mode", "route.cloudevents_mode"),
    ("allowed_topics", "route.allowed_topics"),
    ("slot", "logical.slot"),
    ("publication", "logical.publication"),
    ("heartbeat_interval", "logical.heartbeat_interval"),
    ("status_interval", "logical.status_interval"),
    ("message_prefix", "logical.message_prefix"),
    ("admin_addr", "admin_addr"),
];

/// Settings without a default value (unset unless given) that the defaults therefore do not
/// show; [`known_keys`] adds them.
const OPTIONAL_KEYS: &[&str] = &["shards", "tables"];

/// Keys that hold maps of free-form entries.
const MAP_KEYS: &[&str] = &["kafka.properties", "route.routes"];

/// One layer of settings, with where it came from (for error messages).
#[derive(Debug, Clone)]
pub struct Layer {
    name: String,
    dict: Dict,
}

impl Layer {
    /// An empty layer named `name` ("environment", "command line", …).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            dict: Dict::new(),
        }
    }

    /// Sets a dotted `key` (map entries may contain dots: `kafka.properties.sasl.mechanism`).
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        let path = split_key(key);
        insert(&mut self.dict, &path, Value::from(value.into()));
    }

    /// Whether nothing was set.
    pub fn is_empty(&self) -> bool {
        self.dict.is_empty()
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// Splits a key into its path, keeping a map entry's name whole.
fn split_key(key: &str) -> Vec<String> {
    for map in MAP_KEYS {
        if let Some(entry) = key.strip_prefix(map).and_then(|r| r.strip_prefix('.')) {
            let mut path: Vec<String> = map.split('.').map(str::to_owned).collect();
            path.push(entry.to_owned());
            return path;
        }
    }
    key.split('.').map(str::to_owned).collect()
}

fn insert(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [head, rest @ ..] => {
            let entry = dict
                .entry(head.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if entry.as_dict().is_none() {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

/// Every settable key (dotted), from the defaults; map keys end in `.*`.
pub fn known_keys() -> BTreeSet<String> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeSet<String>) {
        if MAP_KEYS.contains(&prefix) {
            out.insert(format!("{prefix}.*"));
            return;
        }
        match value {
            Value::Dict(_, d) => {
                for (k, v) in d {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            _ => {
                out.insert(prefix.to_owned());
            }
        }
    }
    let defaults = Value::serialize(RelayConfig::default()).expect("defaults serialize");
    let mut out = BTreeSet::new();
    walk("", &defaults, &mut out);
    out.extend(OPTIONAL_KEYS.iter().map(|k| (*k).to_owned()));
    // `[[outbox]]` and `[[route.value_schemas]]` sections are lists of tables: the file only.
    out.remove("outbox");
    out.remove("route.value_schemas");
    out
}

fn is_known(key: &str, known: &BTreeSet<String>) -> bool {
    known.contains(key)
        || MAP_KEYS.iter().any(|m| {
            key.strip_prefix(m)
                .is_some_and(|r| r.starts_with('.') && r.len() > 1)
        })
}

// Why not `figment::providers::Env::prefixed("OUTBOX_").split("__")` (figment 0.10.19, tried):
// - it reads only the process environment (`std::env::vars_os`), so `load` could no longer take
//   the variables as an argument, and the tests would have to set process variables, which
//   needs `unsafe` in edition 2024 (forbidden in this workspace) and serializes every test;
// - it parses values as figment values: `OUTBOX_TABLE=123` or
//   `OUTBOX_KAFKA__PROPERTIES__LINGER_MS=5` become integers and fail with an "invalid type"
//   error (an unsigned integer where a string is expected);
// - it nests at every `.` of the mapped key, so a librdkafka property cannot be named:
//   `kafka.properties.sasl.mechanism` becomes a table `sasl` and fails with an "invalid type"
//   error (a map where a string is expected);
// - an unknown variable becomes a fatal `unknown field` (`deny_unknown_fields`) instead of a
//   warning, and `*_FILE` secrets and the `k=v,k=v` list forms have no place in it.
// Each needs a workaround around `Env` larger than the code below, so this layer stays ours;
// figment still merges it (with the file and the flags) and reports the errors.

/// Reads the `OUTBOX_*` variables from `vars` into a layer; returns it with warnings about
/// variables that match no setting, and fails when a `*_FILE` cannot be read.
pub fn env_layer(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(Layer, Vec<String>), ConfigError> {
    let known = known_keys();
    let mut layer = Layer::new("environment");
    let mut warnings = Vec::new();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix("OUTBOX_") else {
            continue;
        };
        if NOT_SETTINGS.contains(&name.as_str()) || rest.is_empty() {
            continue;
        }
        let mut key = rest.to_ascii_lowercase();
        let mut value = value;
        if let Some(base) = key.strip_suffix("_file") {
            let path = value.clone();
            value = std::fs::read_to_string(&path)
                .map_err(|e| ConfigError::new(base, format!("cannot read {name}={path}: {e}")))?
                .trim_end_matches(['\n', '\r'])
                .to_owned();
            key = base.to_owned();
        }
        // List forms.
        if key == "kafka_properties" || key == "routes" {
            let map = if key == "routes" {
                "route.routes"
            } else {
                "kafka.properties"
            };
            for item in value.split(',').filter(|s| !s.trim().is_empty()) {
                let (k, v) = item.split_once('=').ok_or_else(|| {
                    ConfigError::new(map, format!("{name}: `{item}` is not key=value"))
                })?;
                layer.set(&format!("{map}.{}", k.trim()), v.trim());
            }
            continue;
        }
        let dotted = ALIASES
            .iter()
            .find(|(alias, _)| *alias == key)
            .map(|(_, k)| (*k).to_owned())
            .unwrap_or_else(|| {
                let dotted = key.replace("__", ".");
                match dotted.strip_prefix("kafka.properties.") {
                    Some(prop) => format!("kafka.properties.{}", prop.replace('_', ".")),
                    None => dotted,
                }
            });
        if is_known(&dotted, &known) {
            layer.set(&dotted, value);
        } else {
            warnings.push(format!("ignoring {name}: no setting `{dotted}`"));
        }
    }
    Ok((layer, warnings))
}

/// A layer from `key=value` pairs given on the command line (`--set`), checking each key.
pub fn flag_layer(pairs: &[(String, String)]) -> Result<Layer, ConfigError> {
    let known = known_keys();
    let mut layer = Layer::new("command line");
    for (key, value) in pairs {
        if !is_known(key, &known) {
            return Err(ConfigError::new(key.clone(), "no such setting"));
        }
        layer.set(key, value.clone());
    }
    Ok(layer)
}

/// Where a loaded configuration came from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The TOML file, if any.
    pub file: Option<PathBuf>,
    /// Variables that were ignored.
    pub warnings: Vec<String>,
}

/// Loads and validates the configuration from `file` (optional), the process environment and
/// `flags` (already-known `key=value` pairs, highest precedence).
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    flags: &[(String, String)],
) -> Result<(RelayConfig, Sources), ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::new(
                "config",
                format!("configuration file {} does not exist", path.display()),
            ));
        }
        figment = figment.merge(figment::providers::Toml::file_exact(path));
    }
    let (env, warnings) = env_layer(env)?;
    figment = figment.merge(env).merge(flag_layer(flags)?);
    let config: RelayConfig = figment.extract_lossy().map_err(|e| from_figment(e, file))?;
    config.validate()?;
    Ok((
        config,
        Sources {
            file: file.map(Path::to_path_buf),
            warnings,
        },
    ))
}

fn from_figment(e: figment::Error, file: Option<&Path>) -> ConfigError {
    let key = if e.path.is_empty() {
        "config".to_owned()
    } else {
        e.path.join(".")
    };
    let origin = e
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            Some(figment::Source::File(p)) => format!(" (in {})", p.display()),
            _ => format!(" (from {})", m.name),
        })
        .or_else(|| file.map(|p| format!(" (in {})", p.display())))
        .unwrap_or_default();
    let kind = match &e.kind {
        figment::error::Kind::UnknownField(field, _) => {
            return ConfigError::new(
                if e.path.is_empty() {
                    field.clone()
                } else {
                    key
                },
                format!("unknown setting{origin}"),
            );
        }
        other => other.to_string(),
    };
    ConfigError::new(key, format!("{kind}{origin}"))
}

/// The effective configuration as TOML with every secret replaced by `<redacted>`.
pub fn render_redacted(config: &RelayConfig) -> String {
    let mut shown = config.clone();
    for (key, value) in shown.kafka.properties.iter_mut() {
        if super::is_secret_key(key) {
            *value = "<redacted>".to_owned();
        }
    }
    toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("outbox-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn precedence_is_defaults_file_env_flags() {
        let file = write(
            "relay.toml",
            r#"
            batch_size = 10
            poll_interval = "5s"
            table = "from_file"
            [kafka]
            bootstrap_servers = "file:9092"
            [kafka.properties]
            "linger.ms" = "20"
            [route.routes]
            AccountClosed = "closures"
            "#,
        );
        let (c, _) = load(
            Some(&file),
            env(&[
                ("OUTBOX_BATCH_SIZE", "20"),
                ("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "env:9092"),
                ("OUTBOX_KAFKA__PROPERTIES__COMPRESSION_TYPE", "lz4"),
                ("OUTBOX_LOGICAL__SLOT", "env_slot"),
                ("OUTBOX_ADMIN_ADDR", "127.0.0.1:9187"),
                ("OUTBOX_DEAD_LETTER_TOPIC", "parked.events"),
                ("PATH", "/bin"),
            ]),
            &[("batch_size".into(), "30".into())],
        )
        .unwrap();
        assert_eq!(c.batch_size, 30, "flag beats env beats file");
        assert_eq!(c.kafka.bootstrap_servers, "env:9092", "env beats file");
        assert_eq!(
            c.poll_interval,
            Duration::from_secs(5),
            "file beats default"
        );
        assert_eq!(c.table, "from_file");
        assert_eq!(c.kafka.properties["linger.ms"], "20");
        assert_eq!(c.kafka.properties["compression.type"], "lz4");
        assert_eq!(c.route.routes["AccountClosed"], "closures");
        assert_eq!(c.logical.slot, "env_slot");
        assert_eq!(c.admin_addr, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(c.dead_letter_topic.as_deref(), Some("parked.events"));
        assert_eq!(
            c.retention,
            RelayConfig::default().retention,
            "default kept"
        );
    }

    #[test]
    fn secrets_come_from_files_and_are_never_printed() {
        let secret = write("db-url", "postgres://relay:s3cr3t@db/app\n");
        let pw = write("sasl", "hunter2");
        let (c, _) = load(
            None,
            env(&[
                ("OUTBOX_DATABASE_URL_FILE", secret.to_str().unwrap()),
                (
                    "OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD_FILE",
                    pw.to_str().unwrap(),
                ),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.database_url.expose(), "postgres://relay:s3cr3t@db/app");
        assert_eq!(c.kafka.properties["sasl.password"], "hunter2");
        let printed = render_redacted(&c);
        assert!(!printed.contains("s3cr3t"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let file = write("bad.toml", "batch_size = \"many\"\n");
        let e = load(Some(&file), Vec::new(), &[]).unwrap_err();
        assert_eq!(e.key, "batch_size");
        assert!(e.reason.contains("bad.toml"), "{e}");

        let file = write("typo.toml", "[kafka]\nbootstrap_server = \"x\"\n");
        let e = load(Some(&file), Vec::new(), &[]).unwrap_err();
        assert_eq!(e.key, "kafka.bootstrap_server", "{e}");
        assert!(
            e.reason.contains("unknown setting") && e.reason.contains("typo.toml"),
            "{e}"
        );

        let file = write("dur.toml", "poll_interval = \"5 fortnights\"\n");
        let e = load(Some(&file), Vec::new(), &[]).unwrap_err();
        assert_eq!(e.key, "poll_interval", "{e}");

        let e = load(None, env(&[("OUTBOX_BATCH_SIZE", "0")]), &[]).unwrap_err();
        assert_eq!(e.key, "batch_size");

        let e = load(Some(Path::new("/nonexistent/relay.toml")), Vec::new(), &[]).unwrap_err();
        assert!(e.reason.contains("does not exist"), "{e}");

        let e = flag_layer(&[("kafka.nope".into(), "1".into())]).unwrap_err();
        assert_eq!(e.key, "kafka.nope");
    }

    #[test]
    fn shards_come_from_the_environment_and_bad_counts_name_the_setting() {
        let (c, _) = load(None, env(&[("OUTBOX_SHARDS", "16")]), &[]).unwrap();
        assert_eq!(c.shards, Some(16));
        let (c, _) = load(None, Vec::new(), &[]).unwrap();
        assert_eq!(c.shards, None, "off by default");
        for bad in ["0", "1025"] {
            let e = load(None, env(&[("OUTBOX_SHARDS", bad)]), &[]).unwrap_err();
            assert_eq!(e.key, "shards", "{bad}: {e}");
        }
        let e = load(None, env(&[("OUTBOX_SHARDS", "many")]), &[]).unwrap_err();
        assert_eq!(e.key, "shards", "{e}");
        let e = load(
            None,
            env(&[("OUTBOX_SHARDS", "4"), ("OUTBOX_SOURCE", "logical")]),
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key, "shards", "{e}");
    }

    #[test]
    fn unknown_variables_are_reported_not_fatal() {
        let (_, sources) = load(None, env(&[("OUTBOX_BATCH_SIZ", "5")]), &[]).unwrap();
        assert_eq!(sources.warnings.len(), 1);
        assert!(sources.warnings[0].contains("OUTBOX_BATCH_SIZ"));
    }

    #[test]
    fn idempotence_cannot_be_turned_off_from_any_layer() {
        let e = load(
            None,
            env(&[("OUTBOX_KAFKA__PROPERTIES__ENABLE_IDEMPOTENCE", "false")]),
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key, "kafka");
        assert!(e.reason.contains("idempotence"), "{e}");
    }

    #[test]
    fn outbox_sections_come_from_the_file_and_the_pattern_from_anywhere() {
        let file = write(
            "tables.toml",
            r#"
            tables_rescan_interval = "5s"
            [[outbox]]
            table = "billing.outbox"
            [[outbox]]
            table = "shipping.outbox"
            write_mode = "table"
            shards = 4
            dead_letter_topic = "shipping.parked"
            [outbox.route]
            topic = "shipping.{aggregatetype}"
            "#,
        );
        let (c, _) = load(Some(&file), Vec::new(), &[]).unwrap();
        assert_eq!(c.outbox.len(), 2);
        assert_eq!(c.outbox[1].shards, Some(4));
        assert_eq!(
            c.outbox[1].route.as_ref().map(|r| r.topic.as_str()),
            Some("shipping.{aggregatetype}")
        );
        assert_eq!(c.tables_rescan_interval, Duration::from_secs(5));
        // What `config print` shows reads back to the same tables.
        let again: RelayConfig = toml::from_str(&render_redacted(&c)).unwrap();
        assert_eq!(again.outbox, c.outbox);
        assert_eq!(again.tables_rescan_interval, c.tables_rescan_interval);

        let (c, _) = load(None, env(&[("OUTBOX_TABLES", "tenant_*.outbox")]), &[]).unwrap();
        assert_eq!(c.tables.as_deref(), Some("tenant_*.outbox"));
        let e = load(None, env(&[("OUTBOX_TABLES", "tenant_*")]), &[]).unwrap_err();
        assert_eq!(e.key, "tables");
        let e = load(None, env(&[("OUTBOX_MAX_TABLES", "0")]), &[]).unwrap_err();
        assert_eq!(e.key, "max_tables");

        let file = write(
            "typo.toml",
            "[[outbox]]\ntable = \"a\"\n[[outbox]]\ntabel = \"b\"\n",
        );
        let e = load(Some(&file), Vec::new(), &[]).unwrap_err();
        assert!(e.key.starts_with("outbox"), "{e}");
        assert!(e.reason.contains("unknown setting"), "{e}");
    }

    #[test]
    fn every_key_is_reachable_from_the_environment() {
        for key in known_keys() {
            let var = format!("OUTBOX_{}", key.replace('.', "__").to_ascii_uppercase());
            let var = var.replace("__*", "__LINGER_MS");
            let (layer, warnings) = env_layer(env(&[(&var, "1")])).unwrap();
            assert!(warnings.is_empty(), "{key}: {warnings:?}");
            assert!(!layer.is_empty(), "{key}");
        }
    }
}
