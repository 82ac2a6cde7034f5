//! An in-process fake of GitHub's REST API: the stand-in for GitHub used by the GitHub
//! provider's unit and integration tests and by `warmpool bench github`.
//!
//! [`FakeGithub::start`] serves, on a loopback port, the endpoints the provider calls, answering
//! in the shapes of GitHub's published REST API description:
//!
//! - `POST /app/installations/{installation_id}/access_tokens`, authenticated by an RS256 JWT
//!   of the app that owns the installation;
//! - `POST {scope}/actions/runners/generate-jitconfig`, `GET {scope}/actions/runners` and
//!   `DELETE {scope}/actions/runners/{runner_id}`, where `{scope}` is `/orgs/{org}`,
//!   `/repos/{owner}/{repo}` or `/enterprises/{enterprise}`;
//! - `GET /repos/{owner}/{repo}/actions/runs` and `GET .../actions/runs/{run_id}/jobs`.
//!
//! Any other request answers 404. All but the first take an installation token the fake issued
//! and that has not expired, or a token added with [`FakeGithub::add_token`].
//!
//! Tests drive the fake's world from outside: the apps, installations and tokens it accepts, its
//! runner groups, and workflow jobs that they queue and move through their states as GitHub
//! would ([`FakeGithub::queue_job`], [`FakeGithub::set_job`]). They read back every request
//! ([`FakeGithub::calls`]), the JIT configurations issued and the runners registered and
//! deleted, and make the next calls of an endpoint fail with [`FakeGithub::inject`]. Webhook
//! payloads are built with [`FakeGithub::workflow_job_event`] and sent, signed as GitHub signs
//! them, with [`FakeGithub::deliver`].
//!
//! All state sits behind one mutex that a request holds for its whole answer and never across
//! an await, so requests are answered one at a time and a test that reads the state after a
//! response sees that request's effect.
//!
//! What it leaves out, and what that costs: successful answers carry no rate-limit headers, so
//! a client's throttling is only exercised through injected failures; runs hold one job each
//! and one attempt; repository and user objects carry GitHub's identifying fields and links but
//! not every `*_url` template of the description; GitHub removes an ephemeral runner after its
//! job by itself, the fake only when a test calls [`FakeGithub::remove_runner`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, Request, State as Shared};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Where GitHub's error bodies point.
const DOCUMENTATION_URL: &str = "https://docs.github.com/rest";
/// GitHub refuses app JWTs that expire more than ten minutes ahead.
const JWT_MAX_LIFETIME_SECS: u64 = 10 * 60;
/// GitHub accepts an `iat` a little in the future, from clocks that drift.
const CLOCK_DRIFT_SECS: u64 = 60;
/// Installation tokens last an hour on GitHub.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// GitHub gives up on a webhook delivery that has no answer after ten seconds.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// The hourly request limit of an installation, named in rate-limited answers.
const RATE_LIMIT: u64 = 5000;
/// When a rate-limited failure names no wait, its limit resets this long after the answer.
const RATE_LIMIT_RESET_SECS: u64 = 60;
/// Runs and jobs are numbered from bases far apart, so that a run id used as a job id finds
/// nothing instead of another job. Both stay below `u32::MAX`, as octocrab's models need.
const FIRST_RUN_ID: u64 = 100_000_000;
const FIRST_JOB_ID: u64 = 200_000_000;
/// A larger request body is read as empty, and so refused; a JIT request is a few hundred
/// bytes.
const MAX_BODY_BYTES: usize = 1 << 20;
/// The runner group every scope has from the start, as on GitHub.
const DEFAULT_GROUP_ID: u64 = 1;
const DEFAULT_GROUP_NAME: &str = "Default";
/// GitHub registers a JIT runner with 1 to 100 labels.
const MAX_LABELS: usize = 100;
/// GitHub's page size when a request names none, and the largest it serves.
const DEFAULT_PER_PAGE: usize = 30;
const MAX_PER_PAGE: usize = 100;
/// The user named as the sender of webhook events and the actor of runs.
const SENDER_LOGIN: &str = "octocat";

/// Where runners are registered: an organization, a repository or an enterprise.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Organization(String),
    Repository(String, String),
    Enterprise(String),
}

impl Scope {
    /// The path the scope's API endpoints start with.
    pub fn api_path(&self) -> String {
        match self {
            Scope::Organization(org) => format!("/orgs/{org}"),
            Scope::Repository(owner, repo) => format!("/repos/{owner}/{repo}"),
            Scope::Enterprise(enterprise) => format!("/enterprises/{enterprise}"),
        }
    }

    /// The web address a runner of the scope is configured with.
    pub fn github_url(&self) -> String {
        match self {
            Scope::Organization(org) => format!("https://github.com/{org}"),
            Scope::Repository(owner, repo) => format!("https://github.com/{owner}/{repo}"),
            Scope::Enterprise(enterprise) => format!("https://github.com/enterprises/{enterprise}"),
        }
    }

    /// Whether the scope's runners can take jobs of `owner/repo`. The fake puts every
    /// organization in every enterprise.
    fn covers(&self, owner: &str, repo: &str) -> bool {
        match self {
            Scope::Organization(org) => org == owner,
            Scope::Repository(o, r) => o == owner && r == repo,
            Scope::Enterprise(_) => true,
        }
    }
}

/// The endpoints the fake serves, to inject failures into and to tell calls apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    AccessToken,
    GenerateJitConfig,
    ListRunners,
    DeleteRunner,
    ListRuns,
    ListJobs,
}

/// How an injected failure answers, before the request's credentials are looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    /// Sent as `retry-after`.
    pub retry_after_secs: Option<u64>,
    /// Adds GitHub's rate-limit headers: `x-ratelimit-remaining: 0` and a reset time that is
    /// `retry_after_secs` (or a minute) away.
    pub rate_limited: bool,
    pub message: String,
}

impl Failure {
    /// A plain error answer, like the 502 of GitHub's front end.
    pub fn status(status: u16, message: &str) -> Failure {
        Failure { status, retry_after_secs: None, rate_limited: false, message: message.to_owned() }
    }

    /// GitHub's primary rate limit: 403 with no requests remaining until the reset.
    pub fn rate_limit() -> Failure {
        Failure {
            rate_limited: true,
            ..Failure::status(403, "API rate limit exceeded for installation.")
        }
    }

    /// GitHub's secondary rate limit: 403 with `retry-after`.
    pub fn secondary_rate_limit(retry_after_secs: u64) -> Failure {
        Failure {
            retry_after_secs: Some(retry_after_secs),
            ..Failure::status(
                403,
                "You have exceeded a secondary rate limit. Please wait a few minutes before you \
                 try again.",
            )
        }
    }
}

/// One request the fake answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub method: String,
    /// The path without its query.
    pub path: String,
    /// `None` for a path the fake does not serve.
    pub endpoint: Option<Endpoint>,
    pub status: u16,
}

/// An accepted generate-jitconfig request and the runner it registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JitRequest {
    pub scope: Scope,
    pub name: String,
    pub runner_group_id: u64,
    pub labels: Vec<String>,
    pub work_folder: String,
    pub runner_id: u64,
}

/// A registered self-hosted runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Runner {
    pub id: u64,
    pub name: String,
    pub runner_group_id: u64,
    pub labels: Vec<String>,
    /// "offline" until a job runs on it.
    pub status: String,
    pub busy: bool,
}

/// A workflow job, serialized in the shape of GitHub's `job` schema, as in the list of a run's
/// jobs and in `workflow_job` webhook payloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkflowJob {
    pub id: u64,
    pub run_id: u64,
    pub owner: String,
    pub repo: String,
    pub labels: Vec<String>,
    /// "queued", "in_progress" or "completed".
    pub status: String,
    pub conclusion: Option<String>,
    pub runner_id: Option<u64>,
    pub runner_name: Option<String>,
    pub runner_group_id: Option<u64>,
    pub runner_group_name: Option<String>,
    pub name: String,
    pub workflow_name: String,
    pub head_branch: String,
    /// RFC 3339 times in UTC.
    pub created_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    /// The API address the job's links point to: the fake's own.
    pub api_url: String,
}

impl WorkflowJob {
    /// The job in GitHub's JSON shape. GitHub gives a queued job its creation time as
    /// `started_at`, which the schema requires; so does the fake.
    pub fn to_json(&self) -> Value {
        let repo_api = format!("{}/repos/{}/{}", self.api_url, self.owner, self.repo);
        json!({
            "id": self.id,
            "run_id": self.run_id,
            "run_url": format!("{repo_api}/actions/runs/{}", self.run_id),
            "run_attempt": 1,
            "node_id": node_id("CheckRun", self.id),
            "head_sha": head_sha(self.run_id),
            "url": format!("{repo_api}/actions/jobs/{}", self.id),
            "html_url": format!(
                "https://github.com/{}/{}/actions/runs/{}/job/{}",
                self.owner, self.repo, self.run_id, self.id
            ),
            "status": self.status,
            "conclusion": self.conclusion,
            "created_at": self.created_at,
            "started_at": self.started_at.as_ref().unwrap_or(&self.created_at),
            "completed_at": self.completed_at,
            "name": self.name,
            "steps": [],
            "check_run_url": format!("{repo_api}/check-runs/{}", self.id),
            "labels": self.labels,
            "runner_id": self.runner_id,
            "runner_name": self.runner_name,
            "runner_group_id": self.runner_group_id,
            "runner_group_name": self.runner_group_name,
            "workflow_name": self.workflow_name,
            "head_branch": self.head_branch,
        })
    }

    /// Whether the runs listing's `status` filter selects this job: GitHub's filter takes a
    /// status or a conclusion.
    fn matches(&self, status: &str) -> bool {
        self.status == status || self.conclusion.as_deref() == Some(status)
    }

    fn advance(&mut self, status: &str, conclusion: Option<&str>, now: &str) {
        self.status = status.to_owned();
        self.conclusion = conclusion.map(str::to_owned);
        if status != "queued" && self.started_at.is_none() {
            self.started_at = Some(now.to_owned());
        }
        if status == "completed" && self.completed_at.is_none() {
            self.completed_at = Some(now.to_owned());
        }
    }
}

impl Serialize for WorkflowJob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

struct State {
    url: String,
    apps: HashMap<u64, DecodingKey>,
    /// Installation id to the id of the app it belongs to.
    installations: HashMap<u64, u64>,
    /// Tokens accepted on the API, with their expiry; added tokens never expire.
    tokens: HashMap<String, Option<SystemTime>>,
    token_lifetime: Duration,
    tokens_issued: usize,
    /// Groups added by tests; group 1 exists everywhere without them.
    groups: HashMap<Scope, BTreeMap<u64, String>>,
    /// Registered runners of each scope, in the order of registration.
    runners: HashMap<Scope, Vec<Runner>>,
    deleted_runners: Vec<(Scope, u64)>,
    /// GitHub numbers each label name once.
    label_ids: HashMap<String, u64>,
    jobs: BTreeMap<u64, WorkflowJob>,
    failures: HashMap<Endpoint, VecDeque<Failure>>,
    calls: Vec<Call>,
    jit_requests: Vec<JitRequest>,
    next_runner_id: u64,
    next_run_id: u64,
    next_job_id: u64,
    /// Set by [`FakeGithub::run_jobs_on_runners`].
    lifecycle: Option<Lifecycle>,
    /// Seconds that the reference guest's stand-in runner holds on to a job before it exits,
    /// written into each JIT configuration (`warmpoolStandInHoldSecs`, which the real runner
    /// does not read); none when zero.
    stand_in_hold_secs: u64,
    /// Jobs handed to runners since the last answer, whose webhooks are still to be sent.
    assigned: Vec<u64>,
}

/// GitHub's side of a runner's life, played by the fake on request: a registered runner takes
/// the oldest queued job its scope and labels fit, runs it for `job_duration` and completes it,
/// and each change is delivered as a `workflow_job` webhook to `webhook`, if set.
#[derive(Clone)]
struct Lifecycle {
    webhook: Option<(String, Vec<u8>)>,
    job_duration: Duration,
}

/// A fake GitHub REST API on a loopback port, stopped when dropped.
pub struct FakeGithub {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeGithub {
    /// Starts the fake on a free port of 127.0.0.1.
    pub async fn start() -> io::Result<FakeGithub> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::new(format!("http://{addr}"))));
        let app = Router::new().fallback(answer).with_state(state.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "Fake GitHub stopped serving");
            }
        });
        Ok(FakeGithub { state, addr, server })
    }

    /// The API's base address, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Registers a GitHub App whose JWTs are checked against `public_key_pem`.
    ///
    /// # Panics
    /// If the key is not an RSA public key in PEM: a mistake of the test.
    pub fn add_app(&self, app_id: u64, public_key_pem: &str) {
        let key = DecodingKey::from_rsa_pem(public_key_pem.as_bytes())
            .expect("an app's key is an RSA public key in PEM");
        self.state().apps.insert(app_id, key);
    }

    pub fn add_installation(&self, installation_id: u64, app_id: u64) {
        self.state().installations.insert(installation_id, app_id);
    }

    /// Accepts `token` on the API from now on, as GitHub accepts a fine-grained personal
    /// access token.
    pub fn add_token(&self, token: &str) {
        self.state().tokens.insert(token.to_owned(), None);
    }

    /// How long installation tokens issued from now on stay valid; an hour by default.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state().token_lifetime = lifetime;
    }

    /// How many installation tokens the fake has issued.
    pub fn tokens_issued(&self) -> usize {
        self.state().tokens_issued
    }

    /// Adds a runner group to a scope, or renames one.
    pub fn add_runner_group(&self, scope: &Scope, id: u64, name: &str) {
        self.state().groups.entry(scope.clone()).or_default().insert(id, name.to_owned());
    }

    /// Queues a new job in a new run of `owner/repo`. Ids increase from call to call.
    pub fn queue_job(&self, owner: &str, repo: &str, labels: &[&str]) -> WorkflowJob {
        self.state().queue_job(owner, repo, labels)
    }

    /// Moves a job to `status`, stamping its start and completion times as GitHub does. A
    /// `runner_name` of a runner registered in a scope that covers the job's repository also
    /// sets the runner's id and group on the job and marks the runner busy while the job runs;
    /// `None` keeps the job's runner.
    ///
    /// # Panics
    /// If the fake has no job `job_id`: a mistake of the test.
    pub fn set_job(
        &self,
        job_id: u64,
        status: &str,
        conclusion: Option<&str>,
        runner_name: Option<&str>,
    ) -> WorkflowJob {
        self.state().set_job(job_id, status, conclusion, runner_name)
    }

    pub fn job(&self, job_id: u64) -> Option<WorkflowJob> {
        self.state().jobs.get(&job_id).cloned()
    }

    /// Plays GitHub's side of runners from now on: each runner registered takes the oldest
    /// queued job it fits, runs it for `job_duration` and completes it successfully, and each
    /// step is delivered as a signed `workflow_job` webhook to `webhook` (URL and secret), if
    /// given. A runner that fits no queued job stays idle.
    pub fn run_jobs_on_runners(&self, webhook: Option<(&str, &[u8])>, job_duration: Duration) {
        let webhook = webhook.map(|(url, secret)| (url.to_owned(), secret.to_vec()));
        self.state().lifecycle = Some(Lifecycle { webhook, job_duration });
    }

    /// Makes the stand-in runners of the JIT configurations handed out from now on hold on to
    /// their job for `secs` before they exit, so that a test can catch a runner job running.
    pub fn hold_stand_in_runners(&self, secs: u64) {
        self.state().stand_in_hold_secs = secs;
    }

    /// Makes the next `times` calls of `endpoint` answer with `failure`.
    pub fn inject(&self, endpoint: Endpoint, failure: Failure, times: usize) {
        let mut state = self.state();
        let queue = state.failures.entry(endpoint).or_default();
        queue.extend(std::iter::repeat(failure).take(times));
    }

    /// Every request answered so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    pub fn jit_requests(&self) -> Vec<JitRequest> {
        self.state().jit_requests.clone()
    }

    /// The runners registered in `scope` now, in the order of registration.
    pub fn runners(&self, scope: &Scope) -> Vec<Runner> {
        self.state().runners.get(scope).cloned().unwrap_or_default()
    }

    /// Runners deleted through the API, in order.
    pub fn deleted_runners(&self) -> Vec<(Scope, u64)> {
        self.state().deleted_runners.clone()
    }

    /// Removes a runner as GitHub does itself once an ephemeral runner's job is over. Unlike a
    /// deletion through the API, it is not listed in [`FakeGithub::deleted_runners`].
    pub fn remove_runner(&self, scope: &Scope, runner_id: u64) {
        if let Some(runners) = self.state().runners.get_mut(scope) {
            runners.retain(|runner| runner.id != runner_id);
        }
    }

    /// The body of a `workflow_job` webhook delivery about `job`, as an organization's or an
    /// app's webhook receives it; `installation_id` is given for an app's.
    pub fn workflow_job_event(
        &self,
        action: &str,
        job: &WorkflowJob,
        installation_id: Option<u64>,
    ) -> Value {
        workflow_job_event_json(&self.url(), action, job, installation_id)
    }

    /// The body of the `ping` delivery GitHub sends when a webhook is created: an app's hook
    /// when `app_id` is given, an organization's otherwise.
    pub fn ping_event(&self, hook_id: u64, app_id: Option<u64>, target: &str) -> Value {
        let now = rfc3339(SystemTime::now());
        let mut hook = json!({
            "type": if app_id.is_some() { "App" } else { "Organization" },
            "id": hook_id,
            "name": "web",
            "active": true,
            "events": ["workflow_job"],
            "config": { "content_type": "json", "insecure_ssl": "0", "url": target },
            "updated_at": now,
            "created_at": now,
        });
        if let Some(app_id) = app_id {
            hook["app_id"] = json!(app_id);
        }
        json!({ "zen": "Keep it logically awesome.", "hook_id": hook_id, "hook": hook })
    }

    /// POSTs a webhook delivery to `target` (an `http://` URL) with GitHub's headers and
    /// signature, and returns the receiver's status and body. Like GitHub, it gives up after
    /// ten seconds.
    pub async fn deliver(
        target: &str,
        secret: &[u8],
        event: &str,
        delivery_id: &str,
        body: &[u8],
    ) -> io::Result<(u16, String)> {
        let uri: http::Uri = target.parse().map_err(invalid_input)?;
        let authority = match (uri.scheme_str(), uri.authority()) {
            (Some("http"), Some(authority)) => authority.to_string(),
            _ => return Err(invalid_input(format!("not an http:// URL: {target}"))),
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let request = http::Request::post(path)
            .header(http::header::HOST, &authority)
            .header("x-github-event", event)
            .header("x-github-delivery", delivery_id)
            .header("x-hub-signature-256", signature(secret, body))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "GitHub-Hookshot/fake")
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(invalid_input)?;
        let exchange = exchange(&authority, request);
        let (status, _, body) = tokio::time::timeout(DELIVERY_TIMEOUT, exchange)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))??;
        Ok((status.as_u16(), String::from_utf8_lossy(&body).into_owned()))
    }
}

fn workflow_job_event_json(
    api: &str,
    action: &str,
    job: &WorkflowJob,
    installation_id: Option<u64>,
) -> Value {
    let mut event = json!({
        "action": action,
        "workflow_job": job.to_json(),
        "repository": repository_json(api, &job.owner, &job.repo),
        "organization": organization_json(api, &job.owner),
        "sender": user_json(api, SENDER_LOGIN, "User"),
    });
    if let Some(id) = installation_id {
        event["installation"] = json!({ "id": id, "node_id": node_id("Integration", id) });
    }
    event
}

/// GitHub's `X-Hub-Signature-256` of `body`: "sha256=" and the lowercase hex HMAC-SHA256.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex(&mac.finalize().into_bytes()))
}

/// Sends one request over a new plain HTTP/1 connection to `authority`.
async fn exchange(
    authority: &str,
    request: http::Request<Full<Bytes>>,
) -> io::Result<(StatusCode, HeaderMap, Bytes)> {
    let stream = TcpStream::connect(authority).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(io::Error::other)?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// The one handler: routes, records and answers every request.
async fn answer(Shared(shared): Shared<Arc<Mutex<State>>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES).await.unwrap_or_default();
    let route = Route::parse(&parts.method, parts.uri.path());

    let mut state = lock(&shared);
    let reply = state.reply(route.as_ref(), &parts, &body);
    state.calls.push(Call {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        endpoint: route.as_ref().map(Route::endpoint),
        status: reply.status,
    });
    let assigned = std::mem::take(&mut state.assigned);
    let lifecycle = state.lifecycle.clone();
    drop(state);
    if let Some(lifecycle) = lifecycle {
        for job_id in assigned {
            tokio::spawn(run_job(shared.clone(), lifecycle.clone(), job_id));
        }
    }
    reply.into_response()
}

/// Plays GitHub running a job on the runner it was handed to: `in_progress` now, `completed`
/// with success after the lifecycle's job duration.
async fn run_job(shared: Arc<Mutex<State>>, lifecycle: Lifecycle, job_id: u64) {
    let event = |action: &str, job: &WorkflowJob| {
        let state = lock(&shared);
        workflow_job_event_json(&state.url, action, job, None)
    };
    let job = lock(&shared).jobs[&job_id].clone();
    let in_progress = event("in_progress", &job);
    send_lifecycle_event(&lifecycle, &in_progress).await;
    tokio::time::sleep(lifecycle.job_duration).await;
    let job = lock(&shared).set_job(job_id, "completed", Some("success"), None);
    let completed = event("completed", &job);
    send_lifecycle_event(&lifecycle, &completed).await;
}

async fn send_lifecycle_event(lifecycle: &Lifecycle, event: &Value) {
    let Some((target, secret)) = &lifecycle.webhook else { return };
    let delivery = uuid::Uuid::new_v4().to_string();
    let body = event.to_string();
    let sent =
        FakeGithub::deliver(target, secret, "workflow_job", &delivery, body.as_bytes()).await;
    if let Err(e) = sent {
        tracing::warn!(error = %e, "Fake GitHub could not deliver a webhook");
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A test that panicked while holding the lock left nothing half-done worth refusing.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request the fake serves, with its path parameters.
enum Route {
    AccessToken(u64),
    GenerateJitConfig(Scope),
    ListRunners(Scope),
    DeleteRunner(Scope, u64),
    ListRuns(String, String),
    ListJobs(String, String, u64),
}

impl Route {
    fn parse(method: &Method, path: &str) -> Option<Route> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method.as_str(), segments.as_slice()) {
            ("POST", ["app", "installations", id, "access_tokens"]) => {
                Some(Route::AccessToken(id.parse().ok()?))
            }
            ("GET", ["repos", owner, repo, "actions", "runs"]) => {
                Some(Route::ListRuns(owner.to_string(), repo.to_string()))
            }
            ("GET", ["repos", owner, repo, "actions", "runs", run_id, "jobs"]) => {
                Some(Route::ListJobs(owner.to_string(), repo.to_string(), run_id.parse().ok()?))
            }
            (method, segments) => Route::runners(method, segments),
        }
    }

    fn runners(method: &str, segments: &[&str]) -> Option<Route> {
        let (scope, rest) = split_scope(segments)?;
        match (method, rest) {
            ("POST", ["actions", "runners", "generate-jitconfig"]) => {
                Some(Route::GenerateJitConfig(scope))
            }
            ("GET", ["actions", "runners"]) => Some(Route::ListRunners(scope)),
            ("DELETE", ["actions", "runners", id]) => {
                Some(Route::DeleteRunner(scope, id.parse().ok()?))
            }
            _ => None,
        }
    }

    fn endpoint(&self) -> Endpoint {
        match self {
            Route::AccessToken(_) => Endpoint::AccessToken,
            Route::GenerateJitConfig(_) => Endpoint::GenerateJitConfig,
            Route::ListRunners(_) => Endpoint::ListRunners,
            Route::DeleteRunner(..) => Endpoint::DeleteRunner,
            Route::ListRuns(..) => Endpoint::ListRuns,
            Route::ListJobs(..) => Endpoint::ListJobs,
        }
    }
}

fn split_scope<'a>(segments: &'a [&'a str]) -> Option<(Scope, &'a [&'a str])> {
    let (scope, rest) = match segments {
        ["orgs", org, rest @ ..] => (Scope::Organization(org.to_string()), rest),
        ["repos", owner, repo, rest @ ..] => {
            (Scope::Repository(owner.to_string(), repo.to_string()), rest)
        }
        ["enterprises", enterprise, rest @ ..] => (Scope::Enterprise(enterprise.to_string()), rest),
        _ => return None,
    };
    Some((scope, rest))
}

/// An answer before it becomes an HTTP response.
struct Reply {
    status: u16,
    body: Option<Value>,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn json(status: u16, body: Value) -> Reply {
        Reply { status, body: Some(body), headers: Vec::new() }
    }

    fn no_content() -> Reply {
        Reply { status: 204, body: None, headers: Vec::new() }
    }

    fn error(status: u16, message: &str) -> Reply {
        Reply::json(status, json!({ "message": message, "documentation_url": DOCUMENTATION_URL }))
    }

    fn not_found() -> Reply {
        Reply::error(404, "Not Found")
    }

    fn failure(failure: &Failure) -> Reply {
        let mut reply = Reply::error(failure.status, &failure.message);
        if let Some(secs) = failure.retry_after_secs {
            reply.headers.push(("retry-after", secs.to_string()));
        }
        if failure.rate_limited {
            let reset = now_secs() + failure.retry_after_secs.unwrap_or(RATE_LIMIT_RESET_SECS);
            reply.headers.extend([
                ("x-ratelimit-limit", RATE_LIMIT.to_string()),
                ("x-ratelimit-remaining", "0".to_owned()),
                ("x-ratelimit-used", RATE_LIMIT.to_string()),
                ("x-ratelimit-reset", reset.to_string()),
                ("x-ratelimit-resource", "core".to_owned()),
            ]);
        }
        reply
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = match self.body {
            Some(body) => (status, axum::Json(body)).into_response(),
            None => status.into_response(),
        };
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

type Params = HashMap<String, String>;

impl State {
    fn new(url: String) -> State {
        State {
            url,
            apps: HashMap::new(),
            installations: HashMap::new(),
            tokens: HashMap::new(),
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            tokens_issued: 0,
            groups: HashMap::new(),
            runners: HashMap::new(),
            deleted_runners: Vec::new(),
            label_ids: HashMap::new(),
            jobs: BTreeMap::new(),
            failures: HashMap::new(),
            calls: Vec::new(),
            jit_requests: Vec::new(),
            next_runner_id: 1,
            next_run_id: FIRST_RUN_ID,
            next_job_id: FIRST_JOB_ID,
            lifecycle: None,
            stand_in_hold_secs: 0,
            assigned: Vec::new(),
        }
    }

    /// The oldest queued job that a runner of `scope` with `labels` can take.
    fn job_for(&self, scope: &Scope, labels: &[String]) -> Option<u64> {
        let fits = |job: &&WorkflowJob| {
            job.status == "queued"
                && scope.covers(&job.owner, &job.repo)
                && job.labels.iter().all(|wanted| {
                    wanted.eq_ignore_ascii_case("self-hosted")
                        || labels.iter().any(|label| label.eq_ignore_ascii_case(wanted))
                })
        };
        self.jobs.values().find(fits).map(|job| job.id)
    }

    fn reply(&mut self, route: Option<&Route>, request: &Parts, body: &[u8]) -> Reply {
        let Some(route) = route else { return Reply::not_found() };
        // Failures stand for GitHub's front end and limits, which answer before auth.
        if let Some(failure) =
            self.failures.get_mut(&route.endpoint()).and_then(VecDeque::pop_front)
        {
            return Reply::failure(&failure);
        }
        let params = Query::<Params>::try_from_uri(&request.uri).map(|q| q.0).unwrap_or_default();
        match route {
            Route::AccessToken(installation_id) => {
                self.access_token(*installation_id, &request.headers)
            }
            _ if !self.authorised(&request.headers) => Reply::error(401, "Bad credentials"),
            Route::GenerateJitConfig(scope) => self.generate_jitconfig(scope, body),
            Route::ListRunners(scope) => self.list_runners(scope, &params),
            Route::DeleteRunner(scope, runner_id) => self.delete_runner(scope, *runner_id),
            Route::ListRuns(owner, repo) => self.list_runs(owner, repo, &params),
            Route::ListJobs(owner, repo, run_id) => self.list_jobs(owner, repo, *run_id, &params),
        }
    }

    fn access_token(&mut self, installation_id: u64, headers: &HeaderMap) -> Reply {
        let app_id = match self.app_of_jwt(headers) {
            Ok(app_id) => app_id,
            Err(message) => return Reply::error(401, message),
        };
        // GitHub hides installations of other apps as it hides missing ones.
        if self.installations.get(&installation_id) != Some(&app_id) {
            return Reply::not_found();
        }

        let token = format!("ghs_{}", random_alphanumeric(36));
        let expires_at = SystemTime::now() + self.token_lifetime;
        self.tokens.insert(token.clone(), Some(expires_at));
        self.tokens_issued += 1;
        // The permissions are those the provider needs.
        let permissions = json!({
            "actions": "read",
            "administration": "write",
            "metadata": "read",
            "organization_self_hosted_runners": "write",
        });
        Reply::json(
            201,
            json!({
                "token": token,
                "expires_at": rfc3339(expires_at),
                "permissions": permissions,
                "repository_selection": "all",
            }),
        )
    }

    /// The app whose key signed the request's JWT, or GitHub's message for why not.
    fn app_of_jwt(&self, headers: &HeaderMap) -> Result<u64, &'static str> {
        const UNREADABLE: &str = "A JSON web token could not be decoded";
        let jwt = credential(headers, &["bearer"]).ok_or(UNREADABLE)?;
        // The issuer names the key, so it is read before the signature can be checked.
        let claims = jsonwebtoken::dangerous::insecure_decode::<AppClaims>(jwt)
            .map_err(|_| UNREADABLE)?
            .claims;
        let app_id = claims.app_id().ok_or("'Issuer' claim ('iss') must be an Integer")?;
        let key = self.apps.get(&app_id).ok_or("Integration not found")?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_required_spec_claims(&["exp"]);
        jsonwebtoken::decode::<AppClaims>(jwt, key, &validation).map_err(|_| UNREADABLE)?;

        let now = now_secs();
        if claims.exp > now + JWT_MAX_LIFETIME_SECS {
            return Err("'Expiration time' claim ('exp') is too far in the future");
        }
        if claims.iat > now + CLOCK_DRIFT_SECS {
            return Err(
                "'Issued at' claim ('iat') must be an Integer representing a time in the past",
            );
        }
        Ok(app_id)
    }

    fn authorised(&self, headers: &HeaderMap) -> bool {
        let Some(token) = credential(headers, &["bearer", "token"]) else { return false };
        match self.tokens.get(token) {
            Some(None) => true,
            Some(Some(expires_at)) => SystemTime::now() < *expires_at,
            None => false,
        }
    }

    fn generate_jitconfig(&mut self, scope: &Scope, body: &[u8]) -> Reply {
        let request = match JitBody::parse(body) {
            Ok(request) => request,
            Err(message) => return Reply::error(422, &message),
        };
        let Some(group_name) = self.group_name(scope, request.runner_group_id) else {
            let message =
                format!("Invalid request.\n\nNo runner group {}.", request.runner_group_id);
            return Reply::error(422, &message);
        };
        if self.runners.get(scope).into_iter().flatten().any(|r| r.name == request.name) {
            let message =
                format!("Already exists - A runner with the name {} already exists.", request.name);
            return Reply::error(409, &message);
        }

        let work_folder = request.work_folder.clone();
        let runner = self.register(scope, request);
        let hold = self.stand_in_hold_secs;
        let encoded = jit_config(&self.url, scope, &runner, &group_name, &work_folder, hold);
        let runner = self.runner_json(&runner);
        Reply::json(201, json!({ "runner": runner, "encoded_jit_config": encoded }))
    }

    fn group_name(&self, scope: &Scope, group_id: u64) -> Option<String> {
        let added = self.groups.get(scope).and_then(|groups| groups.get(&group_id)).cloned();
        added.or_else(|| (group_id == DEFAULT_GROUP_ID).then(|| DEFAULT_GROUP_NAME.to_owned()))
    }

    fn register(&mut self, scope: &Scope, request: JitBody) -> Runner {
        let runner = Runner {
            id: self.next_runner_id,
            name: request.name.clone(),
            runner_group_id: request.runner_group_id,
            labels: request.labels.clone(),
            status: "offline".to_owned(),
            busy: false,
        };
        self.next_runner_id += 1;
        for label in &request.labels {
            let next_id = self.label_ids.len() as u64 + 1;
            self.label_ids.entry(label.clone()).or_insert(next_id);
        }
        self.runners.entry(scope.clone()).or_default().push(runner.clone());
        if self.lifecycle.is_some() {
            if let Some(job_id) = self.job_for(scope, &request.labels) {
                self.set_job(job_id, "in_progress", None, Some(&request.name));
                self.assigned.push(job_id);
            }
        }
        self.jit_requests.push(JitRequest {
            scope: scope.clone(),
            name: request.name,
            runner_group_id: request.runner_group_id,
            labels: request.labels,
            work_folder: request.work_folder,
            runner_id: runner.id,
        });
        runner
    }

    /// A runner in GitHub's `runner` shape. JIT runners carry only the labels they were
    /// registered with, all custom.
    fn runner_json(&self, runner: &Runner) -> Value {
        let labels: Vec<Value> = (runner.labels.iter())
            .map(|name| json!({ "id": self.label_ids.get(name), "name": name, "type": "custom" }))
            .collect();
        json!({
            "id": runner.id,
            "runner_group_id": runner.runner_group_id,
            "name": runner.name,
            "os": "unknown",
            "status": runner.status,
            "busy": runner.busy,
            "ephemeral": true,
            "labels": labels,
        })
    }

    fn list_runners(&self, scope: &Scope, params: &Params) -> Reply {
        let wanted = params.get("name");
        let runners: Vec<&Runner> = (self.runners.get(scope).into_iter().flatten())
            .filter(|runner| wanted.map_or(true, |name| &runner.name == name))
            .collect();
        let total_count = runners.len();
        let runners: Vec<Value> =
            page(runners, params).into_iter().map(|runner| self.runner_json(runner)).collect();
        Reply::json(200, json!({ "total_count": total_count, "runners": runners }))
    }

    fn delete_runner(&mut self, scope: &Scope, runner_id: u64) -> Reply {
        let Some(runners) = self.runners.get_mut(scope) else { return Reply::not_found() };
        let Some(index) = runners.iter().position(|runner| runner.id == runner_id) else {
            return Reply::not_found();
        };
        if runners[index].busy {
            let message = format!(
                "Bad request - Runner \"{}\" is still running a job\"",
                runners[index].name
            );
            return Reply::error(422, &message);
        }
        runners.remove(index);
        self.deleted_runners.push((scope.clone(), runner_id));
        Reply::no_content()
    }

    /// Runs of a repository, newest first; with `status`, those with a job of that status.
    fn list_runs(&self, owner: &str, repo: &str, params: &Params) -> Reply {
        let status = params.get("status");
        let mut run_ids: Vec<u64> = (self.jobs.values())
            .filter(|job| job.owner == owner && job.repo == repo)
            .filter(|job| status.map_or(true, |status| job.matches(status)))
            .map(|job| job.run_id)
            .collect();
        run_ids.sort_unstable_by(|a, b| b.cmp(a));
        run_ids.dedup();

        let total_count = run_ids.len();
        let runs: Vec<Value> =
            page(run_ids, params).into_iter().map(|run_id| self.run_json(run_id)).collect();
        Reply::json(200, json!({ "total_count": total_count, "workflow_runs": runs }))
    }

    fn list_jobs(&self, owner: &str, repo: &str, run_id: u64, params: &Params) -> Reply {
        let jobs: Vec<&WorkflowJob> = (self.jobs.values())
            .filter(|job| job.run_id == run_id && job.owner == owner && job.repo == repo)
            .collect();
        if jobs.is_empty() {
            return Reply::not_found();
        }
        let total_count = jobs.len();
        let jobs: Vec<Value> = page(jobs, params).into_iter().map(WorkflowJob::to_json).collect();
        Reply::json(200, json!({ "total_count": total_count, "jobs": jobs }))
    }

    /// A run in GitHub's `workflow-run` shape, its status summing up its jobs'.
    fn run_json(&self, run_id: u64) -> Value {
        let jobs: Vec<&WorkflowJob> = self.jobs.values().filter(|j| j.run_id == run_id).collect();
        let (status, conclusion) = run_status(&jobs);
        let mut run = workflow_run_json(&self.url, jobs[0]);
        run["status"] = json!(status);
        run["conclusion"] = json!(conclusion);
        run
    }

    fn queue_job(&mut self, owner: &str, repo: &str, labels: &[&str]) -> WorkflowJob {
        let job = WorkflowJob {
            id: self.next_job_id,
            run_id: self.next_run_id,
            owner: owner.to_owned(),
            repo: repo.to_owned(),
            labels: labels.iter().map(|label| label.to_string()).collect(),
            status: "queued".to_owned(),
            conclusion: None,
            runner_id: None,
            runner_name: None,
            runner_group_id: None,
            runner_group_name: None,
            name: "build".to_owned(),
            workflow_name: "CI".to_owned(),
            head_branch: "main".to_owned(),
            created_at: rfc3339(SystemTime::now()),
            started_at: None,
            completed_at: None,
            api_url: self.url.clone(),
        };
        self.next_job_id += 1;
        self.next_run_id += 1;
        self.jobs.insert(job.id, job.clone());
        job
    }

    fn set_job(
        &mut self,
        job_id: u64,
        status: &str,
        conclusion: Option<&str>,
        runner_name: Option<&str>,
    ) -> WorkflowJob {
        let Some(mut job) = self.jobs.get(&job_id).cloned() else {
            panic!("the fake has no job {job_id}");
        };
        job.advance(status, conclusion, &rfc3339(SystemTime::now()));
        if let Some(name) = runner_name {
            self.assign_runner(&mut job, name);
        }

        let runner = self.runners.values_mut().flatten().find(|r| Some(r.id) == job.runner_id);
        if let Some(runner) = runner {
            runner.busy = status == "in_progress";
            runner.status = if status == "completed" { "offline" } else { "online" }.to_owned();
        }
        self.jobs.insert(job_id, job.clone());
        job
    }

    /// Names the job's runner, and copies the runner's id and group from a registered runner of
    /// that name that could take the job, if there is one.
    fn assign_runner(&self, job: &mut WorkflowJob, name: &str) {
        job.runner_name = Some(name.to_owned());
        let registered = (self.runners.iter())
            .filter(|(scope, _)| scope.covers(&job.owner, &job.repo))
            .flat_map(|(scope, runners)| runners.iter().map(move |runner| (scope, runner)))
            .find(|(_, runner)| runner.name == name);
        if let Some((scope, runner)) = registered {
            job.runner_id = Some(runner.id);
            job.runner_group_id = Some(runner.runner_group_id);
            job.runner_group_name = self.group_name(scope, runner.runner_group_id);
        }
    }
}

/// The claims of a GitHub App's JWT. GitHub takes the issuer as a number or as a string of
/// digits; octocrab sends a number.
#[derive(Deserialize)]
struct AppClaims {
    iss: Value,
    iat: u64,
    exp: u64,
}

impl AppClaims {
    fn app_id(&self) -> Option<u64> {
        match &self.iss {
            Value::Number(number) => number.as_u64(),
            Value::String(digits) => digits.parse().ok(),
            _ => None,
        }
    }
}

/// The body of a generate-jitconfig request.
#[derive(Deserialize)]
struct JitBody {
    name: String,
    runner_group_id: u64,
    labels: Vec<String>,
    #[serde(default = "default_work_folder")]
    work_folder: String,
}

fn default_work_folder() -> String {
    "_work".to_owned()
}

impl JitBody {
    fn parse(body: &[u8]) -> Result<JitBody, String> {
        let request: JitBody =
            serde_json::from_slice(body).map_err(|e| format!("Invalid request.\n\n{e}."))?;
        if request.name.is_empty() {
            return Err("Invalid request.\n\nThe runner's name is empty.".to_owned());
        }
        let labels = &request.labels;
        if labels.is_empty() || labels.len() > MAX_LABELS || labels.iter().any(String::is_empty) {
            return Err(format!(
                "Invalid request.\n\nLabels must be 1 to {MAX_LABELS} names, none empty."
            ));
        }
        Ok(request)
    }
}

/// The encoded JIT configuration: the base64 of a JSON object that maps the runner's
/// configuration files to their base64 contents, as `run.sh --jitconfig` reads it.
fn jit_config(
    url: &str,
    scope: &Scope,
    runner: &Runner,
    group: &str,
    work_folder: &str,
    hold_secs: u64,
) -> String {
    let mut settings = json!({
        "agentId": runner.id,
        "agentName": runner.name,
        "poolId": runner.runner_group_id,
        "poolName": group,
        "serverUrl": format!("{url}/_services/runner/"),
        "gitHubUrl": scope.github_url(),
        "workFolder": work_folder,
        "ephemeral": true,
        "disableUpdate": true,
    });
    if hold_secs > 0 {
        settings["warmpoolStandInHoldSecs"] = json!(hold_secs);
    }
    let client_id = uuid::Uuid::new_v4();
    let credentials = json!({
        "scheme": "OAuth",
        "data": {
            "clientId": client_id.to_string(),
            "authorizationUrl": format!("{url}/_apis/oauth2/token/{client_id}"),
            "requireFipsCryptography": "False",
        },
    });
    let files = json!({
        ".runner": BASE64.encode(settings.to_string()),
        ".credentials": BASE64.encode(credentials.to_string()),
        ".credentials_rsaparams": BASE64.encode(rsa_params().to_string()),
    });
    BASE64.encode(files.to_string())
}

/// The runner's RSA key in .NET's `RSAParameters` form, random bytes of a 2048-bit key's sizes:
/// nothing checks that they make a key.
fn rsa_params() -> Value {
    let random = |len: usize| BASE64.encode(random_bytes(len));
    json!({
        "d": random(256),
        "dp": random(128),
        "dq": random(128),
        "exponent": "AQAB",
        "inverseQ": random(128),
        "modulus": random(256),
        "p": random(128),
        "q": random(128),
    })
}

/// A run's status from its jobs': completed when all are, queued while none has started.
fn run_status(jobs: &[&WorkflowJob]) -> (&'static str, Option<&'static str>) {
    let completed = jobs.iter().filter(|job| job.status == "completed").count();
    let queued = jobs.iter().filter(|job| job.status == "queued").count();
    if completed < jobs.len() {
        return (if queued == jobs.len() { "queued" } else { "in_progress" }, None);
    }
    let concluded = |c: &str| jobs.iter().any(|job| job.conclusion.as_deref() == Some(c));
    let conclusion = ["failure", "cancelled", "timed_out"].into_iter().find(|c| concluded(c));
    ("completed", Some(conclusion.unwrap_or("success")))
}

/// The run of `job` in GitHub's `workflow-run` shape, before its status is summed up.
fn workflow_run_json(api: &str, job: &WorkflowJob) -> Value {
    let full_name = format!("{}/{}", job.owner, job.repo);
    let run_api = format!("{api}/repos/{full_name}/actions/runs/{}", job.run_id);
    let updated_at =
        (job.completed_at.as_ref().or(job.started_at.as_ref())).unwrap_or(&job.created_at);
    let repository = repository_json(api, &job.owner, &job.repo);
    let actor = user_json(api, SENDER_LOGIN, "User");
    let sha = head_sha(job.run_id);
    json!({
        "id": job.run_id,
        "name": job.workflow_name,
        "node_id": node_id("WorkflowRun", job.run_id),
        "check_suite_id": job.run_id,
        "check_suite_node_id": node_id("CheckSuite", job.run_id),
        "head_branch": job.head_branch,
        "head_sha": sha,
        "path": ".github/workflows/ci.yml",
        "display_title": job.workflow_name,
        "run_number": job.run_id - FIRST_RUN_ID + 1,
        "run_attempt": 1,
        "referenced_workflows": [],
        "event": "push",
        "workflow_id": 1,
        "url": run_api,
        "html_url": format!("https://github.com/{full_name}/actions/runs/{}", job.run_id),
        "pull_requests": [],
        "created_at": job.created_at,
        "updated_at": updated_at,
        "run_started_at": job.created_at,
        "actor": actor,
        "triggering_actor": actor,
        "jobs_url": format!("{run_api}/jobs"),
        "logs_url": format!("{run_api}/logs"),
        "check_suite_url": format!("{api}/repos/{full_name}/check-suites/{}", job.run_id),
        "artifacts_url": format!("{run_api}/artifacts"),
        "cancel_url": format!("{run_api}/cancel"),
        "rerun_url": format!("{run_api}/rerun"),
        "previous_attempt_url": null,
        "workflow_url": format!("{api}/repos/{full_name}/actions/workflows/1"),
        "head_commit": head_commit_json(&sha, &job.created_at),
        "repository": repository,
        "head_repository": repository,
    })
}

fn head_commit_json(sha: &str, timestamp: &str) -> Value {
    let author = json!({ "name": "Monalisa Octocat", "email": "octocat@github.com" });
    json!({
        "id": sha,
        "tree_id": sha,
        "message": "Build",
        "timestamp": timestamp,
        "author": author,
        "committer": author,
    })
}

/// A repository in GitHub's minimal shape, owned by an organization.
fn repository_json(api: &str, owner: &str, repo: &str) -> Value {
    let full_name = format!("{owner}/{repo}");
    let id = stable_id("repository", &full_name);
    json!({
        "id": id,
        "node_id": node_id("Repository", id),
        "name": repo,
        "full_name": full_name,
        "private": true,
        "owner": user_json(api, owner, "Organization"),
        "html_url": format!("https://github.com/{full_name}"),
        "description": null,
        "fork": false,
        "url": format!("{api}/repos/{full_name}"),
        "hooks_url": format!("{api}/repos/{full_name}/hooks"),
        "default_branch": "main",
        "visibility": "private",
    })
}

/// An account in GitHub's `simple-user` shape.
fn user_json(api: &str, login: &str, kind: &str) -> Value {
    let id = stable_id("account", login);
    let user_api = format!("{api}/users/{login}");
    json!({
        "login": login,
        "id": id,
        "node_id": node_id(kind, id),
        "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}?v=4"),
        "gravatar_id": "",
        "url": user_api,
        "html_url": format!("https://github.com/{login}"),
        "followers_url": format!("{user_api}/followers"),
        "following_url": format!("{user_api}/following{{/other_user}}"),
        "gists_url": format!("{user_api}/gists{{/gist_id}}"),
        "starred_url": format!("{user_api}/starred{{/owner}}{{/repo}}"),
        "subscriptions_url": format!("{user_api}/subscriptions"),
        "organizations_url": format!("{user_api}/orgs"),
        "repos_url": format!("{user_api}/repos"),
        "events_url": format!("{user_api}/events{{/privacy}}"),
        "received_events_url": format!("{user_api}/received_events"),
        "type": kind,
        "site_admin": false,
    })
}

/// An organization in GitHub's `organization-simple` shape.
fn organization_json(api: &str, login: &str) -> Value {
    let id = stable_id("account", login);
    let org_api = format!("{api}/orgs/{login}");
    json!({
        "login": login,
        "id": id,
        "node_id": node_id("Organization", id),
        "url": org_api,
        "repos_url": format!("{org_api}/repos"),
        "events_url": format!("{org_api}/events"),
        "hooks_url": format!("{org_api}/hooks"),
        "issues_url": format!("{org_api}/issues"),
        "members_url": format!("{org_api}/members{{/member}}"),
        "public_members_url": format!("{org_api}/public_members{{/member}}"),
        "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}?v=4"),
        "description": null,
    })
}

/// The same id for the same name in every run of the fake, below `u32::MAX`.
fn stable_id(kind: &str, name: &str) -> u64 {
    let digest = Sha256::digest(format!("{kind}:{name}"));
    u64::from(u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) >> 1) + 1
}

/// A node id in GitHub's older form, the base64 of "{length of type}:{type}{id}".
fn node_id(kind: &str, id: u64) -> String {
    BASE64.encode(format!("{:02}:{kind}{id}", kind.len()))
}

/// A commit hash that stays the same for a run.
fn head_sha(run_id: u64) -> String {
    hex(&Sha256::digest(format!("run {run_id}")))[..40].to_owned()
}

/// The token after one of `schemes` in the Authorization header.
fn credential<'a>(headers: &'a HeaderMap, schemes: &[&str]) -> Option<&'a str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    schemes.iter().any(|s| scheme.eq_ignore_ascii_case(s)).then(|| token.trim())
}

fn page<T>(items: Vec<T>, params: &Params) -> Vec<T> {
    let number = |key: &str| params.get(key).and_then(|value| value.parse::<usize>().ok());
    let per_page = number("per_page").unwrap_or(DEFAULT_PER_PAGE).clamp(1, MAX_PER_PAGE);
    let page = number("page").unwrap_or(1).max(1);
    items.into_iter().skip((page - 1).saturating_mul(per_page)).take(per_page).collect()
}

/// # Panics
/// If the operating system has no randomness to give, which leaves the fake nothing to do.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    getrandom::fill(&mut bytes).expect("the operating system gives random bytes");
    bytes
}

fn random_alphanumeric(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    random_bytes(len).iter().map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char).collect()
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

fn invalid_input(reason: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, reason.to_string())
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

/// `time` as GitHub writes times: RFC 3339 in UTC to the second, "2024-05-01T12:00:00Z".
fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
    let (year, month, day) = civil_date(secs / 86_400);
    let (hour, minute, second) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

/// The Gregorian date `days` after 1970-01-01, by Howard Hinnant's `civil_from_days`.
fn civil_date(days: u64) -> (u64, u64, u64) {
    let days = days + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::OnceLock;

    use jsonwebtoken::{EncodingKey, Header};
    use octocrab::models::actions::{SelfHostedRunner, SelfHostedRunnerJitConfig};
    use octocrab::models::webhook_events::{WebhookEvent, WebhookEventPayload};
    use octocrab::models::workflows::{Job, Run};

    use super::*;

    const APP_ID: u64 = 4242;
    const INSTALLATION_ID: u64 = 77;
    const TOKEN: &str = "github_pat_fake";

    struct KeyPair {
        private_pem: String,
        public_pem: String,
    }

    /// One RSA key pair for the app and one for an impostor, made by the openssl CLI once.
    fn keys() -> &'static [KeyPair; 2] {
        static KEYS: OnceLock<[KeyPair; 2]> = OnceLock::new();
        KEYS.get_or_init(|| [key_pair(), key_pair()])
    }

    fn key_pair() -> KeyPair {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("app.pem");
        // openssl draws its progress on stderr; it is kept to explain a failure only.
        let generated = Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
            .arg(&private)
            .output()
            .expect("the openssl CLI runs");
        let stderr = String::from_utf8_lossy(&generated.stderr);
        assert!(generated.status.success(), "openssl genpkey failed: {stderr}");
        let public = Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .output()
            .expect("the openssl CLI runs");
        assert!(public.status.success(), "openssl pkey -pubout failed");
        KeyPair {
            private_pem: std::fs::read_to_string(&private).unwrap(),
            public_pem: String::from_utf8(public.stdout).unwrap(),
        }
    }

    fn jwt(key: &KeyPair, iss: Value, lifetime_secs: u64) -> String {
        let now = now_secs();
        let claims = json!({ "iss": iss, "iat": now - 60, "exp": now + lifetime_secs });
        let key = EncodingKey::from_rsa_pem(key.private_pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap()
    }

    async fn fake_with_app() -> FakeGithub {
        let fake = FakeGithub::start().await.unwrap();
        fake.add_app(APP_ID, &keys()[0].public_pem);
        fake.add_installation(INSTALLATION_ID, APP_ID);
        fake.add_token(TOKEN);
        fake
    }

    struct Answer {
        status: u16,
        headers: HeaderMap,
        body: Value,
    }

    async fn send(
        fake: &FakeGithub,
        method: &str,
        path: &str,
        authorization: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let authority = fake.url().trim_start_matches("http://").to_owned();
        let mut request =
            http::Request::builder().method(method).uri(path).header("host", &authority);
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let body = Bytes::from(body.map(|b| b.to_string()).unwrap_or_default());
        let (status, headers, body) =
            exchange(&authority, request.body(Full::new(body)).unwrap()).await.unwrap();
        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Answer { status: status.as_u16(), headers, body }
    }

    async fn request_token(fake: &FakeGithub, jwt: &str, installation_id: u64) -> Answer {
        let path = format!("/app/installations/{installation_id}/access_tokens");
        send(fake, "POST", &path, Some(&format!("Bearer {jwt}")), Some(json!({}))).await
    }

    async fn generate(fake: &FakeGithub, scope: &Scope, name: &str, group: u64) -> Answer {
        let path = format!("{}/actions/runners/generate-jitconfig", scope.api_path());
        let body = json!({
            "name": name,
            "runner_group_id": group,
            "labels": ["self-hosted", "windows-arm64"],
            "work_folder": "_work",
        });
        send(fake, "POST", &path, Some(&format!("Bearer {TOKEN}")), Some(body)).await
    }

    async fn get(fake: &FakeGithub, path: &str) -> Answer {
        send(fake, "GET", path, Some(&format!("token {TOKEN}")), None).await
    }

    fn org() -> Scope {
        Scope::Organization("acme".to_owned())
    }

    fn decode_base64_json(text: &str) -> Value {
        serde_json::from_slice(&BASE64.decode(text).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn an_installation_token_is_issued_for_a_jwt_with_a_numeric_or_string_issuer() {
        let fake = fake_with_app().await;

        for iss in [json!(APP_ID), json!(APP_ID.to_string())] {
            let answer = request_token(&fake, &jwt(&keys()[0], iss, 540), INSTALLATION_ID).await;
            assert_eq!(answer.status, 201, "{}", answer.body);
            assert!(answer.body["token"].as_str().unwrap().starts_with("ghs_"));
            assert!(answer.body["expires_at"].as_str().unwrap().ends_with('Z'));
            assert_eq!(answer.body["permissions"]["administration"], "write");
            assert_eq!(answer.body["repository_selection"], "all");
        }
        assert_eq!(fake.tokens_issued(), 2);
    }

    #[tokio::test]
    async fn a_jwt_of_another_key_or_expiring_too_late_is_refused() {
        let fake = fake_with_app().await;

        let impostor = jwt(&keys()[1], json!(APP_ID), 540);
        assert_eq!(request_token(&fake, &impostor, INSTALLATION_ID).await.status, 401);
        let too_long = jwt(&keys()[0], json!(APP_ID), 3600);
        let answer = request_token(&fake, &too_long, INSTALLATION_ID).await;
        assert_eq!(answer.status, 401);
        assert!(answer.body["message"].as_str().unwrap().contains("'exp'"));
        assert_eq!(answer.body["documentation_url"], DOCUMENTATION_URL);
        let unknown_app = jwt(&keys()[0], json!(APP_ID + 1), 540);
        assert_eq!(request_token(&fake, &unknown_app, INSTALLATION_ID).await.status, 401);
        assert_eq!(request_token(&fake, "not-a-jwt", INSTALLATION_ID).await.status, 401);
        assert_eq!(fake.tokens_issued(), 0);
    }

    #[tokio::test]
    async fn an_installation_of_another_app_is_not_found() {
        let fake = fake_with_app().await;
        fake.add_app(APP_ID + 1, &keys()[1].public_pem);
        fake.add_installation(INSTALLATION_ID + 1, APP_ID + 1);

        let answer = request_token(&fake, &jwt(&keys()[0], json!(APP_ID), 540), 78).await;
        assert_eq!(answer.status, 404);
        assert_eq!(fake.tokens_issued(), 0);
    }

    #[tokio::test]
    async fn an_installation_token_is_refused_once_expired() {
        let fake = fake_with_app().await;
        fake.set_token_lifetime(Duration::from_millis(300));
        let answer = request_token(&fake, &jwt(&keys()[0], json!(APP_ID), 540), 77).await;
        let token = format!("Bearer {}", answer.body["token"].as_str().unwrap());

        let path = "/orgs/acme/actions/runners";
        assert_eq!(send(&fake, "GET", path, Some(&token), None).await.status, 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let answer = send(&fake, "GET", path, Some(&token), None).await;
        assert_eq!(answer.status, 401);
        assert_eq!(answer.body["message"], "Bad credentials");
        assert_eq!(send(&fake, "GET", path, None, None).await.status, 401);
    }

    #[tokio::test]
    async fn a_jit_configuration_decodes_to_the_runner_s_files() {
        let fake = fake_with_app().await;
        let scope = Scope::Repository("acme".to_owned(), "widgets".to_owned());

        let answer = generate(&fake, &scope, "warmpool-slot-1", 1).await;
        assert_eq!(answer.status, 201, "{}", answer.body);
        let config: SelfHostedRunnerJitConfig = serde_json::from_value(answer.body).unwrap();
        assert_eq!(config.runner.name, "warmpool-slot-1");
        assert_eq!(config.runner.status, "offline");
        let files = decode_base64_json(&config.encoded_jit_config);
        let runner = decode_base64_json(files[".runner"].as_str().unwrap());
        assert_eq!(runner["agentId"], *config.runner.id);
        assert_eq!(runner["agentName"], "warmpool-slot-1");
        assert_eq!(runner["poolId"], 1);
        assert_eq!(runner["poolName"], "Default");
        assert_eq!(runner["serverUrl"], format!("{}/_services/runner/", fake.url()));
        assert_eq!(runner["gitHubUrl"], "https://github.com/acme/widgets");
        assert_eq!(runner["workFolder"], "_work");
        assert_eq!(runner["ephemeral"], true);
        let credentials = decode_base64_json(files[".credentials"].as_str().unwrap());
        assert_eq!(credentials["scheme"], "OAuth");
        assert!(credentials["data"]["clientId"].is_string());
        let rsa = decode_base64_json(files[".credentials_rsaparams"].as_str().unwrap());
        for key in ["d", "dp", "dq", "exponent", "inverseQ", "modulus", "p", "q"] {
            assert!(BASE64.decode(rsa[key].as_str().unwrap()).is_ok(), "{key}");
        }

        let registered = fake.runners(&scope);
        assert_eq!(registered.len(), 1);
        assert_eq!(registered[0].id, *config.runner.id);
        let requests = fake.jit_requests();
        assert_eq!(requests[0].scope, scope);
        assert_eq!(requests[0].labels, ["self-hosted", "windows-arm64"]);
        assert_eq!(requests[0].runner_id, registered[0].id);
    }

    #[tokio::test]
    async fn a_second_runner_of_a_name_conflicts_in_its_scope_only() {
        let fake = fake_with_app().await;

        assert_eq!(generate(&fake, &org(), "slot-1", 1).await.status, 201);
        let again = generate(&fake, &org(), "slot-1", 1).await;
        assert_eq!(again.status, 409);
        assert!(again.body["message"].as_str().unwrap().contains("already exists"));
        let enterprise = Scope::Enterprise("big".to_owned());
        assert_eq!(generate(&fake, &enterprise, "slot-1", 1).await.status, 201);
        assert_eq!(fake.jit_requests().len(), 2);
    }

    #[tokio::test]
    async fn an_unknown_group_or_bad_labels_are_unprocessable() {
        let fake = fake_with_app().await;

        assert_eq!(generate(&fake, &org(), "slot-1", 7).await.status, 422);
        fake.add_runner_group(&org(), 7, "arm64");
        let answer = generate(&fake, &org(), "slot-1", 7).await;
        assert_eq!(answer.status, 201);
        let files = decode_base64_json(answer.body["encoded_jit_config"].as_str().unwrap());
        assert_eq!(decode_base64_json(files[".runner"].as_str().unwrap())["poolName"], "arm64");

        let path = "/orgs/acme/actions/runners/generate-jitconfig";
        let auth = Some(format!("Bearer {TOKEN}"));
        let too_many: Vec<String> = (0..=MAX_LABELS).map(|i| format!("l{i}")).collect();
        for labels in [json!([]), json!([""]), json!(too_many), json!("self-hosted")] {
            let body = json!({ "name": "slot-2", "runner_group_id": 1, "labels": labels });
            let answer = send(&fake, "POST", path, auth.as_deref(), Some(body)).await;
            assert_eq!(answer.status, 422, "{labels}");
        }
        assert_eq!(fake.runners(&org()).len(), 1);
    }

    #[tokio::test]
    async fn injected_failures_answer_first_with_their_headers() {
        let fake = fake_with_app().await;
        fake.inject(
            Endpoint::ListRunners,
            Failure { retry_after_secs: Some(30), ..Failure::rate_limit() },
            2,
        );
        fake.inject(Endpoint::GenerateJitConfig, Failure::status(502, "Server Error"), 1);

        let before = now_secs();
        for _ in 0..2 {
            let answer = send(&fake, "GET", "/orgs/acme/actions/runners", None, None).await;
            assert_eq!(answer.status, 403);
            assert_eq!(answer.headers["retry-after"], "30");
            assert_eq!(answer.headers["x-ratelimit-remaining"], "0");
            let reset: u64 = answer.headers["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
            assert!(reset >= before + 30 && reset <= now_secs() + 30);
            assert!(answer.body["message"].as_str().unwrap().contains("rate limit"));
        }
        assert_eq!(send(&fake, "GET", "/orgs/acme/actions/runners", None, None).await.status, 401);
        assert_eq!(generate(&fake, &org(), "slot-1", 1).await.status, 502);
        assert_eq!(generate(&fake, &org(), "slot-1", 1).await.status, 201);

        let statuses: Vec<(Option<Endpoint>, u16)> =
            fake.calls().iter().map(|call| (call.endpoint, call.status)).collect();
        let expected = [
            (Some(Endpoint::ListRunners), 403),
            (Some(Endpoint::ListRunners), 403),
            (Some(Endpoint::ListRunners), 401),
            (Some(Endpoint::GenerateJitConfig), 502),
            (Some(Endpoint::GenerateJitConfig), 201),
        ];
        assert_eq!(statuses, expected);
    }

    #[tokio::test]
    async fn runners_are_listed_by_page_and_name_and_deleted_once() {
        let fake = fake_with_app().await;
        for name in ["slot-1", "slot-2", "slot-3"] {
            generate(&fake, &org(), name, 1).await;
        }
        let ids: Vec<u64> = fake.runners(&org()).iter().map(|runner| runner.id).collect();

        let answer = get(&fake, "/orgs/acme/actions/runners?per_page=2&page=2").await;
        assert_eq!(answer.body["total_count"], 3);
        let listed: Vec<SelfHostedRunner> =
            serde_json::from_value(answer.body["runners"].clone()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "slot-3");
        let answer = get(&fake, "/orgs/acme/actions/runners?name=slot-2").await;
        assert_eq!(answer.body["total_count"], 1);
        assert_eq!(answer.body["runners"][0]["id"], ids[1]);

        let path = format!("/orgs/acme/actions/runners/{}", ids[1]);
        let auth = Some(format!("Bearer {TOKEN}"));
        assert_eq!(send(&fake, "DELETE", &path, auth.as_deref(), None).await.status, 204);
        assert_eq!(send(&fake, "DELETE", &path, auth.as_deref(), None).await.status, 404);
        assert_eq!(fake.deleted_runners(), [(org(), ids[1])]);
        fake.remove_runner(&org(), ids[0]);
        let names: Vec<String> = fake.runners(&org()).into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["slot-3"]);
    }

    #[tokio::test]
    async fn a_busy_runner_cannot_be_deleted() {
        let fake = fake_with_app().await;
        generate(&fake, &org(), "slot-1", 1).await;
        let runner_id = fake.runners(&org())[0].id;
        let job = fake.queue_job("acme", "widgets", &["self-hosted"]);

        let job = fake.set_job(job.id, "in_progress", None, Some("slot-1"));
        assert_eq!(job.runner_id, Some(runner_id));
        assert_eq!(job.runner_group_name.as_deref(), Some("Default"));
        assert!(fake.runners(&org())[0].busy);
        let path = format!("/orgs/acme/actions/runners/{runner_id}");
        let auth = Some(format!("Bearer {TOKEN}"));
        assert_eq!(send(&fake, "DELETE", &path, auth.as_deref(), None).await.status, 422);
        fake.set_job(job.id, "completed", Some("success"), None);
        assert_eq!(send(&fake, "DELETE", &path, auth.as_deref(), None).await.status, 204);
    }

    #[tokio::test]
    async fn runs_are_filtered_by_their_jobs_status_and_list_their_jobs() {
        let fake = fake_with_app().await;
        let first = fake.queue_job("acme", "widgets", &["self-hosted", "windows-arm64"]);
        let second = fake.queue_job("acme", "widgets", &["self-hosted"]);
        fake.queue_job("acme", "gadgets", &["self-hosted"]);
        assert!(second.id > first.id && second.run_id > first.run_id);
        fake.set_job(first.id, "in_progress", None, Some("elsewhere"));

        let runs = get(&fake, "/repos/acme/widgets/actions/runs?status=queued&per_page=10").await;
        assert_eq!(runs.body["total_count"], 1);
        let listed: Vec<Run> = serde_json::from_value(runs.body["workflow_runs"].clone()).unwrap();
        assert_eq!(*listed[0].id, second.run_id);
        assert_eq!(listed[0].status, "queued");
        let runs = get(&fake, "/repos/acme/widgets/actions/runs").await;
        let ids: Vec<&Value> =
            (runs.body["workflow_runs"].as_array().unwrap().iter()).map(|run| &run["id"]).collect();
        assert_eq!(ids, [&json!(second.run_id), &json!(first.run_id)]);

        let path = format!("/repos/acme/widgets/actions/runs/{}/jobs?filter=latest", first.run_id);
        let jobs = get(&fake, &path).await;
        assert_eq!(jobs.body["total_count"], 1);
        let listed: Vec<Job> = serde_json::from_value(jobs.body["jobs"].clone()).unwrap();
        assert_eq!(*listed[0].id, first.id);
        assert_eq!(listed[0].runner_name.as_deref(), Some("elsewhere"));
        assert_eq!(listed[0].labels, ["self-hosted", "windows-arm64"]);
        let path = format!("/repos/acme/gadgets/actions/runs/{}/jobs", first.run_id);
        assert_eq!(get(&fake, &path).await.status, 404);
    }

    #[tokio::test]
    async fn a_job_records_its_start_and_completion() {
        let fake = FakeGithub::start().await.unwrap();
        let job = fake.queue_job("acme", "widgets", &["self-hosted"]);
        assert_eq!(job.status, "queued");
        assert_eq!(job.started_at, None);

        fake.set_job(job.id, "in_progress", None, Some("slot-1"));
        let done = fake.set_job(job.id, "completed", Some("failure"), None);
        assert!(done.started_at.is_some() && done.completed_at.is_some());
        assert_eq!(done.runner_name.as_deref(), Some("slot-1"));
        assert_eq!(fake.job(job.id), Some(done));
        assert_eq!(fake.job(job.run_id), None);
    }

    #[tokio::test]
    async fn unknown_paths_are_not_found_and_recorded() {
        let fake = fake_with_app().await;

        let answer = get(&fake, "/orgs/acme/actions/runners/groups?x=1").await;
        assert_eq!(answer.status, 404);
        assert_eq!(answer.body["message"], "Not Found");
        let calls = fake.calls();
        assert_eq!(calls[0].path, "/orgs/acme/actions/runners/groups");
        assert_eq!((calls[0].endpoint, calls[0].status), (None, 404));
        assert_eq!(calls[0].method, "GET");
    }

    #[tokio::test]
    async fn webhook_payloads_parse_as_github_events() {
        let fake = FakeGithub::start().await.unwrap();
        let job = fake.queue_job("acme", "widgets", &["self-hosted"]);

        let body = fake.workflow_job_event("queued", &job, Some(INSTALLATION_ID)).to_string();
        let event = WebhookEvent::try_from_header_and_body("workflow_job", &body).unwrap();
        assert_eq!(*event.installation.unwrap().id(), INSTALLATION_ID);
        assert_eq!(event.repository.unwrap().full_name.as_deref(), Some("acme/widgets"));
        assert_eq!(event.organization.unwrap().login, "acme");
        let WebhookEventPayload::WorkflowJob(payload) = event.specific else { panic!() };
        let parsed: Job = serde_json::from_value(payload.workflow_job).unwrap();
        assert_eq!(*parsed.id, job.id);
        let without = fake.workflow_job_event("queued", &job, None);
        assert!(without.get("installation").is_none());

        let ping = fake.ping_event(9, Some(APP_ID), "http://127.0.0.1:1/hook").to_string();
        let event = WebhookEvent::try_from_header_and_body("ping", &ping).unwrap();
        let WebhookEventPayload::Ping(ping) = event.specific else { panic!() };
        assert_eq!(*ping.hook.unwrap().app_id.unwrap(), APP_ID);
    }

    #[test]
    fn signature_matches_github_s_documented_test_vector() {
        assert_eq!(
            signature(b"It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[tokio::test]
    async fn a_delivery_reaches_its_receiver_with_github_s_headers() {
        let received = Arc::new(Mutex::new(None));
        let seen = received.clone();
        let receiver = Router::new().route(
            "/hooks/github",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| async move {
                *seen.lock().unwrap() = Some((headers, body));
                (StatusCode::ACCEPTED, "thanks")
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = format!("http://{}/hooks/github", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, receiver).await });

        let body = br#"{"zen":"Design for failure."}"#;
        let answer = FakeGithub::deliver(&target, b"secret", "ping", "d-1", body).await.unwrap();
        assert_eq!(answer, (202, "thanks".to_owned()));
        let (headers, received) = received.lock().unwrap().take().unwrap();
        assert_eq!(received.as_ref(), body);
        assert_eq!(headers["x-github-event"], "ping");
        assert_eq!(headers["x-github-delivery"], "d-1");
        assert_eq!(headers["x-hub-signature-256"], signature(b"secret", body).as_str());
        assert_eq!(headers["content-type"], "application/json");
        assert!(headers["user-agent"].to_str().unwrap().starts_with("GitHub-Hookshot/"));
        server.abort();
    }

    #[tokio::test]
    async fn a_delivery_to_a_non_http_url_is_refused() {
        let error = FakeGithub::deliver("https://example.invalid/", b"s", "ping", "d", b"{}")
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn octocrab_gets_an_installation_token_and_a_jit_configuration() {
        use octocrab::models::{AppId, InstallationId};
        let fake = fake_with_app().await;
        let key = EncodingKey::from_rsa_pem(keys()[0].private_pem.as_bytes()).unwrap();

        let app = octocrab::Octocrab::builder()
            .base_uri(fake.url())
            .unwrap()
            .app(AppId(APP_ID), key)
            .build()
            .unwrap();
        let installation = app.installation(InstallationId(INSTALLATION_ID)).unwrap();
        installation.installation_token().await.unwrap();
        assert_eq!(fake.tokens_issued(), 1);

        let body = json!({ "name": "slot-1", "runner_group_id": 1, "labels": ["self-hosted"] });
        let path = "/orgs/acme/actions/runners/generate-jitconfig";
        let response = installation._post(path, Some(&body)).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let text = installation.body_to_string(response).await.unwrap();
        let config: SelfHostedRunnerJitConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(config.runner.name, "slot-1");
        assert_eq!(fake.jit_requests()[0].work_folder, "_work");
        assert_eq!(fake.tokens_issued(), 1);
    }

    #[test]
    fn times_are_written_as_github_writes_them() {
        let at = |secs: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
    }
}
