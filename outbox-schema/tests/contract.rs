//! The client against recorded exchanges of the Confluent Schema Registry API (the API reference,
//! "Schema Registry API Reference" of Confluent Platform: `POST /subjects/(string: subject)/versions`,
//! `POST /compatibility/subjects/(string: subject)/versions/(versionId: version)`,
//! `GET /schemas/ids/(int: id)`, and its error codes 40401, 40402, 409, 42201, 50001).
//!
//! A local HTTP server answers each request with the recorded response and records the request
//! as the client sent it, so the test checks both sides: what the client sends (method, path,
//! content type, body, basic auth) and how it reads each documented answer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use outbox_schema::{RegistryClient, RegistryConfig, RegistryError, SchemaFormat};
use serde_json::{Value, json};

#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    content_type: Option<String>,
    authorization: Option<String>,
    body: Option<Value>,
}

/// One recorded exchange: the answer to give (status, body).
type Answer = (u16, Value);

async fn server(answers: Vec<Answer>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let queue = Arc::new(Mutex::new(answers.into_iter()));
    let app = {
        let seen = seen.clone();
        axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let seen = seen.clone();
                let queue = queue.clone();
                async move {
                    let header = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned());
                    seen.lock().unwrap().push(Seen {
                        method,
                        path: uri.path().to_owned(),
                        content_type: header("content-type"),
                        authorization: header("authorization"),
                        body: serde_json::from_slice(&body).ok(),
                    });
                    let (status, body) =
                        queue.lock().unwrap().next().expect("an answer is recorded");
                    (
                        StatusCode::from_u16(status).unwrap(),
                        [("content-type", "application/vnd.schemaregistry.v1+json")],
                        body.to_string(),
                    )
                }
            },
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn client(url: &str) -> RegistryClient {
    RegistryClient::new(&RegistryConfig {
        url: url.to_owned(),
        username: Some("svc".into()),
        password: Some("s3cret".into()),
        timeout: Duration::from_secs(5),
        ca_pem: None,
    })
    .unwrap()
}

const STRING_SCHEMA: &str = r#"{"type": "string"}"#;

#[tokio::test]
async fn register_checked_sends_the_documented_requests_and_caches_the_id() {
    let (url, seen) = server(vec![
        // No version yet: error 40401, "Subject not found".
        (
            404,
            json!({"error_code": 40401, "message": "Subject 'test-value' not found."}),
        ),
        (200, json!({"id": 1})),
    ])
    .await;
    let c = client(&url);
    let id = c
        .register_checked("test-value", STRING_SCHEMA, SchemaFormat::Avro)
        .await
        .unwrap();
    assert_eq!(id, 1);
    // Cached: no further request (the server has no answer left and would panic).
    assert_eq!(
        c.register_checked("test-value", STRING_SCHEMA, SchemaFormat::Avro)
            .await
            .unwrap(),
        1
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(
        seen[0].path,
        "/compatibility/subjects/test-value/versions/latest"
    );
    assert_eq!(seen[1].method, Method::POST);
    assert_eq!(seen[1].path, "/subjects/test-value/versions");
    for s in &seen {
        assert_eq!(
            s.content_type.as_deref(),
            Some("application/vnd.schemaregistry.v1+json")
        );
        // Basic auth, `svc:s3cret` in base64.
        assert_eq!(s.authorization.as_deref(), Some("Basic c3ZjOnMzY3JldA=="));
        // Avro: `schemaType` left out.
        assert_eq!(s.body, Some(json!({"schema": STRING_SCHEMA})));
    }
}

#[tokio::test]
async fn json_schemas_carry_their_schema_type_and_subjects_are_escaped() {
    let (url, seen) = server(vec![
        (200, json!({"is_compatible": true})),
        (200, json!({"id": 7})),
    ])
    .await;
    let schema = r#"{"type": "object"}"#;
    let id = client(&url)
        .register_checked("a/b c", schema, SchemaFormat::JsonSchema)
        .await
        .unwrap();
    assert_eq!(id, 7);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen[0].path,
        "/compatibility/subjects/a%2Fb%20c/versions/latest"
    );
    assert_eq!(
        seen[1].body,
        Some(json!({"schema": schema, "schemaType": "JSON"}))
    );
}

#[tokio::test]
async fn documented_errors_are_told_apart() {
    let (url, _) = server(vec![
        (200, json!({"is_compatible": false})),
        (409, json!({"error_code": 409, "message": "Schema being registered is incompatible with an earlier schema"})),
        (422, json!({"error_code": 42201, "message": "Invalid schema"})),
        (500, json!({"error_code": 50001, "message": "Error in the backend data store"})),
        (401, json!({"error_code": 40101, "message": "Unauthorized"})),
    ])
    .await;
    let c = client(&url);
    let e = c
        .register_checked("s", STRING_SCHEMA, SchemaFormat::Avro)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RegistryError::Incompatible { subject, .. } if subject == "s"),
        "{e}"
    );
    let e = c
        .register("s", STRING_SCHEMA, SchemaFormat::Avro)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Incompatible { .. }), "{e}");
    assert!(e.to_string().contains("subject `s`"), "{e}");
    let e = c.register("s", "{", SchemaFormat::Avro).await.unwrap_err();
    assert!(matches!(e, RegistryError::InvalidSchema { .. }), "{e}");
    let e = c
        .register("s", STRING_SCHEMA, SchemaFormat::Avro)
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(e.to_string().contains("50001"), "{e}");
    let e = c
        .register("s", STRING_SCHEMA, SchemaFormat::Avro)
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert!(!e.to_string().contains("s3cret"), "{e}");
    assert!(e.to_string().contains(&url), "{e}");
}

#[tokio::test]
async fn protobuf_schemas_are_sent_as_proto_text_with_their_schema_type() {
    let (url, seen) = server(vec![
        (
            404,
            json!({"error_code": 40401, "message": "Subject 'p-value' not found."}),
        ),
        (200, json!({"id": 11})),
    ])
    .await;
    let proto = "syntax = \"proto3\";\npackage p;\nmessage A { string a = 1; }\n";
    let id = client(&url)
        .register_checked("p-value", proto, SchemaFormat::Protobuf)
        .await
        .unwrap();
    assert_eq!(id, 11);
    let seen = seen.lock().unwrap().clone();
    for request in &seen {
        assert_eq!(
            request.body,
            Some(json!({"schema": proto, "schemaType": "PROTOBUF"}))
        );
    }
    assert_eq!(seen[1].path, "/subjects/p-value/versions");
}

#[tokio::test]
async fn schemas_are_read_by_id() {
    let (url, seen) = server(vec![
        (200, json!({"schema": STRING_SCHEMA})),
        (200, json!({"schema": "{}", "schemaType": "JSON"})),
        (
            200,
            json!({"schema": "syntax = \"proto3\";\nmessage A { string a = 1; }\n",
                   "schemaType": "PROTOBUF"}),
        ),
        (
            404,
            json!({"error_code": 40403, "message": "Schema 4 not found"}),
        ),
    ])
    .await;
    let c = client(&url);
    let s = c.schema_by_id(1).await.unwrap();
    assert_eq!(
        (s.schema.as_str(), s.format),
        (STRING_SCHEMA, SchemaFormat::Avro)
    );
    assert_eq!(
        c.schema_by_id(2).await.unwrap().format,
        SchemaFormat::JsonSchema
    );
    assert_eq!(
        c.schema_by_id(3).await.unwrap().format,
        SchemaFormat::Protobuf
    );
    let e = c.schema_by_id(4).await.unwrap_err();
    assert!(
        matches!(
            e,
            RegistryError::Api {
                status: 404,
                code: Some(40403),
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(seen.lock().unwrap()[0].method, Method::GET);
    assert_eq!(seen.lock().unwrap()[0].path, "/schemas/ids/1");
}

#[tokio::test]
async fn an_unreachable_registry_is_transient_and_named() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let e = client(&url)
        .register_checked("s", STRING_SCHEMA, SchemaFormat::Avro)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Unreachable { .. }), "{e}");
    assert!(e.is_transient());
    assert!(e.to_string().contains(&url), "{e}");
}
