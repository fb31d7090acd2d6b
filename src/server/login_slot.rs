//! A place among the logins in progress (`[proxy] max_logins_in_progress`, and at most
//! `max_logins_in_progress_per_source` of them from one source address), held from accept
//! to the end of authentication so that stalled or slow logins take slots, not the process,
//! and one address's silent connections cannot take every slot. The global slot is given back
//! while the failed-login throttle makes a client wait: a source that keeps failing must not
//! fill the slots with sleeping attempts and keep honest clients out (its own per-source slot
//! stays taken: that only slows the same source). It must not be held once the client is
//! logged in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// No slot came free within the wait (the caller answers 53300).
#[derive(Debug, Clone, Copy)]
pub(super) struct NoSlot {
    pub waited: Duration,
    /// The client's own address had all its slots taken (not the whole proxy).
    pub per_source: bool,
}

/// Every login slot of a proxy: the global count and one count per source address with a
/// login in progress (entries go when their last login ends).
pub(super) struct LoginSlots {
    global: Arc<Semaphore>,
    per_source: usize,
    sources: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
}

impl LoginSlots {
    pub(super) fn new(global: u32, per_source: u32) -> LoginSlots {
        let global = usize::try_from(global).unwrap_or(usize::MAX);
        LoginSlots {
            global: Arc::new(Semaphore::new(global)),
            per_source: usize::try_from(per_source).unwrap_or(usize::MAX).max(1),
            sources: Mutex::new(HashMap::new()),
        }
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Arc<Semaphore>>> {
        self.sources.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The semaphore of `source`, created on first use.
    fn source(&self, source: IpAddr) -> Arc<Semaphore> {
        let per_source = self.per_source;
        Arc::clone(
            self.sources()
                .entry(source)
                .or_insert_with(|| Arc::new(Semaphore::new(per_source))),
        )
    }

    /// Drops `source`'s entry if nobody holds or waits for its semaphore any more.
    fn forget_if_unused(&self, source: IpAddr, semaphore: &Arc<Semaphore>) {
        let mut sources = self.sources();
        // The map's reference and ours: no login of this source holds or awaits it.
        if Arc::strong_count(semaphore) == 2 {
            sources.remove(&source);
        }
    }
}

/// A source's slot: its permit, and the entry to forget when it was the last.
struct SourceSlot {
    slots: Arc<LoginSlots>,
    source: IpAddr,
    semaphore: Option<Arc<Semaphore>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Some(semaphore) = self.semaphore.take() {
            self.slots.forget_if_unused(self.source, &semaphore);
        }
    }
}

pub(super) struct LoginSlot {
    slots: Arc<LoginSlots>,
    /// Declared first: given back before the source's slot.
    permit: Option<OwnedSemaphorePermit>,
    _source: Option<SourceSlot>,
    /// How long to wait for a slot, at accept and after a throttle delay.
    wait: Duration,
}

impl LoginSlot {
    /// Takes a slot of `source` (if known) and a global one, waiting up to `wait` for each:
    /// long enough for a burst of honest logins to queue.
    pub(super) async fn take(
        slots: &Arc<LoginSlots>,
        source: Option<IpAddr>,
        wait: Duration,
    ) -> Result<Self, NoSlot> {
        let source = match source {
            Some(source) => {
                let semaphore = slots.source(source);
                let mut slot = SourceSlot {
                    slots: Arc::clone(slots),
                    source,
                    semaphore: Some(Arc::clone(&semaphore)),
                    permit: None,
                };
                let permit = acquire(&semaphore, wait).await.map_err(|waited| NoSlot {
                    waited,
                    per_source: true,
                });
                drop(semaphore);
                slot.permit = Some(permit?);
                Some(slot)
            }
            None => None,
        };
        let permit = acquire(&slots.global, wait)
            .await
            .map_err(|waited| NoSlot {
                waited,
                per_source: false,
            })?;
        Ok(LoginSlot {
            slots: Arc::clone(slots),
            permit: Some(permit),
            _source: source,
            wait,
        })
    }

    /// Sleeps `delay` without the global slot, then takes one again as at accept.
    pub(super) async fn sleep_without(&mut self, delay: Duration) -> Result<(), NoSlot> {
        self.permit = None;
        tokio::time::sleep(delay).await;
        let permit = acquire(&self.slots.global, self.wait)
            .await
            .map_err(|waited| NoSlot {
                waited,
                per_source: false,
            })?;
        self.permit = Some(permit);
        Ok(())
    }
}

async fn acquire(
    semaphore: &Arc<Semaphore>,
    wait: Duration,
) -> Result<OwnedSemaphorePermit, Duration> {
    match tokio::time::timeout(wait, Arc::clone(semaphore).acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        // Timed out, or the semaphore was closed (it never is).
        _ => Err(wait),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
    const B: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)));

    #[tokio::test(start_paused = true)]
    async fn a_sleeping_login_gives_its_slot_back() {
        let slots = Arc::new(LoginSlots::new(1, 1));
        let wait = Duration::from_millis(100);
        let mut sleeper = LoginSlot::take(&slots, A, wait).await.unwrap();
        assert!(
            LoginSlot::take(&slots, B, wait).await.is_err(),
            "one slot only"
        );
        let sleeping = tokio::spawn(async move {
            sleeper
                .sleep_without(Duration::from_secs(2))
                .await
                .map(|()| sleeper)
        });
        tokio::task::yield_now().await;
        let other = LoginSlot::take(&slots, B, wait).await.unwrap();
        drop(other);
        let sleeper = sleeping.await.unwrap().unwrap();
        assert_eq!(
            slots.global.available_permits(),
            0,
            "the sleeper has its slot again"
        );
        drop(sleeper);
        assert_eq!(slots.global.available_permits(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_delay_a_full_house_is_refused() {
        let slots = Arc::new(LoginSlots::new(1, 1));
        let wait = Duration::from_millis(100);
        let mut sleeper = LoginSlot::take(&slots, A, wait).await.unwrap();
        let sleeping =
            tokio::spawn(async move { sleeper.sleep_without(Duration::from_secs(1)).await });
        tokio::task::yield_now().await;
        let _other = LoginSlot::take(&slots, B, wait).await.unwrap();
        assert!(sleeping.await.unwrap().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn one_source_cannot_take_every_slot_and_its_entry_goes_with_its_last_login() {
        let slots = Arc::new(LoginSlots::new(10, 2));
        let wait = Duration::from_millis(100);
        let first = LoginSlot::take(&slots, A, wait).await.unwrap();
        let second = LoginSlot::take(&slots, A, wait).await.unwrap();
        let refused = LoginSlot::take(&slots, A, wait).await.err().unwrap();
        assert!(refused.per_source);
        let other = LoginSlot::take(&slots, B, wait).await.unwrap();
        assert_eq!(slots.sources().len(), 2);
        drop((first, other));
        assert_eq!(slots.sources().len(), 1);
        drop(second);
        assert!(slots.sources().is_empty(), "no entry outlives its logins");
        assert_eq!(slots.global.available_permits(), 10);
    }
}
