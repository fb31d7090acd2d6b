//! A plan's ceilings, which the client cannot raise (unlike `statement_timeout`, a default it
//! may `SET` away): the longest statement (`max_statement_ms`: the proxy cancels it), the
//! longest idle time inside a transaction (`max_idle_in_transaction_ms`: FATAL 25P03, the
//! backend closed) and the longest idle time between transactions (`max_client_idle_ms`:
//! FATAL 57P05). Enforced by tenantgate in both pooling modes, whatever the client sets.
//!
//! The relay records the phase the client's connection is in ([`Phase`]) and when it began,
//! in relaxed atomics it shares with [`Watchdog::next`] within the session's task (atomics
//! only so the task stays `Send`): one load per wakeup on the relay path, a clock read only
//! when the phase changes (about twice per transaction; criterion relay/round_trips_1000
//! +3.8 %, result_set unchanged). The watchdog sleeps until the current phase's deadline,
//! checked again on waking, so it never fires early. With no ceiling configured the relay
//! records nothing and the watchdog never wakes.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::Either;
use tokio::time::Instant;

/// The limits, from the tenant's plan (and overrides). `None`: no ceiling.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ceilings {
    pub statement: Option<Duration>,
    pub idle_in_transaction: Option<Duration>,
    pub client_idle: Option<Duration>,
}

impl Ceilings {
    pub fn is_empty(&self) -> bool {
        self.statement.is_none() && self.idle_in_transaction.is_none() && self.client_idle.is_none()
    }

    fn of(&self, phase: Phase) -> Option<Duration> {
        match phase {
            Phase::Busy => self.statement,
            Phase::IdleInTransaction => self.idle_in_transaction,
            Phase::Idle => self.client_idle,
        }
    }
}

/// Where the connection is, as the relay saw it last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A request is owed an answer: a statement runs.
    Busy,
    /// Nothing owed, inside a transaction: the client is thinking while holding locks.
    IdleInTransaction,
    /// Nothing owed, no transaction.
    Idle,
}

impl Phase {
    fn code(self) -> u8 {
        match self {
            Phase::Busy => 0,
            Phase::IdleInTransaction => 1,
            Phase::Idle => 2,
        }
    }

    fn from_code(code: u8) -> Phase {
        match code {
            0 => Phase::Busy,
            1 => Phase::IdleInTransaction,
            _ => Phase::Idle,
        }
    }

    /// From what is owed and the last ReadyForQuery status.
    pub fn of(pending: u32, status: u8) -> Phase {
        match (pending, status) {
            (0, b'T' | b'E') => Phase::IdleInTransaction,
            (0, _) => Phase::Idle,
            _ => Phase::Busy,
        }
    }
}

/// A ceiling that was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    /// A statement ran past `max_statement_ms`: cancel it, then go on.
    Statement,
    /// The client sat idle inside a transaction past `max_idle_in_transaction_ms`.
    IdleInTransaction(Duration),
    /// The client sat idle past `max_client_idle_ms`.
    ClientIdle(Duration),
}

/// The phase and when it began, shared by the relay (writer) and the watchdog (reader).
#[derive(Debug)]
pub struct PhaseClock {
    /// False when the tenant's plan sets no ceiling: nothing is recorded.
    watching: bool,
    base: Instant,
    phase: AtomicU8,
    /// When the phase began, in microseconds since `base`.
    since: AtomicU64,
    /// The busy period (its `since`) whose statement was already cancelled.
    cancelled: AtomicU64,
}

impl Default for PhaseClock {
    fn default() -> Self {
        PhaseClock::watching(true)
    }
}

impl PhaseClock {
    /// A clock that records phases only when `watching` (some ceiling is set).
    pub fn watching(watching: bool) -> PhaseClock {
        PhaseClock {
            watching,
            base: Instant::now(),
            phase: AtomicU8::new(Phase::Idle.code()),
            since: AtomicU64::new(0),
            cancelled: AtomicU64::new(u64::MAX),
        }
    }

    /// Records `phase`; the clock is read only when it differs from the last one.
    pub fn observe(&self, phase: Phase) {
        if self.watching && self.phase.load(Ordering::Relaxed) != phase.code() {
            let micros = u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
            self.since.store(micros, Ordering::Relaxed);
            self.phase.store(phase.code(), Ordering::Relaxed);
        }
    }

    /// The phase and when it began (as microseconds since `base`).
    fn now(&self) -> (Phase, u64) {
        (
            Phase::from_code(self.phase.load(Ordering::Relaxed)),
            self.since.load(Ordering::Relaxed),
        )
    }

    fn instant(&self, micros: u64) -> Instant {
        self.base + Duration::from_micros(micros)
    }
}

/// Waits for the next ceiling the connection reaches.
pub struct Watchdog<'a> {
    ceilings: Ceilings,
    clock: &'a PhaseClock,
}

impl<'a> Watchdog<'a> {
    pub fn new(ceilings: Ceilings, clock: &'a PhaseClock) -> Watchdog<'a> {
        Watchdog { ceilings, clock }
    }

    /// Resolves when the current phase has lasted past its ceiling (never without one).
    ///
    /// Without ceilings (the default) the future is empty: it is part of every idle client's
    /// state (issue 12). With them its timer is boxed, once per call.
    pub fn next(&self) -> impl Future<Output = Reached> + '_ {
        // No phase outlasts this unnoticed by more than itself; none at all: never wake.
        let step = [
            self.ceilings.statement,
            self.ceilings.idle_in_transaction,
            self.ceilings.client_idle,
        ]
        .into_iter()
        .flatten()
        .min();
        match step {
            None => Either::Left(std::future::pending()),
            Some(step) => Either::Right(Box::pin(self.watch(step))),
        }
    }

    async fn watch(&self, step: Duration) -> Reached {
        loop {
            let (phase, since_micros) = self.clock.now();
            let since = self.clock.instant(since_micros);
            let limit = self.ceilings.of(phase);
            let already = phase == Phase::Busy
                && self.clock.cancelled.load(Ordering::Relaxed) == since_micros;
            let deadline = match limit {
                Some(limit) if !already => since + limit,
                _ => Instant::now() + step,
            };
            tokio::time::sleep_until(deadline.min(Instant::now() + step)).await;
            if self.clock.now() != (phase, since_micros) || already {
                continue;
            }
            let Some(limit) = limit else {
                continue;
            };
            if Instant::now() < since + limit {
                continue;
            }
            return match phase {
                Phase::Busy => {
                    self.clock.cancelled.store(since_micros, Ordering::Relaxed);
                    Reached::Statement
                }
                Phase::IdleInTransaction => Reached::IdleInTransaction(limit),
                Phase::Idle => Reached::ClientIdle(limit),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_phase_is_held_to_its_own_ceiling_and_a_statement_is_cancelled_once() {
        let ceilings = Ceilings {
            statement: Some(Duration::from_secs(10)),
            idle_in_transaction: Some(Duration::from_secs(3)),
            client_idle: Some(Duration::from_secs(60)),
        };
        let clock = PhaseClock::default();
        let dog = Watchdog::new(ceilings, &clock);
        clock.observe(Phase::Busy);
        let started = Instant::now();
        assert_eq!(dog.next().await, Reached::Statement);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // Still busy (the cancel has not landed): no second cancel; idle in a transaction
        // next, held to its own 3 s.
        let waiting = tokio::time::timeout(Duration::from_secs(5), dog.next()).await;
        assert!(waiting.is_err(), "cancelled twice");
        clock.observe(Phase::IdleInTransaction);
        let started = Instant::now();
        assert_eq!(
            dog.next().await,
            Reached::IdleInTransaction(Duration::from_secs(3))
        );
        assert!(started.elapsed() <= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn activity_moves_the_deadline_and_no_ceiling_never_fires() {
        let clock = PhaseClock::default();
        let none = Watchdog::new(Ceilings::default(), &clock);
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), none.next())
                .await
                .is_err()
        );
        let ceilings = Ceilings {
            client_idle: Some(Duration::from_secs(5)),
            ..Ceilings::default()
        };
        let dog = Watchdog::new(ceilings, &clock);
        clock.observe(Phase::Busy);
        clock.observe(Phase::Idle);
        let started = Instant::now();
        let fired = tokio::spawn(async move {
            // A transaction after 4 s restarts the idle count.
            tokio::time::sleep(Duration::from_secs(4)).await;
            started
        });
        let started_at = fired.await.unwrap();
        clock.observe(Phase::Busy);
        clock.observe(Phase::Idle);
        assert_eq!(
            dog.next().await,
            Reached::ClientIdle(Duration::from_secs(5))
        );
        assert_eq!(started_at.elapsed(), Duration::from_secs(9));
    }
}
