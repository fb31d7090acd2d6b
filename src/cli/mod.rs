//! The command line: the top-level clap types, and the dispatch from a parsed command to the
//! file that runs its family (`serve`, `tenant`, `user`, `key`; the quickstart is the library's
//! `quickstart`). Shared by the families: where the config file is, the log set-up, opening the
//! registry. This module must not hold a command's logic, and must not choose exit codes
//! (`main` does, from the error it gets back).

mod key;
mod serve;
mod systemd;
mod tenant;
mod terminal;
mod user;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tenantgate::config::{Config, LogFormat};
use tenantgate::quickstart;
use tenantgate::registry::Registry;

#[derive(Parser)]
#[command(
    name = "tenantgate",
    version,
    about = "PostgreSQL proxy for database-per-tenant SaaS"
)]
pub(crate) struct Cli {
    /// Config file (default: $TENANTGATE_CONFIG, else ./tenantgate.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve,
    /// Start a private PostgreSQL, a registry, two demo tenants and the proxy.
    Quickstart {
        /// Directory for the private PostgreSQL, keys and config.
        #[arg(long, default_value = ".tenantgate")]
        dir: PathBuf,
        /// Address to listen on (default: the config's, 127.0.0.1:6432 on a first run).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Require TLS from clients, with a self-signed certificate generated into DIR, and
        /// print sslmode=require URIs.
        #[arg(long)]
        tls: bool,
    },
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(tenant::TenantCommand),
    /// Manage a tenant's users.
    #[command(subcommand)]
    User(user::UserCommand),
    /// Rotate the master key that encrypts stored secrets (needs secrets.master_key_file).
    #[command(subcommand)]
    Key(key::KeyCommand),
}

/// Runs a parsed command line. The quickstart writes its own config, so it is the one command
/// that does not load one.
pub(crate) async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Quickstart { dir, listen, tls } = cli.command {
        // The log settings of the quickstart's own config when an earlier run wrote one (a
        // broken file is reported by the quickstart itself, in the default format).
        let proxy = Config::load(&quickstart::config_file(&dir))
            .map(|c| c.proxy)
            .unwrap_or_default();
        init_logging(&proxy.log_level, proxy.log_format);
        return quickstart::run(quickstart::Options { dir, listen, tls }).await;
    }
    let config = Config::load(&config_path(cli.config.as_deref()))?;
    init_logging(&config.proxy.log_level, config.proxy.log_format);
    match cli.command {
        Command::Serve => serve::run(config).await,
        Command::Tenant(cmd) => tenant::run(&config, cmd).await,
        Command::User(cmd) => user::run(&config, cmd).await,
        Command::Key(cmd) => key::run(&config, cmd).await,
        Command::Quickstart { .. } => Ok(()),
    }
}

fn config_path(cli: Option<&Path>) -> PathBuf {
    cli.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("TENANTGATE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("tenantgate.toml"))
}

/// The process's log on stderr, filtered by `[proxy] log_level` (or `RUST_LOG`), in the
/// `[proxy] log_format`. JSON lines carry the current span's fields (`span`) and every
/// enclosing span's (`spans`), so a line logged anywhere inside a client's task names its
/// connection id, address (`peer`), user and tenant, however deep the call that logged it.
/// Text is coloured only when stderr is a terminal.
fn init_logging(level: &str, format: LogFormat) {
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tenantgate::config::log_filter(level, true))
        // Colours only for a person at a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    // Only fails when a subscriber is already set, and then that one logs.
    drop(installed);
}

/// The registry, its own schema brought up to date first: the management commands may be the
/// first thing ever run against it.
async fn open_registry(config: &Config) -> anyhow::Result<Registry> {
    let registry = Registry::connect(&config.registry).await?;
    registry.migrate().await.context("registry")?;
    Ok(registry)
}
