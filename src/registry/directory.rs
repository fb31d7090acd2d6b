//! The tenant directory: moka caches in front of the registry for tenant records, user logins
//! (auth method and verifier) and custom domains, a short negative cache for unknown slugs, and
//! the background loop that LISTENs for registry changes and invalidates what changed (the
//! whole, small, domain cache on any change: a NOTIFY names the tenant, not the domain). The
//! same connection LISTENs for the messages instances send each other (`peers`: admin commands,
//! budget calls) and hands
//! them on, unread, to whoever subscribed ([`TenantDirectory::subscribe_peers`]).
//!
//! Background loops: `spawn_change_listener` (one task; reconnects with a back-off while the
//! registry is away, and after each reconnect drops the whole cache and has the sessions of every
//! tenant served since start check their tenant again, because NOTIFYs may have been missed).
//! The cache TTL is only the safety net.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use moka::future::Cache;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::peers::{ANSWERS_CHANNEL, BUDGET_CHANNEL, COMMANDS_CHANNEL, PeerMessage};
use super::{Registry, RegistryConfig, RegistryError, TenantRecord, TenantSlug, UserLogin};

/// The channel the registry triggers notify on; the payload is the slug.
pub const CHANGES_CHANNEL: &str = "tenantgate_changes";

type UserKey = (TenantSlug, String);

/// Cached view of the registry for the connection path.
#[derive(Clone)]
pub struct TenantDirectory {
    registry: Registry,
    /// How long an entry is used without asking the registry again.
    fresh: Duration,
    records: Cache<TenantSlug, (Arc<TenantRecord>, Instant)>,
    unknown: Cache<TenantSlug, ()>,
    verifiers: Cache<UserKey, (Option<Arc<UserLogin>>, Instant)>,
    /// (tenant, user) pairs the registry did not know, for `negative_cache_ttl_seconds`: kept
    /// apart so that made-up names never push real verifiers out of `verifiers`.
    unknown_users: Cache<UserKey, ()>,
    /// Custom domain → tenant (or none), from `tenant_domains`.
    domains: Cache<String, (Option<TenantSlug>, Instant)>,
    /// Slugs whose registry rows changed, for sessions that must react (suspension).
    changes: tokio::sync::broadcast::Sender<TenantSlug>,
    /// Every tenant whose record was served since start, cached or not any more: a running
    /// session's tenant is among them (its login looked it up), so after changes were missed
    /// each can be announced. One slug per tenant that had a login, never a made-up one.
    served: Arc<std::sync::Mutex<HashSet<TenantSlug>>>,
    /// Commands and answers other instances sent through the registry.
    peers: tokio::sync::broadcast::Sender<PeerMessage>,
}

impl TenantDirectory {
    pub fn new(registry: Registry, config: &RegistryConfig) -> TenantDirectory {
        let fresh = Duration::from_secs(config.cache_ttl_seconds.max(1));
        // Entries are kept past their freshness so they can serve while the registry is away.
        let kept = Duration::from_secs(config.stale_ttl_seconds).max(fresh);
        TenantDirectory {
            registry,
            fresh,
            records: Cache::builder()
                .max_capacity(config.cache_capacity)
                .time_to_live(kept)
                .build(),
            unknown: Cache::builder()
                .max_capacity(config.cache_capacity)
                .time_to_live(Duration::from_secs(
                    config.negative_cache_ttl_seconds.max(1),
                ))
                .build(),
            verifiers: Cache::builder()
                .max_capacity(config.cache_capacity)
                .time_to_live(kept)
                .support_invalidation_closures()
                .build(),
            unknown_users: Cache::builder()
                .max_capacity(config.cache_capacity)
                .time_to_live(Duration::from_secs(
                    config.negative_cache_ttl_seconds.max(1),
                ))
                .support_invalidation_closures()
                .build(),
            domains: Cache::builder()
                .max_capacity(config.cache_capacity)
                .time_to_live(kept)
                .build(),
            changes: tokio::sync::broadcast::channel(1024).0,
            served: Arc::default(),
            peers: tokio::sync::broadcast::channel(256).0,
        }
    }

    fn served(&self) -> std::sync::MutexGuard<'_, HashSet<TenantSlug>> {
        self.served.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Slugs as their registry rows change. A receiver that lags past 1024 changes gets
    /// `Lagged` and should re-check its tenant.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<TenantSlug> {
        self.changes.subscribe()
    }

    /// Admin commands and answers as instances NOTIFY them (this instance's own included).
    /// Those sent while the listener was disconnected are lost.
    pub fn subscribe_peers(&self) -> tokio::sync::broadcast::Receiver<PeerMessage> {
        self.peers.subscribe()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The tenant's record, from the cache or the registry; `None` if there is no such tenant.
    /// A cached record past its freshness is refreshed; if the registry cannot answer, the
    /// cached record keeps serving (cached tenants stay up while the registry is down).
    pub async fn tenant(
        &self,
        slug: &TenantSlug,
    ) -> Result<Option<Arc<TenantRecord>>, RegistryError> {
        if let Some((record, fetched)) = self.records.get(slug).await {
            if fetched.elapsed() < self.fresh {
                return Ok(Some(record));
            }
            return match self.registry.tenant(slug).await {
                // Two refreshes can cross (two registry connections): keep the newer row.
                Ok(Some(fresh)) if fresh.revision < record.revision => Ok(Some(record)),
                Ok(Some(fresh)) => {
                    let fresh = Arc::new(fresh);
                    self.records
                        .insert(slug.clone(), (Arc::clone(&fresh), Instant::now()))
                        .await;
                    Ok(Some(fresh))
                }
                Ok(None) => {
                    self.records.invalidate(slug).await;
                    self.unknown.insert(slug.clone(), ()).await;
                    self.served().remove(slug);
                    Ok(None)
                }
                Err(e) => {
                    tracing::warn!(tenant = %slug, error = %e, "registry unavailable; serving the cached tenant record");
                    Ok(Some(record))
                }
            };
        }
        if self.unknown.contains_key(slug) {
            return Ok(None);
        }
        let registry = &self.registry;
        let found = self
            .records
            .try_get_with_by_ref(slug, async {
                match registry.tenant(slug).await {
                    Ok(Some(record)) => Ok((Arc::new(record), Instant::now())),
                    Ok(None) => Err(RegistryError::NoSuchTenant),
                    Err(e) => Err(e),
                }
            })
            .await;
        match found {
            Ok((record, _)) => {
                self.served().insert(slug.clone());
                Ok(Some(record))
            }
            Err(e) if matches!(*e, RegistryError::NoSuchTenant) => {
                self.unknown.insert(slug.clone(), ()).await;
                self.served().remove(slug);
                Ok(None)
            }
            Err(e) => Err(RegistryError::Shared(e)),
        }
    }

    /// The auth method and SCRAM verifier of (tenant, user), from the cache or the registry;
    /// like `tenant`, a stale entry serves while the registry is away.
    pub async fn user_login(
        &self,
        slug: &TenantSlug,
        user: &str,
    ) -> Result<Option<Arc<UserLogin>>, RegistryError> {
        let key = (slug.clone(), user.to_owned());
        if let Some((verifier, fetched)) = self.verifiers.get(&key).await {
            if fetched.elapsed() < self.fresh {
                return Ok(verifier);
            }
            return match self.registry.user_login(slug, user).await {
                Ok(fresh) => {
                    let fresh = fresh.map(Arc::new);
                    self.verifiers
                        .insert(key, (fresh.clone(), Instant::now()))
                        .await;
                    Ok(fresh)
                }
                Err(e) => {
                    tracing::warn!(tenant = %slug, error = %e, "registry unavailable; serving the cached verifier");
                    Ok(verifier)
                }
            };
        }
        if self.unknown_users.contains_key(&key) {
            return Ok(None);
        }
        let registry = &self.registry;
        let (verifier, _) = self
            .verifiers
            .try_get_with(key.clone(), async {
                registry
                    .user_login(slug, user)
                    .await
                    .map(|v| (v.map(Arc::new), Instant::now()))
            })
            .await
            .map_err(RegistryError::Shared)?;
        if verifier.is_none() {
            // A miss goes to the short negative cache, not among the verifiers.
            self.verifiers.invalidate(&key).await;
            self.unknown_users.insert(key, ()).await;
        }
        Ok(verifier)
    }

    /// The tenant whose custom domain `server_name` is (already normalized), from the cache
    /// or the registry; a stale answer serves while the registry is away.
    pub async fn tenant_for_domain(
        &self,
        server_name: &str,
    ) -> Result<Option<TenantSlug>, RegistryError> {
        if let Some((slug, fetched)) = self.domains.get(server_name).await {
            if fetched.elapsed() < self.fresh {
                return Ok(slug);
            }
            return match self.registry.tenant_for_domain(server_name).await {
                Ok(fresh) => {
                    self.domains
                        .insert(server_name.to_owned(), (fresh.clone(), Instant::now()))
                        .await;
                    Ok(fresh)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registry unavailable; serving the cached domain");
                    Ok(slug)
                }
            };
        }
        let registry = &self.registry;
        self.domains
            .try_get_with(server_name.to_owned(), async {
                registry
                    .tenant_for_domain(server_name)
                    .await
                    .map(|slug| (slug, Instant::now()))
            })
            .await
            .map(|(slug, _)| slug)
            .map_err(RegistryError::Shared)
    }

    /// Forgets everything cached about one tenant.
    pub async fn invalidate(&self, slug: &TenantSlug) {
        let slug_for_sessions = slug.clone();
        self.records.invalidate(slug).await;
        self.unknown.invalidate(slug).await;
        // A NOTIFY names the tenant, not the domain, and a new domain may be cached as none.
        self.domains.invalidate_all();
        let slug = slug.clone();
        // Only fails when closures are not enabled, which `new` does.
        let same = slug.clone();
        drop(
            self.verifiers
                .invalidate_entries_if(move |(s, _), _| *s == same),
        );
        drop(
            self.unknown_users
                .invalidate_entries_if(move |(s, _), ()| *s == slug),
        );
        // Nobody listening is fine.
        drop(self.changes.send(slug_for_sessions));
    }

    /// Forgets everything.
    pub fn invalidate_all(&self) {
        self.records.invalidate_all();
        self.unknown.invalidate_all();
        self.verifiers.invalidate_all();
        self.unknown_users.invalidate_all();
        self.domains.invalidate_all();
    }

    /// Forgets everything after changes may have gone unannounced (the change listener was
    /// disconnected), and announces every tenant served since start as changed: a running
    /// session only re-reads its tenant when told, and a tenant suspended meanwhile must still
    /// close its clients. The cache is no guide to which tenants have sessions: an entry
    /// dropped by a change (or its TTL) is not read again until someone asks.
    fn forget_missed_changes(&self) {
        let served: Vec<TenantSlug> = self.served().iter().cloned().collect();
        self.invalidate_all();
        for slug in served {
            // Nobody listening is fine. Past the channel's capacity sessions lag, and a
            // session that lags re-checks its tenant anyway.
            drop(self.changes.send(slug));
        }
    }

    /// Number of cached tenant records (after pending maintenance).
    pub async fn cached_records(&self) -> u64 {
        self.records.run_pending_tasks().await;
        self.records.entry_count()
    }

    /// Puts a record in the cache directly (benchmarks and tests of the hot path).
    pub async fn prime(&self, record: TenantRecord) {
        self.served().insert(record.slug.clone());
        self.records
            .insert(record.slug.clone(), (Arc::new(record), Instant::now()))
            .await;
    }
}

/// Starts the LISTEN loop. It runs until `shutdown` is cancelled.
pub fn spawn_change_listener(
    url: String,
    directory: TenantDirectory,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = FIRST_RETRY;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                result = listen_once(&url, &directory, &mut backoff) => {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "registry change listener lost its connection; retrying");
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// The first wait before reconnecting the change listener; it doubles up to 5 s while the
/// registry stays away.
const FIRST_RETRY: Duration = Duration::from_millis(200);

/// One LISTEN session: returns when the connection ends. Once listening, `backoff` starts
/// over, so the first retry after a long healthy session is quick.
async fn listen_once(
    url: &str,
    directory: &TenantDirectory,
    backoff: &mut Duration,
) -> Result<(), tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::from_str(url)?;
    config.connect_timeout(Duration::from_secs(5));
    config.application_name("tenantgate-listener");
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx
                        .send((n.channel().to_owned(), n.payload().to_owned()))
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client
        .batch_execute(&format!(
            "LISTEN {CHANGES_CHANNEL}; LISTEN {COMMANDS_CHANNEL}; LISTEN {ANSWERS_CHANNEL}; \
             LISTEN {BUDGET_CHANNEL}"
        ))
        .await?;
    *backoff = FIRST_RETRY;
    // We may have missed changes while disconnected.
    directory.forget_missed_changes();
    tracing::debug!("listening for registry changes");
    while let Some((channel, payload)) = rx.recv().await {
        if let Some(message) = PeerMessage::on(&channel, &payload) {
            // Nobody subscribed is fine.
            drop(directory.peers.send(message));
        } else if let Some(slug) = TenantSlug::parse(&payload) {
            tracing::debug!(tenant = %slug, "registry changed; cache entry dropped");
            directory.invalidate(&slug).await;
        }
    }
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}
