//! The reconciler: webhooks get lost, and a daemon can stop between registering a runner and
//! deleting it. Every `reconcile_interval` it asks GitHub, for each GitHub tenant:
//!
//! - which jobs are queued in the repositories that sent webhooks in the last day (and in a
//!   repository tenant's own repository): unknown ones become demand, and waiting demand that
//!   GitHub no longer lists as queued is withdrawn;
//! - which runners are registered: those named with this host's prefix that no launch owns are
//!   deleted. A launch owns its runner from before registration to after deletion, so a
//!   runner of a live launch is never taken for a leak.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use super::*;

/// What one reconciliation found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// Queued jobs that became demand.
    pub queued: usize,
    /// Waiting demand that GitHub no longer lists as queued.
    pub withdrawn: usize,
    /// Runners of this host that no launch owned, deleted.
    pub runners_deleted: usize,
    /// Tenants that could not be asked, with the reason.
    pub failed_tenants: Vec<(String, String)>,
}

impl GithubProvider {
    pub(super) async fn reconcile_periodically(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let outcome = self.reconcile().await;
            if outcome.queued + outcome.withdrawn + outcome.runners_deleted > 0 {
                info!(
                    queued = outcome.queued,
                    withdrawn = outcome.withdrawn,
                    runners_deleted = outcome.runners_deleted,
                    "Reconciled with GitHub"
                );
            }
        }
    }

    /// Checks every GitHub tenant's queued jobs and runners against what the provider knows.
    pub async fn reconcile(&self) -> Reconciliation {
        let mut outcome = Reconciliation::default();
        let tenants = match self.github_tenants().await {
            Ok(tenants) => tenants,
            Err(e) => {
                warn!(error = %e, "Reconciliation could not read the tenants");
                return outcome;
            }
        };
        for (tenant, settings) in tenants {
            if let Err(e) = self.reconcile_tenant(&tenant, &settings, &mut outcome).await {
                warn!(tenant = %tenant.name, error = %e, "Reconciliation failed for a tenant");
                outcome.failed_tenants.push((tenant.name.clone(), e.to_string()));
            }
        }
        outcome
    }

    async fn reconcile_tenant(
        &self,
        tenant: &Tenant,
        settings: &GithubSettings,
        outcome: &mut Reconciliation,
    ) -> Result<(), GithubError> {
        let client = self.client(tenant).await?;
        for (owner, repo) in self.active_repositories(&tenant.id, settings) {
            let started = Instant::now();
            let queued = client.queued_jobs(&owner, &repo).await?;
            for job in &queued {
                let accepted = self.queued(tenant, settings, &owner, &repo, job, Instant::now());
                if matches!(accepted, WebhookOutcome::Accepted(_)) {
                    outcome.queued += 1;
                }
            }
            let listed: HashSet<u64> = queued.iter().map(|job| job.id).collect();
            outcome.withdrawn +=
                self.withdraw_unlisted(&tenant.id, &owner, &repo, &listed, started);
        }
        outcome.runners_deleted += self.delete_leaked_runners(&client).await?;
        Ok(())
    }

    fn active_repositories(
        &self,
        tenant: &str,
        settings: &GithubSettings,
    ) -> Vec<(String, String)> {
        let now = Instant::now();
        let state = self.state.lock().expect("provider state");
        let mut repositories: Vec<(String, String)> = state
            .repositories
            .get(tenant)
            .map(|seen| {
                seen.iter()
                    .filter(|(_, at)| now.duration_since(**at) < ACTIVE_REPOSITORY)
                    .map(|(repository, _)| repository.clone())
                    .collect()
            })
            .unwrap_or_default();
        if let GithubScope::Repository(owner, repo) = settings.scope() {
            if !repositories.iter().any(|(o, r)| *o == owner && *r == repo) {
                repositories.push((owner, repo));
            }
        }
        repositories.sort();
        repositories
    }

    /// Withdraws waiting demand of a repository that GitHub did not list as queued, if it was
    /// queued before the listing began (a newer job may not be listed yet).
    fn withdraw_unlisted(
        &self,
        tenant: &str,
        owner: &str,
        repo: &str,
        listed: &HashSet<u64>,
        listing_began: Instant,
    ) -> usize {
        let mut state = self.state.lock().expect("provider state");
        let mut withdrawn = 0;
        for (key, job) in state.jobs.iter_mut() {
            let unlisted = job.tenant == tenant
                && job.owner == owner
                && job.repo == repo
                && job.phase == Phase::Waiting
                && job.queued_at < listing_began
                && !listed.contains(&job.job_id);
            if unlisted {
                job.phase = Phase::Ended;
                job.changed_at = Instant::now();
                self.scheduler.withdraw(key);
                withdrawn += 1;
            }
        }
        withdrawn
    }

    async fn delete_leaked_runners(&self, client: &GithubClient) -> Result<usize, GithubError> {
        let prefix = self.settings.runner_prefix();
        let runners = client.list_runners().await?;
        let leaked: Vec<_> = {
            let state = self.state.lock().expect("provider state");
            runners
                .into_iter()
                .filter(|r| r.name.starts_with(&prefix) && !state.runners.contains_key(&r.name))
                .collect()
        };
        let mut deleted = 0;
        for runner in &leaked {
            info!(runner = %runner.name, runner_id = runner.id, "Deleting a runner no launch owns");
            // A runner still busy with a job (GitHub answers 422) is deleted at a later round.
            match client.delete_runner(runner.id).await {
                Ok(()) => deleted += 1,
                Err(e) => warn!(runner = %runner.name, error = %e, "Runner not deleted"),
            }
        }
        Ok(deleted)
    }
}
