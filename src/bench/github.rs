//! `warmpool bench --github`: the GitHub path against the fake GitHub server on loopback.
//!
//! A child `warmpool serve` gets one GitHub tenant whose API is the fake server. For each job
//! the benchmark waits for a ready slot, queues a job at the fake and delivers its signed
//! `queued` webhook over TCP to the daemon's API. The daemon registers a JIT runner, sends the
//! configuration in the job message, and the guest's stand-in runner checks it and exits; the
//! fake plays GitHub handing the job to the runner and completing it. The figure is the
//! daemon's own: from the moment its API received the webhook to the guest's `started`, which
//! the guest sends once it has read the job message.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::{
    settled, tail, wait_for, write_config, BenchError, BenchOptions, Daemon, Percentiles,
    BUILD_TIMEOUT, READY_TIMEOUT,
};
use crate::client::ApiClient;
use crate::config::Config;
use crate::control::{Client, Request, Response};
use crate::provider::github::fake::{FakeGithub, Scope};
use crate::slot::SlotState;

const OWNER: &str = "bench-org";
const TOKEN: &str = "github_pat_bench";
const WEBHOOK_SECRET: &[u8] = b"bench webhook secret";

#[derive(Debug, Serialize)]
pub struct GithubBenchReport {
    pub pool: String,
    pub slots: u32,
    pub acceleration: String,
    /// From the webhook's arrival at the API to the guest's `started`.
    pub webhook_to_start_ms: Percentiles,
    /// From the job's submission to its slot (after the runner's registration) to `started`.
    pub assign_ms: Percentiles,
    pub revert_ms: Percentiles,
    pub jobs_ok: u64,
    pub jobs_failed: u64,
    /// Runner registrations left at the fake GitHub after the run: 0 unless something leaked.
    pub runners_left: usize,
}

pub async fn run(options: &BenchOptions, dir: &Path) -> Result<GithubBenchReport, BenchError> {
    let github = FakeGithub::start().await?;
    github.add_token(TOKEN);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let text = github_config(&options.config_text, dir, options.slots, port)?;
    let (config_path, config) = write_config(dir, &text).await?;

    let log_path = dir.join("daemon.log");
    let mut daemon = Daemon::start(&config_path, &log_path)?;
    let measured = measure(&config, &mut daemon, &github, port, options.jobs).await;
    daemon.stop().await;
    let stats = measured.map_err(|e| match e {
        BenchError::Daemon(message, _) => BenchError::Daemon(message, tail(&log_path)),
        other => other,
    })?;
    let pool = &config.pools[0];
    let acceleration = crate::pool::resolve_acceleration(pool.acceleration, pool.arch);
    Ok(GithubBenchReport {
        pool: pool.name.clone(),
        slots: pool.slots,
        acceleration: format!("{acceleration:?}").to_lowercase(),
        webhook_to_start_ms: Percentiles::of(&stats.webhook_to_start_ms),
        assign_ms: Percentiles::of(&stats.assign_ms),
        revert_ms: Percentiles::of(&stats.revert_ms),
        jobs_ok: stats.jobs_ok,
        jobs_failed: stats.jobs_failed,
        runners_left: github.runners(&Scope::Organization(OWNER.into())).len(),
    })
}

/// The benchmark's configuration, with the API on a loopback port and this host's runners
/// named `warmpool-bench-…`.
fn github_config(
    text: &str,
    dir: &Path,
    slots: Option<u32>,
    port: u16,
) -> Result<String, BenchError> {
    let text = super::rewrite_config(text, dir, slots)?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| BenchError::Rewrite(e.to_string()))?;
    table.insert("api_listen".into(), format!("127.0.0.1:{port}").into());
    let github: toml::Table = toml::from_str(
        "host_name = \"bench\"\nreconcile_interval_secs = 3600\ncompleted_grace_secs = 60",
    )
    .expect("a valid table");
    table.insert("github".into(), github.into());
    toml::to_string(&table).map_err(|e| BenchError::Rewrite(e.to_string()))
}

async fn measure(
    config: &Config,
    daemon: &mut Daemon,
    github: &FakeGithub,
    port: u16,
    jobs: usize,
) -> Result<crate::metrics::Snapshot, BenchError> {
    let socket = &config.control_socket;
    let ready = config.pools[0].ready as usize;
    let built = |status: &crate::pool::PoolStatus| {
        settled(status) && status.count(SlotState::Ready) >= ready
    };
    wait_for(daemon, socket, BUILD_TIMEOUT, built).await?;
    register_tenant(config, github).await?;
    let target = format!("http://127.0.0.1:{port}/webhooks/github");
    github.run_jobs_on_runners(Some((&target, WEBHOOK_SECRET)), Duration::ZERO);

    let mut labels = vec!["self-hosted".to_owned()];
    labels.extend(config.pools[0].labels.iter().cloned());
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    for index in 0..jobs {
        wait_for(daemon, socket, READY_TIMEOUT, |status| status.count(SlotState::Ready) > 0)
            .await?;
        let job = github.queue_job(OWNER, "app", &labels);
        let body = github.workflow_job_event("queued", &job, None).to_string();
        let delivery = format!("bench-{}", job.id);
        let (status, answer) = FakeGithub::deliver(
            &target,
            WEBHOOK_SECRET,
            "workflow_job",
            &delivery,
            body.as_bytes(),
        )
        .await?;
        if status != 200 || !answer.contains("accepted") {
            let message = format!("the webhook was answered {status}: {answer}");
            return Err(BenchError::Daemon(message, String::new()));
        }
        wait_deleted(daemon, github, index + 1).await?;
        tracing::info!(job = index, github_job = job.id, "Benchmark GitHub job ended");
    }
    wait_for(daemon, socket, READY_TIMEOUT, built).await?;
    match Client::call(socket, &Request::Stats).await? {
        Response::Stats { stats } => Ok(stats),
        _ => Err(BenchError::Daemon("unexpected answer to `stats`".into(), String::new())),
    }
}

/// Creates the tenant through the API's unix socket, where root needs no token.
async fn register_tenant(config: &Config, github: &FakeGithub) -> Result<(), BenchError> {
    let endpoint = format!("unix:{}", config.api_socket.display());
    let client = ApiClient::new(&endpoint, None, None)?;
    let settings = json!({ "owner": OWNER, "api_url": github.url() });
    let body = json!({ "name": "bench", "kind": "github", "settings": settings });
    let tenant = client.call(http::Method::POST, "/v1/tenants", Some(body)).await?;
    let id = tenant["id"].as_str().unwrap_or_default();
    let secret = String::from_utf8_lossy(WEBHOOK_SECRET);
    for (name, value) in [("webhook_secret", secret.as_ref()), ("token", TOKEN)] {
        let path = format!("/v1/tenants/{id}/secrets/{name}");
        client.call(http::Method::PUT, &path, Some(json!({ "value": value }))).await?;
    }
    Ok(())
}

/// Waits until the fake GitHub has seen `count` runners deleted: the job's runner has come
/// and gone.
async fn wait_deleted(
    daemon: &mut Daemon,
    github: &FakeGithub,
    count: usize,
) -> Result<(), BenchError> {
    let began = Instant::now();
    while github.deleted_runners().len() < count {
        daemon.check_alive()?;
        if began.elapsed() > READY_TIMEOUT {
            let message = format!("runner {count} was not deleted within {READY_TIMEOUT:?}");
            return Err(BenchError::Daemon(message, String::new()));
        }
        tokio::time::sleep(super::POLL).await;
    }
    Ok(())
}
