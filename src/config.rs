//! The configuration file: TOML types gathered from their subjects, defaults, validation,
//! environment overrides for secrets.
//!
//! Each section's type lives with the module it configures (`pool::PoolConfig`,
//! `provision::ProvisionConfig`, ...); this file only gathers them, loads the file and
//! validates across sections. The exception is a module that reads the whole config, which
//! therefore depends on this one: its section lives here, so no arrow points back. Those are
//! `[admin]` (`admin.rs`: SHOW CONFIG lists the whole config and RELOAD diffs it) and
//! `[proxy]` (`proxy.rs`: the server builds everything from the whole config).
//! A broken config is one line naming the key, and exit code 2 (see `main`).
//! It must not touch sockets.

mod admin;
mod proxy;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use admin::AdminConfig;
pub use proxy::{LogFormat, Networks, ProxyConfig};

use crate::crypto::SecretsConfig;
use crate::instance::InstanceConfig;
use crate::metrics::MetricsConfig;
use crate::pool::{BackendTls, PlanConfig, PoolConfig, ServerConfig};
use crate::provision::{self, ProvisionConfig};
use crate::registry::RegistryConfig;
use crate::stats::StatsConfig;
use crate::tls::{TlsConfig, TlsMode, TlsServer};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    pub registry: RegistryConfig,
    #[serde(default)]
    pub secrets: SecretsConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub provision: ProvisionConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    /// Backend PostgreSQL servers that hold tenant databases.
    #[serde(default, rename = "server")]
    pub servers: Vec<ServerConfig>,
    /// Named plans, `[plans.NAME]`.
    #[serde(default)]
    pub plans: std::collections::BTreeMap<String, PlanConfig>,
    /// The file this config was loaded from, for RELOAD; `None` when parsed from text.
    #[serde(skip)]
    pub source: Option<std::path::PathBuf>,
    /// What the command line set over the file; applied again on every RELOAD and SIGHUP.
    #[serde(skip)]
    pub overrides: Overrides,
    #[serde(default)]
    pub stats: StatsConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// This process among the instances sharing the registry.
    #[serde(default)]
    pub instance: InstanceConfig,
}

/// Settings the command line gives over the file (`quickstart --listen`, `--tls`, and the
/// quickstart's exclusive bind). They win
/// over the file when the process starts and again whenever the file is re-read, so a reload
/// never quietly undoes them (a `--tls` quickstart must not fall back to plaintext on SIGHUP).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub listen: Option<std::net::SocketAddr>,
    /// The quickstart binds its address alone (`[proxy] reuse_port = false`).
    pub reuse_port: Option<bool>,
    pub tls: Option<TlsOverride>,
}

/// `quickstart --tls`: the mode to use when the file leaves TLS disabled, and the certificate
/// files to use when the file names none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOverride {
    pub mode: TlsMode,
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
}

impl Overrides {
    /// Records these overrides in `config` and applies them to it.
    pub fn apply(&self, config: &mut Config) {
        if let Some(listen) = self.listen {
            config.proxy.listen = listen;
        }
        if let Some(reuse_port) = self.reuse_port {
            config.proxy.reuse_port = reuse_port;
        }
        if let Some(tls) = &self.tls {
            if config.tls.mode == TlsMode::Disable {
                config.tls.mode = tls.mode;
            }
            if config.tls.cert_file.is_none() || config.tls.key_file.is_none() {
                config.tls.cert_file = Some(tls.cert_file.clone());
                config.tls.key_file = Some(tls.key_file.clone());
            }
        }
        config.overrides = self.clone();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {message}")]
    Parse {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
}

/// The running config: read by each new client and admin command, replaced by RELOAD.
#[derive(Debug, Clone)]
pub struct LiveConfig(std::sync::Arc<std::sync::RwLock<std::sync::Arc<Config>>>);

impl LiveConfig {
    pub fn new(config: Config) -> LiveConfig {
        LiveConfig(std::sync::Arc::new(std::sync::RwLock::new(
            std::sync::Arc::new(config),
        )))
    }

    /// The config now.
    pub fn get(&self) -> std::sync::Arc<Config> {
        std::sync::Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Replaces the config.
    pub fn set(&self, config: Config) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(config);
    }
}

impl Config {
    /// Reads, parses, applies environment overrides and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut config = Config::parse(&text, &shown)?;
        config.source = Some(path.to_path_buf());
        config.apply_env();
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: shown.clone(),
                key,
                message,
            })?;
        // Unreadable certificate or key files are a config error too: one line, exit 2.
        TlsServer::from_config(&config.tls).map_err(|e| ConfigError::Invalid {
            path: shown.clone(),
            key: e.config_key().to_owned(),
            message: e.to_string(),
        })?;
        // So are backend CA files: a verify-* server without a usable CA never starts.
        for (i, server) in config.servers.iter().enumerate() {
            BackendTls::from_server(server).map_err(|e| ConfigError::Invalid {
                path: shown.clone(),
                key: format!("server[{i}].{}", e.config_key()),
                message: e.to_string(),
            })?;
        }
        Ok(config)
    }

    /// Parses TOML text; errors name the line and the key, on one line.
    pub fn parse(text: &str, shown: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| {
                text.get(..s.start)
                    .map_or(0, |t| t.bytes().filter(|b| *b == b'\n').count() + 1)
            });
            ConfigError::Parse {
                path: shown.to_owned(),
                line: line.max(1),
                message: e.message().replace('\n', " "),
            }
        })
    }

    /// Environment variables override secrets, so none need be in the file.
    fn apply_env(&mut self) {
        if let Ok(url) = std::env::var("TENANTGATE_REGISTRY_URL") {
            self.registry.url = url;
        }
        for server in &mut self.servers {
            if let Some(var) = &server.admin_password_env {
                if let Ok(pw) = std::env::var(var) {
                    server.admin_password = Some(pw.into());
                }
            }
        }
    }

    /// Relative file paths in the config are relative to the config file.
    fn resolve_paths(&mut self, base: &Path) {
        if let Some(file) = &self.secrets.master_key_file {
            if file.is_relative() {
                self.secrets.master_key_file = Some(base.join(file));
            }
        }
        self.tls.resolve_paths(base);
        for server in &mut self.servers {
            if let Some(file) = &server.ca_file {
                if file.is_relative() {
                    server.ca_file = Some(base.join(file));
                }
            }
        }
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, msg: &str| Err((key.to_owned(), msg.to_owned()));
        if self.registry.url.trim().is_empty() {
            return bad(
                "registry.url",
                "must be set (or TENANTGATE_REGISTRY_URL in the environment)",
            );
        }
        self.proxy.validate()?;
        self.pool.validate()?;
        self.provision.validate()?;
        self.admin.validate()?;
        self.tls.validate()?;
        self.instance.validate()?;
        if self.servers.is_empty() {
            return bad(
                "server",
                "at least one [[server]] section is required (the backend PostgreSQL that holds tenant databases)",
            );
        }
        for (i, s) in self.servers.iter().enumerate() {
            if s.name.is_empty() {
                return bad(&format!("server[{i}].name"), "must not be empty");
            }
            if self.servers.iter().filter(|o| o.name == s.name).count() > 1 {
                return bad(
                    &format!("server[{i}].name"),
                    &format!("duplicate server name {:?}", s.name),
                );
            }
            if s.port == 0 {
                return bad(&format!("server[{i}].port"), "must be between 1 and 65535");
            }
            if s.max_connections == 0 {
                return bad(
                    &format!("server[{i}].max_connections"),
                    "must be greater than 0",
                );
            }
            if s.tls.verifies_chain() && s.ca_file.is_none() {
                return bad(
                    &format!("server[{i}].ca_file"),
                    &format!(
                        "must be set when tls = \"{}\" (PEM certificates of the CAs that sign the server's certificate)",
                        s.tls
                    ),
                );
            }
        }
        Ok(())
    }

    /// The server a new tenant goes to when none is named: the first one.
    pub fn default_server(&self) -> Option<&ServerConfig> {
        self.servers.first()
    }

    pub fn server(&self, name: &str) -> Option<&ServerConfig> {
        self.servers.iter().find(|s| s.name == name)
    }

    /// What provisioning reads: its section, the servers, the admin database name.
    pub fn provisioning(&self) -> provision::Setup<'_> {
        provision::Setup {
            provision: &self.provision,
            servers: &self.servers,
            admin_database: &self.admin.database,
        }
    }
}

/// The log filter for `proxy.log_level` (or `RUST_LOG`, when `from_env`), with tokio-postgres
/// capped at info: its debug lines carry whole statements and bound parameters, and the
/// provisioning statements (CREATE ROLE ... PASSWORD) hold tenants' backend passwords.
pub fn log_filter(level: &str, from_env: bool) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    let filter = from_env
        .then(|| EnvFilter::try_from_default_env().ok())
        .flatten()
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    match "tokio_postgres=info".parse() {
        Ok(cap) => filter.add_directive(cap),
        Err(_) => filter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[registry]
url = "host=127.0.0.1 dbname=registry"

[[server]]
name = "main"
host = "127.0.0.1"
port = 5432
admin_user = "postgres"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "t").unwrap();
        c.validate().unwrap();
        assert_eq!(c.proxy.listen.port(), 6432);
        assert_eq!(c.pool.min_idle, 0);
        assert_eq!(c.provision.database_pattern, "tenant_{slug}");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = format!("{MINIMAL}\n[pool]\npool_sise = 3\n");
        let err = Config::parse(&text, "t").unwrap_err().to_string();
        assert!(err.contains("pool_sise"), "{err}");
        assert!(err.contains("line 12"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn bad_value_is_refused() {
        let text = format!("{MINIMAL}\n[pool]\npool_size = 0\n");
        let c = Config::parse(&text, "t").unwrap();
        let (key, _) = c.validate().unwrap_err();
        assert_eq!(key, "pool.pool_size");
    }

    /// Issue 14: `log_format` is text or json; anything else is one line naming the key.
    #[test]
    fn log_format_is_text_or_json_and_anything_else_names_the_key() {
        assert_eq!(
            Config::parse(MINIMAL, "t").unwrap().proxy.log_format,
            LogFormat::Text
        );
        let json = format!("[proxy]\nlog_format = \"json\"\n{MINIMAL}");
        let c = Config::parse(&json, "t").unwrap();
        assert_eq!(c.proxy.log_format, LogFormat::Json);
        // It writes back as it reads (SHOW CONFIG, the tests' config files).
        let again = Config::parse(&toml::to_string(&c).unwrap(), "t").unwrap();
        assert_eq!(again.proxy.log_format, LogFormat::Json);
        let xml = format!("[proxy]\nlog_format = \"xml\"\n{MINIMAL}");
        let err = Config::parse(&xml, "t").unwrap_err().to_string();
        assert!(err.contains("proxy.log_format"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    /// Issue 15: `proxy_protocol_from` takes CIDR ranges and single addresses; a bad entry is
    /// one line naming the key and its line.
    #[test]
    fn proxy_protocol_from_takes_ranges_and_names_the_key_when_wrong() {
        let c = Config::parse(MINIMAL, "t").unwrap();
        assert!(c.proxy.proxy_protocol_from.is_empty());
        let text = format!(
            "[proxy]\nproxy_protocol_from = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n{MINIMAL}"
        );
        let c = Config::parse(&text, "t").unwrap();
        c.validate().unwrap();
        let trusted = &c.proxy.proxy_protocol_from;
        for yes in ["10.1.2.3", "192.0.2.7", "2001:db8::1", "::ffff:10.9.9.9"] {
            assert!(trusted.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in ["11.0.0.1", "192.0.2.8", "2001:db9::1", "127.0.0.1"] {
            assert!(!trusted.contains(no.parse().unwrap()), "{no}");
        }
        // It writes back as it reads (SHOW CONFIG, the tests' config files).
        let again = Config::parse(&toml::to_string(&c).unwrap(), "t").unwrap();
        assert_eq!(&again.proxy.proxy_protocol_from, trusted);
        for (bad, says) in [
            ("10.0.0/8", "not an IP address or a CIDR range"),
            ("10.0.0.0/33", "not an IP address or a CIDR range"),
            ("balancer.internal", "not an IP address or a CIDR range"),
            ("10.1.2.3/8", "host bits set; the range is \"10.0.0.0/8\""),
        ] {
            let text = format!("[proxy]\nproxy_protocol_from = [\"{bad}\"]\n{MINIMAL}");
            let err = Config::parse(&text, "t").unwrap_err().to_string();
            assert!(err.contains("proxy.proxy_protocol_from"), "{err}");
            assert!(err.contains(says), "{err}");
            assert!(err.contains("line 2"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn backend_verify_modes_need_a_usable_ca_file() {
        let text = MINIMAL.replace("port = 5432", "port = 5432\ntls = \"verify-full\"");
        let c = Config::parse(&text, "t").unwrap();
        assert_eq!(c.validate().unwrap_err().0, "server[0].ca_file");
        let dir = std::env::temp_dir().join(format!("tg-config-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tenantgate.toml");
        for ca in ["missing.crt", "empty.crt"] {
            std::fs::write(dir.join("empty.crt"), "").unwrap();
            std::fs::write(&file, format!("{text}ca_file = \"{ca}\"\n")).unwrap();
            let err = Config::load(&file).unwrap_err().to_string();
            assert!(err.contains("server[0].ca_file"), "{err}");
            assert!(err.contains(ca), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue 14: the example systemd unit waits for READY=1, reloads with SIGHUP, drains
    /// with SIGTERM, and gives the drain more time than the example config's grace.
    #[test]
    fn example_systemd_unit_outlasts_the_shutdown_grace() {
        let unit = include_str!("../config/tenantgate.service");
        let value = |key: &str| {
            unit.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("{key} is not set"))
        };
        assert_eq!(value("Type"), "notify");
        assert_eq!(value("ExecReload"), "/bin/kill -HUP $MAINPID");
        assert_eq!(value("KillSignal"), "SIGTERM");
        assert!(value("ExecStart").ends_with("--config /etc/tenantgate/tenantgate.toml serve"));
        let stop: u64 = value("TimeoutStopSec").parse().unwrap();
        let config = Config::parse(include_str!("../config/tenantgate.toml"), "example").unwrap();
        assert!(stop > config.proxy.shutdown_grace_seconds + 5, "{stop}");
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../config/tenantgate.toml");
        let c = Config::parse(text, "config/tenantgate.toml").unwrap();
        c.validate().unwrap();
    }
}
