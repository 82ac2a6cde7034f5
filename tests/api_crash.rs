//! A daemon killed with SIGKILL in the middle of API writes restarts with a consistent store:
//! every write the API confirmed is there, with its audit row, and nothing is half written.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Daemon, TestPool, BIN};
use warmpool::config::Arch;
use warmpool::store::Store;

/// Kills are spread over this many rounds; each restart rebuilds the pool's one slot.
const ROUNDS: usize = 6;

async fn wait_healthy(port: u16, daemon: &mut Daemon) {
    let began = Instant::now();
    loop {
        assert!(daemon.child.try_wait().unwrap().is_none(), "the daemon exited:\n{}", daemon.log());
        if let Some((200, _)) = support::http(port, "GET", "/healthz", None, None).await {
            return;
        }
        assert!(began.elapsed() < support::SETTLE_TIMEOUT, "the daemon never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_daemon_killed_during_api_writes_restarts_consistent() {
    if !support::environment_ready(Arch::X86_64).await {
        return;
    }
    let pool = TestPool::new("api-crash", Arch::X86_64, 1, "");
    let (config, port) = pool.write_config_with_api();
    let log = pool.state_dir.join("daemon.log");

    let mut daemon = Daemon::start(&config, &log);
    wait_healthy(port, &mut daemon).await;
    let socket = pool.config.control_socket.to_str().unwrap().to_owned();
    let out = Command::new(BIN)
        .args(["token", "create", "--socket", &socket, "--name", "crash"])
        .output()
        .unwrap();
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let mut confirmed = Vec::new();
    for round in 0..ROUNDS {
        // Writes as fast as the API takes them, until the kill cuts them off.
        let writer = {
            let token = token.clone();
            tokio::spawn(async move {
                let mut created = Vec::new();
                for i in 0.. {
                    let name = format!("r{round}-t{i}");
                    let body = format!(
                        "{{\"name\":\"{name}\",\"kind\":\"local\",\"weight\":{}}}",
                        i % 1000 + 1
                    );
                    match support::http(port, "POST", "/v1/tenants", Some(&token), Some(&body))
                        .await
                    {
                        Some((201, _)) => created.push(name),
                        Some((status, body)) => panic!("{name}: {status} {body}"),
                        None => return created,
                    }
                }
                created
            })
        };
        let delay_ms = 40 + (round as u64 * 97) % 400;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        daemon.signal("-KILL");
        daemon.wait(Duration::from_secs(10));
        let created = writer.await.unwrap();
        assert!(!created.is_empty(), "round {round}: the kill came before any write");
        confirmed.extend(created);

        daemon = Daemon::start(&config, &log);
        wait_healthy(port, &mut daemon).await;
        let (status, listed) =
            support::http(port, "GET", "/v1/tenants", Some(&token), None).await.unwrap();
        assert_eq!(status, 200, "{listed}");
        for name in &confirmed {
            assert!(
                listed.contains(&format!("\"name\":\"{name}\"")),
                "round {round}: confirmed tenant {name} was lost"
            );
        }
    }

    eprintln!("{} tenants confirmed across {ROUNDS} kills", confirmed.len());
    daemon.signal("-TERM");
    assert!(daemon.wait(Duration::from_secs(60)).success());
    let store =
        Store::open(&pool.state_dir.join("warmpool.db"), &pool.state_dir.join("host.key")).unwrap();
    assert_eq!(store.integrity_problems().unwrap(), Vec::<String>::new());
    let mut audited = Vec::new();
    let mut after = None;
    loop {
        let page = store.list_audit(after, warmpool::store::MAX_PAGE).unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        audited.extend(page.into_iter().filter(|e| e.action == "tenant.create").map(|e| e.target));
    }
    let tenants = store.list_tenants().unwrap();
    for tenant in tenants.iter().filter(|t| t.name.starts_with('r')) {
        assert!(
            audited.contains(&format!("tenant/{}", tenant.id)),
            "tenant {} has no audit row",
            tenant.name
        );
    }
    assert_eq!(
        audited.len(),
        tenants.iter().filter(|t| t.name.starts_with('r')).count() + 1,
        "one audit row per tenant"
    );
    let _ = std::fs::remove_dir_all(&pool.state_dir);
}
