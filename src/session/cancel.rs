//! The cancel map: which backend serves the client holding a tenantgate-issued cancel key right
//! now, and forwarding a CancelRequest to it.
//!
//! A key is (backend pid, tenantgate secret): the pid is the backend's real one so that
//! `pg_backend_pid()` and NOTIFY pids agree with what the client was told; the secret is ours,
//! so nobody can cancel a backend's queries with a key the backend issued. An entry lives
//! exactly as long as the client holds that backend ([`CancelGuard`]), so a cancel can never hit
//! a backend that has since moved to another client. The lock is taken at session start and
//! end and per cancel, never on the relay path. A cancel for a backend connection that speaks
//! TLS goes over TLS (SSLRequest first, as libpq does), so the key is never sent in the clear.
//!
//! The secret's top byte is this instance's tag ([`CancelMap::set_instance_tag`], assigned
//! among the instances sharing the registry by `crate::instance`), the other 24 bits random:
//! any instance can tell from a key which instance issued it and forward the cancel there
//! (`crate::instance`). Tag 0 means an instance without one (the registry was unreachable when
//! it issued the key): such keys are only ever cancelled where they were issued. The lookup
//! here is by the whole key, whatever the tag now, so a key issued before the tag changed still
//! works on this instance. This module must not forward to other instances itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::pool::{BackendStream, BackendTls};

/// What became of a CancelRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The backend's server took it.
    Delivered,
    /// No client holds this key.
    UnknownKey,
    /// The key's client holds no backend now (between transactions): nothing to cancel.
    Idle,
    /// The backend's server could not be reached in time.
    Failed,
}

/// The backend a cancel key points at.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    /// Present when the backend connection speaks TLS: the cancel does too.
    pub tls: Option<Arc<BackendTls>>,
    pub backend_pid: i32,
    pub backend_secret: i32,
}

/// One client's key: the backend serving it now, and a lock held while a cancel for it is
/// on its way, so the backend is not given to another client until the cancel has landed.
#[derive(Debug, Default)]
struct Slot {
    target: Mutex<Option<CancelTarget>>,
    in_flight: tokio::sync::Mutex<()>,
    /// The client sent a transaction's first messages and has not had its answer
    /// (transaction pooling; see [`CancelGuard::underway`]).
    underway: AtomicBool,
    /// A cancel of the client's reached its backend's server during the transaction
    /// underway.
    delivered: AtomicBool,
}

impl Slot {
    fn target(&self) -> Option<CancelTarget> {
        self.target
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, target: Option<CancelTarget>) {
        *self.target.lock().unwrap_or_else(PoisonError::into_inner) = target;
    }

    /// The backend a cancel must go to now. None if the client is between transactions: a
    /// cancel then has nothing to cancel. A client whose transaction is underway but holds no
    /// backend yet (waiting for one, or for the answer to a reset sent at release) is waited
    /// for: its statement is on its way, and goes to the backend right after it is attached.
    async fn ready_for_cancel(&self) -> Option<CancelTarget> {
        let mut waited = false;
        loop {
            match self.target() {
                Some(target) => {
                    if waited {
                        // The statement goes to the backend in the poll that attached it,
                        // behind the reset sent ahead. A cancel that reached the backend before
                        // the statement began (idle, or between the reset and the statement)
                        // would be dropped by the server: let the statement begin.
                        tokio::time::sleep(HELD_CANCEL_DELAY).await;
                    }
                    return Some(target);
                }
                None if !self.underway.load(Ordering::Acquire) => return None,
                None => {
                    waited = true;
                    tokio::time::sleep(UNDERWAY_POLL).await;
                }
            }
        }
    }
}

/// (pid, secret) → the client's slot.
type Keys = HashMap<(i32, i32), Arc<Slot>>;

/// Proxy-issued cancel keys → backends.
#[derive(Debug, Clone, Default)]
pub struct CancelMap {
    inner: Arc<Mutex<Keys>>,
    /// The top byte of every secret issued from now on.
    tag: Arc<AtomicU8>,
}

/// The instance tag a cancel key's secret carries (its top byte).
pub fn tag_of(secret: i32) -> u8 {
    secret.to_be_bytes()[0]
}

/// A secret with `tag` in its top byte and `random`'s low 24 bits.
fn tagged(tag: u8, random: i32) -> i32 {
    let [_, b1, b2, b3] = random.to_be_bytes();
    i32::from_be_bytes([tag, b1, b2, b3])
}

impl CancelMap {
    /// Makes `tag` the top byte of the keys issued from now on (keys issued already keep
    /// theirs, and stay valid here).
    pub fn set_instance_tag(&self, tag: u8) {
        self.tag.store(tag, Ordering::Relaxed);
    }

    /// The tag of the keys issued now (0: none).
    pub fn instance_tag(&self) -> u8 {
        self.tag.load(Ordering::Relaxed)
    }

    /// Issues a key for a client now served by `target`. The key goes away with the guard.
    pub fn register(&self, target: CancelTarget) -> CancelGuard {
        self.register_with(target.backend_pid, Some(target))
    }

    /// Issues a key for a client no backend serves yet (transaction pooling): the pid is
    /// made up, since no backend's would be right for long.
    pub fn register_detached(&self) -> CancelGuard {
        self.register_with(rand::random::<i32>() & 0x3fff_ffff, None)
    }

    /// Keeps the key a client was given by another process (an upgrade's handover), with no
    /// backend yet. None when a client of this process holds that key already.
    pub fn register_carried(&self, key: (i32, i32)) -> Option<CancelGuard> {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let std::collections::hash_map::Entry::Vacant(entry) = map.entry(key) else {
            return None;
        };
        let slot = Arc::new(Slot::default());
        entry.insert(Arc::clone(&slot));
        Some(CancelGuard {
            map: self.clone(),
            key,
            slot,
        })
    }

    fn register_with(&self, pid: i32, target: Option<CancelTarget>) -> CancelGuard {
        let tag = self.instance_tag();
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let secret = tagged(tag, rand::random());
            let key = (pid, secret);
            if let std::collections::hash_map::Entry::Vacant(entry) = map.entry(key) {
                let slot = Arc::new(Slot::default());
                slot.set(target);
                entry.insert(Arc::clone(&slot));
                return CancelGuard {
                    map: self.clone(),
                    key,
                    slot,
                };
            }
        }
    }

    fn slot(&self, pid: i32, secret: i32) -> Option<Arc<Slot>> {
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&(pid, secret)).cloned()
    }

    fn remove(&self, key: (i32, i32)) {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.remove(&key);
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forwards a client's CancelRequest to the backend serving that client now, and waits
    /// until the server has taken it (it closes the connection once the backend is signalled).
    /// Unknown keys, and clients between transactions, are dropped silently, as PostgreSQL
    /// does. Says whether the key was known (the failed-login throttle counts unknown ones).
    pub async fn cancel(&self, pid: i32, secret: i32, timeout: Duration) -> CancelOutcome {
        let Some(slot) = self.slot(pid, secret) else {
            tracing::debug!(pid, "cancel request with an unknown key dropped");
            return CancelOutcome::UnknownKey;
        };
        // While we hold this, the client's backend stays with the client.
        let _in_flight = slot.in_flight.lock().await;
        let Ok(target) = tokio::time::timeout(timeout, slot.ready_for_cancel()).await else {
            tracing::warn!(
                pid,
                "cancel request dropped: the client's backend was not ready for it in time"
            );
            return CancelOutcome::Failed;
        };
        let Some(target) = target else {
            tracing::debug!(pid, "cancel request between transactions dropped");
            return CancelOutcome::Idle;
        };
        let mut buf = BytesMut::with_capacity(16);
        frontend::cancel_request(target.backend_pid, target.backend_secret, &mut buf);
        let sent = tokio::time::timeout(timeout, deliver(&target, &buf)).await;
        match sent {
            Ok(Ok(())) => {
                slot.delivered.store(true, Ordering::Release);
                tracing::info!(backend_pid = target.backend_pid, "cancel request forwarded");
                CancelOutcome::Delivered
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "forwarding a cancel request failed");
                CancelOutcome::Failed
            }
            Err(_) => {
                tracing::warn!("forwarding a cancel request timed out");
                CancelOutcome::Failed
            }
        }
    }
}

/// How often a cancel for a client waiting for its backend looks again.
const UNDERWAY_POLL: Duration = Duration::from_millis(1);

/// How long a cancel that waited for its client's backend lets the client's statement begin
/// once the backend is attached.
const HELD_CANCEL_DELAY: Duration = Duration::from_millis(1);

/// Sends a CancelRequest to the backend's server, over TLS when the backend connection uses it,
/// and waits for the server to close the connection (it does once the backend is signalled).
async fn deliver(target: &CancelTarget, request: &[u8]) -> std::io::Result<()> {
    let tcp = TcpStream::connect(target.addr).await?;
    let mut stream = match &target.tls {
        Some(tls) => tls.negotiate(tcp).await.map_err(std::io::Error::other)?,
        None => BackendStream::Plain(tcp),
    };
    stream.write_all(request).await?;
    stream.flush().await?;
    let mut sink = [0u8; 64];
    loop {
        match stream.read(&mut sink).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            // A server that closes the socket without a TLS close_notify has still taken it.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Keeps a cancel key valid while its client is connected.
#[derive(Debug)]
pub struct CancelGuard {
    map: CancelMap,
    key: (i32, i32),
    slot: Arc<Slot>,
}

impl CancelGuard {
    /// (pid, secret) for the client's BackendKeyData.
    pub fn key(&self) -> (i32, i32) {
        self.key
    }

    /// The client's transaction is underway (its first messages arrived) until the guard
    /// drops: a cancel that comes before a backend serves it waits for one instead of being
    /// dropped.
    pub fn underway(&self) -> Underway<'_> {
        self.slot.delivered.store(false, Ordering::Release);
        self.slot.underway.store(true, Ordering::Release);
        Underway(&self.slot)
    }

    /// Whether a cancel of this client's reached its backend's server since its transaction
    /// got underway.
    pub fn delivered(&self) -> bool {
        self.slot.delivered.load(Ordering::Acquire)
    }

    /// Points the key at the backend that now serves the client.
    pub fn attach(&self, target: CancelTarget) {
        self.slot.set(Some(target));
    }

    /// Detaches the key from its backend before the backend leaves the client, after any
    /// cancel already on its way has landed: a cancel must never hit the next client's query.
    pub async fn detach(&self) {
        let _in_flight = self.slot.in_flight.lock().await;
        self.slot.set(None);
    }
}

/// See [`CancelGuard::underway`].
pub struct Underway<'a>(&'a Slot);

impl Drop for Underway<'_> {
    fn drop(&mut self) {
        self.0.underway.store(false, Ordering::Release);
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.map.remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lives_as_long_as_its_guard() {
        let map = CancelMap::default();
        let target = CancelTarget {
            addr: "127.0.0.1:1".parse().unwrap(),
            tls: None,
            backend_pid: 42,
            backend_secret: 7,
        };
        let guard = map.register(target);
        let (pid, secret) = guard.key();
        assert_eq!(pid, 42);
        let found = map.slot(pid, secret).unwrap().target().unwrap();
        assert_eq!((found.backend_pid, found.backend_secret), (42, 7));
        assert!(map.slot(pid, secret.wrapping_add(1)).is_none());
        drop(guard);
        assert!(map.slot(pid, secret).is_none());
        assert!(map.is_empty());
    }

    #[test]
    fn keys_carry_the_instance_tag_in_the_secret_top_byte() {
        let map = CancelMap::default();
        let untagged = map.register_detached();
        assert_eq!(tag_of(untagged.key().1), 0);
        map.set_instance_tag(0xc3);
        for _ in 0..50 {
            let guard = map.register_detached();
            assert_eq!(tag_of(guard.key().1), 0xc3);
        }
        // A key issued before the tag changed still finds its slot.
        let (pid, secret) = untagged.key();
        assert!(map.slot(pid, secret).is_some());
        assert_eq!(tagged(7, -1), 0x07ff_ffff);
    }
}
