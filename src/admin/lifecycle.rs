//! A tenant's lifecycle from the console: CREATE and REGISTER TENANT, SUSPEND, RESUME, KILL,
//! DROP TENANT, and MIGRATE TENANT / MIGRATE ALL TENANTS (one row per tenant). The work is
//! `provision`'s; this module checks the arguments, passes the servers' budgets, tells live
//! sessions what changed (directory invalidation, kills, on this instance and through
//! `broadcast` on every other) and records the action. It must not run provisioning SQL itself.

use super::AdminContext;
use super::broadcast::{self, Order};
use super::command::{Arg, Command};
use super::error::AdminError;
use super::exec::{Outcome, Progress, known_slug, log};
use super::table::{Column, ColumnType, Table, Value};
use crate::crypto::Secret;
use crate::provision::{self, CreateTenant, RegisterTenant};
use crate::registry::TenantState;

/// CREATE TENANT and REGISTER TENANT.
pub(super) async fn provision_command(
    ctx: &AdminContext,
    actor: &str,
    command: &Command,
    params: &[Option<String>],
    progress: &Progress,
) -> Result<Outcome, AdminError> {
    let arg = |a: &Arg| a.resolve(params);
    let opt = |a: &Option<Arg>| a.as_ref().map(|a| a.resolve(params)).transpose();
    match command {
        Command::CreateTenant {
            slug,
            name,
            plan,
            server,
        } => {
            let slug = arg(slug)?;
            let options = CreateTenant {
                display_name: opt(name)?,
                server: opt(server)?,
                plan: opt(plan)?,
                budgets: Some(budgets(ctx)),
            };
            if let Some(plan) = options.plan.as_deref() {
                super::plans::check_plan(ctx, plan)?;
            }
            progress.say(format!("provisioning tenant {slug}"));
            let record = provision::create_tenant(
                ctx.config.get().provisioning(),
                &ctx.registry,
                &ctx.key,
                &slug,
                &options,
            )
            .await?;
            log(ctx, Some(&record.slug), actor, "admin.create_tenant", None).await;
            progress.say(format!(
                "tenant {} is {}: database {} on server {}",
                record.slug, record.state, record.database, record.server
            ));
            Ok(Outcome::Done("CREATE TENANT"))
        }
        Command::RegisterTenant {
            slug,
            database,
            role,
            password,
            server,
        } => {
            let (slug, database, role) = (arg(slug)?, arg(database)?, arg(role)?);
            let password = Secret::from(arg(password)?);
            let server = opt(server)?;
            let record = provision::register_tenant(
                ctx.config.get().provisioning(),
                &ctx.registry,
                &ctx.key,
                &RegisterTenant {
                    slug: &slug,
                    server: server.as_deref(),
                    database: &database,
                    role: &role,
                    password: &password,
                },
            )
            .await?;
            log(
                ctx,
                Some(&record.slug),
                actor,
                "admin.register_tenant",
                None,
            )
            .await;
            Ok(Outcome::Done("REGISTER TENANT"))
        }
        _ => Err(AdminError::Unsupported("this command".to_owned())),
    }
}

/// SUSPEND, RESUME, KILL and DROP of tenants.
pub(super) async fn tenant_command(
    ctx: &AdminContext,
    actor: &str,
    command: &Command,
    params: &[Option<String>],
    progress: &Progress,
) -> Result<Outcome, AdminError> {
    let arg = |a: &Arg| a.resolve(params);
    match command {
        Command::SuspendTenant { slug, force } => {
            let slug = known_slug(ctx, &arg(slug)?).await?;
            provision::set_state(&ctx.registry, slug.as_str(), TenantState::Suspended).await?;
            ctx.directory.invalidate(&slug).await;
            log(
                ctx,
                Some(&slug),
                actor,
                "admin.suspend",
                force.then_some("force"),
            )
            .await;
            if *force {
                let n = ctx.clients.kill_tenant(&slug);
                progress.say(format!("disconnected {n} client(s) of tenant {slug}"));
                disconnect_elsewhere(ctx, actor, &slug, progress).await;
            } else {
                progress.say(format!(
                    "new connections to tenant {slug} are refused; connected clients are \
                     disconnected within {} s",
                    ctx.config.get().proxy.suspend_grace_seconds
                ));
            }
            Ok(Outcome::Done("SUSPEND TENANT"))
        }
        Command::ResumeTenant { slug } => {
            let slug = known_slug(ctx, &arg(slug)?).await?;
            let record = ctx.registry.tenant(&slug).await?;
            if record.as_ref().map(|r| r.state) != Some(TenantState::Suspended) {
                let state = record.map_or("gone".to_owned(), |r| r.state.to_string());
                return Err(AdminError::WrongState(format!(
                    "tenant \"{slug}\" is {state}, not suspended"
                )));
            }
            provision::set_state(&ctx.registry, slug.as_str(), TenantState::Active).await?;
            ctx.directory.invalidate(&slug).await;
            log(ctx, Some(&slug), actor, "admin.resume", None).await;
            Ok(Outcome::Done("RESUME TENANT"))
        }
        Command::Kill { slug } => {
            let slug = known_slug(ctx, &arg(slug)?).await?;
            let n = ctx.clients.kill_tenant(&slug);
            log(ctx, Some(&slug), actor, "admin.kill", Some(&n.to_string())).await;
            progress.say(format!("disconnected {n} client(s) of tenant {slug}"));
            disconnect_elsewhere(ctx, actor, &slug, progress).await;
            Ok(Outcome::Done("KILL"))
        }
        Command::DropTenant { slug, on_drop } => {
            let slug = known_slug(ctx, &arg(slug)?).await?;
            progress.say(format!("dropping tenant {slug}"));
            // Marked deleted first; its clients go now rather than after the grace period.
            let result = provision::drop_tenant(
                ctx.config.get().provisioning(),
                &ctx.registry,
                slug.as_str(),
                *on_drop,
                Some(&budgets(ctx)),
            )
            .await;
            ctx.directory.invalidate(&slug).await;
            let n = ctx.clients.kill_tenant(&slug);
            disconnect_elsewhere(ctx, actor, &slug, progress).await;
            let dropped = result?;
            let detail = (!dropped).then_some("database kept");
            log(ctx, Some(&slug), actor, "admin.drop_tenant", detail).await;
            progress.say(format!(
                "tenant {slug} is deleted; {n} client(s) disconnected"
            ));
            Ok(Outcome::Done("DROP TENANT"))
        }
        _ => Err(AdminError::Unsupported("this command".to_owned())),
    }
}

/// Has every other instance disconnect the tenant's clients (and re-read its record).
async fn disconnect_elsewhere(
    ctx: &AdminContext,
    actor: &str,
    slug: &crate::registry::TenantSlug,
    progress: &Progress,
) {
    let order = Order::Disconnect {
        tenant: slug.as_str().to_owned(),
    };
    broadcast::everywhere(ctx, actor, order, progress).await;
}

/// MIGRATE TENANT and MIGRATE ALL TENANTS: one row per tenant, progress as NOTICEs.
pub(super) async fn migrate_command(
    ctx: &AdminContext,
    actor: &str,
    command: &Command,
    params: &[Option<String>],
    progress: &Progress,
) -> Result<Outcome, AdminError> {
    let arg = |a: &Arg| a.resolve(params);
    match command {
        Command::MigrateTenant { slug } => {
            let slug = known_slug(ctx, &arg(slug)?).await?;
            let result = provision::migrate_tenant(
                ctx.config.get().provisioning(),
                &ctx.registry,
                &ctx.key,
                slug.as_str(),
                Some(&budgets(ctx)),
            )
            .await;
            log(ctx, Some(&slug), actor, "admin.migrate", None).await;
            let mut table = Table::new(migrate_columns());
            table.rows.push(migrate_row(slug.as_str(), &Ok(result?)));
            Ok(Outcome::Rows(table))
        }
        Command::MigrateAll { concurrency } => {
            let concurrency = match concurrency {
                Some(a) => Some(parse_concurrency(&arg(a)?)?),
                None => None,
            };
            let budgets = budgets(ctx);
            let reporter = progress.clone();
            let results = provision::migrate_all(
                ctx.config.get().provisioning(),
                &ctx.registry,
                &ctx.key,
                provision::MigrateAll {
                    concurrency,
                    budgets: Some(&budgets),
                },
                move |p: provision::MigrateProgress| {
                    reporter.say(format!(
                        "migrated {}/{} tenants, {} failed",
                        p.done, p.total, p.failed
                    ));
                },
            )
            .await?;
            let detail = format!("{} tenants", results.len());
            log(ctx, None, actor, "admin.migrate_all", Some(&detail)).await;
            let mut table = Table::new(migrate_columns());
            for r in &results {
                table.rows.push(migrate_row(r.slug.as_str(), &r.result));
            }
            Ok(Outcome::Rows(table))
        }
        _ => Err(AdminError::Unsupported("this command".to_owned())),
    }
}

pub(super) fn migrate_columns() -> Vec<Column> {
    vec![
        Column::new("tenant", ColumnType::Text),
        Column::new("status", ColumnType::Text),
        Column::new("applied", ColumnType::Int8),
        Column::new("version", ColumnType::Int8),
        Column::new("error", ColumnType::Text),
    ]
}

fn migrate_row(slug: &str, result: &Result<provision::MigrateOutcome, String>) -> Vec<Value> {
    match result {
        Ok(outcome) => vec![
            Value::text(slug),
            Value::text("ok"),
            Value::count(outcome.applied.len() as u64),
            outcome
                .schema_version
                .map_or(Value::Null, |v| Value::Int(i64::from(v))),
            Value::Null,
        ],
        Err(message) => vec![
            Value::text(slug),
            Value::text("failed"),
            Value::Int(0),
            Value::Null,
            Value::text(message.clone()),
        ],
    }
}

fn parse_concurrency(text: &str) -> Result<usize, AdminError> {
    text.parse::<usize>()
        .ok()
        .filter(|n| (1..=256).contains(n))
        .ok_or_else(|| {
            AdminError::BadValue(format!("CONCURRENCY must be between 1 and 256, not {text}"))
        })
}

/// The servers' budgets, for the backend connections provisioning and migrations open.
fn budgets(ctx: &AdminContext) -> provision::Budgets {
    provision::Budgets::new(
        ctx.pools
            .servers()
            .iter()
            .filter_map(|s| ctx.pools.budget(&s.name).cloned()),
        std::time::Duration::from_millis(ctx.pools.config().checkout_timeout_ms),
    )
}
