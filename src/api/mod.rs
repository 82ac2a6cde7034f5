//! The HTTP API, on the TCP address of the configuration's `api_listen`.
//!
//! Monitoring needs no credentials: `GET /healthz`, and `GET /metrics` in Prometheus text
//! format. The `/v1` resources ([`resources`]) take bearer tokens. Errors, unknown routes
//! included, share one JSON body: `{"error": {"code": "…", "message": "…", "field": "…"}}`.
//! Each request runs as its own tokio task (axum's model); store calls run on the blocking pool,
//! and pools are read through the same handles the control socket uses.

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
use crate::pool::{PoolStatus, SlotStatus};
use crate::slot::SlotState;
use crate::store::Store;

pub mod resources;
pub mod webhooks;

/// The largest request body: a secret of the store's largest size in JSON, with room to spare,
/// so that a too large secret gets the store's own error naming the field.
const MAX_BODY_BYTES: usize = 2 * crate::store::MAX_SECRET_BYTES + 4096;

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
    /// The request field the error is about, when it is about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), field: None }
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(field.to_owned()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid", message)
        }
    }
}

#[derive(Serialize, ToSchema)]
struct ErrorBody<'a> {
    error: &'a ApiError,
}

/// The OpenAPI description, generated from the handlers and types below.
#[derive(OpenApi)]
#[openapi(
    info(title = "warmpool", description = "The warmpool daemon's HTTP API."),
    paths(
        health, metrics, openapi,
        resources::list_tenants, resources::create_tenant, resources::get_tenant,
        resources::update_tenant, resources::delete_tenant,
        resources::list_secrets, resources::put_secret, resources::delete_secret,
        resources::list_tokens, resources::create_token, resources::revoke_token,
        resources::list_jobs, resources::get_job, resources::list_pools,
        resources::get_host, resources::drain_host, resources::resume_host, resources::list_audit,
        resources::submit_local_job, resources::local_job_output, resources::cancel_local_job,
        webhooks::github,
    ),
    components(schemas(ApiError, Health, PoolHealth, PoolStatus, SlotStatus, SlotState)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components
            .add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: &self })).into_response()
    }
}

pub struct ApiState {
    control: Arc<Control>,
    store: Arc<Store>,
    /// Requests served, by route template and status code.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
}

pub fn router(control: Arc<Control>, store: Arc<Store>) -> Router {
    use resources::*;
    let state = Arc::new(ApiState { control, store, requests: Mutex::default() });
    Router::new()
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/v1/tenants/{id}", get(get_tenant).patch(update_tenant).delete(delete_tenant))
        .route("/v1/tenants/{id}/secrets", get(list_secrets))
        .route(
            "/v1/tenants/{id}/secrets/{name}",
            axum::routing::put(put_secret).delete(delete_secret),
        )
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/pools", get(list_pools))
        .route("/v1/local/jobs", axum::routing::post(submit_local_job))
        .route("/v1/local/jobs/{id}", axum::routing::delete(cancel_local_job))
        .route("/v1/local/jobs/{id}/output", get(local_job_output))
        .route("/v1/audit", get(list_audit))
        .route("/v1/host", get(get_host))
        .route("/v1/host/drain", axum::routing::post(drain_host))
        .route("/v1/host/resume", axum::routing::post(resume_host))
        .route("/webhooks/github", axum::routing::post(webhooks::github))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// Serves the API on `listener` until the task is dropped.
/// A TLS handshake that takes longer than this is abandoned, so that idle connections cannot
/// pile up.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[error("Cannot use {path} for TLS: {reason}")]
pub struct TlsError {
    pub path: std::path::PathBuf,
    pub reason: String,
}

/// Reads the PEM certificate chain and private key of the API's TLS.
pub fn tls_acceptor(
    files: &crate::config::TlsFiles,
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let error = |path: &std::path::Path, reason: String| TlsError { path: path.to_owned(), reason };
    let chain = CertificateDer::pem_file_iter(&files.certificate)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| error(&files.certificate, e.to_string()))?;
    if chain.is_empty() {
        return Err(error(&files.certificate, "no certificate in the file".into()));
    }
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|e| error(&files.key, e.to_string()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error(&files.certificate, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| error(&files.key, e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves the API over TLS on `listener`, one task per connection.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    control: Arc<Control>,
    store: Arc<Store>,
) {
    let app = router(control, store);
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "Accepting an API connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let io = hyper_util::rt::TokioIo::new(tls);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

/// Marks requests that came through the unix socket, which only root can open.
#[derive(Clone, Copy)]
pub(crate) struct LocalRoot;

/// Serves the API on the unix socket, where every caller is root and acts as an admin.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    control: Arc<Control>,
    store: Arc<Store>,
) {
    let app = router(control, store).layer(axum::Extension(LocalRoot));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "The HTTP API on the unix socket stopped");
    }
}

pub async fn serve(listener: tokio::net::TcpListener, control: Arc<Control>, store: Arc<Store>) {
    if let Err(e) = axum::serve(listener, router(control, store)).await {
        tracing::error!(error = %e, "The HTTP API stopped");
    }
}

#[derive(Serialize, ToSchema)]
struct Health {
    /// `ok`; `starting` while some pool has not built a slot yet; `degraded` when some pool has
    /// no slot that can take a job; `draining` while the host takes no new jobs.
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

/// 200 while every pool can serve; 503 while starting, draining, or when a pool's slots are all
/// quarantined, so that a load balancer or an alert can tell a host that takes jobs from one
/// that cannot.
#[utoipa::path(get, path = "/healthz", responses(
    (status = 200, description = "Every pool can take jobs", body = Health),
    (status = 503, description = "Starting, draining, or some pool has every slot quarantined", body = Health),
))]
async fn health(State(state): State<Arc<ApiState>>) -> Response {
    let statuses = state.control.status().await;
    let pools: Vec<PoolHealth> = statuses
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
    let starting = statuses.iter().any(|pool| {
        pool.slots.iter().all(|slot| matches!(slot.state, SlotState::Empty | SlotState::Building))
    });
    let (status, word) = if state.control.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if starting {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    } else if degraded {
        (StatusCode::SERVICE_UNAVAILABLE, "degraded")
    } else {
        (StatusCode::OK, "ok")
    };
    (status, Json(Health { status: word, pools })).into_response()
}

/// Slots, jobs, durations and API requests in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"),
))]
async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let pools = state.control.status().await;
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
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {} {}", request.method(), request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    let message = format!("{} is not allowed on {}", request.method(), request.uri().path());
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", message)
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

#[cfg(test)]
mod tests;
