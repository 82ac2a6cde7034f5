//! A job leaves no trace for the next job on the same slot, and the revert restores exactly the
//! disk of the clean snapshot. Real libvirtd, real QEMU (TCG), the reference guest.

mod support;

use support::TestPool;
use warmpool::config::Arch;
use warmpool::slot::SlotState;

/// Reads the whole disk past the guest's page cache and prints its checksum.
const DISK_HASH: &str =
    "echo DISK $(dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)";

/// Everything a hostile job might leave behind, written in every way the test checks.
const DIRTY_JOB: &str = r#"
set -e
echo "BEFORE $(dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo planted > /mnt/disk/planted-by-job
mkdir -p /mnt/disk/dir && dd if=/dev/urandom of=/mnt/disk/dir/blob bs=64k count=16 2>/dev/null
sync
# The raw block device, below the filesystem: its last MiB.
size=$(cat /sys/block/vda/size)
dd if=/dev/urandom of=/dev/vda bs=512 seek=$((size - 2048)) count=2048 oflag=direct 2>/dev/null
# A process that would outlive the job, and kernel settings.
cp /bin/busybox /tmp/lurker && (/tmp/lurker sleep 100000 </dev/null >/dev/null 2>&1 &)
echo 1 > /proc/sys/net/ipv4/ip_forward
echo 4242 > /proc/sys/kernel/pid_max
hostname dirty-job
echo "AFTER $(dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
"#;

const INSPECT_JOB: &str = r#"
echo FILE $(test -e /mnt/disk/planted-by-job && echo present || echo absent)
echo DIR $(test -e /mnt/disk/dir && echo present || echo absent)
echo LURKER $(ps | grep -c '[l]urker')
echo FORWARD $(cat /proc/sys/net/ipv4/ip_forward)
echo PIDMAX $(cat /proc/sys/kernel/pid_max)
echo HOST $(hostname)
"#;

#[tokio::test]
async fn a_job_leaves_no_trace_for_the_next_job_on_its_slot() {
    if !support::environment_ready(Arch::X86_64).await {
        return;
    }
    let pool = TestPool::new("isolation", Arch::X86_64, 1, "");
    let running = pool.start().await;
    running.settle(SlotState::Ready).await;
    let clean_hash = host_side_hash(&pool.slot_dir(0).join("clean.qcow2"));

    let first = running.run(&format!("{DIRTY_JOB}\n{DISK_HASH}")).await;
    assert_eq!(first.exit_code, Some(0), "{first:?}");
    let before = first.value("BEFORE").expect("BEFORE line");
    assert_eq!(before, clean_hash, "the guest sees the clean snapshot's disk: {first:?}");
    assert_ne!(first.value("AFTER").unwrap(), before, "the job really wrote to the disk");

    running.settle(SlotState::Ready).await;
    let second = running.run(&format!("{INSPECT_JOB}\n{DISK_HASH}")).await;
    assert_eq!(second.exit_code, Some(0), "{second:?}");
    assert_eq!(second.slot, first.slot, "both jobs ran on the one slot");
    assert_eq!(second.value("FILE").as_deref(), Some("absent"), "{second:?}");
    assert_eq!(second.value("DIR").as_deref(), Some("absent"), "{second:?}");
    assert_eq!(second.value("LURKER").as_deref(), Some("0"), "{second:?}");
    assert_eq!(second.value("FORWARD").as_deref(), Some("0"), "{second:?}");
    assert_ne!(second.value("PIDMAX").as_deref(), Some("4242"), "{second:?}");
    assert_ne!(second.value("HOST").as_deref(), Some("dirty-job"), "{second:?}");
    assert_eq!(
        second.value("DISK").unwrap(),
        clean_hash,
        "the reverted disk is byte-identical: {second:?}"
    );

    running.stop_and_check_clean().await;
}

/// The checksum of the disk as the clean overlay and its backing image present it.
fn host_side_hash(clean: &std::path::Path) -> String {
    // qemu-img needs a seekable output, so the raw disk goes through a file.
    let raw = tempfile::NamedTempFile::new().unwrap();
    let output = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(clean)
        .arg(raw.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let output = std::process::Command::new("sha256sum").arg(raw.path()).output().unwrap();
    String::from_utf8(output.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}
