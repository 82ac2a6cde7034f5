//! The GitHub REST calls a tenant's runners need, with GitHub's failures sorted into those worth
//! retrying and those that end the work at hand.
//!
//! `octocrab` authenticates: a GitHub App's JWT and installation tokens (cached, and renewed
//! [`TOKEN_RENEWAL`] before they expire), or a fine-grained token. The calls themselves go
//! through its raw interface, so that this module sees every status code and the rate-limit
//! headers:
//!
//! | answer | what happens |
//! |---|---|
//! | 2xx | the call succeeded |
//! | 401 | a fresh installation token is fetched once and the call repeated; then [`GithubError::Unauthorized`] |
//! | 403 or 429 with `Retry-After` or `x-ratelimit-remaining: 0` | wait as told (at most `max_wait`), then retry |
//! | other 403, 404, 409, 422 | no retry: the caller decides (a 404 on delete means already gone) |
//! | 5xx, 429 without headers, transport errors | retry with doubling backoff |

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use octocrab::models::{AppId, InstallationId};
use octocrab::Octocrab;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::store::{GithubScope, GithubSettings};

/// How long before an installation token expires that it is replaced.
pub const TOKEN_RENEWAL: Duration = Duration::from_secs(5 * 60);
/// The label of every self-hosted runner, which jobs may name without a pool carrying it.
pub const SELF_HOSTED: &str = "self-hosted";
/// github.com's API root.
pub const GITHUB_API: &str = "https://api.github.com";
/// A call that hangs this long is a failed attempt.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How hard a call tries before it gives up.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_backoff: Duration,
    /// The longest wait a rate limit may impose on one attempt; longer ones fail the call.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_millis(500),
            max_wait: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GithubError {
    #[error("The tenant's GitHub credentials are unusable: {0}")]
    Credentials(String),
    #[error("GitHub refused the credentials (401): {0}")]
    Unauthorized(String),
    #[error("GitHub forbade {what} (403): {message}")]
    Forbidden { what: String, message: String },
    #[error("GitHub has no {0} (404)")]
    NotFound(String),
    #[error("GitHub reports a conflict (409): {0}")]
    Conflict(String),
    #[error("GitHub refused {what} as invalid (422): {message}")]
    Invalid { what: String, message: String },
    #[error("GitHub rate-limits the tenant for {secs} s more")]
    RateLimited { secs: u64 },
    #[error("GitHub failed {attempts} times; the last: {last}")]
    Unavailable { attempts: u32, last: String },
    #[error("GitHub sent an unexpected answer to {what}: {message}")]
    Response { what: String, message: String },
}

/// A runner GitHub knows of.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RunnerInfo {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub busy: bool,
}

/// A runner registered for one job.
#[derive(Debug, Clone)]
pub struct JitRunner {
    pub runner: RunnerInfo,
    pub encoded_jit_config: String,
}

/// A workflow job as the REST API lists it: the fields demand needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobInfo {
    pub id: u64,
    pub run_id: u64,
    pub status: String,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub runner_name: Option<String>,
}

/// The credentials a client is built from, opened from the tenant's secrets.
/// Wiped from memory when dropped.
pub enum Credentials {
    App { app_id: u64, installation_id: u64, private_key_pem: zeroize::Zeroizing<Vec<u8>> },
    Token(zeroize::Zeroizing<String>),
}

impl Credentials {
    /// A digest that tells one credential from another without keeping it.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::Digest as _;
        let mut hash = sha2::Sha256::new();
        match self {
            Credentials::App { app_id, installation_id, private_key_pem } => {
                hash.update(app_id.to_be_bytes());
                hash.update(installation_id.to_be_bytes());
                hash.update(private_key_pem.as_slice());
            }
            Credentials::Token(token) => hash.update(token.as_bytes()),
        }
        hash.finalize().into()
    }
}

/// One tenant's GitHub API.
pub struct GithubClient {
    scope: GithubScope,
    /// The App client, from which installation clients with fresh tokens are made.
    app: Option<(Octocrab, InstallationId)>,
    /// The client that makes the calls; replaced when GitHub refuses its token. Shared, not
    /// cloned: a clone of an installation client copies its token cache, and a token fetched
    /// through the copy would be lost with it.
    current: std::sync::Mutex<Arc<Octocrab>>,
    policy: RetryPolicy,
}

impl GithubClient {
    pub fn new(
        settings: &GithubSettings,
        credentials: Credentials,
        policy: RetryPolicy,
    ) -> Result<GithubClient, GithubError> {
        let base = settings.api_url.as_deref().unwrap_or(GITHUB_API).trim_end_matches('/');
        let credentials_error = |e: &dyn std::fmt::Display| GithubError::Credentials(e.to_string());
        let builder = Octocrab::builder()
            .base_uri(base)
            .map_err(|e| credentials_error(&e))?
            .set_connect_timeout(Some(CALL_TIMEOUT))
            .set_read_timeout(Some(CALL_TIMEOUT));
        let (app, current) = match credentials {
            Credentials::App { app_id, installation_id, private_key_pem } => {
                let key = jsonwebtoken::EncodingKey::from_rsa_pem(&private_key_pem)
                    .map_err(|e| credentials_error(&format!("app_private_key: {e}")))?;
                let app =
                    builder.app(AppId(app_id), key).build().map_err(|e| credentials_error(&e))?;
                let installation = InstallationId(installation_id);
                let current = app.installation(installation).map_err(|e| credentials_error(&e))?;
                (Some((app, installation)), current)
            }
            Credentials::Token(token) => {
                let crab = builder
                    .personal_token(token.as_str().to_owned())
                    .build()
                    .map_err(|e| credentials_error(&e))?;
                (None, crab)
            }
        };
        Ok(GithubClient {
            scope: settings.scope(),
            app,
            current: std::sync::Mutex::new(Arc::new(current)),
            policy,
        })
    }

    /// The path of the tenant's scope: `/orgs/o`, `/repos/o/r` or `/enterprises/e`.
    pub fn scope_path(&self) -> String {
        match &self.scope {
            GithubScope::Organization(org) => format!("/orgs/{org}"),
            GithubScope::Repository(owner, repo) => format!("/repos/{owner}/{repo}"),
            GithubScope::Enterprise(enterprise) => format!("/enterprises/{enterprise}"),
        }
    }

    /// Registers a runner for one job and returns its encoded configuration.
    pub async fn generate_jit_config(
        &self,
        name: &str,
        runner_group_id: u64,
        labels: &[String],
    ) -> Result<JitRunner, GithubError> {
        #[derive(Serialize)]
        struct Body<'a> {
            name: &'a str,
            runner_group_id: u64,
            labels: &'a [String],
            work_folder: &'a str,
        }
        #[derive(Deserialize)]
        struct Answer {
            runner: RunnerInfo,
            encoded_jit_config: String,
        }
        let path = format!("{}/actions/runners/generate-jitconfig", self.scope_path());
        // GitHub wants at least one label; a pool without labels takes the one every
        // self-hosted runner has.
        let self_hosted = [SELF_HOSTED.to_owned()];
        let labels = if labels.is_empty() { &self_hosted[..] } else { labels };
        let body = Body { name, runner_group_id, labels, work_folder: "_work" };
        let answer: Answer = self.json(Method::POST, &path, Some(&body), "a JIT runner").await?;
        Ok(JitRunner { runner: answer.runner, encoded_jit_config: answer.encoded_jit_config })
    }

    /// Removes a runner registration; one that is already gone is no error.
    pub async fn delete_runner(&self, runner_id: u64) -> Result<(), GithubError> {
        let path = format!("{}/actions/runners/{runner_id}", self.scope_path());
        match self.call(Method::DELETE, &path, None::<&()>, "a runner").await {
            Ok(_) | Err(GithubError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The scope's runners, all pages.
    pub async fn list_runners(&self) -> Result<Vec<RunnerInfo>, GithubError> {
        #[derive(Deserialize)]
        struct Page {
            total_count: u64,
            runners: Vec<RunnerInfo>,
        }
        let mut runners = Vec::new();
        for page in 1..=MAX_PAGES {
            let path = format!("{}/actions/runners?per_page=100&page={page}", self.scope_path());
            let answer: Page = self.json(Method::GET, &path, None::<&()>, "runners").await?;
            let last = answer.runners.len() < 100;
            runners.extend(answer.runners);
            if last || runners.len() as u64 >= answer.total_count {
                break;
            }
        }
        Ok(runners)
    }

    /// The queued jobs of a repository's queued workflow runs.
    pub async fn queued_jobs(&self, owner: &str, repo: &str) -> Result<Vec<JobInfo>, GithubError> {
        #[derive(Deserialize)]
        struct Run {
            id: u64,
        }
        #[derive(Deserialize)]
        struct Runs {
            workflow_runs: Vec<Run>,
        }
        #[derive(Deserialize)]
        struct Jobs {
            jobs: Vec<JobInfo>,
        }
        let path = format!("/repos/{owner}/{repo}/actions/runs?status=queued&per_page=100");
        let runs: Runs = self.json(Method::GET, &path, None::<&()>, "workflow runs").await?;
        let mut queued = Vec::new();
        for run in runs.workflow_runs {
            let path = format!(
                "/repos/{owner}/{repo}/actions/runs/{}/jobs?filter=latest&per_page=100",
                run.id
            );
            let jobs: Jobs = self.json(Method::GET, &path, None::<&()>, "workflow jobs").await?;
            queued.extend(jobs.jobs.into_iter().filter(|job| job.status == "queued"));
        }
        Ok(queued)
    }

    /// A job's status (`queued`, `in_progress`, `completed`…), from its run's list of jobs.
    pub async fn job_status(
        &self,
        owner: &str,
        repo: &str,
        run_id: u64,
        job_id: u64,
    ) -> Result<String, GithubError> {
        #[derive(Deserialize)]
        struct Jobs {
            jobs: Vec<JobInfo>,
        }
        let path =
            format!("/repos/{owner}/{repo}/actions/runs/{run_id}/jobs?filter=latest&per_page=100");
        let jobs: Jobs = self.json(Method::GET, &path, None::<&()>, "workflow jobs").await?;
        jobs.jobs
            .into_iter()
            .find(|job| job.id == job_id)
            .map(|job| job.status)
            .ok_or_else(|| GithubError::NotFound(format!("job {job_id} in run {run_id}")))
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        what: &str,
    ) -> Result<T, GithubError> {
        let bytes = self.call(method, path, body, what).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| GithubError::Response { what: what.to_owned(), message: e.to_string() })
    }

    /// Makes one call, retrying as the module documentation says.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        what: &str,
    ) -> Result<Bytes, GithubError> {
        let mut backoff = self.policy.first_backoff;
        let mut renewed = false;
        let mut last = String::new();
        for attempt in 1..=self.policy.attempts {
            let outcome = self.attempt(&method, path, body).await;
            let wait = match classify(outcome, what) {
                Verdict::Done(bytes) => return Ok(bytes),
                Verdict::Fail(e) => return Err(e),
                Verdict::Unauthorized(message) if !renewed && self.app.is_some() => {
                    renewed = true;
                    self.renew();
                    last = message;
                    Duration::ZERO
                }
                Verdict::Unauthorized(message) => return Err(GithubError::Unauthorized(message)),
                Verdict::RateLimited(wait) if wait > self.policy.max_wait => {
                    return Err(GithubError::RateLimited { secs: wait.as_secs() })
                }
                Verdict::RateLimited(wait) => {
                    last = format!("rate limited for {} ms", wait.as_millis());
                    wait
                }
                Verdict::Retry(message) => {
                    last = message;
                    let wait = backoff;
                    backoff *= 2;
                    wait
                }
            };
            if attempt < self.policy.attempts {
                debug!(%method, path, attempt, wait_ms = wait.as_millis() as u64, reason = %last, "Retrying a GitHub call");
                tokio::time::sleep(wait).await;
            }
        }
        warn!(%method, path, attempts = self.policy.attempts, reason = %last, "GitHub call failed");
        Err(GithubError::Unavailable { attempts: self.policy.attempts, last })
    }

    async fn attempt(
        &self,
        method: &Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), octocrab::Error> {
        let crab = self.current.lock().expect("client lock").clone();
        if self.app.is_some() {
            let buffer = chrono::Duration::from_std(TOKEN_RENEWAL).expect("a short duration");
            crab.installation_token_with_buffer(buffer).await?;
        }
        let call = async {
            let response = match *method {
                Method::POST => crab._post(path, body).await?,
                Method::DELETE => crab._delete(path, body).await?,
                _ => crab._get(path).await?,
            };
            let (parts, body) = response.into_parts();
            let bytes = body.collect().await?.to_bytes();
            Ok((parts.status, parts.headers, bytes))
        };
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(result) => result,
            Err(_) => Err(octocrab::Error::Other {
                source: "the call timed out".into(),
                backtrace: std::backtrace::Backtrace::capture(),
            }),
        }
    }

    /// Starts a new installation client, whose first call fetches a new token.
    pub(crate) fn renew(&self) {
        if let Some((app, installation)) = &self.app {
            if let Ok(fresh) = app.installation(*installation) {
                *self.current.lock().expect("client lock") = Arc::new(fresh);
            }
        }
    }
}

/// Runner lists longer than this many pages of 100 are cut; no scope has that many runners.
const MAX_PAGES: u32 = 50;

enum Verdict {
    Done(Bytes),
    Fail(GithubError),
    Unauthorized(String),
    RateLimited(Duration),
    Retry(String),
}

fn classify(
    outcome: Result<(StatusCode, http::HeaderMap, Bytes), octocrab::Error>,
    what: &str,
) -> Verdict {
    let (status, headers, body) = match outcome {
        Ok(answer) => answer,
        // Fetching an installation token failed with an answer from GitHub.
        Err(octocrab::Error::GitHub { source, .. }) => {
            (source.status_code, http::HeaderMap::new(), Bytes::from(source.message.into_bytes()))
        }
        Err(e) => return Verdict::Retry(e.to_string()),
    };
    if status.is_success() {
        return Verdict::Done(body);
    }
    let message = error_message(&body);
    if let Some(wait) = rate_limit_wait(status, &headers) {
        return Verdict::RateLimited(wait);
    }
    let what = what.to_owned();
    match status.as_u16() {
        401 => Verdict::Unauthorized(message),
        403 => Verdict::Fail(GithubError::Forbidden { what, message }),
        404 => Verdict::Fail(GithubError::NotFound(what)),
        409 => Verdict::Fail(GithubError::Conflict(message)),
        422 => Verdict::Fail(GithubError::Invalid { what, message }),
        429 | 500..=599 => Verdict::Retry(format!("{status}: {message}")),
        _ => Verdict::Fail(GithubError::Response { what, message: format!("{status}: {message}") }),
    }
}

/// How long GitHub asks to wait, for a 403 or 429 that is a rate limit.
fn rate_limit_wait(status: StatusCode, headers: &http::HeaderMap) -> Option<Duration> {
    if status != StatusCode::FORBIDDEN && status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(secs) = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()) {
        return Some(Duration::from_secs(secs));
    }
    if header("x-ratelimit-remaining") == Some("0") {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let reset = header("x-ratelimit-reset").and_then(|v| v.parse::<u64>().ok());
        return Some(Duration::from_secs(reset.map_or(60, |reset| reset.saturating_sub(now))));
    }
    None
}

/// GitHub's `message`, or the start of the body when it has none.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Error {
        message: String,
    }
    match serde_json::from_slice::<Error>(body) {
        Ok(error) => error.message,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}
