//! A future that is polled only after its own waker fired: for what a session waits on for its
//! whole life and rarely happens (the tenant leaving `active`, shutdown), polled from `select!`s
//! that wake for every message. A `select!` polls each of its branches on every wake-up; a
//! pending broadcast receiver's poll takes the channel's locks, shared by every client, so a
//! transaction paid them on every message (issue 12: lock traffic on the per-transaction path).
//! Wrapped, such a branch costs an atomic swap until it has something to say.
//!
//! It must only wrap futures that make progress through their waker (every tokio primitive
//! does): one that expects to be polled again without having been woken would stall.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Set by the inner future's waker; wakes whoever polls the [`Quiet`].
struct Woken {
    woken: AtomicBool,
    outer: AtomicWaker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.outer.wake();
    }
}

/// `inner`, polled on the first poll and then only once its waker has fired.
pub(super) struct Quiet<'a, F> {
    inner: Pin<&'a mut F>,
    woken: Arc<Woken>,
    /// The waker the inner future is polled with (made once).
    waker: Waker,
}

impl<'a, F: Future> Quiet<'a, F> {
    pub(super) fn new(inner: Pin<&'a mut F>) -> Quiet<'a, F> {
        let woken = Arc::new(Woken {
            woken: AtomicBool::new(true),
            outer: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&woken));
        Quiet {
            inner,
            woken,
            waker,
        }
    }
}

impl<F: Future> Future for Quiet<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Registered before the flag is read: a wake-up in between is not lost.
        this.woken.outer.register(cx.waker());
        if !this.woken.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut inner_cx = Context::from_waker(&this.waker);
        this.inner.as_mut().poll(&mut inner_cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use futures_util::FutureExt as _;

    use super::*;

    /// Counts the polls of a oneshot receiver.
    async fn counted(rx: tokio::sync::oneshot::Receiver<u32>, polls: &AtomicUsize) -> Option<u32> {
        let mut rx = rx;
        std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::SeqCst);
            Pin::new(&mut rx).poll(cx).map(Result::ok)
        })
        .await
    }

    #[tokio::test]
    async fn polls_the_inner_future_only_when_it_was_woken() {
        let polls = AtomicUsize::new(0);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inner = counted(rx, &polls);
        tokio::pin!(inner);
        let mut quiet = Quiet::new(inner);
        // The first poll reaches the inner future (which registers its waker).
        assert!((&mut quiet).now_or_never().is_none());
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // Polled again and again without a wake of its own: the inner future is left alone.
        for _ in 0..10 {
            assert!((&mut quiet).now_or_never().is_none());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // Its waker fires: the next poll reaches it, and it completes.
        tx.send(7).unwrap();
        assert_eq!((&mut quiet).now_or_never(), Some(Some(7)));
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_task_waiting_on_it_is_woken_when_the_inner_future_is() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let waiter = tokio::spawn(async move {
            let inner = async move { rx.await.ok() };
            tokio::pin!(inner);
            let mut quiet = Quiet::new(inner);
            // Between this select's wake-ups for the sleep, the oneshot is not polled; its
            // value still ends the wait.
            let mut ticks = 0;
            loop {
                tokio::select! {
                    value = &mut quiet => return (value, ticks),
                    () = tokio::time::sleep(std::time::Duration::from_millis(1)) => ticks += 1,
                }
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        tx.send(42).unwrap();
        let (value, ticks) = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken, not left waiting")
            .unwrap();
        assert_eq!(value, Some(42));
        assert!(ticks > 0, "the select woke for its other branch meanwhile");
    }
}
