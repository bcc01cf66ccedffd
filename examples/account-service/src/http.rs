//! The account service's HTTP API.
//!
//! | method | path | body | success |
//! |---|---|---|---|
//! | `POST` | `/accounts` | `{"owner", "email"}` | 201, the account (pending) |
//! | `GET` | `/accounts` | | 200, every account |
//! | `GET` | `/accounts/{id}` | | 200, the account |
//! | `POST` | `/accounts/{id}/activate` | | 200, the account (active) |
//! | `POST` | `/accounts/{id}/deactivate` | `{"reason"}` | 200, the account (inactive) |
//! | `PUT` | `/accounts/{id}/email` | `{"email"}` | 200, the account |
//! | `POST` | `/accounts/{id}/close` | `{"reason"}` | 200, the account (closed) |
//!
//! Rejected commands answer `{"error": code, "message": text}` with 404 (`account_not_found`),
//! 422 (`invalid_email`, `invalid_owner`) or 409 (`email_taken`, `email_unchanged`,
//! `account_closed`, `invalid_transition`), and write nothing — no row change, no event.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{Command, Rejection};
use crate::store::{Accounts, CommandError};

/// The body of an error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable code, e.g. `account_closed`.
    pub error: String,
    /// Human-readable explanation.
    pub message: String,
}

impl IntoResponse for CommandError {
    fn into_response(self) -> Response {
        let (status, code, message) = match &self {
            CommandError::Rejected(r) => {
                let status = match r {
                    Rejection::NotFound(_) => StatusCode::NOT_FOUND,
                    Rejection::InvalidEmail(_) | Rejection::InvalidOwner => {
                        StatusCode::UNPROCESSABLE_ENTITY
                    }
                    _ => StatusCode::CONFLICT,
                };
                (status, r.code(), r.to_string())
            }
            CommandError::Internal(e) => {
                tracing::error!(error = %e, "command failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the service log".to_owned(),
                )
            }
        };
        (
            status,
            Json(ErrorBody {
                error: code.to_owned(),
                message,
            }),
        )
            .into_response()
    }
}

/// `POST /accounts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenAccount {
    /// Owner name.
    pub owner: String,
    /// Email.
    pub email: String,
}

/// `POST /accounts/{id}/deactivate` and `/close`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reason {
    /// Why.
    #[serde(default)]
    pub reason: String,
}

/// `PUT /accounts/{id}/email`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeEmail {
    /// The new email.
    pub email: String,
}

/// The service's router.
pub fn router(accounts: Accounts) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/accounts", post(open).get(list))
        .route("/accounts/{id}", get(one))
        .route("/accounts/{id}/activate", post(activate))
        .route("/accounts/{id}/deactivate", post(deactivate))
        .route("/accounts/{id}/email", put(change_email))
        .route("/accounts/{id}/close", post(close))
        .with_state(accounts)
}

type Reply = Result<Response, CommandError>;

async fn open(State(accounts): State<Accounts>, Json(body): Json<OpenAccount>) -> Reply {
    let account = accounts.open(&body.owner, &body.email).await?;
    Ok((StatusCode::CREATED, Json(account)).into_response())
}

async fn list(State(accounts): State<Accounts>) -> Reply {
    Ok(Json(accounts.list().await?).into_response())
}

async fn one(State(accounts): State<Accounts>, Path(id): Path<Uuid>) -> Reply {
    Ok(Json(accounts.get(id).await?).into_response())
}

async fn run(accounts: &Accounts, id: Uuid, command: Command) -> Reply {
    Ok(Json(accounts.execute(id, &command).await?).into_response())
}

async fn activate(State(accounts): State<Accounts>, Path(id): Path<Uuid>) -> Reply {
    run(&accounts, id, Command::Activate).await
}

async fn deactivate(
    State(accounts): State<Accounts>,
    Path(id): Path<Uuid>,
    Json(body): Json<Reason>,
) -> Reply {
    let reason = body.reason;
    run(&accounts, id, Command::Deactivate { reason }).await
}

async fn change_email(
    State(accounts): State<Accounts>,
    Path(id): Path<Uuid>,
    Json(body): Json<ChangeEmail>,
) -> Reply {
    run(&accounts, id, Command::ChangeEmail { email: body.email }).await
}

async fn close(
    State(accounts): State<Accounts>,
    Path(id): Path<Uuid>,
    Json(body): Json<Reason>,
) -> Reply {
    let reason = body.reason;
    run(&accounts, id, Command::Close { reason }).await
}
