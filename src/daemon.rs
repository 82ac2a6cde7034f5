//! `warmpool serve`: checks the host, clears what an earlier daemon left, starts the pools and
//! serves the control socket until told to stop.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::{info, warn};

use crate::api;
use crate::config::Config;
use crate::control::{self, Control, ControlError};
use crate::disk;
use crate::hypervisor::libvirt::Libvirt;
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::provider::github::{self, GithubProvider};
use crate::scheduler::Scheduler;
use crate::slot::SlotState;
use crate::store::{
    Actor, JobFilter, JobState, JobTransition, NewTenant, Store, StoreError, TenantKind,
    MAX_CONCURRENT_JOBS, MAX_PAGE,
};

/// The daemon's database in the state directory.
pub const DATABASE_FILE: &str = "warmpool.db";
/// The key that encrypts tenant secrets, created on first start with mode 0600.
pub const HOST_KEY_FILE: &str = "host.key";
/// The tenant that jobs sent through the control socket belong to.
pub const LOCAL_TENANT: &str = "local";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("Pool `{pool}` has no image at {path}{hint}")]
    MissingImage { pool: String, path: PathBuf, hint: &'static str },
    #[error("Pool `{pool}` names {what} {path}, which does not exist")]
    MissingFile { pool: String, what: String, path: PathBuf },
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] api::TlsError),
    #[error("Cannot listen on {address}: {source}")]
    Listen { address: std::net::SocketAddr, source: std::io::Error },
}

/// Runs the daemon until `stop` completes, then shuts every slot down.
pub async fn serve(config: Config, stop: impl Future<Output = ()>) -> Result<(), DaemonError> {
    check_files(&config)?;
    let hypervisor: Arc<dyn Hypervisor> = Arc::new(Libvirt::connect(&config.libvirt_uri).await?);
    let (store, local_tenant) = open_store(&config).await?;
    let metrics = Arc::new(Metrics::default());
    let control =
        start(&config, hypervisor, metrics.clone()).await?.with_store(store.clone(), local_tenant);
    let control = Arc::new(control);
    let scheduler = Scheduler::start(control.clone());
    let settings = github::Settings::from_config(&config.github);
    let pool_labels = control.pools().iter().map(|pool| pool.labels().to_vec()).collect();
    let provider =
        GithubProvider::start(store.clone(), scheduler, metrics.clone(), settings, pool_labels);
    control.set_github(provider);
    let listener = control::bind(&config.control_socket)?;
    info!(socket = %config.control_socket.display(), uri = %config.libvirt_uri, "Daemon serving");

    let server = tokio::spawn(control::serve(listener, control.clone()));
    let unix_api = control::bind(&config.api_socket)?;
    let unix_api = tokio::spawn(api::serve_unix(unix_api, control.clone(), store.clone()));
    let api = match config.api_listen {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| DaemonError::Listen { address, source })?;
            let task = match &config.tls {
                Some(files) => {
                    let acceptor = api::tls_acceptor(files)?;
                    info!(%address, "HTTP API serving with TLS");
                    tokio::spawn(api::serve_tls(listener, acceptor, control.clone(), store.clone()))
                }
                None => {
                    info!(%address, "HTTP API serving");
                    tokio::spawn(api::serve(listener, control.clone(), store.clone()))
                }
            };
            Some(task)
        }
        None => None,
    };
    stop.await;
    info!("Daemon stopping");
    let _ = std::fs::remove_file(&config.api_socket);
    for task in [server, unix_api].into_iter().chain(api) {
        task.abort();
        let _ = task.await;
    }
    let _ = std::fs::remove_file(&config.control_socket);
    shutdown(&control).await;
    info!("Daemon stopped");
    Ok(())
}

/// Opens the store in the state directory, with the host key beside it, records the
/// configured pools, and returns it with the id of the tenant that local jobs belong to.
pub async fn open_store(config: &Config) -> Result<(Arc<Store>, String), DaemonError> {
    disk::create_private_dir(&config.state_dir).await?;
    let database = config.state_dir.join(DATABASE_FILE);
    let key = config.state_dir.join(HOST_KEY_FILE);
    let pools: Vec<(String, u32)> =
        config.pools.iter().map(|pool| (pool.name.clone(), pool.slots)).collect();
    let opened = tokio::task::spawn_blocking(move || {
        let store = Store::open(&database, &key)?;
        // Jobs name the slot they ran on, so every slot has its row; each starts empty, as
        // the daemon rebuilds every slot at start.
        for (pool, slots) in &pools {
            store.upsert_pool(&Actor::Daemon, pool, 0)?;
            for index in 0..*slots {
                store.upsert_slot(&Actor::Daemon, pool, index, SlotState::Empty, None)?;
            }
        }
        fail_unfinished_jobs(&store)?;
        let local = local_tenant(&store)?;
        Ok::<_, StoreError>((store, local))
    })
    .await
    .map_err(|_| StoreError::Cancelled)??;
    Ok((Arc::new(opened.0), opened.1))
}

/// Jobs that were queued or running when the daemon stopped cannot be resumed: their slots are
/// rebuilt at start. They are recorded as failed, with the reason.
fn fail_unfinished_jobs(store: &Store) -> Result<(), StoreError> {
    for state in [JobState::Queued, JobState::Assigned, JobState::Started] {
        loop {
            let filter = JobFilter { state: Some(state), limit: MAX_PAGE, ..JobFilter::default() };
            let page = store.list_jobs(&filter)?;
            if page.jobs.is_empty() {
                break;
            }
            for job in page.jobs {
                let reason = "The daemon stopped before the job ended".to_owned();
                store.transition_job(&Actor::Daemon, &job.id, JobTransition::Fail { reason })?;
                warn!(job = %job.id, "Recorded a job the daemon lost as failed");
            }
        }
    }
    Ok(())
}

/// The tenant of jobs sent through the control socket, created on first start.
pub(crate) fn local_tenant(store: &Store) -> Result<String, StoreError> {
    if let Some(tenant) = store.list_tenants()?.into_iter().find(|t| t.name == LOCAL_TENANT) {
        return Ok(tenant.id);
    }
    let new = NewTenant {
        name: LOCAL_TENANT.into(),
        kind: TenantKind::Local,
        settings: serde_json::json!({}),
        weight: 1,
        max_concurrent_jobs: MAX_CONCURRENT_JOBS,
    };
    Ok(store.create_tenant(&Actor::Daemon, new)?.id)
}

/// Clears leftovers of earlier runs and starts every pool.
pub async fn start(
    config: &Config,
    hypervisor: Arc<dyn Hypervisor>,
    metrics: Arc<Metrics>,
) -> Result<Control, DaemonError> {
    disk::create_private_dir(&config.state_dir).await?;
    let mut pools = Vec::with_capacity(config.pools.len());
    for pool in &config.pools {
        clear_leftovers(&*hypervisor, config, &pool.name).await?;
        pools.push(Pool::start(pool, &config.state_dir, hypervisor.clone(), metrics.clone()));
    }
    Ok(Control::new(pools, metrics))
}

/// Shuts every pool down: queued jobs fail, running jobs end, slots are removed. Connections
/// still open hear of their jobs' end and close.
pub async fn shutdown(control: &Control) {
    for pool in control.pools() {
        pool.shutdown().await;
    }
    if let Some(github) = control.github() {
        github.shutdown(RUNNER_DELETION_TIMEOUT).await;
    }
}

/// How long a stopping daemon waits for its GitHub runners to be deleted; what is left then,
/// the reconciler deletes after the next start.
const RUNNER_DELETION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A daemon that was killed leaves domains and files behind; they carry this pool's mark and
/// live in its directory, and nothing else is touched.
async fn clear_leftovers(
    hypervisor: &dyn Hypervisor,
    config: &Config,
    pool: &str,
) -> Result<(), DaemonError> {
    for domain in hypervisor.list_marked(pool).await? {
        warn!(pool, domain = %domain, "Destroying a domain left by an earlier run");
        hypervisor.destroy(&domain).await?;
    }
    let dir = config.state_dir.join("pools").join(pool);
    if dir.exists() {
        warn!(pool, dir = %dir.display(), "Removing slot files left by an earlier run");
        disk::remove_tree(&dir).await?;
    }
    Ok(())
}

fn check_files(config: &Config) -> Result<(), DaemonError> {
    for pool in &config.pools {
        if !pool.image.exists() {
            let hint = if pool.image.starts_with(crate::config::DEFAULT_IMAGES_DIR) {
                ": build it with scripts/build-reference-guest"
            } else {
                ""
            };
            return Err(DaemonError::MissingImage {
                pool: pool.name.clone(),
                path: pool.image.clone(),
                hint,
            });
        }
        let files = pool
            .template_vars
            .iter()
            .filter(|(name, _)| matches!(name.as_str(), "kernel" | "initrd"));
        let files = files.map(|(name, value)| (name.clone(), PathBuf::from(value)));
        let nvram =
            pool.nvram_template.iter().map(|path| ("nvram_template".to_owned(), path.clone()));
        for (what, path) in files.chain(nvram) {
            if !path.exists() {
                return Err(DaemonError::MissingFile { pool: pool.name.clone(), what, path });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewJob;

    #[test]
    fn jobs_a_stopped_daemon_lost_are_recorded_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), &dir.path().join("key")).unwrap();
        store.upsert_pool(&Actor::Daemon, "p", 0).unwrap();
        store.upsert_slot(&Actor::Daemon, "p", 0, SlotState::Empty, None).unwrap();
        let tenant = local_tenant(&store).unwrap();
        assert_eq!(local_tenant(&store).unwrap(), tenant, "the local tenant is made once");
        for id in ["queued", "running", "done"] {
            let new = NewJob { id: id.into(), tenant_id: tenant.clone(), pool: "p".into() };
            store.record_job(&Actor::LocalRoot, new).unwrap();
        }
        for transition in [JobTransition::Assign { slot_index: 0 }, JobTransition::Start] {
            store.transition_job(&Actor::Daemon, "running", transition.clone()).unwrap();
            store.transition_job(&Actor::Daemon, "done", transition).unwrap();
        }
        store
            .transition_job(&Actor::Daemon, "done", JobTransition::Finish { exit_code: 0 })
            .unwrap();

        fail_unfinished_jobs(&store).unwrap();
        for id in ["queued", "running"] {
            let job = store.get_job(id).unwrap();
            assert_eq!(job.state, JobState::Failed, "{id}");
            assert_eq!(job.failure.as_deref(), Some("The daemon stopped before the job ended"));
        }
        assert_eq!(store.get_job("done").unwrap().state, JobState::Finished);
    }
}
