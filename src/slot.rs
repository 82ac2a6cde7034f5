//! The slot: one libvirt domain of a pool, reused job after job, and the task that owns it.
//!
//! ```text
//!          build               restore            assign               finished, powered off,
//! Empty ─────────> Saved ─────────────> Ready ─────────> Running ───── timeout, port error ──┐
//!   │ │              ^  <─┐                                 ^                               │
//!   │ │              │    └── Restoring (restore failed) ──┐│ adopt                         │
//!   │ │              └───────────────────────────── Reverting <─────────────────────────────┘
//!   │ └────────────────────────── snapshot kept ───────^ │ │ failed twice
//!   │ └──────────────────────────────────────────────────┼─┘
//!   └─────── Rebuilding <──────── Quarantined <──────────┘ (or the build failed)
//! ```
//!
//! A slot starts `Empty` and picks up what an earlier run of the daemon left in its directory
//! ([`Slot::run`]): a job still running in a healthy guest is adopted (`Empty → Running`), a
//! clean snapshot built from the same image and domain description is kept and only reverted
//! to (`Empty → Reverting`), and anything else is thrown away and built afresh. A build writes
//! the snapshot's manifest (`snapshot.json`) last, so a build cut short leaves no snapshot that
//! a later start would trust.
//!
//! Concurrency: each slot is one tokio task ([`Slot::run`]) that owns the slot's state, its files
//! and its domain. Nothing else touches them. The pool talks to it through a command queue
//! ([`SlotCommand`]) and hears back every state change ([`SlotReport`]); a job hears of its
//! progress through its own event channel ([`JobEvent`]).
//!
//! A clean snapshot is three things in the slot's directory: the frozen clean overlay, the
//! memory image, and (when the template has them) copies of the firmware variables and TPM
//! state. Reverting destroys the domain, replaces the job overlay with an empty one, puts the
//! firmware variables and TPM state back, and leaves the slot `Saved`; the pool then decides
//! whether to restore it into memory (`Ready`) or keep it on disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::disk::{self, DiskError};
use crate::guest::{GuestMessage, JobMessage, JobPort, PortError, Run};
use crate::hypervisor::libvirt::METADATA_NAMESPACE;
use crate::hypervisor::{DomainState, Hypervisor, HypervisorError};
use crate::metrics::{Metrics, Series};
use crate::network::{self, GuestNetwork};
use crate::template::{Template, TemplateError};

/// How long a resumed guest may take to answer a job with `started`. The reference guest under
/// TCG answers in tens of milliseconds; a guest silent this long is broken.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// A slot whose revert or restore fails this many times in a row is quarantined.
pub const MAX_FAILURES: u32 = 2;
/// The first wait before a quarantined slot is rebuilt; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(30);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30 * 60);
/// The name of the virtio-serial channel the guest agent opens.
pub const JOB_PORT_NAME: &str = "org.warmpool.job.0";
/// Where libvirt keeps the state of emulated TPMs, one directory per domain UUID.
pub const SWTPM_STATE_ROOT: &str = "/var/lib/libvirt/swtpm";

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// Nothing on disk, no domain.
    Empty,
    /// Booting a fresh guest to take its clean snapshot.
    Building,
    /// The clean snapshot is on disk; no domain runs.
    Saved,
    /// Restoring the clean snapshot into a paused domain.
    Restoring,
    /// Restored and paused, job port connected: assignment is a message and a resume.
    Ready,
    /// A job runs in the guest.
    Running,
    /// Throwing away what the job or a failed restore left.
    Reverting,
    /// Failed too often; waits before it is rebuilt.
    Quarantined,
    /// Throwing away the clean snapshot to build a new one.
    Rebuilding,
}

impl SlotState {
    pub const ALL: [SlotState; 9] = [
        SlotState::Empty,
        SlotState::Building,
        SlotState::Saved,
        SlotState::Restoring,
        SlotState::Ready,
        SlotState::Running,
        SlotState::Reverting,
        SlotState::Quarantined,
        SlotState::Rebuilding,
    ];

    /// The transition table: whether a slot may go from `self` to `to`.
    pub fn can_become(self, to: SlotState) -> bool {
        use SlotState::*;
        matches!(
            (self, to),
            (Empty, Building)
                | (Empty, Reverting)
                | (Empty, Running)
                | (Building, Saved)
                | (Building, Quarantined)
                | (Saved, Restoring)
                | (Restoring, Ready)
                | (Restoring, Reverting)
                | (Ready, Running)
                | (Ready, Reverting)
                | (Running, Reverting)
                | (Reverting, Saved)
                | (Reverting, Quarantined)
                | (Quarantined, Rebuilding)
                | (Rebuilding, Empty)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Empty => "empty",
            SlotState::Building => "building",
            SlotState::Saved => "saved",
            SlotState::Restoring => "restoring",
            SlotState::Ready => "ready",
            SlotState::Running => "running",
            SlotState::Reverting => "reverting",
            SlotState::Quarantined => "quarantined",
            SlotState::Rebuilding => "rebuilding",
        }
    }
}

impl std::fmt::Display for SlotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Port(#[from] PortError),
    #[error("The guest did not say `ready` within {secs} s (console log: {console})")]
    NeverReady { secs: u64, console: String },
    #[error("The guest stopped before it said `ready` (console log: {console})")]
    StoppedBeforeReady { console: String },
    #[error("The saved domain XML does not name the clean overlay {0}")]
    SavedXml(String),
    #[error("The guest may not start: {0}")]
    Network(String),
}

/// Why a job ended without the guest reporting `finished`.
#[derive(Debug, thiserror::Error)]
pub enum JobFailure {
    #[error("The job outlived its maximum duration of {secs} s")]
    Timeout { secs: u64 },
    #[error("The guest did not start the job within {secs} s")]
    NoStart { secs: u64 },
    #[error("The guest stopped before it reported the job finished")]
    GuestStopped,
    #[error("The job port failed: {0}")]
    Port(PortError),
    #[error("The hypervisor failed: {0}")]
    Hypervisor(#[from] HypervisorError),
    #[error("The client that submitted the job went away")]
    Cancelled,
    #[error("The slot was not ready")]
    NotReady,
    #[error("The daemon is shutting down")]
    Stopping,
}

/// A job on its way to a slot.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub run: Run,
    pub events: mpsc::Sender<JobEvent>,
    pub arrived: Instant,
}

impl Job {
    pub fn new(id: String, run: Run, events: mpsc::Sender<JobEvent>) -> Job {
        Job { id, run, events, arrived: Instant::now() }
    }

    /// Ends a job that never reached a guest.
    pub fn fail(self, reason: impl std::fmt::Display) {
        let _ = self.events.try_send(JobEvent::Failed { reason: reason.to_string() });
    }
}

/// What a job's submitter hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    Started { slot: String, index: usize },
    Log { line: String },
    Finished { exit_code: i32 },
    Failed { reason: String },
}

#[derive(Debug)]
pub enum SlotCommand {
    /// Run this job; only sent to a `Ready` slot.
    Assign(Job),
    /// Restore the clean snapshot into memory; only sent to a `Saved` slot.
    Restore,
    /// Destroy the domain, remove the slot's files and end the task.
    Shutdown,
}

/// Why a slot's task woke up.
enum Wake {
    Command(Option<SlotCommand>),
    /// The slot changed state on its own (a dead guest reverted, a quarantine ended).
    Changed,
}

/// What a slot tells its pool.
#[derive(Debug)]
pub enum SlotReport {
    /// The slot changed state; `error` says why it is quarantined.
    State { index: usize, state: SlotState, error: Option<String> },
    /// A job assigned to a slot that stopped being ready before the job reached it.
    Returned { index: usize, job: Job },
}

/// What a pool's slots share: the machine shape, the template and its fixed values.
pub struct SlotSpec {
    pub pool: String,
    pub image: PathBuf,
    pub template: Template,
    /// Values for the template that are the same for every slot of the pool.
    pub values: BTreeMap<String, String>,
    pub nvram_template: Option<PathBuf>,
    pub boot_timeout: Duration,
    pub max_job: Duration,
    /// Whether the domain has an emulated TPM whose state must be kept with the snapshot.
    pub tpm: bool,
    /// Where the pool's slot directories live.
    pub dir: PathBuf,
    /// The daemon's state directory, named in every domain's mark so that a daemon tells its
    /// own domains from those of another daemon on the same libvirt.
    pub owner: String,
    /// The first quarantine's length; each one after it doubles, up to [`MAX_BACKOFF`].
    pub first_backoff: Duration,
    /// The checked network of the slots' interfaces, when the pool has one.
    pub network: Option<Arc<GuestNetwork>>,
}

/// The files of one slot.
#[derive(Debug, Clone)]
pub struct SlotPaths {
    pub dir: PathBuf,
    pub clean_disk: PathBuf,
    pub job_disk: PathBuf,
    pub memory: PathBuf,
    pub restore_xml: PathBuf,
    pub job_port: PathBuf,
    pub console_log: PathBuf,
    pub nvram: PathBuf,
    pub clean_nvram: PathBuf,
    pub clean_tpm: PathBuf,
    /// What the clean snapshot was built from, written last by a build.
    pub manifest: PathBuf,
}

impl SlotPaths {
    pub fn new(dir: PathBuf) -> SlotPaths {
        SlotPaths {
            clean_disk: dir.join("clean.qcow2"),
            job_disk: dir.join("job.qcow2"),
            memory: dir.join("memory.save"),
            restore_xml: dir.join("restore.xml"),
            job_port: dir.join("job.sock"),
            console_log: dir.join("console.log"),
            nvram: dir.join("nvram.fd"),
            clean_nvram: dir.join("clean-nvram.fd"),
            clean_tpm: dir.join("clean-tpm"),
            manifest: dir.join("snapshot.json"),
            dir,
        }
    }
}

/// A job that an earlier run of the daemon started on a slot, to be taken back if its guest
/// still runs it.
#[derive(Debug)]
pub struct Adoption {
    pub job: String,
    /// Where the job's events go, as [`Job::events`].
    pub events: mpsc::Sender<JobEvent>,
    /// What is left of the job's `max_job_secs`, counted from when the guest started it.
    pub time_left: Duration,
}

/// What a clean snapshot was built from. A slot keeps a snapshot across restarts of the daemon
/// only while its manifest equals the one the slot would write now: a new image, or a changed
/// template or machine shape, makes it stale.
#[derive(Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
struct SnapshotManifest {
    format: u32,
    image: PathBuf,
    image_len: u64,
    image_modified_ns: u128,
    /// SHA-256 of the domain XML the snapshot's guest booted with.
    domain_sha256: String,
}

/// Bumped whenever what a snapshot holds changes meaning.
const SNAPSHOT_FORMAT: u32 = 1;

/// The domain name of slot `index` of `pool`.
pub fn domain_name(pool: &str, index: usize) -> String {
    format!("warmpool-{pool}-{index}")
}

/// The UUID of a slot's domain: stable, because libvirt keys the TPM state by it.
pub fn domain_uuid(name: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, format!("warmpool:{name}").as_bytes())
}

pub struct Slot {
    index: usize,
    name: String,
    uuid: uuid::Uuid,
    spec: Arc<SlotSpec>,
    hypervisor: Arc<dyn Hypervisor>,
    metrics: Arc<Metrics>,
    reports: mpsc::UnboundedSender<SlotReport>,
    paths: SlotPaths,
    state: SlotState,
    since: Instant,
    /// Failed reverts and restores since the slot was last ready.
    failures: u32,
    /// How long the next quarantine lasts.
    backoff: Duration,
    port: Option<JobPort>,
    /// When the current revert began, to measure it up to `Ready`.
    revert_began: Option<Instant>,
    error: Option<String>,
    /// Set when the daemon shuts down: running jobs end at once.
    stopping: watch::Receiver<bool>,
    /// A job to take back at start.
    adoption: Option<Adoption>,
}

impl Slot {
    pub fn new(
        index: usize,
        spec: Arc<SlotSpec>,
        hypervisor: Arc<dyn Hypervisor>,
        metrics: Arc<Metrics>,
        reports: mpsc::UnboundedSender<SlotReport>,
        stopping: watch::Receiver<bool>,
    ) -> Slot {
        let name = domain_name(&spec.pool, index);
        let uuid = domain_uuid(&name);
        let paths = SlotPaths::new(spec.dir.join(index.to_string()));
        let backoff = spec.first_backoff;
        Slot {
            index,
            name,
            uuid,
            spec,
            hypervisor,
            metrics,
            reports,
            paths,
            state: SlotState::Empty,
            since: Instant::now(),
            failures: 0,
            backoff,
            port: None,
            revert_began: None,
            error: None,
            stopping,
            adoption: None,
        }
    }

    /// Asks the slot to take back, at start, a job that an earlier run began on it.
    pub fn adopt(mut self, adoption: Adoption) -> Slot {
        self.adoption = Some(adoption);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Boots the pool's guest once straight from its image, as a start without a snapshot
    /// would, and returns the time to `ready`. Leaves nothing behind.
    pub async fn measure_cold_boot(&mut self) -> Result<Duration, SlotError> {
        let xml = self.prepare_fresh_boot(&self.paths.job_disk).await?;
        let began = Instant::now();
        let booted = self.boot_to_ready(&xml).await;
        let elapsed = began.elapsed();
        self.remove_everything().await?;
        booted.map(|()| elapsed)
    }

    /// The slot's task: takes over what an earlier run left or builds the clean snapshot, then
    /// serves commands until shut down.
    pub async fn run(mut self, mut commands: mpsc::Receiver<SlotCommand>) {
        self.start().await;
        loop {
            let wake = match self.state {
                SlotState::Ready => self.wait_ready(&mut commands).await,
                SlotState::Quarantined => self.wait_quarantined(&mut commands).await,
                _ => Wake::Command(commands.recv().await),
            };
            match wake {
                Wake::Changed => {}
                Wake::Command(Some(SlotCommand::Assign(job))) if self.state == SlotState::Ready => {
                    self.run_job(job).await;
                    self.revert().await;
                }
                Wake::Command(Some(SlotCommand::Assign(job))) => self.return_job(job),
                Wake::Command(Some(SlotCommand::Restore)) if self.state == SlotState::Saved => {
                    self.restore().await
                }
                Wake::Command(Some(SlotCommand::Restore)) => {}
                Wake::Command(Some(SlotCommand::Shutdown) | None) => break,
            }
        }
        self.shutdown().await;
    }

    /// Adopts a job still running in a healthy guest, keeps a current clean snapshot, or
    /// builds one. A job that cannot be adopted fails with the reason, and its guest is
    /// destroyed by the revert or the build.
    async fn start(&mut self) {
        let current = match self.snapshot_is_current().await {
            Ok(current) => current,
            Err(e) => {
                warn!(error = %e, "Clean snapshot unreadable; building a new one");
                false
            }
        };
        if let Some(adoption) = self.adoption.take() {
            match self.reconnect(current).await {
                Ok(port) => {
                    self.port = Some(port);
                    self.run_adopted_job(adoption).await;
                    self.revert().await;
                    return;
                }
                Err(reason) => {
                    warn!(job = %adoption.job, error = %reason, "Job not adopted");
                    let reason =
                        format!("The daemon restarted and could not take the job back: {reason}");
                    let _ = adoption.events.try_send(JobEvent::Failed { reason });
                }
            }
        }
        if current {
            info!("Keeping the clean snapshot of an earlier run");
            self.revert().await;
        } else {
            self.build().await;
        }
    }

    /// Connects to the job port of a guest that an earlier run left running a job.
    async fn reconnect(&self, snapshot_current: bool) -> Result<JobPort, String> {
        if !snapshot_current {
            return Err("its clean snapshot is stale or gone".into());
        }
        match self.hypervisor.state(&self.name).await {
            Ok(DomainState::Running) => {}
            Ok(state) => return Err(format!("its guest is {state:?}, not running")),
            Err(e) => return Err(e.to_string()),
        }
        JobPort::connect(&self.paths.job_port).await.map_err(|e| e.to_string())
    }

    /// What the slot's manifest would say of a snapshot built now.
    async fn manifest(&self) -> Result<SnapshotManifest, SlotError> {
        let image = tokio::fs::metadata(&self.spec.image).await.map_err(|source| {
            DiskError::File { operation: "Read", path: self.spec.image.clone(), source }
        })?;
        let modified = image.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        let xml = self.render(&self.paths.clean_disk)?;
        Ok(SnapshotManifest {
            format: SNAPSHOT_FORMAT,
            image: self.spec.image.clone(),
            image_len: image.len(),
            image_modified_ns: modified.map_or(0, |t| t.as_nanos()),
            domain_sha256: hex_sha256(network::without_filterref(&xml).as_bytes()),
        })
    }

    /// Whether the slot's directory holds a whole clean snapshot built from what the pool is
    /// configured with now.
    async fn snapshot_is_current(&self) -> Result<bool, SlotError> {
        let Ok(written) = tokio::fs::read(&self.paths.manifest).await else { return Ok(false) };
        let Ok(written) = serde_json::from_slice::<SnapshotManifest>(&written) else {
            return Ok(false);
        };
        if written != self.manifest().await? {
            info!("The clean snapshot is stale: the image or the domain changed");
            return Ok(false);
        }
        let mut needed = vec![&self.paths.clean_disk, &self.paths.memory, &self.paths.restore_xml];
        if self.spec.nvram_template.is_some() {
            needed.push(&self.paths.clean_nvram);
        }
        if self.spec.tpm {
            needed.push(&self.paths.clean_tpm);
        }
        Ok(needed.iter().all(|path| path.exists()))
    }

    /// Waits for a command while ready; a guest that dies or speaks while paused is reverted.
    async fn wait_ready(&mut self, commands: &mut mpsc::Receiver<SlotCommand>) -> Wake {
        let port = self.port.as_mut().expect("a ready slot has a job port");
        let reason = tokio::select! {
            command = commands.recv() => return Wake::Command(command),
            message = port.next_message() => match message {
                Ok(message) => format!("the paused guest sent `{}`", message.kind()),
                Err(e) => e.to_string(),
            },
        };
        warn!(error = %reason, "Ready slot lost its guest");
        self.revert().await;
        Wake::Changed
    }

    /// Waits out a quarantine, then rebuilds; commands other than shutdown are refused.
    async fn wait_quarantined(&mut self, commands: &mut mpsc::Receiver<SlotCommand>) -> Wake {
        let wake = tokio::time::Instant::now() + self.backoff;
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(SlotCommand::Assign(job)) => self.return_job(job),
                    Some(SlotCommand::Restore) => {}
                    other => return Wake::Command(other),
                },
                _ = tokio::time::sleep_until(wake) => {
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    self.rebuild().await;
                    return Wake::Changed;
                }
            }
        }
    }

    /// Hands a job back to the pool: the slot stopped being ready while the job was on its way.
    fn return_job(&self, job: Job) {
        if let Err(mpsc::error::SendError(SlotReport::Returned { job, .. })) =
            self.reports.send(SlotReport::Returned { index: self.index, job })
        {
            job.fail(JobFailure::NotReady);
        }
    }

    fn set_state(&mut self, to: SlotState) {
        let from = self.state;
        debug_assert!(from.can_become(to), "slot transition {from} -> {to}");
        if !from.can_become(to) {
            error!(%from, %to, "Slot made a transition outside its table");
        }
        let duration_ms = self.since.elapsed().as_millis() as u64;
        info!(%from, %to, duration_ms, "Slot changed state");
        self.state = to;
        self.since = Instant::now();
        let error = if to == SlotState::Quarantined { self.error.clone() } else { None };
        let _ = self.reports.send(SlotReport::State { index: self.index, state: to, error });
    }

    async fn build(&mut self) {
        self.set_state(SlotState::Building);
        let began = Instant::now();
        match self.try_build().await {
            Ok(()) => {
                self.metrics.record(Series::Build, began.elapsed());
                self.set_state(SlotState::Saved);
            }
            Err(e) => {
                error!(error = %e, "Building the clean snapshot failed");
                self.port = None;
                if let Err(e) = self.hypervisor.destroy(&self.name).await {
                    warn!(error = %e, "Destroying the failed build's domain failed");
                }
                self.error = Some(e.to_string());
                self.set_state(SlotState::Quarantined);
            }
        }
    }

    /// Boots a fresh guest on a new clean overlay, waits for `ready`, saves its memory, and
    /// freezes the overlay.
    async fn try_build(&mut self) -> Result<(), SlotError> {
        let xml = self.prepare_fresh_boot(&self.paths.clean_disk).await?;
        self.boot_to_ready(&xml).await?;

        self.port = None;
        self.hypervisor.save(&self.name, &self.paths.memory).await?;
        disk::freeze(&self.paths.clean_disk).await?;
        if self.spec.nvram_template.is_some() {
            disk::copy_file(&self.paths.nvram, &self.paths.clean_nvram).await?;
        }
        if self.spec.tpm {
            disk::copy_tree(&self.tpm_state_dir(), &self.paths.clean_tpm).await?;
        }
        self.write_restore_xml().await?;
        disk::create_overlay(&self.paths.job_disk, &self.paths.clean_disk).await?;
        disk::sync_file(&self.paths.memory).await?;
        let manifest =
            serde_json::to_vec_pretty(&self.manifest().await?).map_err(|e| DiskError::File {
                operation: "Write",
                path: self.paths.manifest.clone(),
                source: e.into(),
            })?;
        disk::write_durably(&self.paths.manifest, manifest).await?;
        Ok(())
    }

    /// Empties the slot's directory and prepares a boot from the image: an overlay at `disk`
    /// and fresh firmware variables. Returns the domain XML.
    async fn prepare_fresh_boot(&self, disk: &Path) -> Result<String, SlotError> {
        // A domain of this slot that an earlier run left holds the files about to be removed.
        self.hypervisor.destroy(&self.name).await?;
        disk::remove_tree(&self.paths.dir).await?;
        disk::create_private_dir(&self.paths.dir).await?;
        disk::create_overlay(disk, &self.spec.image).await?;
        if let Some(nvram_template) = &self.spec.nvram_template {
            disk::copy_file(nvram_template, &self.paths.nvram).await?;
        }
        self.render(disk)
    }

    /// Starts a domain and waits until its guest says `ready`, keeping the job port open.
    async fn boot_to_ready(&mut self, xml: &str) -> Result<(), SlotError> {
        disk::remove_file(&self.paths.job_port).await?;
        self.check_filter().await?;
        self.hypervisor.start(xml).await?;
        let console = self.paths.console_log.display().to_string();
        let secs = self.spec.boot_timeout.as_secs();
        let wait = async {
            let mut port = JobPort::connect(&self.paths.job_port).await?;
            match port.next_message().await {
                Ok(GuestMessage::Ready) => Ok(port),
                Ok(other) => Err(SlotError::Port(PortError::Unexpected {
                    got: other.kind(),
                    expected: "`ready`",
                })),
                Err(PortError::Closed) => {
                    Err(SlotError::StoppedBeforeReady { console: console.clone() })
                }
                Err(e) => Err(e.into()),
            }
        };
        let port = tokio::time::timeout(self.spec.boot_timeout, wait)
            .await
            .map_err(|_| SlotError::NeverReady { secs, console: console.clone() })??;
        self.port = Some(port);
        Ok(())
    }

    /// The restore XML is the saved XML with the job overlay in place of the clean one.
    async fn write_restore_xml(&self) -> Result<(), SlotError> {
        let saved = self.hypervisor.saved_xml(&self.paths.memory).await?;
        let clean = self.paths.clean_disk.display().to_string();
        if !saved.contains(&clean) {
            return Err(SlotError::SavedXml(clean));
        }
        let restore = saved.replace(&clean, &self.paths.job_disk.display().to_string());
        tokio::fs::write(&self.paths.restore_xml, restore).await.map_err(|source| {
            DiskError::File { operation: "Write", path: self.paths.restore_xml.clone(), source }
        })?;
        Ok(())
    }

    fn render(&self, disk: &Path) -> Result<String, SlotError> {
        let mut values = self.spec.values.clone();
        let path = |p: &Path| p.display().to_string();
        values.insert("name".into(), self.name.clone());
        values.insert("uuid".into(), self.uuid.to_string());
        values.insert("disk".into(), path(disk));
        values.insert("job_port".into(), path(&self.paths.job_port));
        values.insert("console_log".into(), path(&self.paths.console_log));
        values.insert("nvram".into(), path(&self.paths.nvram));
        let interface = self.spec.network.as_ref().map(|n| n.interface_xml(self.index));
        values.insert("interface".into(), interface.unwrap_or_default());
        let xml = self.spec.template.render(&values)?;
        Ok(mark(&xml, &self.spec.pool, self.index, &self.spec.owner))
    }

    fn tpm_state_dir(&self) -> PathBuf {
        Path::new(SWTPM_STATE_ROOT).join(self.uuid.to_string())
    }

    async fn restore(&mut self) {
        self.set_state(SlotState::Restoring);
        match self.try_restore().await {
            Ok(port) => {
                self.port = Some(port);
                self.failures = 0;
                self.backoff = self.spec.first_backoff;
                self.set_state(SlotState::Ready);
                if let Some(began) = self.revert_began.take() {
                    self.metrics.record(Series::Revert, began.elapsed());
                }
            }
            Err(e) => {
                warn!(error = %e, "Restoring the clean snapshot failed");
                self.failures += 1;
                self.error = Some(e.to_string());
                self.revert().await;
            }
        }
    }

    /// A guest with a network starts only behind warmpool's own filter, which an operator
    /// could have changed since the daemon checked it at start.
    async fn check_filter(&self) -> Result<(), SlotError> {
        if self.spec.network.is_some() {
            let checked = network::check_filter(&*self.hypervisor).await;
            checked.map_err(|e| SlotError::Network(e.to_string()))?;
        }
        Ok(())
    }

    async fn try_restore(&mut self) -> Result<JobPort, SlotError> {
        let mut xml =
            tokio::fs::read_to_string(&self.paths.restore_xml).await.map_err(|source| {
                DiskError::File { operation: "Read", path: self.paths.restore_xml.clone(), source }
            })?;
        if let Some(network) = &self.spec.network {
            let filterref = network.filterref_xml(self.index);
            xml = network::with_filterref(&xml, &filterref).ok_or_else(|| {
                SlotError::Network("its restore XML has no filter reference".into())
            })?;
        }
        disk::remove_file(&self.paths.job_port).await?;
        self.check_filter().await?;
        self.hypervisor.restore_paused(&self.paths.memory, &xml).await?;
        Ok(JobPort::connect(&self.paths.job_port).await?)
    }

    async fn run_job(&mut self, job: Job) {
        self.set_state(SlotState::Running);
        info!(job = %job.id, "Job assigned");
        self.metrics.record(Series::QueueWait, job.arrived.elapsed());
        let assigned = Instant::now();
        let outcome = self.drive_job(&job).await;
        self.metrics.record(Series::Job, assigned.elapsed());
        self.end_job(&job.id, &job.events, outcome);
    }

    /// Follows a job that an earlier run of the daemon started, to its end.
    async fn run_adopted_job(&mut self, adoption: Adoption) {
        let Adoption { job, events, time_left } = adoption;
        self.set_state(SlotState::Running);
        let time_left_secs = time_left.as_secs();
        info!(job = %job, time_left_secs, "Job adopted from an earlier run");
        let deadline = tokio::time::Instant::now() + time_left;
        let max_secs = self.spec.max_job.as_secs();
        let port = self.port.as_mut().expect("an adopted job's slot has a job port");
        let outcome = follow_job(port, &job, &events, deadline, max_secs, &mut self.stopping).await;
        self.end_job(&job, &events, outcome);
    }

    fn end_job(
        &mut self,
        job: &str,
        events: &mpsc::Sender<JobEvent>,
        outcome: Result<i32, JobFailure>,
    ) {
        self.revert_began = Some(Instant::now());
        let event = match outcome {
            Ok(exit_code) => {
                info!(job, exit_code, "Job finished");
                JobEvent::Finished { exit_code }
            }
            Err(failure) => {
                warn!(job, error = %failure, "Job failed");
                JobEvent::Failed { reason: failure.to_string() }
            }
        };
        self.metrics.count_job(matches!(event, JobEvent::Finished { .. }));
        let _ = events.try_send(event);
    }

    /// Sends the job, resumes the guest, and relays its messages until it finishes.
    async fn drive_job(&mut self, job: &Job) -> Result<i32, JobFailure> {
        let port = self.port.as_mut().expect("a ready slot has a job port");
        let deadline = tokio::time::Instant::now() + self.spec.max_job;
        let max_secs = self.spec.max_job.as_secs();
        port.send_job(&JobMessage::new(&job.id, job.run.clone()))
            .await
            .map_err(JobFailure::Port)?;
        self.hypervisor.resume(&self.name).await?;

        let start_deadline = (tokio::time::Instant::now() + START_TIMEOUT).min(deadline);
        let (id, events) = (job.id.as_str(), &job.events);
        let first = next_for_job(port, id, events, start_deadline, &mut self.stopping)
            .await
            .map_err(|e| match e {
                JobFailure::Timeout { .. } if start_deadline < deadline => {
                    JobFailure::NoStart { secs: START_TIMEOUT.as_secs() }
                }
                JobFailure::Timeout { .. } => JobFailure::Timeout { secs: max_secs },
                other => other,
            })?;
        if !matches!(first, GuestMessage::Started { .. }) {
            return Err(JobFailure::Port(PortError::Unexpected {
                got: first.kind(),
                expected: "`started`",
            }));
        }
        self.metrics.record(Series::Assign, job.arrived.elapsed());
        let started = JobEvent::Started { slot: self.name.clone(), index: self.index };
        relay(events, started, deadline).await.map_err(|_| timeout_or_cancel(events, max_secs))?;
        follow_job(port, id, events, deadline, max_secs, &mut self.stopping).await
    }

    /// Destroys the domain and replaces the job overlay, then leaves the slot `Saved`. A slot
    /// whose revert fails twice, or whose restores keep failing, is quarantined instead.
    async fn revert(&mut self) {
        self.set_state(SlotState::Reverting);
        self.revert_began.get_or_insert_with(Instant::now);
        self.port = None;
        let mut reverted = false;
        for _attempt in 0..MAX_FAILURES {
            match self.try_revert().await {
                Ok(()) => {
                    reverted = true;
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "Revert failed");
                    self.error = Some(e.to_string());
                }
            }
        }
        if reverted && self.failures < MAX_FAILURES {
            self.set_state(SlotState::Saved);
            return;
        }
        error!(
            error = self.error.as_deref().unwrap_or(""),
            "Slot quarantined after repeated failures"
        );
        self.revert_began = None;
        self.set_state(SlotState::Quarantined);
    }

    async fn try_revert(&mut self) -> Result<(), SlotError> {
        let began = Instant::now();
        self.hypervisor.destroy(&self.name).await?;
        let destroy_ms = began.elapsed().as_millis() as u64;
        disk::create_overlay(&self.paths.job_disk, &self.paths.clean_disk).await?;
        let overlay_ms = began.elapsed().as_millis() as u64 - destroy_ms;
        debug!(destroy_ms, overlay_ms, "Reverted the domain and the job overlay");
        if self.spec.nvram_template.is_some() {
            disk::copy_file(&self.paths.clean_nvram, &self.paths.nvram).await?;
        }
        if self.spec.tpm {
            disk::copy_tree(&self.paths.clean_tpm, &self.tpm_state_dir()).await?;
        }
        Ok(())
    }

    async fn rebuild(&mut self) {
        self.set_state(SlotState::Rebuilding);
        self.failures = 0;
        if let Err(e) = self.remove_everything().await {
            warn!(error = %e, "Clearing the slot for a rebuild failed");
        }
        self.set_state(SlotState::Empty);
        self.build().await;
    }

    /// Destroys the domain. A clean snapshot is kept for the next start, which then only
    /// reverts to it; what a job or a failed slot left is removed.
    async fn shutdown(&mut self) {
        if matches!(self.state, SlotState::Saved | SlotState::Ready) {
            match self.remove_all_but_snapshot().await {
                Ok(()) => info!("Slot stopped; its clean snapshot is kept"),
                Err(e) => error!(error = %e, "Stopping the slot failed"),
            }
            return;
        }
        match self.remove_everything().await {
            Ok(()) => info!("Slot removed"),
            Err(e) => error!(error = %e, "Removing the slot failed"),
        }
    }

    async fn remove_all_but_snapshot(&mut self) -> Result<(), SlotError> {
        self.port = None;
        self.hypervisor.destroy(&self.name).await?;
        for path in [&self.paths.job_disk, &self.paths.job_port, &self.paths.nvram] {
            disk::remove_file(path).await?;
        }
        if self.spec.tpm {
            disk::remove_tree(&self.tpm_state_dir()).await?;
        }
        Ok(())
    }

    async fn remove_everything(&mut self) -> Result<(), SlotError> {
        self.port = None;
        self.hypervisor.destroy(&self.name).await?;
        disk::remove_tree(&self.paths.dir).await?;
        if self.spec.tpm {
            disk::remove_tree(&self.tpm_state_dir()).await?;
        }
        Ok(())
    }
}

/// Relays a started job's log lines until the guest says `finished`.
async fn follow_job(
    port: &mut JobPort,
    job: &str,
    events: &mpsc::Sender<JobEvent>,
    deadline: tokio::time::Instant,
    max_secs: u64,
    stopping: &mut watch::Receiver<bool>,
) -> Result<i32, JobFailure> {
    loop {
        let message =
            next_for_job(port, job, events, deadline, stopping).await.map_err(|e| match e {
                JobFailure::Timeout { .. } => JobFailure::Timeout { secs: max_secs },
                other => other,
            })?;
        match message {
            GuestMessage::Log { line, .. } => {
                relay(events, JobEvent::Log { line }, deadline)
                    .await
                    .map_err(|_| timeout_or_cancel(events, max_secs))?;
            }
            GuestMessage::Finished { exit_code, .. } => return Ok(exit_code),
            other => {
                return Err(JobFailure::Port(PortError::Unexpected {
                    got: other.kind(),
                    expected: "`log` or `finished`",
                }))
            }
        }
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Reads the next message of `job`, refusing messages that name another job.
async fn next_for_job(
    port: &mut JobPort,
    job: &str,
    events: &mpsc::Sender<JobEvent>,
    deadline: tokio::time::Instant,
    stopping: &mut watch::Receiver<bool>,
) -> Result<GuestMessage, JobFailure> {
    let message = tokio::select! {
        message = tokio::time::timeout_at(deadline, port.next_message()) => message,
        _ = events.closed() => return Err(JobFailure::Cancelled),
        _ = stopping.wait_for(|stopping| *stopping) => return Err(JobFailure::Stopping),
    };
    let message = match message {
        Err(_) => return Err(JobFailure::Timeout { secs: 0 }),
        Ok(Err(PortError::Closed)) => return Err(JobFailure::GuestStopped),
        Ok(Err(e)) => return Err(JobFailure::Port(e)),
        Ok(Ok(message)) => message,
    };
    match message.job() {
        Some(named) if named != job => Err(JobFailure::Port(PortError::WrongJob {
            got: named.chars().take(64).collect(),
            expected: job.to_owned(),
        })),
        None => Err(JobFailure::Port(PortError::Unexpected {
            got: message.kind(),
            expected: "a job message",
        })),
        Some(_) => Ok(message),
    }
}

/// Passes an event to the job's submitter, who may be slow but not slower than the deadline.
async fn relay(
    events: &mpsc::Sender<JobEvent>,
    event: JobEvent,
    deadline: tokio::time::Instant,
) -> Result<(), ()> {
    match tokio::time::timeout_at(deadline, events.send(event)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

fn timeout_or_cancel(events: &mpsc::Sender<JobEvent>, max_secs: u64) -> JobFailure {
    if events.is_closed() {
        JobFailure::Cancelled
    } else {
        JobFailure::Timeout { secs: max_secs }
    }
}

/// Adds warmpool's metadata element to a domain's XML, so that its domains can be told from
/// any other domain on the host.
fn mark(xml: &str, pool: &str, index: usize, owner: &str) -> String {
    let element = format!(
        "<warmpool:slot xmlns:warmpool=\"{METADATA_NAMESPACE}\" pool=\"{}\" slot=\"{index}\" owner=\"{}\"/>",
        crate::template::xml_escape(pool),
        crate::template::xml_escape(owner),
    );
    if let Some(at) = xml.find("<metadata>") {
        let at = at + "<metadata>".len();
        return format!("{}{element}{}", &xml[..at], &xml[at..]);
    }
    let Some(open) = xml.find("<domain") else { return xml.to_owned() };
    let Some(end) = xml[open..].find('>') else { return xml.to_owned() };
    let at = open + end + 1;
    format!("{}<metadata>{element}</metadata>{}", &xml[..at], &xml[at..])
}

#[cfg(test)]
mod tests;
