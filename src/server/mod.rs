//! The front door: listener, startup, and the per-client task that takes a connection from
//! its first byte to a relaying session.
//!
//! Moving parts: [`Proxy`] (start-up: registry migrations, shared [`State`], background tasks,
//! graceful shutdown), `listener` (accept loop, client limit), `proxy_header` (the PROXY
//! protocol header of a trusted load balancer), `client` (one client's path:
//! startup → auth → tenant → pool → session). Background loops started here: the accept loop,
//! the registry change listener, the usage flusher (`stats`, when configured), the metrics
//! endpoint (`metrics`, when configured), the instance heartbeat (`instance`), the failed-login sharing
//! (`auth::shared_throttle`). This module holds no business rules.
//! It builds everything from the whole config, so its `[proxy]` section is `config`'s
//! ([`ProxyConfig`](crate::config::ProxyConfig)), which keeps the arrow pointing one way.

mod client;
mod handover;
mod listener;
mod login;
mod login_slot;
mod proxy_header;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use client::CloseReason;
pub use login::LoginError;
pub use proxy_header::ProxyHeaderError;

use crate::admin::AdminContext;
use crate::auth::shared_throttle::{self, Outbox, Sharing};
use crate::auth::throttle::LoginThrottle;
use crate::clients::ClientRoster;
use crate::config::{Config, LiveConfig};
use crate::crypto::MasterKey;
use crate::handover::{Arrival, Handover, HandoverError};
use crate::instance::{InstanceSetup, Instances, Load};
use crate::metrics::{MetricsServer, Sources};
use crate::pool::PoolMap;
use crate::registry::{Registry, TenantDirectory, spawn_change_listener};
use crate::session::CancelMap;
use crate::stats::{Stats, spawn_flusher};
use crate::tls::{SharedTls, TlsServer};
use login_slot::LoginSlots;

/// Everything a client task needs, built once at start-up and shared.
pub struct State {
    pub config: LiveConfig,
    pub directory: TenantDirectory,
    pub pools: PoolMap,
    pub cancels: CancelMap,
    /// This instance among those sharing the registry: cancel forwarding.
    pub instances: Instances,
    pub clients: ClientRoster,
    pub admin: Arc<AdminContext>,
    /// Per-tenant usage counters (SHOW STATS, billing); outlive the tenants' pools.
    pub stats: Stats,
    /// Client TLS: acceptor, channel-binding data, SNI base domain; replaced by a reload,
    /// so each connection reads it once at accept.
    pub tls: SharedTls,
    /// Failed-login counters: delays and lock-outs before SCRAM.
    pub throttle: Arc<LoginThrottle>,
    /// Upgrades: clients coming from an older process, and leaving for a newer one.
    pub handover: Handover,
    client_slots: Arc<Semaphore>,
    /// One permit per client between accept and the end of its login.
    login_slots: Arc<LoginSlots>,
    /// Key for mock SCRAM secrets of unknown tenants/users; random per process.
    mock_key: [u8; 32],
    next_client_id: AtomicU64,
}

/// A running proxy.
pub struct Proxy {
    local_addr: SocketAddr,
    state: Arc<State>,
    stop_accepting: CancellationToken,
    stop_sessions: CancellationToken,
    tasks: TaskTracker,
    /// Stops the usage flusher, which then writes one last time.
    stop_flusher: CancellationToken,
    flusher: Option<tokio::task::JoinHandle<()>>,
    /// `/metrics`, `/healthz`, `/readyz`, when `[metrics] listen` is set.
    metrics: Option<MetricsServer>,
}

/// The client-facing TLS setup, after checking that every backend server's TLS settings load
/// (a bad CA file stops the start, not the first client).
fn load_tls(config: &Config) -> anyhow::Result<SharedTls> {
    let tls = TlsServer::from_config(&config.tls).context("setting up client TLS")?;
    for server in &config.servers {
        crate::pool::BackendTls::from_server(server)
            .with_context(|| format!("setting up TLS to backend server {}", server.name))?;
    }
    Ok(SharedTls::new(tls))
}

/// Connects to the registry, applies its migrations, binds stored secrets written by an
/// earlier version to their rows (reads refuse unbound ones), and reads the mock SCRAM key:
/// from the registry, so unknown users' mock salts are the same across restarts and instances
/// (a salt that changes tells a probe the user does not exist).
async fn open_registry(config: &Config, key: &MasterKey) -> anyhow::Result<(Registry, [u8; 32])> {
    let registry = Registry::connect(&config.registry)
        .await
        .context("connecting to the registry")?;
    let applied = registry
        .migrate()
        .await
        .context("applying registry migrations")?;
    if !applied.versions.is_empty() {
        tracing::info!(versions = ?applied.versions, "registry migrations applied");
    }
    crate::rekey::bind_unbound(&registry, key)
        .await
        .context("binding stored secrets to their registry rows")?;
    let mock_key = registry
        .mock_scram_key()
        .await
        .context("read the mock SCRAM key from the registry")?;
    Ok((registry, mock_key))
}

/// Registers this instance in the registry and starts its heartbeat. Its load is read from
/// the roster (clients) and the server budgets (backends open); its shares of the servers'
/// budgets are applied to the pool map's budgets.
async fn start_instance(
    config: &Config,
    listen: SocketAddr,
    registry: &Registry,
    key: &MasterKey,
    cancels: &CancelMap,
    (clients, pools, directory): (&ClientRoster, &PoolMap, &TenantDirectory),
) -> Instances {
    let shared = pools.clone();
    let (clients, pools) = (clients.clone(), pools.clone());
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let load = move || {
        let (admin, tenant) = clients.counts();
        let backends: u64 = pools
            .servers()
            .iter()
            .filter_map(|s| pools.budget(&s.name))
            .map(|b| u64::from(b.in_use()))
            .sum();
        Load {
            clients: count(admin.saturating_add(tenant)),
            backends: i64::try_from(backends).unwrap_or(i64::MAX),
        }
    };
    Instances::start(InstanceSetup {
        config: config.instance.clone(),
        listen,
        pools: shared,
        registry: registry.clone(),
        key: key.clone(),
        cancels: cancels.clone(),
        load: Box::new(load),
        timeout: Duration::from_millis(config.registry.timeout_ms),
        peer_messages: directory.subscribe_peers(),
    })
    .await
}

/// The failed-login throttle and, unless `auth_failure_share_ms` is 0, the task that shares
/// its counts with the other instances through the registry (`auth::shared_throttle`).
fn start_throttle(config: &Config, instance: &str, stop: &CancellationToken) -> Arc<LoginThrottle> {
    let throttle = LoginThrottle::new(config.proxy.throttle_settings());
    if config.proxy.auth_failure_share_ms == 0 {
        return Arc::new(throttle);
    }
    let outbox = Arc::new(Outbox::default());
    let throttle = Arc::new(throttle.sharing_through(Arc::clone(&outbox)));
    shared_throttle::spawn(
        Sharing {
            url: config.registry.url.clone(),
            instance: instance.to_owned(),
            throttle: Arc::clone(&throttle),
            outbox,
            every: Duration::from_millis(config.proxy.auth_failure_share_ms),
            timeout: Duration::from_millis(config.registry.timeout_ms),
        },
        stop.clone(),
    );
    throttle
}

/// The client listener, bound with `SO_REUSEPORT` when `reuse_port`: a second tenantgate (a new binary or
/// config) can start on the same address while this one runs, and the kernel spreads new
/// connections over both until one stops listening. That is how an upgrade avoids refusing
/// connections (README, "Restarts and upgrades"). Two unrelated processes of the same user
/// can therefore share a port without an error: give each instance its own `listen`.
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The handover socket, when configured: clients of older processes come in through it.
fn bind_handover(
    config: &Config,
    stop: &CancellationToken,
) -> anyhow::Result<(Handover, Option<UnboundedReceiver<Arrival>>)> {
    let path = config.proxy.handover_socket.as_deref();
    Handover::bind(path, stop).with_context(|| {
        let shown = path.map(|p| p.display().to_string()).unwrap_or_default();
        format!("binding proxy.handover_socket {shown}")
    })
}

/// Starts what serves clients: the registry change listener, the accept loop and the intake
/// of clients handed over by an older process. Returns the tracker of the client tasks.
fn spawn_serving(
    state: &Arc<State>,
    listener: TcpListener,
    arrivals: Option<UnboundedReceiver<Arrival>>,
    stop_accepting: &CancellationToken,
    stop_sessions: &CancellationToken,
) -> TaskTracker {
    let tasks = TaskTracker::new();
    // Subscribed before the listener runs, so no order is heard before it.
    crate::admin::spawn_runner(Arc::clone(&state.admin), stop_sessions.clone());
    spawn_change_listener(
        state.config.get().registry.url.clone(),
        state.directory.clone(),
        stop_sessions.clone(),
    );
    tokio::spawn(listener::run(
        listener,
        Arc::clone(state),
        stop_accepting.clone(),
        stop_sessions.clone(),
        tasks.clone(),
    ));
    if let Some(arrivals) = arrivals {
        tokio::spawn(handover::resume_arrivals(
            arrivals,
            Arc::clone(state),
            stop_sessions.clone(),
            tasks.clone(),
        ));
    }
    tasks
}

/// The HTTP endpoint for monitoring, if configured. It reads the proxy's own handles and
/// reports draining as soon as `stop_accepting` is cancelled.
async fn start_metrics(
    config: &Config,
    state: &Arc<State>,
    stop_accepting: &CancellationToken,
) -> anyhow::Result<Option<MetricsServer>> {
    let Some(listen) = config.metrics.listen else {
        return Ok(None);
    };
    let sources = Sources {
        stats: state.stats.clone(),
        pools: state.pools.clone(),
        clients: state.clients.clone(),
        throttle: Arc::clone(&state.throttle),
        registry: state.admin.registry.clone(),
        draining: stop_accepting.clone(),
        stale_window: Duration::from_secs(config.registry.stale_ttl_seconds),
        registry_timeout: Duration::from_millis(config.registry.timeout_ms),
        tenant_series: config.metrics.tenant_series,
    };
    let server = MetricsServer::start(listen, sources)
        .await
        .with_context(|| format!("serving metrics on {listen}"))?;
    Ok(Some(server))
}

impl Proxy {
    /// Connects to the registry (applying its migrations), binds the listener and starts
    /// serving.
    pub async fn start(config: Config) -> anyhow::Result<Proxy> {
        let key = MasterKey::load(&config.secrets)?;
        let tls = load_tls(&config)?;
        let (registry, mock_key) = open_registry(&config, &key).await?;
        let listener = bind(config.proxy.listen, config.proxy.reuse_port)
            .with_context(|| format!("listening on {}", config.proxy.listen))?;
        let local_addr = listener.local_addr()?;
        let stop_accepting = CancellationToken::new();
        let stop_sessions = CancellationToken::new();
        let (handover, arrivals) = bind_handover(&config, &stop_sessions)?;
        let usage = Stats::new();

        crate::admin::bootstrap(&config.admin, &registry)
            .await
            .context("creating the bootstrap admin user")?;
        let stop_flusher = CancellationToken::new();
        let flusher = spawn_flusher(
            usage.clone(),
            registry.clone(),
            Duration::from_secs(config.stats.flush_interval_seconds),
            stop_flusher.clone(),
        );
        let directory = TenantDirectory::new(registry.clone(), &config.registry);
        let pools = PoolMap::new(
            &config.pool,
            &config.servers,
            &config.plans,
            key.clone(),
            usage.clone(),
        );
        let live = LiveConfig::new(config.clone());
        let clients = ClientRoster::default();
        let cancels = CancelMap::default();
        let instances = start_instance(
            &config,
            local_addr,
            &registry,
            &key,
            &cancels,
            (&clients, &pools, &directory),
        )
        .await;
        let admin = Arc::new(AdminContext {
            config: live.clone(),
            registry,
            directory: directory.clone(),
            pools: pools.clone(),
            clients: clients.clone(),
            key,
            stats: usage.clone(),
            tls: tls.clone(),
            instance_id: instances.id().to_owned(),
        });
        let throttle = start_throttle(&config, instances.id(), &stop_sessions);
        let state = Arc::new(State {
            client_slots: Arc::new(Semaphore::new(
                usize::try_from(config.proxy.max_client_connections).unwrap_or(usize::MAX),
            )),
            login_slots: Arc::new(LoginSlots::new(
                config.proxy.max_logins_in_progress,
                config.proxy.max_logins_in_progress_per_source,
            )),
            config: live,
            directory,
            pools,
            cancels,
            instances,
            clients,
            admin,
            stats: usage,
            tls,
            throttle,
            handover,
            mock_key,
            next_client_id: AtomicU64::new(1),
        });

        let tasks = spawn_serving(&state, listener, arrivals, &stop_accepting, &stop_sessions);
        tracing::info!(%local_addr, "tenantgate is accepting connections");
        let metrics = start_metrics(&config, &state, &stop_accepting).await?;
        Ok(Proxy {
            local_addr,
            state,
            stop_accepting,
            stop_sessions,
            tasks,
            stop_flusher,
            flusher,
            metrics,
        })
    }

    /// Where `/metrics` is served, when `[metrics] listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// What admin RELOAD does, for SIGHUP: re-reads the config file and the TLS files;
    /// returns a one-line summary, or why nothing changed.
    pub async fn reload(&self, actor: &str) -> Result<String, crate::admin::AdminError> {
        crate::admin::reload(&self.state.admin, actor).await
    }

    /// SIGUSR2: hands this process's clients to the newer tenantgate on
    /// `[proxy] handover_socket`. Once one answers, this process stops accepting and each
    /// plaintext transaction-pooling client leaves for it at its next point between
    /// transactions; the caller then shuts down with the grace, in which the other clients
    /// finish here. Fails, changing nothing, when no newer process answers.
    pub async fn hand_over(&self) -> Result<(), HandoverError> {
        self.state
            .handover
            .begin(self.state.cancels.clone())
            .await?;
        self.stop_accepting.cancel();
        Ok(())
    }

    /// Stops accepting, gives sessions `grace` to finish, then closes the rest.
    pub async fn shutdown(self, grace: Duration) {
        self.stop_accepting.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::info!(
                remaining = self.tasks.len(),
                "closing sessions still open after the grace period"
            );
        }
        self.stop_sessions.cancel();
        drop(tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await);
        self.state.handover.unbind();
        // Sessions have counted their last: flush once more.
        self.stop_flusher.cancel();
        if let Some(flusher) = self.flusher {
            let bound = Duration::from_millis(
                self.state
                    .config
                    .get()
                    .registry
                    .timeout_ms
                    .saturating_mul(2),
            );
            drop(tokio::time::timeout(bound, flusher).await);
        }
        // Last: cancels for the sessions above could still come through other instances.
        self.state.instances.stop().await;
    }
}
