//! `tenantgate serve`: start the proxy, reload on SIGHUP, drain and stop on Ctrl-C or SIGTERM.
//! The proxy itself is the library's `server::Proxy`; this file only wires it to the process's
//! signals and must not hold any of its set-up.

use std::time::Duration;

use tenantgate::config::Config;
use tenantgate::server::Proxy;

pub(super) async fn run(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let grace = Duration::from_secs(config.proxy.shutdown_grace_seconds);
    let proxy = Proxy::start(config).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => break r?,
            _ = term.recv() => break,
            _ = hangup.recv() => reload_on_sighup(&proxy).await,
        }
    }
    tracing::info!("shutting down");
    proxy.shutdown(grace).await;
    Ok(())
}

/// SIGHUP does what the admin console's RELOAD does; the outcome goes to the log.
async fn reload_on_sighup(proxy: &Proxy) {
    match proxy.reload("signal:SIGHUP").await {
        Ok(summary) => tracing::info!("SIGHUP: {summary}"),
        Err(e) => tracing::error!("SIGHUP: {e}"),
    }
}
