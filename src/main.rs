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
use tenantgate::provision::{self, CreateTenant, DatabaseOnDrop, RegisterTenant};
use tenantgate::quickstart;
use tenantgate::registry::{AuthMethod, Registry, TenantSlug, TenantState};
use tenantgate::rekey;
use tenantgate::server::Proxy;

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
        /// Require TLS from clients, with a self-signed certificate generated into DIR, and
        /// print sslmode=require URIs.
        #[arg(long)]
        tls: bool,
    },
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage a tenant's users.
    #[command(subcommand)]
    User(UserCommand),
    /// Rotate the master key that encrypts stored secrets (needs secrets.master_key_file).
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Generate a new master key, write the key file as the new key then the old ones, and
    /// re-encrypt every stored secret under the new key. Prints the new key's id, never the
    /// key.
    Rotate,
    /// Once every stored secret is under the current key (and every instance has re-read the
    /// key file), drop the old keys from the key file.
    Retire,
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
    /// Apply pending tenant migrations ([provision] migrations_dir) to one tenant, or with
    /// --all to every active and suspended tenant. Exit code 1 if any tenant failed.
    Migrate {
        /// The tenant to migrate.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        slug: Option<String>,
        /// Migrate every active and suspended tenant.
        #[arg(long)]
        all: bool,
        /// Tenants migrated at once with --all (default: [provision] migrate_concurrency).
        #[arg(long, requires = "all", value_parser = clap::value_parser!(u16).range(1..=256))]
        concurrency: Option<u16>,
    },
    /// Mark a tenant deleted (its clients are disconnected), then drop its database and
    /// backend role.
    Drop {
        slug: String,
        /// Keep the database and the role; only mark the tenant deleted (the default for a
        /// tenant adopted by `tenant register`).
        #[arg(long, conflicts_with = "drop_database")]
        keep_database: bool,
        /// Drop the database and the role even of a registered tenant (one whose database
        /// tenantgate did not create).
        #[arg(long)]
        drop_database: bool,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user to a tenant or change its password. The password is read from a prompt, or
    /// from standard input when it is not a terminal. Only a SCRAM verifier is stored.
    Add {
        slug: String,
        user: String,
        /// How the user logs in: `scram` (password), `cert` (a client certificate whose CN is
        /// the user name, no password: none is asked for) or `cert+scram` (both). Default:
        /// unchanged for an existing user, `scram` for a new one.
        #[arg(long, value_parser = parse_auth_method)]
        auth: Option<AuthMethod>,
    },
    /// Remove a user from a tenant.
    Remove {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        user: String,
    },
}

fn parse_auth_method(text: &str) -> Result<AuthMethod, String> {
    AuthMethod::parse(text).ok_or_else(|| "expected scram, cert or cert+scram".to_owned())
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
    let line = format!("tenantgate: {}", error_line(e));
    drop(writeln!(std::io::stderr().lock(), "{line}"));
    ExitCode::from(code)
}

/// The error and its causes on one line, each cause once: many errors already show their
/// source in their own message, and a cause whose text is already on the line is skipped.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn init_logging(level: &str) {
    let filter = tenantgate::config::log_filter(level, true);
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
    if let Command::Quickstart { dir, listen, tls } = cli.command {
        init_logging("info");
        return quickstart::run(quickstart::Options { dir, listen, tls }).await;
    }
    let config = Config::load(&config_path(cli.config.as_deref()))?;
    init_logging(&config.proxy.log_level);
    match cli.command {
        Command::Serve => serve(config).await,
        Command::Tenant(cmd) => tenant(&config, cmd).await,
        Command::User(UserCommand::Add { slug, user, auth }) => {
            let registry = open_registry(&config).await?;
            let password = if auth == Some(AuthMethod::Cert) {
                // Nobody will type it: the certificate is the credential.
                tenantgate::crypto::generate_password(32)
            } else {
                read_password(&format!("Password for {user} of {slug}: "))?
            };
            provision::add_user(&registry, &slug, &user, &password).await?;
            if let Some(method) = auth {
                let tenant = TenantSlug::parse(&slug).context("invalid tenant slug")?;
                registry.set_user_auth(&tenant, &user, method).await?;
                return say(&format!(
                    "user {user} of tenant {slug} saved (auth {method})"
                ));
            }
            say(&format!("user {user} of tenant {slug} saved"))
        }
        Command::User(UserCommand::Remove { tenant, user }) => {
            let registry = open_registry(&config).await?;
            provision::remove_user(&registry, &tenant, &user).await?;
            say(&format!("user {user} removed from tenant {tenant}"))
        }
        Command::Key(cmd) => key(&config, cmd).await,
        Command::Quickstart { .. } => Ok(()),
    }
}

/// `key rotate` and `key retire`. A key from the environment cannot be rewritten: one line,
/// exit code 2, as for a broken config.
async fn key(config: &Config, cmd: KeyCommand) -> anyhow::Result<()> {
    let key = MasterKey::load(&config.secrets)?;
    if let tenantgate::crypto::KeySource::Env(var) = key.source() {
        let shown = config
            .source
            .as_ref()
            .map_or_else(String::new, |p| p.display().to_string());
        return Err(ConfigError::Invalid {
            path: shown,
            key: "secrets.master_key_file".to_owned(),
            message: rekey::RekeyError::EnvSource { var: var.clone() }.to_string(),
        }
        .into());
    }
    let registry = open_registry(config).await?;
    match cmd {
        KeyCommand::Rotate => {
            let done = rekey::rotate(&registry, &key).await?;
            drop(
                registry
                    .log_activity(
                        None,
                        "cli",
                        "key.rotate",
                        Some(&format!(
                            "key id {}, {} secrets re-encrypted",
                            done.key_id, done.reencrypted
                        )),
                    )
                    .await,
            );
            say(&format!(
                "master key rotated: new key id {}, {} secret(s) re-encrypted, {} key(s) in the key file; run `tenantgate key retire` once every instance has re-read it (RELOAD)",
                done.key_id, done.reencrypted, done.keys
            ))
        }
        KeyCommand::Retire => {
            let done = rekey::retire(&registry, &key).await?;
            drop(
                registry
                    .log_activity(
                        None,
                        "cli",
                        "key.retire",
                        Some(&format!(
                            "key id {}, {} old keys dropped",
                            done.key_id, done.dropped
                        )),
                    )
                    .await,
            );
            say(&format!(
                "old master keys retired: {} dropped, {} secret(s) under key id {}",
                done.dropped, done.secrets, done.key_id
            ))
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let grace = Duration::from_secs(config.proxy.shutdown_grace_seconds);
    let proxy = Proxy::start(config).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => break r?,
            _ = term.recv() => break,
            _ = hangup.recv() => reload_on_sighup(&proxy).await,
        }
    }
    tracing::info!("shutting down");
    proxy.shutdown(grace).await;
    Ok(())
}

/// SIGHUP does what the admin console's RELOAD does; the outcome goes to the log.
async fn reload_on_sighup(proxy: &Proxy) {
    match proxy.reload("signal:SIGHUP").await {
        Ok(summary) => tracing::info!("SIGHUP: {summary}"),
        Err(e) => tracing::error!("SIGHUP: {e}"),
    }
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
            let options = CreateTenant {
                display_name: name,
                server,
                plan,
                budgets: None,
            };
            create(config, &registry, &slug, &options).await
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
        TenantCommand::Migrate {
            slug: Some(slug), ..
        } => {
            let key = MasterKey::load(&config.secrets)?;
            let outcome = provision::migrate_tenant(config, &registry, &key, &slug, None).await?;
            say(&describe_outcome(&slug, &outcome)?)
        }
        TenantCommand::Migrate {
            slug: None,
            concurrency,
            ..
        } => {
            let key = MasterKey::load(&config.secrets)?;
            migrate_all(config, &registry, &key, concurrency.map(usize::from)).await
        }
        TenantCommand::Drop {
            slug,
            keep_database,
            drop_database,
        } => {
            let on_drop = match (keep_database, drop_database) {
                (true, _) => DatabaseOnDrop::Keep,
                (false, true) => DatabaseOnDrop::Drop,
                (false, false) => DatabaseOnDrop::ByOrigin,
            };
            let dropped = provision::drop_tenant(config, &registry, &slug, on_drop, None).await?;
            if dropped {
                say(&format!("tenant {slug} deleted with its database and role"))
            } else {
                say(&format!(
                    "tenant {slug} deleted; its database and role were kept"
                ))
            }
        }
    }
}

async fn create(
    config: &Config,
    registry: &Registry,
    slug: &str,
    options: &CreateTenant,
) -> anyhow::Result<()> {
    let key = MasterKey::load(&config.secrets)?;
    let t = provision::create_tenant(config, registry, &key, slug, options).await?;
    let version = registry
        .schema_version(&t.slug)
        .await?
        .map_or_else(|| "none".to_owned(), |v| v.to_string());
    say(&format!(
        "tenant {} is {} (database {} on server {}, schema version {version}); add a user with: tenantgate user add {} USER",
        t.slug, t.state, t.database, t.server, t.slug
    ))
}

/// `tenant migrate --all`: progress on stderr about every 5%, one line per tenant that failed
/// and a summary on stdout.
async fn migrate_all(
    config: &Config,
    registry: &Registry,
    key: &MasterKey,
    concurrency: Option<usize>,
) -> anyhow::Result<()> {
    let options = provision::MigrateAll {
        concurrency,
        budgets: None,
    };
    let progress = |p: provision::MigrateProgress| {
        let step = (p.total / 20).max(1);
        if p.done % step == 0 || p.done == p.total {
            drop(writeln!(
                std::io::stderr().lock(),
                "migrated {}/{} tenants, {} failed",
                p.done,
                p.total,
                p.failed
            ));
        }
    };
    let results = provision::migrate_all(config, registry, key, options, progress).await?;
    let mut out = String::new();
    let mut failed = 0;
    let mut applied = 0;
    for r in &results {
        match &r.result {
            Ok(outcome) => applied += outcome.applied.len(),
            Err(message) => {
                failed += 1;
                writeln!(out, "{}: FAILED: {message}", r.slug)?;
            }
        }
    }
    write!(
        out,
        "{} tenants: {} migrated ({applied} files applied), {failed} failed",
        results.len(),
        results.len() - failed
    )?;
    say(&out)?;
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} tenants failed to migrate",
        results.len()
    );
    Ok(())
}

fn describe_outcome(
    slug: &str,
    outcome: &provision::MigrateOutcome,
) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    for file in &outcome.applied {
        writeln!(text, "applied {} ({} ms)", file.file, file.duration_ms)?;
    }
    let version = outcome
        .schema_version
        .map_or_else(|| "none".to_owned(), |v| v.to_string());
    write!(
        text,
        "tenant {slug}: {} applied, {} already applied, schema version {version}",
        outcome.applied.len(),
        outcome.already_applied
    )?;
    Ok(text)
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

#[cfg(test)]
mod tests {
    use super::error_line;

    #[test]
    fn an_error_chain_prints_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(io).context("/etc/x: cannot read: No such file");
        assert_eq!(error_line(&e), "/etc/x: cannot read: No such file");
        let inner = anyhow::anyhow!("connection refused");
        let e = inner
            .context("registry unavailable")
            .context("cannot start");
        assert_eq!(
            error_line(&e),
            "cannot start: registry unavailable: connection refused"
        );
    }
}
