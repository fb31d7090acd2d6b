//! The heartbeat loop: every `[instance] heartbeat_seconds` it refreshes this instance's
//! registry row and counters (registering it first if it has no row: at start when the
//! registry was down, or after another instance deleted it as stale), re-reads the other
//! live instances into the peer table that cancel forwarding reads, and renews this
//! instance's leases on the servers' budgets (`budget`; a lease about to lapse unrenewed
//! is given up after every beat). Registry failures are
//! logged and retried at the next beat; they never stop the proxy. A beat that has not
//! succeeded for a whole TTL drops the tag (keys issued from then on carry 0), since another
//! instance may hold it by then. This file must not forward anything.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::time::MissedTickBehavior;

use super::{Instances, Load};
use crate::registry::RegistryError;

/// Runs until [`Instances::stop`].
pub(super) async fn run(instances: Instances) {
    let mut tick = tokio::time::interval(instances.inner.config.heartbeat());
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick is immediate, and `start` has just beaten.
    tick.tick().await;
    let mut last_ok = Instant::now();
    let mut failing = false;
    loop {
        tokio::select! {
            () = instances.inner.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let beat = tokio::time::timeout(instances.beat_bound(), instances.try_beat()).await;
        instances.enforce_lapse().await;
        match beat {
            Ok(Ok(())) => {
                if failing {
                    tracing::info!("instance heartbeat written again");
                }
                failing = false;
                last_ok = Instant::now();
            }
            outcome => {
                let error = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                if failing {
                    tracing::debug!(%error, "instance heartbeat failed");
                } else {
                    tracing::warn!(%error, "instance heartbeat failed; retrying every heartbeat");
                }
                failing = true;
                if last_ok.elapsed() >= instances.inner.config.ttl() {
                    instances.lose_row();
                }
            }
        }
    }
}

impl Instances {
    /// One beat at start: errors are logged, the loop retries.
    pub(super) async fn beat(&self) {
        match tokio::time::timeout(self.beat_bound(), self.try_beat()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                "registering this instance failed; serving without a cancel-key tag until it succeeds"
            ),
            Err(_) => tracing::warn!(
                "registering this instance timed out; serving without a cancel-key tag until it succeeds"
            ),
        }
    }

    async fn try_beat(&self) -> Result<(), RegistryError> {
        let load: Load = (self.inner.load)();
        let report = self.report(load);
        if self.inner.registered.load(Ordering::Relaxed)
            && !self.inner.registry.instance_heartbeat(&report).await?
        {
            tracing::warn!(
                id = self.id(),
                "this instance's registry row is gone (another instance found it stale); registering again"
            );
            self.lose_row();
        }
        if !self.inner.registered.load(Ordering::Relaxed) {
            self.register(load).await?;
        }
        self.refresh_peers().await?;
        self.renew_shares().await;
        Ok(())
    }

    /// Our row is gone or may be: stop issuing our tag (another instance may hold it now)
    /// and register again at the next beat, asking for it back.
    fn lose_row(&self) {
        self.inner.registered.store(false, Ordering::Relaxed);
        self.inner.cancels.set_instance_tag(0);
    }

    async fn register(&self, load: Load) -> Result<(), RegistryError> {
        let prefer = *self
            .inner
            .last_tag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tag = self
            .inner
            .registry
            .register_instance(&self.report(load), prefer, self.inner.config.ttl())
            .await?;
        let Some(tag) = tag else {
            tracing::warn!(
                "all 255 instance tags are held by live instances; this one's cancel keys cannot be forwarded to it"
            );
            return Ok(());
        };
        if prefer.is_some_and(|old| old != tag) {
            tracing::warn!(
                old = prefer.unwrap_or_default(),
                new = tag,
                "this instance's old tag was taken; keys issued under it are cancelled only when sent here"
            );
        }
        *self
            .inner
            .last_tag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tag);
        self.inner.cancels.set_instance_tag(tag);
        self.inner.registered.store(true, Ordering::Relaxed);
        tracing::info!(
            id = self.id(),
            tag,
            address = self.inner.address.as_deref().unwrap_or(""),
            "instance registered"
        );
        Ok(())
    }

    /// Re-reads the other live instances' tags and addresses.
    pub(super) async fn refresh_peers(&self) -> Result<(), RegistryError> {
        let live = self
            .inner
            .registry
            .live_instances(self.inner.config.ttl())
            .await?;
        let peers = live
            .into_iter()
            .filter(|row| row.id != self.inner.id)
            .filter_map(|row| Some((row.tag, row.address?)))
            .collect();
        *self
            .inner
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = peers;
        Ok(())
    }
}
