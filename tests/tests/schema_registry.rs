//! Schema'd payloads end to end: a relay process with Avro, JSON Schema and Protobuf value
//! schemas, a schema registry, real PostgreSQL and the real broker.
//!
//! No schema registry server can run on the test machines (Karapace is not on the package
//! registries they reach, Apicurio needs Maven Central, there is no container engine), so the
//! registry is a fake served by this test: it implements exactly the endpoints the relay uses,
//! with the status codes and error bodies of Confluent's published Schema Registry API reference
//! (`POST /subjects/{subject}/versions` → `{"id"}`, 409 `error_code` 409 when incompatible,
//! 422 `error_code` 42201 for an invalid schema; `POST /compatibility/subjects/{subject}/versions/latest`
//! → `{"is_compatible"}`, 404 `error_code` 40401 for an unknown subject; `GET /schemas/ids/{id}`
//! → `{"schema", "schemaType"?}`, 404 `error_code` 40403). Compatibility is Confluent's default
//! level, BACKWARD, decided for Avro by the Avro library's schema resolution (the new schema must
//! read data written with the latest one); JSON Schemas and Protobuf files (which must compile)
//! are always compatible here. The client's
//! side of the same API is checked against recorded exchanges in `outbox-schema/tests/contract.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use outbox_schema::apache_avro::Schema as AvroSchema;
use outbox_schema::apache_avro::schema_compatibility::SchemaCompatibility;
use outbox_schema::protobuf::{self, ProtobufSchema};
use outbox_schema::{RegistryClient, RegistryConfig, SchemaFormat, wire};
use outbox_tests::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use serde_json::{Value, json};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// The fake registry's state: every version of every subject, and the global ids.
#[derive(Default)]
struct Registry {
    /// (schema text, schemaType) by global id (index + 1).
    schemas: Vec<(String, Option<String>)>,
    /// Ids of each subject's versions, oldest first.
    subjects: HashMap<String, Vec<u32>>,
    /// Answer every request with 503 (error code 50003, "error while forwarding the request"),
    /// as a registry that lost its backend does.
    down: bool,
}

type Shared = Arc<Mutex<Registry>>;

fn unavailable() -> (StatusCode, Json<Value>) {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        50003,
        "Error while forwarding the request to the primary".into(),
    )
}

fn error(status: StatusCode, code: i64, message: String) -> (StatusCode, Json<Value>) {
    (
        status,
        Json(json!({"error_code": code, "message": message})),
    )
}

/// The request body of registration and compatibility checks.
fn schema_of(body: &Value) -> Result<(String, Option<String>), (StatusCode, Json<Value>)> {
    let text = body["schema"].as_str().map(str::to_owned);
    let kind = body["schemaType"].as_str().map(str::to_owned);
    let Some(text) = text else {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            "Invalid schema: no `schema`".into(),
        ));
    };
    let valid = match kind.as_deref() {
        None | Some("AVRO") => AvroSchema::parse_str(&text).is_ok(),
        Some("JSON") => serde_json::from_str::<Value>(&text).is_ok(),
        Some("PROTOBUF") => ProtobufSchema::compile(&text, None).is_ok(),
        Some(_) => false,
    };
    if !valid {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            "Invalid schema".into(),
        ));
    }
    Ok((text, kind))
}

/// BACKWARD: the new schema reads what the latest version wrote.
fn compatible(latest: &(String, Option<String>), new: &(String, Option<String>)) -> bool {
    match (latest.1.as_deref(), new.1.as_deref()) {
        (None | Some("AVRO"), None | Some("AVRO")) => {
            let (Ok(writer), Ok(reader)) = (
                AvroSchema::parse_str(&latest.0),
                AvroSchema::parse_str(&new.0),
            ) else {
                return false;
            };
            SchemaCompatibility::can_read(&writer, &reader).is_ok()
        }
        (a, b) => a == b,
    }
}

async fn register(
    State(reg): State<Shared>,
    UrlPath(subject): UrlPath<String>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let schema = match schema_of(&body) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let mut reg = reg.lock().unwrap();
    if reg.down {
        return unavailable();
    }
    let versions = reg.subjects.get(&subject).cloned().unwrap_or_default();
    if let Some(&id) = versions
        .iter()
        .find(|&&id| reg.schemas[id as usize - 1] == schema)
    {
        return (StatusCode::OK, Json(json!({"id": id})));
    }
    if let Some(&latest) = versions.last()
        && !compatible(&reg.schemas[latest as usize - 1], &schema)
    {
        return error(
            StatusCode::CONFLICT,
            409,
            format!(
                "Schema being registered is incompatible with an earlier schema for subject \"{subject}\""
            ),
        );
    }
    // The same schema has one global id across subjects.
    let id = match reg.schemas.iter().position(|s| *s == schema) {
        Some(i) => i as u32 + 1,
        None => {
            reg.schemas.push(schema);
            reg.schemas.len() as u32
        }
    };
    reg.subjects.entry(subject).or_default().push(id);
    (StatusCode::OK, Json(json!({"id": id})))
}

async fn check(
    State(reg): State<Shared>,
    UrlPath(subject): UrlPath<String>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let schema = match schema_of(&body) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let reg = reg.lock().unwrap();
    if reg.down {
        return unavailable();
    }
    match reg.subjects.get(&subject).and_then(|v| v.last()) {
        None => error(
            StatusCode::NOT_FOUND,
            40401,
            format!("Subject '{subject}' not found."),
        ),
        Some(&latest) => (
            StatusCode::OK,
            Json(json!({"is_compatible": compatible(&reg.schemas[latest as usize - 1], &schema)})),
        ),
    }
}

async fn by_id(State(reg): State<Shared>, UrlPath(id): UrlPath<u32>) -> (StatusCode, Json<Value>) {
    let reg = reg.lock().unwrap();
    match id.checked_sub(1).and_then(|i| reg.schemas.get(i as usize)) {
        Some((schema, None)) => (StatusCode::OK, Json(json!({"schema": schema}))),
        Some((schema, Some(kind))) => (
            StatusCode::OK,
            Json(json!({"schema": schema, "schemaType": kind})),
        ),
        None => error(
            StatusCode::NOT_FOUND,
            40403,
            format!("Schema {id} not found"),
        ),
    }
}

/// Serves a fake registry on a free local port; returns its URL and state.
async fn fake_registry() -> Result<(String, Shared)> {
    let state = Shared::default();
    let app = axum::Router::new()
        .route("/subjects/{subject}/versions", post(register))
        .route(
            "/compatibility/subjects/{subject}/versions/latest",
            post(check),
        )
        .route("/schemas/ids/{id}", get(by_id))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, state))
}

fn registry_client(url: &str) -> Result<RegistryClient> {
    Ok(RegistryClient::new(&RegistryConfig {
        url: url.to_owned(),
        username: None,
        password: None,
        timeout: Duration::from_secs(5),
        ca_pem: None,
    })?)
}

const OPENED_AVSC: &str = r#"{
  "type": "record", "name": "AccountOpened", "namespace": "com.example.accounts",
  "fields": [
    {"name": "id", "type": "string"},
    {"name": "owner", "type": "string"},
    {"name": "balance", "type": "long"},
    {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["CHECKING", "SAVINGS"]}},
    {"name": "tags", "type": {"type": "array", "items": "string"}},
    {"name": "note", "type": ["null", "string"], "default": null}
  ]
}"#;

const NOTED_JSON_SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "AccountNoted",
  "type": "object",
  "required": ["text"],
  "properties": {"text": {"type": "string"}, "pinned": {"type": "boolean"}},
  "additionalProperties": false
}"#;

/// The Protobuf schema of `AccountFrozen`: the second message of its file, so its values carry
/// the message-index array `[1]` (not the `0` shortcut).
const FROZEN_PROTO: &str = r#"syntax = "proto3";
package com.example.accounts.v1;

import "google/protobuf/timestamp.proto";

message Audit {
  string by = 1;
}

message AccountFrozen {
  string id = 1;
  int64 balance = 2;
  Reason reason = 3;
  google.protobuf.Timestamp at = 4;
  repeated Audit audits = 5;
  enum Reason {
    REASON_UNSPECIFIED = 0;
    FRAUD = 1;
    COURT_ORDER = 2;
  }
}
"#;

/// A directory with the schema files and a relay configuration file.
struct Setup {
    dir: PathBuf,
    config: PathBuf,
}

impl Setup {
    /// The relay path of the configuration file.
    fn config(&self) -> Result<&str> {
        self.config.to_str().context("utf-8 path")
    }

    /// A relay process with this configuration on `db`, with extra environment `env`.
    async fn start(&self, db: &TestDb, env: &[(&str, &str)]) -> Result<RelayProcess> {
        RelayProcess::start(db, &["--config", self.config()?], env).await
    }
}

/// Stops `relay` with SIGTERM; it must exit 0.
async fn stop(relay: RelayProcess) -> Result<()> {
    let (code, log) = relay.terminate(WAIT).await?;
    ensure!(code == 0, "exit {code}: {log}");
    Ok(())
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup(registry: &str, opened_topic: &str, opened_avsc: &str) -> Result<Setup> {
    let dir = std::env::temp_dir().join(unique("schemas"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("account_opened.avsc"), opened_avsc)?;
    std::fs::write(dir.join("account_noted.json"), NOTED_JSON_SCHEMA)?;
    std::fs::write(dir.join("account_frozen.proto"), FROZEN_PROTO)?;
    let config = dir.join("relay.toml");
    let file = |name: &str| dir.join(name).display().to_string();
    std::fs::write(
        &config,
        format!(
            r#"
[schema_registry]
url = "{registry}"
timeout = "5s"

[route.routes]
AccountOpened = "{opened_topic}"

[[route.value_schemas]]
event_type = "AccountOpened"
format = "avro"
schema_file = "{opened}"

[[route.value_schemas]]
event_type = "AccountNoted"
format = "json_schema"
schema_file = "{noted}"

[[route.value_schemas]]
event_type = "AccountFrozen"
format = "protobuf"
schema_file = "{frozen}"
message = "AccountFrozen"
subject_strategy = "topic_record"
"#,
            opened = file("account_opened.avsc"),
            noted = file("account_noted.json"),
            frozen = file("account_frozen.proto"),
        ),
    )?;
    Ok(Setup { dir, config })
}

async fn insert(
    pool: &sqlx::PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    event_type: &str,
    payload: &Value,
) -> Result<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(event_type)
    .bind(payload)
    .execute(pool)
    .await?;
    Ok(id)
}

/// A record as bytes.
#[derive(Debug)]
struct Raw {
    value: Vec<u8>,
    headers: BTreeMap<String, String>,
}

impl Raw {
    fn id(&self) -> Uuid {
        Uuid::parse_str(&self.headers["id"]).expect("id header")
    }
}

/// Reads `topic` (one partition) from the start until `n` records arrived.
async fn consume_raw(topic: &str, n: usize) -> Result<Vec<Raw>> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", services().bootstrap)
            .set("group.id", unique("schema-reader"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        // Assigned, not subscribed: no group rebalance to wait for (each test topic has one
        // partition).
        let mut assignment = rdkafka::TopicPartitionList::new();
        assignment.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)?;
        consumer.assign(&assignment)?;
        let deadline = Instant::now() + WAIT;
        let mut out = Vec::new();
        while out.len() < n {
            ensure!(
                Instant::now() < deadline,
                "only {} of {n} records on {topic}",
                out.len()
            );
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m?;
            let mut headers = BTreeMap::new();
            if let Some(h) = m.headers() {
                for i in 0..h.count() {
                    let h = h.get(i);
                    headers.insert(
                        h.key.to_owned(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            out.push(Raw {
                value: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
        Ok(out)
    })
    .await?
}

async fn parked_reasons(pool: &sqlx::PgPool, n: usize) -> Result<BTreeMap<Uuid, String>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, reason FROM outbox_parked")
            .fetch_all(pool)
            .await?;
        if rows.len() >= n {
            return Ok(rows.into_iter().collect());
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {n} parked",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn subject_id(reg: &Shared, subject: &str) -> Option<u32> {
    reg.lock()
        .unwrap()
        .subjects
        .get(subject)
        .and_then(|v| v.last().copied())
}

fn opened(id: &str, balance: Value, note: Value) -> Value {
    json!({
        "id": id, "owner": "Ada", "balance": balance, "kind": "SAVINGS",
        "tags": ["new", "eu"], "note": note
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_and_json_schema_values_in_the_confluent_wire_format() -> Result<()> {
    init_logging();
    let db = TestDb::migrated("schema_e2e").await?;
    let (url, reg) = fake_registry().await?;
    let aggregate_type = unique("acct");
    let opened_topic = format!("{aggregate_type}.opened");
    // AccountNoted has no route of its own: its topic comes from the template.
    let noted_topic = format!("outbox.event.{aggregate_type}");
    create_topic(&opened_topic, 1).await?;
    create_topic(&noted_topic, 1).await?;
    let setup = setup(&url, &opened_topic, OPENED_AVSC)?;

    let relay = setup.start(&db, &[]).await?;
    // The static subject is checked and registered at start-up, before any event.
    relay
        .wait_for_log("value schema checked and registered", WAIT)
        .await?;
    let opened_subject = format!("{opened_topic}-value");
    let opened_id = subject_id(&reg, &opened_subject)
        .with_context(|| format!("{opened_subject} registered at start-up"))?;

    let pool = &db.pool;
    let good1 = opened("a-1", json!(12), json!(null));
    let good2 = opened("a-2", json!(7), json!("vip"));
    let e1 = insert(pool, &aggregate_type, "1", "AccountOpened", &good1).await?;
    // Does not fit: `balance` must be a long.
    let bad = insert(
        pool,
        &aggregate_type,
        "3",
        "AccountOpened",
        &opened("a-3", json!("lots"), json!(null)),
    )
    .await?;
    let held = insert(pool, &aggregate_type, "3", "AccountOpened", &good1).await?;
    let e2 = insert(pool, &aggregate_type, "2", "AccountOpened", &good2).await?;
    let noted = json!({"text": "called the customer", "pinned": true});
    let n1 = insert(pool, &aggregate_type, "1", "AccountNoted", &noted).await?;
    let bad_note = insert(
        pool,
        &aggregate_type,
        "4",
        "AccountNoted",
        &json!({"text": 5}),
    )
    .await?;
    let closed = json!({"reason": "moved"});
    let c1 = insert(pool, &aggregate_type, "1", "AccountClosed", &closed).await?;

    // Avro: magic byte, the registry's id, then a datum the schema fetched by that id decodes to
    // the payload.
    let records = consume_raw(&opened_topic, 2).await?;
    let client = registry_client(&url)?;
    let mut by_id = BTreeMap::new();
    for r in &records {
        let (id, body) = wire::decode(&r.value)?;
        ensure!(id == opened_id, "schema id {id}, registry has {opened_id}");
        ensure!(
            r.headers["content-type"] == "application/avro",
            "{:?}",
            r.headers
        );
        let registered = client.schema_by_id(id).await?;
        ensure!(registered.format == SchemaFormat::Avro);
        let schema = AvroSchema::parse_str(&registered.schema)?;
        let datum = outbox_schema::apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()?
            .read_value(&mut &body[..])?;
        by_id.insert(r.id(), Value::try_from(datum)?);
    }
    ensure!(
        by_id == BTreeMap::from([(e1, good1), (e2, good2)]),
        "decoded: {by_id:?}"
    );

    // JSON Schema, on a templated topic (registered at first use): the header, then the JSON.
    let noted_subject = format!("{noted_topic}-value");
    let records = consume_raw(&noted_topic, 2).await?;
    let noted_id = subject_id(&reg, &noted_subject).context("JSON Schema subject registered")?;
    let mut values = BTreeMap::new();
    for r in &records {
        values.insert(r.id(), r.value.clone());
    }
    let (id, body) = wire::decode(&values[&n1])?;
    ensure!(id == noted_id, "schema id {id}, registry has {noted_id}");
    ensure!(serde_json::from_slice::<Value>(body)? == noted);
    ensure!(
        client.schema_by_id(id).await?.format == SchemaFormat::JsonSchema,
        "JSON Schema registered with schemaType JSON"
    );
    // An event type without a schema keeps its plain JSON value.
    ensure!(
        serde_json::from_slice::<Value>(&values[&c1])? == closed,
        "plain JSON value: {:?}",
        String::from_utf8_lossy(&values[&c1])
    );

    // Misfits are parked with the event type and the schema error; their aggregates are held,
    // the other events flowed past them.
    let parked = parked_reasons(pool, 3).await?;
    let reason = parked.get(&bad).context("misfit parked")?;
    ensure!(
        reason.contains("event type `AccountOpened`")
            && reason.contains("account_opened.avsc")
            && reason.contains("$.balance"),
        "{reason}"
    );
    ensure!(
        parked.contains_key(&held),
        "same aggregate held: {parked:?}"
    );
    let reason = parked.get(&bad_note).context("JSON Schema misfit parked")?;
    ensure!(
        reason.contains("event type `AccountNoted`") && reason.contains("/text"),
        "{reason}"
    );
    wait_drained(pool, WAIT).await?;
    stop(relay).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_values_decode_with_the_descriptor_of_the_registered_proto() -> Result<()> {
    init_logging();
    let db = TestDb::migrated("schema_proto").await?;
    let (url, reg) = fake_registry().await?;
    let aggregate_type = unique("acct");
    // AccountFrozen has no route of its own: registered at first use, under `topic_record`.
    let topic = format!("outbox.event.{aggregate_type}");
    create_topic(&topic, 1).await?;
    let setup = setup(&url, &format!("{aggregate_type}.opened"), OPENED_AVSC)?;
    let relay = setup.start(&db, &[]).await?;
    let pool = &db.pool;
    let good1 = json!({"id": "f-1", "balance": "-1200", "reason": "FRAUD",
        "at": "2026-01-02T03:04:05Z", "audits": [{"by": "ops"}, {"by": "risk"}]});
    let good2 = json!({"id": "f-2", "balance": "0", "reason": "COURT_ORDER", "audits": []});
    let f1 = insert(pool, &aggregate_type, "1", "AccountFrozen", &good1).await?;
    // Does not fit: `reason` is not a symbol of the enum.
    let bad = insert(
        pool,
        &aggregate_type,
        "3",
        "AccountFrozen",
        &json!({"id": "f-3", "reason": "SUSPICIOUS_NAME"}),
    )
    .await?;
    let f2 = insert(pool, &aggregate_type, "2", "AccountFrozen", &good2).await?;

    let records = consume_raw(&topic, 2).await?;
    let subject = format!("{topic}-com.example.accounts.v1.AccountFrozen");
    let registered_id = subject_id(&reg, &subject).context("topic_record subject registered")?;
    let client = registry_client(&url)?;
    let mut decoded = BTreeMap::new();
    for r in &records {
        ensure!(
            r.headers["content-type"] == "application/x-protobuf",
            "{:?}",
            r.headers
        );
        let (id, body) = wire::decode(&r.value)?;
        ensure!(
            id == registered_id,
            "schema id {id}, registry has {registered_id}"
        );
        // The second message of the file: count 1, index 1 (zig-zag varints 2, 2).
        ensure!(body[..2] == [2, 2], "message indexes: {:?}", &body[..2]);
        // A consumer's view: the .proto fetched by the id, compiled, the message found by the
        // index array.
        let registered = client.schema_by_id(id).await?;
        ensure!(registered.format == SchemaFormat::Protobuf);
        let file = ProtobufSchema::compile(&registered.schema, None)?;
        let message = protobuf::decode(&file, body)?;
        ensure!(
            outbox_schema::prost_reflect::ReflectMessage::descriptor(&message).full_name()
                == "com.example.accounts.v1.AccountFrozen"
        );
        decoded.insert(r.id(), serde_json::to_value(&message)?);
    }
    // The protobuf JSON mapping leaves out default values (`"balance": "0"`, empty lists).
    let good2_decoded = json!({"id": "f-2", "reason": "COURT_ORDER"});
    ensure!(
        decoded == BTreeMap::from([(f1, good1), (f2, good2_decoded)]),
        "decoded: {decoded:?}"
    );
    let parked = parked_reasons(pool, 1).await?;
    let reason = parked.get(&bad).context("misfit parked")?;
    ensure!(
        reason.contains("event type `AccountFrozen`")
            && reason.contains("account_frozen.proto")
            && reason.contains("$.reason")
            && !reason.contains("SUSPICIOUS_NAME"),
        "{reason}"
    );
    wait_drained(pool, WAIT).await?;
    stop(relay).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_schema_or_no_registry_stops_the_start_naming_subject_and_registry()
-> Result<()> {
    init_logging();
    let db = TestDb::migrated("schema_incompat").await?;
    let (url, reg) = fake_registry().await?;
    let topic = unique("accounts.opened");
    let subject = format!("{topic}-value");
    // Version 1 has no `owner`; the configured schema adds it without a default: it cannot read
    // version 1's data, so it is not BACKWARD compatible.
    let v1 = r#"{"type": "record", "name": "AccountOpened", "namespace": "com.example.accounts",
        "fields": [{"name": "id", "type": "string"}]}"#;
    let v2 = r#"{"type": "record", "name": "AccountOpened", "namespace": "com.example.accounts",
        "fields": [{"name": "id", "type": "string"}, {"name": "owner", "type": "string"}]}"#;
    registry_client(&url)?
        .register(&subject, v1, SchemaFormat::Avro)
        .await?;
    let setup = setup(&url, &topic, v2)?;
    let relay = setup.start(&db, &[]).await?;
    let (code, log) = relay.wait_exit(WAIT).await?;
    ensure!(
        code != 0,
        "an incompatible schema must stop the start: {log}"
    );
    ensure!(
        log.contains(&subject) && log.contains(&url) && log.contains("incompatible"),
        "the error names subject and registry: {log}"
    );
    ensure!(
        reg.lock().unwrap().subjects[&subject].len() == 1,
        "nothing registered"
    );

    // A registry that cannot be reached stops the start too.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("http://{}", l.local_addr()?)
    };
    let setup = setup_at(&gone, &topic)?;
    let relay = setup.start(&db, &[]).await?;
    let (code, log) = relay.wait_exit(WAIT).await?;
    ensure!(
        code != 0,
        "an unreachable registry must stop the start: {log}"
    );
    ensure!(
        log.contains(&gone) && log.contains(&subject),
        "the error names subject and registry: {log}"
    );
    Ok(())
}

fn setup_at(registry: &str, topic: &str) -> Result<Setup> {
    setup(registry, topic, OPENED_AVSC)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_outage_delays_relaying_and_loses_nothing() -> Result<()> {
    init_logging();
    let db = TestDb::migrated("schema_outage").await?;
    let (url, reg) = fake_registry().await?;
    let aggregate_type = unique("acct");
    let opened_topic = format!("{aggregate_type}.opened");
    let noted_topic = format!("outbox.event.{aggregate_type}");
    create_topic(&noted_topic, 1).await?;
    let setup = setup(&url, &opened_topic, OPENED_AVSC)?;
    let relay = setup.start(&db, &[]).await?;
    relay
        .wait_for_log("value schema checked and registered", WAIT)
        .await?;
    // The registry fails after start-up; the templated topic's subject is not registered yet.
    reg.lock().unwrap().down = true;
    let noted = json!({"text": "while the registry was down"});
    let id = insert(&db.pool, &aggregate_type, "1", "AccountNoted", &noted).await?;
    relay
        .wait_for_log("schema registry unavailable; relaying waits for it", WAIT)
        .await?;
    // Waiting, not failing: the event is neither published nor parked.
    ensure!(unpublished(&db.pool).await? == 1, "the event waits");
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_parked")
        .fetch_one(&db.pool)
        .await?;
    ensure!(parked == 0, "nothing parked during an outage");
    reg.lock().unwrap().down = false;
    let records = consume_raw(&noted_topic, 1).await?;
    ensure!(records[0].id() == id);
    let (schema_id, body) = wire::decode(&records[0].value)?;
    ensure!(Some(schema_id) == subject_id(&reg, &format!("{noted_topic}-value")));
    ensure!(serde_json::from_slice::<Value>(body)? == noted);
    wait_drained(&db.pool, WAIT).await?;
    stop(relay).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schemad_event_the_broker_refuses_is_parked_as_json_and_parked_retry_encodes_it()
-> Result<()> {
    init_logging();
    let db = TestDb::migrated("schema_refused").await?;
    let (url, reg) = fake_registry().await?;
    let aggregate_type = unique("acct");
    let opened_topic = format!("{aggregate_type}.opened");
    create_topic(&opened_topic, 1).await?;
    let setup = setup(&url, &opened_topic, OPENED_AVSC)?;
    let config = setup.config()?;
    let small = (
        "OUTBOX_KAFKA_PROPERTIES",
        "message.max.bytes=10000,batch.size=10000",
    );
    let relay = setup.start(&db, &[small]).await?;
    // Encoded, this value is larger than the producer's message.max.bytes: refused for good.
    let big = opened("big", json!(1), json!("x".repeat(20_000)));
    let big_id = insert(&db.pool, &aggregate_type, "big", "AccountOpened", &big).await?;
    let fine = opened("fine", json!(2), json!(null));
    let fine_id = insert(&db.pool, &aggregate_type, "fine", "AccountOpened", &fine).await?;
    let records = consume_raw(&opened_topic, 1).await?;
    ensure!(records[0].id() == fine_id);
    parked_reasons(&db.pool, 1).await?;
    // Parked with its JSON payload, not the encoded bytes (the park table holds JSON).
    let parked: Value = sqlx::query_scalar("SELECT payload FROM outbox_parked WHERE id = $1")
        .bind(big_id)
        .fetch_one(&db.pool)
        .await?;
    ensure!(parked == big, "parked payload: {parked}");
    stop(relay).await?;

    // `parked retry` with room for it publishes it, encoded like the relay does.
    let out = relay_cli_on(
        &db,
        &["parked", "retry", "--all", "--config", config],
        &[(
            "OUTBOX_KAFKA_PROPERTIES",
            "message.max.bytes=100000,batch.size=100000",
        )],
    )
    .await?;
    ensure!(out.code == 0, "parked retry: {}", out.text());
    let records = consume_raw(&opened_topic, 2).await?;
    let retried = records
        .iter()
        .find(|r| r.id() == big_id)
        .context("retried record")?;
    let (schema_id, body) = wire::decode(&retried.value)?;
    ensure!(Some(schema_id) == subject_id(&reg, &format!("{opened_topic}-value")));
    let schema = AvroSchema::parse_str(OPENED_AVSC)?;
    let datum = outbox_schema::apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()?
        .read_value(&mut &body[..])?;
    ensure!(Value::try_from(datum)? == big);
    Ok(())
}
