//! A daemon killed with SIGKILL at many moments while jobs flow (building, assigning, running,
//! reverting) and restarted each time: no domain or file leaks, every job ends finished or
//! failed with a reason, no job runs twice, a job running in a healthy guest is adopted, and
//! every slot is ready again. A last kill comes while a GitHub job has its just-in-time runner
//! registered at the fake GitHub server; after the restart no registration is left.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Daemon, TestPool, BIN};
use warmpool::config::Arch;
use warmpool::hypervisor::libvirt::Libvirt;
use warmpool::hypervisor::Hypervisor;
use warmpool::provider::github::fake::{FakeGithub, Scope};
use warmpool::store::{JobFilter, JobState, Store, MAX_PAGE};

const SLOTS: u32 = 2;

/// The moment of a round's kill.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// While the slots build their first snapshots.
    Building,
    /// Right after jobs were submitted: queued, or on their way into a guest.
    Assigning,
    /// While a job runs in its guest.
    Running,
    /// Right after a job finished: its slot reverts.
    Reverting,
}

const ROUNDS: [Moment; 9] = [
    Moment::Building,
    Moment::Running,
    Moment::Assigning,
    Moment::Reverting,
    Moment::Running,
    Moment::Assigning,
    Moment::Reverting,
    Moment::Running,
    Moment::Assigning,
];

struct Harness {
    pool: TestPool,
    port: u16,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    /// Every daemon's log, for the check that no job ran twice.
    logs: String,
}

impl Harness {
    fn start_daemon(&self) -> Daemon {
        Daemon::start(&self.config, &self.log)
    }

    async fn wait_healthy(&self, daemon: &mut Daemon) {
        let began = Instant::now();
        loop {
            assert!(daemon.child.try_wait().unwrap().is_none(), "exited:\n{}", daemon.log());
            if let Some((200, _)) = support::http(self.port, "GET", "/healthz", None, None).await {
                return;
            }
            assert!(began.elapsed() < support::SETTLE_TIMEOUT, "never healthy:\n{}", daemon.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kill(&mut self, mut daemon: Daemon) {
        daemon.signal("-KILL");
        daemon.wait(Duration::from_secs(10));
        self.logs.push_str(&daemon.log());
        let _ = std::fs::remove_file(&self.log);
    }

    /// Submits a local job over the API; `None` when the daemon did not take it.
    async fn submit(&self, token: &str, script: &str) -> Option<String> {
        let body = serde_json::json!({ "argv": ["sh", "-c", script] }).to_string();
        let (status, body) =
            support::http(self.port, "POST", "/v1/local/jobs", Some(token), Some(&body)).await?;
        assert!(status == 201 || status == 202, "{status} {body}");
        let job: serde_json::Value = serde_json::from_str(&body).unwrap();
        Some(job["id"].as_str().unwrap().to_owned())
    }

    async fn job_state(&self, token: &str, id: &str) -> Option<String> {
        let path = format!("/v1/jobs/{id}");
        let (_, body) = support::http(self.port, "GET", &path, Some(token), None).await?;
        let job: serde_json::Value = serde_json::from_str(&body).ok()?;
        job["state"].as_str().map(str::to_owned)
    }

    /// Waits until a GitHub job's guest has started its runner; returns the job's id.
    async fn started_github_job(&self, token: &str) -> String {
        let began = Instant::now();
        while began.elapsed() < support::SETTLE_TIMEOUT {
            let listed = support::http(self.port, "GET", "/v1/jobs", Some(token), None).await;
            let page: serde_json::Value =
                listed.and_then(|(_, body)| serde_json::from_str(&body).ok()).unwrap_or_default();
            let jobs = page["jobs"].as_array().cloned().unwrap_or_default();
            let started = jobs.iter().find(|job| {
                job["state"] == "started"
                    && job["id"].as_str().is_some_and(|id| id.starts_with("github-"))
            });
            if let Some(job) = started {
                return job["id"].as_str().unwrap().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no GitHub job started");
    }

    async fn wait_job(&self, token: &str, id: &str, states: &[&str]) {
        let began = Instant::now();
        while began.elapsed() < support::SETTLE_TIMEOUT {
            if let Some(state) = self.job_state(token, id).await {
                if states.contains(&state.as_str()) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("job {id} never reached {states:?}");
    }

    /// Checks that libvirt runs no domain of this pool but its slots' own.
    async fn check_domains(&self, hypervisor: &Libvirt) {
        let names: Vec<String> = (0..SLOTS as usize).map(|i| self.pool.domain(i)).collect();
        for domain in hypervisor.list_marked(&self.pool.name).await.unwrap() {
            assert!(names.contains(&domain), "a domain of no slot: {domain}");
        }
    }
}

/// How long the stand-in runner of the adopted GitHub job holds on to it: long enough for the
/// kill and the next daemon's start.
const GITHUB_HOLD_SECS: u64 = 20;

#[tokio::test]
async fn a_daemon_killed_at_any_moment_recovers_every_slot_and_job() {
    if !support::environment_ready(Arch::X86_64).await {
        return;
    }
    let pool = TestPool::new("recovery", Arch::X86_64, SLOTS, "max_job_secs = 120");
    let (config, port) = pool.write_config_with_api();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[github]\nhost_name = \"crash\"\nreconcile_interval_secs = 5\n");
    std::fs::write(&config, text).unwrap();
    let log = pool.state_dir.join("daemon.log");
    let mut h = Harness { pool, port, config, log, logs: String::new() };
    let hypervisor = Libvirt::connect(&support::uri()).await.unwrap();
    // A domain and files of a slot the configuration no longer has, as a daemon configured
    // with more slots would have left them: removed at start.
    let stray = h.pool.state_dir.join("pools").join(&h.pool.name).join("7");
    std::fs::create_dir_all(&stray).unwrap();

    let mut daemon = h.start_daemon();
    let socket = h.pool.config.control_socket.to_str().unwrap().to_owned();
    let mut token = None;
    let mut submitted = Vec::new();
    for (round, moment) in ROUNDS.into_iter().enumerate() {
        let jitter = Duration::from_millis(37 * (round as u64 % 5));
        if let Moment::Building = moment {
            // The first snapshots take seconds to build under emulation.
            tokio::time::sleep(Duration::from_millis(1500) + jitter).await;
            h.kill(daemon);
            daemon = h.start_daemon();
            continue;
        }
        h.wait_healthy(&mut daemon).await;
        let token = match &token {
            Some(token) => token,
            None => {
                let out = Command::new(BIN)
                    .args(["token", "create", "--socket", &socket, "--name", "recovery"])
                    .output()
                    .unwrap();
                token.insert(String::from_utf8(out.stdout).unwrap().trim().to_owned())
            }
        };
        match moment {
            Moment::Building => unreachable!(),
            Moment::Assigning => {
                for i in 0..3 {
                    let script = format!("echo round {round} job {i}; sleep 1");
                    submitted.extend(h.submit(token, &script).await);
                }
                tokio::time::sleep(jitter).await;
            }
            Moment::Running => {
                let id = h.submit(token, &format!("sleep 4; echo round {round}")).await.unwrap();
                h.wait_job(token, &id, &["started"]).await;
                tokio::time::sleep(Duration::from_millis(300) + jitter).await;
                submitted.push(id);
            }
            Moment::Reverting => {
                let id = h.submit(token, "true").await.unwrap();
                h.wait_job(token, &id, &["finished", "failed"]).await;
                tokio::time::sleep(jitter).await;
                submitted.push(id);
            }
        }
        h.kill(daemon);
        h.check_domains(&hypervisor).await;
        daemon = h.start_daemon();
    }

    // A GitHub job: the kill comes once its runner is registered.
    let token = token.unwrap();
    h.wait_healthy(&mut daemon).await;
    let github = FakeGithub::start().await.unwrap();
    github.add_token("acme-token");
    let target = format!("http://127.0.0.1:{}/webhooks/github", h.port);
    let secret = b"recovery webhook secret";
    github.run_jobs_on_runners(Some((&target, secret)), Duration::ZERO);
    add_github_tenant(h.port, &token, &github.url(), std::str::from_utf8(secret).unwrap()).await;
    queue_github_job(&github, &target, secret).await;
    let began = Instant::now();
    while github.jit_requests().is_empty() {
        assert!(began.elapsed() < support::SETTLE_TIMEOUT, "no runner registered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acme = Scope::Organization("acme".into());
    let registered_at_kill = github.runners(&acme).len();
    h.kill(daemon);
    let mut daemon = h.start_daemon();

    // A GitHub job whose runner runs: the kill comes while the guest holds on to the job; the
    // next daemon adopts it, follows it to its end and deletes its runner.
    h.wait_healthy(&mut daemon).await;
    github.hold_stand_in_runners(GITHUB_HOLD_SECS);
    // GitHub completes the job a little before the runner exits, as it does in truth; it does
    // not delete a runner that is busy with a job.
    let job_secs = GITHUB_HOLD_SECS - 5;
    github.run_jobs_on_runners(Some((&target, secret)), Duration::from_secs(job_secs));
    queue_github_job(&github, &target, secret).await;
    let adopted_github_job = h.started_github_job(&token).await;
    h.kill(daemon);
    let mut daemon = h.start_daemon();

    // The last daemon settles: every job ends, every slot is ready, no runner is left.
    h.wait_healthy(&mut daemon).await;
    for id in &submitted {
        h.wait_job(&token, id, &["finished", "failed"]).await;
    }
    daemon.wait_ready(std::path::Path::new(&socket)).await;
    let status =
        Command::new(BIN).args(["status", "--json", "--socket", &socket]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let slots = status[0]["slots"].as_array().unwrap().clone();
    assert_eq!(slots.len(), SLOTS as usize);
    for slot in &slots {
        assert_eq!(slot["state"], "ready", "{status}");
    }
    h.check_domains(&hypervisor).await;
    let began = Instant::now();
    while !github.runners(&acme).is_empty() {
        assert!(
            began.elapsed() < support::SETTLE_TIMEOUT,
            "runners left: {:?}",
            github.runners(&acme)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.signal("-TERM");
    assert!(daemon.wait(Duration::from_secs(60)).success(), "{}", daemon.log());
    h.logs.push_str(&daemon.log());

    // Nothing leaked: no domain, only clean snapshots, the stray slot gone.
    assert!(hypervisor.list_marked(&h.pool.name).await.unwrap().is_empty());
    support::assert_only_snapshots_left(&h.pool.state_dir.join("pools").join(&h.pool.name));
    assert!(!stray.exists(), "the stray slot's files are removed");

    // Every job ended, finished or failed with a reason, and none ran twice.
    let store =
        Store::open(&h.pool.state_dir.join("warmpool.db"), &h.pool.state_dir.join("host.key"))
            .unwrap();
    let jobs = store.list_jobs(&JobFilter { limit: MAX_PAGE, ..JobFilter::default() }).unwrap();
    let mut outcomes = BTreeMap::new();
    for job in &jobs.jobs {
        match job.state {
            JobState::Finished => assert_eq!(job.exit_code, Some(0), "{job:?}"),
            JobState::Failed => {
                assert!(!job.failure.as_deref().unwrap_or("").is_empty(), "{job:?}")
            }
            _ => panic!("a job that never ended: {job:?}"),
        }
        let outcome = job.failure.clone().unwrap_or_else(|| format!("{:?}", job.state));
        *outcomes.entry(outcome).or_insert(0) += 1;
        let assigned = h.logs.matches(&format!("Job assigned job={}\n", job.id)).count();
        // A job is sent to a guest once; a daemon killed again while it follows an adopted
        // job leaves it to the next one to adopt, which is no second run.
        assert!(assigned <= 1, "job {} was assigned {assigned} times", job.id);
    }
    let local = jobs.jobs.iter().filter(|job| job.id.starts_with("local-")).count();
    assert_eq!(local, submitted.len());
    assert!(jobs.jobs.iter().any(|job| job.id.starts_with("github-")), "no GitHub job recorded");
    eprintln!("runners registered at the GitHub kill: {registered_at_kill}; none left after");
    let adoptions = h.logs.matches("Job adopted from an earlier run").count();
    eprintln!(
        "{} jobs over {} kills: {outcomes:?}; {adoptions} adopted",
        jobs.jobs.len(),
        ROUNDS.len()
    );
    assert!(adoptions > 0, "no running job was adopted:\n{}", h.logs);
    assert!(h.logs.contains("Runner job adopted"), "the GitHub job was not adopted:\n{}", h.logs);
    let adopted = store.get_job(&adopted_github_job).unwrap();
    assert_eq!((adopted.state, adopted.exit_code), (JobState::Finished, Some(0)), "{adopted:?}");
    let _ = std::fs::remove_dir_all(&h.pool.state_dir);
}

/// Registers the GitHub organisation `acme` with a token at the fake server.
/// Queues a job of acme/app on the fake GitHub and delivers its signed `queued` webhook.
async fn queue_github_job(github: &FakeGithub, target: &str, secret: &[u8]) {
    let job = github.queue_job("acme", "app", &["self-hosted"]);
    let body = github.workflow_job_event("queued", &job, None).to_string();
    let delivery = format!("queued-{}", job.id);
    let (status, answer) =
        FakeGithub::deliver(target, secret, "workflow_job", &delivery, body.as_bytes())
            .await
            .unwrap();
    assert_eq!(status, 200, "{answer}");
}

async fn add_github_tenant(port: u16, token: &str, url: &str, webhook_secret: &str) {
    let body = serde_json::json!({
        "name": "acme",
        "kind": "github",
        "settings": { "owner": "acme", "api_url": url },
    })
    .to_string();
    let (status, answer) =
        support::http(port, "POST", "/v1/tenants", Some(token), Some(&body)).await.unwrap();
    assert_eq!(status, 201, "{answer}");
    let tenant: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let id = tenant["id"].as_str().unwrap();
    for (name, value) in [("token", "acme-token"), ("webhook_secret", webhook_secret)] {
        let path = format!("/v1/tenants/{id}/secrets/{name}");
        let body = serde_json::json!({ "value": value }).to_string();
        let (status, answer) =
            support::http(port, "PUT", &path, Some(token), Some(&body)).await.unwrap();
        assert_eq!(status, 200, "{answer}");
    }
}
