//! The operator's endpoints (`edge-outbox dead-letters requeue|drop`, `edge-outbox
//! replay` call them): they act through the running consumer, its handlers and the
//! service's single writer. On the service's port, which stays on loopback: like the
//! rest of the API they have no authentication.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::http::{ApiError, AppJson, AppPath, AppQuery, AppState, ErrorBody, ErrorCode};
use edge_outbox::consumer::dead_letters::Requeued;
use edge_outbox::consumer::AdminError;
use edge_outbox::retry::{truncated, LOG_DETAIL_MAX_CHARS};
use edge_outbox::StreamKey;

/// Longest note kept with a dropped dead letter, in characters.
pub const NOTE_MAX_CHARS: usize = 500;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/dead-letters/{id}/requeue", post(requeue))
        .route("/admin/dead-letters/{id}/drop", post(drop_dead_letter))
        .route("/admin/replay", post(replay))
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(requeue, drop_dead_letter, replay),
    components(schemas(ReplayBody, Done))
)]
pub struct Api;

/// The error answers of the admin endpoints, as the OpenAPI document lists them.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // a description for the document, never built
pub enum AdminErrors {
    /// `invalid_path`, `invalid_query` or `malformed_json`.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `not_found`: no such dead letter, or a stream this service does not consume.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// `request_timeout`: the body did not arrive in time.
    #[response(status = 408)]
    RequestTimeout(ErrorBody),
    /// `not_requeued`: the message was not applied (the reason says why); it stays.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// `body_too_large`.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// `unsupported_media_type`.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// `invalid_field`.
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// `internal`.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `consumer_unavailable`, `storage_busy`, `storage_full` or `storage_error`: retry later.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// What was done.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Done {
    /// The dead letter, for requeue and drop.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<i64>,
    /// `applied`, `already_applied`, `dropped` or `requested`.
    result: &'static str,
}

fn admin(state: &AppState) -> Result<&edge_outbox::ConsumerAdmin, ApiError> {
    state.admin.as_ref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::ConsumerUnavailable,
            "this service runs no consumer",
        )
    })
}

fn admin_error(e: AdminError) -> ApiError {
    match e {
        // The key is the request's own: echoed bounded.
        AdminError::NotConsumed(_) => {
            ApiError::not_found(truncated(&e.to_string(), LOG_DETAIL_MAX_CHARS))
        }
        AdminError::BadSequence(_) => ApiError::invalid("from_seq", e.to_string()),
        AdminError::NotSent(_) => ApiError::new(ErrorCode::ConsumerUnavailable, e.to_string()),
        AdminError::Db(db) => db.into(),
        AdminError::Apply(edge_outbox::consumer::inbox::ApplyError::Db(db)) => db.into(),
        AdminError::Apply(other) => ApiError::internal(other),
    }
}

/// Applies a dead letter again through this service's handlers and inbox rules. A
/// message whose handler failed is applied now, after the events of its stream that
/// came since (not in its place); one refused before its stream was read is taken as
/// if it had just arrived. See edge_outbox::consumer::dead_letters.
#[utoipa::path(post, path = "/admin/dead-letters/{id}/requeue", tag = "operator",
    params(("id" = i64, Path, description = "The dead letter's id", minimum = 1)),
    responses((status = 200, description = "`{\"id\", \"result\": \"applied\" | \"already_applied\"}`: it left dead_letters", body = Done), AdminErrors))]
pub(crate) async fn requeue(
    State(state): State<AppState>,
    AppPath(id): AppPath<i64>,
) -> Result<Json<Done>, ApiError> {
    let result = admin(&state)?.requeue(id).await.map_err(admin_error)?;
    let result = match result {
        None => return Err(ApiError::not_found(format!("no dead letter {id}"))),
        Some(Requeued::Applied) => "applied",
        Some(Requeued::AlreadyApplied) => "already_applied",
        Some(Requeued::NotApplied { reason }) => {
            return Err(ApiError::new(
                ErrorCode::NotRequeued,
                format!("dead letter {id} was not applied: {reason}"),
            ))
        }
    };
    tracing::info!(
        dead_letter = id,
        result,
        "an operator requeued a dead letter"
    );
    Ok(Json(Done {
        id: Some(id),
        result,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DropQuery {
    /// Why it is dropped (kept in dead_letter_actions), at most 500 characters.
    #[param(max_length = 500)]
    note: Option<String>,
}

/// Sets a dead letter aside: it leaves dead_letters; a copy stays in
/// dead_letter_actions with the note and the time.
#[utoipa::path(post, path = "/admin/dead-letters/{id}/drop", tag = "operator",
    params(("id" = i64, Path, description = "The dead letter's id", minimum = 1), DropQuery),
    responses((status = 200, description = "`{\"id\", \"result\": \"dropped\"}`", body = Done), AdminErrors))]
pub(crate) async fn drop_dead_letter(
    State(state): State<AppState>,
    AppPath(id): AppPath<i64>,
    AppQuery(q): AppQuery<DropQuery>,
) -> Result<Json<Done>, ApiError> {
    if let Some(note) = &q.note {
        if note.chars().count() > NOTE_MAX_CHARS || note.chars().any(char::is_control) {
            let msg = format!(
                "note must be at most {NOTE_MAX_CHARS} characters, none of them control characters"
            );
            return Err(ApiError::invalid_query("note", msg));
        }
    }
    let found = admin(&state)?
        .drop_dead_letter(id, q.note)
        .await
        .map_err(admin_error)?;
    if !found {
        return Err(ApiError::not_found(format!("no dead letter {id}")));
    }
    tracing::info!(dead_letter = id, "an operator dropped a dead letter");
    Ok(Json(Done {
        id: Some(id),
        result: "dropped",
    }))
}

/// The body of POST /admin/replay.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// The producer (its --source), e.g. `user-service`.
    #[schema(min_length = 1, max_length = 64)]
    pub producer: String,
    /// Its stream, e.g. `users`.
    #[schema(min_length = 1, max_length = 64)]
    pub stream: String,
    /// The first sequence number to publish again.
    #[schema(minimum = 1)]
    pub from_seq: u64,
}

/// Asks the producer of a stream this service consumes to publish it again from a
/// sequence number, as this service's consumer. Events applied already come again as
/// duplicates (no effect). The producer serves a stream at most every few seconds and
/// a consumer a few times a minute; a request beyond that is dropped there.
#[utoipa::path(post, path = "/admin/replay", tag = "operator", request_body = ReplayBody,
    responses((status = 202, description = "`{\"result\": \"requested\"}`: the request is queued to the broker", body = Done), AdminErrors))]
pub(crate) async fn replay(
    State(state): State<AppState>,
    AppJson(body): AppJson<ReplayBody>,
) -> Result<(StatusCode, Json<Done>), ApiError> {
    let key = StreamKey {
        source: body.producer,
        stream: body.stream,
    };
    admin(&state)?
        .request_replay(key, body.from_seq)
        .await
        .map_err(admin_error)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Done {
            id: None,
            result: "requested",
        }),
    ))
}
