//! Endpoints every service has: `/healthz`, `/outbox` (what the outbox, the relay and
//! the consumer are doing) and `/outbox/events` (the rows themselves, so that a person
//! can watch an event go from pending to published).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::http::{next_after, page, ApiError, AppQuery, AppState, ReadErrors};
use edge_outbox::outbox::{self, RowFilter};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/outbox", get(outbox_status))
        .route("/outbox/events", get(outbox_events))
        .route("/metrics", get(super::metrics::metrics))
}

/// The endpoints both services have, for GET /openapi.json.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(healthz, outbox_status, outbox_events, super::metrics::metrics),
    components(schemas(super::http::ErrorBody, super::http::ErrorCode))
)]
pub struct Api;

/// 200 `{"status":"ok"}` when the database answers and the broker delivers what this
/// service publishes; 503 `{"status":"degraded","reason":...}` when the relay's probe
/// finds that the broker drops its publishes (an ACL that denies them) or the broker
/// refuses its credentials. A broker that is merely down is not "degraded": writes go
/// on, offline first.
#[utoipa::path(get, path = "/healthz", tag = "both services",
    responses((status = 200, description = "`{\"status\":\"ok\"}`", body = Object),
              (status = 503, description = "`{\"status\":\"degraded\",\"reason\":...}`, or a storage error", body = Object),
              (status = 500, description = "`internal`", body = super::http::ErrorBody)))]
pub(crate) async fn healthz(
    State(state): State<AppState>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    state
        .db
        .read(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
        .await?;
    let refused = state.relay.publish_refused().or_else(|| {
        state.relay.connect_refused().then(|| {
            format!(
                "the broker refuses this service's connection: {} (check --mqtt-username and its password)",
                state.relay.connection_error().unwrap_or_default()
            )
        })
    });
    Ok(match refused {
        None => (StatusCode::OK, Json(json!({ "status": "ok" }))),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "degraded", "reason": reason })),
        ),
    })
}

#[derive(Serialize)]
struct StreamStatus {
    /// Last sequence number enqueued.
    last_seq: Option<u64>,
    /// Every event up to here has been published (PUBACKed).
    last_published_seq: u64,
    /// Lowest sequence number still held for replays.
    first_held_seq: u64,
}

/// What the outbox, the relay and the consumer are doing.
#[utoipa::path(get, path = "/outbox", tag = "both services",
    responses((status = 200, description = "Status", body = Object), ReadErrors))]
pub(crate) async fn outbox_status(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let (stats, streams, dead_letters, backlog, epoch, orphaned) = state
        .db
        .read(|c| {
            let heads = outbox::heads(c)?;
            let mut streams = BTreeMap::new();
            for (name, head) in heads {
                let last_seq = outbox::last_seq(c, &name)?;
                streams.insert(
                    name,
                    StreamStatus {
                        last_seq,
                        last_published_seq: head.head,
                        first_held_seq: head.first,
                    },
                );
            }
            let dead = edge_outbox::consumer::dead_letters::count(c)?;
            let orphaned: i64 = c.query_row(
                "SELECT COALESCE(SUM(orphaned_last - orphaned_first + 1), 0) FROM inbox_epoch_changes",
                [],
                |r| r.get(0),
            )?;
            Ok((
                outbox::stats(c)?,
                streams,
                dead,
                outbox::backlog(c)?,
                outbox::epoch(c)?,
                orphaned,
            ))
        })
        .await?;
    let consumer = &state.consumer;
    let positions: BTreeMap<String, Value> = consumer
        .streams()
        .into_iter()
        .map(|(k, p)| {
            (
                k,
                json!({ "position": p.position, "known_head": p.known_head, "lag": p.lag() }),
            )
        })
        .collect();
    Ok(Json(json!({
        "source": state.outbox.source(),
        "db_synchronous": state.db.synchronous().to_string(),
        "broker_connected": state.relay.connected(),
        "publish_refused": state.relay.publish_refused(),
        "broker_error": state.relay.connection_error(),
        "broker": state.relay.link().broker(),
        "broker_failovers": state.relay.link().failovers(),
        "subscription_refused": state.relay.link().subscription_refused(),
        "outbox": {
            "pending": stats.pending,
            "published": stats.published,
            "oldest_pending_age_ms": stats.oldest_pending_age_ms,
            "backlog": { "events": backlog.events, "bytes": backlog.bytes, "max_events": state.outbox.backlog_max_events(), "max_bytes": state.outbox.backlog_max_bytes() },
            "published_since_start": state.relay.marked_published(),
            "streams": streams,
            "epoch": epoch.epoch,
            "epoch_reason": epoch.reason,
            "epoch_started_at_ms": epoch.started_at_ms,
            "epochs_begun_since_start": state.relay.epoch_changes(),
        },
        "consumer": {
            "connected": consumer.connected(),
            "broker": consumer.link().broker(),
            "broker_failovers": consumer.link().failovers(),
            "subscription_refused": consumer.link().subscription_refused(),
            "received_since_start": consumer.received(),
            "applied_since_start": consumer.applied(),
            "duplicates_since_start": consumer.duplicates(),
            "dead_lettered_since_start": consumer.dead_lettered(),
            "replays_requested_since_start": consumer.replays_requested(),
            "dead_letters": dead_letters,
            "epoch_changes_since_start": consumer.epoch_changes(),
            "other_epoch_since_start": consumer.other_epoch(),
            "orphaned_events": orphaned,
            "producer_rewound": consumer.producer_rewound(),
            "streams": positions,
        },
    })))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// "pending", "published" or "all" (default).
    status: Option<String>,
    /// "asc" (default, oldest first) or "desc" (newest first; `after` then pages down).
    order: Option<String>,
    /// The row id to continue after.
    #[param(minimum = 0)]
    after: Option<i64>,
    /// Rows per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// The outbox rows themselves.
#[utoipa::path(get, path = "/outbox/events", tag = "both services", params(EventsQuery),
    responses((status = 200, description = "A page of outbox rows", body = Object), ReadErrors))]
pub(crate) async fn outbox_events(
    State(state): State<AppState>,
    AppQuery(q): AppQuery<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    let filter = match q.status.as_deref() {
        None | Some("all") => RowFilter::All,
        Some("pending") => RowFilter::Pending,
        Some("published") => RowFilter::Published,
        Some(other) => {
            let msg = format!("status {other:?} is not one of pending, published, all");
            return Err(ApiError::invalid_query("status", msg));
        }
    };
    let newest_first = match q.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            let msg = format!("order {other:?} is not asc or desc");
            return Err(ApiError::invalid_query("order", msg));
        }
    };
    let (limit, after) = page(q.limit, q.after)?;
    let rows = state
        .db
        .read(move |c| outbox::list(c, filter, None, after, limit, newest_first))
        .await?;
    let next_after = next_after(rows.len(), limit, rows.last().map(|x| x.id));
    Ok(Json(json!({ "events": rows, "next_after": next_after })))
}
