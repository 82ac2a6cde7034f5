//! A launch: one runner on one reserved slot, from registration to deletion.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::*;

/// Where following a job starts: nothing yet for a launch; for an adopted job, what the
/// earlier run knew.
#[derive(Debug, Default)]
struct Following {
    took: Option<u64>,
    idle_deadline: Option<Instant>,
    grace_deadline: Option<Instant>,
}

/// How a launch's job ended, for the record and for its demand.
struct Ending {
    /// `Ok(exit code)` when the guest said `finished`; otherwise why it ended.
    result: Result<i32, String>,
    /// The GitHub job the runner took, if it took one.
    took: Option<u64>,
}

impl GithubProvider {
    pub(super) async fn launch(self: Arc<Self>, assignment: Assignment) {
        let Assignment { demand, pool, pool_labels, reservation, running } = assignment;
        let slot = reservation.slot_name().trim_start_matches("warmpool-").to_owned();
        let Some(job) = self.job(&demand.key) else { return };
        let runner_name = format!("{}{slot}-{}", self.settings.runner_prefix(), job.job_id);
        let (notes, notes_rx) = mpsc::unbounded_channel();
        if !self.begin(&demand.key, &runner_name, notes) {
            debug!("Demand ended before its launch");
            return;
        }
        let record = match self.record(&job, &pool, &runner_name).await {
            Ok(record) => record,
            Err(e) => return self.abandon(&demand.key, &runner_name, None, &e.to_string()).await,
        };
        let registered = self.register(&job, &runner_name, &pool_labels).await;
        let (client, runner) = match registered {
            Ok(registered) => registered,
            Err(e) => {
                warn!(runner = %runner_name, error = %e, "Runner not registered");
                return self
                    .abandon(&demand.key, &runner_name, Some(&record), &e.to_string())
                    .await;
            }
        };
        info!(runner = %runner_name, runner_id = runner.runner.id, job = job.job_id, "Runner registered");

        let (events, events_rx) = mpsc::channel(JOB_EVENTS);
        let run = Run::GithubRunner { jit_config: runner.encoded_jit_config };
        reservation.submit(Job::new(record.clone(), run, events));
        let ending = self.follow(&job, &record, events_rx, notes_rx, Following::default()).await;

        if let Err(e) = client.delete_runner(runner.runner.id).await {
            // The reconciler removes it later: it matches this host's prefix and no live runner.
            warn!(runner = %runner_name, error = %e, "Runner not deleted; left to the reconciler");
        } else {
            info!(runner = %runner_name, "Runner deleted");
        }
        // A runner that ended without taking a job, as far as webhooks told: GitHub knows
        // whether its job still waits (the webhook may be late, or lost).
        let still_queued = match ending.took {
            Some(_) => Some(false),
            None => match client.job_status(&job.owner, &job.repo, job.run_id, job.job_id).await {
                Ok(status) => Some(status == "queued"),
                Err(e) => {
                    warn!(job = job.job_id, error = %e, "Job status unknown; left to the reconciler");
                    None
                }
            },
        };
        self.settle(&demand.key, &runner_name, &ending, still_queued);
        drop(running);
    }

    /// Makes an adopted runner the provider's own again: its GitHub job is launched on it, and
    /// webhooks about it reach the returned channel.
    pub(super) fn take_back(&self, runner: &AdoptedRunner) -> mpsc::UnboundedReceiver<Note> {
        let (notes, notes_rx) = mpsc::unbounded_channel();
        let key = demand_key(&runner.tenant, runner.job_id);
        let now = std::time::Instant::now();
        let job = GithubJob {
            tenant: runner.tenant.clone(),
            job_id: runner.job_id,
            run_id: runner.run_id,
            owner: runner.owner.clone(),
            repo: runner.repo.clone(),
            // Unknown after a restart: a job that must wait again waits for the reconciler,
            // which brings its labels, rather than for a quick retry without them.
            labels: Vec::new(),
            share: runner.share,
            phase: Phase::Launched { runner: runner.runner_name.clone() },
            queued_at: now,
            changed_at: now,
            quick_retries: MAX_QUICK_RETRIES,
        };
        let mut state = self.state.lock().expect("provider state");
        state.jobs.insert(key.clone(), job);
        state.runners.insert(runner.runner_name.clone(), LiveRunner { key, notes });
        notes_rx
    }

    /// Follows an adopted runner job to its end, then deletes the runner, as its launch would
    /// have. The job's timeouts start again from now: the runner idle timeout if GitHub had
    /// not said the runner took its job, the completed grace if it had said the job completed.
    pub(super) async fn resume(
        self: Arc<Self>,
        runner: AdoptedRunner,
        events: mpsc::Receiver<JobEvent>,
        notes: mpsc::UnboundedReceiver<Note>,
        running: crate::scheduler::Running,
    ) {
        let key = demand_key(&runner.tenant, runner.job_id);
        let Some(job) = self.job(&key) else { return };
        info!(runner = %runner.runner_name, job = runner.job_id, status = %runner.status, "Runner job adopted");
        let now = Instant::now();
        let from = Following {
            took: (runner.status != "queued").then_some(runner.job_id),
            idle_deadline: (runner.status == "queued")
                .then(|| now + self.settings.runner_idle_timeout),
            grace_deadline: (runner.status == "completed")
                .then(|| now + self.settings.completed_grace),
        };
        let ending = self.follow(&job, &runner.record, events, notes, from).await;
        self.delete_runner_named(&runner.tenant, &runner.runner_name).await;
        // A runner that took nothing leaves its job to the reconciler, which knows its labels.
        let still_queued = ending.took.map(|_| false);
        self.settle(&key, &runner.runner_name, &ending, still_queued);
        drop(running);
    }

    /// Deletes the runner of this name; one GitHub has no more is fine, and one that cannot be
    /// deleted now is left to the reconciler.
    async fn delete_runner_named(&self, tenant_id: &str, name: &str) {
        let deleted = async {
            let client = self.client(&self.tenant(tenant_id).await?).await?;
            delete_named(&client, name).await
        };
        match deleted.await {
            Ok(Some(_)) => info!(runner = %name, "Runner deleted"),
            Ok(None) => info!(runner = %name, "Runner gone already"),
            Err(e) => {
                warn!(runner = %name, error = %e, "Runner not deleted; left to the reconciler")
            }
        }
    }

    fn job(&self, key: &str) -> Option<GithubJob> {
        self.state.lock().expect("provider state").jobs.get(key).cloned()
    }

    /// Marks the demand launched and its runner live, unless the job ended meanwhile. A live
    /// runner is one the reconciler leaves alone, so it is live before it is registered.
    fn begin(&self, key: &str, runner: &str, notes: mpsc::UnboundedSender<Note>) -> bool {
        let mut state = self.state.lock().expect("provider state");
        let Some(job) = state.jobs.get_mut(key) else { return false };
        if job.phase != Phase::Waiting {
            return false;
        }
        job.phase = Phase::Launched { runner: runner.to_owned() };
        job.changed_at = std::time::Instant::now();
        state.runners.insert(runner.to_owned(), LiveRunner { key: key.to_owned(), notes });
        true
    }

    /// Records the job in the store, with what GitHub knows it by.
    async fn record(
        &self,
        job: &GithubJob,
        pool: &str,
        runner: &str,
    ) -> Result<String, StoreError> {
        let id =
            format!("github-{}-{}", job.job_id, &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let new = NewJob { id: id.clone(), tenant_id: job.tenant.clone(), pool: pool.to_owned() };
        let detail = json!({
            "github_job_id": job.job_id,
            "run_id": job.run_id,
            "repository": format!("{}/{}", job.owner, job.repo),
            "runner_name": runner,
            "status": "queued",
        });
        let store = self.store.clone();
        let record_id = id.clone();
        store
            .call(move |store| {
                store.record_job(&Actor::Daemon, new)?;
                store.set_job_detail(&Actor::Daemon, &record_id, detail)
            })
            .await?;
        Ok(id)
    }

    /// The tenant's record, read when a runner is registered or deleted, so that changed
    /// settings and credentials apply.
    async fn tenant(&self, id: &str) -> Result<Tenant, GithubError> {
        let id = id.to_owned();
        let store = self.store.clone();
        let tenant = store.call(move |store| store.get_tenant(&id)).await;
        tenant.map_err(|e| GithubError::Credentials(e.to_string()))
    }

    /// Registers the runner. A registration of the same name left by an earlier attempt
    /// (GitHub answers 409) is deleted and the registration tried once more.
    async fn register(
        &self,
        job: &GithubJob,
        name: &str,
        labels: &[String],
    ) -> Result<(Arc<GithubClient>, client::JitRunner), GithubError> {
        let tenant = self.tenant(&job.tenant).await?;
        let TenantSettings::Github(settings) = &tenant.settings else {
            return Err(GithubError::Credentials("the tenant is no GitHub tenant".into()));
        };
        let client = self.client(&tenant).await?;
        let group = settings.runner_group_id;
        match client.generate_jit_config(name, group, labels).await {
            Err(GithubError::Conflict(_)) => {
                if let Some(stale) = delete_named(&client, name).await? {
                    info!(runner = %name, runner_id = stale, "Deleted a stale runner of the same name");
                }
                let runner = client.generate_jit_config(name, group, labels).await?;
                Ok((client, runner))
            }
            result => Ok((client, result?)),
        }
    }

    /// Follows the job to its end: the slot's events, and what webhooks say of the runner.
    async fn follow(
        &self,
        job: &GithubJob,
        record: &str,
        mut events: mpsc::Receiver<JobEvent>,
        mut notes: mpsc::UnboundedReceiver<Note>,
        from: Following,
    ) -> Ending {
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let mut idle_deadline = from.idle_deadline.unwrap_or(far);
        let mut grace_deadline = from.grace_deadline.unwrap_or(far);
        let mut took = from.took;
        let result = loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(JobEvent::Started { index, .. }) => {
                        self.metrics.record(Series::WebhookToStart, job.queued_at.elapsed());
                        self.transition(record, JobTransition::Assign { slot_index: index as u32 }).await;
                        self.transition(record, JobTransition::Start).await;
                        idle_deadline = Instant::now() + self.settings.runner_idle_timeout;
                    }
                    Some(JobEvent::Log { line }) => debug!(line = %line, "Runner output"),
                    Some(JobEvent::Finished { exit_code }) => break Ok(exit_code),
                    Some(JobEvent::Failed { reason }) => break Err(reason),
                    None => break Err("the slot ended the job without a word".into()),
                },
                Some(note) = notes.recv() => match note {
                    Note::InProgress { job_id } => {
                        took = Some(job_id);
                        self.update_detail(record, job_id, "in_progress", None).await;
                    }
                    Note::Completed { job_id, conclusion } => {
                        self.update_detail(record, job_id, "completed", conclusion).await;
                        grace_deadline = Instant::now() + self.settings.completed_grace;
                    }
                },
                _ = tokio::time::sleep_until(idle_deadline), if took.is_none() => {
                    let timeout = self.settings.runner_idle_timeout;
                    break Err(format!("the runner took no job within {timeout:?}"));
                }
                _ = tokio::time::sleep_until(grace_deadline) => {
                    let grace = self.settings.completed_grace;
                    break Err(format!("the runner did not exit within {grace:?} of its job completing"));
                }
            }
        };
        // Dropping the receiver ends a job still running: its slot reverts.
        drop(events);
        self.metrics.count_tenant_job(&job.tenant, result.is_ok());
        match &result {
            Ok(exit_code) => {
                self.transition(record, JobTransition::Finish { exit_code: *exit_code }).await
            }
            Err(reason) => {
                self.transition(record, JobTransition::Fail { reason: reason.clone() }).await
            }
        }
        Ending { result, took }
    }

    async fn transition(&self, record: &str, transition: JobTransition) {
        let store = self.store.clone();
        let id = record.to_owned();
        if let Err(e) =
            store.call(move |store| store.transition_job(&Actor::Daemon, &id, transition)).await
        {
            warn!(job = %record, error = %e, "Job record not updated");
        }
    }

    async fn update_detail(
        &self,
        record: &str,
        job_id: u64,
        status: &str,
        conclusion: Option<String>,
    ) {
        let store = self.store.clone();
        let id = record.to_owned();
        let status = status.to_owned();
        let result = store
            .call(move |store| {
                let mut detail = store.get_job(&id)?.detail.unwrap_or_else(|| json!({}));
                detail["github_job_id"] = json!(job_id);
                detail["status"] = json!(status);
                if let Some(conclusion) = conclusion {
                    detail["conclusion"] = json!(conclusion);
                }
                store.set_job_detail(&Actor::Daemon, &id, detail)
            })
            .await;
        if let Err(e) = result {
            warn!(job = %record, error = %e, "Job detail not updated");
        }
    }

    /// Ends a launch that never submitted its job: the record fails, the demand waits for the
    /// reconciler, and the reservation is released when the assignment drops.
    async fn abandon(&self, key: &str, runner: &str, record: Option<&str>, reason: &str) {
        if let Some(record) = record {
            self.transition(record, JobTransition::Fail { reason: reason.to_owned() }).await;
        }
        let mut state = self.state.lock().expect("provider state");
        state.runners.remove(runner);
        if let Some(job) = state.jobs.get_mut(key) {
            if job.phase == (Phase::Launched { runner: runner.to_owned() }) {
                job.phase = Phase::Failed;
                job.changed_at = std::time::Instant::now();
            }
        }
    }

    /// After the runner is gone: the job it took has ended. The job it was registered for, if
    /// GitHub still lists it as queued, waits again: at once for a quick retry, after that for
    /// the reconciler, so that a runner image that fails at once cannot spin through slots.
    /// `still_queued` is `None` when GitHub could not say.
    fn settle(&self, key: &str, runner: &str, ending: &Ending, still_queued: Option<bool>) {
        let mut state = self.state.lock().expect("provider state");
        let live = state.runners.remove(runner);
        let launched = Phase::Launched { runner: runner.to_owned() };
        if let Some(taken) = live.as_ref().map(|live| live.key.clone()).filter(|k| k != key) {
            if let Some(job) = state.jobs.get_mut(&taken) {
                if job.phase == launched {
                    job.phase = Phase::Ended;
                }
            }
        }
        let Some(job) = state.jobs.get_mut(key) else { return };
        if job.phase != launched {
            return;
        }
        job.changed_at = std::time::Instant::now();
        if ending.took.is_some() || still_queued == Some(false) {
            job.phase = Phase::Ended;
        } else if still_queued.is_some() && job.quick_retries < MAX_QUICK_RETRIES {
            job.quick_retries += 1;
            job.phase = Phase::Waiting;
            let demand = Demand {
                key: key.to_owned(),
                tenant: job.tenant.clone(),
                labels: job.labels.clone(),
            };
            info!(job = job.job_id, outcome = ?ending.result, "Runner took no job; the job waits again");
            self.scheduler.enqueue(demand, job.share, self.assignments.clone());
        } else {
            job.phase = Phase::Failed;
        }
    }
}

/// Deletes the runner named `name`, returning its id; `None` when GitHub has none of that name.
async fn delete_named(client: &GithubClient, name: &str) -> Result<Option<u64>, GithubError> {
    let found = client.list_runners().await?.into_iter().find(|runner| runner.name == name);
    let Some(runner) = found else { return Ok(None) };
    client.delete_runner(runner.id).await?;
    Ok(Some(runner.id))
}
