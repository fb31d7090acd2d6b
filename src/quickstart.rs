//! `tenantgate quickstart`: a private PostgreSQL, a registry, two demo tenants and a running
//! proxy, from nothing, in one command.
//!
//! First run: creates DIR (default `./.tenantgate`), a master key file, a PostgreSQL cluster on
//! a free loopback port, the registry database, and `DIR/tenantgate.toml` describing all of it;
//! then provisions `acme` and `globex`, each with a user and a small table. Later runs reuse DIR
//! and load `DIR/tenantgate.toml` as it is, so edits to it are honoured. Ctrl-C or SIGTERM, at
//! any point, stops the proxy and the private PostgreSQL, and tenantgate exits only once that
//! PostgreSQL has, so a new run on DIR can start at once (SIGTERM lets sessions finish within
//! `shutdown_grace_seconds`; Ctrl-C closes them at once). Not for production: the cluster runs
//! with fsync off.
//!
//! With `--tls`, clients must use TLS (`tls.mode = "require"` unless the config file sets a
//! mode) with a self-signed certificate for `localhost` and `127.0.0.1`, generated once into
//! `DIR/server.crt` and `DIR/server.key` (unless the config file names its own files); the
//! printed URIs carry `sslmode=require`. `--tls` and `--listen` stand over the file on RELOAD
//! and SIGHUP too (`config::Overrides`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::signals::{ProcessSignal, Signals};
use anyhow::{Context as _, bail};
use futures_util::FutureExt as _;
use postgres_protocol::escape::escape_identifier;
use tokio_postgres::NoTls;

use crate::config::{Config, Overrides, TlsOverride};
use crate::crypto::{Binding, MasterKey, Secret, generate_password};
use crate::localpg::{LocalPg, LocalPgOptions, free_port};
use crate::provision::{self, CreateTenant};
use crate::registry::{Registry, TenantSlug};
use crate::server::Proxy;
use crate::tls::TlsMode;

const CONFIG_FILE: &str = "tenantgate.toml";
const CREDENTIALS_FILE: &str = "demo-users.txt";
const REGISTRY_DATABASE: &str = "tenantgate_registry";
const DEMO_USER: &str = "app";
const ADMIN_USER: &str = "admin";
const ADMIN_PASSWORD_FILE: &str = "admin-password.txt";
/// The self-signed certificate and key of `--tls`.
const CERT_FILE: &str = "server.crt";
const KEY_FILE: &str = "server.key";

/// How long after a failed start-up step a Ctrl-C may still arrive and explain it.
const STOP_SIGNAL_GRACE: Duration = Duration::from_millis(200);

/// The demo tenants and their rows.
const DEMO_TENANTS: &[(&str, &str, &[&str])] = &[
    (
        "acme",
        "Acme Corp",
        &["anvil", "rocket skates", "giant magnet"],
    ),
    (
        "globex",
        "Globex Corporation",
        &["hammock", "doomsday device"],
    ),
];

/// Quickstart options from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    /// Overrides the config file's `proxy.listen` when given.
    pub listen: Option<SocketAddr>,
    /// Serve clients over TLS with a self-signed certificate.
    pub tls: bool,
}

/// The config file the quickstart writes into (and on later runs reads from) `dir`.
pub fn config_file(dir: &Path) -> PathBuf {
    dir.join(CONFIG_FILE)
}

/// Runs the quickstart until Ctrl-C or SIGTERM.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let mut signals = Signals::install()?;
    let dir = absolute(&options.dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.exists() {
        write_first_config(&dir, &config_path)?;
    }
    let mut config = Config::load(&config_path)?;
    // Kept in the running config, so RELOAD and SIGHUP apply them again over the file.
    let overrides = Overrides {
        listen: options.listen,
        // A second quickstart on the same address must fail loudly, not share the port.
        reuse_port: Some(false),
        tls: if options.tls {
            Some(tls_override(&dir, &config)?)
        } else {
            None
        },
    };
    overrides.apply(&mut config);

    let server = config
        .default_server()
        .context("the quickstart config has no [[server]]")?
        .clone();
    let pg_options = LocalPgOptions {
        port: Some(server.port),
        superuser: server.admin_user.clone(),
        password: server
            .admin_password
            .as_ref()
            .map(|p| p.expose().to_owned())
            .context("the quickstart config's server has no admin_password")?,
        ..LocalPgOptions::new(dir.join("pgdata"))
    };
    // Starting cannot be abandoned halfway (the blocking task owns the cluster until it
    // is up); a Ctrl-C meanwhile is acted on when it returns. A terminal's Ctrl-C also
    // reaches PostgreSQL itself, so the start then usually fails: that is the stop asked for.
    let started = tokio::task::spawn_blocking(move || LocalPg::start(pg_options))
        .await
        .context("starting PostgreSQL")?;
    let mut pg = match started {
        Ok(pg) => pg,
        Err(e) if stop_requested(&mut signals).await => {
            tracing::info!(error = %e, "stopped while PostgreSQL was starting");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let outcome = if signals.stop().now_or_never().is_some() {
        tracing::info!("stopped while PostgreSQL was starting");
        Ok(())
    } else {
        serve(&dir, config, &pg, &mut signals).await
    };
    // Returns once the server process is gone (and its postmaster.pid with it), so a
    // quickstart started right after this one exits finds the data directory free.
    let stopped = tokio::task::spawn_blocking(move || pg.stop()).await;
    outcome?;
    stopped.context("stopping PostgreSQL")??;
    Ok(())
}

/// After a start-up step failed: whether Ctrl-C or SIGTERM arrived, and so caused it. A
/// terminal's Ctrl-C reaches PostgreSQL too, and its reset connections may be seen before the
/// signal is, hence the short wait. (Signals are installed before anything starts: without a
/// handler, a Ctrl-C during start-up ended tenantgate at once and left its PostgreSQL shutting
/// down, and a quickstart run right after failed on `postmaster.pid`, defect 7.)
async fn stop_requested(signals: &mut Signals) -> bool {
    tokio::time::timeout(STOP_SIGNAL_GRACE, signals.stop())
        .await
        .is_ok()
}

/// Waits for Ctrl-C or SIGTERM and says which: true for Ctrl-C (SIGINT). SIGHUP meanwhile
/// reloads the config and TLS files, as `tenantgate serve` does; the quickstart hands no
/// clients over, so SIGUSR2 is only logged.
async fn serve_until_stop(signals: &mut Signals, proxy: &Proxy) -> bool {
    loop {
        match signals.next().await {
            ProcessSignal::Interrupt => return true,
            ProcessSignal::Terminate => return false,
            ProcessSignal::Hangup => match proxy.reload("signal:SIGHUP").await {
                Ok(summary) => tracing::info!("SIGHUP: {summary}"),
                Err(e) => tracing::error!("SIGHUP: {e}"),
            },
            ProcessSignal::HandOver => {
                tracing::warn!("SIGUSR2: the quickstart does not hand clients over; ignored");
            }
        }
    }
}

async fn serve(
    dir: &Path,
    config: Config,
    pg: &LocalPg,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let Ready {
        proxy,
        credentials,
        admin_password,
    } = tokio::select! {
        ready = set_up(dir, &config, pg) => match ready {
            Ok(ready) => ready,
            Err(e) if stop_requested(signals).await => {
                tracing::info!(error = %e, "stopped before the proxy was ready");
                return Ok(());
            }
            Err(e) => return Err(e),
        },
        _ = signals.stop() => {
            tracing::info!("stopped before the proxy was ready");
            return Ok(());
        }
    };
    let addr = proxy.local_addr();

    // Under `allow` plaintext would work too; show the TLS form whenever TLS is on.
    let query = if config.tls.mode == TlsMode::Disable {
        ""
    } else {
        "?sslmode=require"
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "admin console: postgresql://{ADMIN_USER}:{admin_password}@{}:{}/{}{query}",
        addr.ip(),
        addr.port(),
        config.admin.database
    )?;
    for (slug, password) in &credentials {
        writeln!(
            out,
            "postgresql://{DEMO_USER}:{password}@{}:{}/{slug}{query}",
            addr.ip(),
            addr.port()
        )?;
    }
    if let (TlsMode::Allow | TlsMode::Require, Some(cert)) =
        (config.tls.mode, &config.tls.cert_file)
    {
        writeln!(
            out,
            "TLS certificate: {} (to verify it: sslmode=verify-full&sslrootcert={})",
            cert.display(),
            cert.display()
        )?;
    }
    if let Some(metrics) = proxy.metrics_addr() {
        writeln!(
            out,
            "metrics: http://{metrics}/metrics (health: /healthz, readiness: /readyz)"
        )?;
    }
    writeln!(
        out,
        "tenantgate is ready on {addr} (config {}); press Ctrl-C to stop",
        dir.join(CONFIG_FILE).display()
    )?;
    out.flush()?;
    drop(out);

    // As `tenantgate serve`: SIGTERM drains within the grace, Ctrl-C closes sessions at once
    // (a terminal's Ctrl-C has reached the private PostgreSQL too, so there is nothing to
    // finish there). Either way PostgreSQL is stopped after the proxy, by the caller.
    let grace = if serve_until_stop(signals, &proxy).await {
        Duration::ZERO
    } else {
        Duration::from_secs(config.proxy.shutdown_grace_seconds)
    };
    tracing::info!(grace_seconds = grace.as_secs(), "stopping");
    proxy.shutdown(grace).await;
    Ok(())
}

/// A running proxy and the logins to print.
struct Ready {
    proxy: Proxy,
    /// (slug, password) of each demo tenant's user.
    credentials: Vec<(String, String)>,
    admin_password: String,
}

/// Registry, demo tenants, admin user, then the proxy: what the ready line announces.
async fn set_up(dir: &Path, config: &Config, pg: &LocalPg) -> anyhow::Result<Ready> {
    ensure_registry_database(pg).await?;
    let key = MasterKey::load(&config.secrets)?;
    let registry = Registry::connect(&config.registry).await?;
    registry.migrate().await?;
    let credentials = ensure_demo_tenants(dir, config, &registry, &key).await?;
    let admin_password = ensure_admin_user(dir, &registry).await?;
    let proxy = Proxy::start(config.clone()).await?;
    Ok(Ready {
        proxy,
        credentials,
        admin_password,
    })
}

/// `--tls`: TLS required (unless the config file chose a mode), with a self-signed certificate
/// generated once into DIR (unless the config file names certificate files).
fn tls_override(dir: &Path, config: &Config) -> anyhow::Result<TlsOverride> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let own_files = config.tls.cert_file.is_some() && config.tls.key_file.is_some();
    if !own_files && (!cert_path.exists() || !key_path.exists()) {
        let key = rcgen::KeyPair::generate().context("generating a TLS key")?;
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .context("TLS certificate parameters")?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tenantgate quickstart");
        let cert = params
            .self_signed(&key)
            .context("signing the TLS certificate")?;
        drop(std::fs::remove_file(&key_path));
        write_private(&key_path, &key.serialize_pem())?;
        std::fs::write(&cert_path, cert.pem())
            .with_context(|| format!("writing {}", cert_path.display()))?;
        tracing::info!(cert = %cert_path.display(), "self-signed TLS certificate generated");
    }
    Ok(TlsOverride {
        mode: TlsMode::Require,
        cert_file: cert_path,
        key_file: key_path,
    })
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(path))
    }
}

/// Writes a new master key and config for a fresh DIR.
fn write_first_config(dir: &Path, config_path: &Path) -> anyhow::Result<()> {
    let key_path = dir.join("master.key");
    write_private(&key_path, &MasterKey::generate_encoded())?;
    let port = free_port()?;
    let metrics_port = free_port()?;
    let password = generate_password(24);
    // Tenant migrations live beside the config, so the quickstart works from any directory.
    let migrations = dir.join("migrations");
    std::fs::create_dir_all(&migrations)
        .with_context(|| format!("creating {}", migrations.display()))?;
    std::fs::write(
        migrations.join("0001_example.sql"),
        include_str!("../migrations/tenant/0001_example.sql"),
    )
    .with_context(|| format!("writing into {}", migrations.display()))?;
    let migrations_dir = toml::Value::String(migrations.display().to_string());
    let text = format!(
        r#"# Written by `tenantgate quickstart` for its private PostgreSQL. Edit freely: the next
# quickstart run in this directory loads this file as it is. Every option is documented in
# config/tenantgate.toml in the tenantgate repository.

[proxy]
listen = "127.0.0.1:6432"
shutdown_grace_seconds = 2

[registry]
url = "host=127.0.0.1 port={port} user=postgres password={password} dbname={REGISTRY_DATABASE}"

[secrets]
master_key_file = "master.key"

[pool]
pool_size = 20

[metrics]
# Prometheus metrics and health checks: /metrics, /healthz, /readyz.
listen = "127.0.0.1:{metrics_port}"

[provision]
# Tenant migrations (NNNN_name.sql), applied to every new tenant and by `tenant migrate`.
migrations_dir = {migrations_dir}

[[server]]
name = "local"
host = "127.0.0.1"
port = {port}
admin_user = "postgres"
admin_password = "{password}"
"#,
        password = password.expose()
    );
    write_private(config_path, &text)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

async fn ensure_registry_database(pg: &LocalPg) -> anyhow::Result<()> {
    let client = connect(&pg.connection_string("postgres")).await?;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&REGISTRY_DATABASE],
        )
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!(
                "CREATE DATABASE {}",
                escape_identifier(REGISTRY_DATABASE)
            ))
            .await?;
    }
    Ok(())
}

async fn connect(conn_str: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::Config::from_str(conn_str)?
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "quickstart connection ended");
        }
    });
    Ok(client)
}

/// Provisions the demo tenants that are missing; returns (slug, password) for each.
async fn ensure_demo_tenants(
    dir: &Path,
    config: &Config,
    registry: &Registry,
    key: &MasterKey,
) -> anyhow::Result<Vec<(String, String)>> {
    let credentials_path = dir.join(CREDENTIALS_FILE);
    let mut known = read_credentials(&credentials_path);
    for (slug, name, rows) in DEMO_TENANTS {
        let parsed = TenantSlug::parse(slug).context("demo slug")?;
        if registry.tenant(&parsed).await?.is_some() && known.iter().any(|(s, _)| s == slug) {
            continue;
        }
        if registry.tenant(&parsed).await?.is_none() {
            let record = provision::create_tenant(
                config.provisioning(),
                registry,
                key,
                slug,
                &CreateTenant {
                    display_name: Some((*name).to_owned()),
                    ..CreateTenant::default()
                },
            )
            .await?;
            seed(config, key, &record, rows).await?;
        }
        let password = generate_password(20);
        provision::add_user(registry, slug, DEMO_USER, &password).await?;
        known.retain(|(s, _)| s != slug);
        known.push(((*slug).to_owned(), password.expose().to_owned()));
    }
    let text: String = known
        .iter()
        .fold(String::new(), |acc, (s, p)| acc + s + " " + p + "\n");
    std::fs::write(&credentials_path, text)?;
    known.sort();
    Ok(known)
}

/// The quickstart's admin user: created with a new password on the first run, its password
/// kept in DIR for the next runs.
async fn ensure_admin_user(dir: &Path, registry: &Registry) -> anyhow::Result<String> {
    let path = dir.join(ADMIN_PASSWORD_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let password = text.trim().to_owned();
        if !password.is_empty() && registry.admin_verifier(ADMIN_USER).await?.is_some() {
            return Ok(password);
        }
    }
    let password = generate_password(20);
    let verifier = postgres_protocol::password::scram_sha_256(password.expose().as_bytes());
    registry.set_admin_user(ADMIN_USER, &verifier, true).await?;
    drop(std::fs::remove_file(&path));
    write_private(&path, password.expose())?;
    Ok(password.expose().to_owned())
}

fn read_credentials(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(s, p)| (s.to_owned(), p.to_owned()))
        .collect()
}

/// Creates the demo table in a tenant's database, as the tenant's own role.
async fn seed(
    config: &Config,
    key: &MasterKey,
    record: &crate::registry::TenantRecord,
    rows: &[&str],
) -> anyhow::Result<()> {
    let Some(server) = config.server(&record.server) else {
        bail!("server {} is not in the config", record.server);
    };
    let password: Secret = key.decrypt(
        &record.backend_password_enc,
        &Binding::backend_password(record.slug.as_str()),
    )?;
    let mut pg = tokio_postgres::Config::new();
    pg.host(&server.host)
        .port(server.port)
        .user(&record.backend_role)
        .password(password.expose())
        .dbname(&record.database);
    let (client, connection) = pg.connect(NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TABLE products (id serial PRIMARY KEY, name text NOT NULL, \
             created_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    for row in rows {
        client
            .execute("INSERT INTO products (name) VALUES ($1)", &[row])
            .await?;
    }
    Ok(())
}
