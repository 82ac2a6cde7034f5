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
    },
    /// Show the pools and the state of every slot.
    Status {
        #[arg(long, env = "WARMPOOL_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create an API token through the control socket (root only); the secret is printed once.
    TokenCreate {
        #[arg(long, env = "WARMPOOL_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// A name for the token, such as the person or system that uses it.
        #[arg(long)]
        name: String,
        /// The tenant the token acts for; without it, an admin token.
        #[arg(long)]
        tenant: Option<String>,
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
        Command::Exec { socket, pool, command } => exec(&socket, pool, command).await,
        Command::Status { socket, json } => status(&socket, json).await,
        Command::TokenCreate { socket, name, tenant } => {
            match Client::call(&socket, &Request::CreateToken { name, tenant }).await? {
                Response::Token { id, secret } => {
                    eprintln!("warmpool: token {id} created; its secret is shown only now");
                    println!("{secret}");
                    Ok(ExitCode::SUCCESS)
                }
                Response::Error { message } => anyhow::bail!("{message}"),
                other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
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
        Command::Bench { config, jobs, cold_boots, slots, json: _ } => {
            let (text, origin) = match config.or_else(system_config) {
                Some(path) => (
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                    path,
                ),
                None => (Config::builtin_default_toml(), PathBuf::from("built-in default")),
            };
            let report =
                bench::run(BenchOptions { config_text: text, origin, jobs, cold_boots, slots })
                    .await?;
            println!("{}", serde_json::to_string(&report)?);
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
        println!("  {:<28} {:<12} ERROR", "SLOT", "STATE");
        for slot in &pool.slots {
            let error = slot.error.as_deref().unwrap_or("");
            println!("  {:<28} {:<12} {error}", slot.name, slot.state.as_str());
        }
    }
    Ok(ExitCode::SUCCESS)
}
