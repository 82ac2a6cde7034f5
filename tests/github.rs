//! GitHub Actions end to end: the daemon binary, real reference guests, and the fake GitHub
//! server on loopback playing GitHub's side. Two tenants send signed webhooks; each job gets a
//! JIT runner with the right name, labels and group; the guest's stand-in runner checks the
//! configuration it was given; every runner is deleted and every slot reverted.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Daemon, TestPool, BIN};
use warmpool::config::Arch;
use warmpool::provider::github::fake::{FakeGithub, Scope};

const WEBHOOK_SECRET: &str = "one app's webhook secret";

/// Runs the CLI against the daemon's API; returns stdout, panicking on failure.
fn cli(api: &str, token: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write as _;
    let mut child = Command::new(BIN)
        .args(args)
        .env("WARMPOOL_API", api)
        .env("WARMPOOL_TOKEN", token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "warmpool {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Registers a GitHub tenant with a token and the shared webhook secret; returns its id.
fn add_tenant(api: &str, admin: &str, name: &str, settings: &str, token: &str) -> String {
    let out = cli(
        api,
        admin,
        &["tenant", "add", name, "--kind", "github", "--settings", settings, "--json"],
        None,
    );
    let tenant: Value = serde_json::from_str(&out).unwrap();
    let id = tenant["id"].as_str().unwrap().to_owned();
    let secret = |secret: &str, value: &str| {
        cli(api, admin, &["tenant", "secret", "set", &id, secret], Some(&format!("{value}\n")));
    };
    secret("webhook_secret", WEBHOOK_SECRET);
    secret("token", token);
    id
}

#[tokio::test]
async fn two_tenants_jobs_run_on_jit_runners_in_real_guests() {
    if !support::environment_ready(Arch::X86_64).await {
        return;
    }
    let github = FakeGithub::start().await.unwrap();
    github.add_token("acme-token");
    github.add_token("widgets-token");
    let widgets = Scope::Repository("widgets-inc".into(), "app".into());
    github.add_runner_group(&widgets, 7, "Windows ARM");

    let pool = TestPool::new("github", Arch::X86_64, 2, r#"labels = ["linux", "x86_64"]"#);
    let _ = std::fs::remove_dir_all(&pool.state_dir);
    std::fs::create_dir_all(&pool.state_dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = pool.state_dir.join("warmpool.toml");
    let github_table = "[github]\nhost_name = \"ci1\"\ncompleted_grace_secs = 60\n";
    let text = format!("api_listen = \"127.0.0.1:{port}\"\n{}\n{github_table}", pool.text);
    std::fs::write(&config, text).unwrap();
    let log = std::env::temp_dir().join("warmpool-github-test.log");
    let _ = std::fs::remove_file(&log);
    let mut daemon = Daemon::start(&config, &log);
    daemon.wait_ready(&pool.config.control_socket).await;

    let socket = pool.config.control_socket.to_str().unwrap();
    let out = Command::new(BIN)
        .args(["token", "create", "--socket", socket, "--name", "admin"])
        .output()
        .unwrap();
    let admin = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let api = format!("http://127.0.0.1:{port}");
    let url = github.url();
    add_tenant(
        &api,
        &admin,
        "acme",
        &format!(r#"{{"owner":"acme","api_url":"{url}"}}"#),
        "acme-token",
    );
    let settings = format!(
        r#"{{"owner":"widgets-inc","repository":"app","runner_group_id":7,"api_url":"{url}"}}"#
    );
    add_tenant(&api, &admin, "widgets", &settings, "widgets-token");

    // GitHub hands each runner a queued job, completes it, and says so by webhook.
    let target = format!("{api}/webhooks/github");
    github.run_jobs_on_runners(Some((&target, WEBHOOK_SECRET.as_bytes())), Duration::ZERO);
    let mut jobs = Vec::new();
    for (owner, repo) in
        [("acme", "app"), ("widgets-inc", "app"), ("acme", "tools"), ("widgets-inc", "app")]
    {
        let job = github.queue_job(owner, repo, &["self-hosted", "Linux"]);
        let body = github.workflow_job_event("queued", &job, None).to_string();
        let delivery = format!("queued-{}", job.id);
        let secret = WEBHOOK_SECRET.as_bytes();
        let (status, answer) =
            FakeGithub::deliver(&target, secret, "workflow_job", &delivery, body.as_bytes())
                .await
                .unwrap();
        assert_eq!(status, 200, "{answer}");
        assert!(answer.contains("accepted"), "{answer}");
        jobs.push(job);
    }
    // A forged delivery is refused and changes nothing.
    let forged = github.queue_job("acme", "app", &["linux"]);
    let body = github.workflow_job_event("queued", &forged, None).to_string();
    let (status, _) =
        FakeGithub::deliver(&target, b"a guess", "workflow_job", "forged", body.as_bytes())
            .await
            .unwrap();
    assert_eq!(status, 401);

    let began = Instant::now();
    while github.deleted_runners().len() < jobs.len() {
        if began.elapsed() > support::SETTLE_TIMEOUT {
            panic!("runners deleted: {:?}\n{}", github.deleted_runners(), daemon.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // One runner per job, named for host, slot and job, with the pool's labels and the
    // tenant's scope and group.
    let requests = github.jit_requests();
    assert_eq!(requests.len(), jobs.len(), "{requests:#?}");
    let mut named = BTreeSet::new();
    for request in &requests {
        let job_id: u64 = request.name.rsplit('-').next().unwrap().parse().unwrap();
        let job = jobs.iter().find(|job| job.id == job_id).expect("a runner names its job");
        let prefix = request.name.strip_suffix(&format!("-{job_id}")).unwrap();
        assert!(prefix == "warmpool-ci1-t-github-0" || prefix == "warmpool-ci1-t-github-1");
        assert_eq!(request.labels, ["linux", "x86_64"]);
        let (scope, group) = match job.owner.as_str() {
            "acme" => (Scope::Organization("acme".into()), 1),
            _ => (widgets.clone(), 7),
        };
        assert_eq!((&request.scope, request.runner_group_id), (&scope, group), "{request:?}");
        named.insert(job_id);
    }
    assert_eq!(named.len(), jobs.len(), "each job had its own runner");
    assert!(github.runners(&Scope::Organization("acme".into())).is_empty());
    assert!(github.runners(&widgets).is_empty());
    for job in &jobs {
        assert_eq!(github.job(job.id).unwrap().status, "completed");
    }
    assert_eq!(github.job(forged.id).unwrap().status, "queued", "the forged job never ran");

    // The guests' stand-in runner accepted every configuration: exit code 0 on record.
    let listed = cli(&api, &admin, &["job", "list", "--json"], None);
    let page: Value = serde_json::from_str(&listed).unwrap();
    let records: Vec<&Value> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|job| job["id"].as_str().unwrap().starts_with("github-"))
        .collect();
    assert_eq!(records.len(), jobs.len(), "{listed}");
    for record in records {
        assert_eq!(record["state"], "finished", "{record}");
        assert_eq!(record["exit_code"], 0, "{record}");
        assert_eq!(record["detail"]["conclusion"], "success", "{record}");
    }

    daemon.wait_ready(&pool.config.control_socket).await;
    daemon.signal("-TERM");
    assert!(daemon.wait(Duration::from_secs(120)).success(), "{}", daemon.log());
    let listed = Command::new("virsh")
        .args(["-c", &support::uri(), "list", "--all", "--name"])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&listed.stdout);
    assert!(!names.contains("warmpool-t-github-"), "{names}");
    let _ = std::fs::remove_dir_all(&pool.state_dir);
}
