//! PAUSE and RESUME (without TENANT): the pool map's pause gate, for every tenant or one, on
//! this instance and (through `broadcast`) every other. PAUSE waits, saying so every few
//! seconds, until the paused tenants' clients on this instance have given their backends back,
//! then up to a few seconds for the other instances to say theirs have. This module must not
//! hold the gate's state (`pool` does) nor end sessions.

use super::AdminContext;
use super::broadcast::{self, Order};
use super::error::AdminError;
use super::exec::{Outcome, Progress, log};
use crate::registry::TenantSlug;

/// How often PAUSE says what it is still waiting for.
const PAUSE_NOTICE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// PAUSE: close the gate, then wait until the paused tenants' running transactions (or, in
/// session pooling, sessions) have given their backends back.
pub(super) async fn pause(
    ctx: &AdminContext,
    actor: &str,
    slug: Option<&TenantSlug>,
    progress: &Progress,
) -> Result<Outcome, AdminError> {
    ctx.pools.pause_gate().pause(slug);
    log(ctx, slug, actor, "admin.pause", None).await;
    let order = Order::Pause {
        tenant: slug.map(|s| s.as_str().to_owned()),
    };
    // The other instances drain while this one does.
    let sent = broadcast::send(ctx, actor, order, progress).await;
    let mut last_said = None;
    loop {
        let active = active(ctx, slug).await;
        if active == 0 {
            if let Some(sent) = sent {
                sent.collect(progress).await;
            }
            return Ok(Outcome::Done("PAUSE"));
        }
        let due = last_said.is_none_or(|t: tokio::time::Instant| t.elapsed() >= PAUSE_NOTICE_EVERY);
        if due {
            progress.say(format!(
                "waiting for {active} client(s) to give their backend back"
            ));
            last_said = Some(tokio::time::Instant::now());
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// How many clients of the tenant (or of every tenant) hold a backend on this instance.
pub(super) async fn active(ctx: &AdminContext, slug: Option<&TenantSlug>) -> u32 {
    let mut active = 0;
    for (pool_slug, pool, _) in ctx.pools.list().await {
        if slug.is_none_or(|s| *s == pool_slug) {
            active += pool.active();
        }
    }
    active
}

/// RESUME: open the gate PAUSE closed, for every tenant or one, here and on every other
/// instance. Not paused here is an error only if no other instance resumed either (an
/// instance started after the PAUSE is not paused).
pub(super) async fn resume(
    ctx: &AdminContext,
    actor: &str,
    slug: Option<&TenantSlug>,
    progress: &Progress,
) -> Result<Outcome, AdminError> {
    let here = ctx.pools.pause_gate().resume(slug);
    let order = Order::Resume {
        tenant: slug.map(|s| s.as_str().to_owned()),
    };
    let elsewhere = broadcast::everywhere(ctx, actor, order, progress).await;
    match here {
        Ok(()) => {}
        Err(e) if elsewhere == 0 => return Err(AdminError::WrongState(e.to_string())),
        Err(e) => progress.say(format!("on this instance: {e}")),
    }
    log(ctx, slug, actor, "admin.resume_pause", None).await;
    Ok(Outcome::Done("RESUME"))
}
