//! `/readyz`: whether a load balancer should send clients here. Ready means accepting (not
//! draining for a shutdown) and able to log clients in: the registry answers, or it stopped
//! answering less than the stale window ago (cached tenants are still served). It must not
//! probe the registry more than once at a time: concurrent probes share one answer.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Sources;
use crate::registry::Registry;

/// The last registry probe that succeeded, and when the outage (if any) began.
pub struct Readiness {
    registry: Registry,
    draining: CancellationToken,
    stale_window: Duration,
    timeout: Duration,
    /// When the registry last answered.
    last_answer: Mutex<Instant>,
}

/// A `/readyz` answer: ready or not, and why (the response body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ready: bool,
    pub reason: String,
}

impl Readiness {
    pub fn new(sources: &Sources) -> Readiness {
        Readiness {
            registry: sources.registry.clone(),
            draining: sources.draining.clone(),
            stale_window: sources.stale_window,
            timeout: sources.registry_timeout,
            // The proxy only starts after reaching the registry.
            last_answer: Mutex::new(Instant::now()),
        }
    }

    pub async fn check(&self) -> Verdict {
        if self.draining.is_cancelled() {
            return Verdict {
                ready: false,
                reason: "draining: tenantgate is shutting down and accepts no new clients".into(),
            };
        }
        let mut last_answer = self.last_answer.lock().await;
        let probe = tokio::time::timeout(self.timeout, self.registry.ping()).await;
        let error = match probe {
            Ok(Ok(())) => {
                *last_answer = Instant::now();
                return Verdict {
                    ready: true,
                    reason: "ready".into(),
                };
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        let down_for = last_answer.elapsed();
        if down_for < self.stale_window {
            return Verdict {
                ready: true,
                reason: format!(
                    "ready: the registry has not answered for {}s ({error}); cached tenants are served for up to {}s",
                    down_for.as_secs(),
                    self.stale_window.as_secs()
                ),
            };
        }
        Verdict {
            ready: false,
            reason: format!(
                "the registry has not answered for {}s, longer than its stale window ({}s): {error}",
                down_for.as_secs(),
                self.stale_window.as_secs()
            ),
        }
    }
}
