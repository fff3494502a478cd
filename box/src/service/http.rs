//! HTTP plumbing shared by the services: one error type that renders as
//! `{"error": code, "message": ..., "field": ...}`, and extractors whose rejections
//! use it.
//!
//! Bad input is a 4xx and is not logged; an internal error is a generic 500 and is
//! logged once, here.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;

use edge_outbox::outbox::OutboxError;
use edge_outbox::retry::{truncated, LOG_DETAIL_MAX_CHARS};
use edge_outbox::storage::DbError;
use edge_outbox::{ConsumerStatus, Database, Outbox, RelayStatus};

/// State shared by the HTTP handlers of a service.
#[derive(Clone)]
pub struct AppState {
    pub db: Database,
    pub outbox: Outbox,
    pub relay: Arc<RelayStatus>,
    pub consumer: Arc<ConsumerStatus>,
    pub metrics: Arc<super::metrics::ServiceMetrics>,
    /// The running consumer's operator handle (the admin endpoints); None in tests
    /// that run no consumer.
    pub admin: Option<edge_outbox::ConsumerAdmin>,
}

impl AppState {
    /// The state of a service, with its metrics over the same database and statuses.
    pub fn new(
        db: Database,
        outbox: Outbox,
        relay: Arc<RelayStatus>,
        consumer: Arc<ConsumerStatus>,
    ) -> AppState {
        let metrics = edge_outbox::Metrics::new(&db, outbox.source())
            .relay(relay.clone())
            .consumer(consumer.clone());
        AppState {
            db,
            outbox,
            relay,
            consumer,
            metrics: Arc::new(super::metrics::ServiceMetrics::new(metrics)),
            admin: None,
        }
    }

    /// With the running consumer's operator handle.
    pub fn with_admin(mut self, admin: edge_outbox::ConsumerAdmin) -> AppState {
        self.admin = Some(admin);
        self
    }
}

/// Every `error` code an answer can carry: the README's API reference lists the same
/// (a test compares them), and the OpenAPI document (GET /openapi.json) is made from
/// this type, so neither can name a code the services do not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    MalformedJson,
    InvalidQuery,
    InvalidPath,
    InvalidHeader,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    DuplicateEmail,
    BodyTooLarge,
    EventTooLarge,
    UnsupportedMediaType,
    InvalidField,
    InsufficientFunds,
    IdempotencyKeyReused,
    StorageBusy,
    StorageFull,
    StorageError,
    BacklogFull,
    NotRequeued,
    ConsumerUnavailable,
    Internal,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 21] = [
        ErrorCode::MalformedJson,
        ErrorCode::InvalidQuery,
        ErrorCode::InvalidPath,
        ErrorCode::InvalidHeader,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::RequestTimeout,
        ErrorCode::DuplicateEmail,
        ErrorCode::BodyTooLarge,
        ErrorCode::EventTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::InvalidField,
        ErrorCode::InsufficientFunds,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::StorageBusy,
        ErrorCode::StorageFull,
        ErrorCode::StorageError,
        ErrorCode::BacklogFull,
        ErrorCode::NotRequeued,
        ErrorCode::ConsumerUnavailable,
        ErrorCode::Internal,
    ];

    /// The one status each code is answered with.
    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            MalformedJson | InvalidQuery | InvalidPath | InvalidHeader => StatusCode::BAD_REQUEST,
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            DuplicateEmail | NotRequeued => StatusCode::CONFLICT,
            BodyTooLarge | EventTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            InvalidField | InsufficientFunds | IdempotencyKeyReused => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            StorageBusy | StorageFull | StorageError | BacklogFull | ConsumerUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code as the answer spells it.
    pub fn as_str(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, machine-readable: `malformed_json`, `invalid_field`, `not_found`, ...
    pub code: ErrorCode,
    pub message: String,
    /// The request field at fault, when there is one.
    pub field: Option<String>,
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// What went wrong, for programs.
    error: ErrorCode,
    /// What went wrong, for people.
    message: String,
    /// The request field (or query parameter) at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
}

/// The error answers of a read (GET), as the OpenAPI document lists them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // a description for the document, never built
pub enum ReadErrors {
    /// `invalid_query` or `invalid_path`.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `not_found`: no such id.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// `internal`: a bug; the cause is in the service log.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `storage_busy` or `storage_error`: retry later.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The error answers of POST /users, as the OpenAPI document lists them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // a description for the document, never built
pub enum UserWriteErrors {
    /// `malformed_json` or `invalid_header`.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `request_timeout`: the body did not arrive in time.
    #[response(status = 408)]
    RequestTimeout(ErrorBody),
    /// `duplicate_email`.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// `body_too_large` or `event_too_large`.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// `unsupported_media_type`: no `Content-Type: application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// `invalid_field` or `idempotency_key_reused`.
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// `internal`: a bug; the cause is in the service log.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `storage_busy`, `storage_full`, `storage_error` or `backlog_full`: retry later
    /// with the same `Idempotency-Key`.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The error answers of POST /transactions, as the OpenAPI document lists them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // a description for the document, never built
pub enum LedgerWriteErrors {
    /// `malformed_json` or `invalid_header`.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `not_found`: transaction-service has not seen the user (yet).
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// `request_timeout`: the body did not arrive in time.
    #[response(status = 408)]
    RequestTimeout(ErrorBody),
    /// `body_too_large` or `event_too_large`.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// `unsupported_media_type`: no `Content-Type: application/json`.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// `invalid_field`, `insufficient_funds` or `idempotency_key_reused`.
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// `internal`: a bug; the cause is in the service log.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `storage_busy`, `storage_full`, `storage_error` or `backlog_full`: retry later
    /// with the same `Idempotency-Key`.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

impl ApiError {
    /// An answer with `code`, and the status that goes with it ([`ErrorCode::status`]).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status: code.status(),
            code,
            message: message.into(),
            field: None,
        }
    }

    /// 422 `invalid_field` naming `field`.
    pub fn invalid(field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(field.to_owned()),
            ..ApiError::new(ErrorCode::InvalidField, message)
        }
    }

    /// 400 `invalid_query` naming the query parameter `field`.
    pub fn invalid_query(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidQuery, message).with_field(field)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, message)
    }

    /// 500 with a generic message; the cause is logged, not sent.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(ErrorCode::Internal, "internal error; see the service log")
    }

    pub fn with_field(mut self, field: &str) -> ApiError {
        self.field = Some(field.to_owned());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            message: self.message,
            field: self.field,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> ApiError {
        if e.is_disk_full() {
            tracing::error!(error = %e, "write refused: the disk is full");
            ApiError::new(
                ErrorCode::StorageFull,
                "the disk is full; nothing was written, try again later",
            )
        } else if e.is_io_error() {
            tracing::error!(error = %e, "write failed: disk I/O error");
            ApiError::new(ErrorCode::StorageError,
                "the disk reported an I/O error; the write may or may not have been kept: retry with the same Idempotency-Key",
            )
        } else if matches!(e, DbError::Commit { .. }) {
            // The whole group commit was rolled back: this request's writes with it.
            tracing::error!(error = %e, "write failed: its batch could not be committed");
            ApiError::new(ErrorCode::StorageError,
                "the database could not commit this write; nothing was kept: retry with the same Idempotency-Key",
            )
        } else if e.is_retryable() {
            tracing::warn!(error = %e, "write refused: database busy");
            ApiError::new(
                ErrorCode::StorageBusy,
                "the database is busy; nothing was written, try again",
            )
        } else {
            ApiError::internal(e)
        }
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> ApiError {
        DbError::from(e).into()
    }
}

impl From<OutboxError> for ApiError {
    fn from(e: OutboxError) -> ApiError {
        match e {
            OutboxError::Db(e) => e.into(),
            e @ OutboxError::BacklogFull { .. } => {
                tracing::warn!(error = %e, "write refused: outbox backlog full");
                ApiError::new(ErrorCode::BacklogFull, e.to_string())
            }
            OutboxError::PayloadTooLarge { .. } => {
                ApiError::new(ErrorCode::EventTooLarge, e.to_string())
            }
            other => ApiError::internal(other),
        }
    }
}

/// `Json<T>` whose rejections are [`ApiError`]s: 415 without `Content-Type:
/// application/json`, 413 above the body limit, 400 `malformed_json` for a body that
/// is not JSON, 422 `invalid_field` for JSON of the wrong shape: not an object, an
/// unknown, missing, repeated or wrongly typed field (with its `field`).
pub struct AppJson<T>(pub T);

impl<S, T> FromRequest<S> for AppJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<mime::Mime>().ok())
            .is_some_and(|m| {
                m.type_() == "application"
                    && (m.subtype() == "json" || m.suffix().is_some_and(|s| s == "json"))
            });
        if !json_type {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "send the body as JSON with Content-Type: application/json",
            ));
        }
        let limit = req
            .extensions()
            .get::<super::server::HttpLimits>()
            .map(|l| l.body_timeout);
        let read = axum::body::Bytes::from_request(req, state);
        let read = match limit {
            Some(limit) => tokio::time::timeout(limit, read).await.map_err(|_| {
                ApiError::new(
                    ErrorCode::RequestTimeout,
                    format!(
                        "the body did not arrive within {} ms (--http-body-timeout-ms)",
                        limit.as_millis()
                    ),
                )
            })?,
            None => read.await,
        };
        let body = read.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    ErrorCode::BodyTooLarge,
                    format!("the body exceeds {BODY_MAX_BYTES} bytes"),
                )
            } else {
                ApiError::new(
                    ErrorCode::MalformedJson,
                    format!("the body could not be read: {}", e.body_text()),
                )
            }
        })?;
        parse_json_object(&body).map(AppJson)
    }
}

/// Parses a request body that must be one JSON object of type `T`.
pub fn parse_json_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // First as any JSON: a syntax error is 400, and the top level must be an object
    // (serde would also take a struct from an array: ["Bob","bob@example.com"]).
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorCode::MalformedJson,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "the body must be a JSON object",
        ));
    }
    // Then from the bytes again (not the Value), so that a repeated key is seen, and
    // with the path of the field at fault.
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let detail = e.inner().to_string();
        let field = if path.is_empty() || path == "." {
            field_of(&detail)
        } else {
            Some(path.clone())
        };
        let message = match &field {
            Some(f) if !detail.contains(f.as_str()) => format!("{f}: {detail}"),
            _ => detail,
        };
        let mut err = ApiError::new(ErrorCode::InvalidField, message);
        err.field = field;
        err
    })
}

/// The answer to a path no route serves: 404 `not_found`, as JSON like every error.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such resource: {}", echoed(uri.path())))
}

/// A client's own path, as an error message repeats it: bounded.
fn echoed(path: &str) -> String {
    truncated(path, LOG_DETAIL_MAX_CHARS)
}

/// The answer to a method a route does not take: 405 `method_not_allowed`.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {}", echoed(uri.path())),
    )
}

/// The largest request body accepted.
pub const BODY_MAX_BYTES: usize = 64 * 1024;

/// The field a serde message is about: "name: invalid type..." or "unknown field `x`"
/// or "missing field `x`".
fn field_of(detail: &str) -> Option<String> {
    for marker in ["unknown field `", "missing field `", "duplicate field `"] {
        if let Some(rest) = detail.split(marker).nth(1) {
            return rest.split('`').next().map(str::to_owned);
        }
    }
    let (head, _) = detail.split_once(": ")?;
    (!head.contains(' ')).then(|| head.to_owned())
}

/// `Query<T>` with [`ApiError`] rejections (400 `invalid_query`).
pub struct AppQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for AppQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| AppQuery(q.0))
            .map_err(|e: QueryRejection| {
                let detail = e
                    .body_text()
                    .trim_start_matches("Failed to deserialize query string: ")
                    .to_owned();
                let mut err = ApiError::new(ErrorCode::InvalidQuery, detail.clone());
                err.field = field_of(&detail);
                err
            })
    }
}

/// `Path<T>` with [`ApiError`] rejections (400 `invalid_path`).
pub struct AppPath<T>(pub T);

impl<S, T> FromRequestParts<S> for AppPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // One spelling per id: "1", never "+1", "01" or "%2B1", which would alias user 1.
        // Checked on the decoded values, as the typed extractor will parse them.
        let raw = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(ErrorCode::InvalidPath, e.body_text()))?;
        for (_, value) in raw.iter() {
            if let Ok(n) = value.parse::<i64>() {
                if n.to_string() != value {
                    return Err(ApiError::new(ErrorCode::InvalidPath,
                        format!("{value:?}: ids in paths are written in decimal without a plus sign or leading zeros (e.g. /users/1)"),
                    ));
                }
            }
        }
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| AppPath(p.0))
            .map_err(|e: PathRejection| ApiError::new(ErrorCode::InvalidPath, e.body_text()))
    }
}

/// The cursor for the next page: the last id when the page came back full.
pub fn next_after(rows: usize, limit: u32, last_id: Option<i64>) -> Option<i64> {
    (rows == limit as usize).then_some(last_id).flatten()
}

/// The most rows one page returns.
pub const PAGE_MAX: u32 = 500;

/// Checks paging parameters: `limit` (default 50, 1 to [`PAGE_MAX`]) and `after` (an
/// id to continue after; default 0, from the start).
pub fn page(limit: Option<u32>, after: Option<i64>) -> Result<(u32, i64), ApiError> {
    let limit = limit.unwrap_or(50);
    if limit == 0 || limit > PAGE_MAX {
        let msg = format!("limit must be 1 to {PAGE_MAX}");
        return Err(ApiError::invalid_query("limit", msg));
    }
    let after = after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::invalid_query(
            "after",
            "after must not be negative",
        ));
    }
    Ok((limit, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_name_their_field() {
        assert_eq!(
            field_of("unknown field `nmae`, expected `name` or `email`"),
            Some("nmae".into())
        );
        assert_eq!(
            field_of("missing field `email` at line 1 column 2"),
            Some("email".into())
        );
        assert_eq!(
            field_of("name: invalid type: integer `1`, expected a string"),
            Some("name".into())
        );
        assert_eq!(field_of("invalid type: map, expected a string"), None);
    }
}
