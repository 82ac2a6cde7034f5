//! Slot tests against the fake hypervisor; overlays are real `qemu-img` files in a temp dir.

use std::collections::BTreeSet;

use tokio::sync::mpsc::{Receiver, UnboundedReceiver};
use tokio::task::JoinHandle;

use super::*;
use crate::hypervisor::fake::{Boot, FakeHypervisor, FAKE_TEMPLATE};

const WAIT: Duration = Duration::from_secs(10);

struct Harness {
    fake: FakeHypervisor,
    dir: tempfile::TempDir,
    reports: UnboundedReceiver<SlotReport>,
    commands: mpsc::Sender<SlotCommand>,
    stopping: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// Every transition seen so far.
    seen: Vec<(SlotState, SlotState)>,
    state: SlotState,
    metrics: Arc<Metrics>,
    spec: Arc<SlotSpec>,
}

struct Limits {
    max_job: Duration,
    boot_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_job: Duration::from_secs(30), boot_timeout: Duration::from_secs(5) }
    }
}

impl Harness {
    fn start(fake: FakeHypervisor, limits: Limits) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.qcow2");
        crate::disk::test_image(&image);
        let spec = Arc::new(SlotSpec {
            pool: "test".into(),
            image,
            template: Template::parse("fake", FAKE_TEMPLATE).unwrap(),
            values: BTreeMap::new(),
            nvram_template: None,
            boot_timeout: limits.boot_timeout,
            max_job: limits.max_job,
            tpm: false,
            dir: dir.path().join("slots"),
            owner: dir.path().display().to_string(),
            first_backoff: Duration::from_millis(50),
            network: None,
        });
        Harness::spawn(fake, dir, spec, None, Vec::new())
    }

    /// Starts the slot's task, taking over `dir` (as a restarted daemon would) with the
    /// transitions seen so far.
    fn spawn(
        fake: FakeHypervisor,
        dir: tempfile::TempDir,
        spec: Arc<SlotSpec>,
        adoption: Option<Adoption>,
        seen: Vec<(SlotState, SlotState)>,
    ) -> Harness {
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::channel(8);
        let (stopping, stopping_rx) = watch::channel(false);
        let metrics = Arc::new(Metrics::default());
        let hypervisor: Arc<dyn Hypervisor> = Arc::new(fake.clone());
        let slot = Slot::new(0, spec.clone(), hypervisor, metrics.clone(), reports_tx, stopping_rx);
        let slot = match adoption {
            Some(adoption) => slot.adopt(adoption),
            None => slot,
        };
        let task = tokio::spawn(slot.run(commands_rx));
        Harness {
            fake,
            dir,
            reports,
            commands,
            stopping,
            task,
            seen,
            state: SlotState::Empty,
            metrics,
            spec,
        }
    }

    /// Ends the slot's task, by a shutdown or, with `kill`, as a killed daemon would, and
    /// starts a new one on the same directory.
    async fn restart(self, kill: bool, adoption: Option<Adoption>) -> Harness {
        let Harness { fake, dir, spec, seen, task, commands, .. } = self;
        if kill {
            task.abort();
            let _ = task.await;
        } else {
            drop(commands);
            tokio::time::timeout(WAIT, task).await.expect("the slot stops").unwrap();
        }
        Harness::spawn(fake, dir, spec, adoption, seen)
    }

    fn slot_dir(&self) -> PathBuf {
        self.dir.path().join("slots/0")
    }

    async fn next_report(&mut self) -> SlotReport {
        tokio::time::timeout(WAIT, self.reports.recv())
            .await
            .expect("a report in time")
            .expect("a report")
    }

    /// Waits for the slot to reach `want`, recording every transition on the way.
    async fn reach(&mut self, want: SlotState) -> Option<String> {
        loop {
            if let SlotReport::State { state, error, .. } = self.next_report().await {
                self.seen.push((self.state, state));
                self.state = state;
                if state == want {
                    return error;
                }
            }
        }
    }

    /// Waits for exactly these states, in this order.
    async fn expect(&mut self, states: &[SlotState]) {
        for want in states {
            let SlotReport::State { state, .. } = self.next_report().await else {
                panic!("a returned job")
            };
            self.seen.push((self.state, state));
            self.state = state;
            assert_eq!(state, *want, "transitions so far: {:?}", self.seen);
        }
    }

    async fn ready(&mut self) {
        self.commands.send(SlotCommand::Restore).await.unwrap();
        self.expect(&[SlotState::Restoring, SlotState::Ready]).await;
    }

    /// Assigns a job and collects its events up to the last one.
    async fn run(&mut self, script: &str) -> (Receiver<JobEvent>, Vec<JobEvent>) {
        let (events_tx, mut events) = mpsc::channel(64);
        let job = Job::new("job-1".into(), Run::script(script), events_tx);
        self.commands.send(SlotCommand::Assign(job)).await.unwrap();
        let mut seen = Vec::new();
        loop {
            let event = tokio::time::timeout(WAIT, events.recv())
                .await
                .expect("an event in time")
                .expect("an event");
            let last = matches!(event, JobEvent::Finished { .. } | JobEvent::Failed { .. });
            seen.push(event);
            if last {
                return (events, seen);
            }
        }
    }

    /// Stops the slot and hands back its directory.
    async fn stop(self) -> tempfile::TempDir {
        drop(self.commands);
        tokio::time::timeout(WAIT, self.task).await.expect("the slot stops").unwrap();
        self.dir
    }
}

fn failure(events: &[JobEvent]) -> String {
    match events.last() {
        Some(JobEvent::Failed { reason }) => reason.clone(),
        other => panic!("expected a failed job, got {other:?}"),
    }
}

#[test]
fn transition_table_matches_the_diagram() {
    use SlotState::*;
    // Rows are `from`, columns are `to`, in the order of `SlotState::ALL`.
    let table = [
        //  Em Bu Sa Rs Rd Ru Rv Qu Rb
        [0, 1, 0, 0, 0, 1, 1, 0, 0], // Empty
        [0, 0, 1, 0, 0, 0, 0, 1, 0], // Building
        [0, 0, 0, 1, 0, 0, 0, 0, 0], // Saved
        [0, 0, 0, 0, 1, 0, 1, 0, 0], // Restoring
        [0, 0, 0, 0, 0, 1, 1, 0, 0], // Ready
        [0, 0, 0, 0, 0, 0, 1, 0, 0], // Running
        [0, 0, 1, 0, 0, 0, 0, 1, 0], // Reverting
        [0, 0, 0, 0, 0, 0, 0, 0, 1], // Quarantined
        [1, 0, 0, 0, 0, 0, 0, 0, 0], // Rebuilding
    ];
    assert_eq!(
        SlotState::ALL,
        [Empty, Building, Saved, Restoring, Ready, Running, Reverting, Quarantined, Rebuilding]
    );
    for (i, from) in SlotState::ALL.iter().enumerate() {
        for (j, to) in SlotState::ALL.iter().enumerate() {
            assert_eq!(from.can_become(*to), table[i][j] == 1, "{from} -> {to}");
        }
    }
}

#[tokio::test]
async fn slot_makes_every_allowed_transition_and_no_other() {
    let fake = FakeHypervisor::new();
    let mut h = Harness::start(
        fake.clone(),
        Limits { boot_timeout: Duration::from_millis(300), ..Limits::default() },
    );
    h.expect(&[SlotState::Building, SlotState::Saved]).await;

    // A job, then its revert.
    h.ready().await;
    let (_, events) = h.run("echo hi").await;
    assert_eq!(events.last(), Some(&JobEvent::Finished { exit_code: 0 }));
    h.expect(&[SlotState::Running, SlotState::Reverting, SlotState::Saved]).await;

    // A ready slot whose QEMU dies is reverted.
    h.ready().await;
    h.fake.kill("warmpool-test-0");
    h.expect(&[SlotState::Reverting, SlotState::Saved]).await;

    // A restore that fails is reverted.
    h.fake.fail("restore", 1);
    h.commands.send(SlotCommand::Restore).await.unwrap();
    h.expect(&[SlotState::Restoring, SlotState::Reverting, SlotState::Saved]).await;

    // A restarted daemon keeps the clean snapshot and only reverts to it.
    let mut h = h.restart(false, None).await;
    h.expect(&[SlotState::Reverting, SlotState::Saved]).await;

    // A job running when the daemon was killed is adopted by the next one.
    h.ready().await;
    let (events_tx, _events) = mpsc::channel(8);
    let job = Job::new("survivor".into(), Run::script("fake:survive"), events_tx);
    h.commands.send(SlotCommand::Assign(job)).await.unwrap();
    h.expect(&[SlotState::Running]).await;
    let (events_tx, mut events) = mpsc::channel(8);
    let time_left = Duration::from_secs(30);
    let adoption = Adoption { job: "survivor".into(), events: events_tx, time_left };
    let mut h = h.restart(true, Some(adoption)).await;
    h.expect(&[SlotState::Running, SlotState::Reverting, SlotState::Saved]).await;
    let log = events.recv().await;
    assert_eq!(log, Some(JobEvent::Log { line: "survived the daemon".into() }));
    assert_eq!(events.recv().await, Some(JobEvent::Finished { exit_code: 0 }));

    // A revert that fails twice quarantines; the quarantine ends in a rebuild, whose guest
    // never says ready, which quarantines again.
    h.ready().await;
    h.fake.fail("destroy", 2);
    h.fake.set_boot(Boot::Silent);
    let _ = h.run("echo again").await;
    h.expect(&[SlotState::Running, SlotState::Reverting, SlotState::Quarantined]).await;
    h.expect(&[
        SlotState::Rebuilding,
        SlotState::Empty,
        SlotState::Building,
        SlotState::Quarantined,
    ])
    .await;

    let seen: BTreeSet<_> = h.seen.iter().copied().collect();
    for (from, to) in &seen {
        assert!(from.can_become(*to), "made a forbidden transition {from} -> {to}");
    }
    let allowed: BTreeSet<_> = SlotState::ALL
        .iter()
        .flat_map(|from| SlotState::ALL.iter().map(move |to| (*from, *to)))
        .filter(|(from, to)| from.can_become(*to))
        .collect();
    assert_eq!(seen, allowed, "every allowed transition is exercised");
    h.stop().await;
}

#[tokio::test]
async fn job_output_and_exit_code_reach_the_submitter() {
    let mut h = Harness::start(FakeHypervisor::new(), Limits::default());
    h.reach(SlotState::Saved).await;
    h.ready().await;
    let (_, events) = h.run("echo one\nexit 7").await;
    assert_eq!(
        events,
        vec![
            JobEvent::Started { slot: "warmpool-test-0".into(), index: 0 },
            JobEvent::Log { line: "echo one".into() },
            JobEvent::Log { line: "exit 7".into() },
            JobEvent::Finished { exit_code: 7 },
        ]
    );
    h.reach(SlotState::Saved).await;
    let stats = h.metrics.snapshot();
    assert_eq!((stats.jobs_ok, stats.jobs_failed), (1, 0));
    assert_eq!(stats.assign_ms.len(), 1);
    assert_eq!(stats.build_ms.len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn misbehaving_guests_fail_the_job_and_the_slot_comes_back() {
    let mut h = Harness::start(FakeHypervisor::new(), Limits::default());
    h.reach(SlotState::Saved).await;
    let cases = [
        ("fake:flood", "over 65536 bytes"),
        ("fake:garbage", "malformed"),
        ("fake:finish-early", "`finished` while the daemon expected `started`"),
        ("fake:poweroff", "stopped before it reported the job finished"),
    ];
    for (script, expected) in cases {
        h.ready().await;
        let (_, events) = h.run(script).await;
        let reason = failure(&events);
        assert!(reason.contains(expected), "{script}: {reason}");
        h.expect(&[SlotState::Running, SlotState::Reverting, SlotState::Saved]).await;
    }
    // The slot still serves jobs afterwards.
    h.ready().await;
    let (_, events) = h.run("exit 0").await;
    assert_eq!(events.last(), Some(&JobEvent::Finished { exit_code: 0 }));
    assert_eq!(h.metrics.snapshot().jobs_failed, cases.len() as u64);
    h.stop().await;
}

#[tokio::test]
async fn a_job_that_outlives_its_maximum_is_ended_and_reverted() {
    let limits = Limits { max_job: Duration::from_millis(300), ..Limits::default() };
    let mut h = Harness::start(FakeHypervisor::new(), limits);
    h.reach(SlotState::Saved).await;
    h.ready().await;
    let (_, events) = h.run("fake:hang").await;
    assert!(failure(&events).contains("maximum duration"), "{events:?}");
    h.expect(&[SlotState::Running, SlotState::Reverting, SlotState::Saved]).await;
    assert!(h.fake.domains().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn a_job_whose_submitter_leaves_is_cancelled_and_reverted() {
    let mut h = Harness::start(FakeHypervisor::new(), Limits::default());
    h.reach(SlotState::Saved).await;
    h.ready().await;
    let (events_tx, events) = mpsc::channel(8);
    h.commands
        .send(SlotCommand::Assign(Job::new("j".into(), Run::script("fake:hang"), events_tx)))
        .await
        .unwrap();
    h.expect(&[SlotState::Running]).await;
    drop(events);
    h.expect(&[SlotState::Reverting, SlotState::Saved]).await;
    h.stop().await;
}

#[tokio::test]
async fn a_guest_that_never_says_ready_is_quarantined_with_a_clear_error() {
    let fake = FakeHypervisor::new();
    fake.set_boot(Boot::Silent);
    let limits = Limits { boot_timeout: Duration::from_millis(200), ..Limits::default() };
    let mut h = Harness::start(fake, limits);
    h.expect(&[SlotState::Building]).await;
    let error = h.reach(SlotState::Quarantined).await.expect("a quarantine reason");
    assert!(error.contains("did not say `ready` within"), "{error}");
    assert!(error.contains("console.log"), "{error}");
    assert!(h.fake.domains().is_empty(), "the failed build's domain is destroyed");

    // Jobs sent to a quarantined slot come back to the pool rather than vanish.
    let (events_tx, _events) = mpsc::channel(8);
    h.commands
        .send(SlotCommand::Assign(Job::new("j".into(), Run::script("true"), events_tx)))
        .await
        .unwrap();
    loop {
        if let SlotReport::Returned { job, .. } = h.next_report().await {
            assert_eq!(job.id, "j");
            break;
        }
    }
    h.stop().await;
}

#[tokio::test]
async fn the_clean_snapshot_is_frozen_and_restores_onto_the_job_overlay() {
    use std::os::unix::fs::PermissionsExt;
    let mut h = Harness::start(FakeHypervisor::new(), Limits::default());
    h.reach(SlotState::Saved).await;
    let dir = h.slot_dir();
    let mode = std::fs::metadata(dir.join("clean.qcow2")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o444);
    let restore = std::fs::read_to_string(dir.join("restore.xml")).unwrap();
    assert!(
        restore.contains(&format!("<disk>{}</disk>", dir.join("job.qcow2").display())),
        "{restore}"
    );
    assert!(dir.join("memory.save").exists());
    h.stop().await;
}

#[tokio::test]
async fn shutdown_ends_a_running_job_and_keeps_only_the_clean_snapshot() {
    let mut h = Harness::start(FakeHypervisor::new(), Limits::default());
    h.reach(SlotState::Saved).await;
    h.ready().await;
    let (events_tx, mut events) = mpsc::channel(8);
    h.commands
        .send(SlotCommand::Assign(Job::new("j".into(), Run::script("fake:hang"), events_tx)))
        .await
        .unwrap();
    h.expect(&[SlotState::Running]).await;
    h.stopping.send_replace(true);
    h.commands.send(SlotCommand::Shutdown).await.unwrap();
    let mut last = None;
    while let Some(event) = events.recv().await {
        last = Some(event);
    }
    assert_eq!(last, Some(JobEvent::Failed { reason: "The daemon is shutting down".into() }));
    let dir = h.slot_dir();
    let fake = h.fake.clone();
    let _kept = h.stop().await;
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["clean.qcow2", "memory.save", "restore.xml", "snapshot.json"]);
    assert!(fake.domains().is_empty(), "the slot's domain is destroyed");
}

#[tokio::test]
async fn a_snapshot_of_another_image_is_not_kept() {
    let h = Harness::start(FakeHypervisor::new(), Limits::default());
    let mut h = h.restart(false, None).await;
    h.reach(SlotState::Saved).await;
    let manifest = h.slot_dir().join("snapshot.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("\"image_len\": ", "\"image_len\": 1")).unwrap();
    let mut h = h.restart(false, None).await;
    h.expect(&[SlotState::Building, SlotState::Saved]).await;
    std::fs::remove_file(h.slot_dir().join("memory.save")).unwrap();
    let mut h = h.restart(false, None).await;
    h.expect(&[SlotState::Building, SlotState::Saved]).await;
    let mut h = h.restart(false, None).await;
    h.expect(&[SlotState::Reverting, SlotState::Saved]).await;
    h.stop().await;
}

#[tokio::test]
async fn a_job_whose_guest_is_gone_is_failed_not_adopted() {
    let mut h = Harness::start(FakeHypervisor::new(), Limits::default());
    h.reach(SlotState::Saved).await;
    let (events_tx, mut events) = mpsc::channel(8);
    let time_left = Duration::from_secs(30);
    let adoption = Adoption { job: "lost".into(), events: events_tx, time_left };
    let mut h = h.restart(true, Some(adoption)).await;
    h.expect(&[SlotState::Reverting, SlotState::Saved]).await;
    let Some(JobEvent::Failed { reason }) = events.recv().await else { panic!("no failure") };
    assert!(reason.contains("could not take the job back"), "{reason}");
    h.stop().await;
}

#[test]
fn mark_adds_metadata_once() {
    let marked = mark("<domain type='qemu'><name>x</name></domain>", "p", 3, "/var/lib/warmpool");
    assert!(marked.starts_with("<domain type='qemu'><metadata><warmpool:slot "), "{marked}");
    assert!(marked.contains("pool=\"p\" slot=\"3\""), "{marked}");
    let read = crate::hypervisor::DomainMark::parse("x", &marked).unwrap();
    assert_eq!((read.pool.as_str(), read.slot), ("p", Some(3)));
    assert_eq!(read.owner.as_deref(), Some("/var/lib/warmpool"));
    let existing = mark("<domain><metadata><other/></metadata></domain>", "p", 0, "/s");
    assert_eq!(existing.matches("<metadata>").count(), 1, "{existing}");
}
