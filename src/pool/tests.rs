//! Pool tests against the fake hypervisor.

use std::collections::BTreeMap;

use super::*;
use crate::config::Acceleration;
use crate::guest::Run;
use crate::hypervisor::fake::{FakeHypervisor, FAKE_TEMPLATE};
use crate::slot::JobEvent;
use crate::template::Template;

const WAIT: Duration = Duration::from_secs(10);

/// A pool of fake guests on a real one-megabyte image in `dir`.
pub(crate) fn config(dir: &Path, slots: u32, ready: u32) -> PoolConfig {
    let image = dir.join("image.qcow2");
    crate::disk::test_image(&image);
    PoolConfig {
        name: "test".into(),
        image,
        arch: Arch::host(),
        vcpus: 1,
        memory_mib: 128,
        slots,
        ready,
        labels: vec!["linux".into()],
        acceleration: Acceleration::Tcg,
        template: Template::parse("fake", FAKE_TEMPLATE).unwrap(),
        max_job_secs: 30,
        boot_timeout_secs: 5,
        nvram_template: None,
        template_vars: BTreeMap::new(),
        network: None,
    }
}

fn start(fake: &FakeHypervisor, dir: &Path, slots: u32, ready: u32) -> Pool {
    let hypervisor: Arc<dyn Hypervisor> = Arc::new(fake.clone());
    Pool::start(&config(dir, slots, ready), dir, hypervisor, Arc::new(Metrics::default()))
}

fn submit(pool: &Pool, script: &str) -> mpsc::Receiver<crate::slot::JobEvent> {
    let (events, events_rx) = mpsc::channel(64);
    pool.submit(Job::new(format!("job-{}", uuid::Uuid::new_v4()), Run::script(script), events));
    events_rx
}

async fn last_event(mut events: mpsc::Receiver<JobEvent>) -> JobEvent {
    let mut last = None;
    while let Some(event) =
        tokio::time::timeout(WAIT, events.recv()).await.expect("job events in time")
    {
        last = Some(event);
    }
    last.expect("at least one event")
}

async fn wait_for(pool: &Pool, done: impl Fn(&PoolStatus) -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        loop {
            let status = pool.status().await.unwrap();
            if done(&status) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    if waited.await.is_err() {
        panic!("the pool never got there: {:?}", pool.status().await);
    }
}

#[tokio::test]
async fn more_jobs_than_slots_all_run_one_slot_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeHypervisor::new();
    let pool = start(&fake, dir.path(), 2, 2);
    let jobs: Vec<_> = (0..6).map(|i| submit(&pool, &format!("exit {i}"))).collect();
    for (i, events) in jobs.into_iter().enumerate() {
        assert_eq!(last_event(events).await, JobEvent::Finished { exit_code: i as i32 });
    }
    let starts = fake.calls().iter().filter(|call| call.starts_with("start ")).count();
    assert_eq!(starts, 2, "each slot booted once; every other job ran on a restored snapshot");
    pool.shutdown().await;
    assert!(fake.domains().is_empty());
    for slot in ["0", "1"] {
        let slot = dir.path().join("pools/test").join(slot);
        assert!(!slot.join("job.qcow2").exists(), "the job overlay is removed");
        assert!(slot.join("snapshot.json").exists(), "the clean snapshot is kept");
    }
}

#[tokio::test]
async fn slots_beyond_the_ready_count_wait_on_disk_until_demand_rises() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeHypervisor::new();
    let pool = start(&fake, dir.path(), 3, 1);
    let status = tokio::time::timeout(WAIT, pool.built()).await.unwrap();
    assert_eq!(
        (status.count(SlotState::Ready), status.count(SlotState::Saved)),
        (1, 2),
        "{status:?}"
    );
    assert_eq!(fake.domains().len(), 1, "only the ready slot has a domain");

    // Two jobs at once: one takes the ready slot, the other makes the pool restore a saved one,
    // and the pool keeps one more ready for what comes next.
    let (a, b) = (submit(&pool, "fake:hang"), submit(&pool, "fake:hang"));
    let started = |mut events: mpsc::Receiver<JobEvent>| async move {
        let first = tokio::time::timeout(WAIT, events.recv()).await.unwrap();
        assert!(matches!(first, Some(JobEvent::Started { .. })), "{first:?}");
        events
    };
    let (a, b) = (started(a).await, started(b).await);
    wait_for(&pool, |status| {
        status.count(SlotState::Running) == 2 && status.count(SlotState::Ready) == 1
    })
    .await;
    drop((a, b));
    pool.shutdown().await;
    assert!(fake.domains().is_empty());
}

#[tokio::test]
async fn jobs_of_a_client_that_left_the_queue_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeHypervisor::new();
    let pool = start(&fake, dir.path(), 1, 1);
    let running = submit(&pool, "fake:hang");
    let abandoned = submit(&pool, "exit 9");
    drop(abandoned);
    let last = submit(&pool, "exit 4");
    let mut running = running;
    assert!(matches!(
        tokio::time::timeout(WAIT, running.recv()).await.unwrap(),
        Some(JobEvent::Started { .. })
    ));
    drop(running);
    assert_eq!(last_event(last).await, JobEvent::Finished { exit_code: 4 });
    let resumes = fake.calls().iter().filter(|call| call.starts_with("resume ")).count();
    assert_eq!(resumes, 2, "the abandoned job never reached a guest");
    pool.shutdown().await;
}

#[tokio::test]
async fn shutdown_fails_queued_jobs_and_stops_every_slot() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeHypervisor::new();
    let pool = start(&fake, dir.path(), 1, 1);
    let running = submit(&pool, "fake:hang");
    let queued = submit(&pool, "exit 0");
    wait_for(&pool, |status| status.count(SlotState::Running) == 1).await;
    pool.shutdown().await;
    assert!(matches!(last_event(running).await, JobEvent::Failed { .. }));
    assert!(matches!(last_event(queued).await, JobEvent::Failed { .. }));
    assert!(fake.domains().is_empty());
    assert!(!dir.path().join("pools/test/0/job.qcow2").exists());
}

#[test]
fn acceleration_auto_never_picks_kvm_for_a_foreign_architecture() {
    let foreign = if Arch::host() == Arch::X86_64 { Arch::Aarch64 } else { Arch::X86_64 };
    assert_eq!(resolve_acceleration(Acceleration::Auto, foreign), Acceleration::Tcg);
    assert_eq!(resolve_acceleration(Acceleration::Kvm, foreign), Acceleration::Kvm);
    assert_eq!(resolve_acceleration(Acceleration::Tcg, Arch::host()), Acceleration::Tcg);
}

#[tokio::test]
async fn jobs_fail_at_once_when_every_slot_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeHypervisor::new();
    fake.set_boot(crate::hypervisor::fake::Boot::Silent);
    let mut config = config(dir.path(), 2, 2);
    config.boot_timeout_secs = 1;
    let pool =
        Pool::start(&config, dir.path(), Arc::new(fake.clone()), Arc::new(Metrics::default()));
    wait_for(&pool, |status| status.count(SlotState::Quarantined) == 2).await;
    match last_event(submit(&pool, "exit 0")).await {
        JobEvent::Failed { reason } => {
            assert!(reason.contains("every slot of pool `test` is quarantined"), "{reason}");
            assert!(reason.contains("did not say `ready`"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn a_reserved_slot_is_kept_from_the_queue_and_runs_its_own_job() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeHypervisor::new();
    let pool = start(&fake, dir.path(), 2, 1);
    let status = tokio::time::timeout(WAIT, pool.built()).await.unwrap();
    assert_eq!(*pool.capacity().borrow(), 2, "one ready and one saved slot");
    let ready = status.slots.iter().position(|slot| slot.state == SlotState::Ready).unwrap();

    let reservation = pool.reserve().await.expect("room for one");
    assert_eq!(reservation.slot_name(), status.slots[ready].name, "the ready slot first");
    assert_eq!(*pool.capacity().borrow(), 1);
    // A queued job takes the other slot, restored for it, and leaves no room.
    let queued = submit(&pool, "fake:hang");
    wait_for(&pool, |status| status.slots[1 - ready].state == SlotState::Running).await;
    assert_eq!(*pool.capacity().borrow(), 0);
    assert!(pool.reserve().await.is_none());

    let (events, events_rx) = mpsc::channel(64);
    reservation.submit(Job::new("pinned".into(), Run::script("exit 6"), events));
    assert_eq!(last_event(events_rx).await, JobEvent::Finished { exit_code: 6 });
    drop(queued);
    wait_for(&pool, |status| status.count(SlotState::Running) == 0).await;
    pool.shutdown().await;
}

#[tokio::test]
async fn a_dropped_reservation_gives_its_slot_back() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeHypervisor::new();
    let pool = start(&fake, dir.path(), 1, 1);
    tokio::time::timeout(WAIT, pool.built()).await.unwrap();
    let reservation = pool.reserve().await.unwrap();
    assert!(pool.reserve().await.is_none());
    let queued = submit(&pool, "exit 2");
    drop(reservation);
    assert_eq!(last_event(queued).await, JobEvent::Finished { exit_code: 2 });
    let mut capacity = pool.capacity();
    tokio::time::timeout(WAIT, capacity.wait_for(|free| *free == 1)).await.unwrap().unwrap();
    pool.shutdown().await;
}

#[tokio::test]
async fn a_reserved_saved_slot_is_restored_for_its_job() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeHypervisor::new();
    let pool = start(&fake, dir.path(), 2, 0);
    let status = tokio::time::timeout(WAIT, pool.built()).await.unwrap();
    assert_eq!(status.count(SlotState::Saved), 2, "{status:?}");
    let reservation = pool.reserve().await.unwrap();
    wait_for(&pool, |status| status.count(SlotState::Ready) == 1).await;
    let (events, events_rx) = mpsc::channel(64);
    reservation.submit(Job::new("pinned".into(), Run::script("exit 0"), events));
    assert_eq!(last_event(events_rx).await, JobEvent::Finished { exit_code: 0 });
    pool.shutdown().await;
}
