//! `[proxy]`: the client-facing side's section. It lives here rather than in `server`
//! because the server builds everything from the whole config and hands it to the console,
//! so `server` depends on `config`. Sessions get the values they need from the server.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use serde::{Deserialize, Serialize};

use crate::auth::throttle::ThrottleSettings;

/// `[proxy]`: the client-facing side.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address clients connect to. Default "127.0.0.1:6432". Restart to change.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bind `listen` with SO_REUSEPORT, so a new tenantgate (new binary or config) can start
    /// on the same address while this one runs and drains: the upgrade refuses no
    /// connection. Two instances of the same user may then share a port without an error.
    /// Default true; the quickstart turns it off. Restart to change.
    #[serde(default = "default_true")]
    pub reuse_port: bool,
    /// A Unix socket path for handing clients over to a newer process on an upgrade: the
    /// newest tenantgate binds it at start (replacing an older process's), and SIGUSR2 to the
    /// old process sends its idle transaction-pooling plaintext clients there, socket and
    /// state, so they never see a disconnect (README, "Restarts and upgrades"). Both
    /// processes must run as the same user. Unset (the default): no handover, and SIGUSR2
    /// does nothing but log. Restart to change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover_socket: Option<std::path::PathBuf>,
    /// Most client connections at once; past it a client gets 53300. Default 10000.
    #[serde(default = "default_max_clients")]
    pub max_client_connections: u32,
    /// A client must finish startup and authentication within this many milliseconds.
    /// Default 10000.
    #[serde(default = "default_login_timeout_ms")]
    pub login_timeout_ms: u64,
    /// Largest startup packet accepted, in bytes (PostgreSQL uses 10000). Default 10000.
    #[serde(default = "default_max_startup_packet_bytes")]
    pub max_startup_packet_bytes: usize,
    /// Largest single message a client may send after startup, in bytes. Default 1073741824
    /// (1 GiB, PostgreSQL's own limit). The relay never buffers a whole message.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// On a draining shutdown (SIGTERM), sessions get this many seconds to finish before
    /// they are closed with 57P01; SIGINT closes them at once. Default 10.
    #[serde(default = "default_shutdown_grace_seconds")]
    pub shutdown_grace_seconds: u64,
    /// When a tenant leaves `active` (suspended, deleted...), its connected clients get this
    /// many seconds before they are disconnected with 57P03; transaction-pooling clients start
    /// no new transaction meanwhile. Default 10.
    #[serde(default = "default_shutdown_grace_seconds")]
    pub suspend_grace_seconds: u64,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing filter such as
    /// `tenantgate=debug`). `RUST_LOG` overrides it. Default "info".
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// How log lines are written to stderr: `text` (one human-readable line per event) or
    /// `json` (one JSON object per line: timestamp, level, target, the event's fields with
    /// its message, and the fields of the spans it happened in, such as a client's tenant,
    /// user and address). Default "text". Restart to change.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Most clients between accept and the end of authentication at once; past it a new
    /// connection waits up to `login_slot_wait_ms` for a slot, then gets 53300 "too many
    /// logins in progress", so a storm of slow or stalled logins cannot starve the process.
    /// A client the failed-login throttle delays gives its slot back while it waits. Default
    /// 100. Restart to change.
    #[serde(default = "default_max_logins_in_progress")]
    pub max_logins_in_progress: u32,
    /// Most of those from one source address: past it, that address's next connection waits
    /// as above and then gets 53300, while other addresses log in, so one host's silent
    /// connections cannot hold every slot. Clients behind one NAT share it. Default 20.
    /// Restart to change.
    #[serde(default = "default_max_logins_in_progress_per_source")]
    pub max_logins_in_progress_per_source: u32,
    /// Milliseconds a new connection waits for a login slot before 53300: long enough for a
    /// burst of honest clients to queue, short of the login timeout. Default 5000. Restart to
    /// change.
    #[serde(default = "default_login_slot_wait_ms")]
    pub login_slot_wait_ms: u64,
    /// Failed logins from one source address against one tenant (or the admin console)
    /// before further attempts are delayed (100 ms, doubling, up to `auth_max_delay_ms`).
    /// Default 5. Restart to change.
    #[serde(default = "default_auth_failures_before_delay")]
    pub auth_failures_before_delay: u32,
    /// Failed logins from one source address against one tenant before further attempts are
    /// refused (SQLSTATE 53300) for `auth_lockout_seconds`, before any SCRAM work. Default 20.
    /// Restart to change.
    #[serde(default = "default_auth_failures_before_lockout")]
    pub auth_failures_before_lockout: u32,
    /// Seconds a lock-out lasts. Default 300. Restart to change.
    #[serde(default = "default_auth_lockout_seconds")]
    pub auth_lockout_seconds: u64,
    /// Longest delay of a throttled login attempt, in milliseconds; less than
    /// `login_timeout_ms`. Default 2000. Restart to change.
    #[serde(default = "default_auth_max_delay_ms")]
    pub auth_max_delay_ms: u64,
    /// The per-source-address counter (all tenants) and the per-tenant counter (all sources)
    /// use the two thresholds above times this factor: many honest clients share an address
    /// or a tenant. Default 5. Restart to change.
    #[serde(default = "default_auth_failure_limit_factor")]
    pub auth_failure_limit_factor: u32,
    /// Milliseconds between two flushes of this instance's failed logins, successes and
    /// lock-outs to the other instances sharing the registry (NOTIFY on `tenantgate_auth`),
    /// which add them to their own counters: a spray split over instances counts as one.
    /// Each instance still decides from memory alone. 0: count per instance only. Default
    /// 250. Restart to change.
    #[serde(default = "default_auth_failure_share_ms")]
    pub auth_failure_share_ms: u64,
    /// Load balancers that send a PROXY protocol header (v1 or v2) before the client's first
    /// byte: addresses or CIDR ranges. A connection from one of them must start with the
    /// header, and the client address it names is the client's for everything (throttle,
    /// login slots, audit lines, SHOW CLIENTS, cancel requests); a header from any other
    /// address is refused. Default empty: no PROXY protocol. Read by each new connection,
    /// so RELOAD applies it.
    #[serde(default)]
    pub proxy_protocol_from: Networks,
}

/// IP address ranges, written as CIDR ranges ("10.0.0.0/8") or single addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Networks(Vec<IpNet>);

impl Networks {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `addr` is in one of the ranges. An IPv4 client of a dual-stack listener
    /// (`::ffff:10.1.2.3`) counts as its IPv4 address.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.0.iter().any(|net| net.contains(&addr))
    }
}

impl TryFrom<Vec<String>> for Networks {
    type Error = String;

    /// The message names the key: serde reports it as the value's error, on the value's line.
    fn try_from(items: Vec<String>) -> Result<Networks, String> {
        let key = "proxy.proxy_protocol_from";
        items
            .iter()
            .map(|item| {
                let net = match item.parse::<IpAddr>() {
                    Ok(addr) => IpNet::from(addr),
                    Err(_) => item.parse::<IpNet>().map_err(|_| {
                        format!(
                            "{key}: {item:?} is not an IP address or a CIDR range such as \"10.0.0.0/8\""
                        )
                    })?,
                };
                // "10.1.2.3/8" is a typo or a misunderstanding; a silent widening is worse.
                if net.trunc() != net {
                    return Err(format!(
                        "{key}: {item:?} has host bits set; the range is \"{}\"",
                        net.trunc()
                    ));
                }
                Ok(net)
            })
            .collect::<Result<_, _>>()
            .map(Networks)
    }
}

impl From<Networks> for Vec<String> {
    fn from(networks: Networks) -> Vec<String> {
        networks.0.iter().map(ToString::to_string).collect()
    }
}

/// `[proxy] log_format`: how the log is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum LogFormat {
    /// One human-readable line per event (tracing-subscriber's default format).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl TryFrom<String> for LogFormat {
    type Error = String;

    /// The message names the key: serde reports it as the value's error, on the value's line.
    fn try_from(value: String) -> Result<LogFormat, String> {
        match value.as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "proxy.log_format must be \"text\" or \"json\", not {other:?}"
            )),
        }
    }
}

fn default_max_logins_in_progress() -> u32 {
    100
}
fn default_max_logins_in_progress_per_source() -> u32 {
    20
}
fn default_login_slot_wait_ms() -> u64 {
    5000
}
fn default_auth_failures_before_delay() -> u32 {
    5
}
fn default_auth_failures_before_lockout() -> u32 {
    20
}
fn default_auth_lockout_seconds() -> u64 {
    300
}
fn default_auth_max_delay_ms() -> u64 {
    2000
}
fn default_auth_failure_limit_factor() -> u32 {
    5
}
fn default_auth_failure_share_ms() -> u64 {
    250
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6432))
}
fn default_max_clients() -> u32 {
    10_000
}
fn default_login_timeout_ms() -> u64 {
    10_000
}
fn default_max_startup_packet_bytes() -> usize {
    10_000
}
fn default_max_message_bytes() -> usize {
    1 << 30
}
fn default_true() -> bool {
    true
}
fn default_shutdown_grace_seconds() -> u64 {
    10
}
fn default_log_level() -> String {
    "info".to_owned()
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: default_listen(),
            reuse_port: true,
            handover_socket: None,
            max_client_connections: default_max_clients(),
            login_timeout_ms: default_login_timeout_ms(),
            max_startup_packet_bytes: default_max_startup_packet_bytes(),
            max_message_bytes: default_max_message_bytes(),
            shutdown_grace_seconds: default_shutdown_grace_seconds(),
            suspend_grace_seconds: default_shutdown_grace_seconds(),
            log_level: default_log_level(),
            log_format: LogFormat::default(),
            max_logins_in_progress: default_max_logins_in_progress(),
            max_logins_in_progress_per_source: default_max_logins_in_progress_per_source(),
            login_slot_wait_ms: default_login_slot_wait_ms(),
            auth_failures_before_delay: default_auth_failures_before_delay(),
            auth_failures_before_lockout: default_auth_failures_before_lockout(),
            auth_lockout_seconds: default_auth_lockout_seconds(),
            auth_max_delay_ms: default_auth_max_delay_ms(),
            auth_failure_limit_factor: default_auth_failure_limit_factor(),
            auth_failure_share_ms: default_auth_failure_share_ms(),
            proxy_protocol_from: Networks::default(),
        }
    }
}

impl ProxyConfig {
    /// The failed-login throttle's thresholds.
    pub fn throttle_settings(&self) -> ThrottleSettings {
        ThrottleSettings {
            failures_before_delay: self.auth_failures_before_delay,
            failures_before_lockout: self.auth_failures_before_lockout,
            lockout: Duration::from_secs(self.auth_lockout_seconds),
            max_delay: Duration::from_millis(self.auth_max_delay_ms),
            wide_factor: self.auth_failure_limit_factor,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: &str| Err((k.to_owned(), m.to_owned()));
        if self.max_client_connections == 0 {
            return bad("proxy.max_client_connections", "must be greater than 0");
        }
        if self.login_timeout_ms == 0 {
            return bad("proxy.login_timeout_ms", "must be greater than 0");
        }
        if !(64..=1 << 20).contains(&self.max_startup_packet_bytes) {
            return bad(
                "proxy.max_startup_packet_bytes",
                "must be between 64 and 1048576",
            );
        }
        if self.max_message_bytes < 1024 {
            return bad("proxy.max_message_bytes", "must be at least 1024");
        }
        if self.max_logins_in_progress == 0 {
            return bad("proxy.max_logins_in_progress", "must be greater than 0");
        }
        if self.auth_failures_before_delay == 0 {
            return bad("proxy.auth_failures_before_delay", "must be greater than 0");
        }
        if self.auth_failures_before_lockout <= self.auth_failures_before_delay {
            return bad(
                "proxy.auth_failures_before_lockout",
                "must be greater than proxy.auth_failures_before_delay",
            );
        }
        if self.auth_lockout_seconds == 0 {
            return bad("proxy.auth_lockout_seconds", "must be greater than 0");
        }
        if self.auth_max_delay_ms >= self.login_timeout_ms {
            return bad(
                "proxy.auth_max_delay_ms",
                "must be less than proxy.login_timeout_ms",
            );
        }
        if self.auth_failure_limit_factor == 0 {
            return bad("proxy.auth_failure_limit_factor", "must be greater than 0");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return bad("proxy.log_level", "is not a valid log filter");
        }
        Ok(())
    }
}
