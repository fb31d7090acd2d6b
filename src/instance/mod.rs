//! This process as one of several tenantgate instances sharing a registry (issue 15): its
//! row in the registry's `instances` table, and cancel requests that reach it for a client
//! of another instance.
//!
//! Identity. At start an instance picks a random id and registers a row: the address other
//! instances reach it at (`[instance] advertise`, else its listen address unless that is a
//! wildcard), start time, and a **tag**, a byte from 1 to 255 that no live instance holds. The
//! tag goes into the top byte of every cancel key's secret it issues (`crate::session::cancel`),
//! so any instance can tell from a key which instance issued it. A heartbeat refreshes the row
//! and its counters (clients, backends) every `heartbeat_seconds`; a row whose heartbeat is
//! older than `heartbeat_ttl_seconds` (default 3 beats) is gone: SHOW INSTANCES leaves it out
//! and any instance deletes it, and its tag may be handed out again. A clean shutdown deletes
//! the row at once. If the registry cannot be reached, the instance serves on: it issues keys
//! with tag 0 (never forwarded) until it is registered, and retries with every beat. An
//! instance whose row vanished (it missed beats for a TTL) registers again, asking for its old
//! tag; if that was taken meanwhile, keys it issued before that can only be cancelled by
//! sending them to it directly.
//!
//! Forwarding. A CancelRequest whose key this instance does not hold and whose tag is another
//! live instance's is forwarded there (`forward`): a request of our own code, not a
//! CancelRequest, carrying the key and an HMAC-SHA-256 of it under a subkey of the master key.
//! The receiver checks the MAC, cancels locally, answers one byte, and never forwards again, so
//! forwards cannot loop and each cancel a client sends costs at most one connection to one
//! other instance. The tag → address table is in memory, refreshed by every heartbeat; a tag
//! it lacks triggers at most one refresh a second. Unknown keys, tags of no live instance and
//! bad MACs are dropped silently, as PostgreSQL drops a wrong key.
//!
//! Shared budget. Each server's `max_connections` is the budget of all instances together;
//! each holds a lease on a share of it, renewed by the heartbeat (`budget`, which says how
//! shares move and what happens when an instance dies or loses the registry).
//!
//! Moving parts: [`InstanceConfig`] (`[instance]`), [`Instances`] (the handle: start, forward,
//! accept, stop), `heartbeat` (the one background loop here: registration, beats, the peer
//! table, budget leases), `budget` (the shares of the servers' budgets), `forward` (the bytes
//! between instances). This module must not hold cancel keys (`session::cancel` does) or talk
//! to backends (it only sets the pool budgets' permits and asks the pool map to close idle
//! connections); it reaches the registry only from the heartbeat loop and, rarely, on a
//! peer-table miss.

mod budget;
mod forward;
mod heartbeat;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::crypto::MasterKey;
use crate::pool::PoolMap;
use crate::registry::{InstanceReport, PeerMessage, Registry};
use crate::session::CancelMap;
use crate::session::cancel::tag_of;

pub use budget::{decide_share, fair_targets};
pub use forward::{Forwarded, answer_forward, forward_mac};

/// A tag missing from the peer table makes the table be re-read at most this often.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// `[instance]`: this process among the tenantgate instances sharing the registry. Restart to
/// change any of it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// `host:port` where the other instances reach this one, for forwarded cancel requests.
    /// Default: `[proxy] listen` when it names an address (not `0.0.0.0` or `::`); with a
    /// wildcard listen and no `advertise`, cancels for this instance's clients are not
    /// forwarded to it (they still work when the load balancer sends them here).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Seconds between heartbeats (registry row refreshed, peer table re-read). Default 5.
    #[serde(default = "default_heartbeat_seconds")]
    pub heartbeat_seconds: u64,
    /// Seconds after its last heartbeat an instance counts as gone, and its lease on a share of
    /// the servers' budgets lapses. Default 3 heartbeats.
    #[serde(default)]
    pub heartbeat_ttl_seconds: Option<u64>,
}

fn default_heartbeat_seconds() -> u64 {
    5
}

impl Default for InstanceConfig {
    fn default() -> Self {
        InstanceConfig {
            advertise: None,
            heartbeat_seconds: default_heartbeat_seconds(),
            heartbeat_ttl_seconds: None,
        }
    }
}

impl InstanceConfig {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_seconds)
    }

    /// How old a heartbeat may be for its instance to count as live.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(
            self.heartbeat_ttl_seconds
                .unwrap_or(self.heartbeat_seconds.saturating_mul(3)),
        )
    }

    /// `(key, message)` for the first bad value.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, msg: &str| Err((format!("instance.{key}"), msg.to_owned()));
        if self.heartbeat_seconds == 0 {
            return bad("heartbeat_seconds", "must be at least 1");
        }
        if self.ttl() <= self.heartbeat() {
            return bad(
                "heartbeat_ttl_seconds",
                "must be more than heartbeat_seconds (3 times it is the default)",
            );
        }
        if let Some(advertise) = &self.advertise {
            let port_ok = advertise
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return bad("advertise", "must be host:port");
            }
        }
        Ok(())
    }
}

/// What an instance reports of its load at every heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Clients connected (tenant and admin console).
    pub clients: i64,
    /// Backend connections open.
    pub backends: i64,
}

/// Reads the instance's load; called once per heartbeat.
pub type LoadFn = Box<dyn Fn() -> Load + Send + Sync>;

/// What [`Instances::start`] needs.
pub struct InstanceSetup {
    pub config: InstanceConfig,
    /// The address the client listener is bound to.
    pub listen: SocketAddr,
    /// The pools, whose server budgets this instance's shares are applied to.
    pub pools: PoolMap,
    pub registry: Registry,
    pub key: MasterKey,
    /// Where the tag goes, and where forwarded cancels are looked up.
    pub cancels: CancelMap,
    pub load: LoadFn,
    /// Bound on each registry call and each forward.
    pub timeout: Duration,
    /// What the other instances NOTIFY (`TenantDirectory::subscribe_peers`): their calls to
    /// renew a budget lease now.
    pub peer_messages: tokio::sync::broadcast::Receiver<PeerMessage>,
}

/// This instance among its peers. Cheap to clone.
#[derive(Clone)]
pub struct Instances {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    address: Option<String>,
    pools: PoolMap,
    /// This instance's leases on the servers' budgets (`budget`).
    leases: budget::Leases,
    /// Held while a lease is renewed, so the heartbeat and the rebalancing never decide
    /// from the same permits at once.
    renewing: tokio::sync::Mutex<()>,
    config: InstanceConfig,
    registry: Registry,
    key: MasterKey,
    cancels: CancelMap,
    load: LoadFn,
    timeout: Duration,
    /// Tag → address of the other live instances, as of the last refresh.
    peers: Mutex<HashMap<u8, String>>,
    last_refresh: Mutex<Option<Instant>>,
    /// Our row is in the registry, as far as we know.
    registered: AtomicBool,
    /// The tag we last registered with, asked for again if the row is lost.
    last_tag: Mutex<Option<u8>>,
    stop: CancellationToken,
    /// The heartbeat and the rebalancing loops.
    beats: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Instances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instances")
            .field("id", &self.inner.id)
            .field("address", &self.inner.address)
            .finish_non_exhaustive()
    }
}

/// Where other instances reach this one: `advertise`, else a listen address that is not a
/// wildcard.
fn advertised(config: &InstanceConfig, listen: SocketAddr) -> Option<String> {
    config
        .advertise
        .clone()
        .or_else(|| (!listen.ip().is_unspecified()).then(|| listen.to_string()))
}

impl Instances {
    /// Registers this instance and takes its shares of the servers' budgets (one try, bounded
    /// by `setup.timeout`: a registry that does not answer delays the tag and the shares; no
    /// backend connection opens until a share is granted), then starts the heartbeat loop.
    pub async fn start(setup: InstanceSetup) -> Instances {
        let address = advertised(&setup.config, setup.listen);
        if address.is_none() {
            tracing::info!(
                listen = %setup.listen,
                "no [instance] advertise and a wildcard listen address: other instances \
                 cannot forward cancel requests to this one"
            );
        }
        let instances = Instances {
            inner: Arc::new(Inner {
                id: format!("{:016x}", rand::random::<u64>()),
                address,
                pools: setup.pools,
                leases: budget::Leases::default(),
                renewing: tokio::sync::Mutex::new(()),
                config: setup.config,
                registry: setup.registry,
                key: setup.key,
                cancels: setup.cancels,
                load: setup.load,
                timeout: setup.timeout,
                peers: Mutex::new(HashMap::new()),
                last_refresh: Mutex::new(None),
                registered: AtomicBool::new(false),
                last_tag: Mutex::new(None),
                stop: CancellationToken::new(),
                beats: Mutex::new(Vec::new()),
            }),
        };
        instances.drop_shares();
        instances.beat().await;
        let tasks = vec![
            tokio::spawn(heartbeat::run(instances.clone())),
            tokio::spawn(budget::rebalance(instances.clone(), setup.peer_messages)),
        ];
        *instances
            .inner
            .beats
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = tasks;
        instances
    }

    /// This instance's id (its row in `instances`).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The tag of the cancel keys issued now (0: not registered).
    pub fn tag(&self) -> u8 {
        self.inner.cancels.instance_tag()
    }

    /// Bound on one beat (a few registry statements).
    fn beat_bound(&self) -> Duration {
        self.inner.timeout.max(self.inner.config.heartbeat())
    }

    /// What this instance writes about itself.
    fn report(&self, load: Load) -> InstanceReport<'_> {
        InstanceReport {
            id: &self.inner.id,
            address: self.inner.address.as_deref(),
            clients: load.clients,
            backends: load.backends,
            budget: Some(self.share_total()),
        }
    }

    /// A CancelRequest this instance holds no key for: forwarded to the live instance whose
    /// tag the key carries, if that is not this one. Waits for its one-byte answer.
    pub async fn forward_cancel(&self, pid: i32, secret: i32) -> Forwarded {
        let tag = tag_of(secret);
        if tag == 0 || tag == self.tag() {
            return Forwarded::NoInstance;
        }
        let Some(address) = self.peer(tag).await else {
            tracing::debug!(
                tag,
                "cancel request for a tag no live instance holds dropped"
            );
            return Forwarded::NoInstance;
        };
        forward::send(&address, pid, secret, &self.inner.key, self.inner.timeout).await
    }

    /// A forwarded CancelRequest: `None` if its MAC is wrong (dropped), else what the local
    /// cancel did. Never forwarded again, whatever the key's tag.
    pub async fn accept_forward(
        &self,
        pid: i32,
        secret: i32,
        mac: &[u8],
    ) -> Option<crate::session::CancelOutcome> {
        if !forward::verify(&self.inner.key, pid, secret, mac) {
            tracing::debug!("forwarded cancel request with a wrong MAC dropped");
            return None;
        }
        Some(
            self.inner
                .cancels
                .cancel(pid, secret, self.inner.timeout)
                .await,
        )
    }

    /// The address of the live instance holding `tag`; a miss re-reads the table from the
    /// registry, at most once per [`MIN_REFRESH_INTERVAL`].
    async fn peer(&self, tag: u8) -> Option<String> {
        if let Some(address) = self.known_peer(tag) {
            return Some(address);
        }
        let due = {
            let mut last = self
                .inner
                .last_refresh
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let due = last.is_none_or(|t| t.elapsed() >= MIN_REFRESH_INTERVAL);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if !due {
            return None;
        }
        if let Err(e) = self.refresh_peers().await {
            tracing::warn!(error = %e, "reading the live instances from the registry failed");
        }
        self.known_peer(tag)
    }

    fn known_peer(&self, tag: u8) -> Option<String> {
        self.inner
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&tag)
            .cloned()
    }

    /// Stops the heartbeat, gives back its budget shares (closing idle connections first) and
    /// deletes this instance's row (clean shutdown). Call once the sessions are gone: until
    /// then their cancels may still come through other instances.
    pub async fn stop(&self) {
        self.inner.stop.cancel();
        let tasks = std::mem::take(
            &mut *self
                .inner
                .beats
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for task in tasks {
            drop(tokio::time::timeout(self.inner.timeout, task).await);
        }
        match tokio::time::timeout(self.inner.timeout * 2, self.release_shares()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "giving back this instance's budget shares failed; they lapse after heartbeat_ttl_seconds");
            }
            Err(_) => tracing::warn!(
                "giving back this instance's budget shares timed out; they lapse after heartbeat_ttl_seconds"
            ),
        }
        let removed = tokio::time::timeout(
            self.inner.timeout,
            self.inner.registry.remove_instance(self.id()),
        )
        .await;
        match removed {
            Ok(Ok(())) => tracing::debug!(id = self.id(), "instance row removed"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "removing this instance's registry row failed; it expires after heartbeat_ttl_seconds");
            }
            Err(_) => tracing::warn!(
                "removing this instance's registry row timed out; it expires after heartbeat_ttl_seconds"
            ),
        }
        self.inner.registered.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_address_defaults_to_a_specific_listen_address() {
        let config = InstanceConfig::default();
        assert_eq!(
            advertised(&config, "10.0.0.5:6432".parse().unwrap()).as_deref(),
            Some("10.0.0.5:6432")
        );
        assert_eq!(advertised(&config, "0.0.0.0:6432".parse().unwrap()), None);
        assert_eq!(advertised(&config, "[::]:6432".parse().unwrap()), None);
        let config = InstanceConfig {
            advertise: Some("tg-1.internal:6432".to_owned()),
            ..InstanceConfig::default()
        };
        assert_eq!(
            advertised(&config, "0.0.0.0:6432".parse().unwrap()).as_deref(),
            Some("tg-1.internal:6432")
        );
    }

    #[test]
    fn the_ttl_defaults_to_three_beats_and_must_exceed_one() {
        let mut config = InstanceConfig::default();
        assert_eq!(config.ttl(), Duration::from_secs(15));
        assert!(config.validate().is_ok());
        config.heartbeat_ttl_seconds = Some(5);
        assert!(config.validate().is_err());
        config.heartbeat_ttl_seconds = None;
        config.heartbeat_seconds = 0;
        assert!(config.validate().is_err());
        config.heartbeat_seconds = 1;
        config.advertise = Some("nohost".to_owned());
        assert!(config.validate().is_err());
        config.advertise = Some("[::1]:6432".to_owned());
        assert!(config.validate().is_ok());
    }
}
