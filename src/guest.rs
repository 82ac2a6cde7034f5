//! The job port: the line protocol between the daemon and the agent inside a guest.
//!
//! The port is a virtio-serial channel that QEMU binds to a unix socket on the host. Each message
//! is one JSON object on one line, at most [`MAX_LINE_BYTES`] long, with `"v": 1` and a `"type"`.
//!
//! ```text
//! guest -> host   {"v":1,"type":"ready"}
//! host -> guest   {"v":1,"type":"job","job":"…","unix_time_ms":…,"run":{"kind":"command","script_b64":"…"}}
//! guest -> host   {"v":1,"type":"started","job":"…"}
//! guest -> host   {"v":1,"type":"log","job":"…","line":"…"}          (any number)
//! guest -> host   {"v":1,"type":"finished","job":"…","exit_code":0}
//! ```
//!
//! Everything a guest sends is untrusted. Reading is bounded in size and in time by the caller,
//! and every way a message can be wrong is a [`PortError`] that ends the job, never the daemon.

use std::io;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The longest line either side may send, newline included.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
pub const PROTOCOL_VERSION: u32 = 1;
/// QEMU creates the port's socket as it starts; a restore that succeeded has it within
/// milliseconds, so this only bounds a broken host.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_RETRY: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("Cannot connect to the job port {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("The job port closed")]
    Closed,
    #[error("Job port I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("The guest sent a line over {MAX_LINE_BYTES} bytes")]
    Oversized,
    #[error("The guest sent a malformed message: {0}")]
    Malformed(String),
    #[error("The guest speaks protocol version {0}, not {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("The guest sent `{got}` while the daemon expected {expected}")]
    Unexpected { got: &'static str, expected: &'static str },
    #[error("The guest named job `{got}` instead of `{expected}`")]
    WrongJob { got: String, expected: String },
}

/// What a guest may say.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMessage {
    Ready,
    Started { job: String },
    Log { job: String, line: String },
    Finished { job: String, exit_code: i32 },
}

impl GuestMessage {
    pub fn kind(&self) -> &'static str {
        match self {
            GuestMessage::Ready => "ready",
            GuestMessage::Started { .. } => "started",
            GuestMessage::Log { .. } => "log",
            GuestMessage::Finished { .. } => "finished",
        }
    }

    /// The job a message names, for those that name one.
    pub fn job(&self) -> Option<&str> {
        match self {
            GuestMessage::Ready => None,
            GuestMessage::Started { job }
            | GuestMessage::Log { job, .. }
            | GuestMessage::Finished { job, .. } => Some(job),
        }
    }
}

/// The one message the host sends: a job for the guest to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMessage {
    pub v: u32,
    #[serde(rename = "type")]
    pub kind: String,
    pub job: String,
    /// The host's clock, because a guest restored from a memory image wakes with a stale one.
    pub unix_time_ms: u64,
    pub run: Run,
}

/// What the guest runs for a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Run {
    /// A shell script, base64-encoded so that a minimal guest can decode it without a JSON
    /// parser.
    Command { script_b64: String },
    /// A GitHub Actions runner registered for this one job: the guest starts it with
    /// `--jitconfig`, and it takes one job and exits.
    GithubRunner { jit_config: String },
}

impl Run {
    pub fn script(script: &str) -> Run {
        Run::Command { script_b64: base64::engine::general_purpose::STANDARD.encode(script) }
    }
}

impl JobMessage {
    pub fn new(job: &str, run: Run) -> JobMessage {
        let unix_time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        JobMessage { v: PROTOCOL_VERSION, kind: "job".into(), job: job.into(), unix_time_ms, run }
    }
}

/// Parses one line (without its newline) from a guest.
pub fn parse_line(line: &[u8]) -> Result<GuestMessage, PortError> {
    // A guest may print bytes that are not UTF-8 in its log lines; they are replaced rather
    // than ending the job.
    let text = String::from_utf8_lossy(line);
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PortError::Malformed(e.to_string()))?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => return Err(PortError::Version(v.min(u64::from(u32::MAX)) as u32)),
        None => return Err(PortError::Malformed("no protocol version `v`".into())),
    }
    serde_json::from_value(value).map_err(|e| PortError::Malformed(e.to_string()))
}

/// The host end of a job port.
pub struct JobPort {
    stream: UnixStream,
    buffer: Vec<u8>,
    /// Bytes of `buffer` already searched for a newline.
    scanned: usize,
}

impl JobPort {
    /// Connects to the port's socket, waiting for QEMU to create it.
    pub async fn connect(path: &Path) -> Result<JobPort, PortError> {
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        loop {
            match UnixStream::connect(path).await {
                Ok(stream) => return Ok(JobPort::from_stream(stream)),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(PortError::Connect { path: path.display().to_string(), source: e })
                }
                Err(_) => tokio::time::sleep(CONNECT_RETRY).await,
            }
        }
    }

    pub fn from_stream(stream: UnixStream) -> JobPort {
        JobPort { stream, buffer: Vec::with_capacity(4096), scanned: 0 }
    }

    pub async fn send_job(&mut self, message: &JobMessage) -> Result<(), PortError> {
        let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
        line.push(b'\n');
        if line.len() > MAX_LINE_BYTES {
            return Err(PortError::Io(io::Error::other("job message exceeds the line limit")));
        }
        self.stream.write_all(&line).await?;
        Ok(())
    }

    /// Reads the next message. Cancel-safe: a partly read line stays buffered.
    pub async fn next_message(&mut self) -> Result<GuestMessage, PortError> {
        let line = self.next_line().await?;
        parse_line(&line)
    }

    async fn next_line(&mut self) -> Result<Vec<u8>, PortError> {
        loop {
            if let Some(pos) = self.buffer[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                return Ok(line);
            }
            self.scanned = self.buffer.len();
            if self.buffer.len() >= MAX_LINE_BYTES {
                return Err(PortError::Oversized);
            }
            let mut chunk = [0u8; 16 * 1024];
            let want = chunk.len().min(MAX_LINE_BYTES - self.buffer.len());
            let n = self.stream.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Err(PortError::Closed);
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (JobPort, UnixStream) {
        let (host, guest) = UnixStream::pair().unwrap();
        (JobPort::from_stream(host), guest)
    }

    #[test]
    fn parses_each_guest_message() {
        assert_eq!(parse_line(br#"{"v":1,"type":"ready"}"#).unwrap(), GuestMessage::Ready);
        assert_eq!(
            parse_line(br#"{"type":"finished","v":1,"job":"j","exit_code":3}"#).unwrap(),
            GuestMessage::Finished { job: "j".into(), exit_code: 3 }
        );
        assert_eq!(
            parse_line(b"{\"v\":1,\"type\":\"log\",\"job\":\"j\",\"line\":\"a\xffb\"}").unwrap(),
            GuestMessage::Log { job: "j".into(), line: "a\u{fffd}b".into() }
        );
    }

    #[test]
    fn rejects_malformed_messages() {
        assert!(matches!(parse_line(b"{not json"), Err(PortError::Malformed(_))));
        assert!(matches!(parse_line(br#"{"type":"ready"}"#), Err(PortError::Malformed(_))));
        assert!(matches!(parse_line(br#"{"v":2,"type":"ready"}"#), Err(PortError::Version(2))));
        assert!(matches!(parse_line(br#"{"v":1,"type":"reboot"}"#), Err(PortError::Malformed(_))));
        assert!(matches!(
            parse_line(br#"{"v":1,"type":"finished","job":"j","exit_code":"x"}"#),
            Err(PortError::Malformed(_))
        ));
        assert!(matches!(parse_line(b"[1,2]"), Err(PortError::Malformed(_))));
    }

    #[tokio::test]
    async fn reads_lines_split_across_writes_and_joined_in_one() {
        let (mut port, mut guest) = pair();
        guest.write_all(b"{\"v\":1,\"ty").await.unwrap();
        guest
            .write_all(b"pe\":\"ready\"}\n{\"v\":1,\"type\":\"started\",\"job\":\"a\"}\n")
            .await
            .unwrap();
        assert_eq!(port.next_message().await.unwrap(), GuestMessage::Ready);
        assert_eq!(port.next_message().await.unwrap(), GuestMessage::Started { job: "a".into() });
    }

    #[tokio::test]
    async fn a_line_over_the_limit_is_refused_without_reading_it_all() {
        let (mut port, mut guest) = pair();
        let writer = tokio::spawn(async move {
            // Far more than the limit, and no newline: the reader must stop at the limit.
            let chunk = vec![b'a'; 64 * 1024];
            for _ in 0..64 {
                if guest.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        assert!(matches!(port.next_message().await, Err(PortError::Oversized)));
        drop(port);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_line_exactly_at_the_limit_is_accepted() {
        let (mut port, mut guest) = pair();
        let prefix = br#"{"v":1,"type":"log","job":"j","line":""#;
        let suffix = b"\"}\n";
        let filler = MAX_LINE_BYTES - prefix.len() - suffix.len();
        let mut line = prefix.to_vec();
        line.extend(std::iter::repeat(b'x').take(filler));
        line.extend_from_slice(suffix);
        assert_eq!(line.len(), MAX_LINE_BYTES);
        guest.write_all(&line).await.unwrap();
        assert!(matches!(port.next_message().await, Ok(GuestMessage::Log { .. })));
    }

    #[tokio::test]
    async fn eof_is_closed() {
        let (mut port, guest) = pair();
        drop(guest);
        assert!(matches!(port.next_message().await, Err(PortError::Closed)));
    }

    #[tokio::test]
    async fn job_message_round_trips_and_carries_the_script() {
        let (mut port, guest) = pair();
        port.send_job(&JobMessage::new("j1", Run::script("echo hi"))).await.unwrap();
        let mut guest = JobPort::from_stream(guest);
        let line = guest.next_line().await.unwrap();
        let message: JobMessage = serde_json::from_slice(&line).unwrap();
        assert_eq!(message.kind, "job");
        assert_eq!(message.job, "j1");
        let Run::Command { script_b64 } = message.run else { panic!("{:?}", message.run) };
        let script = base64::engine::general_purpose::STANDARD.decode(script_b64).unwrap();
        assert_eq!(script, b"echo hi");
        assert!(message.unix_time_ms > 1_600_000_000_000);
    }

    #[test]
    fn a_runner_job_message_names_its_kind_and_carries_the_configuration() {
        let message =
            JobMessage::new("j2", Run::GithubRunner { jit_config: "eyJhIjoxfQ==".into() });
        let line = serde_json::to_value(&message).unwrap();
        assert_eq!(
            line["run"],
            serde_json::json!({"kind": "github_runner", "jit_config": "eyJhIjoxfQ=="})
        );
    }
}
