//! `warmpool bench --network NAME`: what a network costs a revert. The first pool is run twice
//! side by side in one daemon, once without a network and once on NAME, and jobs alternate
//! between the two; each job's revert is timed from the job's end, as its submitter hears it,
//! to its slot being ready again, as the daemon's status shows it. The figures are both
//! reverts and the difference of their medians.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{tail, wait_for, BenchError, BenchOptions, Daemon, Percentiles, BUILD_TIMEOUT, POLL};
use crate::config::Config;
use crate::control::{Client, Request, Response};
use crate::pool::{self, PoolStatus};
use crate::slot::SlotState;

const PLAIN: &str = "bench-plain";
const NETWORKED: &str = "bench-net";

#[derive(Debug, Serialize)]
pub struct NetworkBenchReport {
    pub network: String,
    pub slots: u32,
    pub acceleration: String,
    /// Job end to ready again, without a network.
    pub revert_plain_ms: Percentiles,
    /// Job end to ready again, with an interface on the network behind the guest filter.
    pub revert_network_ms: Percentiles,
    /// The median revert with a network less the median without.
    pub added_p50_ms: i64,
    pub jobs_ok: u64,
    pub jobs_failed: u64,
}

pub async fn run(
    options: &BenchOptions,
    network: &str,
    dir: &Path,
) -> Result<NetworkBenchReport, BenchError> {
    let text = rewrite_config(&options.config_text, dir, options.slots, network)?;
    let (config_path, config) = super::write_config(dir, &text).await?;
    let log_path = dir.join("daemon.log");
    let mut daemon = Daemon::start(&config_path, &log_path)?;
    let measured = measure(&config, &mut daemon, options.jobs).await;
    daemon.stop().await;
    let (plain, networked, jobs_ok, jobs_failed) = measured.map_err(|e| match e {
        BenchError::Daemon(message, _) => BenchError::Daemon(message, tail(&log_path)),
        other => other,
    })?;

    let pool = &config.pools[0];
    let acceleration = pool::resolve_acceleration(pool.acceleration, pool.arch);
    let (plain, networked) = (Percentiles::of(&plain), Percentiles::of(&networked));
    Ok(NetworkBenchReport {
        network: network.to_owned(),
        slots: pool.slots,
        acceleration: format!("{acceleration:?}").to_lowercase(),
        revert_plain_ms: plain,
        revert_network_ms: networked,
        added_p50_ms: networked.p50 as i64 - plain.p50 as i64,
        jobs_ok,
        jobs_failed,
    })
}

type Measured = (Vec<u64>, Vec<u64>, u64, u64);

async fn measure(
    config: &Config,
    daemon: &mut Daemon,
    jobs: usize,
) -> Result<Measured, BenchError> {
    let socket = &config.control_socket;
    wait_for(daemon, socket, BUILD_TIMEOUT, all_ready).await?;
    if let Some(refused) = refused(socket).await? {
        return Err(BenchError::Daemon(refused, String::new()));
    }
    let (mut plain, mut networked, mut ok, mut failed) = (Vec::new(), Vec::new(), 0, 0);
    for job in 0..jobs {
        // Alternating which pool goes first keeps either from always following the other.
        let order = if job % 2 == 0 { [PLAIN, NETWORKED] } else { [NETWORKED, PLAIN] };
        for pool in order {
            let (finished, revert_ms) = revert_after_job(daemon, socket, pool).await?;
            if finished {
                ok += 1
            } else {
                failed += 1
            }
            if pool == PLAIN { &mut plain } else { &mut networked }.push(revert_ms);
            tracing::info!(job, pool, revert_ms, "Benchmark job reverted");
        }
    }
    Ok((plain, networked, ok, failed))
}

fn all_ready(status: &PoolStatus) -> bool {
    status.slots.iter().all(|slot| slot.state == SlotState::Ready)
}

async fn refused(socket: &Path) -> Result<Option<String>, BenchError> {
    let Response::Status { pools } = Client::call(socket, &Request::Status).await? else {
        return Ok(None);
    };
    Ok(pools.into_iter().find_map(|pool| pool.refused.map(|why| format!("{}: {why}", pool.name))))
}

/// Runs `true` on `pool`; returns whether it finished, and the time from its end to the pool
/// being all ready again.
async fn revert_after_job(
    daemon: &mut Daemon,
    socket: &Path,
    pool: &str,
) -> Result<(bool, u64), BenchError> {
    let exec = Request::Exec { pool: Some(pool.to_owned()), argv: vec!["true".into()] };
    let mut client = Client::request(socket, &exec).await?;
    let finished = loop {
        match client.next().await? {
            Some(Response::Finished { exit_code }) => break exit_code == 0,
            Some(Response::Failed { .. }) => break false,
            Some(Response::Error { message }) => {
                return Err(BenchError::Daemon(message, String::new()))
            }
            Some(_) => {}
            None => return Err(crate::control::ControlError::Closed.into()),
        }
    };
    let ended = Instant::now();
    loop {
        daemon.check_alive()?;
        if let Response::Status { pools } = Client::call(socket, &Request::Status).await? {
            if pools.iter().filter(|status| status.name == pool).all(all_ready) {
                return Ok((finished, ended.elapsed().as_millis() as u64));
            }
        }
        if ended.elapsed() > Duration::from_secs(300) {
            return Err(BenchError::Daemon(format!("{pool} did not revert"), String::new()));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The first pool twice, without a network and on `network`, each with `slots` slots (one
/// when not given), all kept ready; state and sockets move into `dir`.
fn rewrite_config(
    text: &str,
    dir: &Path,
    slots: Option<u32>,
    network: &str,
) -> Result<String, BenchError> {
    let slots = slots.unwrap_or(1);
    let text = super::rewrite_config(text, dir, Some(slots))?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| BenchError::Rewrite(e.to_string()))?;
    let pools = table
        .get_mut("pool")
        .and_then(toml::Value::as_array_mut)
        .ok_or_else(|| BenchError::Rewrite("no [[pool]]".into()))?;
    let mut plain = pools[0].clone();
    let mut networked = pools[0].clone();
    for (pool, name, network) in [(&mut plain, PLAIN, "none"), (&mut networked, NETWORKED, network)]
    {
        let pool = pool.as_table_mut().ok_or_else(|| BenchError::Rewrite("bad [[pool]]".into()))?;
        pool.insert("name".into(), name.into());
        pool.insert("network".into(), network.into());
    }
    *pools = vec![plain, networked];
    toml::to_string(&table).map_err(|e| BenchError::Rewrite(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_pool_runs_twice_with_and_without_the_network() {
        let text = Config::builtin_default_toml();
        let rewritten =
            rewrite_config(&text, Path::new("/var/lib/warmpool/bench-1"), None, "warmpool")
                .unwrap();
        let config = Config::parse(&rewritten, Path::new("bench.toml")).unwrap();
        let pools: Vec<(&str, Option<&str>, u32)> = config
            .pools
            .iter()
            .map(|pool| (pool.name.as_str(), pool.network.as_deref(), pool.slots))
            .collect();
        assert_eq!(pools, [(PLAIN, None, 1), (NETWORKED, Some("warmpool"), 1)]);
    }
}
