//! A backend server's connection budget: at most `max_connections` backend connections to one
//! server, summed over every tenant pool on it, so thousands of tenants can share a server that
//! allows a hundred connections.
//!
//! Every backend connection holds one permit for its whole life (idle ones included) and gives
//! it back when it closes. Waiters are served in order (tokio's semaphore is fair). Making room
//! by closing another pool's idle connection is the pool's job (`BackendManager`); this type
//! only counts, and tells those waiting for room when a connection on the server went idle
//! (one they may close), so they need not poll.
//!
//! Several instances share one server's budget (issue 15): each may open only its **share**,
//! the permits that exist in its semaphore (held ones included). The share is set by the
//! instance's heartbeat (`crate::instance::budget`), never on the checkout path: [`grow_to`]
//! adds permits (after the registry granted them), [`shrink_toward`] forgets free ones (before
//! the registry is told; closing idle connections so that theirs come back is the pool map's
//! job). A budget built by [`ServerBudget::new`] starts with the whole `max_connections` as its
//! share, as a lone instance has it.
//!
//! [`grow_to`]: ServerBudget::grow_to
//! [`shrink_toward`]: ServerBudget::shrink_toward

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::futures::Notified;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The budget of one backend server.
#[derive(Debug)]
pub struct ServerBudget {
    server: String,
    max_connections: u32,
    permits: Arc<Semaphore>,
    /// This instance's share: the permits in `permits`, held or free. Changed only by
    /// `grow_to` and `shrink_toward`, which one task (the heartbeat) calls.
    share: AtomicU32,
    /// Connects waiting for a permit now, and the most seen since `take_peak_waiting`.
    waiting: AtomicU32,
    peak_waiting: AtomicU32,
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
            share: AtomicU32::new(max_connections),
            waiting: AtomicU32::new(0),
            peak_waiting: AtomicU32::new(0),
            went_idle: Notify::new(),
        }
    }

    /// The connections this instance may open to the server now (its share of the budget).
    pub fn share(&self) -> u32 {
        self.share.load(Ordering::Acquire)
    }

    /// Raises the share to `share` (at most `max_connections`): the permits are usable at once.
    pub fn grow_to(&self, share: u32) {
        let share = share.min(self.max_connections);
        let now = self.share.load(Ordering::Acquire);
        if share > now {
            self.permits
                .add_permits(usize::try_from(share - now).unwrap_or(usize::MAX));
            self.share.store(share, Ordering::Release);
        }
    }

    /// Lowers the share toward `share` by forgetting free permits; held ones stay until their
    /// connections close (call again then). Returns the share reached.
    pub fn shrink_toward(&self, share: u32) -> u32 {
        let now = self.share.load(Ordering::Acquire);
        if share >= now {
            return now;
        }
        let excess = usize::try_from(now - share).unwrap_or(usize::MAX);
        let forgotten = self.permits.forget_permits(excess);
        let reached = now.saturating_sub(u32::try_from(forgotten).unwrap_or(u32::MAX));
        self.share.store(reached, Ordering::Release);
        reached
    }

    /// Connects waiting for a permit now.
    pub fn waiting_now(&self) -> u32 {
        self.waiting.load(Ordering::Acquire)
    }

    /// Connects waiting for a permit: the most at once since the last call (then now).
    pub fn take_peak_waiting(&self) -> u32 {
        let now = self.waiting.load(Ordering::Acquire);
        self.peak_waiting.swap(now, Ordering::AcqRel).max(now)
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
        self.share().saturating_sub(available)
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

    /// Counts a connect waiting for room (demand the heartbeat reports) until the guard drops.
    pub fn waiting(&self) -> Waiting<'_> {
        let now = self
            .waiting
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        self.peak_waiting.fetch_max(now, Ordering::AcqRel);
        Waiting(self)
    }
}

/// A connect waiting for room in its server's budget (see [`ServerBudget::waiting`]).
#[derive(Debug)]
pub struct Waiting<'a>(&'a ServerBudget);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
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

    #[tokio::test(start_paused = true)]
    async fn a_share_shrinks_by_free_permits_only_and_grows_at_once() {
        let budget = ServerBudget::new("main", 10);
        let held: Vec<_> = (0..4).map(|_| budget.try_acquire().unwrap()).collect();
        assert_eq!(budget.shrink_toward(2), 4, "held permits stay");
        assert_eq!(budget.in_use(), 4);
        assert!(budget.try_acquire().is_none());
        drop(held);
        assert_eq!(budget.shrink_toward(2), 2);
        assert_eq!(
            (budget.share(), budget.in_use(), budget.available()),
            (2, 0, 2)
        );
        budget.grow_to(50);
        assert_eq!(
            (budget.share(), budget.available()),
            (10, 10),
            "never past the budget"
        );
        let waiter = budget.waiting();
        assert_eq!(budget.take_peak_waiting(), 1);
        drop(waiter);
        assert_eq!(
            budget.take_peak_waiting(),
            1,
            "the peak since the last look"
        );
        assert_eq!(budget.take_peak_waiting(), 0);
    }
}
