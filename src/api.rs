//! The HTTP API, on the TCP address of the configuration's `api_listen`.
//!
//! It serves what monitoring needs without credentials: `GET /healthz` and `GET /metrics` in
//! Prometheus text format. Errors, including unknown routes, share one JSON body:
//! `{"error": {"code": "…", "message": "…"}}`. Each request runs as its own tokio task (axum's
//! model) and reads the pools through the same handles the control socket uses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::control::Control;
use crate::pool::PoolStatus;
use crate::slot::SlotState;

/// The content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An error as every endpoint reports it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ApiError {
    #[serde(skip)]
    #[schema(ignore)]
    pub status: StatusCode,
    /// A stable, machine-readable name of the error.
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize, ToSchema)]
struct ErrorBody<'a> {
    error: &'a ApiError,
}

/// The OpenAPI description, generated from the handlers and types below.
#[derive(OpenApi)]
#[openapi(
    info(title = "warmpool", description = "The warmpool daemon's HTTP API."),
    paths(health, metrics, openapi),
    components(schemas(ApiError, Health, PoolHealth))
)]
pub struct ApiDoc;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: &self })).into_response()
    }
}

struct ApiState {
    control: Arc<Control>,
    /// Requests served, by route template and status code.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
}

pub fn router(control: Arc<Control>) -> Router {
    let state = Arc::new(ApiState { control, requests: Mutex::default() });
    Router::new()
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, control: Arc<Control>) {
    if let Err(e) = axum::serve(listener, router(control)).await {
        tracing::error!(error = %e, "The HTTP API stopped");
    }
}

#[derive(Serialize, ToSchema)]
struct Health {
    /// `ok`, or `degraded` when some pool has no slot that can take a job.
    status: &'static str,
    pools: Vec<PoolHealth>,
}

#[derive(Serialize, ToSchema)]
struct PoolHealth {
    name: String,
    slots: usize,
    ready: usize,
    quarantined: usize,
    queued: usize,
}

/// 200 while every pool can serve, 503 when a pool's slots are all quarantined, so that a
/// load balancer or an alert can tell a host that takes jobs from one that cannot.
#[utoipa::path(get, path = "/healthz", responses(
    (status = 200, description = "Every pool can take jobs", body = Health),
    (status = 503, description = "Some pool has every slot quarantined", body = Health),
))]
async fn health(State(state): State<Arc<ApiState>>) -> Response {
    let pools = pool_statuses(&state.control).await;
    let pools: Vec<PoolHealth> = pools
        .iter()
        .map(|pool| PoolHealth {
            name: pool.name.clone(),
            slots: pool.slots.len(),
            ready: pool.count(SlotState::Ready),
            quarantined: pool.count(SlotState::Quarantined),
            queued: pool.queued,
        })
        .collect();
    let degraded = pools.iter().any(|pool| pool.quarantined == pool.slots);
    let status = if degraded { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let body = Health { status: if degraded { "degraded" } else { "ok" }, pools };
    (status, Json(body)).into_response()
}

/// Slots, jobs, durations and API requests in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"),
))]
async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let pools = pool_statuses(&state.control).await;
    let mut text = state.control.metrics().render_prometheus(&pools);
    text.push_str("# HELP warmpool_api_requests_total HTTP API requests by route and status.\n");
    text.push_str("# TYPE warmpool_api_requests_total counter\n");
    for ((route, status), count) in state.requests.lock().expect("request counters").iter() {
        text.push_str(&format!(
            "warmpool_api_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}\n"
        ));
    }
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response()
}

/// This description.
#[utoipa::path(get, path = "/v1/openapi.json", responses(
    (status = 200, description = "The OpenAPI 3 description of this API", content_type = "application/json"),
))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn not_found(request: Request) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: format!("no route {} {}", request.method(), request.uri().path()),
    }
}

/// Counts requests by their route template, never by raw path: paths are unbounded.
async fn count_requests(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let response = next.run(request).await;
    let key = (route, response.status().as_u16());
    *state.requests.lock().expect("request counters").entry(key).or_default() += 1;
    response
}

async fn pool_statuses(control: &Control) -> Vec<PoolStatus> {
    let mut statuses = Vec::with_capacity(control.pools().len());
    for pool in control.pools() {
        if let Some(status) = pool.status().await {
            statuses.push(status);
        }
    }
    statuses
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::hypervisor::fake::{Boot, FakeHypervisor};
    use crate::metrics::Metrics;
    use crate::pool::Pool;

    async fn call(router: &Router, path: &str) -> (StatusCode, String, String) {
        let request = axum::http::Request::get(path).body(Body::empty()).unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, content_type, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn control_with(fake: &FakeHypervisor, dir: &std::path::Path) -> Arc<Control> {
        let config = crate::pool::tests::config(dir, 1, 1);
        let metrics = Arc::new(Metrics::default());
        let pool = Pool::start(&config, dir, Arc::new(fake.clone()), metrics.clone());
        pool.built().await;
        Control::new(vec![pool], metrics)
    }

    #[tokio::test]
    async fn health_is_ok_with_a_ready_slot_and_503_when_all_are_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeHypervisor::new();
        let control = control_with(&fake, dir.path()).await;
        let (status, _, body) = call(&router(control.clone()), "/healthz").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("\"status\":\"ok\"") && body.contains("\"ready\":1"), "{body}");
        crate::daemon::shutdown(&control).await;

        let dir = tempfile::tempdir().unwrap();
        let fake = FakeHypervisor::new();
        fake.set_boot(Boot::Silent);
        let mut config = crate::pool::tests::config(dir.path(), 1, 1);
        config.boot_timeout_secs = 1;
        let metrics = Arc::new(Metrics::default());
        let pool = Pool::start(&config, dir.path(), Arc::new(fake.clone()), metrics.clone());
        pool.built().await;
        let control = Control::new(vec![pool], metrics);
        let (status, _, body) = call(&router(control.clone()), "/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("\"status\":\"degraded\""), "{body}");
        crate::daemon::shutdown(&control).await;
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_and_count_requests_by_route() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeHypervisor::new();
        let control = control_with(&fake, dir.path()).await;
        let router = router(control.clone());
        call(&router, "/healthz").await;
        call(&router, "/no/such/thing").await;
        let (status, content_type, text) = call(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, PROMETHEUS_TEXT);
        assert!(text.contains("warmpool_slots{pool=\"test\",state=\"ready\"} 1"), "{text}");
        assert!(text.contains("warmpool_build_seconds_count 1"), "{text}");
        assert!(
            text.contains("warmpool_api_requests_total{route=\"/healthz\",status=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("warmpool_api_requests_total{route=\"unmatched\",status=\"404\"} 1"),
            "{text}"
        );
        crate::daemon::shutdown(&control).await;
    }

    #[tokio::test]
    async fn the_openapi_description_lists_every_route() {
        let dir = tempfile::tempdir().unwrap();
        let control = control_with(&FakeHypervisor::new(), dir.path()).await;
        let (status, _, body) = call(&router(control.clone()), "/v1/openapi.json").await;
        assert_eq!(status, StatusCode::OK);
        let description: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(description["openapi"].as_str().unwrap().starts_with("3."), "{body}");
        let paths: Vec<&String> = description["paths"].as_object().unwrap().keys().collect();
        assert_eq!(paths, ["/healthz", "/metrics", "/v1/openapi.json"]);
        crate::daemon::shutdown(&control).await;
    }

    #[tokio::test]
    async fn unknown_routes_get_the_json_error_body() {
        let dir = tempfile::tempdir().unwrap();
        let control = control_with(&FakeHypervisor::new(), dir.path()).await;
        let (status, content_type, body) = call(&router(control.clone()), "/v1/nothing").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(content_type, "application/json");
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["error"]["code"], "not_found");
        assert_eq!(value["error"]["message"], "no route GET /v1/nothing");
        crate::daemon::shutdown(&control).await;
    }
}
