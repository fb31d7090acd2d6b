//! PAUSE and RESUME with PgBouncer's meaning: while a tenant (or every tenant) is paused, new
//! backend checkouts wait at the gate, without a timeout, and transactions already running
//! finish. Checked once per checkout, never per message. This type only holds the gate; the
//! admin console decides when to pause and waits for running work to drain.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use crate::registry::TenantSlug;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Paused {
    all: bool,
    tenants: HashSet<TenantSlug>,
}

impl Paused {
    fn covers(&self, slug: &TenantSlug) -> bool {
        self.all || self.tenants.contains(slug)
    }
}

/// Why RESUME did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    #[error("nothing is paused")]
    NotPaused,
    #[error("every tenant is paused: RESUME without a tenant resumes them all")]
    AllPaused,
}

/// The pause state shared by the pool map and the admin console.
#[derive(Debug, Clone)]
pub struct PauseGate {
    state: Arc<watch::Sender<Paused>>,
    /// Whether anything is paused: set with `state`, under its lock. A checkout reads only
    /// this while nothing is (the common case), not the shared lock every client's checkout
    /// would take.
    any: Arc<AtomicBool>,
}

impl Default for PauseGate {
    fn default() -> Self {
        PauseGate {
            state: Arc::new(watch::Sender::new(Paused::default())),
            any: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl PauseGate {
    /// Pauses one tenant, or every tenant with `None`.
    pub fn pause(&self, slug: Option<&TenantSlug>) {
        self.state.send_modify(|p| {
            match slug {
                Some(slug) => {
                    p.tenants.insert(slug.clone());
                }
                None => p.all = true,
            }
            self.any.store(true, Ordering::SeqCst);
        });
    }

    /// Resumes one tenant, or everything with `None`.
    pub fn resume(&self, slug: Option<&TenantSlug>) -> Result<(), ResumeError> {
        let mut outcome = Ok(());
        self.state.send_if_modified(|p| {
            let changed = match slug {
                None if p.all || !p.tenants.is_empty() => {
                    *p = Paused::default();
                    true
                }
                Some(_) if p.all => {
                    outcome = Err(ResumeError::AllPaused);
                    false
                }
                Some(slug) if p.tenants.remove(slug) => true,
                None | Some(_) => {
                    outcome = Err(ResumeError::NotPaused);
                    false
                }
            };
            self.any
                .store(p.all || !p.tenants.is_empty(), Ordering::SeqCst);
            changed
        });
        outcome
    }

    /// Whether checkouts for `slug` are held now.
    pub fn is_paused(&self, slug: &TenantSlug) -> bool {
        self.any.load(Ordering::SeqCst) && self.state.borrow().covers(slug)
    }

    /// Returns when `slug` is not paused (at once if it is not).
    pub async fn wait(&self, slug: &TenantSlug) {
        if !self.is_paused(slug) {
            return;
        }
        let mut rx = self.state.subscribe();
        // The sender lives as long as the gate, which outlives every waiter.
        drop(rx.wait_for(|p| !p.covers(slug)).await);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slug(s: &str) -> TenantSlug {
        TenantSlug::parse(s).unwrap_or_else(|| panic!("slug {s}"))
    }

    #[tokio::test]
    async fn pause_holds_until_resume() {
        let gate = PauseGate::default();
        let acme = slug("acme");
        let beta = slug("beta");
        gate.pause(Some(&acme));
        assert!(gate.is_paused(&acme) && !gate.is_paused(&beta));
        gate.wait(&beta).await;
        let waiter = tokio::spawn({
            let gate = gate.clone();
            let acme = acme.clone();
            async move { gate.wait(&acme).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert_eq!(gate.resume(Some(&acme)), Ok(()));
        assert!(waiter.await.is_ok());
        assert_eq!(gate.resume(Some(&acme)), Err(ResumeError::NotPaused));
        gate.pause(None);
        assert!(gate.is_paused(&beta));
        assert_eq!(gate.resume(Some(&beta)), Err(ResumeError::AllPaused));
        assert_eq!(gate.resume(None), Ok(()));
        assert_eq!(gate.resume(None), Err(ResumeError::NotPaused));
    }
}
