//! systemd integration: readiness, status and the watchdog over `sd_notify`, and a logind delay
//! inhibitor, so that the host drains before it shuts down.
//!
//! Both are optional at run time. Without `NOTIFY_SOCKET` (not started by systemd) notifications
//! go nowhere; without a system bus or logind (a container) no inhibitor is taken and SIGTERM
//! remains the only way to stop. Neither is ever a reason not to serve.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use futures_util::StreamExt as _;
use tracing::{debug, info, warn};

/// Sends `sd_notify` messages to the socket systemd named in `NOTIFY_SOCKET`.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// The notifier of this process, from `NOTIFY_SOCKET`: a path, or an abstract socket name
    /// after `@`.
    pub fn from_env() -> Notifier {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { target: None };
        };
        let name = name.to_string_lossy().into_owned();
        match Notifier::connect(&name) {
            Ok(target) => Notifier { target: Some(target) },
            Err(e) => {
                warn!(socket = %name, error = %e, "NOTIFY_SOCKET unusable; systemd hears nothing");
                Notifier { target: None }
            }
        }
    }

    fn connect(name: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
        let address = match name.strip_prefix('@') {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt as _;
                SocketAddr::from_abstract_name(abstract_name.as_bytes())?
            }
            None => SocketAddr::from_pathname(name)?,
        };
        // Never blocking: a notification that systemd cannot take at once is dropped, rather
        // than stalling the task that sent it.
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok((socket, address))
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one message of `KEY=value` lines. A datagram that cannot be sent at once is
    /// logged and dropped: the daemon works on without systemd hearing of it.
    pub fn notify(&self, message: &str) {
        let Some((socket, address)) = &self.target else { return };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), address) {
            debug!(error = %e, "sd_notify failed");
        }
    }

    pub fn ready(&self) {
        self.notify("READY=1");
    }

    pub fn stopping(&self) {
        self.notify("STOPPING=1");
    }

    pub fn status(&self, status: &str) {
        // A newline would start another assignment in the message.
        self.notify(&format!("STATUS={}", status.replace('\n', " ")));
    }

    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }
}

/// How often to pet the watchdog: half of `WATCHDOG_USEC`, when systemd set one for this
/// process (`WATCHDOG_PID`, when set, names the process meant).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim() != std::process::id().to_string() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[zbus::proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1"
)]
trait Login1Manager {
    fn inhibit(
        &self,
        what: &str,
        who: &str,
        why: &str,
        mode: &str,
    ) -> zbus::Result<zbus::zvariant::OwnedFd>;

    #[zbus(signal)]
    fn prepare_for_shutdown(&self, start: bool) -> zbus::Result<()>;
}

/// A logind delay lock on shutdown: logind waits for its release (up to its
/// `InhibitDelayMaxSec`) before the host goes down.
pub struct ShutdownInhibitor {
    lock: Option<OwnedFd>,
    signals: PrepareForShutdownStream,
    _connection: zbus::Connection,
}

impl ShutdownInhibitor {
    /// Takes the lock on the system bus (`DBUS_SYSTEM_BUS_ADDRESS`, or the standard socket).
    pub async fn take() -> zbus::Result<ShutdownInhibitor> {
        let connection = zbus::Connection::system().await?;
        let manager = Login1ManagerProxy::new(&connection).await?;
        // Subscribe first, so that a shutdown announced right after the lock is not missed.
        let signals = manager.receive_prepare_for_shutdown().await?;
        let why = "Draining CI jobs and removing their runners";
        let lock = manager.inhibit("shutdown", "warmpool", why, "delay").await?;
        info!("Shutdown inhibitor taken: the host drains before it goes down");
        Ok(ShutdownInhibitor { lock: Some(lock.into()), signals, _connection: connection })
    }

    /// Waits until logind announces a shutdown.
    pub async fn shutdown_announced(&mut self) {
        while let Some(signal) = self.signals.next().await {
            match signal.args() {
                Ok(args) if args.start => {
                    info!("logind announced a shutdown");
                    return;
                }
                Ok(_) => debug!("logind cancelled a shutdown"),
                Err(e) => warn!(error = %e, "Unreadable PrepareForShutdown signal"),
            }
        }
        // The bus went away; no announcement will come.
        std::future::pending::<()>().await;
    }

    /// Lets the shutdown go on.
    pub fn release(&mut self) {
        if self.lock.take().is_some() {
            info!("Shutdown inhibitor released");
        }
    }
}
