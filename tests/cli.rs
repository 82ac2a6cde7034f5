//! `warmpool serve` and `warmpool exec` as an operator runs them: output streamed, exit codes
//! passed through, errors explained, and nothing but clean snapshots left behind after SIGTERM,
//! or after SIGKILL and a restart.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use support::{Daemon, TestPool, BIN};
use warmpool::config::Arch;
use warmpool::hypervisor::libvirt::Libvirt;
use warmpool::hypervisor::Hypervisor;

/// A GET on loopback, as status line and body.
async fn http_get(port: u16, path: &str) -> String {
    http_get_with(port, path, None).await
}

async fn http_get_with(port: u16, path: &str, token: Option<&str>) -> String {
    let (status, body) =
        support::http(port, "GET", path, token, None).await.expect("the API answers");
    format!("{status}\n{body}")
}

fn warmpool(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[tokio::test]
async fn serve_and_exec_as_an_operator_uses_them() {
    if !support::environment_ready(Arch::X86_64).await {
        return;
    }
    let pool = TestPool::new("cli", Arch::X86_64, 1, "");
    let _ = std::fs::remove_dir_all(&pool.state_dir);
    std::fs::create_dir_all(&pool.state_dir).unwrap();
    let config = pool.state_dir.join("warmpool.toml");
    let api_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(&config, format!("api_listen = \"127.0.0.1:{api_port}\"\n{}", pool.text))
        .unwrap();
    let log = std::env::temp_dir().join("warmpool-cli-test.log");
    let _ = std::fs::remove_file(&log);
    let socket = pool.config.control_socket.clone();
    let socket_arg = socket.to_str().unwrap();

    let mut daemon = Daemon::start(&config, &log);
    daemon.wait_ready(&socket).await;

    // Output streams in order, stderr included, and the exit code passes through.
    let out = warmpool(&[
        "exec",
        "--socket",
        socket_arg,
        "--",
        "sh",
        "-c",
        "echo one; echo two >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\n");

    // A wrong pool is one clear line, not a hang.
    let out = warmpool(&["exec", "--socket", socket_arg, "--pool", "nope", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no pool `nope`") && stderr.contains(&pool.name), "{stderr}");

    // Health and metrics over HTTP on loopback.
    let health = http_get(api_port, "/healthz").await;
    assert!(health.starts_with("200"), "{health}");
    let metrics = http_get(api_port, "/metrics").await;
    assert!(metrics.contains("warmpool_jobs_total{result=\"finished\"} 1"), "{metrics}");

    // Root gets an admin token on the socket; the API shows the job it ran.
    let out = warmpool(&["token", "create", "--socket", socket_arg, "--name", "test-admin"]);
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let jobs = http_get_with(api_port, "/v1/jobs", Some(&token)).await;
    assert!(jobs.contains("\"state\":\"finished\"") && jobs.contains("\"exit_code\":7"), "{jobs}");
    assert!(http_get(api_port, "/v1/jobs").await.contains("401"), "no token, no jobs");

    // The CLI over the API, with the endpoint and token from the environment.
    let api = format!("http://127.0.0.1:{api_port}");
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("WARMPOOL_API", &api)
            .env("WARMPOOL_TOKEN", &token)
            .output()
            .unwrap()
    };
    let out = cli(&["tenant", "add", "acme", "--kind", "local", "--weight", "3"]);
    assert!(out.status.success(), "{out:?}");
    let out = cli(&["tenant", "list"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.starts_with("ID") && listed.contains("acme") && listed.contains("local"),
        "{listed}"
    );
    let settings = "{\"owner\":\"o\",\"app_id\":1}";
    let out = cli(&["tenant", "add", "bad", "--kind", "github", "--settings", settings]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("settings.installation_id"), "{stderr}");
    let out = cli(&["job", "list", "--json"]);
    let page: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(page["jobs"][0]["exit_code"], 7, "{page}");
    let out = cli(&["slot", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&pool.domain(0)), "{out:?}");
    let out = cli(&["exec", "--via-api", "--", "sh", "-c", "echo over the api; exit 5"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over the api\n");
    // Root on the unix socket needs no token.
    let unix = pool.state_dir.join("api.sock");
    let host = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::UnixStream::connect(&unix).await.unwrap();
        stream.write_all(b"GET /v1/host HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    assert!(host.starts_with("HTTP/1.0 200") && host.contains("\"draining\":false"), "{host}");
    let unix_api = format!("unix:{}", unix.display());
    let out = Command::new(BIN)
        .args(["tenant", "list", "--api", &unix_api])
        .env_remove("WARMPOOL_TOKEN")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("acme"),
        "root needs no token on the socket: {out:?}"
    );
    let out = cli(&["host", "drain"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("true"), "{out:?}");
    let out = warmpool(&["exec", "--socket", socket_arg, "--", "true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("draining"), "{out:?}");
    cli(&["host", "resume"]);
    let out = Command::new(BIN)
        .args(["job", "list"])
        .env("WARMPOOL_API", &api)
        .env("WARMPOOL_TOKEN", "wp_bad")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown or revoked"), "{out:?}");

    let out = warmpool(&["status", "--socket", socket_arg]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&pool.domain(0)));

    // SIGKILL leaves a domain and files behind; the next daemon clears them and serves again.
    daemon.wait_ready(&socket).await;
    daemon.signal("-KILL");
    daemon.wait(Duration::from_secs(10));
    let hypervisor = Libvirt::connect(&support::uri()).await.unwrap();
    assert!(
        !hypervisor.list_marked(&pool.name).await.unwrap().is_empty(),
        "the killed daemon's domain is still there"
    );
    let mut daemon = Daemon::start(&config, &log);
    daemon.wait_ready(&socket).await;
    assert!(
        daemon.log().contains("Keeping the clean snapshot of an earlier run"),
        "{}",
        daemon.log()
    );
    let out = warmpool(&["exec", "--socket", socket_arg, "--", "echo", "after restart"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "after restart\n", "{out:?}");
    // The token, the tenant and the job history outlive the killed daemon.
    let tenants = http_get_with(api_port, "/v1/tenants", Some(&token)).await;
    assert!(tenants.contains("\"name\":\"acme\""), "{tenants}");
    let jobs = http_get_with(api_port, "/v1/jobs", Some(&token)).await;
    assert!(jobs.contains("\"exit_code\":7") && jobs.contains("\"exit_code\":0"), "{jobs}");

    // SIGTERM stops it cleanly: no domain, no socket, only the clean snapshot kept.
    daemon.signal("-TERM");
    let status = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{status}");
    assert!(hypervisor.list_marked(&pool.name).await.unwrap().is_empty());
    support::assert_only_snapshots_left(&pool.state_dir.join("pools").join(&pool.name));
    assert!(!socket.exists());

    // Without a daemon, exec says so.
    let out = warmpool(&["exec", "--socket", socket_arg, "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Cannot reach the daemon"), "{out:?}");
    let _ = std::fs::remove_dir_all(&pool.state_dir);
}

#[test]
fn check_config_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    let text = r#"
[[pool]]
name = "p"
image = "/i.qcow2"
arch = "x86_64"
vcpus = 0
memory_mib = 512
slots = 1
"#;
    std::fs::write(&config, text).unwrap();
    let out = warmpool(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pools[0].vcpus"), "{stderr}");
}
