//! A place among the logins in progress (`[proxy] max_logins_in_progress`), held from accept
//! to the end of authentication so that stalled or slow logins take slots, not the process.
//! It is given back while the failed-login throttle makes a client wait: a source that keeps
//! failing must not fill the slots with sleeping attempts and keep honest clients out. It
//! must not be held once the client is logged in.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// No slot came free within the wait (the caller answers 53300).
#[derive(Debug, Clone, Copy)]
pub(super) struct NoSlot(pub Duration);

pub(super) struct LoginSlot {
    slots: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
    /// How long to wait for a slot, at accept and after a throttle delay.
    wait: Duration,
}

impl LoginSlot {
    /// Takes a slot, waiting up to `wait` for one: long enough for a burst of honest logins
    /// to queue.
    pub(super) async fn take(slots: &Arc<Semaphore>, wait: Duration) -> Result<Self, NoSlot> {
        let permit = acquire(slots, wait).await?;
        Ok(LoginSlot {
            slots: Arc::clone(slots),
            permit: Some(permit),
            wait,
        })
    }

    /// Sleeps `delay` without the slot, then takes one again as at accept.
    pub(super) async fn sleep_without(&mut self, delay: Duration) -> Result<(), NoSlot> {
        self.permit = None;
        tokio::time::sleep(delay).await;
        self.permit = Some(acquire(&self.slots, self.wait).await?);
        Ok(())
    }
}

async fn acquire(slots: &Arc<Semaphore>, wait: Duration) -> Result<OwnedSemaphorePermit, NoSlot> {
    match tokio::time::timeout(wait, Arc::clone(slots).acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        // Timed out, or the semaphore was closed (it never is).
        _ => Err(NoSlot(wait)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_sleeping_login_gives_its_slot_back() {
        let slots = Arc::new(Semaphore::new(1));
        let wait = Duration::from_millis(100);
        let mut sleeper = LoginSlot::take(&slots, wait).await.unwrap();
        assert!(
            LoginSlot::take(&slots, wait).await.is_err(),
            "one slot only"
        );
        let sleeping = tokio::spawn(async move {
            sleeper
                .sleep_without(Duration::from_secs(2))
                .await
                .map(|()| sleeper)
        });
        tokio::task::yield_now().await;
        let other = LoginSlot::take(&slots, wait).await.unwrap();
        drop(other);
        let sleeper = sleeping.await.unwrap().unwrap();
        assert_eq!(
            slots.available_permits(),
            0,
            "the sleeper has its slot again"
        );
        drop(sleeper);
        assert_eq!(slots.available_permits(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_delay_a_full_house_is_refused() {
        let slots = Arc::new(Semaphore::new(1));
        let wait = Duration::from_millis(100);
        let mut sleeper = LoginSlot::take(&slots, wait).await.unwrap();
        let sleeping =
            tokio::spawn(async move { sleeper.sleep_without(Duration::from_secs(1)).await });
        tokio::task::yield_now().await;
        let _other = LoginSlot::take(&slots, wait).await.unwrap();
        assert!(sleeping.await.unwrap().is_err());
    }
}
