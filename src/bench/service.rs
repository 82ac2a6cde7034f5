//! `warmpool bench --service`: the daemon as systemd sees it. A child `warmpool serve` reports
//! to a `NOTIFY_SOCKET` that the benchmark holds; the figures are the time from the start of
//! the process to `READY=1`, cold (every slot builds its clean snapshot) and warm (the
//! snapshots kept by the previous stop are only restored), and the time from SIGTERM to the
//! daemon's exit with no job running (the drain, then the slots' stop).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::UnixDatagram;

use super::{
    rewrite_config, tail, write_config, BenchError, BenchOptions, Daemon, Percentiles,
    BUILD_TIMEOUT,
};
use crate::pool;

/// Warm starts measured after the one cold start.
const WARM_STARTS: usize = 3;

#[derive(Debug, Serialize)]
pub struct ServiceBenchReport {
    pub pool: String,
    pub slots: u32,
    pub acceleration: String,
    /// Process start to `READY=1` with no snapshot on disk.
    pub ready_cold_ms: Percentiles,
    /// Process start to `READY=1` with the snapshots of the previous run on disk.
    pub ready_warm_ms: Percentiles,
    /// SIGTERM to exit, no job running: `STOPPING=1`, the drain, the slots' stop.
    pub stop_idle_ms: Percentiles,
}

pub async fn run(options: &BenchOptions, dir: &Path) -> Result<ServiceBenchReport, BenchError> {
    let text = rewrite_config(&options.config_text, dir, options.slots)?;
    let (config_path, config) = write_config(dir, &text).await?;
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    let log_path = dir.join("daemon.log");

    let mut ready_cold = Vec::new();
    let mut ready_warm = Vec::new();
    let mut stop_idle = Vec::new();
    for start in 0..=WARM_STARTS {
        let began = Instant::now();
        let env = [("NOTIFY_SOCKET", notify_path.as_os_str())];
        let mut daemon = Daemon::start_with_env(&config_path, &log_path, &env)?;
        let ready = wait_ready(&notify, &mut daemon).await;
        let ready_ms = began.elapsed().as_millis() as u64;
        if let Err(e) = ready {
            daemon.stop().await;
            return Err(BenchError::Daemon(e.to_string(), tail(&log_path)));
        }
        tracing::info!(start, ready_ms, "Daemon ready");
        if start == 0 { &mut ready_cold } else { &mut ready_warm }.push(ready_ms);

        let stopping = Instant::now();
        daemon.stop().await;
        stop_idle.push(stopping.elapsed().as_millis() as u64);
    }
    let pool = &config.pools[0];
    let acceleration = pool::resolve_acceleration(pool.acceleration, pool.arch);
    Ok(ServiceBenchReport {
        pool: pool.name.clone(),
        slots: pool.slots,
        acceleration: format!("{acceleration:?}").to_lowercase(),
        ready_cold_ms: Percentiles::of(&ready_cold),
        ready_warm_ms: Percentiles::of(&ready_warm),
        stop_idle_ms: Percentiles::of(&stop_idle),
    })
}

/// Reads notifications until one says `READY=1`.
async fn wait_ready(notify: &UnixDatagram, daemon: &mut Daemon) -> Result<(), BenchError> {
    let deadline = Instant::now() + BUILD_TIMEOUT;
    let mut buffer = vec![0; 4096];
    loop {
        daemon.check_alive()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let message = format!("no READY=1 within {BUILD_TIMEOUT:?}");
            return Err(BenchError::Daemon(message, String::new()));
        }
        let wait = left.min(Duration::from_millis(200));
        if let Ok(received) = tokio::time::timeout(wait, notify.recv(&mut buffer)).await {
            let message = String::from_utf8_lossy(&buffer[..received?]).into_owned();
            if message.lines().any(|line| line == "READY=1") {
                return Ok(());
            }
        }
    }
}
