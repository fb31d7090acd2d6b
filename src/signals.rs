//! The process signals tenantgate obeys, registered once before anything starts (a signal
//! during start-up is then handled, not the default death that left a half-started process
//! behind), and read as one stream of [`ProcessSignal`]s. `tenantgate serve` and the
//! quickstart decide what each one means; this module must not act on any.

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// A signal that arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessSignal {
    /// SIGINT (Ctrl-C): stop now.
    Interrupt,
    /// SIGTERM: drain, then stop.
    Terminate,
    /// SIGHUP: reload.
    Hangup,
    /// SIGUSR2: hand clients over to a newer process.
    HandOver,
}

/// The handlers, installed.
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
    user2: Signal,
}

impl Signals {
    pub fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("handling SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("handling SIGTERM")?,
            hangup: signal(SignalKind::hangup()).context("handling SIGHUP")?,
            user2: signal(SignalKind::user_defined2()).context("handling SIGUSR2")?,
        })
    }

    /// The next signal. Cancel-safe.
    pub async fn next(&mut self) -> ProcessSignal {
        tokio::select! {
            _ = self.interrupt.recv() => ProcessSignal::Interrupt,
            _ = self.terminate.recv() => ProcessSignal::Terminate,
            _ = self.hangup.recv() => ProcessSignal::Hangup,
            _ = self.user2.recv() => ProcessSignal::HandOver,
        }
    }

    /// The next SIGINT or SIGTERM (others meanwhile are ignored): `Interrupt` or `Terminate`.
    pub async fn stop(&mut self) -> ProcessSignal {
        tokio::select! {
            _ = self.interrupt.recv() => ProcessSignal::Interrupt,
            _ = self.terminate.recv() => ProcessSignal::Terminate,
        }
    }

    /// The next SIGINT (a drain cut short).
    pub async fn interrupted(&mut self) {
        self.interrupt.recv().await;
    }
}
