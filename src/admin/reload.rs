//! RELOAD (the admin command, and SIGHUP through `admin::reload`): re-read the config file,
//! the master key file and the TLS files, apply what can change live, and diff the old config
//! against the new one key by key, saying which changes applied and which need a restart. A
//! broken file changes nothing. This module must not touch sessions or pools beyond handing
//! the pool map its new settings.

use super::AdminContext;
use super::catalog;
use super::error::AdminError;
use super::exec::{Progress, log};
use super::table::{Column, ColumnType, Table, Value};
use crate::config::Config;
use crate::tls::TlsServer;

pub(super) fn reload_columns() -> Vec<Column> {
    vec![
        Column::new("key", ColumnType::Text),
        Column::new("old", ColumnType::Text),
        Column::new("new", ColumnType::Text),
        Column::new("applied", ColumnType::Bool),
    ]
}

/// `[proxy]` keys that new clients read from the running config.
const LIVE_PROXY_KEYS: [&str; 5] = [
    "proxy.proxy_protocol_from",
    "proxy.login_timeout_ms",
    "proxy.max_startup_packet_bytes",
    "proxy.max_message_bytes",
    "proxy.suspend_grace_seconds",
];

/// Whether a changed key takes effect without a restart.
fn applies_live(key: &str) -> bool {
    (key.starts_with("pool.") && key != "pool.max_pools" && key != "pool.pool_idle_timeout_seconds")
        || key.starts_with("plans.")
        || key.starts_with("provision.")
        || LIVE_PROXY_KEYS.contains(&key)
        || key.starts_with("tls.")
}

/// Reads and validates the config file, applies the command line's overrides over it (as at
/// start) and builds the TLS setup it names, off the async threads.
async fn read_config(
    path: std::path::PathBuf,
    overrides: crate::config::Overrides,
) -> Result<(Config, TlsServer), AdminError> {
    tokio::task::spawn_blocking(move || {
        let mut fresh = Config::load(&path).map_err(|e| e.to_string())?;
        overrides.apply(&mut fresh);
        // Built here, once more than Config::load's check, so what is served is what was
        // just read even if the files change again meanwhile.
        let tls = TlsServer::from_config(&fresh.tls)
            .map_err(|e| format!("{}: {}: {e}", path.display(), e.config_key()))?;
        Ok::<_, String>((fresh, tls))
    })
    .await
    .map_err(|e| AdminError::WrongState(format!("reading the config failed: {e}")))?
    .map_err(|e| {
        AdminError::BadValue(format!(
            "the config was not reloaded (the running config and certificate stay): {e}"
        ))
    })
}

/// RELOAD (and SIGHUP): re-reads and validates the config file and the TLS certificate, key
/// and client CA files, applies what can change live and lists every changed key with whether
/// it applied or needs a restart; a new certificate shows as `tls.certificate` (its SHA-256).
/// A broken file, TLS files included, changes nothing: the old certificate keeps serving.
pub(super) async fn reload_config(
    ctx: &AdminContext,
    actor: &str,
    progress: &Progress,
) -> Result<Table, AdminError> {
    let current = ctx.config.get();
    let Some(path) = current.source.clone() else {
        return Err(AdminError::WrongState(
            "tenantgate was not started from a config file; there is nothing to reload".to_owned(),
        ));
    };
    let (fresh, tls) = read_config(path.clone(), current.overrides.clone()).await?;
    // The master keys: a rotation by another instance or the CLI is picked up here. A key
    // file that does not parse stops the reload with nothing changed.
    let ring_before = ctx.key.ring();
    let key = ctx.key.clone();
    let ring_after = tokio::task::spawn_blocking(move || key.reload())
        .await
        .map_err(|e| AdminError::WrongState(format!("reading the master keys failed: {e}")))?
        .map_err(|e| AdminError::BadValue(format!("the config was not reloaded: {e}")))?;
    let mut next = (*current).clone();
    next.pool = fresh.pool.clone();
    next.pool.max_pools = current.pool.max_pools;
    next.pool.pool_idle_timeout_seconds = current.pool.pool_idle_timeout_seconds;
    next.plans = fresh.plans.clone();
    next.provision = fresh.provision.clone();
    next.proxy.login_timeout_ms = fresh.proxy.login_timeout_ms;
    next.proxy.max_startup_packet_bytes = fresh.proxy.max_startup_packet_bytes;
    next.proxy.max_message_bytes = fresh.proxy.max_message_bytes;
    next.proxy.suspend_grace_seconds = fresh.proxy.suspend_grace_seconds;
    next.proxy.proxy_protocol_from = fresh.proxy.proxy_protocol_from.clone();
    next.tls = fresh.tls.clone();

    let before: std::collections::BTreeMap<String, String> =
        catalog::flat_config(&current).into_iter().collect();
    let after: std::collections::BTreeMap<String, String> =
        catalog::flat_config(&fresh).into_iter().collect();
    let mut table = Table::new(reload_columns());
    let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for key in keys {
        let (old, new) = (before.get(key), after.get(key));
        if old == new {
            continue;
        }
        table.rows.push(vec![
            Value::text(key.clone()),
            Value::opt_text(old.cloned()),
            Value::opt_text(new.cloned()),
            Value::Bool(applies_live(key)),
        ]);
    }
    let describe = |ring: &crate::crypto::KeyRing| {
        format!("{} key(s), current {}", ring.len(), ring.current_id())
    };
    let (keys_before, keys_after) = (describe(&ring_before), describe(&ring_after));
    if keys_before != keys_after {
        table.rows.push(vec![
            Value::text("secrets.master_keys"),
            Value::text(keys_before),
            Value::text(keys_after),
            Value::Bool(true),
        ]);
    }
    let old_tls = ctx.tls.current();
    if old_tls.fingerprint() != tls.fingerprint() {
        table.rows.push(vec![
            Value::text("tls.certificate"),
            Value::opt_text(old_tls.fingerprint().map(|f| format!("sha256:{f}"))),
            Value::opt_text(tls.fingerprint().map(|f| format!("sha256:{f}"))),
            Value::Bool(true),
        ]);
    }
    ctx.pools.reconfigure(&next.pool, &next.plans);
    ctx.config.set(next);
    // New handshakes use the new certificate; sessions established under the old one keep it.
    ctx.tls.replace(tls);
    let restart = table
        .rows
        .iter()
        .filter(|r| r[3] == Value::Bool(false))
        .count();
    progress.say(format!(
        "reloaded {}: {} change(s), {restart} of them need a restart",
        path.display(),
        table.rows.len()
    ));
    log(
        ctx,
        None,
        actor,
        "admin.reload",
        Some(&format!("{} changes", table.rows.len())),
    )
    .await;
    Ok(table)
}
