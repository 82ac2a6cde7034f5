//! The CLI's client of the HTTP API.
//!
//! The endpoint and token come from, in order: the command-line flags, the environment
//! (`WARMPOOL_API`, `WARMPOOL_TOKEN`), and the client configuration file
//! (`$WARMPOOL_CLIENT_CONFIG`, else `~/.config/warmpool/client.toml`) with the keys `api` and
//! `token`. An endpoint is `http://host:port`, or `unix:/path` for the daemon's root-only unix
//! socket, where no token is needed; with none given, root on the host uses the default unix
//! socket. Errors from the API come back as [`ClientError::Api`], whose message is the one line
//! an operator needs.

use std::path::PathBuf;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;

/// Where the daemon's API listens over TCP when the README's example is followed.
pub const DEFAULT_API: &str = "http://127.0.0.1:9464";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Cannot read the client configuration {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(
        "`{0}` is not an API address such as http://127.0.0.1:9464 or unix:/run/warmpool/api.sock"
    )]
    Endpoint(String),
    #[error("Cannot reach the API at {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("No API token: give --token, set WARMPOOL_TOKEN, or put `token` in the client configuration")]
    NoToken,
    #[error("{message}{}", field.as_ref().map(|f| format!(" (field `{f}`)")).unwrap_or_default())]
    Api { status: StatusCode, code: String, message: String, field: Option<String> },
    #[error("The API sent an unreadable answer: {0}")]
    Answer(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientConfig {
    api: Option<String>,
    token: Option<String>,
    /// PEM certificates to trust for an https endpoint, such as the daemon's own.
    ca: Option<PathBuf>,
}

/// The system's trusted certificates on Debian and Ubuntu, for https endpoints without `ca`.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

pub struct ApiClient {
    transport: Transport,
    token: Option<String>,
}

enum Transport {
    /// `host:port` to connect to.
    Tcp(String),
    /// The daemon's unix socket: root only, no token needed.
    Unix(PathBuf),
    /// `host:port` over TLS, checked against `server_name`.
    Tls { authority: String, server_name: String, connector: tokio_rustls::TlsConnector },
}

impl ApiClient {
    /// Resolves the endpoint and token from flags, environment and the configuration file.
    pub fn resolve(api: Option<String>, token: Option<String>) -> Result<ApiClient, ClientError> {
        let file = read_config()?;
        let api = api
            .or_else(|| std::env::var("WARMPOOL_API").ok())
            .or(file.api)
            .unwrap_or_else(default_endpoint);
        let token = token.or_else(|| std::env::var("WARMPOOL_TOKEN").ok()).or(file.token);
        let ca = std::env::var_os("WARMPOOL_CA").map(PathBuf::from).or(file.ca);
        ApiClient::new(&api, token, ca.as_deref())
    }

    /// A client of the endpoint `api` (`http://…`, `https://…` or `unix:/…`); an https endpoint
    /// trusts the certificates in `ca`, or the system's.
    pub fn new(
        api: &str,
        token: Option<String>,
        ca: Option<&std::path::Path>,
    ) -> Result<ApiClient, ClientError> {
        let authority = |rest: &str| {
            Some(rest.trim_end_matches('/').to_owned())
                .filter(|authority| !authority.is_empty() && !authority.contains('/'))
                .ok_or_else(|| ClientError::Endpoint(api.to_owned()))
        };
        let transport = if let Some(path) = api.strip_prefix("unix:") {
            Transport::Unix(PathBuf::from(path))
        } else if let Some(rest) = api.strip_prefix("http://") {
            Transport::Tcp(authority(rest)?)
        } else if let Some(rest) = api.strip_prefix("https://") {
            let authority = authority(rest)?;
            let server_name =
                authority.rsplit_once(':').map_or(authority.as_str(), |(host, _)| host).to_owned();
            let connector = tls_connector(ca.unwrap_or(std::path::Path::new(SYSTEM_ROOTS)))?;
            Transport::Tls { authority, server_name, connector }
        } else {
            return Err(ClientError::Endpoint(api.to_owned()));
        };
        Ok(ApiClient { transport, token })
    }

    /// Whether the client can authenticate: with a token, or as root on the unix socket.
    pub fn has_token(&self) -> bool {
        self.token.is_some() || matches!(self.transport, Transport::Unix(_))
    }

    fn endpoint(&self) -> String {
        match &self.transport {
            Transport::Tcp(authority) | Transport::Tls { authority, .. } => authority.clone(),
            Transport::Unix(path) => format!("unix:{}", path.display()),
        }
    }

    /// Sends one request and returns the JSON answer (`Null` for an empty one).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let bytes =
            response.into_body().collect().await.map_err(|e| self.connect_error(e))?.to_bytes();
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Answer(e.to_string()))?
        };
        if status.is_success() {
            return Ok(value);
        }
        Err(api_error(status, &value))
    }

    /// GETs a stream of JSON lines and hands each to `each` as it arrives, until the stream
    /// ends or `each` returns false.
    pub async fn stream_lines(
        &self,
        path: &str,
        mut each: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        let response = self.send(Method::GET, path, None).await?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            return Err(api_error(status, &serde_json::from_slice(&bytes).unwrap_or(Value::Null)));
        }
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(|e| self.connect_error(e))?.into_data() else { continue };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let value = serde_json::from_slice(&line)
                    .map_err(|e| ClientError::Answer(e.to_string()))?;
                if !each(value) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let (mut sender, host) = match &self.transport {
            Transport::Tcp(authority) => {
                let stream = tokio::net::TcpStream::connect(authority)
                    .await
                    .map_err(|e| self.connect_error(e))?;
                (self.handshake(stream).await?, authority.as_str())
            }
            Transport::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| self.connect_error(e))?;
                (self.handshake(stream).await?, "localhost")
            }
            Transport::Tls { authority, server_name, connector } => {
                let stream = tokio::net::TcpStream::connect(authority)
                    .await
                    .map_err(|e| self.connect_error(e))?;
                let name = rustls::pki_types::ServerName::try_from(server_name.clone())
                    .map_err(|_| ClientError::Endpoint(authority.clone()))?;
                let tls =
                    connector.connect(name, stream).await.map_err(|e| self.connect_error(e))?;
                (self.handshake(tls).await?, authority.as_str())
            }
        };
        let mut request =
            Request::builder().method(method).uri(path).header(hyper::header::HOST, host);
        match (&self.token, &self.transport) {
            (Some(token), _) => {
                request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            }
            (None, Transport::Unix(_)) => {}
            (None, Transport::Tcp(_) | Transport::Tls { .. }) => return Err(ClientError::NoToken),
        }
        let body = match body {
            Some(body) => {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let request =
            request.body(Full::new(body)).map_err(|e| ClientError::Answer(e.to_string()))?;
        sender.send_request(request).await.map_err(|e| self.connect_error(e))
    }

    async fn handshake<S>(
        &self,
        stream: S,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.connect_error(e))?;
        tokio::spawn(connection);
        Ok(sender)
    }

    fn connect_error(&self, reason: impl std::fmt::Display) -> ClientError {
        ClientError::Connect { endpoint: self.endpoint(), reason: reason.to_string() }
    }
}

fn api_error(status: StatusCode, value: &Value) -> ClientError {
    let error = &value["error"];
    ClientError::Api {
        status,
        code: error["code"].as_str().unwrap_or("unknown").to_owned(),
        message: error["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("HTTP {status}")),
        field: error["field"].as_str().map(str::to_owned),
    }
}

fn tls_connector(ca: &std::path::Path) -> Result<tokio_rustls::TlsConnector, ClientError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let error = |reason: String| ClientError::Config { path: ca.to_owned(), reason };
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca).map_err(|e| error(e.to_string()))? {
        roots
            .add(certificate.map_err(|e| error(e.to_string()))?)
            .map_err(|e| error(e.to_string()))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)))
}

/// Root on the host talks to the daemon's unix socket; anyone else to the TCP address.
fn default_endpoint() -> String {
    let socket = std::path::Path::new(crate::config::DEFAULT_API_SOCKET);
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 && socket.exists() {
        format!("unix:{}", socket.display())
    } else {
        DEFAULT_API.to_owned()
    }
}

fn config_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WARMPOOL_CLIENT_CONFIG") {
        return Some(path.into());
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config/warmpool/client.toml"))
}

fn read_config() -> Result<ClientConfig, ClientError> {
    let Some(path) = config_path() else { return Ok(ClientConfig::default()) };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| ClientError::Config { path, reason: e.message().to_owned() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClientConfig::default()),
        Err(e) => Err(ClientError::Config { path, reason: e.to_string() }),
    }
}

/// Prints rows as aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let rows = vec![vec!["a".into(), "long value".into()], vec!["bbb".into(), "x".into()]];
        assert_eq!(table(&["ID", "NAME"], &rows), "ID   NAME\na    long value\nbbb  x");
    }

    #[test]
    fn endpoints_must_be_plain_http_addresses() {
        std::env::set_var("WARMPOOL_CLIENT_CONFIG", "/nonexistent/client.toml");
        assert!(ApiClient::resolve(Some("http://127.0.0.1:1".into()), None).is_ok());
        assert!(ApiClient::resolve(Some("unix:/run/x.sock".into()), None).unwrap().has_token());
        assert!(!ApiClient::resolve(Some("http://h:1".into()), None).unwrap().has_token());
        for bad in ["127.0.0.1:1", "http://", "http://h:1/path", "ftp://h", "https://"] {
            assert!(
                matches!(ApiClient::resolve(Some(bad.into()), None), Err(ClientError::Endpoint(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn api_errors_read_as_one_line_naming_the_field() {
        let error = ClientError::Api {
            status: StatusCode::BAD_REQUEST,
            code: "invalid".into(),
            message: "Invalid value for `weight`: 0 is not within 1..=1000".into(),
            field: Some("weight".into()),
        };
        assert_eq!(
            error.to_string(),
            "Invalid value for `weight`: 0 is not within 1..=1000 (field `weight`)"
        );
    }
}
