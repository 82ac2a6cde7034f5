//! A pool: identical slots of one image and machine shape, and the task that hands them jobs.
//!
//! Concurrency: the pool task is the only one that decides which slot does what. It keeps the
//! queue of waiting jobs and the last state each slot reported, and after every event it
//! assigns queued jobs to `Ready` slots and restores `Saved` slots until the slots in memory
//! match the pool's `ready` count plus the jobs waiting. Slots carry the decisions out in their
//! own tasks ([`crate::slot`]), so a slow restore never holds up the pool.
//!
//! Besides the queue, a slot can be reserved ([`Pool::reserve`]) for a job that does not exist
//! yet: the scheduler reserves a slot before a provider registers a runner for it, so that a
//! runner is only ever registered for a slot that will take its job. A reserved slot is kept
//! out of the queue's reach until the reservation's job arrives or the reservation is dropped.
//! The pool's capacity ([`Pool::capacity`]) is how many more jobs it could take at once: slots
//! ready, restoring or saved, neither reserved nor wanted by a queued job.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, Instrument};

use crate::config::{Acceleration, Arch, PoolConfig};
use crate::hypervisor::Hypervisor;
use crate::metrics::Metrics;
use crate::network::GuestNetwork;
use crate::slot::{
    domain_name, Adoption, Job, JobFailure, Slot, SlotCommand, SlotReport, SlotSpec, SlotState,
};

/// Commands a slot may have queued: one decision and a shutdown, with room to spare.
const SLOT_QUEUE: usize = 8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolStatus {
    pub name: String,
    pub labels: Vec<String>,
    /// Jobs waiting for a slot.
    pub queued: usize,
    pub slots: Vec<SlotStatus>,
    /// Why the daemon does not serve the pool, when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SlotStatus {
    pub name: String,
    pub state: SlotState,
    /// The job the slot runs, while it runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PoolStatus {
    pub fn count(&self, state: SlotState) -> usize {
        self.slots.iter().filter(|slot| slot.state == state).count()
    }
}

enum Request {
    Submit(Job),
    Reserve(oneshot::Sender<Option<(usize, String)>>),
    SubmitReserved(usize, Job),
    Release(usize),
    Status(oneshot::Sender<PoolStatus>),
    Shutdown,
}

/// The handle of a running pool.
pub struct Pool {
    name: String,
    labels: Vec<String>,
    ready_target: usize,
    requests: mpsc::UnboundedSender<Request>,
    capacity: watch::Receiver<usize>,
    stopping: watch::Sender<bool>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Pool {
    /// Starts the pool's slots, which at once take over the clean snapshots an earlier run
    /// kept or build new ones.
    pub fn start(
        config: &PoolConfig,
        state_dir: &Path,
        hypervisor: Arc<dyn Hypervisor>,
        metrics: Arc<Metrics>,
    ) -> Pool {
        Pool::start_adopting(config, state_dir, hypervisor, metrics, BTreeMap::new(), None)
    }

    /// Starts the pool's slots; those named in `adoptions` first try to take back the job an
    /// earlier run of the daemon left running on them.
    pub fn start_adopting(
        config: &PoolConfig,
        state_dir: &Path,
        hypervisor: Arc<dyn Hypervisor>,
        metrics: Arc<Metrics>,
        mut adoptions: BTreeMap<usize, Adoption>,
        network: Option<Arc<GuestNetwork>>,
    ) -> Pool {
        let spec = Arc::new(slot_spec(config, state_dir, network));
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let (stopping, stopping_rx) = watch::channel(false);
        let slots = (0..config.slots as usize)
            .map(|index| {
                let (commands, commands_rx) = mpsc::channel(SLOT_QUEUE);
                let mut slot = Slot::new(
                    index,
                    spec.clone(),
                    hypervisor.clone(),
                    metrics.clone(),
                    reports_tx.clone(),
                    stopping_rx.clone(),
                );
                let adoption = adoptions.remove(&index);
                let job = adoption.as_ref().map(|adoption| adoption.job.clone());
                if let Some(adoption) = adoption {
                    slot = slot.adopt(adoption);
                }
                let span = tracing::info_span!("slot", slot = %slot.name(), pool = %config.name);
                let task = tokio::spawn(slot.run(commands_rx).instrument(span));
                SlotHandle {
                    name: domain_name(&config.name, index),
                    state: SlotState::Empty,
                    job,
                    error: None,
                    reserved: false,
                    pinned: None,
                    commands,
                    task,
                }
            })
            .collect();
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (capacity_tx, capacity) = watch::channel(0);
        let dispatcher = Dispatcher {
            capacity: capacity_tx,
            name: config.name.clone(),
            dir: spec.dir.clone(),
            labels: config.labels.clone(),
            ready_target: config.ready as usize,
            slots,
            queue: VecDeque::new(),
            refused: None,
        };
        info!(pool = %config.name, slots = config.slots, ready = config.ready, "Pool started");
        let task = tokio::spawn(dispatcher.run(requests_rx, reports));
        Pool {
            name: config.name.clone(),
            labels: config.labels.clone(),
            ready_target: config.ready as usize,
            requests,
            capacity,
            stopping,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// A pool the daemon must not serve, for `reason`: it has no slots, its status says why,
    /// and every job sent to it fails at once with the reason.
    pub fn refuse(config: &PoolConfig, state_dir: &Path, reason: String) -> Pool {
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (_reports_tx, reports) = mpsc::unbounded_channel();
        let (capacity_tx, capacity) = watch::channel(0);
        let (stopping, _) = watch::channel(false);
        let dispatcher = Dispatcher {
            capacity: capacity_tx,
            name: config.name.clone(),
            dir: state_dir.join("pools").join(&config.name),
            labels: config.labels.clone(),
            ready_target: 0,
            slots: Vec::new(),
            queue: VecDeque::new(),
            refused: Some(reason),
        };
        let task = tokio::spawn(dispatcher.run(requests_rx, reports));
        Pool {
            name: config.name.clone(),
            labels: config.labels.clone(),
            ready_target: 0,
            requests,
            capacity,
            stopping,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Queues a job; its events channel tells how it goes.
    pub fn submit(&self, job: Job) {
        if let Err(mpsc::error::SendError(Request::Submit(job))) =
            self.requests.send(Request::Submit(job))
        {
            job.fail("the pool is shutting down");
        }
    }

    /// How many more jobs the pool could take at once, kept current.
    pub fn capacity(&self) -> watch::Receiver<usize> {
        self.capacity.clone()
    }

    /// Reserves a slot with room for one job, if the pool has one.
    pub async fn reserve(&self) -> Option<Reservation> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(Request::Reserve(tx)).ok()?;
        let (index, slot_name) = rx.await.ok()??;
        Some(Reservation { index, slot_name, requests: Some(self.requests.clone()) })
    }

    pub async fn status(&self) -> Option<PoolStatus> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(Request::Status(tx)).ok()?;
        rx.await.ok()
    }

    /// Waits until every slot has left its build, and as many slots as the pool keeps ready
    /// (or all that are not quarantined) wait in memory.
    pub async fn built(&self) -> PoolStatus {
        loop {
            if let Some(status) = self.status().await {
                let settled = status.slots.iter().all(|slot| {
                    matches!(
                        slot.state,
                        SlotState::Ready | SlotState::Saved | SlotState::Quarantined
                    )
                });
                let usable = status.slots.len() - status.count(SlotState::Quarantined);
                if settled && status.count(SlotState::Ready) >= self.ready_target.min(usable) {
                    return status;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Fails queued jobs, ends running ones, shuts every slot down (destroying domains and
    /// removing files) and waits for them.
    /// Clients may still hold the pool: their jobs end with the rest.
    pub async fn shutdown(&self) {
        self.stopping.send_replace(true);
        let _ = self.requests.send(Request::Shutdown);
        let task = self.task.lock().expect("pool task lock").take();
        if let Some(task) = task {
            let _ = task.await;
            info!(pool = %self.name, "Pool stopped");
        }
    }
}

/// The per-pool values of a slot's template and paths.
pub(crate) fn slot_spec(
    config: &PoolConfig,
    state_dir: &Path,
    network: Option<Arc<GuestNetwork>>,
) -> SlotSpec {
    let accel = resolve_acceleration(config.acceleration, config.arch);
    let mut values: BTreeMap<String, String> = config.template_vars.clone();
    values.insert("vcpus".into(), config.vcpus.to_string());
    values.insert("memory_mib".into(), config.memory_mib.to_string());
    values.insert(
        "domain_type".into(),
        if accel == Acceleration::Kvm { "kvm" } else { "qemu" }.into(),
    );
    values.insert("cpu".into(), cpu_element(accel, config.arch).into());
    SlotSpec {
        pool: config.name.clone(),
        image: config.image.clone(),
        template: config.template.clone(),
        values,
        nvram_template: config.nvram_template.clone(),
        boot_timeout: Duration::from_secs(config.boot_timeout_secs),
        max_job: Duration::from_secs(config.max_job_secs),
        tpm: config.template.has_tpm(),
        dir: state_dir.join("pools").join(&config.name),
        owner: state_dir.display().to_string(),
        first_backoff: crate::slot::FIRST_BACKOFF,
        network,
    }
}

/// KVM runs only guests of the host's own architecture, and only where the processor offers
/// virtualisation to this (possibly nested) host: `/dev/kvm` alone is not proof, since a host
/// can expose the device without the extensions.
pub fn resolve_acceleration(acceleration: Acceleration, arch: Arch) -> Acceleration {
    match acceleration {
        Acceleration::Auto if arch == Arch::host() && kvm_usable() => Acceleration::Kvm,
        Acceleration::Auto => Acceleration::Tcg,
        chosen => chosen,
    }
}

fn kvm_usable() -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    if Arch::host() != Arch::X86_64 {
        return true;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|flag| flag == "vmx" || flag == "svm"))
}

fn cpu_element(accel: Acceleration, arch: Arch) -> &'static str {
    match (accel, arch) {
        (Acceleration::Kvm, _) => "<cpu mode='host-passthrough' check='none'/>",
        // Under TCG every emulated CPU feature costs time; these models boot the reference
        // guest fastest (QEMU's `max` on aarch64 takes three times as long to `ready`).
        (_, Arch::Aarch64) => "<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>cortex-a57</model></cpu>",
        (_, Arch::X86_64) => "<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>",
    }
}

/// A slot kept for one job; dropping it unused gives the slot back.
pub struct Reservation {
    index: usize,
    slot_name: String,
    requests: Option<mpsc::UnboundedSender<Request>>,
}

impl Reservation {
    pub fn slot_name(&self) -> &str {
        &self.slot_name
    }

    /// Hands the job to the reserved slot, which runs it as soon as it is ready. Should the
    /// slot fail first, the job waits in the pool's queue for another.
    pub fn submit(mut self, job: Job) {
        let requests = self.requests.take().expect("a reservation is used once");
        if let Err(mpsc::error::SendError(Request::SubmitReserved(_, job))) =
            requests.send(Request::SubmitReserved(self.index, job))
        {
            job.fail("the pool is shutting down");
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(requests) = self.requests.take() {
            let _ = requests.send(Request::Release(self.index));
        }
    }
}

struct SlotHandle {
    name: String,
    state: SlotState,
    /// The job last assigned, while the slot runs it.
    job: Option<String>,
    error: Option<String>,
    /// Kept for a reservation: the queue does not take it.
    reserved: bool,
    /// The reservation's job, waiting for the slot to be ready.
    pinned: Option<Job>,
    commands: mpsc::Sender<SlotCommand>,
    task: JoinHandle<()>,
}

impl SlotHandle {
    /// Whether the slot is, or is about to be, ready for a job.
    fn available(&self) -> bool {
        matches!(self.state, SlotState::Ready | SlotState::Restoring | SlotState::Saved)
    }
}

struct Dispatcher {
    name: String,
    /// The pool's directory, holding one directory per slot.
    dir: PathBuf,
    labels: Vec<String>,
    ready_target: usize,
    slots: Vec<SlotHandle>,
    queue: VecDeque<Job>,
    capacity: watch::Sender<usize>,
    /// Why the pool is not served; it then has no slots.
    refused: Option<String>,
}

impl Dispatcher {
    async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<Request>,
        mut reports: mpsc::UnboundedReceiver<SlotReport>,
    ) {
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    Some(Request::Submit(job)) => self.queue.push_back(job),
                    Some(Request::Reserve(reply)) => {
                        self.dispatch();
                        let reserved = self.reserve();
                        self.publish_capacity();
                        let _ = reply.send(reserved);
                    }
                    Some(Request::SubmitReserved(index, job)) => self.pin(index, job),
                    Some(Request::Release(index)) => self.slots[index].reserved = false,
                    Some(Request::Status(reply)) => {
                        let _ = reply.send(self.status());
                    }
                    Some(Request::Shutdown) | None => break,
                },
                Some(report) = reports.recv() => self.apply(report),
            }
            self.dispatch();
            self.publish_capacity();
        }
        self.shutdown(reports).await;
    }

    fn apply(&mut self, report: SlotReport) {
        match report {
            SlotReport::State { index, state, error } => {
                let slot = &mut self.slots[index];
                slot.state = state;
                slot.error = error;
                if state != SlotState::Running {
                    slot.job = None;
                }
            }
            SlotReport::Returned { index, job } => {
                // The slot was not ready after all; its next report says what it is.
                if self.slots[index].state == SlotState::Running {
                    self.slots[index].state = SlotState::Reverting;
                }
                self.queue.push_front(job);
            }
        }
    }

    /// Picks a slot for a reservation: ready before restoring before saved, leaving enough
    /// for the queued jobs.
    fn reserve(&mut self) -> Option<(usize, String)> {
        if self.free() == 0 {
            return None;
        }
        let index =
            [SlotState::Ready, SlotState::Restoring, SlotState::Saved].into_iter().find_map(
                |state| self.slots.iter().position(|slot| slot.state == state && !slot.reserved),
            )?;
        self.slots[index].reserved = true;
        // A saved slot restores now, for the job on its way.
        self.dispatch();
        Some((index, self.slots[index].name.clone()))
    }

    fn pin(&mut self, index: usize, job: Job) {
        let slot = &mut self.slots[index];
        if slot.reserved && slot.pinned.is_none() && slot.available() {
            slot.pinned = Some(job);
        } else {
            slot.reserved = false;
            self.queue.push_front(job);
        }
    }

    /// Slots available for more jobs than the queue holds.
    fn free(&self) -> usize {
        let unreserved =
            self.slots.iter().filter(|slot| slot.available() && !slot.reserved).count();
        unreserved.saturating_sub(self.queue.len())
    }

    fn publish_capacity(&self) {
        let free = self.free();
        self.capacity.send_if_modified(|capacity| std::mem::replace(capacity, free) != free);
    }

    /// Assigns queued jobs to ready slots, then restores saved slots so that the slots in
    /// memory cover the ready count and the jobs still waiting.
    fn dispatch(&mut self) {
        self.queue.retain(|job| !job.events.is_closed());
        if let Some(reason) = &self.refused {
            let reason = format!("pool `{}` is not served: {reason}", self.name);
            self.queue.drain(..).for_each(|job| job.fail(&reason));
            return;
        }
        self.unpin_failed_slots();
        if !self.queue.is_empty() && self.count(SlotState::Quarantined) == self.slots.len() {
            self.fail_queue_while_quarantined();
        }
        self.assign_pinned();
        while let Some(index) = self.find_unreserved(SlotState::Ready) {
            let Some(job) = self.queue.pop_front() else { break };
            let id = job.id.clone();
            match self.slots[index].commands.try_send(SlotCommand::Assign(job)) {
                Ok(()) => {
                    self.slots[index].state = SlotState::Running;
                    self.slots[index].job = Some(id);
                }
                Err(e) => {
                    let SlotCommand::Assign(job) = e.into_inner() else { unreachable!() };
                    self.queue.push_front(job);
                    break;
                }
            }
        }

        // Reserved slots restore first: a job is on its way to each.
        let reserved_saved: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].reserved && self.slots[i].state == SlotState::Saved)
            .collect();
        for index in reserved_saved {
            self.restore(index);
        }
        let in_memory =
            self.count_unreserved(SlotState::Ready) + self.count_unreserved(SlotState::Restoring);
        let wanted = self.ready_target + self.queue.len();
        for _ in in_memory..wanted {
            let Some(index) = self.find_unreserved(SlotState::Saved) else { break };
            if !self.restore(index) {
                break;
            }
        }
    }

    fn restore(&mut self, index: usize) -> bool {
        if self.slots[index].commands.try_send(SlotCommand::Restore).is_err() {
            return false;
        }
        self.slots[index].state = SlotState::Restoring;
        true
    }

    /// Hands reserved slots that are ready their jobs.
    fn assign_pinned(&mut self) {
        for slot in &mut self.slots {
            if slot.state != SlotState::Ready || slot.pinned.is_none() {
                continue;
            }
            let job = slot.pinned.take().expect("checked above");
            let id = job.id.clone();
            match slot.commands.try_send(SlotCommand::Assign(job)) {
                Ok(()) => {
                    slot.state = SlotState::Running;
                    slot.job = Some(id);
                    slot.reserved = false;
                }
                Err(e) => {
                    let SlotCommand::Assign(job) = e.into_inner() else { unreachable!() };
                    slot.pinned = Some(job);
                }
            }
        }
    }

    /// A reserved slot that fell out of service (quarantined, rebuilding) gives its job to the
    /// queue, and its reservation up.
    fn unpin_failed_slots(&mut self) {
        for slot in &mut self.slots {
            if slot.reserved && !slot.available() && slot.state != SlotState::Reverting {
                slot.reserved = false;
                if let Some(job) = slot.pinned.take() {
                    self.queue.push_front(job);
                }
            }
        }
    }

    /// With every slot quarantined, a waiting job would wait for the next rebuild at best: it
    /// fails at once with the reason, which is what its submitter needs to know.
    fn fail_queue_while_quarantined(&mut self) {
        let error = self.slots.iter().find_map(|slot| slot.error.clone()).unwrap_or_default();
        let reason =
            format!("every slot of pool `{}` is quarantined; the last error: {error}", self.name);
        for job in self.queue.drain(..) {
            job.fail(&reason);
        }
    }

    fn find_unreserved(&self, state: SlotState) -> Option<usize> {
        self.slots.iter().position(|slot| slot.state == state && !slot.reserved)
    }

    fn count_unreserved(&self, state: SlotState) -> usize {
        self.slots.iter().filter(|slot| slot.state == state && !slot.reserved).count()
    }

    fn count(&self, state: SlotState) -> usize {
        self.slots.iter().filter(|slot| slot.state == state).count()
    }

    fn status(&self) -> PoolStatus {
        PoolStatus {
            name: self.name.clone(),
            labels: self.labels.clone(),
            queued: self.queue.len(),
            slots: self
                .slots
                .iter()
                .map(|slot| SlotStatus {
                    name: slot.name.clone(),
                    state: slot.state,
                    job: slot.job.clone(),
                    error: slot.error.clone(),
                })
                .collect(),
            refused: self.refused.clone(),
        }
    }

    async fn shutdown(mut self, mut reports: mpsc::UnboundedReceiver<SlotReport>) {
        let pinned = self.slots.iter_mut().filter_map(|slot| slot.pinned.take());
        for job in self.queue.drain(..).chain(pinned.collect::<Vec<_>>()) {
            job.fail("the daemon is shutting down");
        }
        for slot in &self.slots {
            // A slot busy with a job ends it (it sees `stopping`), reverts, then reads this.
            let _ = slot.commands.send(SlotCommand::Shutdown).await;
        }
        for slot in self.slots {
            let mut task = slot.task;
            loop {
                tokio::select! {
                    _ = &mut task => break,
                    Some(report) = reports.recv() => {
                        if let SlotReport::Returned { job, .. } = report {
                            job.fail(JobFailure::NotReady);
                        }
                    }
                }
            }
        }
        // Each slot removed its own directory; an error here means one could not.
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(pool = %self.name, dir = %self.dir.display(), error = %e, "Pool directory not removed");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
