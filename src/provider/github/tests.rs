//! Provider tests: the fake GitHub server on loopback, slots of the fake hypervisor, a real
//! store and scheduler.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::fake::{self, Endpoint, Failure, FakeGithub, Scope};
use super::*;
use crate::control::Control;
use crate::hypervisor::fake::FakeHypervisor;
use crate::pool::Pool;
use crate::slot::SlotState;
use crate::store::{JobState, NewTenant, Secret, TenantKind};

const SECRET: &[u8] = b"webhook secret of acme";
const TOKEN: &str = "github_pat_acme";
const WAIT: Duration = Duration::from_secs(20);

struct Fixture {
    _dir: tempfile::TempDir,
    hypervisor: FakeHypervisor,
    github: FakeGithub,
    store: Arc<Store>,
    control: Arc<Control>,
    provider: Arc<GithubProvider>,
    tenant: Tenant,
}

fn settings() -> Settings {
    Settings {
        host_name: "testhost".into(),
        reconcile_interval: Duration::from_secs(3600),
        runner_idle_timeout: Duration::from_secs(60),
        completed_grace: Duration::from_millis(300),
        retry: RetryPolicy {
            attempts: 3,
            first_backoff: Duration::from_millis(10),
            max_wait: Duration::from_secs(2),
        },
    }
}

impl Fixture {
    /// A pool `test` (label `linux`) of `slots` fake slots, and a GitHub tenant `acme` (an
    /// organisation with a fine-grained token) on the fake GitHub server.
    async fn new(slots: u32, runner_script: &str, settings: Settings) -> Fixture {
        Fixture::with_max_job(slots, runner_script, settings, 30).await
    }

    async fn with_max_job(
        slots: u32,
        runner_script: &str,
        settings: Settings,
        max_job_secs: u64,
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let hypervisor = FakeHypervisor::new();
        hypervisor.set_runner_script(runner_script);
        let github = FakeGithub::start().await.unwrap();
        github.add_token(TOKEN);
        let store = Arc::new(
            Store::open(&dir.path().join("warmpool.db"), &dir.path().join("host.key")).unwrap(),
        );
        store.upsert_pool(&Actor::Daemon, "test", 0).unwrap();
        for index in 0..slots {
            store.upsert_slot(&Actor::Daemon, "test", index, SlotState::Empty, None).unwrap();
        }
        let mut config = crate::pool::tests::config(dir.path(), slots, slots);
        config.max_job_secs = max_job_secs;
        let metrics = Arc::new(Metrics::default());
        let pool = Pool::start(&config, dir.path(), Arc::new(hypervisor.clone()), metrics.clone());
        let control = Arc::new(Control::new(vec![pool], metrics.clone()));
        let scheduler = Scheduler::start(control.clone());
        let labels = vec![config.labels.clone()];
        let provider = GithubProvider::start(store.clone(), scheduler, metrics, settings, labels);
        let tenant =
            add_tenant(&store, "acme", json!({ "owner": "acme", "api_url": github.url() }));
        put_secret(&store, &tenant, secret_names::GITHUB_TOKEN, TOKEN.as_bytes());
        for pool in control.pools() {
            tokio::time::timeout(WAIT, pool.built()).await.unwrap();
        }
        Fixture { _dir: dir, hypervisor, github, store, control, provider, tenant }
    }

    /// Lets the fake GitHub hand each new runner a queued job and complete it at once, without
    /// webhooks: the provider learns of it when it asks after the runner's end.
    fn github_runs_jobs(self) -> Fixture {
        self.github.run_jobs_on_runners(None, Duration::ZERO);
        self
    }

    async fn deliver(&self, event: &str, body: &Value) -> Result<WebhookOutcome, WebhookError> {
        let body = body.to_string();
        let signature = fake::signature(SECRET, body.as_bytes());
        let delivery = uuid::Uuid::new_v4().to_string();
        self.provider
            .webhook(event, Some(&delivery), Some(&signature), body.as_bytes(), Instant::now())
            .await
    }

    async fn job_event(&self, action: &str, job: &fake::WorkflowJob) -> WebhookOutcome {
        let body = self.github.workflow_job_event(action, job, None);
        self.deliver("workflow_job", &body).await.unwrap()
    }

    /// Waits until `done` holds of the fake GitHub server.
    async fn until(&self, what: &str, done: impl Fn(&FakeGithub) -> bool) {
        let waited = tokio::time::timeout(WAIT, async {
            while !done(&self.github) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        if waited.await.is_err() {
            panic!("{what} never happened; calls: {:#?}", self.github.calls());
        }
    }

    /// Waits until every slot is back in memory, ready.
    async fn until_slots_ready(&self) {
        let pool = &self.control.pools()[0];
        let waited = tokio::time::timeout(WAIT, async {
            loop {
                let status = pool.status().await.unwrap();
                if status.count(SlotState::Ready) == status.slots.len() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        waited.await.expect("slots ready again");
    }

    fn jobs(&self) -> Vec<crate::store::JobRecord> {
        self.store.list_jobs(&crate::store::JobFilter::default()).unwrap().jobs
    }

    async fn shutdown(self) {
        for pool in self.control.pools() {
            pool.shutdown().await;
        }
        assert!(self.hypervisor.domains().is_empty());
    }
}

fn add_tenant(store: &Store, name: &str, settings: Value) -> Tenant {
    let new = NewTenant {
        name: name.into(),
        kind: TenantKind::Github,
        settings,
        weight: 1,
        max_concurrent_jobs: 0,
    };
    let tenant = store.create_tenant(&Actor::LocalRoot, new).unwrap();
    put_secret(store, &tenant, secret_names::GITHUB_WEBHOOK, SECRET);
    tenant
}

fn put_secret(store: &Store, tenant: &Tenant, name: &str, value: &[u8]) {
    store.put_secret(&Actor::LocalRoot, &tenant.id, name, &Secret::new(value.to_vec())).unwrap();
}

fn org() -> Scope {
    Scope::Organization("acme".into())
}

#[tokio::test]
async fn a_queued_job_gets_one_jit_runner_on_a_slot_which_is_deleted_after() {
    let fixture = Fixture::new(1, "", settings()).await.github_runs_jobs();
    let job = fixture.github.queue_job("acme", "app", &["self-hosted", "Linux"]);
    let outcome = fixture.job_event("queued", &job).await;
    assert!(matches!(outcome, WebhookOutcome::Accepted(_)), "{outcome:?}");

    fixture.until("the runner's deletion", |github| github.deleted_runners().len() == 1).await;
    let requests = fixture.github.jit_requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.name, format!("warmpool-testhost-test-0-{}", job.id));
    assert_eq!((request.scope.clone(), request.runner_group_id), (org(), 1));
    assert_eq!(request.labels, ["linux"], "the pool's labels");
    assert!(fixture.github.runners(&org()).is_empty());
    fixture.until_slots_ready().await;

    let records = fixture.jobs();
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].state, records[0].exit_code), (JobState::Finished, Some(0)));
    let detail = records[0].detail.clone().unwrap();
    assert_eq!(detail["github_job_id"], job.id);
    assert_eq!(detail["repository"], "acme/app");
    fixture.shutdown().await;
}

#[tokio::test]
async fn deliveries_without_a_valid_signature_change_nothing() {
    let fixture = Fixture::new(1, "", settings()).await;
    let job = fixture.github.queue_job("acme", "app", &["linux"]);
    let body = fixture.github.workflow_job_event("queued", &job, None).to_string();
    let provider = &fixture.provider;
    let delivery = Some("d-1");
    let unsigned =
        provider.webhook("workflow_job", delivery, None, body.as_bytes(), Instant::now()).await;
    assert!(matches!(unsigned, Err(WebhookError::Signature)), "{unsigned:?}");
    let wrong = fake::signature(b"another secret", body.as_bytes());
    let forged = provider
        .webhook("workflow_job", delivery, Some(&wrong), body.as_bytes(), Instant::now())
        .await;
    assert!(matches!(forged, Err(WebhookError::Signature)), "{forged:?}");
    let garbled =
        provider.webhook("workflow_job", delivery, Some("sha256=12"), b"{}", Instant::now()).await;
    assert!(matches!(garbled, Err(WebhookError::Signature)), "{garbled:?}");

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(fixture.github.jit_requests().is_empty());
    // The delivery id was not used up by the refused attempts.
    let signature = fake::signature(SECRET, body.as_bytes());
    let signed = provider.webhook(
        "workflow_job",
        delivery,
        Some(&signature),
        body.as_bytes(),
        Instant::now(),
    );
    assert!(matches!(signed.await, Ok(WebhookOutcome::Accepted(_))));
    fixture.shutdown().await;
}

#[tokio::test]
async fn a_repeated_delivery_is_acted_upon_once() {
    let fixture = Fixture::new(1, "", settings()).await.github_runs_jobs();
    let job = fixture.github.queue_job("acme", "app", &["linux"]);
    let body = fixture.github.workflow_job_event("queued", &job, None).to_string();
    let signature = fake::signature(SECRET, body.as_bytes());
    let deliver = || {
        fixture.provider.webhook(
            "workflow_job",
            Some("same"),
            Some(&signature),
            body.as_bytes(),
            Instant::now(),
        )
    };
    assert!(matches!(deliver().await, Ok(WebhookOutcome::Accepted(_))));
    assert_eq!(deliver().await.unwrap(), WebhookOutcome::Duplicate);
    fixture.until("the runner's deletion", |github| github.deleted_runners().len() == 1).await;
    assert_eq!(fixture.github.jit_requests().len(), 1);
    fixture.shutdown().await;
}

#[tokio::test]
async fn malformed_deliveries_pings_and_strangers_get_clear_answers() {
    let fixture = Fixture::new(1, "", settings()).await;
    let malformed = fixture.deliver("workflow_job", &json!({ "action": "queued" })).await;
    assert!(matches!(malformed, Err(WebhookError::Malformed(_))), "{malformed:?}");
    let ping = fixture.github.ping_event(1, None, "http://127.0.0.1/webhooks/github");
    assert_eq!(
        fixture.deliver("ping", &ping).await.unwrap(),
        WebhookOutcome::Accepted("pong".into())
    );
    let push = fixture.deliver("push", &json!({})).await.unwrap();
    assert!(matches!(push, WebhookOutcome::Ignored(_)), "{push:?}");

    let stranger = fixture.github.queue_job("someone-else", "app", &["linux"]);
    let outcome = fixture.job_event("queued", &stranger).await;
    assert!(matches!(&outcome, WebhookOutcome::Ignored(why) if why.contains("no tenant")));
    let gpu = fixture.github.queue_job("acme", "app", &["self-hosted", "gpu"]);
    let outcome = fixture.job_event("queued", &gpu).await;
    assert!(matches!(&outcome, WebhookOutcome::Ignored(why) if why.contains("no pool")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(fixture.github.jit_requests().is_empty());
    fixture.shutdown().await;
}

#[tokio::test]
async fn a_tenant_may_use_only_its_own_labels() {
    let fixture = Fixture::new(1, "", settings()).await;
    let settings =
        json!({ "owner": "narrow", "api_url": fixture.github.url(), "labels": ["windows"] });
    add_tenant(&fixture.store, "narrow", settings);
    let job = fixture.github.queue_job("narrow", "app", &["self-hosted", "linux"]);
    let outcome = fixture.job_event("queued", &job).await;
    assert!(matches!(&outcome, WebhookOutcome::Ignored(why) if why.contains("beyond the tenant")));
    fixture.shutdown().await;
}

/// A pool of one slot, held by a job of a runner that never exits, so that later demand waits.
async fn busy_fixture() -> (Fixture, fake::WorkflowJob) {
    let mut settings = settings();
    settings.completed_grace = Duration::from_millis(100);
    let fixture = Fixture::new(1, "fake:hang", settings).await;
    let holder = fixture.github.queue_job("acme", "app", &["linux"]);
    fixture.job_event("queued", &holder).await;
    fixture.until("the first runner", |github| github.jit_requests().len() == 1).await;
    let runner = fixture.github.jit_requests()[0].name.clone();
    let holder = fixture.github.set_job(holder.id, "in_progress", None, Some(&runner));
    fixture.job_event("in_progress", &holder).await;
    (fixture, holder)
}

#[tokio::test]
async fn a_job_cancelled_or_taken_elsewhere_before_assignment_gets_no_runner() {
    let (fixture, holder) = busy_fixture().await;
    let cancelled = fixture.github.queue_job("acme", "app", &["linux"]);
    fixture.job_event("queued", &cancelled).await;
    let cancelled = fixture.github.set_job(cancelled.id, "completed", Some("cancelled"), None);
    fixture.job_event("completed", &cancelled).await;
    let elsewhere = fixture.github.queue_job("acme", "app", &["linux"]);
    fixture.job_event("queued", &elsewhere).await;
    let mut taken = fixture.github.set_job(elsewhere.id, "in_progress", None, None);
    taken.runner_name = Some("a-runner-of-another-host".into());
    fixture.job_event("in_progress", &taken).await;

    // The holder's job completes; its runner does not exit, and is stopped after the grace.
    let holder = fixture.github.set_job(holder.id, "completed", Some("success"), None);
    fixture.job_event("completed", &holder).await;
    fixture
        .until("the holder's runner deleted", |github| github.deleted_runners().len() == 1)
        .await;
    fixture.until_slots_ready().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fixture.github.jit_requests().len(), 1, "no runner for the other two jobs");
    let records = fixture.jobs();
    assert_eq!(records.len(), 1);
    assert!(records[0].failure.as_deref().unwrap_or("").contains("did not exit"), "{records:?}");
    assert_eq!(records[0].detail.as_ref().unwrap()["conclusion"], "success");
    fixture.shutdown().await;
}

#[tokio::test]
async fn a_runner_that_takes_another_job_runs_it_and_its_own_job_waits_again() {
    let fixture = Fixture::new(1, "fake:hang", settings()).await;
    let own = fixture.github.queue_job("acme", "app", &["linux"]);
    fixture.job_event("queued", &own).await;
    fixture.until("the runner", |github| github.jit_requests().len() == 1).await;
    let runner = fixture.github.jit_requests()[0].name.clone();
    // GitHub gives the runner another queued job of the tenant that its labels fit.
    let other = fixture.github.queue_job("acme", "app", &["linux"]);
    fixture.job_event("queued", &other).await;
    let other = fixture.github.set_job(other.id, "in_progress", None, Some(&runner));
    fixture.job_event("in_progress", &other).await;
    {
        let state = fixture.provider.state.lock().unwrap();
        let phase = |id| state.jobs[&demand_key(&fixture.tenant.id, id)].phase.clone();
        assert_eq!(phase(other.id), Phase::Launched { runner: runner.clone() });
        assert_eq!(phase(own.id), Phase::Waiting, "the runner's own job waits for a runner again");
    }
    assert_eq!(fixture.github.jit_requests().len(), 1, "the only slot is busy");
    fixture.shutdown().await;
}

#[tokio::test]
async fn two_runners_that_took_each_others_jobs_need_no_third() {
    let fixture = Fixture::new(2, "fake:hang", settings()).await;
    let first = fixture.github.queue_job("acme", "app", &["linux"]);
    let second = fixture.github.queue_job("acme", "app", &["linux"]);
    fixture.job_event("queued", &first).await;
    fixture.job_event("queued", &second).await;
    fixture.until("two runners", |github| github.jit_requests().len() == 2).await;
    let name_for = |job: &fake::WorkflowJob| {
        let requests = fixture.github.jit_requests();
        requests.iter().find(|r| r.name.ends_with(&format!("-{}", job.id))).unwrap().name.clone()
    };
    let (first_runner, second_runner) = (name_for(&first), name_for(&second));
    let first = fixture.github.set_job(first.id, "in_progress", None, Some(&second_runner));
    fixture.job_event("in_progress", &first).await;
    let second = fixture.github.set_job(second.id, "in_progress", None, Some(&first_runner));
    fixture.job_event("in_progress", &second).await;
    {
        let state = fixture.provider.state.lock().unwrap();
        let phase = |id| state.jobs[&demand_key(&fixture.tenant.id, id)].phase.clone();
        assert_eq!(phase(first.id), Phase::Launched { runner: second_runner.clone() });
        assert_eq!(phase(second.id), Phase::Launched { runner: first_runner.clone() });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fixture.github.jit_requests().len(), 2, "no demand was left without a runner");
    fixture.shutdown().await;
}

#[tokio::test]
async fn a_runner_that_takes_no_job_is_removed_after_the_idle_timeout() {
    let mut settings = settings();
    settings.runner_idle_timeout = Duration::from_millis(500);
    let fixture = Fixture::new(1, "fake:hang", settings).await;
    let job = fixture.github.queue_job("acme", "app", &["linux"]);
    fixture.job_event("queued", &job).await;
    // One quick retry, then the job waits for the reconciler.
    fixture.until("two runners deleted", |github| github.deleted_runners().len() == 2).await;
    fixture.until_slots_ready().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(fixture.github.jit_requests().len(), 2);
    assert!(fixture.github.runners(&org()).is_empty());
    for record in fixture.jobs() {
        assert!(record.failure.unwrap().contains("took no job within"));
    }
    fixture.shutdown().await;
}

#[tokio::test]
async fn transient_github_failures_are_retried() {
    let mut settings = settings();
    settings.retry.attempts = 6;
    let fixture = Fixture::new(1, "", settings).await.github_runs_jobs();
    let generate = Endpoint::GenerateJitConfig;
    fixture.github.inject(generate, Failure::status(502, "Bad gateway"), 2);
    let limited = Failure { retry_after_secs: Some(1), ..Failure::rate_limit() };
    fixture.github.inject(generate, limited, 1);
    fixture.github.inject(generate, Failure::status(429, "Too many requests"), 1);
    fixture.github.inject(Endpoint::DeleteRunner, Failure::secondary_rate_limit(1), 1);
    let job = fixture.github.queue_job("acme", "app", &["linux"]);
    fixture.job_event("queued", &job).await;
    fixture.until("the runner's deletion", |github| github.deleted_runners().len() == 1).await;
    let statuses: Vec<u16> = fixture
        .github
        .calls()
        .iter()
        .filter(|call| call.endpoint == Some(Endpoint::GenerateJitConfig))
        .map(|call| call.status)
        .collect();
    assert_eq!(statuses, [502, 502, 403, 429, 201]);
    assert_eq!(fixture.jobs()[0].state, JobState::Finished);
    fixture.shutdown().await;
}

#[tokio::test]
async fn a_name_conflict_deletes_the_stale_runner_and_registers_again() {
    let fixture = Fixture::new(1, "", settings()).await.github_runs_jobs();
    let message = "Already exists - A runner with the name already exists.";
    fixture.github.inject(Endpoint::GenerateJitConfig, Failure::status(409, message), 1);
    let job = fixture.github.queue_job("acme", "app", &["linux"]);
    fixture.job_event("queued", &job).await;
    fixture.until("the runner's deletion", |github| github.deleted_runners().len() == 1).await;
    assert_eq!(fixture.jobs()[0].state, JobState::Finished);
    fixture.shutdown().await;
}

#[tokio::test]
async fn permanent_github_failures_end_the_launch_without_leaks() {
    for (status, expected) in
        [(401, "401"), (403, "403"), (404, "404"), (422, "422"), (500, "failed 3 times")]
    {
        let fixture = Fixture::new(1, "", settings()).await;
        let failure = Failure::status(status, "refused by the fake");
        fixture.github.inject(Endpoint::GenerateJitConfig, failure, 3);
        let job = fixture.github.queue_job("acme", "app", &["linux"]);
        fixture.job_event("queued", &job).await;
        let waited = tokio::time::timeout(WAIT, async {
            loop {
                if fixture.jobs().first().is_some_and(|job| job.state == JobState::Failed) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        waited.await.unwrap_or_else(|_| panic!("{status}: the job never failed"));
        let failure = fixture.jobs()[0].failure.clone().unwrap();
        assert!(failure.contains(expected), "{status}: {failure}");
        assert!(fixture.github.runners(&org()).is_empty(), "{status}");
        let capacity = *fixture.control.pools()[0].capacity().borrow();
        let free = tokio::time::timeout(WAIT, async {
            let mut capacity = fixture.control.pools()[0].capacity();
            capacity.wait_for(|free| *free == 1).await.map(|_| ())
        });
        free.await
            .unwrap_or_else(|_| panic!("{status}: the slot was not released ({capacity})"))
            .unwrap();
        fixture.shutdown().await;
    }
}

#[tokio::test]
async fn the_reconciler_finds_lost_jobs_and_deletes_leaked_runners() {
    let fixture = Fixture::new(1, "", settings()).await.github_runs_jobs();
    // A webhook makes the repository active; the next job's webhook is lost.
    let seen = fixture.github.queue_job("acme", "app", &["linux"]);
    fixture.job_event("queued", &seen).await;
    fixture.until("the first runner deleted", |github| github.deleted_runners().len() == 1).await;
    let seen = fixture.github.set_job(seen.id, "completed", Some("success"), None);
    fixture.job_event("completed", &seen).await;
    // A runner of this host that no launch owns, as a killed daemon leaves behind.
    let client = fixture.provider.client(&fixture.tenant).await.unwrap();
    let leaked = client
        .generate_jit_config("warmpool-testhost-test-0-999", 1, &["linux".to_string()])
        .await
        .unwrap();
    // GitHub wants a label: a runner without labels is registered as `self-hosted`.
    let foreign = client.generate_jit_config("someone-elses-runner", 1, &[]).await.unwrap();
    let request = fixture.github.jit_requests().pop().unwrap();
    assert_eq!(request.labels, ["self-hosted"]);

    // Another, still busy with a job: GitHub refuses its deletion until the job ends.
    let busy = client
        .generate_jit_config("warmpool-testhost-test-0-998", 1, &["linux".to_string()])
        .await
        .unwrap();
    let running = fixture.github.queue_job("acme", "other", &["linux"]);
    fixture.github.set_job(running.id, "in_progress", None, Some(&busy.runner.name));

    let lost = fixture.github.queue_job("acme", "app", &["linux"]);
    let outcome = fixture.provider.reconcile().await;
    assert_eq!((outcome.queued, outcome.runners_deleted), (1, 1), "{outcome:?}");
    assert!(outcome.failed_tenants.is_empty(), "a refused deletion fails no tenant");
    assert!(fixture.github.deleted_runners().contains(&(org(), leaked.runner.id)));
    fixture
        .until("the lost job's runner deleted", |github| github.deleted_runners().len() == 3)
        .await;
    let names: Vec<String> = fixture.github.jit_requests().iter().map(|r| r.name.clone()).collect();
    assert!(names.contains(&format!("warmpool-testhost-test-0-{}", lost.id)), "{names:?}");
    let remaining = fixture.github.runners(&org());
    let remaining: Vec<u64> = remaining.iter().map(|r| r.id).collect();
    assert_eq!(remaining, [foreign.runner.id, busy.runner.id]);

    fixture.github.set_job(running.id, "completed", Some("success"), None);
    let outcome = fixture.provider.reconcile().await;
    assert_eq!(outcome.runners_deleted, 1, "deleted once its job ended: {outcome:?}");
    fixture.shutdown().await;
}

#[tokio::test]
async fn an_app_tenant_renews_its_installation_token_before_expiry() {
    let fixture = Fixture::new(1, "", settings()).await.github_runs_jobs();
    let (private_pem, public_pem) = rsa_key_pair();
    fixture.github.add_app(77, &public_pem);
    fixture.github.add_installation(88, 77);
    let settings = json!({ "owner": "apps", "app_id": 77, "installation_id": 88, "api_url": fixture.github.url() });
    let tenant = add_tenant(&fixture.store, "apps", settings);
    put_secret(&fixture.store, &tenant, secret_names::GITHUB_APP_KEY, private_pem.as_bytes());
    // GitHub's token endpoint failing once is retried like any other call.
    fixture.github.inject(Endpoint::AccessToken, Failure::status(503, "Unavailable"), 1);

    // Tokens that live an hour are reused...
    for expected_deleted in [1, 2] {
        let job = fixture.github.queue_job("apps", "app", &["linux"]);
        fixture.job_event("queued", &job).await;
        fixture
            .until("a deletion", |github| github.deleted_runners().len() == expected_deleted)
            .await;
    }
    assert_eq!(fixture.github.tokens_issued(), 1);
    let token_calls = fixture.github.calls();
    let token_calls = token_calls.iter().filter(|c| c.endpoint == Some(Endpoint::AccessToken));
    assert_eq!(token_calls.map(|c| c.status).collect::<Vec<_>>(), [503, 201]);
    // ...and one that expires within the renewal margin is replaced before the next call.
    fixture.github.set_token_lifetime(Duration::from_secs(120));
    let client = fixture.provider.client(&tenant).await.unwrap();
    client.renew();
    client.list_runners().await.unwrap();
    client.list_runners().await.unwrap();
    assert_eq!(fixture.github.tokens_issued(), 3, "a token inside the margin is never reused");
    fixture.shutdown().await;
}

/// A 2048-bit RSA key pair (private PKCS#8 PEM, public SPKI PEM), made with `openssl`.
fn rsa_key_pair() -> (String, String) {
    let run = |args: &[&str], input: Option<&str>| {
        use std::io::Write as _;
        let mut child = std::process::Command::new("openssl")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("openssl runs");
        if let Some(input) = input {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        } else {
            drop(child.stdin.take());
        }
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    };
    let private = run(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"], None);
    let public = run(&["pkey", "-pubout"], Some(&private));
    (private, public)
}

#[tokio::test]
async fn a_rotated_token_takes_effect_without_a_restart() {
    let fixture = Fixture::new(1, "", settings()).await.github_runs_jobs();
    put_secret(&fixture.store, &fixture.tenant, secret_names::GITHUB_TOKEN, b"revoked-token");
    let refused = fixture.github.queue_job("acme", "app", &["linux"]);
    fixture.job_event("queued", &refused).await;
    let waited = tokio::time::timeout(WAIT, async {
        while !fixture.jobs().first().is_some_and(|job| job.state == JobState::Failed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    waited.await.expect("the job with the revoked token failed");
    assert!(fixture.jobs()[0].failure.as_deref().unwrap().contains("401"));

    put_secret(&fixture.store, &fixture.tenant, secret_names::GITHUB_TOKEN, TOKEN.as_bytes());
    let accepted = fixture.github.queue_job("acme", "app", &["linux"]);
    fixture.job_event("queued", &accepted).await;
    fixture.until("the runner's deletion", |github| github.deleted_runners().len() == 1).await;
    fixture.shutdown().await;
}

#[tokio::test]
async fn a_runner_past_max_job_secs_is_stopped_and_deleted() {
    let fixture = Fixture::with_max_job(1, "fake:hang", settings(), 1).await;
    let job = fixture.github.queue_job("acme", "app", &["linux"]);
    fixture.job_event("queued", &job).await;
    fixture.until("the runner", |github| github.jit_requests().len() == 1).await;
    let runner = fixture.github.jit_requests()[0].name.clone();
    let job = fixture.github.set_job(job.id, "in_progress", None, Some(&runner));
    fixture.job_event("in_progress", &job).await;
    // GitHub frees the runner once the job fails for its lost runner; deletion then succeeds.
    let job = fixture.github.set_job(job.id, "completed", Some("failure"), None);
    fixture.until("the runner's deletion", |github| github.deleted_runners().len() == 1).await;
    fixture.until_slots_ready().await;
    let records = fixture.jobs();
    assert!(records[0].failure.as_deref().unwrap_or("").contains("1 s"), "{records:?}");
    assert_eq!(job.conclusion.as_deref(), Some("failure"));
    fixture.shutdown().await;
}

#[tokio::test]
async fn an_adopted_runner_job_is_followed_to_its_end_and_only_then_its_runner_deleted() {
    let f = Fixture::new(1, "exit 0", settings()).await;
    let acme = Scope::Organization("acme".into());
    let job = f.github.queue_job("acme", "app", &["self-hosted", "linux"]);
    let name = format!("warmpool-testhost-test-0-{}", job.id);
    let client = f.provider.client(&f.tenant).await.unwrap();
    client.generate_jit_config(&name, 1, &["linux".to_owned()]).await.unwrap();

    // The record as an earlier run's launch left it: started, the runner on its job.
    let record = "github-adopted";
    let new = NewJob { id: record.into(), tenant_id: f.tenant.id.clone(), pool: "test".into() };
    f.store.record_job(&Actor::Daemon, new).unwrap();
    let detail = json!({
        "github_job_id": job.id, "run_id": job.run_id, "repository": "acme/app",
        "runner_name": name, "status": "in_progress",
    });
    f.store.set_job_detail(&Actor::Daemon, record, detail.clone()).unwrap();
    for transition in [JobTransition::Assign { slot_index: 0 }, JobTransition::Start] {
        f.store.transition_job(&Actor::Daemon, record, transition).unwrap();
    }
    let share = Share { weight: 1, max_concurrent_jobs: 4 };
    let runner = AdoptedRunner::from_detail(record, &f.tenant.id, share, &detail).unwrap();

    let (events, events_rx) = mpsc::channel(8);
    let provider = GithubProvider::start_adopting(
        f.store.clone(),
        Scheduler::start(f.control.clone()),
        Arc::new(Metrics::default()),
        settings(),
        vec![vec!["linux".to_owned()]],
        vec![(runner, events_rx)],
    );
    // The reconciler, which deletes this host's runners that nothing owns, leaves it alone.
    assert_eq!(provider.reconcile().await.runners_deleted, 0);
    assert_eq!(f.github.runners(&acme).len(), 1);
    assert_eq!(f.store.get_job(record).unwrap().state, JobState::Started);

    // The slot reports the guest's `finished`: the record finishes, the runner goes.
    events.send(JobEvent::Finished { exit_code: 0 }).await.unwrap();
    drop(events);
    f.until("the adopted runner's deletion", |github| github.runners(&acme).is_empty()).await;
    let record = f.store.get_job(record).unwrap();
    assert_eq!((record.state, record.exit_code), (JobState::Finished, Some(0)));
    provider.shutdown(Duration::from_secs(5)).await;
    f.shutdown().await;
}
