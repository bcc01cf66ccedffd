//! Secrets never leave the relay: not in any log line (at `RUST_LOG=debug`, both sources), not in
//! `config print`, not in `/status` or `/metrics`, not in the error of a bad or unreachable
//! database URL — whether they come from the environment, a `*_FILE`, a `--set` flag, the URL's
//! `user:password@` part or its `?password=` parameter.

use std::time::Duration;

use anyhow::Result;
use outbox_core::{NewEvent, Outbox};
use outbox_tests::*;

const LONG: Duration = Duration::from_secs(60);

/// The secrets of one test, each unique so that a hit cannot be a coincidence.
struct Secrets {
    db_password: String,
    param_password: String,
    sasl: String,
    oauth: String,
    keystore: String,
    admin_token: String,
}

impl Secrets {
    fn new() -> Self {
        let s = |p: &str| format!("{p}-{}", uuid::Uuid::new_v4().simple());
        Self {
            db_password: s("dbpw"),
            param_password: s("parampw"),
            sasl: s("saslpw"),
            oauth: s("oauthtok"),
            keystore: s("kspw"),
            admin_token: s("admintok"),
        }
    }

    fn all(&self) -> [&str; 6] {
        [
            &self.db_password,
            &self.param_password,
            &self.sasl,
            &self.oauth,
            &self.keystore,
            &self.admin_token,
        ]
    }

    /// Panics naming the secret and the place it leaked to.
    fn assert_absent(&self, place: &str, text: &str) {
        for secret in self.all() {
            assert!(
                !text.contains(secret),
                "a secret ({}…) leaked into {place}:\n{text}",
                &secret[..6]
            );
        }
    }
}

/// `url` with `password` in its userinfo and `?password=` (the server trusts; both are secrets).
fn url_with_passwords(url: &str, userinfo_pw: &str, param_pw: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (user, host) = rest.split_once('@').expect("a user in the test URL");
    let user = user.split(':').next().unwrap_or(user);
    let sep = if host.contains('?') { '&' } else { '?' };
    format!(
        "{scheme}://{user}:{userinfo_pw}@{host}{sep}password={param_pw}&application_name=outbox-secrets"
    )
}

/// The environment carrying every secret (the token through a `*_FILE`).
fn secret_env(secrets: &Secrets, url: &str, token_file: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OUTBOX_DATABASE_URL", url.to_owned()),
        (
            "OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD",
            secrets.sasl.clone(),
        ),
        (
            "OUTBOX_KAFKA__PROPERTIES__SSL_KEYSTORE_PASSWORD",
            secrets.keystore.clone(),
        ),
        // librdkafka's own configuration dump (it prints every property at debug=conf).
        ("OUTBOX_KAFKA__PROPERTIES__DEBUG", "conf".to_owned()),
        ("OUTBOX_ADMIN__TOKEN_FILE", token_file.to_owned()),
        ("OUTBOX_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
        ("RUST_LOG", "debug".to_owned()),
    ]
}

async fn relay_cli(args: &[&str], env: &[(&'static str, String)]) -> Result<(i32, String)> {
    let path = std::env::var("PATH").unwrap_or_default();
    let bootstrap = services().bootstrap;
    let mut all = vec![
        ("PATH", path.as_str()),
        ("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str()),
    ];
    all.extend(env.iter().map(|(k, v)| (*k, v.as_str())));
    let out = outbox_tests::relay_cli(args, &all).await?;
    Ok((out.code, out.text()))
}

async fn run_with_secrets(source: &str) -> Result<()> {
    let secrets = Secrets::new();
    let db = TestDb::migrated(&format!("sec_{source}")).await?;
    let dir = std::env::temp_dir().join(unique("outbox-secrets"));
    std::fs::create_dir_all(&dir)?;
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, format!("{}\n", secrets.admin_token))?;
    let url = url_with_passwords(&db.url, &secrets.db_password, &secrets.param_password);
    let mut env = secret_env(&secrets, &url, token_file.to_str().unwrap());
    let slot = unique("sec_slot");
    if source == "logical" {
        env.push(("OUTBOX_SOURCE", "logical".into()));
        env.push(("OUTBOX_SLOT", slot.clone()));
        env.push(("OUTBOX_PUBLICATION", format!("{slot}_pub")));
    }
    let oauth_flag = format!(
        "kafka.properties.sasl.oauthbearer.config=principal=relay token={}",
        secrets.oauth
    );
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let relay = RelayProcess::start(&db, &["--set", &oauth_flag], &env_refs).await?;
    relay.wait_for_log("this relay is active", LONG).await?;
    let addr = admin_addr(&relay.log()).expect("admin address logged");

    let agg = unique("sec");
    let mut tx = db.pool.begin().await?;
    Outbox::default()
        .publish_new(
            &mut tx,
            (0..5)
                .map(|i| NewEvent::new(&agg, format!("k{i}"), "Opened", None))
                .collect(),
        )
        .await?;
    tx.commit().await?;
    wait_drained(&db.pool, LONG).await?;

    let (code, _) = http_get_with_token(&addr, "/status", None).await?;
    assert_eq!(code, 401, "/status without the token");
    let (code, status) = http_get_with_token(&addr, "/status", Some(&secrets.admin_token)).await?;
    assert_eq!(code, 200, "{status}");
    secrets.assert_absent("/status", &status);
    let (code, metrics) = http_get_with_token(&addr, "/metrics", None).await?;
    assert_eq!(code, 200);
    secrets.assert_absent("/metrics", &metrics);

    let (code, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("DEBUG") && log.contains("sasl.password"),
        "the relay (and librdkafka's configuration dump) did not log at debug level:\n{log}"
    );
    secrets.assert_absent(&format!("the {source} relay's debug log"), &log);

    let mut print_env = env.clone();
    print_env.push((
        "OUTBOX_KAFKA_PROPERTIES",
        format!(
            "sasl.oauthbearer.config=principal=relay token={}",
            secrets.oauth
        ),
    ));
    let (code, printed) = relay_cli(&["config", "print"], &print_env).await?;
    assert_eq!(code, 0, "{printed}");
    secrets.assert_absent("`config print`", &printed);
    for key in [
        "\"sasl.password\" = \"<redacted>\"",
        "\"sasl.oauthbearer.config\" = \"<redacted>\"",
        "\"ssl.keystore.password\" = \"<redacted>\"",
        "database_url = \"<redacted>\"",
        "token = \"<redacted>\"",
    ] {
        assert!(printed.contains(key), "`{key}` missing:\n{printed}");
    }
    if source == "logical" {
        let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(&slot)
            .execute(&db.pool)
            .await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_the_debug_log_config_print_or_admin_endpoint_polling() -> Result<()> {
    run_with_secrets("polling").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_the_debug_log_config_print_or_admin_endpoint_logical() -> Result<()> {
    run_with_secrets("logical").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_unreachable_database_urls_fail_without_printing_their_passwords() -> Result<()> {
    let secrets = Secrets::new();
    let (pw, param) = (&secrets.db_password, &secrets.param_password);
    for (what, url) in [
        (
            "a bad port",
            format!("postgres://app:{pw}@127.0.0.1:notaport/db?password={param}"),
        ),
        (
            "an unreachable server",
            format!("postgres://app:{pw}@127.0.0.1:1/db?sslmode=disable&password={param}"),
        ),
        (
            "sslmode=allow",
            format!("postgres://app:{pw}@127.0.0.1:1/db?sslmode=allow&password={param}"),
        ),
    ] {
        for source in ["polling", "logical"] {
            let env = vec![
                ("OUTBOX_DATABASE_URL", url.clone()),
                ("OUTBOX_SOURCE", source.to_owned()),
                ("OUTBOX_CONNECT_TIMEOUT", "1s".to_owned()),
                ("RUST_LOG", "debug".to_owned()),
            ];
            let (code, out) = relay_cli(&["run"], &env).await?;
            assert_ne!(code, 0, "{what} ({source}) did not fail:\n{out}");
            assert!(
                out.contains("database_url") || out.contains("PostgreSQL"),
                "{what} ({source}): the error does not name the database:\n{out}"
            );
            secrets.assert_absent(&format!("the error for {what} ({source})"), &out);
            let (_, out) = relay_cli(&["status"], &env).await?;
            secrets.assert_absent(&format!("`status` with {what}"), &out);
        }
    }
    Ok(())
}

#[test]
fn debug_of_the_configuration_redacts_every_secret() {
    // What a panic or an `expect` printing the configuration would show.
    let secrets = Secrets::new();
    let mut config = RelayConfig::default();
    config.database_url = outbox_relay::config::Secret::new(format!(
        "postgres://app:{}@db/app?password={}",
        secrets.db_password, secrets.param_password
    ));
    for (k, v) in [
        ("sasl.password", &secrets.sasl),
        ("sasl.oauthbearer.config", &secrets.oauth),
        ("ssl.keystore.password", &secrets.keystore),
    ] {
        config.kafka.properties.insert(k.into(), v.clone());
    }
    config.admin.token = Some(outbox_relay::config::Secret::new(
        secrets.admin_token.clone(),
    ));
    secrets.assert_absent("Debug of RelayConfig", &format!("{config:?}"));
    secrets.assert_absent("pretty Debug of RelayConfig", &format!("{config:#?}"));
    let logical = outbox_relay::source::logical::LogicalConfig::from_relay(
        &config,
        outbox_core::OutboxTable::default(),
    )
    .expect("logical settings");
    secrets.assert_absent("Debug of LogicalConfig", &format!("{logical:?}"));
}
