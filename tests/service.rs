//! The daemon as a systemd service, without systemd as PID 1: `sd_notify` into a datagram
//! socket the test holds, a drain with a job in flight on SIGTERM, and logind's delay lock and
//! `PrepareForShutdown` from a stand-in `org.freedesktop.login1` on a `dbus-daemon` the test
//! starts. The unit itself is checked with `systemd-analyze verify`.

mod support;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Daemon, TestPool, BIN};
use warmpool::config::Arch;
use warmpool::control::{Client, Request, Response};
use warmpool::slot::SlotState;

/// What the daemon told "systemd", with when.
#[derive(Clone, Default)]
struct Notifications(Arc<Mutex<Vec<(Instant, String)>>>);

impl Notifications {
    /// Listens on a datagram socket at `path`, as systemd does on `NOTIFY_SOCKET`.
    fn listen(path: &Path) -> Notifications {
        let _ = std::fs::remove_file(path);
        let socket = tokio::net::UnixDatagram::bind(path).unwrap();
        let notifications = Notifications::default();
        let received = notifications.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0; 4096];
            while let Ok(length) = socket.recv(&mut buffer).await {
                let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
                received.0.lock().unwrap().push((Instant::now(), message));
            }
        });
        notifications
    }

    /// Waits for a message that `wanted` accepts, and returns when it came.
    async fn wait(&self, daemon: &Daemon, what: &str, wanted: impl Fn(&str) -> bool) -> Instant {
        let began = Instant::now();
        loop {
            let found = self.0.lock().unwrap().iter().find(|(_, m)| wanted(m)).map(|(at, _)| *at);
            if let Some(at) = found {
                return at;
            }
            let all: Vec<String> = self.0.lock().unwrap().iter().map(|(_, m)| m.clone()).collect();
            assert!(
                began.elapsed() < support::SETTLE_TIMEOUT,
                "no {what}: {all:?}\n{}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A one-slot pool whose daemon runs with `env`, and where its notifications go.
struct Service {
    pool: TestPool,
    daemon: Daemon,
    notifications: Notifications,
    started: Instant,
}

impl Service {
    async fn start(test: &str, env: &[(&str, &str)]) -> Service {
        let pool = TestPool::new(test, Arch::X86_64, 1, "");
        let _ = std::fs::remove_dir_all(&pool.state_dir);
        std::fs::create_dir_all(&pool.state_dir).unwrap();
        let config = pool.state_dir.join("warmpool.toml");
        std::fs::write(&config, format!("drain_grace_secs = 60\n{}", pool.text)).unwrap();
        let notify = pool.state_dir.join("notify.sock");
        let notifications = Notifications::listen(&notify);
        let log = std::env::temp_dir().join(format!("warmpool-{test}-test.log"));
        let _ = std::fs::remove_file(&log);
        let mut env = env.to_vec();
        env.push(("NOTIFY_SOCKET", notify.to_str().unwrap()));
        env.push(("WATCHDOG_USEC", "1000000"));
        let started = Instant::now();
        let daemon = Daemon::start_with_env(&config, &log, &env);
        Service { pool, daemon, notifications, started }
    }

    fn socket(&self) -> &Path {
        &self.pool.config.control_socket
    }

    /// Starts `warmpool exec` of a job that sleeps, then says `done`.
    fn exec_sleeping_job(&self, secs: u32) -> Child {
        Command::new(BIN)
            .args(["exec", "--socket", self.socket().to_str().unwrap(), "--"])
            .args(["sh", "-c", &format!("sleep {secs}; echo done")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    async fn wait_running(&self) {
        let began = Instant::now();
        loop {
            if let Ok(Response::Status { pools }) =
                Client::call(self.socket(), &Request::Status).await
            {
                if pools.iter().any(|pool| pool.count(SlotState::Running) > 0) {
                    return;
                }
            }
            assert!(began.elapsed() < support::SETTLE_TIMEOUT, "{}", self.daemon.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the daemon's exit and checks that it left no domain behind.
    fn wait_stopped_clean(mut self) {
        assert!(self.daemon.wait(Duration::from_secs(120)).success(), "{}", self.daemon.log());
        let listed = Command::new("virsh")
            .args(["-c", &support::uri(), "list", "--all", "--name"])
            .output()
            .unwrap();
        let names = String::from_utf8_lossy(&listed.stdout);
        assert!(!names.contains(&format!("warmpool-{}-", self.pool.name)), "{names}");
        let _ = std::fs::remove_dir_all(&self.pool.state_dir);
    }
}

/// A job in flight when the stop came ran to its end, with its output.
fn assert_finished(job: Child) {
    let out = job.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
}

#[tokio::test]
async fn systemd_hears_ready_status_and_watchdog_and_sigterm_drains_a_job_in_flight() {
    if !support::environment_ready(Arch::X86_64).await {
        return;
    }
    let no_bus = [("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")];
    let service = Service::start("service", &no_bus).await;
    let notes = &service.notifications;
    let ready = notes.wait(&service.daemon, "READY=1", |m| m == "READY=1").await;
    eprintln!("start to READY=1, one slot, cold: {} ms", (ready - service.started).as_millis());
    notes.wait(&service.daemon, "a status", |m| m.starts_with("STATUS=1 ready of 1 slots")).await;
    notes.wait(&service.daemon, "WATCHDOG=1", |m| m == "WATCHDOG=1").await;

    let job = service.exec_sleeping_job(4);
    service.wait_running().await;
    service.daemon.signal("-TERM");
    notes.wait(&service.daemon, "STOPPING=1", |m| m == "STOPPING=1").await;

    // Draining: no new job, the running one goes on.
    let refused = Command::new(BIN)
        .args(["exec", "--socket", service.socket().to_str().unwrap(), "--", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("draining"), "{refused:?}");
    assert_finished(job);
    service.wait_stopped_clean();
}

/// A stand-in for logind's manager: records `Inhibit` calls and keeps the read end of each
/// lock's pipe, which reaches end of file once the holder lets go.
struct Login1 {
    calls: Arc<Mutex<Vec<[String; 4]>>>,
    locks: Arc<Mutex<Vec<OwnedFd>>>,
}

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl Login1 {
    async fn inhibit(
        &self,
        what: String,
        who: String,
        why: String,
        mode: String,
    ) -> zbus::fdo::Result<zbus::zvariant::OwnedFd> {
        self.calls.lock().unwrap().push([what, who, why, mode]);
        let (reader, writer) = pipe().map_err(|e| zbus::fdo::Error::IOError(e.to_string()))?;
        self.locks.lock().unwrap().push(reader);
        Ok(zbus::zvariant::OwnedFd::from(writer))
    }

    #[zbus(signal)]
    async fn prepare_for_shutdown(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        start: bool,
    ) -> zbus::Result<()>;
}

/// A pipe's read and write ends.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd as _;
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) fills both descriptors on success; each is owned once, here.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors from pipe2, owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A private `dbus-daemon`, stopped when dropped.
struct Bus {
    child: Child,
    address: String,
}

impl Bus {
    fn start(dir: &Path) -> Bus {
        let socket = dir.join("system_bus_socket");
        let config = dir.join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>custom</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>"#,
                socket.display()
            ),
        )
        .unwrap();
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .arg("--nofork")
            .spawn()
            .expect("dbus-daemon runs");
        let began = Instant::now();
        while !socket.exists() {
            assert!(began.elapsed() < Duration::from_secs(10), "the bus never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Bus { child, address: format!("unix:path={}", socket.display()) }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the read end of a lock's pipe has reached end of file (every writer closed).
fn released(lock: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd as _;
    let mut poll = libc::pollfd { fd: lock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll(2) on one valid descriptor that this test owns, without waiting.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready == 1 && poll.revents & (libc::POLLHUP | libc::POLLIN) != 0
}

#[tokio::test]
async fn a_shutdown_announced_by_logind_drains_then_releases_the_delay_lock() {
    if !support::environment_ready(Arch::X86_64).await {
        return;
    }
    let dir = PathBuf::from("/var/lib/warmpool-tests/t-logind-bus");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bus = Bus::start(&dir);
    let login1 = Login1 { calls: Arc::default(), locks: Arc::default() };
    let (calls, locks) = (login1.calls.clone(), login1.locks.clone());
    let logind = zbus::connection::Builder::address(bus.address.as_str())
        .unwrap()
        .name("org.freedesktop.login1")
        .unwrap()
        .serve_at("/org/freedesktop/login1", login1)
        .unwrap()
        .build()
        .await
        .unwrap();

    let env = [("DBUS_SYSTEM_BUS_ADDRESS", bus.address.as_str())];
    let service = Service::start("logind", &env).await;
    let notes = &service.notifications;
    notes.wait(&service.daemon, "READY=1", |m| m == "READY=1").await;
    let taken = calls.lock().unwrap().clone();
    assert_eq!(taken.len(), 1, "{taken:?}");
    let [what, who, _why, mode] = &taken[0];
    assert_eq!((what.as_str(), who.as_str(), mode.as_str()), ("shutdown", "warmpool", "delay"));
    assert!(!released(&locks.lock().unwrap()[0]), "the lock is held while serving");

    let job = service.exec_sleeping_job(3);
    service.wait_running().await;
    let manager =
        logind.object_server().interface::<_, Login1>("/org/freedesktop/login1").await.unwrap();
    Login1::prepare_for_shutdown(manager.signal_emitter(), true).await.unwrap();
    notes.wait(&service.daemon, "STOPPING=1", |m| m == "STOPPING=1").await;
    assert!(!released(&locks.lock().unwrap()[0]), "the lock is held while draining");
    assert_finished(job);
    service.wait_stopped_clean();
    assert!(released(&locks.lock().unwrap()[0]), "the lock was released");
    drop(bus);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn systemd_analyze_accepts_the_unit() {
    let unit = std::fs::read_to_string("host-setup/warmpool.service").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // verify wants ExecStart's binary to exist: the one under test stands in.
    let unit = unit.replace("/usr/local/bin/warmpool", BIN);
    let path = dir.path().join("warmpool.service");
    std::fs::write(&path, unit).unwrap();
    let out = match Command::new("systemd-analyze").arg("verify").arg(&path).output() {
        Ok(out) => out,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: systemd-analyze: {e}");
            return;
        }
        Err(e) => panic!("systemd-analyze: {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}
