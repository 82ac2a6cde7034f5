//! Firmware variables and TPM state belong to the clean snapshot: a slot with UEFI and a TPM
//! builds, serves jobs, and gets both back on every revert.

mod support;

use std::path::{Path, PathBuf};

use support::TestPool;
use warmpool::config::Arch;
use warmpool::slot::SlotState;

#[tokio::test]
async fn firmware_variables_and_tpm_state_are_reverted_with_the_slot() {
    if !support::environment_ready(Arch::X86_64).await {
        return;
    }
    let template =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/templates/reference-uefi-x86_64.xml");
    let extra = format!(
        "template = \"{}\"\nnvram_template = \"/usr/share/OVMF/OVMF_VARS_4M.fd\"",
        template.display()
    );
    let pool = TestPool::new("firmware", Arch::X86_64, 1, &extra);
    let running = pool.start().await;
    running.settle(SlotState::Ready).await;

    let slot = pool.slot_dir(0);
    let clean_nvram =
        std::fs::read(slot.join("clean-nvram.fd")).expect("the snapshot keeps the variables");
    let tpm = tpm_dir(&pool.domain(0));
    let clean_tpm = read_tree(&slot.join("clean-tpm"));
    assert!(!clean_tpm.is_empty(), "the snapshot keeps the TPM state");

    // A job changes both, as a job with the firmware's and the TPM's device access could.
    let outcome = running.run("echo in the guest").await;
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
    std::fs::write(slot.join("nvram.fd"), b"changed by the job").unwrap();
    std::fs::write(tpm.join("tpm2/tpm2-00.permall"), b"changed by the job").unwrap();

    running.settle(SlotState::Ready).await;
    assert_eq!(std::fs::read(slot.join("nvram.fd")).unwrap(), clean_nvram);
    assert_eq!(read_tree(&tpm), clean_tpm);
    let outcome = running.run("echo still fine").await;
    assert_eq!(outcome.lines, vec!["still fine"], "{outcome:?}");

    running.stop_and_check_clean().await;
    assert!(!tpm.exists(), "the slot's TPM state is removed with it");
}

fn tpm_dir(domain: &str) -> PathBuf {
    PathBuf::from("/var/lib/libvirt/swtpm").join(warmpool::slot::domain_uuid(domain).to_string())
}

/// Every file below `dir` with its contents, in order.
fn read_tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            } else {
                files.push((
                    entry.path().strip_prefix(dir).unwrap().to_owned(),
                    std::fs::read(entry.path()).unwrap(),
                ));
            }
        }
    }
    files.sort();
    files
}
