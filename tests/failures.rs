//! Every way a job or a guest can go wrong ends in a reverted, ready slot, and a guest that never
//! boots is quarantined. Real libvirtd, real QEMU (TCG), the reference guest.

mod support;

use std::time::Duration;

use support::TestPool;
use warmpool::config::Arch;
use warmpool::slot::SlotState;

/// A hostile job takes the job port over: it kills the agent and its output relay (the port
/// opens for one process at a time) and opens the port itself as file descriptor 3. Its own
/// output goes to the console, as nothing relays it any more.
const TAKE_PORT: &str = "exec >/dev/console 2>&1; \
    for p in /proc/[0-9]*; do case $(tr '\\0' ' ' < $p/cmdline) in '/bin/sh /usr/sbin/warmpool-guest ') kill -9 ${p#/proc/};; esac; done; \
    sleep 1; exec 3<>/dev/virtio-ports/org.warmpool.job.0";

#[tokio::test]
async fn jobs_that_misbehave_end_in_a_reverted_ready_slot() {
    if !support::environment_ready(Arch::X86_64).await {
        return;
    }
    let pool = TestPool::new("misbehave", Arch::X86_64, 1, "max_job_secs = 20");
    let running = pool.start().await;
    running.settle(SlotState::Ready).await;

    let cases: [(&str, String, &str); 5] = [
        (
            "power off without finished",
            "poweroff -f".into(),
            "stopped before it reported the job finished",
        ),
        ("outlive the maximum duration", "sleep 600".into(), "maximum duration of 20 s"),
        (
            "flood the port with one endless line",
            format!("{TAKE_PORT}; head -c 1000000 /dev/zero | tr '\\0' x >&3; sleep 600"),
            "over 65536 bytes",
        ),
        (
            "send invalid JSON",
            format!("{TAKE_PORT}; echo '{{\"v\":1,\"type\":' >&3; sleep 600"),
            "malformed",
        ),
        (
            "send a message out of order",
            format!("{TAKE_PORT}; echo '{{\"v\":1,\"type\":\"ready\"}}' >&3; sleep 600"),
            "`ready`",
        ),
    ];
    for (what, script, expected) in cases {
        let outcome = running.run(&script).await;
        let failure = outcome
            .failure
            .clone()
            .unwrap_or_else(|| panic!("{what}: the job did not fail: {outcome:?}"));
        assert!(failure.contains(expected), "{what}: {failure}");
        running.settle(SlotState::Ready).await;
        check_serves(&running, what).await;
    }
    running.stop_and_check_clean().await;
}

#[tokio::test]
async fn a_qemu_killed_mid_job_ends_in_a_reverted_ready_slot() {
    if !support::environment_ready(Arch::X86_64).await {
        return;
    }
    let pool = TestPool::new("killed", Arch::X86_64, 1, "");
    let running = pool.start().await;
    running.settle(SlotState::Ready).await;

    let argv = vec!["sh".to_owned(), "-c".to_owned(), "echo running; sleep 600".to_owned()];
    let job = running.control().submit(None, &argv, None).await.unwrap();
    // Wait for the job's first output, then kill QEMU as the OOM killer would.
    let mut events = std::pin::pin!(job.subscribe());
    loop {
        let event = tokio::time::timeout(
            support::SETTLE_TIMEOUT,
            futures_util::StreamExt::next(&mut events),
        );
        match event.await.unwrap() {
            Some(warmpool::slot::JobEvent::Log { .. }) => break,
            Some(_) => continue,
            None => panic!("the job ended before it printed"),
        }
    }
    kill_qemu(&pool.domain(0));
    let outcome = support::collect(events).await;
    let failure = outcome.failure.expect("the job failed");
    assert!(failure.contains("stopped before it reported the job finished"), "{failure}");

    running.settle(SlotState::Ready).await;
    check_serves(&running, "after QEMU was killed").await;
    running.stop_and_check_clean().await;
}

#[tokio::test]
async fn a_guest_that_never_says_ready_fails_its_build_and_is_quarantined() {
    if !support::environment_ready(Arch::X86_64).await {
        return;
    }
    // The silent guest is the reference guest told not to start its agent.
    let mut pool = TestPool::new("silent", Arch::X86_64, 1, "");
    let config = &mut pool.config.pools[0];
    config.boot_timeout_secs = 20;
    config.template_vars.insert("cmdline_extra".into(), "warmpool.agent=off".into());
    let running = pool.start().await;
    let status = running.settle(SlotState::Quarantined).await;
    let error = status.slots[0].error.clone().expect("a reason");
    assert!(error.contains("did not say `ready` within 20 s"), "{error}");
    assert!(error.contains("console.log"), "{error}");
    let left = running.hypervisor.list_marked(&running.pool).await.unwrap();
    assert!(left.is_empty(), "the failed build's domain is destroyed: {left:?}");
    running.stop_and_check_clean().await;
}

async fn check_serves(running: &support::Running, after: &str) {
    let outcome = running.run("echo fine; exit 3").await;
    assert_eq!(outcome.exit_code, Some(3), "after {after}: {outcome:?}");
    assert_eq!(outcome.lines, vec!["fine"], "after {after}");
    tokio::time::timeout(Duration::from_secs(300), running.settle(SlotState::Ready)).await.unwrap();
}

/// Kills the QEMU process of a domain with SIGKILL.
fn kill_qemu(domain: &str) {
    let pid_file = format!("/run/libvirt/qemu/{domain}.pid");
    let pid = std::fs::read_to_string(&pid_file).unwrap_or_else(|e| panic!("{pid_file}: {e}"));
    let status = std::process::Command::new("kill").args(["-9", pid.trim()]).status().unwrap();
    assert!(status.success());
}
