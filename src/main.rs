//! The `tenantgate` command: serve, quickstart, and tenant/user management through the
//! registry. Exit codes: 0 success, 1 failure, 2 a broken config or command line.

use std::fmt::Write as _;
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tenantgate::config::{Config, ConfigError};
use tenantgate::crypto::{MasterKey, Secret};
use tenantgate::provision::{self, CreateTenant, RegisterTenant};
use tenantgate::quickstart;
use tenantgate::registry::{Registry, TenantState};
use tenantgate::server::Proxy;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "tenantgate",
    version,
    about = "PostgreSQL proxy for database-per-tenant SaaS"
)]
struct Cli {
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
    },
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage a tenant's users.
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Provision a tenant: a role and a database on a backend server, then mark it active.
    Create {
        slug: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Backend server (a [[server]] name; default: the first).
        #[arg(long)]
        server: Option<String>,
        /// Plan name.
        #[arg(long)]
        plan: Option<String>,
    },
    /// Register a tenant for a database that already exists. The role's password is read
    /// from a prompt, or from standard input when it is not a terminal.
    Register {
        slug: String,
        #[arg(long)]
        database: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        server: Option<String>,
    },
    /// List tenants.
    List,
    /// Refuse new connections to a tenant (57P03).
    Suspend { slug: String },
    /// Accept connections to a suspended tenant again.
    Resume { slug: String },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user to a tenant or change its password. The password is read from a prompt, or
    /// from standard input when it is not a terminal. Only a SCRAM verifier is stored.
    Add { slug: String, user: String },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            drop(e.print());
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::Error::from(e), 1),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => fail(&e, 2),
        Err(e) => fail(&e, 1),
    }
}

fn fail(e: &anyhow::Error, code: u8) -> ExitCode {
    let mut line = String::from("tenantgate: ");
    line.push_str(&format!("{e:#}").replace('\n', " "));
    drop(writeln!(std::io::stderr().lock(), "{line}"));
    ExitCode::from(code)
}

fn init_logging(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    drop(
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init(),
    );
}

fn config_path(cli: Option<&Path>) -> PathBuf {
    cli.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("TENANTGATE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("tenantgate.toml"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Quickstart { dir, listen } = cli.command {
        init_logging("info");
        return quickstart::run(quickstart::Options { dir, listen }).await;
    }
    let config = Config::load(&config_path(cli.config.as_deref()))?;
    init_logging(&config.proxy.log_level);
    match cli.command {
        Command::Serve => serve(config).await,
        Command::Tenant(cmd) => tenant(&config, cmd).await,
        Command::User(UserCommand::Add { slug, user }) => {
            let registry = open_registry(&config).await?;
            let password = read_password(&format!("Password for {user} of {slug}: "))?;
            provision::add_user(&registry, &slug, &user, &password).await?;
            say(&format!("user {user} of tenant {slug} saved"))
        }
        Command::Quickstart { .. } => Ok(()),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let grace = Duration::from_secs(config.proxy.shutdown_grace_seconds);
    let proxy = Proxy::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    proxy.shutdown(grace).await;
    Ok(())
}

async fn open_registry(config: &Config) -> anyhow::Result<Registry> {
    let registry = Registry::connect(&config.registry).await?;
    registry.migrate().await.context("registry")?;
    Ok(registry)
}

async fn tenant(config: &Config, cmd: TenantCommand) -> anyhow::Result<()> {
    let registry = open_registry(config).await?;
    match cmd {
        TenantCommand::Create {
            slug,
            name,
            server,
            plan,
        } => {
            let key = MasterKey::load(&config.secrets)?;
            let options = CreateTenant {
                display_name: name,
                server,
                plan,
            };
            let t = provision::create_tenant(config, &registry, &key, &slug, &options).await?;
            say(&format!(
                "tenant {} is {} (database {} on server {}); add a user with: tenantgate user add {} USER",
                t.slug, t.state, t.database, t.server, t.slug
            ))
        }
        TenantCommand::Register {
            slug,
            database,
            role,
            server,
        } => {
            let key = MasterKey::load(&config.secrets)?;
            let password = read_password(&format!("Password of role {role}: "))?;
            let existing = RegisterTenant {
                slug: &slug,
                server: server.as_deref(),
                database: &database,
                role: &role,
                password: &password,
            };
            let t = provision::register_tenant(config, &registry, &key, &existing).await?;
            say(&format!(
                "tenant {} registered for database {}",
                t.slug, t.database
            ))
        }
        TenantCommand::List => {
            let mut out = String::from("slug\tstate\tplan\tserver\tdatabase\tname\n");
            for t in registry.tenants().await? {
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    t.slug,
                    t.state,
                    t.plan,
                    t.server,
                    t.database,
                    t.display_name.unwrap_or_default()
                )?;
            }
            say(out.trim_end())
        }
        TenantCommand::Suspend { slug } => {
            provision::set_state(&registry, &slug, TenantState::Suspended).await?;
            say(&format!("tenant {slug} suspended"))
        }
        TenantCommand::Resume { slug } => {
            provision::set_state(&registry, &slug, TenantState::Active).await?;
            say(&format!("tenant {slug} active"))
        }
    }
}

fn say(text: &str) -> anyhow::Result<()> {
    writeln!(std::io::stdout().lock(), "{text}")?;
    Ok(())
}

/// From a no-echo prompt on a terminal, else the first line of standard input.
fn read_password(prompt: &str) -> anyhow::Result<Secret> {
    let password = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(prompt)?
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    anyhow::ensure!(!password.is_empty(), "the password must not be empty");
    Ok(Secret::new(password))
}
