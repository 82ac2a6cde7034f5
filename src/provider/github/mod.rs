//! GitHub Actions: a just-in-time runner per job, registered only when a slot waits for it.
//!
//! ```text
//!  webhook `queued` ──> demand ──scheduler──> assignment: a reserved slot
//!  (or reconciler)        │                     │ generate-jitconfig (runner named
//!                         │ `in_progress`        │ warmpool-<host>-<slot>-<job>)
//!                         │ elsewhere or         v
//!                         │ `completed`        job message with the JIT configuration
//!                         v                     │ guest `finished`, timeout, `completed`
//!                     withdrawn                 │ webhook, or no job within the idle timeout
//!                                               v
//!                                       runner deleted, slot reverted
//! ```
//!
//! Concurrency: the provider's state (what each GitHub job is to us, and our live runners)
//! sits behind one mutex, held only for short, synchronous updates. Each assignment runs in a
//! task of its own (a launch), which owns its runner registration from creation to deletion,
//! so that every way a job ends passes through the one place that deletes the runner. Webhooks
//! reach a launch through its note channel.
//!
//! GitHub hands a queued job to any idle runner whose labels fit, so a runner registered for
//! job A may take job B of the same tenant. The provider follows what `in_progress` says: the
//! runner's launch then runs B, and A waits again.

pub mod client;
pub mod fake;
pub mod webhook;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, Instrument};

use crate::config::GithubConfig;
use crate::guest::Run;
use crate::metrics::{Metrics, Series};
use crate::scheduler::{labels_fit, Assignment, Demand, Scheduler, Share};
use crate::slot::{Job, JobEvent};
use crate::store::{
    secret_names, Actor, GithubScope, GithubSettings, JobTransition, NewJob, Store, StoreError,
    Tenant, TenantSettings,
};
use client::{Credentials, GithubClient, GithubError, RetryPolicy};
use webhook::{signature_valid, WorkflowJobEvent};

/// Events buffered per runner job before the slot waits for the launch to read.
const JOB_EVENTS: usize = 64;
/// How long GitHub jobs that ended are remembered, so that a late or repeated `queued` for
/// them is not taken for new demand.
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Repositories with a webhook in this window are the ones the reconciler asks about.
const ACTIVE_REPOSITORY: Duration = Duration::from_secs(24 * 3600);
/// A runner that ended without taking a job puts its job back this many times; after that the
/// job waits for the reconciler, so that a broken runner image cannot spin through slots.
const MAX_QUICK_RETRIES: u32 = 1;

/// What a webhook delivery came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// Acted upon; says what it did.
    Accepted(String),
    /// Valid, but nothing to do; says why.
    Ignored(String),
    /// This delivery was acted upon before.
    Duplicate,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("The delivery's X-Hub-Signature-256 matches no GitHub tenant's webhook secret")]
    Signature,
    #[error("The delivery is malformed: {0}")]
    Malformed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How the provider was configured, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host_name: String,
    pub reconcile_interval: Duration,
    pub runner_idle_timeout: Duration,
    pub completed_grace: Duration,
    pub retry: RetryPolicy,
}

impl Settings {
    pub fn from_config(config: &GithubConfig) -> Settings {
        let host_name = config.host_name.clone().unwrap_or_else(kernel_host_name);
        Settings {
            host_name,
            reconcile_interval: Duration::from_secs(config.reconcile_interval_secs),
            runner_idle_timeout: Duration::from_secs(config.runner_idle_timeout_secs),
            completed_grace: Duration::from_secs(config.completed_grace_secs),
            retry: RetryPolicy::default(),
        }
    }

    /// What every runner name of this host starts with.
    fn runner_prefix(&self) -> String {
        format!("warmpool-{}-", self.host_name)
    }
}

/// The host name the kernel has, cut to what fits a runner name.
fn kernel_host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name
        .trim()
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(20)
        .collect();
    if name.is_empty() {
        "host".into()
    } else {
        name
    }
}

/// What a GitHub job is to this host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Demand in the scheduler.
    Waiting,
    /// A runner of ours was registered for it, or took it.
    Launched { runner: String },
    /// A launch for it failed; the reconciler may find it queued again.
    Failed,
    /// Taken elsewhere, cancelled or completed.
    Ended,
}

#[derive(Debug, Clone)]
struct GithubJob {
    tenant: String,
    job_id: u64,
    run_id: u64,
    owner: String,
    repo: String,
    labels: Vec<String>,
    /// The tenant's share when the job was queued.
    share: Share,
    phase: Phase,
    /// When the `queued` webhook (or the reconciler) brought it.
    queued_at: Instant,
    changed_at: Instant,
    quick_retries: u32,
}

/// A runner job that an earlier run of the daemon left running in a guest, and that the guest's
/// slot took back: what the job's record says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptedRunner {
    /// The job's record in the store.
    pub record: String,
    pub tenant: String,
    pub share: Share,
    pub runner_name: String,
    /// The GitHub job the runner was registered for, or took since.
    pub job_id: u64,
    pub run_id: u64,
    pub owner: String,
    pub repo: String,
    /// What GitHub last said of the job: `queued` (the runner had taken nothing yet),
    /// `in_progress` or `completed`.
    pub status: String,
}

impl AdoptedRunner {
    /// Reads a record's detail as the launch wrote it; `None` when it lacks what following
    /// the runner needs.
    pub fn from_detail(
        record: &str,
        tenant: &str,
        share: Share,
        detail: &serde_json::Value,
    ) -> Option<AdoptedRunner> {
        let (owner, repo) = detail["repository"].as_str()?.split_once('/')?;
        Some(AdoptedRunner {
            record: record.to_owned(),
            tenant: tenant.to_owned(),
            share,
            runner_name: detail["runner_name"].as_str()?.to_owned(),
            job_id: detail["github_job_id"].as_u64()?,
            run_id: detail["run_id"].as_u64()?,
            owner: owner.to_owned(),
            repo: repo.to_owned(),
            status: detail["status"].as_str().unwrap_or("queued").to_owned(),
        })
    }
}

/// What a launch hears of its runner's job from webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Note {
    InProgress { job_id: u64 },
    Completed { job_id: u64, conclusion: Option<String> },
}

struct LiveRunner {
    /// The demand key the runner was registered for, or the job it took since.
    key: String,
    notes: mpsc::UnboundedSender<Note>,
}

#[derive(Default)]
struct State {
    jobs: HashMap<String, GithubJob>,
    runners: HashMap<String, LiveRunner>,
    /// Repositories that sent webhooks, by tenant, with the time of the last.
    repositories: HashMap<String, HashMap<(String, String), Instant>>,
}

/// What a client was built from: the tenant's settings and its credential's digest.
type ClientVersion = (GithubSettings, [u8; 32]);

/// The GitHub provider of a daemon.
pub struct GithubProvider {
    store: Arc<Store>,
    scheduler: Scheduler,
    metrics: Arc<Metrics>,
    settings: Settings,
    /// The labels of each pool: a job is demand only if some pool carries its labels.
    pool_labels: Vec<Vec<String>>,
    state: Mutex<State>,
    assignments: mpsc::UnboundedSender<Assignment>,
    /// Clients by tenant, with the settings and the digest of the credential each was built
    /// from: a client is rebuilt when either changed, so a rotated key or token takes effect
    /// at the next call.
    clients: tokio::sync::Mutex<HashMap<String, (ClientVersion, Arc<GithubClient>)>>,
}

/// The secret holding a tenant's credential.
fn credential_name(settings: &GithubSettings) -> &'static str {
    match settings.app_id {
        Some(_) => secret_names::GITHUB_APP_KEY,
        None => secret_names::GITHUB_TOKEN,
    }
}

fn demand_key(tenant: &str, job_id: u64) -> String {
    format!("github:{tenant}:{job_id}")
}

impl GithubProvider {
    /// Starts the provider: its launches and its reconciler.
    pub fn start(
        store: Arc<Store>,
        scheduler: Scheduler,
        metrics: Arc<Metrics>,
        settings: Settings,
        pool_labels: Vec<Vec<String>>,
    ) -> Arc<GithubProvider> {
        GithubProvider::start_adopting(store, scheduler, metrics, settings, pool_labels, Vec::new())
    }

    /// As [`GithubProvider::start`], following to their ends the runner jobs that slots took
    /// back from an earlier run, each with the events of its slot. Their runners are the
    /// provider's before the reconciler first looks, so it never takes them for leaks.
    pub fn start_adopting(
        store: Arc<Store>,
        scheduler: Scheduler,
        metrics: Arc<Metrics>,
        settings: Settings,
        pool_labels: Vec<Vec<String>>,
        adopted: Vec<(AdoptedRunner, mpsc::Receiver<JobEvent>)>,
    ) -> Arc<GithubProvider> {
        let (assignments, assignments_rx) = mpsc::unbounded_channel();
        let provider = Arc::new(GithubProvider {
            store,
            scheduler,
            metrics,
            settings,
            pool_labels,
            state: Mutex::default(),
            assignments,
            clients: tokio::sync::Mutex::default(),
        });
        for (runner, events) in adopted {
            let notes = provider.take_back(&runner);
            let running = provider.scheduler.adopt(&runner.tenant, runner.share);
            let span = tracing::info_span!("adopted", runner = %runner.runner_name);
            tokio::spawn(provider.clone().resume(runner, events, notes, running).instrument(span));
        }
        tokio::spawn(provider.clone().take_assignments(assignments_rx));
        tokio::spawn(provider.clone().reconcile_periodically());
        provider
    }

    async fn take_assignments(
        self: Arc<Self>,
        mut assignments: mpsc::UnboundedReceiver<Assignment>,
    ) {
        while let Some(assignment) = assignments.recv().await {
            let span = tracing::info_span!("launch", demand = %assignment.demand.key);
            tokio::spawn(self.clone().launch(assignment).instrument(span));
        }
    }

    /// Checks and acts upon one webhook delivery, received at `received` (the start of the
    /// time from webhook to job that the metrics keep).
    pub async fn webhook(
        &self,
        event: &str,
        delivery: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        received: Instant,
    ) -> Result<WebhookOutcome, WebhookError> {
        let signature = signature.ok_or(WebhookError::Signature)?;
        let tenants = self.signed_by(signature, body).await?;
        if tenants.is_empty() {
            return Err(WebhookError::Signature);
        }
        match event {
            "ping" => return Ok(WebhookOutcome::Accepted("pong".into())),
            "workflow_job" => {}
            other => return Ok(WebhookOutcome::Ignored(format!("`{other}` events are not used"))),
        }
        let parsed: WorkflowJobEvent =
            serde_json::from_slice(body).map_err(|e| WebhookError::Malformed(e.to_string()))?;
        let delivery = delivery
            .ok_or_else(|| WebhookError::Malformed("no X-GitHub-Delivery header".into()))?
            .to_owned();
        let store = self.store.clone();
        if !store.call(move |store| store.record_delivery(&delivery)).await? {
            return Ok(WebhookOutcome::Duplicate);
        }
        let Some((tenant, settings)) = tenant_of(&tenants, &parsed) else {
            let repository = &parsed.repository.full_name;
            return Ok(WebhookOutcome::Ignored(format!("no tenant for `{repository}`")));
        };
        Ok(self.act(&tenant, &settings, &parsed, received))
    }

    /// The GitHub tenants whose webhook secret signed `body`.
    async fn signed_by(
        &self,
        signature: &str,
        body: &[u8],
    ) -> Result<Vec<(Tenant, GithubSettings)>, StoreError> {
        let tenants = self.github_tenants().await?;
        let store = self.store.clone();
        let signature = signature.to_owned();
        let body = body.to_vec();
        store
            .call(move |store| {
                let mut signed = Vec::new();
                for (tenant, settings) in tenants {
                    match store.get_secret(&tenant.id, secret_names::GITHUB_WEBHOOK) {
                        Ok(secret) if signature_valid(secret.expose(), &body, &signature) => {
                            signed.push((tenant, settings));
                        }
                        Ok(_) | Err(StoreError::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(signed)
            })
            .await
    }

    async fn github_tenants(&self) -> Result<Vec<(Tenant, GithubSettings)>, StoreError> {
        let tenants = self.store.call(|store| store.list_tenants()).await?;
        Ok(tenants
            .into_iter()
            .filter_map(|tenant| match &tenant.settings {
                TenantSettings::Github(settings) => {
                    let settings = settings.clone();
                    Some((tenant, settings))
                }
                _ => None,
            })
            .collect())
    }

    /// Applies a `workflow_job` event of `tenant`.
    fn act(
        &self,
        tenant: &Tenant,
        settings: &GithubSettings,
        event: &WorkflowJobEvent,
        now: Instant,
    ) -> WebhookOutcome {
        let job = &event.workflow_job;
        let owner = event.repository.owner.login.clone();
        let repo = event.repository.name.clone();
        self.remember_repository(&tenant.id, &owner, &repo, now);
        match event.action.as_str() {
            "queued" => {
                let info = client::JobInfo {
                    id: job.id,
                    run_id: job.run_id,
                    status: "queued".into(),
                    labels: job.labels.clone(),
                    runner_name: None,
                };
                self.queued(tenant, settings, &owner, &repo, &info, now)
            }
            "in_progress" => self.in_progress(&tenant.id, job.id, job.runner_name.as_deref()),
            "completed" => self.completed(
                &tenant.id,
                job.id,
                job.runner_name.as_deref(),
                job.conclusion.clone(),
            ),
            other => WebhookOutcome::Ignored(format!("action `{other}` needs nothing")),
        }
    }

    fn remember_repository(&self, tenant: &str, owner: &str, repo: &str, now: Instant) {
        let mut state = self.state.lock().expect("provider state");
        let repositories = state.repositories.entry(tenant.to_owned()).or_default();
        repositories.insert((owner.to_owned(), repo.to_owned()), now);
        repositories.retain(|_, seen| now.duration_since(*seen) < ACTIVE_REPOSITORY);
    }

    /// Turns a queued job into demand, if this host can run it for this tenant.
    fn queued(
        &self,
        tenant: &Tenant,
        settings: &GithubSettings,
        owner: &str,
        repo: &str,
        job: &client::JobInfo,
        now: Instant,
    ) -> WebhookOutcome {
        let labels: Vec<String> = job
            .labels
            .iter()
            .filter(|label| !label.eq_ignore_ascii_case("self-hosted"))
            .map(|label| label.to_lowercase())
            .collect();
        if !settings.labels.is_empty() && !labels_fit(&labels, &settings.labels) {
            return WebhookOutcome::Ignored(format!(
                "job {} asks for labels {labels:?} beyond the tenant's",
                job.id
            ));
        }
        if !self.pool_labels.iter().any(|pool| labels_fit(&labels, pool)) {
            return WebhookOutcome::Ignored(format!(
                "job {} asks for labels {labels:?} that no pool carries",
                job.id
            ));
        }
        let key = demand_key(&tenant.id, job.id);
        let share =
            Share { weight: tenant.weight, max_concurrent_jobs: tenant.max_concurrent_jobs };
        let mut state = self.state.lock().expect("provider state");
        state.forget_old(now);
        if let Some(known) = state.jobs.get(&key) {
            if known.phase != Phase::Failed {
                return WebhookOutcome::Ignored(format!("job {} is known already", job.id));
            }
        }
        state.jobs.insert(
            key.clone(),
            GithubJob {
                tenant: tenant.id.clone(),
                job_id: job.id,
                run_id: job.run_id,
                owner: owner.to_owned(),
                repo: repo.to_owned(),
                labels: labels.clone(),
                share,
                phase: Phase::Waiting,
                queued_at: now,
                changed_at: now,
                quick_retries: 0,
            },
        );
        drop(state);
        let demand = Demand { key, tenant: tenant.id.clone(), labels };
        self.scheduler.enqueue(demand, share, self.assignments.clone());
        info!(tenant = %tenant.name, job = job.id, repository = %format!("{owner}/{repo}"), "GitHub job queued");
        WebhookOutcome::Accepted(format!("job {} waits for a slot", job.id))
    }

    fn in_progress(&self, tenant: &str, job_id: u64, runner: Option<&str>) -> WebhookOutcome {
        let key = demand_key(tenant, job_id);
        let mut state = self.state.lock().expect("provider state");
        let ours = runner.filter(|name| state.runners.contains_key(*name));
        let Some(runner) = ours else {
            // Another runner took it: it is no demand of ours any more.
            if let Some(job) = state.jobs.get_mut(&key) {
                if job.phase == Phase::Waiting || job.phase == Phase::Failed {
                    job.phase = Phase::Ended;
                    job.changed_at = Instant::now();
                    self.scheduler.withdraw(&key);
                }
            }
            return WebhookOutcome::Accepted(format!("job {job_id} runs elsewhere"));
        };
        let runner = runner.to_owned();
        let live = state.runners.get_mut(&runner).expect("checked above");
        let registered_for = std::mem::replace(&mut live.key, key.clone());
        let _ = live.notes.send(Note::InProgress { job_id });
        if registered_for != key {
            self.swap(&mut state, &runner, &key, &registered_for);
        }
        if let Some(job) = state.jobs.get_mut(&key) {
            if job.phase == Phase::Waiting {
                self.scheduler.withdraw(&key);
            }
            job.phase = Phase::Launched { runner: runner.clone() };
            job.changed_at = Instant::now();
        }
        WebhookOutcome::Accepted(format!("job {job_id} runs on {runner}"))
    }

    /// Runners are interchangeable to GitHub: `runner`, registered for `own`, took `taken`.
    /// If another runner of ours was registered for `taken`, that runner now stands for `own`;
    /// otherwise `own` has no runner and waits again.
    fn swap(&self, state: &mut State, runner: &str, taken: &str, own: &str) {
        let other = match state.jobs.get(taken).map(|job| &job.phase) {
            Some(Phase::Launched { runner: other }) if other != runner => Some(other.clone()),
            _ => None,
        };
        let Some(job) = state.jobs.get_mut(own) else { return };
        if job.phase != (Phase::Launched { runner: runner.to_owned() }) {
            return;
        }
        job.changed_at = Instant::now();
        if let Some(other) = other.filter(|other| state.runners.contains_key(other)) {
            job.phase = Phase::Launched { runner: other.clone() };
            state.runners.get_mut(&other).expect("checked above").key = own.to_owned();
            return;
        }
        job.phase = Phase::Waiting;
        let demand =
            Demand { key: own.to_owned(), tenant: job.tenant.clone(), labels: job.labels.clone() };
        self.scheduler.enqueue(demand, job.share, self.assignments.clone());
    }

    fn completed(
        &self,
        tenant: &str,
        job_id: u64,
        runner: Option<&str>,
        conclusion: Option<String>,
    ) -> WebhookOutcome {
        let key = demand_key(tenant, job_id);
        let mut state = self.state.lock().expect("provider state");
        if let Some(job) = state.jobs.get_mut(&key) {
            if job.phase == Phase::Waiting {
                self.scheduler.withdraw(&key);
            }
            job.phase = Phase::Ended;
            job.changed_at = Instant::now();
        }
        if let Some(live) = runner.and_then(|name| state.runners.get(name)) {
            let _ = live.notes.send(Note::Completed { job_id, conclusion });
        }
        WebhookOutcome::Accepted(format!("job {job_id} completed"))
    }

    /// The client of a tenant, built again when the tenant changed since.
    async fn client(&self, tenant: &Tenant) -> Result<Arc<GithubClient>, GithubError> {
        let TenantSettings::Github(settings) = &tenant.settings else {
            return Err(GithubError::Credentials("not a GitHub tenant".into()));
        };
        let credentials = self.credentials(&tenant.id, settings).await?;
        let version = (settings.clone(), credentials.digest());
        let mut clients = self.clients.lock().await;
        if let Some((built_from, client)) = clients.get(&tenant.id) {
            if *built_from == version {
                return Ok(client.clone());
            }
        }
        let client = Arc::new(GithubClient::new(settings, credentials, self.settings.retry)?);
        clients.insert(tenant.id.clone(), (version, client.clone()));
        Ok(client)
    }

    /// Waits, up to `timeout`, until every launch has deleted its runner: the pools' shutdown
    /// ended their jobs, and the launches need a moment to say so to GitHub.
    pub async fn shutdown(&self, timeout: Duration) {
        let began = Instant::now();
        loop {
            let live = self.state.lock().expect("provider state").runners.len();
            if live == 0 {
                return;
            }
            if began.elapsed() > timeout {
                tracing::warn!(
                    runners = live,
                    "Runners not deleted before shutdown; the reconciler will"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn credentials(
        &self,
        tenant: &str,
        settings: &GithubSettings,
    ) -> Result<Credentials, GithubError> {
        let name = credential_name(settings);
        let store = self.store.clone();
        let tenant = tenant.to_owned();
        let secret = store
            .call(move |store| store.get_secret(&tenant, name))
            .await
            .map_err(|e| GithubError::Credentials(format!("secret `{name}`: {e}")))?;
        Ok(match (settings.app_id, settings.installation_id) {
            (Some(app_id), Some(installation_id)) => Credentials::App {
                app_id,
                installation_id,
                private_key_pem: zeroize::Zeroizing::new(secret.expose().to_vec()),
            },
            _ => {
                let token = secret
                    .expose_str()
                    .ok_or_else(|| GithubError::Credentials("`token` is not text".into()))?;
                Credentials::Token(zeroize::Zeroizing::new(token.trim().to_owned()))
            }
        })
    }
}

impl State {
    fn forget_old(&mut self, now: Instant) {
        self.jobs.retain(|_, job| {
            job.phase != Phase::Ended || now.duration_since(job.changed_at) < FORGET_AFTER
        });
    }
}

/// The tenant among those whose secret signed the delivery that the event belongs to: the
/// repository's own tenant first, then its owner's, then its enterprise's.
fn tenant_of(
    tenants: &[(Tenant, GithubSettings)],
    event: &WorkflowJobEvent,
) -> Option<(Tenant, GithubSettings)> {
    let owner = &event.repository.owner.login;
    let repo = &event.repository.name;
    let enterprise = event.enterprise.as_ref().map(|e| e.slug.as_str());
    let rank = |scope: &GithubScope| match scope {
        GithubScope::Repository(o, r)
            if o.eq_ignore_ascii_case(owner) && r.eq_ignore_ascii_case(repo) =>
        {
            Some(0)
        }
        GithubScope::Organization(o) if o.eq_ignore_ascii_case(owner) => Some(1),
        GithubScope::Enterprise(e) if Some(e.as_str()) == enterprise => Some(2),
        _ => None,
    };
    tenants
        .iter()
        .filter_map(|(tenant, settings)| Some((rank(&settings.scope())?, tenant, settings)))
        .min_by_key(|(rank, _, _)| *rank)
        .map(|(_, tenant, settings)| (tenant.clone(), settings.clone()))
}

mod launch;
mod reconcile;

#[cfg(test)]
mod tests;
