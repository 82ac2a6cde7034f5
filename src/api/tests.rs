//! Handler tests without sockets: requests go straight into the router, pools run on the fake
//! hypervisor and the store is a real SQLite file in a temp dir.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::hypervisor::fake::{Boot, FakeHypervisor};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::store::{Actor, Store};

struct Fixture {
    _dir: tempfile::TempDir,
    control: Arc<Control>,
    store: Arc<Store>,
    router: Router,
    admin: String,
}

impl Fixture {
    async fn new(boot: Boot) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeHypervisor::new();
        fake.set_boot(boot);
        let mut config = crate::pool::tests::config(dir.path(), 1, 1);
        config.boot_timeout_secs = 1;
        let metrics = Arc::new(Metrics::default());
        let pool = Pool::start(&config, dir.path(), Arc::new(fake), metrics.clone());
        pool.built().await;
        let store = Arc::new(Store::open(&dir.path().join("db"), &dir.path().join("key")).unwrap());
        store.upsert_pool(&Actor::Daemon, "test", 0).unwrap();
        store.upsert_slot(&Actor::Daemon, "test", 0, crate::slot::SlotState::Empty, None).unwrap();
        let local = crate::daemon::local_tenant(&store).unwrap();
        let control = Arc::new(Control::new(vec![pool], metrics).with_store(store.clone(), local));
        let admin = store.create_token(&Actor::LocalRoot, None, "admin").unwrap();
        let admin = admin.plaintext.expose_str().unwrap().to_owned();
        let router = router(control.clone(), store.clone());
        Fixture { _dir: dir, control, store, router, admin }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = axum::http::Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        };
        let (status, _, text) = self.raw(request.unwrap()).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn raw(&self, request: axum::http::Request<Body>) -> (StatusCode, String, String) {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, content_type, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn get(&self, path: &str) -> (StatusCode, String, String) {
        self.raw(axum::http::Request::get(path).body(Body::empty()).unwrap()).await
    }

    /// Creates a local tenant and a token for it; returns (tenant id, token).
    async fn tenant(&self, name: &str) -> (String, String) {
        let (status, tenant) = self
            .call(
                Method::POST,
                "/v1/tenants",
                Some(&self.admin),
                Some(json!({"name": name, "kind": "local"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{tenant}");
        let id = tenant["id"].as_str().unwrap().to_owned();
        let body = json!({"name": format!("{name}-token"), "tenant_id": id});
        let (status, token) =
            self.call(Method::POST, "/v1/tokens", Some(&self.admin), Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{token}");
        (id, token["secret"].as_str().unwrap().to_owned())
    }

    async fn stop(self) {
        crate::daemon::shutdown(&self.control).await;
    }
}

#[tokio::test]
async fn health_is_ok_with_a_ready_slot_and_503_when_all_are_quarantined() {
    let fixture = Fixture::new(Boot::Ready).await;
    let (status, _, body) = fixture.get("/healthz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"status\":\"ok\"") && body.contains("\"ready\":1"), "{body}");
    fixture.stop().await;

    let fixture = Fixture::new(Boot::Silent).await;
    let (status, _, body) = fixture.get("/healthz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("\"status\":\"degraded\""), "{body}");
    fixture.stop().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_count_requests_by_route() {
    let fixture = Fixture::new(Boot::Ready).await;
    fixture.get("/healthz").await;
    fixture.get("/no/such/thing").await;
    let (status, content_type, text) = fixture.get("/metrics").await;
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
    fixture.stop().await;
}

#[tokio::test]
async fn the_openapi_description_lists_every_route() {
    let fixture = Fixture::new(Boot::Ready).await;
    let (status, _, body) = fixture.get("/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let description: Value = serde_json::from_str(&body).unwrap();
    assert!(description["openapi"].as_str().unwrap().starts_with("3."), "{body}");
    let paths: Vec<&String> = description["paths"].as_object().unwrap().keys().collect();
    for path in [
        "/healthz",
        "/metrics",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/pools",
        "/v1/tenants/{id}",
        "/v1/tokens/{id}",
    ] {
        assert!(paths.iter().any(|p| *p == path), "{path} missing from {paths:?}");
    }
    assert_eq!(description["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    fixture.stop().await;
}

#[tokio::test]
async fn errors_share_one_json_body() {
    let fixture = Fixture::new(Boot::Ready).await;
    let (status, body) = fixture.call(Method::GET, "/v1/nothing", None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(body["error"]["message"], "no route GET /v1/nothing");

    let (status, body) = fixture.call(Method::PUT, "/v1/tenants", Some(&fixture.admin), None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );

    let bad_kind = json!({"name": "x", "kind": "gitlab"});
    let (status, body) =
        fixture.call(Method::POST, "/v1/tenants", Some(&fixture.admin), Some(bad_kind)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid")),
        "{body}"
    );

    let bad_settings =
        json!({"name": "gh", "kind": "github", "settings": {"owner": "o", "app_id": 1}});
    let (status, body) =
        fixture.call(Method::POST, "/v1/tenants", Some(&fixture.admin), Some(bad_settings)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["field"], "settings.installation_id", "{body}");

    let huge = json!({"name": "x".repeat(MAX_BODY_BYTES), "kind": "local"});
    let (status, body) =
        fixture.call(Method::POST, "/v1/tenants", Some(&fixture.admin), Some(huge)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large")),
        "{body}"
    );

    let (status, body) =
        fixture.call(Method::GET, "/v1/jobs?limit=0", Some(&fixture.admin), None).await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("limit")),
        "{body}"
    );
    let (status, _) =
        fixture.call(Method::GET, "/v1/jobs?after=nonsense", Some(&fixture.admin), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    fixture
        .call(
            Method::POST,
            "/v1/tenants",
            Some(&fixture.admin),
            Some(json!({"name": "dup", "kind": "local"})),
        )
        .await;
    let (status, body) = fixture
        .call(
            Method::POST,
            "/v1/tenants",
            Some(&fixture.admin),
            Some(json!({"name": "dup", "kind": "local"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (StatusCode::CONFLICT, Some("name")),
        "{body}"
    );
    fixture.stop().await;
}

#[tokio::test]
async fn missing_or_bad_tokens_get_401_and_revoked_ones_stop_working() {
    let fixture = Fixture::new(Boot::Ready).await;
    for token in [None, Some("wp_nonsense"), Some("")] {
        let (status, body) = fixture.call(Method::GET, "/v1/tenants", token, None).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized")),
            "{token:?}"
        );
    }
    let (_, token) = fixture.tenant("acme").await;
    let (status, _) = fixture.call(Method::GET, "/v1/tenants", Some(&token), None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, tokens) = fixture.call(Method::GET, "/v1/tokens", Some(&token), None).await;
    let id = tokens[0]["id"].as_str().unwrap().to_owned();
    let (status, _) =
        fixture.call(Method::DELETE, &format!("/v1/tokens/{id}"), Some(&token), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = fixture.call(Method::GET, "/v1/tenants", Some(&token), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    fixture.stop().await;
}

#[tokio::test]
async fn a_tenant_token_never_reads_or_changes_another_tenant() {
    let fixture = Fixture::new(Boot::Ready).await;
    let (acme, acme_token) = fixture.tenant("acme").await;
    let (globex, _) = fixture.tenant("globex").await;
    fixture
        .store
        .record_job(
            &Actor::Daemon,
            crate::store::NewJob {
                id: "globex-job".into(),
                tenant_id: globex.clone(),
                pool: "test".into(),
            },
        )
        .unwrap();
    let me = Some(acme_token.as_str());

    // Its own tenant, and only it.
    let (status, list) = fixture.call(Method::GET, "/v1/tenants", me, None).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> =
        list.as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [acme.as_str()]);
    assert_eq!(
        fixture.call(Method::GET, &format!("/v1/tenants/{acme}"), me, None).await.0,
        StatusCode::OK
    );

    // The other tenant does not exist for it, whatever it tries.
    let other = format!("/v1/tenants/{globex}");
    assert_eq!(fixture.call(Method::GET, &other, me, None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        fixture.call(Method::PATCH, &other, me, Some(json!({"weight": 5}))).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(fixture.call(Method::DELETE, &other, me, None).await.0, StatusCode::NOT_FOUND);
    let steal = json!({"name": "stolen", "tenant_id": globex});
    assert_eq!(
        fixture.call(Method::POST, "/v1/tokens", me, Some(steal)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        fixture.call(Method::GET, "/v1/jobs/globex-job", me, None).await.0,
        StatusCode::NOT_FOUND
    );
    let (_, jobs) = fixture.call(Method::GET, &format!("/v1/jobs?tenant={globex}"), me, None).await;
    assert_eq!(jobs["jobs"], json!([]));
    let (_, tokens) = fixture.call(Method::GET, "/v1/tokens", me, None).await;
    assert!(tokens.as_array().unwrap().iter().all(|t| t["tenant_id"] == json!(acme)), "{tokens}");
    let (_, admin_tokens) =
        fixture.call(Method::GET, "/v1/tokens", Some(&fixture.admin), None).await;
    for token in admin_tokens.as_array().unwrap().iter().filter(|t| t["tenant_id"] != json!(acme)) {
        let path = format!("/v1/tokens/{}", token["id"].as_str().unwrap());
        assert_eq!(fixture.call(Method::DELETE, &path, me, None).await.0, StatusCode::NOT_FOUND);
    }

    // What only an admin may do is forbidden, not hidden.
    let create = json!({"name": "new", "kind": "local"});
    assert_eq!(
        fixture.call(Method::POST, "/v1/tenants", me, Some(create)).await.0,
        StatusCode::FORBIDDEN
    );
    let own = format!("/v1/tenants/{acme}");
    assert_eq!(
        fixture.call(Method::PATCH, &own, me, Some(json!({"weight": 500}))).await.0,
        StatusCode::FORBIDDEN
    );
    let admin_token = json!({"name": "escalate"});
    assert_eq!(
        fixture.call(Method::POST, "/v1/tokens", me, Some(admin_token)).await.0,
        StatusCode::FORBIDDEN
    );

    // The audit log is for admins, and records who did what.
    assert_eq!(fixture.call(Method::GET, "/v1/audit", me, None).await.0, StatusCode::FORBIDDEN);
    let (status, audit) =
        fixture.call(Method::GET, "/v1/audit?limit=1000", Some(&fixture.admin), None).await;
    assert_eq!(status, StatusCode::OK);
    let creations =
        audit.as_array().unwrap().iter().filter(|e| e["action"] == "tenant.create").count();
    assert_eq!(creations, 3, "the local tenant, acme and globex: {audit}");

    // And the other tenant is untouched.
    let (_, globex_now) = fixture.call(Method::GET, &other, Some(&fixture.admin), None).await;
    assert_eq!(globex_now["weight"], 1);
    fixture.stop().await;
}

#[tokio::test]
async fn an_admin_manages_tenants_and_pages_through_jobs() {
    let fixture = Fixture::new(Boot::Ready).await;
    let admin = Some(fixture.admin.as_str());
    let (acme, _) = fixture.tenant("acme").await;
    let (status, tenant) = fixture
        .call(Method::PATCH, &format!("/v1/tenants/{acme}"), admin, Some(json!({"weight": 7})))
        .await;
    assert_eq!((status, tenant["weight"].as_u64()), (StatusCode::OK, Some(7)));
    for i in 0..5 {
        let job = crate::store::NewJob {
            id: format!("job-{i}"),
            tenant_id: acme.clone(),
            pool: "test".into(),
        };
        fixture.store.record_job(&Actor::Daemon, job).unwrap();
    }
    let mut seen = Vec::new();
    let mut path = "/v1/jobs?limit=2".to_owned();
    loop {
        let (status, page) = fixture.call(Method::GET, &path, admin, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(
            page["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/jobs?limit=2&after={next}"),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, ["job-0", "job-1", "job-2", "job-3", "job-4"]);
    let (status, pools) = fixture.call(Method::GET, "/v1/pools", admin, None).await;
    assert_eq!((status, pools[0]["slots"][0]["state"].as_str()), (StatusCode::OK, Some("ready")));
    assert_eq!(pools[0]["image_generation"], 0, "{pools}");

    let (status, _) =
        fixture.call(Method::DELETE, &format!("/v1/tenants/{acme}"), admin, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "a tenant with unfinished jobs stays");
    fixture.stop().await;
}

#[test]
fn every_store_error_maps_to_its_status() {
    use crate::store::{JobState, StoreError};
    let io = || std::io::Error::other("x");
    let cases: Vec<(StoreError, StatusCode, &str)> = vec![
        (
            StoreError::NotFound { what: "tenant", id: "t".into() },
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            StoreError::Conflict { what: "tenant", field: "name", value: "n".into() },
            StatusCode::CONFLICT,
            "conflict",
        ),
        (
            StoreError::InUse { what: "tenant", id: "t".into(), reason: "r".into() },
            StatusCode::CONFLICT,
            "in_use",
        ),
        (
            StoreError::Invalid { field: "f".into(), reason: "r".into() },
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            StoreError::Transition {
                job: "j".into(),
                from: JobState::Finished,
                to: JobState::Queued,
            },
            StatusCode::CONFLICT,
            "conflict",
        ),
        (StoreError::Cancelled, StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (
            StoreError::File { path: "/p".into(), source: io() },
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
        ),
        (
            StoreError::Sqlite(rusqlite::Error::InvalidQuery),
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
        ),
        (
            StoreError::Journal { mode: "delete".into() },
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
        ),
        (
            StoreError::Migration { version: 1, name: "m", source: rusqlite::Error::InvalidQuery },
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
        ),
        (
            StoreError::SchemaTooNew { found: 9, known: 1 },
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
        ),
        (
            StoreError::Corrupt { what: "tenant", id: "t".into(), reason: "r".into() },
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
        ),
        (
            StoreError::KeyFile { path: "/k".into(), source: io() },
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
        ),
        (
            StoreError::Key { path: "/k".into(), reason: "r".into() },
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
        ),
        (
            StoreError::Crypto { tenant: "t".into(), name: "n".into() },
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
        ),
    ];
    for (error, status, code) in cases {
        assert_eq!(resources::store_error_status(&error), (status, code), "{error:?}");
        let api: ApiError = error.into();
        assert_eq!((api.status, api.code), (status, code));
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            assert_eq!(
                api.message, "internal error; see the daemon's log",
                "internals stay in the log"
            );
        }
    }
}

#[tokio::test]
async fn a_draining_host_refuses_new_jobs_and_says_so() {
    let fixture = Fixture::new(Boot::Ready).await;
    let (_, tenant_token) = fixture.tenant("acme").await;
    let (status, _) = fixture.call(Method::POST, "/v1/host/drain", Some(&tenant_token), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, host) =
        fixture.call(Method::POST, "/v1/host/drain", Some(&fixture.admin), None).await;
    assert_eq!((status, host["draining"].as_bool()), (StatusCode::OK, Some(true)), "{host}");
    let (status, _, body) = fixture.get("/healthz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("\"status\":\"draining\""), "{body}");
    let refused = fixture.control.submit(None, &["true".to_owned()], None).await.err().unwrap();
    assert!(matches!(refused, crate::control::SubmitError::Draining), "{refused}");

    let (status, host) =
        fixture.call(Method::POST, "/v1/host/resume", Some(&fixture.admin), None).await;
    assert_eq!((status, host["draining"].as_bool()), (StatusCode::OK, Some(false)));
    assert_eq!(fixture.get("/healthz").await.0, StatusCode::OK);
    let job = fixture.control.submit(None, &["true".to_owned()], None).await.unwrap();
    let events: Vec<_> = futures_util::StreamExt::collect(job.subscribe()).await;
    assert_eq!(events.last(), Some(&crate::slot::JobEvent::Finished { exit_code: 0 }));
    fixture.stop().await;
}

async fn output(fixture: &Fixture, id: &str, token: &str) -> (StatusCode, Vec<Value>) {
    let (status, body) =
        fixture.call(Method::GET, &format!("/v1/local/jobs/{id}/output"), Some(token), None).await;
    let lines = match body {
        Value::String(text) => text.lines().map(|l| serde_json::from_str(l).unwrap()).collect(),
        single => vec![single],
    };
    (status, lines)
}

#[tokio::test]
async fn local_jobs_run_stream_and_are_recorded() {
    let fixture = Fixture::new(Boot::Ready).await;
    let admin = fixture.admin.clone();
    let body = json!({"argv": ["sh", "-c", "echo hi; exit 4"]});
    let (status, submitted) =
        fixture.call(Method::POST, "/v1/local/jobs", Some(&admin), Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{submitted}");
    let id = submitted["id"].as_str().unwrap().to_owned();
    let (status, lines) = output(&fixture, &id, &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(lines.first().unwrap()["type"], "started", "{lines:?}");
    assert!(lines.iter().any(|l| l["type"] == "log"), "{lines:?}");
    assert_eq!(lines.last().unwrap(), &json!({"type": "finished", "exit_code": 4}));
    let (_, record) =
        fixture.call(Method::GET, &format!("/v1/jobs/{id}"), Some(&admin), None).await;
    assert_eq!(
        (record["state"].as_str(), record["exit_code"].as_i64()),
        (Some("finished"), Some(4)),
        "{record}"
    );

    // A local tenant runs its own jobs; nobody else sees them; other kinds may not run commands.
    let (_, acme_token) = fixture.tenant("acme").await;
    let (status, mine) = fixture
        .call(Method::POST, "/v1/local/jobs", Some(&acme_token), Some(json!({"argv": ["true"]})))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{mine}");
    let mine = mine["id"].as_str().unwrap().to_owned();
    assert_eq!(output(&fixture, &mine, &acme_token).await.0, StatusCode::OK);
    let (_, globex_token) = fixture.tenant("globex").await;
    assert_eq!(output(&fixture, &mine, &globex_token).await.0, StatusCode::NOT_FOUND);
    assert_eq!(output(&fixture, &id, &acme_token).await.0, StatusCode::NOT_FOUND);
    let github = json!({"name": "gh", "kind": "github", "settings": {"owner": "o", "app_id": 1, "installation_id": 2}});
    let (_, gh) = fixture.call(Method::POST, "/v1/tenants", Some(&admin), Some(github)).await;
    let token_body = json!({"name": "gh-token", "tenant_id": gh["id"]});
    let (_, gh_token) =
        fixture.call(Method::POST, "/v1/tokens", Some(&admin), Some(token_body)).await;
    let gh_token = gh_token["secret"].as_str().unwrap().to_owned();
    let (status, _) = fixture
        .call(Method::POST, "/v1/local/jobs", Some(&gh_token), Some(json!({"argv": ["true"]})))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, body) =
        fixture.call(Method::POST, "/v1/local/jobs", Some(&admin), Some(json!({"argv": []}))).await;
    assert_eq!((status, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("argv")));
    let nope = json!({"argv": ["true"], "pool": "nope"});
    let (status, body) =
        fixture.call(Method::POST, "/v1/local/jobs", Some(&admin), Some(nope)).await;
    assert_eq!((status, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("pool")));
    fixture.stop().await;
}

#[tokio::test]
async fn a_cancelled_local_job_fails_and_its_slot_reverts() {
    let fixture = Fixture::new(Boot::Ready).await;
    let admin = fixture.admin.clone();
    let (_, submitted) = fixture
        .call(Method::POST, "/v1/local/jobs", Some(&admin), Some(json!({"argv": ["fake:hang"]})))
        .await;
    let id = submitted["id"].as_str().unwrap().to_owned();
    let job = fixture.control.local_job(&id).unwrap();
    let mut events = std::pin::pin!(job.subscribe());
    assert!(matches!(
        futures_util::StreamExt::next(&mut events).await,
        Some(crate::slot::JobEvent::Started { .. })
    ));
    let (status, _) =
        fixture.call(Method::DELETE, &format!("/v1/local/jobs/{id}"), Some(&admin), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (_, lines) = output(&fixture, &id, &admin).await;
    assert_eq!(lines.last().unwrap()["type"], "failed", "{lines:?}");
    let (_, record) =
        fixture.call(Method::GET, &format!("/v1/jobs/{id}"), Some(&admin), None).await;
    assert_eq!(record["state"], "failed", "{record}");
    let waited = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let (_, pools) = fixture.call(Method::GET, "/v1/pools", Some(&admin), None).await;
            if pools[0]["slots"][0]["state"] == "ready" {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    waited.await.expect("the slot is ready again");
    fixture.stop().await;
}

#[tokio::test]
async fn the_api_speaks_tls_with_the_configured_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fixture = Fixture::new(Boot::Ready).await;
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let files = crate::config::TlsFiles {
        certificate: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    std::fs::write(&files.certificate, certified.cert.pem()).unwrap();
    std::fs::write(&files.key, certified.key_pair.serialize_pem()).unwrap();

    let acceptor = tls_acceptor(&files).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server =
        tokio::spawn(serve_tls(listener, acceptor, fixture.control.clone(), fixture.store.clone()));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");

    // The CLI's client trusts the certificate given as its `ca`, and no other.
    let endpoint = format!("https://localhost:{}", address.port());
    let client = crate::client::ApiClient::new(
        &endpoint,
        Some(fixture.admin.clone()),
        Some(&files.certificate),
    )
    .unwrap();
    let host = client.call(Method::GET, "/v1/host", None).await.unwrap();
    assert_eq!(host["draining"], false, "{host}");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let other_ca = dir.path().join("other.pem");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let untrusting =
        crate::client::ApiClient::new(&endpoint, Some(fixture.admin.clone()), Some(&other_ca))
            .unwrap();
    assert!(
        untrusting.call(Method::GET, "/v1/host", None).await.is_err(),
        "an unknown certificate is refused"
    );

    // Plain HTTP on the TLS port gets nothing.
    let mut plain = tokio::net::TcpStream::connect(address).await.unwrap();
    plain.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(!String::from_utf8_lossy(&answer).contains("200"));

    // A key that is not PEM is a clear error naming the file.
    std::fs::write(&files.key, "not a key").unwrap();
    let error = tls_acceptor(&files).err().expect("an error").to_string();
    assert!(error.contains("key.pem"), "{error}");
    server.abort();
    fixture.stop().await;
}

#[tokio::test]
async fn secrets_are_write_only_and_stay_within_their_tenant() {
    let fixture = Fixture::new(Boot::Ready).await;
    let (acme, acme_token) = fixture.tenant("acme").await;
    let (globex, _) = fixture.tenant("globex").await;
    let me = Some(acme_token.as_str());
    let path = format!("/v1/tenants/{acme}/secrets/app-key");
    let (status, info) =
        fixture.call(Method::PUT, &path, me, Some(json!({"value": "-----BEGIN KEY-----"}))).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert!(!info.to_string().contains("BEGIN"), "the value is never returned: {info}");
    let (_, listed) =
        fixture.call(Method::GET, &format!("/v1/tenants/{acme}/secrets"), me, None).await;
    assert_eq!(listed[0]["name"], "app-key");
    assert!(!listed.to_string().contains("BEGIN"), "{listed}");
    let value = fixture.store.get_secret(&acme, "app-key").unwrap();
    assert_eq!(value.expose(), b"-----BEGIN KEY-----");

    let other = format!("/v1/tenants/{globex}/secrets/app-key");
    assert_eq!(
        fixture.call(Method::PUT, &other, me, Some(json!({"value": "x"}))).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        fixture.call(Method::GET, &format!("/v1/tenants/{globex}/secrets"), me, None).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, body) = fixture.call(Method::PUT, &path, me, Some(json!({"value": ""}))).await;
    assert_eq!((status, body["error"]["field"].as_str()), (StatusCode::BAD_REQUEST, Some("value")));
    let too_long = "a".repeat(crate::store::MAX_SECRET_BYTES + 1);
    let (status, body) =
        fixture.call(Method::PUT, &path, me, Some(json!({"value": too_long}))).await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("value")),
        "{body}"
    );
    assert_eq!(fixture.call(Method::DELETE, &path, me, None).await.0, StatusCode::NO_CONTENT);
    assert_eq!(fixture.call(Method::DELETE, &path, me, None).await.0, StatusCode::NOT_FOUND);
    fixture.stop().await;
}

#[test]
fn every_submit_error_maps_to_its_status() {
    use crate::control::SubmitError;
    let cases = [
        (SubmitError::EmptyCommand, StatusCode::BAD_REQUEST, Some("argv")),
        (SubmitError::Draining, StatusCode::SERVICE_UNAVAILABLE, None),
        (
            SubmitError::NoPool { name: "p".into(), pools: "q".into() },
            StatusCode::BAD_REQUEST,
            Some("pool"),
        ),
        (SubmitError::NoPools, StatusCode::BAD_REQUEST, Some("pool")),
        (
            SubmitError::Store(crate::store::StoreError::Cancelled),
            StatusCode::SERVICE_UNAVAILABLE,
            None,
        ),
    ];
    for (error, status, field) in cases {
        let api: ApiError = error.into();
        assert_eq!((api.status, api.field.as_deref()), (status, field));
    }
}

#[tokio::test]
async fn health_says_starting_until_a_pool_has_built_a_slot() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeHypervisor::new();
    fake.set_boot(Boot::Silent);
    let config = crate::pool::tests::config(dir.path(), 1, 1);
    let metrics = Arc::new(Metrics::default());
    let pool = Pool::start(&config, dir.path(), Arc::new(fake), metrics.clone());
    let control = Arc::new(Control::new(vec![pool], metrics));
    let store = Arc::new(Store::open(&dir.path().join("db"), &dir.path().join("key")).unwrap());
    let router = router(control.clone(), store);
    let request = axum::http::Request::get("/healthz").body(Body::empty()).unwrap();
    let response = router.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("\"status\":\"starting\""));
    crate::daemon::shutdown(&control).await;
}

#[tokio::test]
async fn webhook_deliveries_answer_with_the_status_their_check_gives() {
    use crate::provider::github::{client::RetryPolicy, fake, GithubProvider, Settings};
    let fixture = Fixture::new(Boot::Ready).await;
    let webhook = |event: &str, signature: Option<String>, body: &str| {
        let mut request = axum::http::Request::builder()
            .method(Method::POST)
            .uri("/webhooks/github")
            .header("x-github-event", event)
            .header("x-github-delivery", uuid::Uuid::new_v4().to_string());
        if let Some(signature) = signature {
            request = request.header("x-hub-signature-256", signature);
        }
        request.body(Body::from(body.to_owned())).unwrap()
    };
    let (status, _, text) = fixture.raw(webhook("ping", None, "{}")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");

    let scheduler = crate::scheduler::Scheduler::start(fixture.control.clone());
    let settings = Settings {
        host_name: "h".into(),
        reconcile_interval: std::time::Duration::from_secs(3600),
        runner_idle_timeout: std::time::Duration::from_secs(60),
        completed_grace: std::time::Duration::from_secs(1),
        retry: RetryPolicy::default(),
    };
    let metrics = Arc::new(Metrics::default());
    let labels = vec![vec!["linux".to_string()]];
    let provider =
        GithubProvider::start(fixture.store.clone(), scheduler, metrics, settings, labels);
    fixture.control.set_github(provider);
    let tenant = fixture.store.create_tenant(
        &Actor::LocalRoot,
        crate::store::NewTenant {
            name: "gh".into(),
            kind: crate::store::TenantKind::Github,
            settings: json!({ "owner": "acme" }),
            weight: 1,
            max_concurrent_jobs: 0,
        },
    );
    let tenant = tenant.unwrap();
    let secret = crate::store::Secret::new(b"s3cret".to_vec());
    fixture.store.put_secret(&Actor::LocalRoot, &tenant.id, "webhook_secret", &secret).unwrap();

    let sign = |body: &str| Some(fake::signature(b"s3cret", body.as_bytes()));
    let (status, _, text) = fixture.raw(webhook("ping", None, "{}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    let forged = Some(fake::signature(b"guess", b"{}"));
    let (status, _, text) = fixture.raw(webhook("ping", forged, "{}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    let (status, _, text) = fixture.raw(webhook("ping", sign("{}"), "{}")).await;
    assert_eq!((status, text.contains("accepted")), (StatusCode::OK, true), "{text}");
    let (status, _, text) = fixture.raw(webhook("workflow_job", sign("[1"), "[1")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("not a GitHub delivery"), "{text}");
    let (status, _, text) = fixture.raw(webhook("issues", sign("{}"), "{}")).await;
    assert_eq!((status, text.contains("ignored")), (StatusCode::OK, true), "{text}");
}
