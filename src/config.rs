//! The host configuration: one TOML file naming the state directory, the libvirt connection and
//! the pools this host serves.
//!
//! Parsing is strict (`deny_unknown_fields`), and a second validation step checks what serde
//! cannot: names, ranges, files that must exist and templates that must render. Every error
//! names the field it is about, as `pools[1].memory_mib`, so that an operator can fix the file
//! without reading code.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::network::Ipv4Net;
use crate::template::{Template, TemplateError};

/// Where the daemon keeps slots and the control socket unless configured otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/warmpool";
/// Where `scripts/build-reference-guest` writes its guests by default.
pub const DEFAULT_IMAGES_DIR: &str = "/var/lib/warmpool/images";
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/warmpool/warmpool.sock";
pub const DEFAULT_API_SOCKET: &str = "/run/warmpool/api.sock";
/// A CI job that runs longer than this is almost always stuck; operators raise it per pool.
pub const DEFAULT_MAX_JOB_SECS: u64 = 6 * 3600;
/// Windows on Arm under nested virtualisation can take minutes to boot and settle.
pub const DEFAULT_BOOT_TIMEOUT_SECS: u64 = 600;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("Invalid configuration in {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("Invalid value for `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    #[error("Invalid template for `{field}`")]
    Template {
        field: String,
        #[source]
        source: TemplateError,
    },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, reason: impl fmt::Display) -> Self {
        ConfigError::Invalid { field: field.into(), reason: reason.to_string() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Aarch64,
    X86_64,
}

impl Arch {
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::X86_64
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Aarch64 => "aarch64",
            Arch::X86_64 => "x86_64",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Acceleration {
    Kvm,
    Tcg,
    /// KVM when the guest has the host's architecture and `/dev/kvm` exists, TCG otherwise.
    #[default]
    Auto,
}

/// The raw file, as serde reads it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    libvirt_uri: Option<String>,
    control_socket: Option<PathBuf>,
    api_socket: Option<PathBuf>,
    api_listen: Option<String>,
    tls_certificate: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    drain_grace_secs: Option<u64>,
    #[serde(default)]
    guest_blocked_ranges: Vec<String>,
    #[serde(default, rename = "pool")]
    pools: Vec<RawPool>,
    #[serde(default)]
    github: GithubConfig,
}

/// Ten minutes: most CI jobs that are near their end finish, and systemd's stop timeout in
/// `host-setup/warmpool.service` leaves room for it and the slots' removal.
pub const DEFAULT_DRAIN_GRACE_SECS: u64 = 600;

/// How the host works with GitHub, for all GitHub tenants.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GithubConfig {
    /// Names this host in its runners' names (`warmpool-<host_name>-<slot>-<job>`); the
    /// kernel's host name when absent. Hosts that share a GitHub tenant need different names.
    pub host_name: Option<String>,
    /// How often queued jobs and registered runners are checked against GitHub, to recover
    /// from lost webhooks and leaked registrations.
    pub reconcile_interval_secs: u64,
    /// A runner that has not taken a job this long after its guest started is removed.
    pub runner_idle_timeout_secs: u64,
    /// After GitHub reports a runner's job completed, how long the runner may take to exit
    /// on its own before its guest is stopped.
    pub completed_grace_secs: u64,
}

impl Default for GithubConfig {
    fn default() -> GithubConfig {
        GithubConfig {
            host_name: None,
            reconcile_interval_secs: 60,
            runner_idle_timeout_secs: 300,
            completed_grace_secs: 10,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: String,
    image: PathBuf,
    arch: Arch,
    vcpus: u32,
    memory_mib: u64,
    slots: u32,
    ready: Option<u32>,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    acceleration: Acceleration,
    template: Option<PathBuf>,
    max_job_secs: Option<u64>,
    boot_timeout_secs: Option<u64>,
    nvram_template: Option<PathBuf>,
    #[serde(default)]
    template_vars: BTreeMap<String, String>,
    network: Option<String>,
}

/// The pool setting for a guest without a network interface.
pub const NO_NETWORK: &str = "none";

/// A validated host configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub libvirt_uri: String,
    pub control_socket: PathBuf,
    /// The unix socket of the HTTP API, for root only, who needs no token on it.
    pub api_socket: PathBuf,
    /// The TCP address of the HTTP API; none serves it on the unix socket alone.
    pub api_listen: Option<std::net::SocketAddr>,
    /// PEM certificate chain and private key: with them, the TCP address speaks TLS.
    pub tls: Option<TlsFiles>,
    pub pools: Vec<PoolConfig>,
    pub github: GithubConfig,
    /// At a stop or a host shutdown, how long running jobs may go on before they are ended.
    pub drain_grace_secs: u64,
    /// IPv4 ranges no guest may reach, besides those the guest filter always drops and the
    /// host's own addresses: the host's virtual network, say, or a corporate range.
    pub guest_blocked_ranges: Vec<Ipv4Net>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    /// The immutable base disk every slot's overlay sits on.
    pub image: PathBuf,
    pub arch: Arch,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub slots: u32,
    /// How many slots wait restored and paused in memory; the rest wait saved on disk.
    pub ready: u32,
    pub labels: Vec<String>,
    pub acceleration: Acceleration,
    pub template: Template,
    pub max_job_secs: u64,
    pub boot_timeout_secs: u64,
    /// The firmware variables a slot starts from, for templates with `{{nvram}}`.
    pub nvram_template: Option<PathBuf>,
    /// Extra values for the template's placeholders, such as a kernel path.
    pub template_vars: BTreeMap<String, String>,
    /// The libvirt network of the slots' interfaces; none gives them no interface.
    pub network: Option<String>,
}

impl Config {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text, path)
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.message().to_owned() + &span_hint(text, e.span()),
        })?;
        validate(raw)
    }

    /// The configuration used when no file is given: one pool of two reference guests of the
    /// host's architecture, as built by `scripts/build-reference-guest`.
    pub fn builtin_default() -> Config {
        Config::parse(&Config::builtin_default_toml(), Path::new("built-in default"))
            .expect("the built-in configuration is valid")
    }

    /// The built-in configuration as a file would say it.
    pub fn builtin_default_toml() -> String {
        let arch = Arch::host().as_str();
        let guest = format!("{DEFAULT_IMAGES_DIR}/reference-{arch}");
        format!(
            r#"state_dir = "{DEFAULT_STATE_DIR}"
libvirt_uri = "{DEFAULT_LIBVIRT_URI}"
control_socket = "{DEFAULT_CONTROL_SOCKET}"

[[pool]]
name = "reference"
image = "{guest}/disk.qcow2"
arch = "{arch}"
vcpus = 1
memory_mib = 256
slots = 2
ready = 2
labels = ["linux", "{arch}"]
acceleration = "auto"
max_job_secs = 3600
boot_timeout_secs = 300
template_vars = {{ kernel = "{guest}/vmlinuz", initrd = "{guest}/initrd.img" }}
"#
        )
    }

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// Points at the line of a TOML error, which `toml`'s bare message leaves out.
fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => format!(" (line {})", text[..span.start].lines().count().max(1)),
        None => String::new(),
    }
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    if raw.pools.is_empty() {
        return Err(ConfigError::invalid("pool", "at least one [[pool]] is required"));
    }
    let state_dir = raw.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into());
    check_absolute("state_dir", &state_dir)?;
    let control_socket = raw.control_socket.unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into());
    check_absolute("control_socket", &control_socket)?;
    let libvirt_uri = raw.libvirt_uri.unwrap_or_else(|| DEFAULT_LIBVIRT_URI.into());
    if !libvirt_uri.contains(":///") && !libvirt_uri.contains("://") {
        return Err(ConfigError::invalid("libvirt_uri", "expected a URI such as qemu:///system"));
    }

    let api_socket = raw.api_socket.unwrap_or_else(|| DEFAULT_API_SOCKET.into());
    check_absolute("api_socket", &api_socket)?;
    let api_listen = match raw.api_listen {
        Some(address) => Some(address.parse().map_err(|_| {
            ConfigError::invalid(
                "api_listen",
                format!("`{address}` is not an address such as 127.0.0.1:9464"),
            )
        })?),
        None => None,
    };

    let tls = match (raw.tls_certificate, raw.tls_key) {
        (Some(certificate), Some(key)) => {
            check_absolute("tls_certificate", &certificate)?;
            check_absolute("tls_key", &key)?;
            Some(TlsFiles { certificate, key })
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::invalid("tls_key", "tls_certificate needs its key"))
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid("tls_certificate", "tls_key needs its certificate"))
        }
    };
    if tls.is_some() && api_listen.is_none() {
        return Err(ConfigError::invalid(
            "api_listen",
            "TLS is for the TCP address, which is not set",
        ));
    }

    let mut pools: Vec<PoolConfig> = Vec::with_capacity(raw.pools.len());
    for (index, raw_pool) in raw.pools.into_iter().enumerate() {
        let pool = validate_pool(index, raw_pool)?;
        if pools.iter().any(|p| p.name == pool.name) {
            return Err(ConfigError::invalid(
                format!("pools[{index}].name"),
                format!("pool `{}` is defined twice", pool.name),
            ));
        }
        pools.push(pool);
    }
    let github = validate_github(raw.github)?;
    let drain_grace_secs = raw.drain_grace_secs.unwrap_or(DEFAULT_DRAIN_GRACE_SECS);
    check_range("drain_grace_secs", drain_grace_secs, 0, 86_400)?;
    let guest_blocked_ranges = raw
        .guest_blocked_ranges
        .iter()
        .enumerate()
        .map(|(i, range)| {
            range.parse().map_err(|reason| {
                ConfigError::invalid(format!("guest_blocked_ranges[{i}]"), reason)
            })
        })
        .collect::<Result<Vec<Ipv4Net>, ConfigError>>()?;
    Ok(Config {
        state_dir,
        libvirt_uri,
        control_socket,
        api_socket,
        api_listen,
        tls,
        pools,
        github,
        drain_grace_secs,
        guest_blocked_ranges,
    })
}

fn validate_github(github: GithubConfig) -> Result<GithubConfig, ConfigError> {
    if let Some(host_name) = &github.host_name {
        let plain = host_name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if host_name.is_empty() || host_name.len() > 20 || !plain {
            return Err(ConfigError::invalid(
                "github.host_name",
                "1 to 20 of a-z, A-Z, 0-9 and `-`: it is part of runner names",
            ));
        }
    }
    check_range("github.reconcile_interval_secs", github.reconcile_interval_secs, 5, 86_400)?;
    check_range("github.runner_idle_timeout_secs", github.runner_idle_timeout_secs, 10, 86_400)?;
    check_range("github.completed_grace_secs", github.completed_grace_secs, 0, 3_600)?;
    Ok(github)
}

fn validate_pool(index: usize, raw: RawPool) -> Result<PoolConfig, ConfigError> {
    let field = |name: &str| format!("pools[{index}].{name}");

    check_name(&field("name"), &raw.name)?;
    check_absolute(&field("image"), &raw.image)?;
    check_range(&field("vcpus"), raw.vcpus.into(), 1, 256)?;
    check_range(&field("memory_mib"), raw.memory_mib, 64, 1 << 20)?;
    check_range(&field("slots"), raw.slots.into(), 1, 256)?;
    let ready = raw.ready.unwrap_or(raw.slots);
    if ready > raw.slots {
        return Err(ConfigError::invalid(
            field("ready"),
            format!("{ready} ready slots exceed the pool's {} slots", raw.slots),
        ));
    }
    for (i, label) in raw.labels.iter().enumerate() {
        if label.is_empty() || label.len() > 256 || label.contains(',') {
            return Err(ConfigError::invalid(
                format!("{}[{i}]", field("labels")),
                "labels are 1 to 256 characters without commas",
            ));
        }
    }
    let max_job_secs = raw.max_job_secs.unwrap_or(DEFAULT_MAX_JOB_SECS);
    check_range(&field("max_job_secs"), max_job_secs, 1, 7 * 24 * 3600)?;
    let boot_timeout_secs = raw.boot_timeout_secs.unwrap_or(DEFAULT_BOOT_TIMEOUT_SECS);
    check_range(&field("boot_timeout_secs"), boot_timeout_secs, 1, 24 * 3600)?;

    let template = match &raw.template {
        Some(path) => {
            check_absolute(&field("template"), path)?;
            Template::load(path)
                .map_err(|source| ConfigError::Template { field: field("template"), source })?
        }
        None => Template::reference(raw.arch),
    };
    template
        .check(raw.template_vars.keys().map(String::as_str))
        .map_err(|source| ConfigError::Template { field: field("template"), source })?;
    if template.uses("nvram") && raw.nvram_template.is_none() {
        return Err(ConfigError::invalid(
            field("nvram_template"),
            "the template has {{nvram}}, so the pool needs a firmware variables template",
        ));
    }
    if let Some(path) = &raw.nvram_template {
        check_absolute(&field("nvram_template"), path)?;
    }
    let network = match raw.network.as_deref() {
        None | Some(NO_NETWORK) => None,
        Some(name) => {
            check_name(&field("network"), name)?;
            if !template.uses("interface") {
                return Err(ConfigError::invalid(
                    field("network"),
                    "the template has no {{interface}}, so its slots would get no network",
                ));
            }
            Some(name.to_owned())
        }
    };

    Ok(PoolConfig {
        name: raw.name,
        image: raw.image,
        arch: raw.arch,
        vcpus: raw.vcpus,
        memory_mib: raw.memory_mib,
        slots: raw.slots,
        ready,
        labels: raw.labels,
        acceleration: raw.acceleration,
        template,
        max_job_secs,
        boot_timeout_secs,
        nvram_template: raw.nvram_template,
        template_vars: raw.template_vars,
        network,
    })
}

/// Pool names become parts of domain names and paths, so they stay short and plain.
fn check_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let plain = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let starts_well = name.bytes().next().is_some_and(|b| b.is_ascii_lowercase());
    if !plain || !starts_well || name.len() > 32 {
        return Err(ConfigError::invalid(
            field,
            format!("`{name}` must be 1 to 32 of a-z, 0-9 and -, starting with a letter"),
        ));
    }
    Ok(())
}

fn check_absolute(field: &str, path: &Path) -> Result<(), ConfigError> {
    if !path.is_absolute() {
        return Err(ConfigError::invalid(
            field,
            format!("`{}` must be an absolute path", path.display()),
        ));
    }
    Ok(())
}

fn check_range(field: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::invalid(field, format!("{value} is not within {min}..={max}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[pool]]
        name = "win11"
        image = "/images/win11.qcow2"
        arch = "aarch64"
        vcpus = 4
        memory_mib = 8192
        slots = 2
        template_vars = { kernel = "/k", initrd = "/i" }
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn invalid_field(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Invalid { field, .. }) | Err(ConfigError::Template { field, .. }) => {
                field
            }
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn minimal_pool_gets_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(config.libvirt_uri, DEFAULT_LIBVIRT_URI);
        let pool = &config.pools[0];
        assert_eq!(pool.ready, 2, "every slot is kept ready unless told otherwise");
        assert_eq!(pool.acceleration, Acceleration::Auto);
        assert_eq!(pool.max_job_secs, DEFAULT_MAX_JOB_SECS);
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_line() {
        let err = parse(&format!("{MINIMAL}\ncolour = \"blue\"\n")).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("colour"), "{message}");
        assert!(message.contains("line"), "{message}");
    }

    #[test]
    fn errors_name_the_bad_field() {
        let with = |from: &str, to: &str| MINIMAL.replace(from, to);
        assert_eq!(invalid_field(&with("vcpus = 4", "vcpus = 0")), "pools[0].vcpus");
        assert_eq!(
            invalid_field(&with("memory_mib = 8192", "memory_mib = 1")),
            "pools[0].memory_mib"
        );
        assert_eq!(invalid_field(&with("slots = 2", "slots = 2\nready = 3")), "pools[0].ready");
        assert_eq!(invalid_field(&with("\"win11\"", "\"Win 11\"")), "pools[0].name");
        assert_eq!(
            invalid_field(&with("\"/images/win11.qcow2\"", "\"rel.qcow2\"")),
            "pools[0].image"
        );
        assert_eq!(
            invalid_field(&with("slots = 2", "slots = 2\nlabels = [\"a,b\"]")),
            "pools[0].labels[0]"
        );
        assert_eq!(
            invalid_field(&with("slots = 2", "slots = 2\nmax_job_secs = 0")),
            "pools[0].max_job_secs"
        );
        assert_eq!(invalid_field(&format!("{MINIMAL}{MINIMAL}")), "pools[1].name");
        assert_eq!(invalid_field("state_dir = \"/x\""), "pool");
        assert_eq!(invalid_field(&format!("api_listen = \"localhost\"\n{MINIMAL}")), "api_listen");
        assert_eq!(invalid_field(&format!("tls_certificate = \"/c.pem\"\n{MINIMAL}")), "tls_key");
        let tls_only = format!("tls_certificate = \"/c.pem\"\ntls_key = \"/k.pem\"\n{MINIMAL}");
        assert_eq!(invalid_field(&tls_only), "api_listen");
    }

    #[test]
    fn pools_choose_a_network_or_none_and_hosts_list_ranges_guests_must_not_reach() {
        let with_network = |network: &str| {
            MINIMAL.replace("slots = 2", &format!("slots = 2\nnetwork = \"{network}\""))
        };
        assert_eq!(parse(MINIMAL).unwrap().pools[0].network, None);
        assert_eq!(parse(&with_network("none")).unwrap().pools[0].network, None);
        let config = parse(&with_network("warmpool")).unwrap();
        assert_eq!(config.pools[0].network.as_deref(), Some("warmpool"));
        assert_eq!(invalid_field(&with_network("Bad Name")), "pools[0].network");

        let ranges = format!("guest_blocked_ranges = [\"10.0.0.0/8\", \"192.0.2.9\"]\n{MINIMAL}");
        let ranges = parse(&ranges).unwrap().guest_blocked_ranges;
        assert_eq!(ranges, ["10.0.0.0/8".parse().unwrap(), "192.0.2.9/32".parse().unwrap()]);
        let bad = format!("guest_blocked_ranges = [\"10.0.0.0/8\", \"10.0.0.1/8\"]\n{MINIMAL}");
        assert_eq!(invalid_field(&bad), "guest_blocked_ranges[1]");
    }

    #[test]
    fn a_network_needs_a_template_with_an_interface() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("t.xml");
        std::fs::write(&template, "<domain>{{name}}{{disk}}{{job_port}}</domain>").unwrap();
        let text = MINIMAL.replace(
            "slots = 2",
            &format!("slots = 2\nnetwork = \"warmpool\"\ntemplate = \"{}\"", template.display()),
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("pools[0].network") && err.contains("{{interface}}"), "{err}");
    }

    #[test]
    fn bad_enum_values_are_parse_errors_naming_the_choices() {
        let err = parse(&MINIMAL.replace("\"aarch64\"", "\"riscv\"")).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("aarch64") && message.contains("x86_64"), "{message}");
    }

    #[test]
    fn template_placeholders_without_values_are_rejected() {
        let field = invalid_field(
            &MINIMAL.replace("template_vars = { kernel = \"/k\", initrd = \"/i\" }", ""),
        );
        assert_eq!(field, "pools[0].template");
    }

    #[test]
    fn builtin_default_is_one_pool_of_two_reference_guests() {
        let config = Config::builtin_default();
        assert_eq!(config.pools.len(), 1);
        let pool = &config.pools[0];
        assert_eq!((pool.slots, pool.ready), (2, 2));
        assert_eq!(pool.arch, Arch::host());
        pool.template.check(pool.template_vars.keys().map(String::as_str)).unwrap();
    }
}
