//! The `warmpool` command: parses the command line, sets up logging and the runtime, and maps
//! errors to exit codes. The work is in the library.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use warmpool::bench::{self, BenchOptions};
use warmpool::config::{Config, DEFAULT_CONTROL_SOCKET};
use warmpool::control::{Client, Request, Response};
use warmpool::daemon;

/// The configuration file read when `--config` is not given; without it the daemon uses its
/// built-in default, a local pool of reference guests.
const SYSTEM_CONFIG: &str = "/etc/warmpool/warmpool.toml";
/// The exit code of `exec` when the job did not run to its end: the command's own codes stay
/// unambiguous for everything else, as with `env` and container runners.
const EXIT_JOB_FAILED: u8 = 125;

#[derive(Parser)]
#[command(name = "warmpool", version, about = "Warm pools of clean, single-use CI guests")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: build the pools' clean snapshots and serve jobs.
    Serve {
        /// The host configuration (default: /etc/warmpool/warmpool.toml if it exists, else the
        /// built-in local pool of reference guests).
        #[arg(long, env = "WARMPOOL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run a command in a fresh slot, stream its output, and exit with its exit code.
    Exec {
        /// The daemon's control socket.
        #[arg(long, env = "WARMPOOL_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// The pool to run in (default: the first pool).
        #[arg(long)]
        pool: Option<String>,
        /// The command and its arguments, after `--`.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
        /// Send the job over the HTTP API instead of the control socket, with the API token
        /// (--token, WARMPOOL_TOKEN or the client configuration) and as its tenant.
        #[arg(long)]
        via_api: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show the pools and the state of every slot.
    Status {
        #[arg(long, env = "WARMPOOL_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Tenants: add, list, show, update, remove (over the API).
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// API tokens: create, list, revoke. Without an API token, `create` asks the daemon's
    /// control socket, which is how root gets the first admin token.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Pools of this host (over the API).
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Slots of every pool (over the API).
    Slot {
        #[command(subcommand)]
        command: SlotCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The host: show, drain (take no new jobs), resume (over the API).
    Host {
        #[command(subcommand)]
        command: HostCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Jobs: list and show (over the API).
    Job {
        #[command(subcommand)]
        command: JobCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Check a configuration file and exit non-zero if it is invalid.
    CheckConfig {
        #[arg(long, env = "WARMPOOL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Measure cold boot, snapshot build, revert and assignment times of the first pool.
    Bench {
        #[arg(long, env = "WARMPOOL_CONFIG")]
        config: Option<PathBuf>,
        /// How many jobs to run through the pool.
        #[arg(long, default_value_t = 20)]
        jobs: usize,
        /// How many cold boots to measure for comparison.
        #[arg(long, default_value_t = 3)]
        cold_boots: usize,
        /// Override the pool's number of slots (all kept ready).
        #[arg(long)]
        slots: Option<u32>,
        /// Print one JSON object (the default prints it too; this keeps stdout to it alone).
        #[arg(long)]
        json: bool,
        /// Measure GitHub jobs instead of local ones: signed webhooks from a fake GitHub server
        /// on loopback to JIT runners in the pool's guests.
        #[arg(long)]
        github: bool,
        /// Measure the daemon as a service instead: start to systemd's READY=1, cold and with
        /// kept snapshots, and the stop after SIGTERM with no job running.
        #[arg(long, conflicts_with = "github")]
        service: bool,
        /// Measure what the libvirt network NETWORK adds to a revert instead: the first pool
        /// runs twice side by side, without a network and on NETWORK (one slot each unless
        /// --slots), and jobs alternate between the two.
        #[arg(long, value_name = "NETWORK", conflicts_with_all = ["github", "service"])]
        network: Option<String>,
    },
}

/// How the commands that use the HTTP API find it.
#[derive(clap::Args)]
struct ApiArgs {
    /// The API address (else WARMPOOL_API, the client configuration, or http://127.0.0.1:9464).
    #[arg(long, global = true)]
    api: Option<String>,
    /// The API token (else WARMPOOL_TOKEN or the client configuration).
    #[arg(long, global = true)]
    token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Register a tenant.
    Add {
        name: String,
        /// github, azure or local.
        #[arg(long)]
        kind: String,
        /// Kind-specific settings as JSON, e.g. '{"owner":"acme","app_id":1,"installation_id":2}'.
        #[arg(long, default_value = "{}")]
        settings: String,
        #[arg(long)]
        weight: Option<u32>,
        #[arg(long)]
        max_jobs: Option<u32>,
    },
    List,
    Show {
        id: String,
    },
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        settings: Option<String>,
        #[arg(long)]
        weight: Option<u32>,
        #[arg(long)]
        max_jobs: Option<u32>,
    },
    Remove {
        id: String,
    },
    /// A tenant's secrets: `webhook_secret`, and `app_private_key` or `token` for GitHub.
    #[command(subcommand)]
    Secret(SecretCommand),
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Set a secret, read from a file or from standard input (a trailing newline is kept
    /// off), never from the command line, where other users could read it.
    Set {
        tenant: String,
        name: String,
        /// The file holding the value, e.g. a GitHub App's private key in PEM.
        #[arg(long)]
        from_file: Option<PathBuf>,
    },
    /// List the names of a tenant's secrets; their values are never shown.
    List {
        tenant: String,
    },
    Remove {
        tenant: String,
        name: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; its secret is printed once, on stdout.
    Create {
        #[arg(long)]
        name: String,
        /// The tenant the token acts for; without it, an admin token.
        #[arg(long)]
        tenant: Option<String>,
        /// The control socket, used when no API token is given.
        #[arg(long, env = "WARMPOOL_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum HostCommand {
    Show,
    /// Take no new jobs; queued and running jobs go on.
    Drain,
    /// Take jobs again.
    Resume,
}

#[derive(Subcommand)]
enum PoolCommand {
    List,
}

#[derive(Subcommand)]
enum SlotCommand {
    List,
}

#[derive(Subcommand)]
enum JobCommand {
    List {
        #[arg(long)]
        tenant: Option<String>,
        /// queued, assigned, started, finished or failed.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        /// The cursor printed after the previous page.
        #[arg(long)]
        after: Option<String>,
    },
    Show {
        id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. } | Command::Bench { .. });
    init_tracing(if serving { "info" } else { "warn" });
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("warmpool: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("warmpool: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    let filter =
        EnvFilter::try_from_env("WARMPOOL_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config } => {
            let (config, origin) = load_config(config.as_deref())?;
            tracing::info!(config = %origin, "Configuration loaded");
            daemon::serve(config, stop_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec { pool, command, via_api: true, api, .. } => {
            cli::exec(pool, command, api).await
        }
        Command::Exec { socket, pool, command, .. } => exec(&socket, pool, command).await,
        Command::Status { socket, json } => status(&socket, json).await,
        Command::Tenant { command, api } => cli::tenant(command, api).await,
        Command::Token { command, api } => cli::token(command, api).await,
        Command::Pool { command: PoolCommand::List, api } => cli::pools(api).await,
        Command::Slot { command: SlotCommand::List, api } => cli::slots(api).await,
        Command::Job { command, api } => cli::job(command, api).await,
        Command::Host { command, api } => cli::host(command, api).await,
        Command::CheckConfig { config } => {
            let (config, origin) = load_config(config.as_deref())?;
            println!("{origin}: valid, {} pool(s)", config.pools.len());
            for pool in &config.pools {
                println!(
                    "  {}: {} x {} vCPU / {} MiB {}, {} ready, template {}",
                    pool.name,
                    pool.slots,
                    pool.vcpus,
                    pool.memory_mib,
                    pool.arch.as_str(),
                    pool.ready,
                    pool.template.origin()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { config, jobs, cold_boots, slots, json: _, github, service, network } => {
            let (text, origin) = match config.or_else(system_config) {
                Some(path) => (
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                    path,
                ),
                None => (Config::builtin_default_toml(), PathBuf::from("built-in default")),
            };
            let options = BenchOptions { config_text: text, origin, jobs, cold_boots, slots };
            let report = if let Some(network) = network {
                serde_json::to_string(&bench::run_network(options, &network).await?)?
            } else if github {
                serde_json::to_string(&bench::run_github(options).await?)?
            } else if service {
                serde_json::to_string(&bench::run_service(options).await?)?
            } else {
                serde_json::to_string(&bench::run(options).await?)?
            };
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn system_config() -> Option<PathBuf> {
    Path::new(SYSTEM_CONFIG).exists().then(|| PathBuf::from(SYSTEM_CONFIG))
}

fn load_config(path: Option<&Path>) -> anyhow::Result<(Config, String)> {
    match path.map(Path::to_owned).or_else(system_config) {
        Some(path) => Ok((Config::load(&path)?, path.display().to_string())),
        None => Ok((Config::builtin_default(), "built-in default".to_owned())),
    }
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn exec(socket: &Path, pool: Option<String>, argv: Vec<String>) -> anyhow::Result<ExitCode> {
    let mut client = Client::request(socket, &Request::Exec { pool, argv }).await?;
    let mut stdout = std::io::stdout().lock();
    while let Some(response) = client.next().await? {
        match response {
            Response::Queued { job, pool } => {
                tracing::info!(job = %job, pool = %pool, "Job queued")
            }
            Response::Started { slot } => tracing::info!(slot = %slot, "Job started"),
            Response::Log { line } => {
                writeln!(stdout, "{line}")?;
            }
            Response::Finished { exit_code } => {
                stdout.flush()?;
                return Ok(ExitCode::from(exit_code.clamp(0, 255) as u8));
            }
            Response::Failed { reason } => {
                stdout.flush()?;
                eprintln!("warmpool: the job failed: {reason}");
                return Ok(ExitCode::from(EXIT_JOB_FAILED));
            }
            Response::Error { message } => anyhow::bail!("{message}"),
            other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
        }
    }
    eprintln!("warmpool: the daemon closed the connection before the job ended");
    Ok(ExitCode::from(EXIT_JOB_FAILED))
}

async fn status(socket: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let Response::Status { pools } = Client::call(socket, &Request::Status).await? else {
        anyhow::bail!("unexpected answer from the daemon");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&pools)?);
        return Ok(ExitCode::SUCCESS);
    }
    for pool in &pools {
        let labels = pool.labels.join(",");
        println!(
            "pool {}: {} slots, {} jobs queued, labels {labels}",
            pool.name,
            pool.slots.len(),
            pool.queued
        );
        if let Some(reason) = &pool.refused {
            println!("  not served: {reason}");
            continue;
        }
        println!("  {:<28} {:<12} ERROR", "SLOT", "STATE");
        for slot in &pool.slots {
            let error = slot.error.as_deref().unwrap_or("");
            println!("  {:<28} {:<12} {error}", slot.name, slot.state.as_str());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The commands over the HTTP API: each one request, a table or JSON, errors as one line.
mod cli {
    use std::process::ExitCode;

    use hyper::Method;
    use serde_json::{json, Value};
    use warmpool::client::{table, ApiClient};
    use warmpool::control::{Client, Request, Response};

    use anyhow::Context as _;

    use super::{ApiArgs, HostCommand, JobCommand, SecretCommand, TenantCommand, TokenCommand};

    fn client(api: &ApiArgs) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::resolve(api.api.clone(), api.token.clone())?)
    }

    fn text(value: &Value) -> String {
        match value {
            Value::Null => "-".into(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    /// Prints `value` as JSON, or the `columns` of each row as a table.
    fn show(api: &ApiArgs, value: &Value, columns: &[&str]) {
        if api.json {
            println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
            return;
        }
        let rows: Vec<&Value> = match value {
            Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        let rows: Vec<Vec<String>> =
            rows.iter().map(|row| columns.iter().map(|c| text(&row[*c])).collect()).collect();
        let header: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
        println!("{}", table(&header.iter().map(String::as_str).collect::<Vec<_>>(), &rows));
    }

    fn settings(text: &str) -> anyhow::Result<Value> {
        serde_json::from_str(text).map_err(|e| anyhow::anyhow!("--settings is not JSON: {e}"))
    }

    const TENANT_COLUMNS: &[&str] = &["id", "name", "kind", "weight", "max_concurrent_jobs"];
    const SECRET_COLUMNS: &[&str] = &["name", "created_at_ms", "updated_at_ms"];

    pub async fn tenant(command: TenantCommand, api: ApiArgs) -> anyhow::Result<ExitCode> {
        let client = client(&api)?;
        match command {
            TenantCommand::Add { name, kind, settings: s, weight, max_jobs } => {
                let mut body = json!({"name": name, "kind": kind, "settings": settings(&s)?});
                if let Some(weight) = weight {
                    body["weight"] = weight.into();
                }
                if let Some(max_jobs) = max_jobs {
                    body["max_concurrent_jobs"] = max_jobs.into();
                }
                let tenant = client.call(Method::POST, "/v1/tenants", Some(body)).await?;
                show(&api, &tenant, TENANT_COLUMNS);
            }
            TenantCommand::List => {
                show(&api, &client.call(Method::GET, "/v1/tenants", None).await?, TENANT_COLUMNS)
            }
            TenantCommand::Show { id } => {
                let tenant = client.call(Method::GET, &format!("/v1/tenants/{id}"), None).await?;
                if api.json {
                    show(&api, &tenant, &[]);
                } else {
                    show(&api, &tenant, TENANT_COLUMNS);
                    println!("settings: {}", tenant["settings"]);
                }
            }
            TenantCommand::Update { id, name, settings: s, weight, max_jobs } => {
                let mut body = json!({});
                if let Some(name) = name {
                    body["name"] = name.into();
                }
                if let Some(s) = s {
                    body["settings"] = settings(&s)?;
                }
                if let Some(weight) = weight {
                    body["weight"] = weight.into();
                }
                if let Some(max_jobs) = max_jobs {
                    body["max_concurrent_jobs"] = max_jobs.into();
                }
                let tenant =
                    client.call(Method::PATCH, &format!("/v1/tenants/{id}"), Some(body)).await?;
                show(&api, &tenant, TENANT_COLUMNS);
            }
            TenantCommand::Remove { id } => {
                client.call(Method::DELETE, &format!("/v1/tenants/{id}"), None).await?;
                eprintln!("warmpool: tenant {id} removed");
            }
            TenantCommand::Secret(command) => secret(command, &client, &api).await?,
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn secret(
        command: SecretCommand,
        client: &ApiClient,
        api: &ApiArgs,
    ) -> anyhow::Result<()> {
        match command {
            SecretCommand::Set { tenant, name, from_file } => {
                let value = match from_file {
                    Some(path) => std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                    None => std::io::read_to_string(std::io::stdin())?,
                };
                let value = value.strip_suffix('\n').unwrap_or(&value).to_owned();
                let path = format!("/v1/tenants/{tenant}/secrets/{name}");
                client.call(Method::PUT, &path, Some(json!({ "value": value }))).await?;
                eprintln!("warmpool: secret {name} of tenant {tenant} set");
            }
            SecretCommand::List { tenant } => {
                let path = format!("/v1/tenants/{tenant}/secrets");
                show(api, &client.call(Method::GET, &path, None).await?, SECRET_COLUMNS);
            }
            SecretCommand::Remove { tenant, name } => {
                let path = format!("/v1/tenants/{tenant}/secrets/{name}");
                client.call(Method::DELETE, &path, None).await?;
                eprintln!("warmpool: secret {name} of tenant {tenant} removed");
            }
        }
        Ok(())
    }

    pub async fn token(command: TokenCommand, api: ApiArgs) -> anyhow::Result<ExitCode> {
        let client = client(&api)?;
        match command {
            TokenCommand::Create { name, tenant, socket } if !client.has_token() => {
                match Client::call(&socket, &Request::CreateToken { name, tenant }).await? {
                    Response::Token { id, secret } => print_secret(&api, &id, &secret),
                    Response::Error { message } => anyhow::bail!("{message}"),
                    other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
                }
            }
            TokenCommand::Create { name, tenant, .. } => {
                let body = json!({"name": name, "tenant_id": tenant});
                let created = client.call(Method::POST, "/v1/tokens", Some(body)).await?;
                let id = text(&created["token"]["id"]);
                print_secret(&api, &id, created["secret"].as_str().unwrap_or_default());
            }
            TokenCommand::List => {
                let tokens = client.call(Method::GET, "/v1/tokens", None).await?;
                show(&api, &tokens, &["id", "name", "tenant_id", "created_at_ms", "revoked_at_ms"]);
            }
            TokenCommand::Revoke { id } => {
                client.call(Method::DELETE, &format!("/v1/tokens/{id}"), None).await?;
                eprintln!("warmpool: token {id} revoked");
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    fn print_secret(api: &ApiArgs, id: &str, secret: &str) {
        if api.json {
            println!("{}", json!({"id": id, "secret": secret}));
        } else {
            eprintln!("warmpool: token {id} created; its secret is shown only now");
            println!("{secret}");
        }
    }

    pub async fn pools(api: ApiArgs) -> anyhow::Result<ExitCode> {
        let pools = client(&api)?.call(Method::GET, "/v1/pools", None).await?;
        if api.json {
            show(&api, &pools, &[]);
            return Ok(ExitCode::SUCCESS);
        }
        let rows: Vec<Value> = pools
            .as_array()
            .into_iter()
            .flatten()
            .map(|pool| {
                let slots = pool["slots"].as_array().map_or(0, Vec::len);
                let ready = pool["slots"].as_array().into_iter().flatten().filter(|s| s["state"] == "ready").count();
                let refused = pool.get("refused").cloned().unwrap_or(Value::Null);
                json!({"name": pool["name"], "slots": slots, "ready": ready, "queued": pool["queued"], "image_generation": pool["image_generation"], "labels": pool["labels"], "not_served": refused})
            })
            .collect();
        show(
            &api,
            &Value::Array(rows),
            &["name", "slots", "ready", "queued", "image_generation", "labels", "not_served"],
        );
        Ok(ExitCode::SUCCESS)
    }

    pub async fn slots(api: ApiArgs) -> anyhow::Result<ExitCode> {
        let pools = client(&api)?.call(Method::GET, "/v1/pools", None).await?;
        let rows: Vec<Value> = pools
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|pool| {
                pool["slots"].as_array().into_iter().flatten().map(move |slot| {
                    json!({"pool": pool["name"], "name": slot["name"], "state": slot["state"], "job": slot["job"], "error": slot["error"]})
                })
            })
            .collect();
        show(&api, &Value::Array(rows), &["pool", "name", "state", "job", "error"]);
        Ok(ExitCode::SUCCESS)
    }

    /// `exec` over the API: submit, stream the output, exit with the job's code. Ctrl-C
    /// cancels the job, as hanging up the control socket does.
    pub async fn exec(
        pool: Option<String>,
        argv: Vec<String>,
        api: ApiArgs,
    ) -> anyhow::Result<ExitCode> {
        use std::io::Write as _;
        let client = client(&api)?;
        let body = json!({"pool": pool, "argv": argv});
        let submitted = client.call(Method::POST, "/v1/local/jobs", Some(body)).await?;
        let id = text(&submitted["id"]);
        let mut code = ExitCode::from(super::EXIT_JOB_FAILED);
        let output = format!("/v1/local/jobs/{id}/output");
        let stream = client.stream_lines(&output, |event| {
            match event["type"].as_str() {
                Some("log") => {
                    let _ = writeln!(std::io::stdout(), "{}", text(&event["line"]));
                }
                Some("finished") => {
                    let exit_code = event["exit_code"].as_i64().unwrap_or(1).clamp(0, 255);
                    code = ExitCode::from(exit_code as u8);
                    return false;
                }
                Some("failed") => {
                    eprintln!("warmpool: the job failed: {}", text(&event["reason"]));
                    return false;
                }
                _ => {}
            }
            true
        });
        tokio::select! {
            streamed = stream => streamed?,
            _ = tokio::signal::ctrl_c() => {
                client.call(Method::DELETE, &format!("/v1/local/jobs/{id}"), None).await?;
                eprintln!("warmpool: job {id} cancelled");
            }
        }
        Ok(code)
    }

    pub async fn host(command: HostCommand, api: ApiArgs) -> anyhow::Result<ExitCode> {
        let client = client(&api)?;
        let host = match command {
            HostCommand::Show => client.call(Method::GET, "/v1/host", None).await?,
            HostCommand::Drain => client.call(Method::POST, "/v1/host/drain", None).await?,
            HostCommand::Resume => client.call(Method::POST, "/v1/host/resume", None).await?,
        };
        show(&api, &host, &["draining", "jobs_running", "jobs_queued"]);
        Ok(ExitCode::SUCCESS)
    }

    const JOB_COLUMNS: &[&str] =
        &["id", "tenant_id", "pool", "slot_index", "state", "exit_code", "failure"];

    pub async fn job(command: JobCommand, api: ApiArgs) -> anyhow::Result<ExitCode> {
        let client = client(&api)?;
        match command {
            JobCommand::List { tenant, state, limit, after } => {
                let query: Vec<String> = [
                    ("tenant", tenant),
                    ("state", state),
                    ("limit", limit.map(|l| l.to_string())),
                    ("after", after),
                ]
                .into_iter()
                .filter_map(|(key, value)| value.map(|value| format!("{key}={value}")))
                .collect();
                let path = if query.is_empty() {
                    "/v1/jobs".to_owned()
                } else {
                    format!("/v1/jobs?{}", query.join("&"))
                };
                let page = client.call(Method::GET, &path, None).await?;
                if api.json {
                    show(&api, &page, &[]);
                } else {
                    show(&api, &page["jobs"], JOB_COLUMNS);
                    if let Some(next) = page["next"].as_str() {
                        println!("more: --after {next}");
                    }
                }
            }
            JobCommand::Show { id } => show(
                &api,
                &client.call(Method::GET, &format!("/v1/jobs/{id}"), None).await?,
                JOB_COLUMNS,
            ),
        }
        Ok(ExitCode::SUCCESS)
    }
}
