//! PAUSE and RESUME (without TENANT): the pool map's pause gate, for every tenant or one.
//! PAUSE waits, saying so every few seconds, until the paused tenants' clients have given their
//! backends back. This module must not hold the gate's state (`pool` does) nor end sessions.

use super::AdminContext;
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
    let mut last_said = None;
    loop {
        let mut active = 0;
        for (pool_slug, pool, _) in ctx.pools.list().await {
            if slug.is_none_or(|s| *s == pool_slug) {
                active += pool.active();
            }
        }
        if active == 0 {
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

/// RESUME: open the gate PAUSE closed, for every tenant or one.
pub(super) async fn resume(
    ctx: &AdminContext,
    actor: &str,
    slug: Option<&TenantSlug>,
) -> Result<Outcome, AdminError> {
    ctx.pools
        .pause_gate()
        .resume(slug)
        .map_err(|e| AdminError::WrongState(e.to_string()))?;
    log(ctx, slug, actor, "admin.resume_pause", None).await;
    Ok(Outcome::Done("RESUME"))
}
