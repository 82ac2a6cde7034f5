//! Demand from every tenant, and the choice of whose job takes the next free slot.
//!
//! A provider turns a tenant's waiting CI jobs into [`Demand`]. The scheduler task holds the
//! demand of all tenants in one [`Schedule`] and, whenever a pool may have room, picks the next
//! demand in three steps:
//!
//! 1. label match: only demand whose labels some pool with room carries;
//! 2. quota: only tenants running fewer jobs than their `max_concurrent_jobs`;
//! 3. weighted fair share: the tenant with the fewest running jobs per unit of weight, ties
//!    going to the tenant whose oldest demand waited longest.
//!
//! A tenant with waiting demand and nothing running has a share of zero, so it is served at the
//! next free slot that fits: no tenant starves. When the host is full, each freed slot goes to
//! the tenant furthest below its weight, so running jobs settle in proportion to the weights.
//!
//! Concurrency: the [`Scheduler`] task owns the schedule. It reserves a slot of the chosen pool
//! before it hands the demand to its provider, so a slot is never promised twice; the provider
//! registers the runner and submits the job into that reservation. A job's end reaches the
//! scheduler when the provider drops the assignment's [`Running`] guard.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tracing::{debug, info};

use crate::control::Control;
use crate::pool::Reservation;

/// How often the scheduler looks for room even when nothing told it to.
const PLACE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A tenant's share of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Relative to other tenants' weights; at least 1.
    pub weight: u32,
    /// The most jobs the tenant may run at once; 0 for no limit.
    pub max_concurrent_jobs: u32,
}

impl Default for Share {
    fn default() -> Share {
        Share { weight: 1, max_concurrent_jobs: 0 }
    }
}

/// One waiting CI job of a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// Unique among all demand, e.g. `github:<tenant>:<job id>`.
    pub key: String,
    pub tenant: String,
    /// Labels a pool must carry, lower-cased (labels compare without regard to case).
    pub labels: Vec<String>,
}

/// Whether a pool carrying `pool_labels` can run a job that asks for `labels`. Labels compare
/// without regard to case, and `self-hosted` is carried by every pool.
pub fn labels_fit(labels: &[String], pool_labels: &[String]) -> bool {
    labels.iter().all(|label| {
        label.eq_ignore_ascii_case("self-hosted")
            || pool_labels.iter().any(|carried| carried.eq_ignore_ascii_case(label))
    })
}

struct TenantQueue {
    share: Share,
    /// Waiting demand with its arrival number, oldest first.
    waiting: VecDeque<(u64, Demand)>,
    running: u32,
}

impl TenantQueue {
    fn under_quota(&self) -> bool {
        self.share.max_concurrent_jobs == 0 || self.running < self.share.max_concurrent_jobs
    }
}

/// The demand of every tenant and how many jobs each runs: the scheduler's decisions, without
/// its I/O, so that they can be tested on their own.
#[derive(Default)]
pub struct Schedule {
    tenants: BTreeMap<String, TenantQueue>,
    arrivals: u64,
}

impl Schedule {
    /// Sets the share of `tenant`, which applies from its next assignment on.
    pub fn set_share(&mut self, tenant: &str, share: Share) {
        self.tenant(tenant).share = Share { weight: share.weight.max(1), ..share };
    }

    /// Adds demand; `false` when demand with its key already waits.
    pub fn push(&mut self, demand: Demand) -> bool {
        if self.contains(&demand.key) {
            return false;
        }
        self.arrivals += 1;
        let arrival = self.arrivals;
        self.tenant(&demand.tenant.clone()).waiting.push_back((arrival, demand));
        true
    }

    /// Puts back demand that was picked but could not be placed, ahead of its tenant's queue,
    /// and gives back the running job it was counted as.
    pub fn put_back(&mut self, demand: Demand) {
        let queue = self.tenant(&demand.tenant.clone());
        queue.running = queue.running.saturating_sub(1);
        let arrival = queue.waiting.front().map_or(0, |(arrival, _)| arrival.saturating_sub(1));
        queue.waiting.push_front((arrival, demand));
    }

    /// Removes waiting demand, e.g. for a job cancelled or taken by another runner.
    pub fn withdraw(&mut self, key: &str) -> Option<Demand> {
        self.tenants.values_mut().find_map(|queue| {
            let index = queue.waiting.iter().position(|(_, demand)| demand.key == key)?;
            queue.waiting.remove(index).map(|(_, demand)| demand)
        })
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tenants.values().any(|queue| queue.waiting.iter().any(|(_, d)| d.key == key))
    }

    /// Picks the next demand that `fits` (some pool has room for its labels), counting it as
    /// running for its tenant until [`Schedule::finished`].
    pub fn next(&mut self, mut fits: impl FnMut(&Demand) -> bool) -> Option<Demand> {
        let mut best: Option<(&String, usize, u64)> = None;
        for (tenant, queue) in &self.tenants {
            if !queue.under_quota() {
                continue;
            }
            let Some(index) = queue.waiting.iter().position(|(_, demand)| fits(demand)) else {
                continue;
            };
            let arrival = queue.waiting[index].0;
            let better = match best {
                None => true,
                Some((other, _, other_arrival)) => {
                    let other = &self.tenants[other];
                    // running / weight, compared without division.
                    let mine = u64::from(queue.running) * u64::from(other.share.weight);
                    let theirs = u64::from(other.running) * u64::from(queue.share.weight);
                    mine < theirs || (mine == theirs && arrival < other_arrival)
                }
            };
            if better {
                best = Some((tenant, index, arrival));
            }
        }
        let (tenant, index, _) = best?;
        let tenant = tenant.clone();
        let queue = self.tenants.get_mut(&tenant).expect("the chosen tenant exists");
        queue.running += 1;
        queue.waiting.remove(index).map(|(_, demand)| demand)
    }

    /// Counts a job of `tenant` as running that no [`Schedule::next`] picked: one an earlier
    /// run of the daemon started, taken back by its slot.
    pub fn adopt(&mut self, tenant: &str, share: Share) {
        self.set_share(tenant, share);
        self.tenant(tenant).running += 1;
    }

    /// A job of `tenant` that [`Schedule::next`] picked has ended.
    pub fn finished(&mut self, tenant: &str) {
        if let Some(queue) = self.tenants.get_mut(tenant) {
            queue.running = queue.running.saturating_sub(1);
        }
    }

    pub fn waiting(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |queue| queue.waiting.len())
    }

    pub fn running(&self, tenant: &str) -> u32 {
        self.tenants.get(tenant).map_or(0, |queue| queue.running)
    }

    fn tenant(&mut self, tenant: &str) -> &mut TenantQueue {
        self.tenants.entry(tenant.to_owned()).or_insert_with(|| TenantQueue {
            share: Share::default(),
            waiting: VecDeque::new(),
            running: 0,
        })
    }
}

/// A slot reserved for one demand: the provider registers the runner and submits the job into
/// `reservation`, and drops `running` when the job has ended.
pub struct Assignment {
    pub demand: Demand,
    pub pool: String,
    pub pool_labels: Vec<String>,
    pub reservation: Reservation,
    pub running: Running,
}

/// Counts a job as running for its tenant until dropped.
pub struct Running {
    tenant: String,
    requests: mpsc::UnboundedSender<Request>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.requests.send(Request::Finished(std::mem::take(&mut self.tenant)));
    }
}

enum Request {
    Enqueue { demand: Demand, share: Share, to: mpsc::UnboundedSender<Assignment> },
    Adopt { tenant: String, share: Share },
    Withdraw(String),
    Finished(String),
    Waiting(tokio::sync::oneshot::Sender<usize>),
}

/// The handle of the scheduler task.
#[derive(Clone)]
pub struct Scheduler {
    requests: mpsc::UnboundedSender<Request>,
}

impl Scheduler {
    /// Starts the task that places demand on the pools of `control`.
    pub fn start(control: Arc<Control>) -> Scheduler {
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let task = SchedulerTask {
            control,
            schedule: Schedule::default(),
            providers: HashMap::new(),
            requests: requests.clone(),
        };
        tokio::spawn(task.run(requests_rx));
        Scheduler { requests }
    }

    /// Adds demand with its tenant's current share; its assignment arrives on `to`. Demand
    /// whose key already waits is ignored.
    pub fn enqueue(&self, demand: Demand, share: Share, to: mpsc::UnboundedSender<Assignment>) {
        let _ = self.requests.send(Request::Enqueue { demand, share, to });
    }

    pub fn withdraw(&self, key: &str) {
        let _ = self.requests.send(Request::Withdraw(key.to_owned()));
    }

    /// Counts an adopted job of `tenant` as running until the returned guard drops.
    pub fn adopt(&self, tenant: &str, share: Share) -> Running {
        let _ = self.requests.send(Request::Adopt { tenant: tenant.to_owned(), share });
        Running { tenant: tenant.to_owned(), requests: self.requests.clone() }
    }

    /// How much demand waits, across all tenants.
    pub async fn waiting(&self) -> usize {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.requests.send(Request::Waiting(tx));
        rx.await.unwrap_or(0)
    }
}

struct SchedulerTask {
    control: Arc<Control>,
    schedule: Schedule,
    /// Where each waiting demand's assignment goes, by key.
    providers: HashMap<String, mpsc::UnboundedSender<Assignment>>,
    requests: mpsc::UnboundedSender<Request>,
}

impl SchedulerTask {
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>) {
        let mut capacity: Vec<watch::Receiver<usize>> =
            self.control.pools().iter().map(|pool| pool.capacity()).collect();
        // Resuming a drained host changes no pool's capacity; the tick notices it.
        let mut tick = tokio::time::interval(PLACE_INTERVAL);
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    Some(request) => self.apply(request),
                    None => return,
                },
                changed = any_changed(&mut capacity) => {
                    if !changed {
                        return;
                    }
                }
                _ = tick.tick() => {}
            }
            self.place().await;
        }
    }

    fn apply(&mut self, request: Request) {
        match request {
            Request::Enqueue { demand, share, to } => {
                self.schedule.set_share(&demand.tenant, share);
                let key = demand.key.clone();
                if self.schedule.push(demand) {
                    debug!(demand = %key, "Demand waits");
                    self.providers.insert(key, to);
                }
            }
            Request::Withdraw(key) => {
                if self.schedule.withdraw(&key).is_some() {
                    debug!(demand = %key, "Demand withdrawn");
                    self.providers.remove(&key);
                }
            }
            Request::Adopt { tenant, share } => self.schedule.adopt(&tenant, share),
            Request::Finished(tenant) => self.schedule.finished(&tenant),
            Request::Waiting(reply) => {
                let _ = reply.send(self.providers.len());
            }
        }
    }

    /// Assigns demand to pools with room until none fits.
    async fn place(&mut self) {
        if self.control.is_draining() {
            return;
        }
        loop {
            let room: Vec<bool> =
                self.control.pools().iter().map(|pool| *pool.capacity().borrow() > 0).collect();
            let pools = self.control.pools();
            let fits = |demand: &Demand| {
                pools
                    .iter()
                    .zip(&room)
                    .any(|(pool, room)| *room && labels_fit(&demand.labels, pool.labels()))
            };
            let Some(demand) = self.schedule.next(fits) else { return };
            let Some(to) = self.providers.remove(&demand.key) else {
                self.schedule.finished(&demand.tenant);
                continue;
            };
            let pool = pools
                .iter()
                .zip(&room)
                .find(|(pool, room)| **room && labels_fit(&demand.labels, pool.labels()))
                .map(|(pool, _)| pool)
                .expect("a pool fits the demand next() picked");
            let Some(reservation) = pool.reserve().await else {
                // A local job took the room meanwhile; the capacity watch says when it is back.
                self.providers.insert(demand.key.clone(), to);
                self.schedule.put_back(demand);
                return;
            };
            info!(demand = %demand.key, tenant = %demand.tenant, pool = %pool.name(), slot = %reservation.slot_name(), "Demand assigned");
            let running =
                Running { tenant: demand.tenant.clone(), requests: self.requests.clone() };
            let assignment = Assignment {
                demand,
                pool: pool.name().to_owned(),
                pool_labels: pool.labels().to_vec(),
                reservation,
                running,
            };
            // A provider gone away drops the assignment, which releases the slot.
            let _ = to.send(assignment);
        }
    }
}

/// Waits until one of the pools' capacities changes; `false` once the pools are gone.
async fn any_changed(capacity: &mut [watch::Receiver<usize>]) -> bool {
    if capacity.is_empty() {
        std::future::pending::<()>().await;
    }
    let changes = capacity.iter_mut().map(|rx| Box::pin(rx.changed()));
    let (result, _, _) = futures_util::future::select_all(changes).await;
    result.is_ok()
}

#[cfg(test)]
mod tests;
