//! `tenantgate serve`: start the proxy, reload on SIGHUP, and stop on a signal: SIGTERM
//! drains (no new clients; connected ones get `[proxy] shutdown_grace_seconds` to finish
//! their work and leave, then the rest are closed with 57P01), SIGINT (Ctrl-C) stops at once
//! (every session closed with 57P01 now), also in the middle of a drain. SIGUSR2 hands the
//! clients that can move to a newer tenantgate on `[proxy] handover_socket`, then drains the
//! rest as SIGTERM does (or, when no newer process answers, logs why and goes on serving).
//! Under systemd it tells the service manager (`systemd`): ready, reloading, stopping.
//! The proxy itself is the library's `server::Proxy`; this file only wires it to the process's
//! signals and must not hold any of its set-up.

use std::time::Duration;

use tenantgate::clients::ClientRoster;
use tenantgate::config::Config;
use tenantgate::server::Proxy;
use tenantgate::signals::{ProcessSignal, Signals};

use super::systemd::Notifier;

/// How often a SIGINT during a drain closes the sessions that logged in since the last
/// sweep (a login in progress when the signal came joins the roster later).
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// How the process was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: drain within the grace.
    Drain,
    /// SIGINT: now.
    Now,
    /// SIGUSR2, and a newer process took the handover: drain what stays.
    HandedOver,
}

/// Serves until SIGINT, SIGTERM or a SIGUSR2 handover that a newer process took; SIGHUP
/// meanwhile does what the admin console's RELOAD does, the outcome in the log.
async fn serve_until_stop(signals: &mut Signals, proxy: &Proxy, notifier: &Notifier) -> Stop {
    loop {
        match signals.next().await {
            ProcessSignal::Interrupt => return Stop::Now,
            ProcessSignal::Terminate => return Stop::Drain,
            ProcessSignal::Hangup => {
                notifier.reloading();
                match proxy.reload("signal:SIGHUP").await {
                    Ok(summary) => tracing::info!("SIGHUP: {summary}"),
                    Err(e) => tracing::error!("SIGHUP: {e}"),
                }
                notifier.ready(&ready_status(proxy));
            }
            ProcessSignal::HandOver => match proxy.hand_over().await {
                Ok(()) => return Stop::HandedOver,
                Err(e) => tracing::error!("SIGUSR2: {e}; still serving"),
            },
        }
    }
}

pub(super) async fn run(config: Config) -> anyhow::Result<()> {
    let grace = Duration::from_secs(config.proxy.shutdown_grace_seconds);
    let mut signals = Signals::install()?;
    let notifier = Notifier::from_env();
    let proxy = tokio::select! {
        proxy = Box::pin(Proxy::start(config)) => proxy?,
        stop = signals.stop() => {
            tracing::info!(?stop, "stopped before the proxy was ready");
            return Ok(());
        }
    };
    notifier.ready(&ready_status(&proxy));
    match serve_until_stop(&mut signals, &proxy, &notifier).await {
        Stop::Now => {
            notifier.stopping("stopping: closing every session");
            tracing::info!("SIGINT: stopping now, closing every session");
            proxy.shutdown(Duration::ZERO).await;
        }
        Stop::Drain => {
            notifier.stopping("draining: no new clients, sessions finishing");
            tracing::info!(
                grace_seconds = grace.as_secs(),
                "SIGTERM: draining, no new clients; sessions still open after the grace \
                 are closed (SIGINT closes them now)"
            );
            drain(proxy, grace, &mut signals).await;
        }
        Stop::HandedOver => {
            notifier.stopping("handing clients over to a newer process");
            tracing::info!(
                grace_seconds = grace.as_secs(),
                "SIGUSR2: a newer tenantgate takes the clients that can move; the others \
                 finish here within the grace (SIGINT closes them now)"
            );
            drain(proxy, grace, &mut signals).await;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

fn ready_status(proxy: &Proxy) -> String {
    format!("accepting connections on {}", proxy.local_addr())
}

/// `Proxy::shutdown(grace)`, cut short by SIGINT: from then on every session on the roster
/// is stopped (57P01), as KILL does, so the drain ends as soon as their tasks do.
async fn drain(proxy: Proxy, grace: Duration, signals: &mut Signals) {
    let roster: ClientRoster = proxy.state().clients.clone();
    let shutdown = proxy.shutdown(grace);
    tokio::pin!(shutdown);
    tokio::select! {
        () = &mut shutdown => return,
        () = signals.interrupted() => {
            tracing::info!("SIGINT while draining: closing every session now");
        }
    }
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = sweep.tick() => {
                for client in roster.list() {
                    client.stop.cancel();
                }
            }
        }
    }
}
