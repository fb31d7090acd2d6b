//! What an operator's monitoring scrapes: `GET /metrics` (Prometheus text format), `GET
//! /healthz` (the process serves) and `GET /readyz` (it should get clients), over HTTP on
//! `[metrics] listen`.
//!
//! Moving parts: [`MetricsConfig`] (`[metrics]`), [`Sources`] (the handles it reads: usage
//! counters, pools, roster, throttle, registry), `exposition` (one scrape: a snapshot of
//! those, encoded with prometheus-client), `readiness` (what `/readyz` checks), `http`
//! (hyper 1, one task per scrape connection) and [`MetricsServer`] (started and stopped by
//! `server::Proxy`).
//!
//! It must not cost the proxy anything between scrapes: every series is read at scrape time
//! from counters the proxy keeps anyway (relaxed atomics), so nothing here runs on the
//! per-message or per-transaction path, and tenants cost no memory of their own here.
//! Per-tenant series are bounded (`tenant_series` named tenants plus `_other`), so 100,000
//! tenants never mean 100,000 series. It must not change anything it reads.

mod exposition;
mod http;
mod readiness;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::throttle::LoginThrottle;
use crate::clients::ClientRoster;
use crate::pool::PoolMap;
use crate::registry::Registry;
use crate::stats::Stats;

pub use exposition::{OTHER_TENANTS, render};
pub use readiness::Readiness;

/// `[metrics]`: the HTTP endpoint for Prometheus and health checks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to serve `/metrics`, `/healthz` and `/readyz` on, e.g. "127.0.0.1:9930".
    /// Unset (the default): no HTTP endpoint. Restart to change.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Tenants with series of their own: the most active ones by queries since start-up;
    /// every other tenant is summed under `tenant="_other"`.
    #[serde(default = "default_tenant_series")]
    pub tenant_series: usize,
}

fn default_tenant_series() -> usize {
    100
}

impl Default for MetricsConfig {
    fn default() -> MetricsConfig {
        MetricsConfig {
            listen: None,
            tenant_series: default_tenant_series(),
        }
    }
}

/// What the endpoint reads. All of it is shared with the running proxy.
#[derive(Clone)]
pub struct Sources {
    pub stats: Stats,
    pub pools: PoolMap,
    pub clients: ClientRoster,
    pub throttle: Arc<LoginThrottle>,
    pub registry: Registry,
    /// Cancelled when the proxy stops accepting clients (shutdown): `/readyz` says so.
    pub draining: CancellationToken,
    /// How long a registry outage is served from cache (`[registry] stale_ttl_seconds`):
    /// within it, the proxy is still ready.
    pub stale_window: Duration,
    /// `[registry] timeout_ms`: a readiness probe of the registry waits at most this.
    pub registry_timeout: Duration,
    pub tenant_series: usize,
}

/// The running HTTP endpoint; stops when dropped or [`MetricsServer::stop`]ped.
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: CancellationToken,
}

impl MetricsServer {
    /// Binds `listen` and serves until stopped.
    pub async fn start(listen: SocketAddr, sources: Sources) -> std::io::Result<MetricsServer> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let readiness = Arc::new(Readiness::new(&sources));
        tokio::spawn(http::serve(
            listener,
            Arc::new(sources),
            readiness,
            stop.clone(),
        ));
        tracing::info!(%local_addr, "metrics and health checks at http://{local_addr}/metrics");
        Ok(MetricsServer { local_addr, stop })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
