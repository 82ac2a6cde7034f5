//! What the integration tests share: pools of reference guests on a real libvirtd under TCG.
//!
//! The tests need root, a running libvirtd and the reference guest that `scripts/test`
//! builds. Where any of that is missing they are skipped with a message, except under CI,
//! where a missing environment is a failure: a green run must mean the tests ran.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use warmpool::config::{Arch, Config};
use warmpool::control::Control;
use warmpool::daemon;
use warmpool::hypervisor::libvirt::Libvirt;
use warmpool::hypervisor::Hypervisor;
use warmpool::metrics::Metrics;
use warmpool::pool::PoolStatus;
use warmpool::slot::{JobEvent, SlotState};

/// Long enough for TCG boots on a loaded two-core machine.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);

pub fn images_dir() -> PathBuf {
    std::env::var_os("WARMPOOL_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/warmpool/images".into())
}

pub fn uri() -> String {
    std::env::var("WARMPOOL_TEST_URI").unwrap_or_else(|_| "qemu:///system".into())
}

pub fn guest_dir(arch: Arch) -> PathBuf {
    images_dir().join(format!("reference-{}", arch.as_str()))
}

/// Whether the environment can run these tests; panics under CI when it cannot.
pub async fn environment_ready(arch: Arch) -> bool {
    let guest = guest_dir(arch);
    let problem = if !guest.join("disk.qcow2").exists() {
        Some(format!(
            "no reference guest in {} (run scripts/build-reference-guest)",
            guest.display()
        ))
    } else if let Err(e) = Libvirt::connect(&uri()).await {
        Some(format!("libvirtd is not reachable: {e} (run host-setup/setup)"))
    } else {
        None
    };
    match problem {
        None => true,
        Some(problem) if std::env::var_os("CI").is_some() => {
            panic!("integration test environment: {problem}")
        }
        Some(problem) => {
            eprintln!("skipped: {problem}");
            false
        }
    }
}

/// A pool of reference guests under TCG with its own state directory, named after the test so
/// that tests never share domains.
pub struct TestPool {
    pub name: String,
    pub state_dir: PathBuf,
    pub config: Config,
    /// The configuration as a file says it, for tests that run the binary.
    pub text: String,
}

impl TestPool {
    /// `extra` is TOML added to the `[[pool]]` table.
    pub fn new(test: &str, arch: Arch, slots: u32, extra: &str) -> TestPool {
        let name = format!("t-{test}");
        let state_dir = PathBuf::from(format!("/var/lib/warmpool-tests/{name}"));
        let guest = guest_dir(arch);
        let arch = arch.as_str();
        let text = format!(
            r#"state_dir = "{state}"
libvirt_uri = "{uri}"
control_socket = "{state}/control.sock"
api_socket = "{state}/api.sock"

[[pool]]
name = "{name}"
image = "{guest}/disk.qcow2"
arch = "{arch}"
vcpus = 1
memory_mib = 256
slots = {slots}
acceleration = "tcg"
boot_timeout_secs = 120
{extra}

[pool.template_vars]
kernel = "{guest}/vmlinuz"
initrd = "{guest}/initrd.img"
"#,
            state = state_dir.display(),
            uri = uri(),
            guest = guest.display(),
        );
        let config = Config::parse(&text, Path::new("test config")).expect("test configuration");
        TestPool { name, state_dir, config, text }
    }

    /// Clears the state directory and writes the configuration, with the HTTP API on a free
    /// loopback port, for a daemon run as a process. Returns the file and the port.
    pub fn write_config_with_api(&self) -> (PathBuf, u16) {
        let _ = std::fs::remove_dir_all(&self.state_dir);
        std::fs::create_dir_all(&self.state_dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let port = port.port();
        let config = self.state_dir.join("warmpool.toml");
        std::fs::write(&config, format!("api_listen = \"127.0.0.1:{port}\"\n{}", self.text))
            .unwrap();
        (config, port)
    }

    pub fn slot_dir(&self, index: usize) -> PathBuf {
        self.state_dir.join("pools").join(&self.name).join(index.to_string())
    }

    pub fn domain(&self, index: usize) -> String {
        warmpool::slot::domain_name(&self.name, index)
    }

    /// Starts the pool in this process, as the daemon would.
    pub async fn start(&self) -> Running {
        std::fs::create_dir_all("/var/lib/warmpool-tests").unwrap();
        let hypervisor: Arc<dyn Hypervisor> = Arc::new(Libvirt::connect(&uri()).await.unwrap());
        let control = daemon::start(&self.config, hypervisor.clone(), Arc::new(Metrics::default()))
            .await
            .unwrap();
        let control = Arc::new(control);
        Running {
            control: Some(control),
            hypervisor,
            pool: self.name.clone(),
            state_dir: self.state_dir.clone(),
        }
    }
}

pub struct Running {
    pub control: Option<Arc<Control>>,
    pub hypervisor: Arc<dyn Hypervisor>,
    pub pool: String,
    pub state_dir: PathBuf,
}

/// What a job printed and how it ended.
#[derive(Debug)]
pub struct Outcome {
    pub slot: Option<String>,
    pub lines: Vec<String>,
    pub exit_code: Option<i32>,
    pub failure: Option<String>,
}

impl Outcome {
    pub fn output(&self) -> String {
        self.lines.join("\n")
    }

    /// The value printed on a line `KEY value`.
    pub fn value(&self, key: &str) -> Option<String> {
        let prefix = format!("{key} ");
        self.lines.iter().find_map(|line| line.strip_prefix(&prefix)).map(str::to_owned)
    }
}

impl Running {
    pub fn control(&self) -> &Control {
        self.control.as_ref().expect("running")
    }

    /// Runs a shell script in a slot and collects its events.
    pub async fn run(&self, script: &str) -> Outcome {
        let argv = vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()];
        let job = self.control().submit(None, &argv, None).await.unwrap();
        collect(job.subscribe()).await
    }

    pub async fn status(&self) -> PoolStatus {
        self.control().pools()[0].status().await.expect("pool status")
    }

    /// Waits until every slot is ready (or, for `quarantined`, until one is quarantined).
    pub async fn settle(&self, want: SlotState) -> PoolStatus {
        let waited = tokio::time::timeout(SETTLE_TIMEOUT, async {
            loop {
                let status = self.status().await;
                let done = match want {
                    SlotState::Quarantined => status.count(SlotState::Quarantined) > 0,
                    state => status.slots.iter().all(|slot| slot.state == state),
                };
                if done {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        match waited.await {
            Ok(status) => status,
            Err(_) => panic!("slots never became {want}: {:?}", self.status().await),
        }
    }

    /// Shuts the pool down and checks that nothing of it is left: no domain, no file.
    pub async fn stop_and_check_clean(mut self) {
        daemon::shutdown(&self.control.take().unwrap()).await;
        let left = self.hypervisor.list_marked(&self.pool).await.unwrap();
        assert!(left.is_empty(), "domains left behind: {left:?}");
        assert_only_snapshots_left(&self.state_dir.join("pools").join(&self.pool));
        let listed = std::process::Command::new("virsh")
            .args(["-c", &uri(), "list", "--all", "--name"])
            .output();
        if let Ok(listed) = listed {
            let names = String::from_utf8_lossy(&listed.stdout);
            assert!(
                !names.lines().any(|name| name.starts_with(&format!("warmpool-{}-", self.pool))),
                "{names}"
            );
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// The files a stopped slot keeps: its clean snapshot, for the next start to revert to.
pub const SNAPSHOT_FILES: [&str; 7] = [
    "clean.qcow2",
    "memory.save",
    "restore.xml",
    "snapshot.json",
    "clean-nvram.fd",
    "clean-tpm",
    "console.log",
];

/// Checks that a stopped pool's directory holds clean snapshots and nothing a job left: no job
/// overlay, no job port, no firmware variables in use.
pub fn assert_only_snapshots_left(pool_dir: &Path) {
    let Ok(slots) = std::fs::read_dir(pool_dir) else { return };
    for slot in slots {
        let slot = slot.unwrap().path();
        for file in std::fs::read_dir(&slot).unwrap() {
            let name = file.unwrap().file_name().to_string_lossy().into_owned();
            assert!(SNAPSHOT_FILES.contains(&name.as_str()), "{} left in {}", name, slot.display());
        }
        assert!(slot.join("snapshot.json").exists(), "{} has no snapshot", slot.display());
    }
}

pub async fn collect(events: impl futures_util::Stream<Item = JobEvent>) -> Outcome {
    use futures_util::StreamExt;
    let mut events = std::pin::pin!(events);
    let mut outcome = Outcome { slot: None, lines: Vec::new(), exit_code: None, failure: None };
    let ended = tokio::time::timeout(SETTLE_TIMEOUT, async {
        while let Some(event) = events.next().await {
            match event {
                JobEvent::Started { slot, .. } => outcome.slot = Some(slot),
                JobEvent::Log { line } => outcome.lines.push(line),
                JobEvent::Finished { exit_code } => outcome.exit_code = Some(exit_code),
                JobEvent::Failed { reason } => outcome.failure = Some(reason),
            }
        }
    });
    ended.await.expect("the job ended in time");
    outcome
}

/// One HTTP/1.0 request on loopback; the status code and the body, or `None` when the
/// connection failed (a daemon that was just killed).
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// The `warmpool` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_warmpool");

/// A `warmpool serve` child process, killed when a failing test drops it.
pub struct Daemon {
    pub child: std::process::Child,
    log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, log: &Path) -> Daemon {
        Daemon::start_with_env(config, log, &[])
    }

    /// Starts the daemon with `env` added to its environment.
    pub fn start_with_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_through(&[], config, log, env)
    }

    /// Starts the daemon as the last argument of `wrapper`, a command that runs its arguments
    /// (such as `scripts/netns-libvirt exec NAME DIR --`) and becomes the daemon with `exec`.
    pub fn start_through(
        wrapper: &[&str],
        config: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Daemon {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let (program, args) = match wrapper.split_first() {
            Some((program, args)) => (*program, args),
            None => (BIN, &[][..]),
        };
        let mut command = std::process::Command::new(program);
        command.args(args);
        if !wrapper.is_empty() {
            command.arg(BIN);
        }
        let child = command
            .args(["serve", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        Daemon { child, log: log.to_owned() }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the daemon answers on its control socket and all its slots are ready.
    pub async fn wait_ready(&mut self, socket: &Path) {
        use warmpool::control::{Client, Request, Response};
        let began = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the daemon exited with {status}:\n{}", self.log());
            }
            if let Ok(Response::Status { pools }) = Client::call(socket, &Request::Status).await {
                let slots: Vec<_> = pools.iter().flat_map(|pool| &pool.slots).collect();
                if let Some(slot) = slots.iter().find(|slot| slot.state == SlotState::Quarantined) {
                    panic!("{} quarantined: {:?}\n{}", slot.name, slot.error, self.log());
                }
                if slots.iter().all(|slot| slot.state == SlotState::Ready) {
                    return;
                }
            }
            assert!(began.elapsed() < SETTLE_TIMEOUT, "never ready:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let began = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(began.elapsed() < timeout, "the daemon did not exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
