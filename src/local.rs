//! Local jobs: commands sent by root over the control socket or by a `local` tenant over the
//! API, run in a fresh slot.
//!
//! Concurrency: each job has a relay task that owns the job's event channel from the slot. It
//! records every step in the store, appends the event to the job's buffer and wakes the
//! readers, any number of which stream the buffer from its start ([`LocalJob::subscribe`]).
//! Cancelling a job makes the relay drop the channel, which the slot sees as its submitter
//! gone: the job ends and the slot reverts. A job's buffer is kept for a while after it ends,
//! so that a client that reconnects still gets the end of the output.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

use crate::metrics::Metrics;
use crate::slot::{JobEvent, JobFailure};
use crate::store::{Actor, JobTransition, Store};

/// Events kept per job; older log lines make way, and a late reader is told how many it missed.
const MAX_BUFFERED_EVENTS: usize = 10_000;
/// How long an ended job's output stays readable.
const RETENTION: Duration = Duration::from_secs(10 * 60);

/// The local jobs a daemon knows, running or recently ended.
#[derive(Default)]
pub struct LocalJobs {
    jobs: Mutex<HashMap<String, Arc<LocalJob>>>,
}

pub struct LocalJob {
    pub id: String,
    pub pool: String,
    pub tenant_id: String,
    buffer: Mutex<Buffer>,
    /// Bumped on every change of the buffer.
    changed: watch::Sender<u64>,
    cancel: Mutex<Option<oneshot::Sender<()>>>,
}

#[derive(Default)]
struct Buffer {
    events: VecDeque<JobEvent>,
    /// The absolute index of `events[0]`.
    base: usize,
    ended: bool,
}

impl LocalJobs {
    /// Starts relaying `events` of a job submitted to a pool; the job is readable at once.
    pub fn track(
        self: &Arc<Self>,
        id: String,
        pool: String,
        tenant_id: String,
        events: mpsc::Receiver<JobEvent>,
        store: Option<Arc<Store>>,
        metrics: Arc<Metrics>,
    ) -> Arc<LocalJob> {
        let (cancel, cancelled) = oneshot::channel();
        let job = Arc::new(LocalJob {
            id: id.clone(),
            pool,
            tenant_id,
            buffer: Mutex::default(),
            changed: watch::channel(0).0,
            cancel: Mutex::new(Some(cancel)),
        });
        self.jobs.lock().expect("local jobs").insert(id.clone(), job.clone());
        let jobs = self.clone();
        let relayed = job.clone();
        tokio::spawn(async move {
            let finished = relay(&relayed, events, cancelled, store.as_ref()).await;
            metrics.count_tenant_job(&relayed.tenant_id, finished);
            tokio::time::sleep(RETENTION).await;
            jobs.jobs.lock().expect("local jobs").remove(&id);
        });
        job
    }

    pub fn get(&self, id: &str) -> Option<Arc<LocalJob>> {
        self.jobs.lock().expect("local jobs").get(id).cloned()
    }
}

async fn relay(
    job: &LocalJob,
    mut events: mpsc::Receiver<JobEvent>,
    mut cancelled: oneshot::Receiver<()>,
    store: Option<&Arc<Store>>,
) -> bool {
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = &mut cancelled => {
                // Closing the channel is how the slot learns that nobody wants the job.
                events.close();
                Some(JobEvent::Failed { reason: JobFailure::Cancelled.to_string() })
            }
        };
        let event =
            event.unwrap_or_else(|| JobEvent::Failed { reason: "The job's slot went away".into() });
        let finished = matches!(event, JobEvent::Finished { .. });
        let ended = finished || matches!(event, JobEvent::Failed { .. });
        record(store, &job.id, &event).await;
        job.push(event, ended);
        if ended {
            return finished;
        }
    }
}

/// Records a job's progress; a store failure is logged and the job goes on.
async fn record(store: Option<&Arc<Store>>, job: &str, event: &JobEvent) {
    let Some(store) = store else { return };
    let transitions = match event {
        JobEvent::Started { index, .. } => {
            vec![JobTransition::Assign { slot_index: *index as u32 }, JobTransition::Start]
        }
        JobEvent::Log { .. } => return,
        JobEvent::Finished { exit_code } => vec![JobTransition::Finish { exit_code: *exit_code }],
        JobEvent::Failed { reason } => vec![JobTransition::Fail { reason: reason.clone() }],
    };
    let id = job.to_owned();
    let recorded = store
        .call(move |store| {
            transitions
                .into_iter()
                .try_for_each(|t| store.transition_job(&Actor::Daemon, &id, t).map(drop))
        })
        .await;
    if let Err(e) = recorded {
        warn!(job, error = %e, "Recording the job's progress failed");
    }
}

impl LocalJob {
    fn push(&self, event: JobEvent, ended: bool) {
        let mut buffer = self.buffer.lock().expect("job buffer");
        if buffer.events.len() == MAX_BUFFERED_EVENTS {
            buffer.events.pop_front();
            buffer.base += 1;
        }
        buffer.events.push_back(event);
        buffer.ended |= ended;
        drop(buffer);
        self.changed.send_modify(|version| *version += 1);
    }

    /// Ends the job if it is still queued or running.
    pub fn cancel(&self) {
        if let Some(cancel) = self.cancel.lock().expect("job cancel").take() {
            let _ = cancel.send(());
        }
    }

    /// The job's events from the first, live until its end.
    pub fn subscribe(self: &Arc<Self>) -> impl Stream<Item = JobEvent> + Send + 'static {
        let state = (self.clone(), 0usize, self.changed.subscribe());
        futures_util::stream::unfold(state, |(job, next, mut changed)| async move {
            loop {
                let found = {
                    let buffer = job.buffer.lock().expect("job buffer");
                    if next < buffer.base {
                        let missed = buffer.base - next;
                        let notice = format!("[warmpool: {missed} earlier lines were dropped]");
                        Some((JobEvent::Log { line: notice }, buffer.base))
                    } else if let Some(event) = buffer.events.get(next - buffer.base) {
                        Some((event.clone(), next + 1))
                    } else if buffer.ended {
                        return None;
                    } else {
                        None
                    }
                };
                match found {
                    Some((event, next)) => return Some((event, (job, next, changed))),
                    None => {
                        if changed.changed().await.is_err() {
                            return None;
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn readers_get_every_event_from_the_start_even_when_late() {
        let jobs = Arc::new(LocalJobs::default());
        let (events, events_rx) = mpsc::channel(8);
        let job = jobs.track("j".into(), "p".into(), "t".into(), events_rx, None, Arc::default());
        events.send(JobEvent::Started { slot: "s".into(), index: 0 }).await.unwrap();
        events.send(JobEvent::Log { line: "one".into() }).await.unwrap();
        let early = tokio::spawn(job.subscribe().collect::<Vec<_>>());
        events.send(JobEvent::Finished { exit_code: 3 }).await.unwrap();
        let early = early.await.unwrap();
        let late: Vec<_> = job.subscribe().collect().await;
        assert_eq!(early, late);
        assert_eq!(late.last(), Some(&JobEvent::Finished { exit_code: 3 }));
        assert!(jobs.get("j").is_some(), "an ended job stays readable");
    }

    #[tokio::test]
    async fn cancelling_drops_the_slots_channel_and_ends_the_job() {
        let jobs = Arc::new(LocalJobs::default());
        let (events, events_rx) = mpsc::channel(8);
        let job = jobs.track("j".into(), "p".into(), "t".into(), events_rx, None, Arc::default());
        job.cancel();
        let seen: Vec<_> = job.subscribe().collect().await;
        assert_eq!(seen, vec![JobEvent::Failed { reason: JobFailure::Cancelled.to_string() }]);
        events.closed().await;
    }

    #[tokio::test]
    async fn a_reader_behind_the_buffer_is_told_what_it_missed() {
        let jobs = Arc::new(LocalJobs::default());
        let (events, events_rx) = mpsc::channel(64);
        let job = jobs.track("j".into(), "p".into(), "t".into(), events_rx, None, Arc::default());
        let sender = tokio::spawn(async move {
            for i in 0..MAX_BUFFERED_EVENTS + 5 {
                events.send(JobEvent::Log { line: i.to_string() }).await.unwrap();
            }
            events.send(JobEvent::Finished { exit_code: 0 }).await.unwrap();
        });
        sender.await.unwrap();
        let seen: Vec<_> = job.subscribe().collect().await;
        assert_eq!(
            seen[0],
            JobEvent::Log { line: "[warmpool: 6 earlier lines were dropped]".into() }
        );
        assert_eq!(seen[1], JobEvent::Log { line: "6".into() });
        assert_eq!(seen.last(), Some(&JobEvent::Finished { exit_code: 0 }));
    }
}
