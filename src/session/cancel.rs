//! The cancel map: which backend serves the client holding a tenantgate-issued cancel key right
//! now, and forwarding a CancelRequest to it.
//!
//! A key is (backend pid, tenantgate secret): the pid is the backend's real one so that
//! `pg_backend_pid()` and NOTIFY pids agree with what the client was told; the secret is ours,
//! so nobody can cancel a backend's queries with a key the backend issued. An entry lives
//! exactly as long as the client holds that backend ([`CancelGuard`]), so a cancel can never hit
//! a backend that has since moved to another client. The lock is taken at session start and
//! end and per cancel, never on the relay path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The backend a cancel key points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub backend_pid: i32,
    pub backend_secret: i32,
}

/// (pid, secret) → the backend serving that client now (none between transactions).
type Keys = HashMap<(i32, i32), Option<CancelTarget>>;

/// Proxy-issued cancel keys → backends.
#[derive(Debug, Clone, Default)]
pub struct CancelMap {
    inner: Arc<Mutex<Keys>>,
}

impl CancelMap {
    /// Issues a key for a client now served by `target`. The key goes away with the guard.
    pub fn register(&self, target: CancelTarget) -> CancelGuard {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let secret: i32 = rand::random();
            let key = (target.backend_pid, secret);
            if let std::collections::hash_map::Entry::Vacant(slot) = map.entry(key) {
                slot.insert(Some(target));
                return CancelGuard {
                    map: self.clone(),
                    key,
                };
            }
        }
    }

    fn lookup(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&(pid, secret)).copied().flatten()
    }

    fn retarget(&self, key: (i32, i32), target: Option<CancelTarget>) {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = map.get_mut(&key) {
            *slot = target;
        }
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

    /// Forwards a client's CancelRequest. Unknown keys are dropped silently, as PostgreSQL
    /// does. Returns whether a cancel was sent.
    pub async fn cancel(&self, pid: i32, secret: i32, timeout: Duration) -> bool {
        let Some(target) = self.lookup(pid, secret) else {
            tracing::debug!(pid, "cancel request with an unknown key dropped");
            return false;
        };
        let mut buf = BytesMut::with_capacity(16);
        frontend::cancel_request(target.backend_pid, target.backend_secret, &mut buf);
        let sent = tokio::time::timeout(timeout, async {
            let mut stream = TcpStream::connect(target.addr).await?;
            stream.write_all(&buf).await?;
            stream.shutdown().await
        })
        .await;
        match sent {
            Ok(Ok(())) => {
                tracing::info!(backend_pid = target.backend_pid, "cancel request forwarded");
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "forwarding a cancel request failed");
                false
            }
            Err(_) => {
                tracing::warn!("forwarding a cancel request timed out");
                false
            }
        }
    }
}

/// Keeps a cancel key valid while its client holds the backend.
#[derive(Debug)]
pub struct CancelGuard {
    map: CancelMap,
    key: (i32, i32),
}

impl CancelGuard {
    /// (pid, secret) for the client's BackendKeyData.
    pub fn key(&self) -> (i32, i32) {
        self.key
    }

    /// Transaction pooling: points the key at the backend now serving the client, or at
    /// nothing between transactions (a cancel then has nothing to cancel and is dropped).
    pub fn retarget(&self, target: Option<CancelTarget>) {
        self.map.retarget(self.key, target);
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
            backend_pid: 42,
            backend_secret: 7,
        };
        let guard = map.register(target);
        let (pid, secret) = guard.key();
        assert_eq!(pid, 42);
        assert_eq!(map.lookup(pid, secret), Some(target));
        assert_eq!(map.lookup(pid, secret.wrapping_add(1)), None);
        drop(guard);
        assert_eq!(map.lookup(pid, secret), None);
        assert!(map.is_empty());
    }
}
