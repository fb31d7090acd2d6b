//! Plans from the console: ALTER TENANT slug SET PLAN 'name', SET (key = value, ...), RESET
//! (key, ...) / RESET ALL, and SHOW PLANS (each plan's values as a tenant on it gets them).
//! Plan names are checked against the running config, keys and values against the plan's
//! fields (`pool::override_value`); the registry row changes in one statement, which NOTIFYs
//! every instance. Running clients keep the pool they have; new clients get a pool built from
//! the new row (the pool map compares plan and overrides). This module must not build or
//! touch pools itself, and does not speak the wire protocol.

use super::AdminContext;
use super::command::Command;
use super::error::AdminError;
use super::exec::{Outcome, known_slug, log};
use super::table::{Column, ColumnType, Value};
use crate::pool::{TenantLimits, override_key, override_value, spellings};
use crate::registry::TenantSlug;

/// The columns of SHOW PLANS and the `plans` table.
pub(super) fn columns() -> Vec<Column> {
    use ColumnType::{Int8, Text};
    let c = Column::new;
    vec![
        c("plan", Text),
        c("pool_size", Int8),
        c("max_clients", Int8),
        c("mode", Text),
        c("statement_timeout_ms", Int8),
        c("checkout_timeout_ms", Int8),
        c("max_statement_ms", Int8),
        c("max_idle_in_transaction_ms", Int8),
        c("max_client_idle_ms", Int8),
        c("tenants", Int8),
    ]
}

/// One row per plan in the config, plus the default plan (`provision.default_plan`) when the
/// config has no section for it: the values a tenant on it gets before its own overrides
/// (`[pool]`, then the plan), and how many tenants are on it.
pub(super) async fn rows(ctx: &AdminContext) -> Result<Vec<Vec<Value>>, AdminError> {
    let config = ctx.config.get();
    let counts = ctx.registry.plan_counts().await?;
    let count = |plan: &str| {
        counts
            .iter()
            .find(|(p, _)| p == plan)
            .map_or(0, |(_, n)| *n)
    };
    let defaults = TenantLimits::from_defaults(&config.pool);
    let mut rows = Vec::with_capacity(config.plans.len() + 1);
    let default_plan = config.provision.default_plan.as_str();
    if !config.plans.contains_key(default_plan) {
        rows.push(row(default_plan, &defaults, count(default_plan)));
    }
    for (name, plan) in &config.plans {
        let mut limits = defaults.clone();
        limits.apply(plan);
        rows.push(row(name, &limits, count(name)));
    }
    Ok(rows)
}

fn row(name: &str, limits: &TenantLimits, tenants: i64) -> Vec<Value> {
    let millis = |ms: Option<u64>| ms.map_or(Value::Null, Value::count);
    vec![
        Value::text(name),
        Value::Int(i64::from(limits.pool_size)),
        Value::Int(i64::from(limits.max_clients)),
        Value::text(limits.mode.as_str()),
        millis(limits.statement_timeout_ms),
        Value::count(limits.checkout_timeout_ms),
        millis(limits.max_statement_ms),
        millis(limits.max_idle_in_transaction_ms),
        millis(limits.max_client_idle_ms),
        Value::Int(tenants),
    ]
}

/// A plan a tenant may be put on: one in the config, or the default plan (which may have no
/// section: its tenants get `[pool]`).
pub(super) fn check_plan(ctx: &AdminContext, plan: &str) -> Result<(), AdminError> {
    let config = ctx.config.get();
    if plan == config.provision.default_plan || config.plans.contains_key(plan) {
        return Ok(());
    }
    let mut known: Vec<&str> = config.plans.keys().map(String::as_str).collect();
    if !known.contains(&config.provision.default_plan.as_str()) {
        known.insert(0, &config.provision.default_plan);
    }
    Err(AdminError::UnknownPlan {
        plan: plan.to_owned(),
        known: known.join(", "),
    })
}

/// ALTER TENANT ... SET PLAN, SET (...), RESET (...).
pub(super) async fn plan_command(
    ctx: &AdminContext,
    actor: &str,
    command: &Command,
    params: &[Option<String>],
) -> Result<Outcome, AdminError> {
    let (slug, action, detail) = match command {
        Command::SetPlan { slug, plan } => {
            let slug = known_slug(ctx, &slug.resolve(params)?).await?;
            let plan = plan.resolve(params)?;
            check_plan(ctx, &plan)?;
            changed(&slug, ctx.registry.set_plan_name(&slug, &plan).await?)?;
            (slug, "tenant.plan", plan)
        }
        Command::SetOverrides { slug, values } => {
            let slug = known_slug(ctx, &slug.resolve(params)?).await?;
            let mut object = serde_json::Map::new();
            let mut replaced = Vec::new();
            for (key, value) in values {
                let (key, json) = override_value(key, &value.resolve(params)?)?;
                replaced.extend(spellings(key).into_iter().filter(|s| *s != key));
                object.insert(key.to_owned(), json);
            }
            let detail = object
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let json = serde_json::Value::Object(object).to_string();
            changed(
                &slug,
                ctx.registry
                    .merge_overrides(&slug, &json, &replaced)
                    .await?,
            )?;
            (slug, "tenant.set", detail)
        }
        Command::ResetOverrides { slug, keys } => {
            let slug = known_slug(ctx, &slug.resolve(params)?).await?;
            let (removed, detail) = match keys {
                Some(keys) => {
                    let mut all = Vec::new();
                    for key in keys {
                        all.extend(spellings(override_key(key)?));
                    }
                    let detail = keys.join(", ");
                    (Some(all), detail)
                }
                None => (None, "all".to_owned()),
            };
            let done = ctx
                .registry
                .remove_overrides(&slug, removed.as_deref())
                .await?;
            changed(&slug, done)?;
            (slug, "tenant.reset", detail)
        }
        _ => return Err(AdminError::Unsupported("this command".to_owned())),
    };
    // Do not wait for the NOTIFY: this instance's next client must see the change. Other
    // instances hear the registry's NOTIFY.
    ctx.directory.invalidate(&slug).await;
    log(ctx, Some(&slug), actor, action, Some(&detail)).await;
    Ok(Outcome::Done("ALTER TENANT"))
}

/// The tenant was there when looked up but the update found no row: dropped meanwhile.
fn changed(slug: &TenantSlug, updated: bool) -> Result<(), AdminError> {
    if updated {
        Ok(())
    } else {
        Err(AdminError::NoSuchTenant(slug.to_string()))
    }
}
