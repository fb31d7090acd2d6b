//! What each admin command does, at the top: the dispatch from a parsed [`Command`] to the
//! file that runs it (SHOW and SELECT read a virtual table here; `lifecycle`, `users`, `plans`,
//! `reload`, `keys` and `pause` run the rest; `broadcast` sends RELOAD on to the other instances), the result columns a command announces before it runs, and
//! what those files share: [`Outcome`], [`Progress`] (NOTICE text while a command runs),
//! [`known_slug`] and [`log`] (the activity log). This module does not speak the wire protocol
//! and must not grow a command's body: that goes beside its kind.

use super::AdminContext;
use super::catalog;
use super::command::{Arg, Command, ShowWhat};
use super::error::AdminError;
use super::table::{Column, Table};
use super::{broadcast, keys, lifecycle, pause, plans, reload, select, users};
use crate::registry::TenantSlug;

/// What a command produced.
#[derive(Debug)]
pub(super) enum Outcome {
    Rows(Table),
    Done(&'static str),
    Empty,
}

/// Sends NOTICE lines to the admin client while a command runs.
#[derive(Debug, Clone)]
pub(super) struct Progress(tokio::sync::mpsc::UnboundedSender<String>);

impl Progress {
    pub(super) fn new(sender: tokio::sync::mpsc::UnboundedSender<String>) -> Progress {
        Progress(sender)
    }

    pub(super) fn say(&self, text: impl Into<String>) {
        // The client may have gone; the command still finishes.
        drop(self.0.send(text.into()));
    }
}

/// The columns a command returns (empty for commands that return none), without running it.
pub(super) fn result_columns(command: &Command) -> Result<Vec<Column>, AdminError> {
    match command {
        Command::Show { what, .. } => catalog::columns(show_table(*what)),
        Command::Select(query) => {
            // Without rows WHERE never runs; a SELECT without FROM evaluates its one row with
            // every parameter unknown (NULL). Either way only the columns are kept.
            let probe = match select::table_name(query)? {
                Some(name) => Table::new(catalog::columns(&name)?),
                None => no_table(),
            };
            Ok(select::run(query, &probe, &vec![None; 100])?.columns)
        }
        Command::MigrateTenant { .. } | Command::MigrateAll { .. } => {
            Ok(lifecycle::migrate_columns())
        }
        Command::Reload => Ok(reload::reload_columns()),
        Command::RotateMasterKey => Ok(keys::rotate_columns()),
        Command::RetireMasterKeys => Ok(keys::retire_columns()),
        _ => Ok(Vec::new()),
    }
}

/// A SELECT without FROM reads one row of no columns.
fn no_table() -> Table {
    let mut t = Table::new(Vec::new());
    t.rows.push(Vec::new());
    t
}

fn show_table(what: ShowWhat) -> &'static str {
    match what {
        ShowWhat::Help => "help",
        ShowWhat::Tenants => "tenants",
        ShowWhat::Pools => "pools",
        ShowWhat::Clients => "clients",
        ShowWhat::Servers => "servers",
        ShowWhat::Stats => "stats",
        ShowWhat::Config => "config",
        ShowWhat::Version => "version",
        ShowWhat::Activity => "activity",
        ShowWhat::Migrations => "migrations",
        ShowWhat::Domains => "domains",
        ShowWhat::Plans => "plans",
        ShowWhat::Instances => "instances",
    }
}

/// Runs one command.
pub(super) async fn execute(
    ctx: &AdminContext,
    actor: &str,
    command: &Command,
    params: &[Option<String>],
    progress: &Progress,
) -> Result<Outcome, AdminError> {
    let opt = |a: &Option<Arg>| a.as_ref().map(|a| a.resolve(params)).transpose();
    match command {
        Command::Empty => Ok(Outcome::Empty),
        Command::Ignored(tag) => Ok(Outcome::Done(tag)),
        Command::Show { what, tenant } => {
            let tenant = opt(tenant)?;
            let table = catalog::load(ctx, show_table(*what), tenant.as_deref()).await?;
            if *what == ShowWhat::Tenants && table.rows.is_empty() {
                if let Some(slug) = tenant {
                    return Err(AdminError::NoSuchTenant(slug));
                }
            }
            Ok(Outcome::Rows(table))
        }
        Command::Select(query) => {
            let source = match select::table_name(query)? {
                Some(name) => catalog::load(ctx, &name, None).await?,
                None => no_table(),
            };
            Ok(Outcome::Rows(select::run(query, &source, params)?))
        }
        Command::CreateTenant { .. } | Command::RegisterTenant { .. } => {
            lifecycle::provision_command(ctx, actor, command, params, progress).await
        }
        Command::SetUser { .. } | Command::DropUser { .. } | Command::SetAdminUser { .. } => {
            users::user_command(ctx, actor, command, params).await
        }
        Command::SetPlan { .. } | Command::SetOverrides { .. } | Command::ResetOverrides { .. } => {
            plans::plan_command(ctx, actor, command, params).await
        }
        Command::TenantDomain { slug, domain, add } => {
            let (slug, domain) = (slug.resolve(params)?, domain.resolve(params)?);
            users::domain_command(ctx, actor, &slug, &domain, *add).await
        }
        Command::SuspendTenant { .. }
        | Command::ResumeTenant { .. }
        | Command::Kill { .. }
        | Command::DropTenant { .. } => {
            lifecycle::tenant_command(ctx, actor, command, params, progress).await
        }
        Command::MigrateTenant { .. } | Command::MigrateAll { .. } => {
            lifecycle::migrate_command(ctx, actor, command, params, progress).await
        }
        Command::Reload => {
            let table = reload::reload_config(ctx, actor, progress).await?;
            broadcast::everywhere(ctx, actor, broadcast::Order::Reload, progress).await;
            Ok(Outcome::Rows(table))
        }
        Command::RotateMasterKey => keys::rotate_master_key(ctx, actor, progress).await,
        Command::RetireMasterKeys => keys::retire_master_keys(ctx, actor, progress).await,
        Command::Pause { slug } => {
            let slug = match opt(slug)? {
                Some(text) => Some(known_slug(ctx, &text).await?),
                None => None,
            };
            pause::pause(ctx, actor, slug.as_ref(), progress).await
        }
        Command::Unpause { slug } => {
            let slug = match opt(slug)? {
                Some(text) => Some(known_slug(ctx, &text).await?),
                None => None,
            };
            pause::resume(ctx, actor, slug.as_ref(), progress).await
        }
    }
}

/// A slug that names a tenant in the registry.
pub(super) async fn known_slug(ctx: &AdminContext, text: &str) -> Result<TenantSlug, AdminError> {
    let slug = TenantSlug::parse(text).ok_or_else(|| AdminError::NoSuchTenant(text.to_owned()))?;
    match ctx.registry.tenant(&slug).await? {
        Some(_) => Ok(slug),
        None => Err(AdminError::NoSuchTenant(text.to_owned())),
    }
}

/// Records an admin action; a failure to log does not undo the action.
pub(super) async fn log(
    ctx: &AdminContext,
    slug: Option<&TenantSlug>,
    actor: &str,
    action: &str,
    detail: Option<&str>,
) {
    if let Err(e) = ctx.registry.log_activity(slug, actor, action, detail).await {
        tracing::warn!(error = %e, action, "writing the activity log failed");
    }
}
