//! `warmpool serve`: checks the host, clears what an earlier daemon left, starts the pools and
//! serves the control socket until told to stop.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::api;
use crate::config::{Config, PoolConfig};
use crate::control::{self, Control, ControlError};
use crate::disk;
use crate::hypervisor::libvirt::Libvirt;
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::metrics::Metrics;
use crate::network::{self, NetworkError};
use crate::pool::{Pool, PoolStatus};
use crate::provider::github::{self, AdoptedRunner, GithubProvider};
use crate::scheduler::{Scheduler, Share};
use crate::service::{self, Notifier, ShutdownInhibitor};
use crate::slot::{Adoption, JobEvent, SlotState};
use crate::store::{
    Actor, JobFilter, JobRecord, JobState, JobTransition, NewTenant, Store, StoreError, TenantKind,
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

/// Runs the daemon until `stop` completes or logind announces a shutdown, then drains (no new
/// jobs; running ones get `drain_grace_secs`) and shuts every slot down.
///
/// systemd hears of it through `sd_notify`: `READY=1` once every pool is built, `STATUS=` and
/// `WATCHDOG=1` while the pools answer, `STOPPING=1` when the drain begins.
pub async fn serve(config: Config, stop: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let began = std::time::Instant::now();
    let notifier = Arc::new(Notifier::from_env());
    check_files(&config)?;
    let hypervisor: Arc<dyn Hypervisor> = Arc::new(Libvirt::connect(&config.libvirt_uri).await?);
    let (store, local_tenant) = open_store(&config).await?;
    let in_flight = recoverable_jobs(&config, &store).await?;
    let metrics = Arc::new(Metrics::default());
    let (adoptions, adopted) = adoptions(in_flight);
    let control = start_recovering(&config, hypervisor, metrics.clone(), adoptions)
        .await?
        .with_store(store.clone(), local_tenant);
    let mut runners = Vec::new();
    for (job, events) in adopted {
        match job.github {
            Some(runner) => runners.push((runner, events)),
            None => control.track_adopted(job.id, job.pool, job.tenant_id, events),
        }
    }
    let control = Arc::new(control);
    let scheduler = Scheduler::start(control.clone());
    let settings = github::Settings::from_config(&config.github);
    let pool_labels = control.pools().iter().map(|pool| pool.labels().to_vec()).collect();
    let provider = GithubProvider::start_adopting(
        store.clone(),
        scheduler,
        metrics.clone(),
        settings,
        pool_labels,
        runners,
    );
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
    let ready = tokio::spawn(announce_ready(control.clone(), notifier.clone(), began));
    let watchdog = tokio::spawn(keep_systemd_informed(control.clone(), notifier.clone()));
    let mut inhibitor = take_inhibitor().await;
    {
        let announced = async {
            match inhibitor.as_mut() {
                Some(inhibitor) => inhibitor.shutdown_announced().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop => {}
            _ = announced => {}
        }
    }
    info!("Daemon stopping");
    notifier.stopping();
    ready.abort();
    drain(&control, Duration::from_secs(config.drain_grace_secs), &notifier).await;
    watchdog.abort();
    let _ = std::fs::remove_file(&config.api_socket);
    for task in [server, unix_api].into_iter().chain(api) {
        task.abort();
        let _ = task.await;
    }
    let _ = std::fs::remove_file(&config.control_socket);
    shutdown(&control).await;
    if let Some(inhibitor) = inhibitor.as_mut() {
        inhibitor.release();
    }
    info!("Daemon stopped");
    Ok(())
}

/// How long the daemon waits for logind before it serves without a shutdown inhibitor.
const INHIBITOR_TIMEOUT: Duration = Duration::from_secs(5);
/// How often systemd's status line is refreshed when no watchdog asks for more.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

async fn take_inhibitor() -> Option<ShutdownInhibitor> {
    match tokio::time::timeout(INHIBITOR_TIMEOUT, ShutdownInhibitor::take()).await {
        Ok(Ok(inhibitor)) => Some(inhibitor),
        Ok(Err(e)) => {
            info!(error = %e, "No logind shutdown inhibitor; SIGTERM alone stops the daemon");
            None
        }
        Err(_) => {
            warn!("logind did not answer; serving without a shutdown inhibitor");
            None
        }
    }
}

/// Says `READY=1` once every pool has built its slots.
async fn announce_ready(control: Arc<Control>, notifier: Arc<Notifier>, began: std::time::Instant) {
    for pool in control.pools() {
        pool.built().await;
    }
    notifier.ready();
    info!(ms = began.elapsed().as_millis() as u64, "Daemon ready: every pool is built");
}

/// Refreshes systemd's status line and pets its watchdog, as long as every pool's task
/// answers: a pool that no longer answers stops the petting, and systemd restarts the daemon.
async fn keep_systemd_informed(control: Arc<Control>, notifier: Arc<Notifier>) {
    let watchdog = service::watchdog_interval();
    let mut tick = tokio::time::interval(watchdog.unwrap_or(STATUS_INTERVAL).min(STATUS_INTERVAL));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let answer = tokio::time::timeout(HEALTH_TIMEOUT, control.status()).await;
        match answer {
            Ok(pools) if pools.len() == control.pools().len() => {
                notifier.status(&status_line(&pools, control.is_draining()));
                if watchdog.is_some() {
                    notifier.watchdog();
                }
            }
            _ => warn!("A pool did not answer; the watchdog is not petted"),
        }
    }
}

/// A pool task that takes longer than this to answer is stuck.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Slots by state and jobs, for `systemctl status`: "3 ready, 1 running of 4 slots; 1 job
/// running, 0 queued".
pub fn status_line(pools: &[PoolStatus], draining: bool) -> String {
    let slots: Vec<&crate::pool::SlotStatus> = pools.iter().flat_map(|p| &p.slots).collect();
    let states: Vec<String> = SlotState::ALL
        .into_iter()
        .filter_map(|state| {
            let count = slots.iter().filter(|slot| slot.state == state).count();
            (count > 0).then(|| format!("{count} {}", state.as_str()))
        })
        .collect();
    let running = slots.iter().filter(|slot| slot.state == SlotState::Running).count();
    let queued: usize = pools.iter().map(|pool| pool.queued).sum();
    let draining = if draining { "draining; " } else { "" };
    format!(
        "{draining}{} of {} slots; {running} jobs running, {queued} queued",
        states.join(", "),
        slots.len()
    )
}

/// Takes no new jobs and waits, up to `grace`, for the jobs queued and running to end.
async fn drain(control: &Control, grace: Duration, notifier: &Notifier) {
    control.drain();
    let began = std::time::Instant::now();
    loop {
        let pools = control.status().await;
        let running: usize = pools.iter().map(|pool| pool.count(SlotState::Running)).sum();
        let queued: usize = pools.iter().map(|pool| pool.queued).sum();
        if running + queued == 0 {
            info!(ms = began.elapsed().as_millis() as u64, "Drained: no job left");
            return;
        }
        if began.elapsed() >= grace {
            warn!(running, queued, grace_secs = grace.as_secs(), "Drain grace over; ending jobs");
            return;
        }
        notifier.status(&status_line(&pools, true));
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

const DRAIN_POLL: Duration = Duration::from_millis(100);

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
        // Jobs name the slot they ran on, so every slot has its row; each starts empty, and
        // its task reports what it makes of what an earlier run left.
        for (pool, slots) in &pools {
            store.upsert_pool(&Actor::Daemon, pool, 0)?;
            for index in 0..*slots {
                store.upsert_slot(&Actor::Daemon, pool, index, SlotState::Empty, None)?;
            }
        }
        let local = local_tenant(&store)?;
        Ok::<_, StoreError>((store, local))
    })
    .await
    .map_err(|_| StoreError::Cancelled)??;
    Ok((Arc::new(opened.0), opened.1))
}

/// A local job that an earlier run started and that its slot may take back.
#[derive(Debug, Clone, PartialEq)]
pub struct InFlight {
    pub id: String,
    pub tenant_id: String,
    pub pool: String,
    pub slot_index: usize,
    pub time_left: Duration,
    /// For a GitHub job, the runner the provider follows it by.
    pub github: Option<AdoptedRunner>,
}

/// Sorts the jobs an earlier run left unfinished. A job that its guest had started, on a slot
/// the configuration still has, with time left, may be adopted: a local one, or a GitHub one
/// whose record names its runner, which the provider then follows and deletes at the end.
/// Every other one is recorded as failed, with the reason: a job not yet started was only
/// ever in this daemon's memory, and the reconciler deletes a runner that no job owns.
pub fn sort_unfinished_jobs(
    store: &Store,
    config: &Config,
    now_ms: i64,
) -> Result<Vec<InFlight>, StoreError> {
    let mut adoptable = Vec::new();
    for state in [JobState::Queued, JobState::Assigned, JobState::Started] {
        let mut after = None;
        loop {
            let filter =
                JobFilter { state: Some(state), limit: MAX_PAGE, after, ..JobFilter::default() };
            let page = store.list_jobs(&filter)?;
            for job in page.jobs {
                match in_flight(store, config, &job, now_ms) {
                    Ok(job) => adoptable.push(job),
                    Err(reason) => {
                        warn!(job = %job.id, error = %reason, "Recorded a job the daemon lost as failed");
                        let reason = reason.to_owned();
                        store.transition_job(
                            &Actor::Daemon,
                            &job.id,
                            JobTransition::Fail { reason },
                        )?;
                    }
                }
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    Ok(adoptable)
}

/// Whether `job` may be adopted, or why not.
fn in_flight(
    store: &Store,
    config: &Config,
    job: &JobRecord,
    now_ms: i64,
) -> Result<InFlight, &'static str> {
    let (Some(slot_index), Some(started_at_ms)) = (job.slot_index, job.started_at_ms) else {
        return Err("The daemon stopped before the job started");
    };
    if job.state != JobState::Started {
        return Err("The daemon stopped while the job ran");
    }
    let github = match store.get_tenant(&job.tenant_id) {
        Ok(tenant) if tenant.kind == TenantKind::Local => None,
        Ok(tenant) if tenant.kind == TenantKind::Github => {
            let share =
                Share { weight: tenant.weight, max_concurrent_jobs: tenant.max_concurrent_jobs };
            let detail = job.detail.clone().unwrap_or_default();
            let runner = AdoptedRunner::from_detail(&job.id, &tenant.id, share, &detail);
            Some(
                runner.ok_or(
                    "The daemon stopped while the job ran, and its record names no runner",
                )?,
            )
        }
        _ => return Err("The daemon stopped while the job ran"),
    };
    let Some(pool) = config.pools.iter().find(|pool| pool.name == job.pool) else {
        return Err("The daemon restarted without the job's pool");
    };
    if slot_index >= pool.slots {
        return Err("The daemon restarted without the job's slot");
    }
    let ran = Duration::from_millis(now_ms.saturating_sub(started_at_ms).max(0) as u64);
    let Some(time_left) = Duration::from_secs(pool.max_job_secs).checked_sub(ran) else {
        return Err("The job outlived its maximum duration while the daemon was stopped");
    };
    Ok(InFlight {
        id: job.id.clone(),
        tenant_id: job.tenant_id.clone(),
        pool: job.pool.clone(),
        slot_index: slot_index as usize,
        time_left,
        github,
    })
}

async fn recoverable_jobs(
    config: &Config,
    store: &Arc<Store>,
) -> Result<Vec<InFlight>, DaemonError> {
    let config = config.clone();
    let now_ms = chrono::Utc::now().timestamp_millis();
    Ok(store.call(move |store| sort_unfinished_jobs(store, &config, now_ms)).await?)
}

/// The jobs for slots to take back, by pool and slot index.
pub type Adoptions = BTreeMap<String, BTreeMap<usize, Adoption>>;

/// Each adoptable job as its slot's adoption, and as the record and event channel that the
/// daemon follows it by.
fn adoptions(in_flight: Vec<InFlight>) -> (Adoptions, Vec<(InFlight, mpsc::Receiver<JobEvent>)>) {
    let mut adoptions = Adoptions::new();
    let mut adopted = Vec::new();
    for job in in_flight {
        let (events, events_rx) = mpsc::channel(control::JOB_EVENTS);
        let adoption = Adoption { job: job.id.clone(), events, time_left: job.time_left };
        adoptions.entry(job.pool.clone()).or_default().insert(job.slot_index, adoption);
        adopted.push((job, events_rx));
    }
    (adoptions, adopted)
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

/// Clears what earlier runs left that belongs to no slot, and starts every pool.
pub async fn start(
    config: &Config,
    hypervisor: Arc<dyn Hypervisor>,
    metrics: Arc<Metrics>,
) -> Result<Control, DaemonError> {
    start_recovering(config, hypervisor, metrics, BTreeMap::new()).await
}

/// As [`start`], with jobs of an earlier run for their slots to take back, by pool.
pub async fn start_recovering(
    config: &Config,
    hypervisor: Arc<dyn Hypervisor>,
    metrics: Arc<Metrics>,
    mut adoptions: Adoptions,
) -> Result<Control, DaemonError> {
    disk::create_private_dir(&config.state_dir).await?;
    clear_leftovers(&*hypervisor, config).await?;
    let mut networks = network::prepare(&*hypervisor, config).await;
    let mut pools = Vec::with_capacity(config.pools.len());
    for pool in &config.pools {
        let adoptions = adoptions.remove(&pool.name).unwrap_or_default();
        let network = match networks.remove(&pool.name) {
            None => None,
            Some(Ok(network)) => Some(network),
            Some(Err(e)) => {
                pools.push(refuse(&*hypervisor, config, pool, &e, adoptions).await);
                continue;
            }
        };
        let (state_dir, hypervisor, metrics) =
            (&config.state_dir, hypervisor.clone(), metrics.clone());
        pools.push(Pool::start_adopting(pool, state_dir, hypervisor, metrics, adoptions, network));
    }
    Ok(Control::new(pools, metrics))
}

/// A pool whose network failed its check is not served: a guest on it might reach what it
/// must not. Its running domains are stopped and its jobs fail; its clean snapshots stay on
/// disk for when the network is fixed and the daemon restarted.
async fn refuse(
    hypervisor: &dyn Hypervisor,
    config: &Config,
    pool: &PoolConfig,
    e: &NetworkError,
    adoptions: BTreeMap<usize, Adoption>,
) -> Pool {
    error!(pool = %pool.name, error = %e, "Pool not served: its network failed the check");
    let reason = e.to_string();
    for adoption in adoptions.into_values() {
        let reason = format!("The daemon refused the job's pool at its start: {reason}");
        let _ = adoption.events.try_send(JobEvent::Failed { reason });
    }
    match hypervisor.list_marked(&pool.name).await {
        Ok(domains) => {
            for domain in domains {
                if let Err(e) = hypervisor.destroy(&domain).await {
                    warn!(domain, error = %e, "Cannot stop a domain of a refused pool");
                }
            }
        }
        Err(e) => warn!(pool = %pool.name, error = %e, "Cannot list a refused pool's domains"),
    }
    Pool::refuse(pool, &config.state_dir, reason)
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

/// Removes what earlier runs left that belongs to no configured slot: domains that carry this
/// daemon's mark for a pool or slot it no longer has, and such slots' directories and TPM
/// state. A configured slot's own domain and files are left to the slot, which adopts, keeps
/// or rebuilds them. Domains marked by another daemon (another state directory) are never
/// touched; a mark without an owner, from an older warmpool, is taken as this daemon's when it
/// names a configured pool.
async fn clear_leftovers(hypervisor: &dyn Hypervisor, config: &Config) -> Result<(), DaemonError> {
    let owner = config.state_dir.display().to_string();
    let slots_of = |pool: &str| config.pools.iter().find(|p| p.name == pool).map(|p| p.slots);
    for mark in hypervisor.marked_domains().await? {
        let ours = match &mark.owner {
            Some(marked) => *marked == owner,
            None => slots_of(&mark.pool).is_some(),
        };
        let configured = match (slots_of(&mark.pool), mark.slot) {
            (Some(slots), Some(slot)) => slot < slots as usize,
            _ => false,
        };
        if ours && !configured {
            warn!(pool = %mark.pool, domain = %mark.domain, "Destroying a domain of no configured slot");
            hypervisor.destroy(&mark.domain).await?;
        }
    }
    let pools_dir = config.state_dir.join("pools");
    for (pool, dir) in subdirectories(&pools_dir).await? {
        let Some(slots) = slots_of(&pool) else {
            warn!(pool, dir = %dir.display(), "Removing the files of a pool no longer configured");
            remove_slot_dirs(&pool, &dir, 0).await?;
            disk::remove_tree(&dir).await?;
            continue;
        };
        remove_slot_dirs(&pool, &dir, slots).await?;
    }
    Ok(())
}

/// Removes the slot directories in a pool's directory from slot `keep` on, and anything else
/// in it that is no slot's, with the TPM state libvirt keeps for those slots.
async fn remove_slot_dirs(pool: &str, dir: &Path, keep: u32) -> Result<(), DaemonError> {
    for (name, path) in subdirectories(dir).await? {
        let index = name.parse::<u32>().ok();
        if index.is_some_and(|index| index < keep) {
            continue;
        }
        warn!(pool, dir = %path.display(), "Removing the files of a slot no longer configured");
        disk::remove_tree(&path).await?;
        if let Some(index) = index {
            let uuid = crate::slot::domain_uuid(&crate::slot::domain_name(pool, index as usize));
            disk::remove_tree(&Path::new(crate::slot::SWTPM_STATE_ROOT).join(uuid.to_string()))
                .await?;
        }
    }
    Ok(())
}

/// The directories in `dir` by name; none when `dir` does not exist.
async fn subdirectories(dir: &Path) -> Result<Vec<(String, PathBuf)>, DaemonError> {
    let read_error =
        |source| disk::DiskError::File { operation: "Read", path: dir.to_owned(), source };
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_error(e).into()),
    };
    let mut found = Vec::new();
    while let Some(entry) = entries.next_entry().await.map_err(read_error)? {
        if entry.file_type().await.map_err(read_error)?.is_dir() {
            found.push((entry.file_name().to_string_lossy().into_owned(), entry.path()));
        }
    }
    Ok(found)
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
    fn started_local_jobs_may_be_adopted_and_every_other_lost_job_fails_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), &dir.path().join("key")).unwrap();
        let pool = r#"
            [[pool]]
            name = "p"
            image = "/i.qcow2"
            arch = "x86_64"
            vcpus = 1
            memory_mib = 256
            slots = 2
            max_job_secs = 100
            [pool.template_vars]
            kernel = "/vmlinuz"
            initrd = "/initrd.img"
        "#;
        let config = Config::parse(pool, Path::new("test")).unwrap();
        store.upsert_pool(&Actor::Daemon, "p", 0).unwrap();
        for index in 0..3 {
            store.upsert_slot(&Actor::Daemon, "p", index, SlotState::Empty, None).unwrap();
        }
        let tenant = local_tenant(&store).unwrap();
        assert_eq!(local_tenant(&store).unwrap(), tenant, "the local tenant is made once");
        let github = NewTenant {
            name: "acme".into(),
            kind: TenantKind::Github,
            settings: serde_json::json!({"owner": "acme"}),
            weight: 1,
            max_concurrent_jobs: 4,
        };
        let github = store.create_tenant(&Actor::Daemon, github).unwrap().id;
        let jobs = [
            ("queued", &tenant, None),
            ("running", &tenant, Some(1)),
            ("beyond-slots", &tenant, Some(2)),
            ("runner", &github, Some(0)),
            ("named-runner", &github, Some(0)),
            ("done", &tenant, Some(0)),
        ];
        for (id, tenant, slot) in jobs {
            let new = NewJob { id: id.into(), tenant_id: tenant.clone(), pool: "p".into() };
            store.record_job(&Actor::LocalRoot, new).unwrap();
            if let Some(slot_index) = slot {
                let assign = JobTransition::Assign { slot_index };
                store.transition_job(&Actor::Daemon, id, assign).unwrap();
                store.transition_job(&Actor::Daemon, id, JobTransition::Start).unwrap();
            }
        }
        store
            .transition_job(&Actor::Daemon, "done", JobTransition::Finish { exit_code: 0 })
            .unwrap();
        let detail = serde_json::json!({
            "github_job_id": 7, "run_id": 3, "repository": "acme/app",
            "runner_name": "warmpool-h-p-0-7", "status": "in_progress",
        });
        store.set_job_detail(&Actor::Daemon, "named-runner", detail).unwrap();
        let started = store.get_job("running").unwrap().started_at_ms.unwrap();

        let adoptable = sort_unfinished_jobs(&store, &config, started + 40_000).unwrap();
        let mut ids: Vec<&str> = adoptable.iter().map(|job| job.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["named-runner", "running"], "{adoptable:?}");
        let job = |id: &str| adoptable.iter().find(|job| job.id == id).unwrap();
        assert_eq!(job("running").slot_index, 1);
        assert_eq!(job("running").time_left, Duration::from_secs(60));
        assert_eq!(job("running").github, None);
        let runner = job("named-runner").github.as_ref().expect("a GitHub job's runner");
        assert_eq!((runner.runner_name.as_str(), runner.job_id), ("warmpool-h-p-0-7", 7));
        assert_eq!((runner.owner.as_str(), runner.repo.as_str()), ("acme", "app"));
        assert_eq!((runner.status.as_str(), runner.share.max_concurrent_jobs), ("in_progress", 4));
        assert_eq!(store.get_job("running").unwrap().state, JobState::Started);
        for (id, reason) in [
            ("queued", "The daemon stopped before the job started"),
            ("beyond-slots", "The daemon restarted without the job's slot"),
            ("runner", "The daemon stopped while the job ran, and its record names no runner"),
        ] {
            let job = store.get_job(id).unwrap();
            assert_eq!(job.state, JobState::Failed, "{id}");
            assert_eq!(job.failure.as_deref(), Some(reason), "{id}");
        }
        assert_eq!(store.get_job("done").unwrap().state, JobState::Finished);

        // Past its maximum, the job that ran is failed too.
        let adoptable = sort_unfinished_jobs(&store, &config, started + 200_000).unwrap();
        assert!(adoptable.is_empty());
        let failure = store.get_job("running").unwrap().failure.unwrap();
        assert!(failure.contains("outlived its maximum"), "{failure}");
    }
}
