//! An in-memory hypervisor with scripted guests, for unit tests of slots and pools.
//!
//! Each fake domain is a tokio task listening on the job port path named in its XML and speaking
//! the guest side of the job-port protocol. The XML it understands is the shape of
//! [`FAKE_TEMPLATE`]. A job's script chooses the guest's behaviour: a script that contains
//! `fake:hang`, `fake:poweroff`, `fake:flood`, `fake:garbage` or `fake:finish-early` misbehaves
//! in the named way; any other script is answered with one log line per line of the script and
//! a `finished` whose exit code is the number after the last `exit ` in the script, or 0.
//! A GitHub runner job runs the script set with [`FakeHypervisor::set_runner_script`] the same
//! way, after a first log line naming the length of its JIT configuration.
//!
//! Failures of the hypervisor itself are injected with [`FakeHypervisor::fail`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{DhcpHostChange, DomainMark, DomainState, Hypervisor, HypervisorError, NetworkInfo};
use crate::guest::{JobMessage, Run};

/// A domain template in the shape the fake understands.
pub const FAKE_TEMPLATE: &str = "<domain><name>{{name}}</name><disk>{{disk}}</disk>\
    <port>{{job_port}}</port><console>{{console_log}}</console></domain>";

/// How a fake guest behaves when it boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// Says `ready`, then waits for a job.
    Ready,
    /// Never says anything.
    Silent,
}

#[derive(Default)]
struct State {
    domains: HashMap<String, FakeDomain>,
    saved: HashMap<PathBuf, String>,
    failures: HashMap<&'static str, u32>,
    log: Vec<String>,
    /// What a fake guest runs for a GitHub runner job.
    runner_script: String,
    networks: HashMap<String, NetworkInfo>,
    filters: HashMap<String, String>,
}

struct FakeDomain {
    xml: String,
    running: watch::Sender<bool>,
    guest: JoinHandle<()>,
}

impl Drop for FakeDomain {
    fn drop(&mut self) {
        self.guest.abort();
    }
}

#[derive(Clone)]
pub struct FakeHypervisor {
    state: Arc<Mutex<State>>,
    boot: Arc<Mutex<Boot>>,
}

impl Default for FakeHypervisor {
    fn default() -> Self {
        FakeHypervisor { state: Arc::default(), boot: Arc::new(Mutex::new(Boot::Ready)) }
    }
}

impl FakeHypervisor {
    pub fn new() -> FakeHypervisor {
        FakeHypervisor::default()
    }

    /// Sets how guests started from now on boot.
    pub fn set_boot(&self, boot: Boot) {
        *self.boot.lock().unwrap() = boot;
    }

    /// Sets what fake guests run for GitHub runner jobs, in the script language above; empty
    /// by default, which finishes at once with exit code 0.
    pub fn set_runner_script(&self, script: &str) {
        self.state.lock().unwrap().runner_script = script.to_owned();
    }

    /// Makes the next `times` calls of `operation` ("start", "save", "restore", "resume",
    /// "destroy") fail.
    pub fn fail(&self, operation: &'static str, times: u32) {
        self.state.lock().unwrap().failures.insert(operation, times);
    }

    /// Ends a domain's process as a `kill -9` of QEMU would.
    pub fn kill(&self, name: &str) {
        self.state.lock().unwrap().domains.remove(name);
    }

    /// Names of the domains that exist now.
    /// Defines (or replaces) a virtual network. DHCP host changes edit its XML in place: an
    /// added `<host/>` goes before `</dhcp>`, a deleted one is cut out.
    pub fn define_network(&self, name: &str, xml: &str, active: bool) {
        let info = NetworkInfo { xml: xml.to_owned(), active };
        self.state.lock().unwrap().networks.insert(name.to_owned(), info);
    }

    pub fn define_filter(&self, name: &str, xml: &str) {
        self.state.lock().unwrap().filters.insert(name.to_owned(), xml.to_owned());
    }

    pub fn domains(&self) -> Vec<String> {
        let mut names: Vec<String> = self.state.lock().unwrap().domains.keys().cloned().collect();
        names.sort();
        names
    }

    /// Every operation so far, as `operation domain`.
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    fn enter(&self, operation: &'static str, domain: &str) -> Result<(), HypervisorError> {
        let mut state = self.state.lock().unwrap();
        state.log.push(format!("{operation} {domain}"));
        if let Some(left) = state.failures.get_mut(operation) {
            if *left > 0 {
                *left -= 1;
                return Err(HypervisorError::operation(operation, domain, "injected failure"));
            }
        }
        Ok(())
    }

    fn launch(&self, xml: &str, boot: Option<Boot>) -> Result<(), HypervisorError> {
        let name = element(xml, "name")?;
        let port = PathBuf::from(element(xml, "port")?);
        let mut state = self.state.lock().unwrap();
        if state.domains.contains_key(&name) {
            return Err(HypervisorError::operation("Start", &name, "domain already exists"));
        }
        let _ = std::fs::remove_file(&port);
        let listener =
            UnixListener::bind(&port).map_err(|e| HypervisorError::operation("Start", &name, e))?;
        let (running, running_rx) = watch::channel(boot.is_some());
        let guest =
            tokio::spawn(run_guest(self.state.clone(), name.clone(), listener, boot, running_rx));
        state.domains.insert(name, FakeDomain { xml: xml.to_owned(), running, guest });
        Ok(())
    }
}

fn element(xml: &str, tag: &str) -> Result<String, HypervisorError> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open).map(|i| i + open.len());
    let end = xml.find(&close);
    match (start, end) {
        (Some(start), Some(end)) if start <= end => Ok(xml[start..end].to_owned()),
        _ => Err(HypervisorError::operation("Parse", "fake domain", format!("no <{tag}>"))),
    }
}

/// The guest: `boot` is `Some` for a cold boot and `None` for a restore, after which the guest
/// waits for a job as it did when it was saved.
async fn run_guest(
    state: Arc<Mutex<State>>,
    name: String,
    listener: UnixListener,
    boot: Option<Boot>,
    mut running: watch::Receiver<bool>,
) {
    let Ok((stream, _)) = listener.accept().await else { return };
    let (read, mut write) = stream.into_split();
    if boot == Some(Boot::Silent) {
        std::future::pending::<()>().await;
    }
    if boot == Some(Boot::Ready)
        && write.write_all(b"{\"v\":1,\"type\":\"ready\"}\n").await.is_err()
    {
        return;
    }
    let mut lines = BufReader::new(read).lines();
    let Ok(Some(line)) = lines.next_line().await else { return };
    // A paused guest reads nothing until it is resumed.
    if running.wait_for(|running| *running).await.is_err() {
        return;
    }
    let Ok(job) = serde_json::from_str::<JobMessage>(&line) else { return };

    let script = match &job.run {
        Run::Command { script_b64 } => {
            let script =
                base64::engine::general_purpose::STANDARD.decode(script_b64).unwrap_or_default();
            String::from_utf8_lossy(&script).into_owned()
        }
        Run::GithubRunner { jit_config } => {
            let script = state.lock().unwrap().runner_script.clone();
            format!("runner with a JIT configuration of {} bytes\n{script}", jit_config.len())
        }
    };
    if script.contains("fake:survive") {
        survive_daemon(&state, &name, &job.job, write, lines, listener).await;
        return;
    }
    if run_job(&mut write, &job.job, &script).await.is_ok() {
        // The reference guest powers off after `finished`; its domain then disappears.
        state.lock().unwrap().domains.remove(&name);
    }
}

/// A job that outlives the daemon: says `started`, waits until the daemon's connection ends
/// (a daemon killed), then finishes on the next connection, as a guest blocked writing to an
/// unconnected port would once a restarted daemon connects.
async fn survive_daemon(
    state: &Mutex<State>,
    name: &str,
    job: &str,
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    listener: UnixListener,
) {
    let started = serde_json::json!({"v":1,"type":"started","job":job});
    if write.write_all(format!("{started}\n").as_bytes()).await.is_err() {
        return;
    }
    while let Ok(Some(_)) = lines.next_line().await {}
    let Ok((stream, _)) = listener.accept().await else { return };
    let (_read, mut write) = stream.into_split();
    let log = serde_json::json!({"v":1,"type":"log","job":job,"line":"survived the daemon"});
    let finished = serde_json::json!({"v":1,"type":"finished","job":job,"exit_code":0});
    if write.write_all(format!("{log}\n{finished}\n").as_bytes()).await.is_ok() {
        state.lock().unwrap().domains.remove(name);
    }
}

async fn run_job(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    job: &str,
    script: &str,
) -> std::io::Result<()> {
    let send = |message: serde_json::Value| format!("{message}\n").into_bytes();
    const BEHAVIOURS: [&str; 5] =
        ["fake:hang", "fake:poweroff", "fake:flood", "fake:garbage", "fake:finish-early"];
    let behaviour = BEHAVIOURS.into_iter().find(|word| script.contains(word)).unwrap_or("");
    match behaviour {
        "fake:hang" => {
            write.write_all(&send(serde_json::json!({"v":1,"type":"started","job":job}))).await?;
            std::future::pending::<()>().await;
        }
        "fake:poweroff" => return Ok(()),
        "fake:flood" => {
            let line = vec![b'x'; 70 * 1024];
            write.write_all(&line).await?;
            std::future::pending::<()>().await;
        }
        "fake:garbage" => {
            write.write_all(b"{not json\n").await?;
            std::future::pending::<()>().await;
        }
        "fake:finish-early" => {
            let finished = serde_json::json!({"v":1,"type":"finished","job":job,"exit_code":0});
            write.write_all(&send(finished)).await?;
            std::future::pending::<()>().await;
        }
        _ => {}
    }
    write.write_all(&send(serde_json::json!({"v":1,"type":"started","job":job}))).await?;
    let mut exit_code = 0;
    for line in script.lines() {
        write
            .write_all(&send(serde_json::json!({"v":1,"type":"log","job":job,"line":line})))
            .await?;
        if let Some((_, after)) = line.split_once("exit ") {
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            exit_code = digits.parse().unwrap_or(1);
        }
    }
    let finished = serde_json::json!({"v":1,"type":"finished","job":job,"exit_code":exit_code});
    write.write_all(&send(finished)).await
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    async fn start(&self, xml: &str) -> Result<(), HypervisorError> {
        let name = element(xml, "name")?;
        self.enter("start", &name)?;
        let boot = *self.boot.lock().unwrap();
        self.launch(xml, Some(boot))
    }

    async fn save(&self, name: &str, path: &Path) -> Result<(), HypervisorError> {
        self.enter("save", name)?;
        let mut state = self.state.lock().unwrap();
        let domain = state
            .domains
            .remove(name)
            .ok_or_else(|| HypervisorError::NoDomain { domain: name.to_owned() })?;
        std::fs::write(path, b"fake memory image")
            .map_err(|e| HypervisorError::operation("Save", name, e))?;
        state.saved.insert(path.to_owned(), domain.xml.clone());
        Ok(())
    }

    async fn saved_xml(&self, path: &Path) -> Result<String, HypervisorError> {
        let state = self.state.lock().unwrap();
        state.saved.get(path).cloned().ok_or_else(|| {
            HypervisorError::operation("Read saved XML", &path.display().to_string(), "no image")
        })
    }

    async fn restore_paused(&self, path: &Path, xml: &str) -> Result<(), HypervisorError> {
        let name = element(xml, "name")?;
        self.enter("restore", &name)?;
        if !self.state.lock().unwrap().saved.contains_key(path) || !path.exists() {
            return Err(HypervisorError::operation("Restore", &name, "no memory image"));
        }
        self.launch(xml, None)
    }

    async fn resume(&self, name: &str) -> Result<(), HypervisorError> {
        self.enter("resume", name)?;
        let state = self.state.lock().unwrap();
        let domain = state
            .domains
            .get(name)
            .ok_or_else(|| HypervisorError::NoDomain { domain: name.to_owned() })?;
        domain.running.send_replace(true);
        Ok(())
    }

    async fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        self.enter("destroy", name)?;
        self.state.lock().unwrap().domains.remove(name);
        Ok(())
    }

    async fn state(&self, name: &str) -> Result<DomainState, HypervisorError> {
        let state = self.state.lock().unwrap();
        Ok(match state.domains.get(name) {
            Some(domain) if *domain.running.borrow() => DomainState::Running,
            Some(_) => DomainState::Paused,
            None => DomainState::Gone,
        })
    }

    async fn marked_domains(&self) -> Result<Vec<DomainMark>, HypervisorError> {
        let state = self.state.lock().unwrap();
        let marks =
            state.domains.iter().filter_map(|(name, domain)| DomainMark::parse(name, &domain.xml));
        Ok(marks.collect())
    }

    async fn network(&self, name: &str) -> Result<Option<NetworkInfo>, HypervisorError> {
        self.enter("network", name)?;
        Ok(self.state.lock().unwrap().networks.get(name).cloned())
    }

    async fn network_filter(&self, name: &str) -> Result<Option<String>, HypervisorError> {
        self.enter("network_filter", name)?;
        Ok(self.state.lock().unwrap().filters.get(name).cloned())
    }

    async fn update_dhcp_host(
        &self,
        network: &str,
        change: DhcpHostChange,
    ) -> Result<(), HypervisorError> {
        self.enter("update_dhcp_host", network)?;
        let mut state = self.state.lock().unwrap();
        let info = state
            .networks
            .get_mut(network)
            .ok_or_else(|| HypervisorError::operation("Update", network, "no such network"))?;
        match change {
            DhcpHostChange::Add(host) => {
                let at = info.xml.find("</dhcp>").ok_or_else(|| {
                    HypervisorError::operation("Update", network, "the network has no DHCP")
                })?;
                info.xml.insert_str(at, &host);
            }
            DhcpHostChange::Delete(host) => {
                let found = info.xml.find(&host).ok_or_else(|| {
                    HypervisorError::operation("Update", network, "no such DHCP host")
                })?;
                info.xml.replace_range(found..found + host.len(), "");
            }
        }
        Ok(())
    }
}
