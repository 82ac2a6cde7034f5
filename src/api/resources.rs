//! The `/v1` resources: tenants, tokens, jobs and pools, behind bearer tokens.
//!
//! An admin token sees and changes everything. A tenant token sees its own tenant, its own
//! tokens and its own jobs, and nothing else: another tenant's resources answer 404, so their
//! existence does not leak, and what only an admin may do answers 403.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ApiState};
use crate::control::SubmitError;
use crate::local::LocalJob;
use crate::pool::PoolStatus;
use crate::store::{
    ApiToken, AuditEntry, Grant, JobCursor, JobFilter, JobRecord, JobState, NewTenant, Role,
    SecretInfo, StoreError, Tenant, TenantChange, TenantKind, MAX_CONCURRENT_JOBS,
};

/// Maps every store error to its status and code: the one place that decides them.
pub fn store_error_status(error: &StoreError) -> (StatusCode, &'static str) {
    match error {
        StoreError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
        StoreError::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
        StoreError::InUse { .. } => (StatusCode::CONFLICT, "in_use"),
        StoreError::Transition { .. } => (StatusCode::CONFLICT, "conflict"),
        StoreError::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid"),
        StoreError::Cancelled => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        StoreError::File { .. }
        | StoreError::Sqlite(_)
        | StoreError::Journal { .. }
        | StoreError::Migration { .. }
        | StoreError::SchemaTooNew { .. }
        | StoreError::Corrupt { .. }
        | StoreError::KeyFile { .. }
        | StoreError::Key { .. }
        | StoreError::Crypto { .. }
        | StoreError::Random(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        let (status, code) = store_error_status(&error);
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            // The details are for the operator's log, not for the caller.
            tracing::error!(error = %error, "Store failed during an API request");
            return ApiError::new(status, code, "internal error; see the daemon's log");
        }
        let field = match &error {
            StoreError::Invalid { field, .. } => Some(field.clone()),
            StoreError::Conflict { field, .. } => Some((*field).to_owned()),
            _ => None,
        };
        ApiError { field, ..ApiError::new(status, code, error.to_string()) }
    }
}

/// The caller, from its bearer token.
pub struct Caller(pub Grant);

impl Caller {
    fn is_admin(&self) -> bool {
        self.0.role == Role::Admin
    }

    /// Whether the caller may see resources of `tenant_id`.
    fn sees(&self, tenant_id: Option<&str>) -> bool {
        match &self.0.role {
            Role::Admin => true,
            Role::Tenant(own) => tenant_id == Some(own.as_str()),
        }
    }

    fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this needs an admin token"))
        }
    }
}

impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Caller, ApiError> {
        if parts.extensions.get::<super::LocalRoot>().is_some() {
            return Ok(Caller(Grant { token_id: "local-root".into(), role: Role::Admin }));
        }
        let unauthorized =
            |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("a bearer token is required"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?
            .trim()
            .to_owned();
        let grant = state.store.call(move |store| store.verify_token(&token)).await?;
        grant.map(Caller).ok_or_else(|| unauthorized("the token is unknown or revoked"))
    }
}

/// A JSON body whose every rejection (bad JSON, wrong type, too large) is an [`ApiError`].
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Body<T>, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let status = rejection.status();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ => "invalid",
    };
    let status =
        if status == StatusCode::UNPROCESSABLE_ENTITY { StatusCode::BAD_REQUEST } else { status };
    ApiError::new(status, code, rejection.body_text())
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("No {what} `{id}`"))
}

// --- tenants -------------------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// 1 to 64 of a-z, 0-9, `-` and `_`, starting with a letter.
    #[schema(pattern = r"^[a-z][a-z0-9_-]{0,63}$")]
    name: String,
    kind: TenantKind,
    /// Kind-specific settings: for `github`, the scope (`owner`, `owner` and `repository`, or
    /// `enterprise`), `app_id` and `installation_id` for a GitHub App (else the secret `token`
    /// is used), and optionally `runner_group_id`, `labels` and `api_url`; for `azure`,
    /// `organization_url` and `agent_pool`; for `local`, nothing.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    settings: serde_json::Value,
    /// The tenant's share of a full host relative to others, 1 to 1000.
    #[serde(default = "default_weight")]
    #[schema(minimum = 1, maximum = 1000)]
    weight: u32,
    /// At most this many of the tenant's jobs run at once; 0 stops new ones.
    #[serde(default = "default_max_jobs")]
    #[schema(minimum = 0, maximum = 4096)]
    max_concurrent_jobs: u32,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

fn default_weight() -> u32 {
    1
}

fn default_max_jobs() -> u32 {
    MAX_CONCURRENT_JOBS
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTenant {
    #[schema(pattern = r"^[a-z][a-z0-9_-]{0,63}$")]
    name: Option<String>,
    #[schema(value_type = Option<Object>)]
    settings: Option<serde_json::Value>,
    #[schema(minimum = 1, maximum = 1000)]
    weight: Option<u32>,
    #[schema(minimum = 0, maximum = 4096)]
    max_concurrent_jobs: Option<u32>,
}

/// Lists the tenants the caller may see.
#[utoipa::path(get, path = "/v1/tenants", security(("bearer" = [])), responses(
    (status = 200, body = Vec<Tenant>), (status = 401, body = ErrorResponse),
))]
pub async fn list_tenants(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<Tenant>>, ApiError> {
    let tenants = state.store.call(|store| store.list_tenants()).await?;
    Ok(Json(tenants.into_iter().filter(|tenant| caller.sees(Some(&tenant.id))).collect()))
}

/// Registers a tenant (admin only).
#[utoipa::path(post, path = "/v1/tenants", security(("bearer" = [])), request_body = CreateTenant, responses(
    (status = 201, body = Tenant), (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
    (status = 403, body = ErrorResponse), (status = 409, body = ErrorResponse), (status = 413, body = ErrorResponse),
(status = 415, body = ErrorResponse),
))]
pub async fn create_tenant(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Body(body): Body<CreateTenant>,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    caller.require_admin()?;
    let actor = caller.0.actor();
    let new = NewTenant {
        name: body.name,
        kind: body.kind,
        settings: body.settings,
        weight: body.weight,
        max_concurrent_jobs: body.max_concurrent_jobs,
    };
    let tenant = state.store.call(move |store| store.create_tenant(&actor, new)).await?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

/// Shows a tenant.
#[utoipa::path(get, path = "/v1/tenants/{id}", security(("bearer" = [])), params(("id" = String, Path)), responses(
    (status = 200, body = Tenant), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
))]
pub async fn get_tenant(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    if !caller.sees(Some(&id)) {
        return Err(not_found("tenant", &id));
    }
    Ok(Json(state.store.call(move |store| store.get_tenant(&id)).await?))
}

/// Changes a tenant's name, settings, weight or quota (admin only).
#[utoipa::path(patch, path = "/v1/tenants/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    request_body = UpdateTenant, responses(
    (status = 200, body = Tenant), (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
    (status = 403, body = ErrorResponse), (status = 404, body = ErrorResponse), (status = 409, body = ErrorResponse),
    (status = 413, body = ErrorResponse),
(status = 415, body = ErrorResponse),
))]
pub async fn update_tenant(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
    Body(body): Body<UpdateTenant>,
) -> Result<Json<Tenant>, ApiError> {
    if !caller.sees(Some(&id)) {
        return Err(not_found("tenant", &id));
    }
    caller.require_admin()?;
    let actor = caller.0.actor();
    let change = TenantChange {
        name: body.name,
        settings: body.settings,
        weight: body.weight,
        max_concurrent_jobs: body.max_concurrent_jobs,
    };
    Ok(Json(state.store.call(move |store| store.update_tenant(&actor, &id, change)).await?))
}

/// Removes a tenant with its secrets, tokens and finished jobs (admin only).
#[utoipa::path(delete, path = "/v1/tenants/{id}", security(("bearer" = [])), params(("id" = String, Path)), responses(
    (status = 204), (status = 401, body = ErrorResponse), (status = 403, body = ErrorResponse),
    (status = 404, body = ErrorResponse), (status = 409, body = ErrorResponse),
))]
pub async fn delete_tenant(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !caller.sees(Some(&id)) {
        return Err(not_found("tenant", &id));
    }
    caller.require_admin()?;
    let actor = caller.0.actor();
    state.store.call(move |store| store.delete_tenant(&actor, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- secrets -------------------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSecret {
    /// The secret, such as a GitHub App private key in PEM or an Azure DevOps token. It is
    /// encrypted at rest and never returned.
    #[schema(min_length = 1, max_length = 65536)]
    value: String,
}

/// Lists a tenant's secrets by name; values are never returned.
#[utoipa::path(get, path = "/v1/tenants/{id}/secrets", security(("bearer" = [])), params(("id" = String, Path)), responses(
    (status = 200, body = Vec<SecretInfo>), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
))]
pub async fn list_secrets(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<SecretInfo>>, ApiError> {
    if !caller.sees(Some(&id)) {
        return Err(not_found("tenant", &id));
    }
    let lookup = id.clone();
    state.store.call(move |store| store.get_tenant(&lookup)).await?;
    Ok(Json(state.store.call(move |store| store.list_secrets(&id)).await?))
}

/// Sets a tenant's secret; a tenant may set its own.
#[utoipa::path(put, path = "/v1/tenants/{id}/secrets/{name}", security(("bearer" = [])),
    params(("id" = String, Path), ("name" = String, Path)), request_body = PutSecret, responses(
    (status = 200, body = SecretInfo), (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
    (status = 404, body = ErrorResponse), (status = 413, body = ErrorResponse), (status = 415, body = ErrorResponse),
))]
pub async fn put_secret(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((id, name)): Path<(String, String)>,
    Body(body): Body<PutSecret>,
) -> Result<Json<SecretInfo>, ApiError> {
    if !caller.sees(Some(&id)) {
        return Err(not_found("tenant", &id));
    }
    let actor = caller.0.actor();
    let value = crate::store::Secret::new(body.value.into_bytes());
    Ok(Json(state.store.call(move |store| store.put_secret(&actor, &id, &name, &value)).await?))
}

/// Removes a tenant's secret.
#[utoipa::path(delete, path = "/v1/tenants/{id}/secrets/{name}", security(("bearer" = [])),
    params(("id" = String, Path), ("name" = String, Path)), responses(
    (status = 204), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
))]
pub async fn delete_secret(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((id, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    if !caller.sees(Some(&id)) {
        return Err(not_found("tenant", &id));
    }
    let actor = caller.0.actor();
    state.store.call(move |store| store.delete_secret(&actor, &id, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- tokens --------------------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    #[schema(min_length = 1, max_length = 128)]
    name: String,
    /// The tenant the token acts for; none makes an admin token (admin only).
    tenant_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    token: ApiToken,
    /// The token itself: shown this once, stored only as a hash.
    secret: String,
}

/// Lists the tokens the caller may see (never their secrets).
#[utoipa::path(get, path = "/v1/tokens", security(("bearer" = [])), responses(
    (status = 200, body = Vec<ApiToken>), (status = 401, body = ErrorResponse),
))]
pub async fn list_tokens(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<ApiToken>>, ApiError> {
    let tenant = match &caller.0.role {
        Role::Admin => None,
        Role::Tenant(id) => Some(id.clone()),
    };
    Ok(Json(state.store.call(move |store| store.list_tokens(tenant.as_deref())).await?))
}

/// Creates a token; its secret is in the answer and nowhere else.
#[utoipa::path(post, path = "/v1/tokens", security(("bearer" = [])), request_body = CreateToken, responses(
    (status = 201, body = CreatedToken), (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
    (status = 403, body = ErrorResponse), (status = 404, body = ErrorResponse), (status = 413, body = ErrorResponse),
(status = 415, body = ErrorResponse),
))]
pub async fn create_token(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Body(body): Body<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    match &body.tenant_id {
        None => caller.require_admin()?,
        Some(tenant) if !caller.sees(Some(tenant)) => return Err(not_found("tenant", tenant)),
        Some(_) => {}
    }
    let actor = caller.0.actor();
    let issued = state
        .store
        .call(move |store| store.create_token(&actor, body.tenant_id.as_deref(), &body.name))
        .await?;
    let secret = issued.plaintext.expose_str().unwrap_or_default().to_owned();
    Ok((StatusCode::CREATED, Json(CreatedToken { token: issued.token, secret })))
}

/// Revokes a token at once.
#[utoipa::path(delete, path = "/v1/tokens/{id}", security(("bearer" = [])), params(("id" = String, Path)), responses(
    (status = 204), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
))]
pub async fn revoke_token(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tenant = match &caller.0.role {
        Role::Admin => None,
        Role::Tenant(own) => Some(own.clone()),
    };
    let token_id = id.clone();
    let visible = state.store.call(move |store| store.list_tokens(tenant.as_deref())).await?;
    if !visible.iter().any(|token| token.id == token_id) {
        return Err(not_found("token", &id));
    }
    let actor = caller.0.actor();
    state.store.call(move |store| store.revoke_token(&actor, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

// --- jobs ----------------------------------------------------------------------------------

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobQuery {
    tenant: Option<String>,
    state: Option<JobState>,
    /// Only jobs queued at or after this time, in milliseconds since the Unix epoch.
    since_ms: Option<i64>,
    /// Only jobs queued before this time.
    before_ms: Option<i64>,
    /// The `next` cursor of the previous page.
    #[param(pattern = r"^[1-9][0-9]{0,18}$")]
    after: Option<String>,
    /// At most this many jobs, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    jobs: Vec<JobRecord>,
    /// Pass as `after` for the next page; absent on the last page.
    next: Option<String>,
}

/// Lists jobs, newest first, a page at a time.
#[utoipa::path(get, path = "/v1/jobs", security(("bearer" = [])), params(JobQuery), responses(
    (status = 200, body = JobList), (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
))]
pub async fn list_jobs(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    query: Result<Query<JobQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.body_text()))?;
    let tenant_id = match (&caller.0.role, query.tenant) {
        (Role::Admin, tenant) => tenant,
        (Role::Tenant(own), Some(asked)) if asked != *own => {
            return Ok(Json(JobList { jobs: vec![], next: None }))
        }
        (Role::Tenant(own), _) => Some(own.clone()),
    };
    let after = query.after.as_deref().map(str::parse::<JobCursor>).transpose()?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=crate::store::MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("{limit} is not within 1..={}", crate::store::MAX_PAGE),
        ));
    }
    let filter = JobFilter {
        tenant_id,
        state: query.state,
        queued_since_ms: query.since_ms,
        queued_before_ms: query.before_ms,
        after,
        limit,
    };
    let page = state.store.call(move |store| store.list_jobs(&filter)).await?;
    Ok(Json(JobList { jobs: page.jobs, next: page.next.map(|cursor| cursor.to_string()) }))
}

/// Shows one job.
#[utoipa::path(get, path = "/v1/jobs/{id}", security(("bearer" = [])), params(("id" = String, Path)), responses(
    (status = 200, body = JobRecord), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
))]
pub async fn get_job(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobRecord>, ApiError> {
    let lookup = id.clone();
    let job = state.store.call(move |store| store.get_job(&lookup)).await?;
    if !caller.sees(Some(&job.tenant_id)) {
        return Err(not_found("job", &id));
    }
    Ok(Json(job))
}

// --- pools ---------------------------------------------------------------------------------

/// A pool with the image generation its snapshots were built from.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolView {
    #[serde(flatten)]
    status: PoolStatus,
    image_generation: u64,
}

/// The pools of this host: every slot's state and job, and the image generation.
#[utoipa::path(get, path = "/v1/pools", security(("bearer" = [])), responses(
    (status = 200, body = Vec<PoolView>), (status = 401, body = ErrorResponse),
))]
pub async fn list_pools(
    State(state): State<Arc<ApiState>>,
    _caller: Caller,
) -> Result<Json<Vec<PoolView>>, ApiError> {
    let records = state.store.call(|store| store.list_pools()).await?;
    let pools = state.control.status().await;
    let views = pools
        .into_iter()
        .map(|status| {
            let image_generation = records
                .iter()
                .find(|record| record.name == status.name)
                .map_or(0, |record| record.image_generation);
            PoolView { status, image_generation }
        })
        .collect();
    Ok(Json(views))
}

// --- audit ---------------------------------------------------------------------------------

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only entries after this entry id.
    #[param(minimum = 0)]
    after: Option<i64>,
    /// At most this many entries, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// Every change made through the API or by the daemon: who, what, to what, when (admin only).
#[utoipa::path(get, path = "/v1/audit", security(("bearer" = [])), params(AuditQuery), responses(
    (status = 200, body = Vec<AuditEntry>), (status = 400, body = ErrorResponse),
    (status = 401, body = ErrorResponse), (status = 403, body = ErrorResponse),
))]
pub async fn list_audit(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    caller.require_admin()?;
    let Query(query) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.body_text()))?;
    if let Some(after) = query.after.filter(|after| *after < 0) {
        return Err(ApiError::invalid("after", format!("{after} is not an audit entry id")));
    }
    let limit = query.limit.unwrap_or(100);
    Ok(Json(state.store.call(move |store| store.list_audit(query.after, limit)).await?))
}

// --- host ----------------------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
pub struct Host {
    /// Whether the host refuses new jobs.
    draining: bool,
    /// Jobs running in slots now.
    jobs_running: usize,
    /// Jobs waiting for a slot.
    jobs_queued: usize,
}

async fn host(state: &ApiState) -> Host {
    let pools = state.control.status().await;
    Host {
        draining: state.control.is_draining(),
        jobs_running: pools.iter().map(|pool| pool.count(crate::slot::SlotState::Running)).sum(),
        jobs_queued: pools.iter().map(|pool| pool.queued).sum(),
    }
}

/// Whether the host takes jobs, and how many it has.
#[utoipa::path(get, path = "/v1/host", security(("bearer" = [])), responses(
    (status = 200, body = Host), (status = 401, body = ErrorResponse),
))]
pub async fn get_host(State(state): State<Arc<ApiState>>, _caller: Caller) -> Json<Host> {
    Json(host(&state).await)
}

/// Stops taking new jobs; queued and running jobs go on (admin only).
#[utoipa::path(post, path = "/v1/host/drain", security(("bearer" = [])), responses(
    (status = 200, body = Host), (status = 401, body = ErrorResponse), (status = 403, body = ErrorResponse),
))]
pub async fn drain_host(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Host>, ApiError> {
    caller.require_admin()?;
    state.control.drain();
    Ok(Json(host(&state).await))
}

/// Takes jobs again (admin only).
#[utoipa::path(post, path = "/v1/host/resume", security(("bearer" = [])), responses(
    (status = 200, body = Host), (status = 401, body = ErrorResponse), (status = 403, body = ErrorResponse),
))]
pub async fn resume_host(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Host>, ApiError> {
    caller.require_admin()?;
    state.control.resume();
    Ok(Json(host(&state).await))
}

// --- local jobs ----------------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitLocalJob {
    /// The pool to run in; the first pool when absent.
    pool: Option<String>,
    /// The command and its arguments, run by the guest's shell.
    #[schema(min_items = 1)]
    argv: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubmittedJob {
    id: String,
    pool: String,
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> ApiError {
        match error {
            SubmitError::EmptyCommand => ApiError::invalid("argv", error.to_string()),
            SubmitError::NoPool { .. } | SubmitError::NoPools => {
                ApiError::invalid("pool", error.to_string())
            }
            SubmitError::Draining => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining", error.to_string())
            }
            SubmitError::Store(e) => e.into(),
        }
    }
}

/// Runs a command in a fresh slot, as the daemon's local tenant (admin) or as the caller's own
/// tenant, which must be of kind `local`.
#[utoipa::path(post, path = "/v1/local/jobs", security(("bearer" = [])), request_body = SubmitLocalJob, responses(
    (status = 202, body = SubmittedJob), (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
    (status = 403, body = ErrorResponse), (status = 413, body = ErrorResponse), (status = 415, body = ErrorResponse),
    (status = 503, body = ErrorResponse),
))]
pub async fn submit_local_job(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Body(body): Body<SubmitLocalJob>,
) -> Result<(StatusCode, Json<SubmittedJob>), ApiError> {
    let tenant = match &caller.0.role {
        Role::Admin => None,
        Role::Tenant(id) => {
            let lookup = id.clone();
            let tenant = state.store.call(move |store| store.get_tenant(&lookup)).await?;
            if tenant.kind != TenantKind::Local {
                let message = format!(
                    "tenant `{}` is of kind {}, and only local tenants send commands",
                    tenant.name,
                    tenant.kind.as_str()
                );
                return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", message));
            }
            Some(id.clone())
        }
    };
    let tenant = tenant.as_deref().map(|id| (id, caller.0.actor()));
    let job = state.control.submit(body.pool.as_deref(), &body.argv, tenant).await?;
    Ok((StatusCode::ACCEPTED, Json(SubmittedJob { id: job.id.clone(), pool: job.pool.clone() })))
}

fn visible_local_job(
    state: &ApiState,
    caller: &Caller,
    id: &str,
) -> Result<Arc<LocalJob>, ApiError> {
    match state.control.local_job(id) {
        Some(job) if caller.sees(Some(&job.tenant_id)) => Ok(job),
        _ => Err(not_found("running or recent local job", id)),
    }
}

/// The job's events from its start, one JSON object per line, live until the job ends:
/// `started`, `log` lines, then `finished` with the exit code or `failed` with the reason.
#[utoipa::path(get, path = "/v1/local/jobs/{id}/output", security(("bearer" = [])), params(("id" = String, Path)), responses(
    (status = 200, description = "JSON lines", body = String, content_type = "application/x-ndjson"),
    (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
))]
pub async fn local_job_output(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    use futures_util::StreamExt;
    let job = visible_local_job(&state, &caller, &id)?;
    let lines = job.subscribe().map(|event| {
        let mut line =
            serde_json::to_vec(&crate::control::Response::from(event)).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(line)
    });
    let body = axum::body::Body::from_stream(lines);
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// Cancels a queued or running local job; its slot reverts.
#[utoipa::path(delete, path = "/v1/local/jobs/{id}", security(("bearer" = [])), params(("id" = String, Path)), responses(
    (status = 202), (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
))]
pub async fn cancel_local_job(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    visible_local_job(&state, &caller, &id)?.cancel();
    Ok(StatusCode::ACCEPTED)
}

/// The error body, for the OpenAPI description.
#[derive(Serialize, ToSchema)]
pub struct ErrorResponse {
    error: ApiError,
}
