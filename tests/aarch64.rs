//! The product's own architecture: the aarch64 reference guest, emulated, runs jobs and reverts
//! like the host's.

mod support;

use support::TestPool;
use warmpool::config::Arch;
use warmpool::slot::SlotState;

#[tokio::test]
async fn an_aarch64_slot_runs_a_job_and_reverts() {
    if !support::environment_ready(Arch::Aarch64).await {
        return;
    }
    let pool = TestPool::new("aarch64", Arch::Aarch64, 1, "");
    let running = pool.start().await;
    running.settle(SlotState::Ready).await;

    let first = running.run("uname -m; echo dirty > /mnt/disk/mark; exit 5").await;
    assert_eq!(first.exit_code, Some(5), "{first:?}");
    assert_eq!(first.lines, vec!["aarch64"]);

    running.settle(SlotState::Ready).await;
    let second = running.run("test -e /mnt/disk/mark && echo present || echo absent").await;
    assert_eq!(second.lines, vec!["absent"], "{second:?}");
    running.stop_and_check_clean().await;
}
