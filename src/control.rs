//! The control socket: a unix socket, for root only, over which `warmpool exec`, `status` and
//! the benchmark talk to the daemon.
//!
//! Each connection carries one request, a JSON object on one line, and the daemon answers with
//! JSON lines: for `exec`, the job's progress as it happens (`queued`, `started`, `log`…,
//! then `finished` or `failed`); for `status` and `stats`, one line. A client that hangs up
//! cancels its job, which ends and reverts its slot.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::guest::Run;
use crate::local::{LocalJob, LocalJobs};
use crate::metrics::{Metrics, Snapshot};
use crate::pool::{Pool, PoolStatus};
use crate::provider::github::GithubProvider;
use crate::slot::{Job, JobEvent};
use crate::store::{Actor, NewJob, Store};
use futures_util::StreamExt;

/// The longest request line: a command line for a job, with room to spare.
pub const MAX_REQUEST_BYTES: u64 = 1024 * 1024;
/// Events buffered per job before the slot waits for the client to read.
pub(crate) const JOB_EVENTS: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Run `argv` in a fresh slot of `pool` (or of the first pool).
    Exec {
        pool: Option<String>,
        argv: Vec<String>,
    },
    Status,
    Stats,
    /// Create an API token: for a tenant, or an admin token without one. Root on this socket
    /// is how an operator gets the first admin token.
    CreateToken {
        name: String,
        tenant: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Queued { job: String, pool: String },
    Started { slot: String },
    Log { line: String },
    Finished { exit_code: i32 },
    Failed { reason: String },
    Status { pools: Vec<PoolStatus> },
    Stats { stats: Snapshot },
    Token { id: String, secret: String },
    Error { message: String },
}

impl From<JobEvent> for Response {
    fn from(event: JobEvent) -> Response {
        match event {
            JobEvent::Started { slot, .. } => Response::Started { slot },
            JobEvent::Log { line } => Response::Log { line },
            JobEvent::Finished { exit_code } => Response::Finished { exit_code },
            JobEvent::Failed { reason } => Response::Failed { reason },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("Cannot listen on {path}: {source}")]
    Listen { path: String, source: std::io::Error },
    #[error("Cannot reach the daemon at {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("The daemon connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("The daemon sent an invalid line: {0}")]
    Invalid(String),
    #[error("The daemon closed the connection early")]
    Closed,
}

/// Why a local job was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("`argv` is empty: give a command to run")]
    EmptyCommand,
    #[error("the host is draining: it takes no new jobs until resumed")]
    Draining,
    #[error("no pool `{name}`; pools: {pools}")]
    NoPool { name: String, pools: String },
    #[error("the daemon has no pools")]
    NoPools,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What the control socket serves.
pub struct Control {
    pools: Vec<Pool>,
    metrics: Arc<Metrics>,
    next_job: AtomicU64,
    /// Where local jobs are recorded and tokens created for root on the socket; a control
    /// without one records nothing and refuses tokens.
    store: Option<Arc<Store>>,
    /// The tenant that local jobs belong to in the store.
    local_tenant: String,
    /// While set, the host takes no new jobs; running ones go on.
    draining: std::sync::atomic::AtomicBool,
    local: Arc<LocalJobs>,
    /// Set once the daemon has started its GitHub provider, which needs the control first.
    github: std::sync::OnceLock<Arc<GithubProvider>>,
}

impl Control {
    pub fn new(pools: Vec<Pool>, metrics: Arc<Metrics>) -> Control {
        Control {
            pools,
            metrics,
            next_job: AtomicU64::new(1),
            store: None,
            local_tenant: String::new(),
            draining: Default::default(),
            local: Arc::default(),
            github: std::sync::OnceLock::new(),
        }
    }

    /// Records local jobs in `store` as jobs of the tenant `local_tenant`.
    pub fn with_store(self, store: Arc<Store>, local_tenant: String) -> Control {
        Control { store: Some(store), local_tenant, ..self }
    }

    /// Gives webhooks their provider.
    pub fn set_github(&self, provider: Arc<GithubProvider>) {
        let _ = self.github.set(provider);
    }

    pub fn github(&self) -> Option<&Arc<GithubProvider>> {
        self.github.get()
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops taking new jobs; jobs queued or running go on.
    pub fn drain(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            info!("Host draining: no new jobs");
        }
    }

    pub fn resume(&self) {
        if self.draining.swap(false, Ordering::SeqCst) {
            info!("Host resumed: taking jobs again");
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Records a local job, submits it, and returns it for reading and cancelling. The job
    /// belongs to `tenant`, or to the daemon's local tenant (root on this socket).
    pub async fn submit(
        &self,
        pool: Option<&str>,
        argv: &[String],
        tenant: Option<(&str, Actor)>,
    ) -> Result<Arc<LocalJob>, SubmitError> {
        if argv.is_empty() {
            return Err(SubmitError::EmptyCommand);
        }
        if self.is_draining() {
            return Err(SubmitError::Draining);
        }
        let pool = match pool {
            Some(name) => self.pools.iter().find(|p| p.name() == name).ok_or_else(|| {
                let pools = self.pools.iter().map(Pool::name).collect::<Vec<_>>().join(", ");
                SubmitError::NoPool { name: name.to_owned(), pools }
            })?,
            None => self.pools.first().ok_or(SubmitError::NoPools)?,
        };
        let sequence = self.next_job.fetch_add(1, Ordering::Relaxed);
        let id = format!("local-{}-{sequence}", uuid::Uuid::new_v4().simple());
        let (tenant_id, actor) = match tenant {
            Some((tenant, actor)) => (tenant.to_owned(), actor),
            None => (self.local_tenant.clone(), Actor::LocalRoot),
        };
        if let Some(store) = &self.store {
            let new = NewJob {
                id: id.clone(),
                tenant_id: tenant_id.clone(),
                pool: pool.name().to_owned(),
            };
            store.call(move |store| store.record_job(&actor, new)).await?;
        }
        let (events, events_rx) = mpsc::channel(JOB_EVENTS);
        let job = self.local.track(
            id.clone(),
            pool.name().to_owned(),
            tenant_id,
            events_rx,
            self.store.clone(),
            self.metrics.clone(),
        );
        pool.submit(Job::new(id, Run::script(&shell_command(argv)), events));
        Ok(job)
    }

    /// Follows a local job that a slot took back from an earlier run of the daemon: its
    /// output from now on is readable, and its end is recorded, like those of jobs submitted
    /// to this daemon.
    pub fn track_adopted(
        &self,
        id: String,
        pool: String,
        tenant_id: String,
        events: mpsc::Receiver<JobEvent>,
    ) {
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        self.local.track(id, pool, tenant_id, events, store, metrics);
    }

    /// A local job that runs or ended recently.
    pub fn local_job(&self, id: &str) -> Option<Arc<LocalJob>> {
        self.local.get(id)
    }

    /// The status of every pool.
    pub async fn status(&self) -> Vec<PoolStatus> {
        let mut pools = Vec::with_capacity(self.pools.len());
        for pool in &self.pools {
            if let Some(status) = pool.status().await {
                pools.push(status);
            }
        }
        pools
    }
}

/// Quotes each argument for a POSIX shell and joins them into one command line.
pub fn shell_command(argv: &[String]) -> String {
    argv.iter().map(|arg| format!("'{}'", arg.replace('\'', "'\\''"))).collect::<Vec<_>>().join(" ")
}

/// Binds the control socket with mode 0600 in a directory only root can enter.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    let error = |source| ControlError::Listen { path: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    if socket_in_use(path) {
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another daemon is serving this socket",
        )));
    }
    let _ = std::fs::remove_file(path);
    // The umask makes the socket private from its first moment, not after a chmod.
    // SAFETY: umask only changes this process's file creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(error)?;
    Ok(listener)
}

/// Whether a live process answers on `path`; a stale socket file from a crash does not.
fn socket_in_use(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

/// Serves connections until the listener is dropped with the task.
pub async fn serve(listener: UnixListener, control: Arc<Control>) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "Accepting a control connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == euid || cred.uid() == 0 => {}
            Ok(cred) => {
                warn!(uid = cred.uid(), "Refused a control connection from another user");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "Refused a control connection without credentials");
                continue;
            }
        }
        tokio::spawn(handle(stream, control.clone()));
    }
}

async fn handle(stream: UnixStream, control: Arc<Control>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    let mut line = String::new();
    let request = match reader.read_line(&mut line).await {
        Ok(_) if !line.ends_with('\n') => {
            Err(format!("requests are one line of at most {MAX_REQUEST_BYTES} bytes"))
        }
        Ok(_) => {
            serde_json::from_str::<Request>(&line).map_err(|e| format!("invalid request: {e}"))
        }
        Err(e) => Err(format!("cannot read the request: {e}")),
    };
    let request = match request {
        Ok(request) => request,
        Err(message) => {
            debug!(error = %message, "Refused a control request");
            let _ = send(&mut write, &Response::Error { message }).await;
            return;
        }
    };
    match request {
        Request::Status => {
            let _ = send(&mut write, &Response::Status { pools: control.status().await }).await;
        }
        Request::Stats => {
            let _ = send(&mut write, &Response::Stats { stats: control.metrics.snapshot() }).await;
        }
        Request::CreateToken { name, tenant } => {
            let _ = send(&mut write, &create_token(&control, name, tenant).await).await;
        }
        Request::Exec { pool, argv } => {
            let job = match control.submit(pool.as_deref(), &argv, None).await {
                Ok(job) => job,
                Err(e) => {
                    let _ = send(&mut write, &Response::Error { message: e.to_string() }).await;
                    return;
                }
            };
            info!(job = %job.id, pool = %job.pool, "Local job queued");
            let queued = Response::Queued { job: job.id.clone(), pool: job.pool.clone() };
            let mut hangup = reader.into_inner().into_inner();
            let mut byte = [0u8; 1];
            let mut events = std::pin::pin!(job.subscribe());
            let mut client_gone = send(&mut write, &queued).await.is_err();
            while !client_gone {
                tokio::select! {
                    event = events.next() => {
                        let Some(event) = event else { return };
                        client_gone = send(&mut write, &event.into()).await.is_err();
                    }
                    _ = hangup.read(&mut byte) => client_gone = true,
                }
            }
            // A client that hangs up takes its job with it.
            job.cancel();
        }
    }
}

async fn create_token(control: &Control, name: String, tenant: Option<String>) -> Response {
    let Some(store) = &control.store else {
        return Response::Error { message: "this daemon has no store".into() };
    };
    let create =
        move |store: &Store| store.create_token(&Actor::LocalRoot, tenant.as_deref(), &name);
    match store.call(create).await {
        Ok(issued) => Response::Token {
            id: issued.token.id,
            secret: issued.plaintext.expose_str().unwrap_or_default().to_owned(),
        },
        Err(e) => Response::Error { message: e.to_string() },
    }
}

async fn send(
    write: &mut (impl AsyncWriteExt + Unpin),
    response: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}

/// The client side: one request, and a reader of the answers.
pub struct Client {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    _write: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    pub async fn request(path: &Path, request: &Request) -> Result<Client, ControlError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ControlError::Connect { path: path.display().to_string(), source })?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
        line.push(b'\n');
        write.write_all(&line).await?;
        Ok(Client { lines: BufReader::new(read).lines(), _write: write })
    }

    /// The next answer, or `None` when the daemon has said all.
    pub async fn next(&mut self) -> Result<Option<Response>, ControlError> {
        match self.lines.next_line().await? {
            Some(line) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| ControlError::Invalid(e.to_string())),
            None => Ok(None),
        }
    }

    /// Sends one request and returns its single answer.
    pub async fn call(path: &Path, request: &Request) -> Result<Response, ControlError> {
        Client::request(path, request).await?.next().await?.ok_or(ControlError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_command_quotes_every_argument() {
        let argv: Vec<String> =
            ["sh", "-c", "echo 'hi' $HOME; exit 3"].iter().map(|s| s.to_string()).collect();
        assert_eq!(shell_command(&argv), r#"'sh' '-c' 'echo '\''hi'\'' $HOME; exit 3'"#);
    }

    #[test]
    fn requests_parse_strictly() {
        let exec: Request =
            serde_json::from_str(r#"{"type":"exec","pool":null,"argv":["true"]}"#).unwrap();
        assert_eq!(exec, Request::Exec { pool: None, argv: vec!["true".into()] });
        assert!(
            serde_json::from_str::<Request>(r#"{"type":"exec","argv":["x"],"extra":1}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"type":"reboot"}"#).is_err());
    }

    #[tokio::test]
    async fn malformed_and_oversized_requests_get_an_error_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = bind(&path).unwrap();
        let control = Arc::new(Control::new(Vec::new(), Arc::new(Metrics::default())));
        let server = tokio::spawn(serve(listener, control));

        for request in [b"{nonsense\n".to_vec(), vec![b'x'; MAX_REQUEST_BYTES as usize + 10]] {
            let mut stream = UnixStream::connect(&path).await.unwrap();
            let _ = stream.write_all(&request).await;
            let mut answer = String::new();
            BufReader::new(stream).read_line(&mut answer).await.unwrap();
            let response: Response = serde_json::from_str(&answer).unwrap();
            assert!(matches!(response, Response::Error { .. }), "{answer}");
        }

        let response =
            Client::call(&path, &Request::Exec { pool: None, argv: vec!["true".into()] })
                .await
                .unwrap();
        assert_eq!(response, Response::Error { message: "the daemon has no pools".into() });
        server.abort();
    }

    #[tokio::test]
    async fn shutdown_ends_jobs_of_open_connections() {
        use crate::hypervisor::fake::FakeHypervisor;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let fake = FakeHypervisor::new();
        let config = crate::pool::tests::config(dir.path(), 1, 1);
        let metrics = Arc::new(Metrics::default());
        let pool = Pool::start(&config, dir.path(), Arc::new(fake.clone()), metrics.clone());
        let control = Arc::new(Control::new(vec![pool], metrics));
        let server = tokio::spawn(serve(bind(&path).unwrap(), control.clone()));

        let exec =
            Request::Exec { pool: None, argv: vec!["sh".into(), "-c".into(), "fake:hang".into()] };
        let mut client = Client::request(&path, &exec).await.unwrap();
        assert!(matches!(client.next().await.unwrap(), Some(Response::Queued { .. })));
        assert!(matches!(client.next().await.unwrap(), Some(Response::Started { .. })));

        // The connection's task still holds the control; shutdown must not wait for it.
        let stopped = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            crate::daemon::shutdown(&control),
        );
        stopped.await.expect("shutdown does not wait for clients");
        let mut last = None;
        while let Ok(Some(response)) = client.next().await {
            last = Some(response);
        }
        assert_eq!(last, Some(Response::Failed { reason: "The daemon is shutting down".into() }));
        assert!(fake.domains().is_empty());
        server.abort();
    }

    #[tokio::test]
    async fn the_socket_is_private_and_not_stolen_from_a_live_daemon() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/control.sock");
        let _listener = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(ControlError::Listen { .. })));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
