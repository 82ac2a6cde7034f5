//! `warmpool bench`: runs local jobs through a real daemon and reports, side by side from one
//! run, the cold boot of the pool's guest and the daemon's build, revert and assign times.
//!
//! The benchmark copies the configuration with its pools renamed `bench-…` and its state in a
//! directory of its own, so it never touches the domains of a daemon serving the same host. It
//! first boots the guest cold a few times in its own process, then starts `warmpool serve` as
//! a child, waits for the pool to be built, and sends jobs one at a time, each when a slot is
//! ready, so that `assign_ms` measures assignment and not queueing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, ConfigError};
use crate::control::{Client, ControlError, Request, Response};
use crate::hypervisor::libvirt::Libvirt;
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::metrics::{percentile, Metrics, Snapshot};
use crate::pool::{self, PoolStatus};
use crate::slot::{Slot, SlotError, SlotState};

/// Slots of the cold boots get indexes far above any pool's, so their domains never collide.
const COLD_BOOT_INDEX: usize = 10_000;
/// A pool under TCG with several slots can take minutes to build.
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const READY_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("The configuration cannot be rewritten for the benchmark: {0}")]
    Rewrite(String),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("A cold boot failed: {0}")]
    ColdBoot(#[from] SlotError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("The benchmark daemon failed: {0} (its log: {1})")]
    Daemon(String, String),
    #[error("Benchmark file I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Api(#[from] crate::client::ClientError),
}

pub struct BenchOptions {
    /// The configuration file's text and where it came from.
    pub config_text: String,
    pub origin: PathBuf,
    pub jobs: usize,
    pub cold_boots: usize,
    /// Overrides the number of slots (and of ready slots) of the benchmarked pool.
    pub slots: Option<u32>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p95: u64,
    pub n: usize,
}

impl Percentiles {
    fn of(samples: &[u64]) -> Percentiles {
        Percentiles { p50: percentile(samples, 50), p95: percentile(samples, 95), n: samples.len() }
    }
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub pool: String,
    pub slots: u32,
    pub acceleration: String,
    pub cold_boot_ms: Percentiles,
    pub build_ms: Percentiles,
    pub revert_ms: Percentiles,
    pub assign_ms: Percentiles,
    pub jobs_ok: u64,
    pub jobs_failed: u64,
    pub daemon_max_rss_kib: u64,
}

pub async fn run(options: BenchOptions) -> Result<BenchReport, BenchError> {
    let dir = bench_dir(&options).await?;
    let result = run_in(&options, &dir).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

/// Runs GitHub jobs through the daemon instead of local ones; see [`github`].
pub async fn run_github(options: BenchOptions) -> Result<github::GithubBenchReport, BenchError> {
    let dir = bench_dir(&options).await?;
    let result = github::run(&options, &dir).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

/// Measures the daemon's start to `READY=1`, cold and warm, and its idle stop; see [`service`].
pub async fn run_service(options: BenchOptions) -> Result<service::ServiceBenchReport, BenchError> {
    let dir = bench_dir(&options).await?;
    let result = service::run(&options, &dir).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

/// Measures what a guest network adds to a revert, side by side; see [`network`].
pub async fn run_network(
    options: BenchOptions,
    network_name: &str,
) -> Result<network::NetworkBenchReport, BenchError> {
    let dir = bench_dir(&options).await?;
    let result = network::run(&options, network_name, &dir).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

/// A directory of the benchmark's own in the configured state directory.
async fn bench_dir(options: &BenchOptions) -> Result<PathBuf, BenchError> {
    let original = Config::parse(&options.config_text, &options.origin)?;
    let dir = original.state_dir.join(format!("bench-{}", std::process::id()));
    crate::disk::create_private_dir(&dir).await.map_err(|e| BenchError::Rewrite(e.to_string()))?;
    Ok(dir)
}

async fn run_in(options: &BenchOptions, dir: &Path) -> Result<BenchReport, BenchError> {
    let text = rewrite_config(&options.config_text, dir, options.slots)?;
    let (config_path, config) = write_config(dir, &text).await?;
    let pool = config.pools[0].clone();

    let cold_boot_ms = cold_boots(&config, options.cold_boots).await?;
    let log_path = dir.join("daemon.log");
    let mut daemon = Daemon::start(&config_path, &log_path)?;
    let measured = measure(&config, &mut daemon, options.jobs).await;
    let rss = daemon.max_rss_kib();
    daemon.stop().await;
    let stats = measured.map_err(|e| match e {
        BenchError::Daemon(message, _) | BenchError::Rewrite(message) => {
            BenchError::Daemon(message, tail(&log_path))
        }
        other => other,
    })?;
    let acceleration = pool::resolve_acceleration(pool.acceleration, pool.arch);
    Ok(BenchReport {
        pool: pool.name.clone(),
        slots: pool.slots,
        acceleration: format!("{acceleration:?}").to_lowercase(),
        cold_boot_ms: Percentiles::of(&cold_boot_ms),
        build_ms: Percentiles::of(&stats.build_ms),
        revert_ms: Percentiles::of(&stats.revert_ms),
        assign_ms: Percentiles::of(&stats.assign_ms),
        jobs_ok: stats.jobs_ok,
        jobs_failed: stats.jobs_failed,
        daemon_max_rss_kib: rss,
    })
}

/// Writes a benchmark's configuration into `dir` and reads it back, as its daemon will.
async fn write_config(dir: &Path, text: &str) -> Result<(PathBuf, Config), BenchError> {
    let path = dir.join("bench.toml");
    tokio::fs::write(&path, text).await?;
    let config = Config::parse(text, &path)?;
    Ok((path, config))
}

/// Renames the pools `bench-…`, keeps only the first, and moves state and socket into `dir`.
fn rewrite_config(text: &str, dir: &Path, slots: Option<u32>) -> Result<String, BenchError> {
    let mut table: toml::Table =
        toml::from_str(text).map_err(|e| BenchError::Rewrite(e.to_string()))?;
    let dir_str =
        dir.to_str().ok_or_else(|| BenchError::Rewrite("state_dir is not UTF-8".into()))?;
    table.insert("state_dir".into(), dir_str.into());
    table.insert("control_socket".into(), format!("{dir_str}/control.sock").into());
    table.insert("api_socket".into(), format!("{dir_str}/api.sock").into());
    let pools = table
        .get_mut("pool")
        .and_then(toml::Value::as_array_mut)
        .filter(|pools| !pools.is_empty())
        .ok_or_else(|| BenchError::Rewrite("no [[pool]]".into()))?;
    pools.truncate(1);
    let pool = pools[0]
        .as_table_mut()
        .ok_or_else(|| BenchError::Rewrite("[[pool]] is not a table".into()))?;
    let name = pool.get("name").and_then(toml::Value::as_str).unwrap_or("pool");
    let name: String = format!("bench-{name}").chars().take(32).collect();
    pool.insert("name".into(), name.into());
    if let Some(slots) = slots {
        pool.insert("slots".into(), i64::from(slots).into());
        pool.insert("ready".into(), i64::from(slots).into());
    }
    toml::to_string(&table).map_err(|e| BenchError::Rewrite(e.to_string()))
}

/// Boots the pool's guest `count` times straight from its image, one after another.
async fn cold_boots(config: &Config, count: usize) -> Result<Vec<u64>, BenchError> {
    let hypervisor: Arc<dyn Hypervisor> = Arc::new(Libvirt::connect(&config.libvirt_uri).await?);
    let spec = Arc::new(pool::slot_spec(&config.pools[0], &config.state_dir, None));
    let (reports, _reports_rx) = mpsc::unbounded_channel();
    let (_stopping_tx, stopping) = watch::channel(false);
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let metrics = Arc::new(Metrics::default());
        let mut slot = Slot::new(
            COLD_BOOT_INDEX + i,
            spec.clone(),
            hypervisor.clone(),
            metrics,
            reports.clone(),
            stopping.clone(),
        );
        let elapsed = slot.measure_cold_boot().await?;
        tracing::info!(boot = i, ms = elapsed.as_millis() as u64, "Cold boot measured");
        samples.push(elapsed.as_millis() as u64);
    }
    Ok(samples)
}

async fn measure(
    config: &Config,
    daemon: &mut Daemon,
    jobs: usize,
) -> Result<Snapshot, BenchError> {
    let socket = &config.control_socket;
    let ready = config.pools[0].ready as usize;
    wait_for(daemon, socket, BUILD_TIMEOUT, |status| {
        settled(status) && status.count(SlotState::Ready) >= ready
    })
    .await?;
    for job in 0..jobs {
        wait_for(daemon, socket, READY_TIMEOUT, |status| status.count(SlotState::Ready) > 0)
            .await?;
        let outcome = run_job(socket).await?;
        tracing::info!(job, outcome = %outcome, "Benchmark job ended");
    }
    wait_for(daemon, socket, READY_TIMEOUT, |status| {
        settled(status) && status.count(SlotState::Ready) >= ready
    })
    .await?;
    let Response::Stats { stats } = Client::call(socket, &Request::Stats).await? else {
        return Err(BenchError::Daemon("unexpected answer to `stats`".into(), String::new()));
    };
    Ok(stats)
}

fn settled(status: &PoolStatus) -> bool {
    status.slots.iter().all(|slot| matches!(slot.state, SlotState::Ready | SlotState::Saved))
}

/// Polls the daemon's status until `done` holds for every pool.
async fn wait_for(
    daemon: &mut Daemon,
    socket: &Path,
    timeout: Duration,
    done: impl Fn(&PoolStatus) -> bool,
) -> Result<Vec<PoolStatus>, BenchError> {
    let began = Instant::now();
    loop {
        daemon.check_alive()?;
        if let Ok(Response::Status { pools }) = Client::call(socket, &Request::Status).await {
            if let Some(quarantined) =
                pools.iter().flat_map(|p| &p.slots).find(|s| s.state == SlotState::Quarantined)
            {
                let why = quarantined.error.clone().unwrap_or_default();
                return Err(BenchError::Daemon(
                    format!("slot {} was quarantined: {why}", quarantined.name),
                    String::new(),
                ));
            }
            if !pools.is_empty() && pools.iter().all(&done) {
                return Ok(pools);
            }
        }
        if began.elapsed() > timeout {
            return Err(BenchError::Daemon(
                format!("the pool did not settle within {timeout:?}"),
                String::new(),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn run_job(socket: &Path) -> Result<String, BenchError> {
    let mut client =
        Client::request(socket, &Request::Exec { pool: None, argv: vec!["true".into()] }).await?;
    while let Some(response) = client.next().await? {
        match response {
            Response::Finished { exit_code } => return Ok(format!("exit {exit_code}")),
            Response::Failed { reason } => return Ok(format!("failed: {reason}")),
            Response::Error { message } => return Err(BenchError::Daemon(message, String::new())),
            _ => {}
        }
    }
    Err(ControlError::Closed.into())
}

/// The `warmpool serve` child process.
struct Daemon {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Daemon {
    fn start(config: &Path, log: &Path) -> Result<Daemon, BenchError> {
        Daemon::start_with_env(config, log, &[])
    }

    /// Starts the daemon with `env` added to its environment.
    fn start_with_env(
        config: &Path,
        log: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Daemon, BenchError> {
        let log_file = std::fs::File::create(log)?;
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Daemon { child, log: log.to_owned() })
    }

    fn check_alive(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => {
                Err(BenchError::Daemon(format!("it exited with {status}"), tail(&self.log)))
            }
        }
    }

    /// The daemon's peak resident set, from the kernel's accounting.
    fn max_rss_kib(&self) -> u64 {
        let Some(pid) = self.child.id() else { return 0 };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Stops the daemon as systemd would, with SIGTERM, and waits for its slots to stop.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) with a pid this process spawned and has not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(120), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// The last lines of the daemon's log, for an error message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

pub mod github;
pub mod network;
pub mod service;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewritten_config_renames_the_pool_and_moves_state() {
        let text = Config::builtin_default_toml();
        let rewritten =
            rewrite_config(&text, Path::new("/var/lib/warmpool/bench-1"), Some(4)).unwrap();
        let config = Config::parse(&rewritten, Path::new("bench.toml")).unwrap();
        assert_eq!(config.state_dir, Path::new("/var/lib/warmpool/bench-1"));
        assert_eq!(config.control_socket, Path::new("/var/lib/warmpool/bench-1/control.sock"));
        assert_eq!(config.pools[0].name, "bench-reference");
        assert_eq!((config.pools[0].slots, config.pools[0].ready), (4, 4));
    }
}
