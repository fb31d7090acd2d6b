//! A backend server's connection budget: at most `max_connections` backend connections to one
//! server, summed over every tenant pool on it, so thousands of tenants can share a server that
//! allows a hundred connections.
//!
//! Every backend connection holds one permit for its whole life (idle ones included) and gives
//! it back when it closes. Waiters are served in order (tokio's semaphore is fair). Making room
//! by closing another pool's idle connection is the pool's job (`BackendManager`); this type
//! only counts, and tells those waiting for room when a connection on the server went idle
//! (one they may close), so they need not poll.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::futures::Notified;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The budget of one backend server.
#[derive(Debug)]
pub struct ServerBudget {
    server: String,
    max_connections: u32,
    permits: Arc<Semaphore>,
    /// Woken when a connection on this server goes back to its pool idle.
    went_idle: Notify,
}

impl ServerBudget {
    pub fn new(server: &str, max_connections: u32) -> ServerBudget {
        ServerBudget {
            server: server.to_owned(),
            max_connections,
            permits: Arc::new(Semaphore::new(
                usize::try_from(max_connections).unwrap_or(usize::MAX),
            )),
            went_idle: Notify::new(),
        }
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }

    /// Permits not held by any connection.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Connections holding a permit now.
    pub fn in_use(&self) -> u32 {
        let available = u32::try_from(self.available()).unwrap_or(u32::MAX);
        self.max_connections.saturating_sub(available)
    }

    /// A permit if one is free now.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.permits).try_acquire_owned().ok()
    }

    /// A connection on this server went back to its pool idle: whoever waits for room may
    /// close it now. Only a spent budget has such waiters, so otherwise this is one load.
    pub fn connection_went_idle(&self) {
        if self.permits.available_permits() == 0 {
            // One waiter per idle connection: waking all would have each close one.
            self.went_idle.notify_one();
        }
    }

    /// Resolves at the next [`ServerBudget::connection_went_idle`]; `enable` it before looking
    /// for idle connections so that none going idle meanwhile is missed.
    pub fn idle_connection(&self) -> Notified<'_> {
        self.went_idle.notified()
    }

    /// Waits (in order) up to `wait` for a permit.
    pub async fn acquire(&self, wait: Duration) -> Option<OwnedSemaphorePermit> {
        tokio::time::timeout(wait, Arc::clone(&self.permits).acquire_owned())
            .await
            .ok()?
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_going_idle_wakes_those_waiting_for_room() {
        let budget = ServerBudget::new("main", 1);
        let _held = budget.try_acquire().unwrap();
        let went_idle = budget.idle_connection();
        tokio::pin!(went_idle);
        went_idle.as_mut().enable();
        budget.connection_went_idle();
        tokio::time::timeout(Duration::from_secs(5), went_idle)
            .await
            .expect("woken without polling");
    }

    #[tokio::test(start_paused = true)]
    async fn permits_count_and_wait_in_order() {
        let budget = ServerBudget::new("main", 2);
        let a = budget.acquire(Duration::from_secs(1)).await.unwrap();
        let _b = budget.acquire(Duration::from_secs(1)).await.unwrap();
        assert_eq!(budget.in_use(), 2);
        assert!(budget.acquire(Duration::from_millis(10)).await.is_none());
        drop(a);
        assert_eq!(budget.in_use(), 1);
        assert!(budget.acquire(Duration::from_millis(10)).await.is_some());
    }
}
