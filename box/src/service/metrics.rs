//! GET /metrics: the library's metrics ([`edge_outbox::metrics`]) and the HTTP
//! request durations, by route template and status, for Prometheus.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Unit;

use super::http::{ApiError, AppState, ReadErrors};
use edge_outbox::metrics::{Metrics, CONTENT_TYPE};

/// Labels of an HTTP request: all from small fixed sets (a route template, never a
/// path a client chose).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

type Requests = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The service's metrics: the library's, with the HTTP histogram registered in them.
pub struct ServiceMetrics {
    metrics: Metrics,
    requests: Requests,
}

impl ServiceMetrics {
    pub fn new(mut metrics: Metrics) -> ServiceMetrics {
        // 0.5 ms .. 8 s.
        let requests: Requests =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 15)));
        metrics.registry_mut().register_with_unit(
            "http_request_duration",
            "Time from a request's arrival to its response's head, by route template, method and status",
            Unit::Seconds,
            requests.clone(),
        );
        ServiceMetrics { metrics, requests }
    }
}

/// A method from the fixed set, so that a client cannot mint label values.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: times every request.
pub(crate) async fn track(
    State(metrics): State<Arc<ServiceMetrics>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    // Routes are templates ("/users/{id}"); anything that matched none is one label.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(req).await;
    let labels = RequestLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    metrics
        .requests
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The metrics in the OpenMetrics text format, for Prometheus.
#[utoipa::path(get, path = "/metrics", tag = "both services",
    responses((status = 200, description = "OpenMetrics text (`application/openmetrics-text`): the outbox, the relay, the consumer, the writer and HTTP; see docs/operations.md", content_type = "application/openmetrics-text", body = String), ReadErrors))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let page = state.metrics.metrics.render().await?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], page).into_response())
}
