//! What a client holds: a [`Lease`] on one backend connection (closed unless proven reusable)
//! and a [`PoolUse`] on its tenant's pool (which keeps the pool from being evicted away from
//! it). Neither decides when to take or give back; the session does.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::manager::IdleMark;
use super::{BackendConn, BackendManager, TenantPool};
use crate::stats::TenantStats;

/// A checked-out backend connection. Dropping it closes the connection unless its holder
/// proved it reusable first ([`Lease::reusable`]): alive, clean and at a message boundary
/// (DESIGN §4a). An early return, a `?`, a cancelled future or a panic in the holder all
/// drop an unproven lease, so none of them can hand a dirty backend to the next client.
/// Then it lets the next waiting client in.
pub struct Lease {
    // Field order is drop order: the connection goes back before the permit, and the pool is
    // marked as holding an idle connection last.
    pub(super) conn: bb8::PooledConnection<'static, BackendManager>,
    pub(super) _turn: tokio::sync::OwnedSemaphorePermit,
    pub(super) idle_mark: IdleMark,
    /// Set by `reusable`: the connection may go back to the pool.
    pub(super) proven: bool,
}

impl Lease {
    pub fn conn(&mut self) -> &mut BackendConn {
        &mut self.conn
    }

    /// The pool this lease came from, while it exists.
    pub fn pool(&self) -> Option<Arc<TenantPool>> {
        self.idle_mark.pool.upgrade()
    }

    /// The holder has proven the connection alive, clean and between messages in both
    /// directions: it goes back to the pool when the lease drops (unless marked broken).
    /// Call it last, right before the lease drops.
    pub fn reusable(&mut self) {
        self.proven = true;
    }

    /// Like [`Lease::reusable`], for a connection going back without the reset its next
    /// client needs (`BackendConn::needs_reset` set): that client's first messages carry it,
    /// or the pool's sweeper sends it if nobody takes the connection soon (`SWEEP_EVERY`).
    ///
    /// [`SWEEP_EVERY`]: super::SWEEP_EVERY
    pub fn reusable_unreset(&mut self) {
        self.proven = true;
        self.idle_mark.unreset = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.proven || std::thread::panicking() {
            tracing::debug!(
                backend_pid = self.conn.pid,
                "backend lease not proven reusable; closing the connection"
            );
            // Not proven, or unwinding from a panic mid-relay: the backend may be inside a
            // transaction or a message. Close it without a goodbye (a Terminate could land
            // inside a half-sent message).
            self.conn.broken = true;
        }
    }
}

/// Adds the time a checkout waited to the tenant's wait time when dropped: also when the
/// checkout fails or its client goes away while waiting. It starts when the checkout first has
/// to wait (no turn free, no idle connection): one served at once reads no clock and counts
/// as a wait of zero.
pub(super) struct WaitTimer<'a> {
    pub(super) stats: &'a TenantStats,
    pub(super) started: Option<tokio::time::Instant>,
}

impl WaitTimer<'_> {
    pub(super) fn start(&mut self) {
        self.started.get_or_insert_with(tokio::time::Instant::now);
    }
}

impl Drop for WaitTimer<'_> {
    fn drop(&mut self) {
        // A checkout served at once counts too, as a wait of zero.
        self.stats.add_wait(
            self.started
                .map_or(Duration::ZERO, |started| started.elapsed()),
        );
    }
}

/// A client's hold on its tenant's pool; see `PoolMap::attach`.
pub struct PoolUse {
    pub(super) pool: Arc<TenantPool>,
}

impl PoolUse {
    /// The pool held.
    pub fn pool(&self) -> &Arc<TenantPool> {
        &self.pool
    }
}

impl Drop for PoolUse {
    fn drop(&mut self) {
        // The last client of a parked pool leaves: nobody will take it back for them.
        // SeqCst, with the listener's park-then-load: one of the two sees the other.
        if self.pool.users.fetch_sub(1, Ordering::SeqCst) == 1
            && self.pool.standing.retire_if_parked()
        {
            self.pool.retire();
        }
    }
}
