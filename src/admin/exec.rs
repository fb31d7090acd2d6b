//! What each admin command does: read a virtual table, or run a lifecycle step through
//! `provision` and the registry, then tell live sessions (kill, suspend) what changed. Results
//! are tables or command tags; progress goes out as NOTICE text through [`Progress`]. This
//! module does not speak the wire protocol.

use super::AdminContext;
use super::catalog;
use super::command::{Arg, Command, ShowWhat};
use super::error::AdminError;
use super::select;
use super::table::{Column, ColumnType, Table, Value};
use crate::config::Config;
use crate::crypto::Secret;
use crate::provision::{self, CreateTenant, RegisterTenant};
use crate::registry::{TenantSlug, TenantState};
use crate::tls::TlsServer;

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
        Command::MigrateTenant { .. } | Command::MigrateAll { .. } => Ok(migrate_columns()),
        Command::Reload => Ok(reload_columns()),
        Command::RotateMasterKey => Ok(rotate_columns()),
        Command::RetireMasterKeys => Ok(retire_columns()),
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
            provision_command(ctx, actor, command, params, progress).await
        }
        Command::SetUser { .. } | Command::DropUser { .. } | Command::SetAdminUser { .. } => {
            super::users::user_command(ctx, actor, command, params).await
        }
        Command::TenantDomain { slug, domain, add } => {
            let (slug, domain) = (slug.resolve(params)?, domain.resolve(params)?);
            super::users::domain_command(ctx, actor, &slug, &domain, *add).await
        }
        Command::SuspendTenant { .. }
        | Command::ResumeTenant { .. }
        | Command::Kill { .. }
        | Command::DropTenant { .. } => tenant_command(ctx, actor, command, params, progress).await,
        Command::MigrateTenant { .. } | Command::MigrateAll { .. } => {
            migrate_command(ctx, actor, command, params, progress).await
        }
        Command::Reload => Ok(Outcome::Rows(reload_config(ctx, actor, progress).await?)),
        Command::RotateMasterKey => rotate_master_key(ctx, actor, progress).await,
        Command::RetireMasterKeys => retire_master_keys(ctx, actor, progress).await,
        Command::Pause { slug } => {
            let slug = match opt(slug)? {
                Some(text) => Some(known_slug(ctx, &text).await?),
                None => None,
            };
            pause(ctx, actor, slug.as_ref(), progress).await
        }
        Command::Unpause { slug } => {
            let slug = match opt(slug)? {
                Some(text) => Some(known_slug(ctx, &text).await?),
                None => None,
            };
            ctx.pools
                .pause_gate()
                .resume(slug.as_ref())
                .map_err(|e| AdminError::WrongState(e.to_string()))?;
            log(ctx, slug.as_ref(), actor, "admin.resume_pause", None).await;
            Ok(Outcome::Done("RESUME"))
        }
    }
}

/// PAUSE: close the gate, then wait until the paused tenants' running transactions (or, in
/// session pooling, sessions) have given their backends back.
async fn pause(
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

fn reload_columns() -> Vec<Column> {
    vec![
        Column::new("key", ColumnType::Text),
        Column::new("old", ColumnType::Text),
        Column::new("new", ColumnType::Text),
        Column::new("applied", ColumnType::Bool),
    ]
}

/// `[proxy]` keys that new clients read from the running config.
const LIVE_PROXY_KEYS: [&str; 4] = [
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

fn rotate_columns() -> Vec<Column> {
    vec![
        Column::new("key_id", ColumnType::Text),
        Column::new("reencrypted", ColumnType::Int8),
        Column::new("keys", ColumnType::Int8),
    ]
}

fn retire_columns() -> Vec<Column> {
    vec![
        Column::new("key_id", ColumnType::Text),
        Column::new("dropped", ColumnType::Int8),
        Column::new("secrets", ColumnType::Int8),
    ]
}

/// ROTATE MASTER KEY: as `tenantgate key rotate`, and this proxy's ring is swapped at once.
/// One row: the new key's id (never the key), secrets re-encrypted, keys in the file.
async fn rotate_master_key(
    ctx: &AdminContext,
    actor: &str,
    progress: &Progress,
) -> Result<Outcome, AdminError> {
    let done = crate::rekey::rotate(&ctx.registry, &ctx.key).await?;
    progress.say(format!(
        "master key rotated: new key id {}; RETIRE OLD MASTER KEYS once every instance has re-read the key file (RELOAD)",
        done.key_id
    ));
    let detail = format!(
        "key id {}, {} secrets re-encrypted",
        done.key_id, done.reencrypted
    );
    log(ctx, None, actor, "admin.rotate_master_key", Some(&detail)).await;
    let mut table = Table::new(rotate_columns());
    table.rows.push(vec![
        Value::text(done.key_id.to_string()),
        Value::count(u64::try_from(done.reencrypted).unwrap_or(u64::MAX)),
        Value::count(u64::try_from(done.keys).unwrap_or(u64::MAX)),
    ]);
    Ok(Outcome::Rows(table))
}

/// RETIRE OLD MASTER KEYS: as `tenantgate key retire`. One row: the key kept, keys dropped,
/// secrets checked.
async fn retire_master_keys(
    ctx: &AdminContext,
    actor: &str,
    progress: &Progress,
) -> Result<Outcome, AdminError> {
    let done = crate::rekey::retire(&ctx.registry, &ctx.key).await?;
    progress.say(format!(
        "{} old master key(s) dropped; key id {} stays",
        done.dropped, done.key_id
    ));
    let detail = format!("key id {}, {} old keys dropped", done.key_id, done.dropped);
    log(ctx, None, actor, "admin.retire_master_keys", Some(&detail)).await;
    let mut table = Table::new(retire_columns());
    table.rows.push(vec![
        Value::text(done.key_id.to_string()),
        Value::count(u64::try_from(done.dropped).unwrap_or(u64::MAX)),
        Value::count(u64::try_from(done.secrets).unwrap_or(u64::MAX)),
    ]);
    Ok(Outcome::Rows(table))
}

const PAUSE_NOTICE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// CREATE TENANT and REGISTER TENANT.
async fn provision_command(
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
            check_plan(ctx, options.plan.as_deref())?;
            progress.say(format!("provisioning tenant {slug}"));
            let record = provision::create_tenant(
                &ctx.config.get(),
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
                &ctx.config.get(),
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
async fn tenant_command(
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
            Ok(Outcome::Done("KILL"))
        }
        Command::DropTenant { slug, on_drop } => {
            let slug = known_slug(ctx, &arg(slug)?).await?;
            progress.say(format!("dropping tenant {slug}"));
            // Marked deleted first; its clients go now rather than after the grace period.
            let result = provision::drop_tenant(
                &ctx.config.get(),
                &ctx.registry,
                slug.as_str(),
                *on_drop,
                Some(&budgets(ctx)),
            )
            .await;
            ctx.directory.invalidate(&slug).await;
            let n = ctx.clients.kill_tenant(&slug);
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

/// MIGRATE TENANT and MIGRATE ALL TENANTS: one row per tenant, progress as NOTICEs.
async fn migrate_command(
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
                &ctx.config.get(),
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
                &ctx.config.get(),
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

/// A slug that names a tenant in the registry.
pub(super) async fn known_slug(ctx: &AdminContext, text: &str) -> Result<TenantSlug, AdminError> {
    let slug = TenantSlug::parse(text).ok_or_else(|| AdminError::NoSuchTenant(text.to_owned()))?;
    match ctx.registry.tenant(&slug).await? {
        Some(_) => Ok(slug),
        None => Err(AdminError::NoSuchTenant(text.to_owned())),
    }
}

fn check_plan(ctx: &AdminContext, plan: Option<&str>) -> Result<(), AdminError> {
    match plan {
        Some(p)
            if p != ctx.config.get().provision.default_plan
                && !ctx.config.get().plans.contains_key(p) =>
        {
            let config = ctx.config.get();
            let known: Vec<&str> = config.plans.keys().map(String::as_str).collect();
            Err(AdminError::BadValue(format!(
                "plan \"{p}\" is not in the config (known: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )))
        }
        _ => Ok(()),
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

fn migrate_columns() -> Vec<Column> {
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
