//! The console's virtual tables, built on demand from live state (pools, budgets, connected
//! clients, the config) and from the registry (tenants, activity, migrations, plans, the live
//! instances). SHOW commands
//! and SELECTs read the same tables. Nothing here changes state, and no secret (backend
//! password, admin password, password in a URL) is ever put in a row.

use std::collections::HashMap;

use super::AdminContext;
use super::error::AdminError;
use super::select::version_string;
use super::table::{Column, ColumnType, Table, Value};
use crate::config::Config;
use crate::registry::TenantSlug;

/// The columns of a table, without gathering rows (Describe).
pub(super) fn columns(name: &str) -> Result<Vec<Column>, AdminError> {
    use ColumnType::{Bool, Int8, Text, Timestamptz};
    let c = Column::new;
    Ok(match name {
        "tenants" => vec![
            c("slug", Text),
            c("name", Text),
            c("state", Text),
            c("plan", Text),
            c("server", Text),
            c("database", Text),
            c("role", Text),
            c("schema_version", Int8),
            c("overrides", Text),
            c("error", Text),
            c("pool_loaded", Bool),
            c("created_at", Timestamptz),
            c("updated_at", Timestamptz),
        ],
        "pools" => vec![
            c("tenant", Text),
            c("server", Text),
            c("database", Text),
            c("mode", Text),
            c("pool_size", Int8),
            c("max_clients", Int8),
            c("clients", Int8),
            c("active", Int8),
            c("waiting", Int8),
            c("backends", Int8),
            c("idle", Int8),
            c("parked", Bool),
            c("paused", Bool),
        ],
        "clients" => vec![
            c("id", Int8),
            c("tenant", Text),
            c("user", Text),
            c("addr", Text),
            c("application_name", Text),
            c("mode", Text),
            c("connected_at", Timestamptz),
            c("tls", Text),
        ],
        "servers" => vec![
            c("name", Text),
            c("host", Text),
            c("port", Int8),
            c("budget", Int8),
            c("used", Int8),
            c("idle", Int8),
            c("waiting", Int8),
            c("pools", Int8),
        ],
        "stats" => super::usage::columns(),
        "activity" => vec![
            c("id", Int8),
            c("at", Timestamptz),
            c("tenant", Text),
            c("actor", Text),
            c("action", Text),
            c("detail", Text),
        ],
        "migrations" => vec![
            c("tenant", Text),
            c("version", Int8),
            c("name", Text),
            c("checksum", Text),
            c("applied_at", Timestamptz),
            c("duration_ms", Int8),
        ],
        "config" => vec![c("key", Text), c("value", Text)],
        "domains" => vec![c("domain", Text), c("tenant", Text)],
        "plans" => super::plans::columns(),
        "instances" => vec![
            c("id", Text),
            c("tag", Int8),
            c("address", Text),
            c("started_at", Timestamptz),
            c("last_heartbeat", Timestamptz),
            c("clients", Int8),
            c("backends", Int8),
            c("budget_share", Int8),
            c("version", Text),
            c("local", Bool),
        ],
        "help" => vec![c("command", Text), c("description", Text)],
        "version" => vec![c("version", Text)],
        other => return Err(AdminError::NoSuchTable(other.to_owned())),
    })
}

/// A table with its rows; `tenant` narrows the tables that have a tenant column.
pub(super) async fn load(
    ctx: &AdminContext,
    name: &str,
    tenant: Option<&str>,
) -> Result<Table, AdminError> {
    let mut table = Table::new(columns(name)?);
    table.rows = match name {
        "tenants" => tenants(ctx, tenant).await?,
        "pools" => pools(ctx, tenant).await,
        "clients" => clients(ctx, tenant),
        "servers" => servers(ctx).await,
        "stats" => super::usage::rows(ctx, tenant),
        "activity" => activity(ctx, tenant).await?,
        "migrations" => migrations(ctx, tenant).await?,
        "config" => config(ctx),
        "domains" => ctx
            .registry
            .domains()
            .await?
            .into_iter()
            .filter(|(_, t)| tenant.is_none_or(|want| want == t))
            .map(|(d, t)| vec![Value::text(d), Value::text(t)])
            .collect(),
        "plans" => super::plans::rows(ctx).await?,
        "instances" => instances(ctx).await?,
        "help" => help(),
        "version" => vec![vec![Value::text(version_string())]],
        other => return Err(AdminError::NoSuchTable(other.to_owned())),
    };
    Ok(table)
}

async fn tenants(ctx: &AdminContext, tenant: Option<&str>) -> Result<Vec<Vec<Value>>, AdminError> {
    let listing = ctx.registry.tenant_listing(tenant).await?;
    let mut rows = Vec::with_capacity(listing.len());
    for t in listing {
        let loaded = match TenantSlug::parse(&t.slug) {
            Some(slug) => ctx.pools.get(&slug).await.is_some(),
            None => false,
        };
        rows.push(vec![
            Value::text(t.slug),
            Value::opt_text(t.display_name),
            Value::text(t.state),
            Value::text(t.plan),
            Value::text(t.server),
            Value::text(t.database),
            Value::text(t.backend_role),
            t.schema_version
                .map_or(Value::Null, |v| Value::Int(i64::from(v))),
            Value::text(t.overrides),
            Value::opt_text(t.error_message),
            Value::Bool(loaded),
            Value::Time(t.created_at),
            Value::Time(t.updated_at),
        ]);
    }
    Ok(rows)
}

async fn pools(ctx: &AdminContext, tenant: Option<&str>) -> Vec<Vec<Value>> {
    let mut rows = Vec::new();
    for (slug, pool, parked) in ctx.pools.list().await {
        if tenant.is_some_and(|t| t != slug.as_str()) {
            continue;
        }
        let (open, idle) = pool.state();
        let limits = pool.limits();
        rows.push(vec![
            Value::text(slug.as_str()),
            Value::text(pool.target().server.clone()),
            Value::text(pool.target().database.clone()),
            Value::text(limits.mode.as_str()),
            Value::Int(i64::from(limits.pool_size)),
            Value::Int(i64::from(limits.max_clients)),
            Value::count(pool.clients() as u64),
            Value::Int(i64::from(pool.active())),
            Value::count(pool.waiting() as u64),
            Value::Int(i64::from(open)),
            Value::Int(i64::from(idle)),
            Value::Bool(parked),
            Value::Bool(ctx.pools.pause_gate().is_paused(&slug)),
        ]);
    }
    rows
}

fn clients(ctx: &AdminContext, tenant: Option<&str>) -> Vec<Vec<Value>> {
    ctx.clients
        .list()
        .into_iter()
        .filter(|c| tenant.is_none_or(|t| c.tenant.as_ref().is_some_and(|s| s.as_str() == t)))
        .map(|c| {
            vec![
                Value::count(c.id),
                Value::opt_text(c.tenant.map(|s| s.as_str().to_owned())),
                Value::text(c.user),
                Value::opt_text(c.addr.map(|a| a.to_string())),
                Value::text(c.application_name),
                Value::text(c.mode),
                Value::Time(c.connected_at),
                Value::text(c.tls),
            ]
        })
        .collect()
}

async fn servers(ctx: &AdminContext) -> Vec<Vec<Value>> {
    // (idle, waiting, pools) per server.
    let mut per_server: HashMap<String, (u64, u64, u64)> = HashMap::new();
    for (_, pool, _) in ctx.pools.list().await {
        let (_, idle) = pool.state();
        let entry = per_server.entry(pool.target().server.clone()).or_default();
        entry.0 += u64::from(idle);
        entry.1 += pool.waiting() as u64;
        entry.2 += 1;
    }
    ctx.pools
        .servers()
        .iter()
        .map(|s| {
            let (idle, waiting, pools) = per_server.get(&s.name).copied().unwrap_or_default();
            let used = ctx.pools.budget(&s.name).map_or(0, |b| b.in_use());
            vec![
                Value::text(s.name.clone()),
                Value::text(s.host.clone()),
                Value::Int(i64::from(s.port)),
                Value::Int(i64::from(s.max_connections)),
                Value::Int(i64::from(used)),
                Value::count(idle),
                Value::count(waiting),
                Value::count(pools),
            ]
        })
        .collect()
}

/// The live instances sharing the registry, as of their last heartbeat. `budget_share` is
/// each instance's share of the servers' budgets, summed over the servers (`instance::budget`).
async fn instances(ctx: &AdminContext) -> Result<Vec<Vec<Value>>, AdminError> {
    let ttl = ctx.config.get().instance.ttl();
    Ok(ctx
        .registry
        .live_instances(ttl)
        .await?
        .into_iter()
        .map(|i| {
            let local = i.id == ctx.instance_id;
            vec![
                Value::text(i.id),
                Value::Int(i64::from(i.tag)),
                Value::opt_text(i.address),
                Value::Time(i.started_at),
                Value::Time(i.heartbeat_at),
                Value::Int(i.clients),
                Value::Int(i.backends),
                i.budget.map_or(Value::Null, Value::Int),
                Value::text(i.version),
                Value::Bool(local),
            ]
        })
        .collect())
}

async fn activity(ctx: &AdminContext, tenant: Option<&str>) -> Result<Vec<Vec<Value>>, AdminError> {
    Ok(ctx
        .registry
        .activity(tenant)
        .await?
        .into_iter()
        .map(|a| {
            vec![
                Value::Int(a.id),
                Value::Time(a.at),
                Value::opt_text(a.tenant),
                Value::text(a.actor),
                Value::text(a.action),
                Value::opt_text(a.detail),
            ]
        })
        .collect())
}

async fn migrations(
    ctx: &AdminContext,
    tenant: Option<&str>,
) -> Result<Vec<Vec<Value>>, AdminError> {
    Ok(ctx
        .registry
        .migration_ledger(tenant)
        .await?
        .into_iter()
        .map(|m| {
            vec![
                Value::text(m.tenant),
                Value::Int(i64::from(m.version)),
                Value::text(m.name),
                Value::text(m.checksum),
                Value::Time(m.applied_at),
                Value::Int(m.duration_ms),
            ]
        })
        .collect())
}

/// The running config as `section.key = value` rows; secrets masked.
fn config(ctx: &AdminContext) -> Vec<Vec<Value>> {
    flat_config(&ctx.config.get())
        .into_iter()
        .map(|(k, v)| vec![Value::text(k), Value::text(v)])
        .collect()
}

/// A config as `section.key` → value text, secrets masked, sorted by key.
pub(super) fn flat_config(config: &Config) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    match toml::Value::try_from(config) {
        Ok(value) => flatten("", &value, &mut rows),
        Err(e) => rows.push(vec![Value::text("error"), Value::text(e.to_string())]),
    }
    let mut pairs: Vec<(String, String)> = rows
        .into_iter()
        .map(|r| (r[0].to_string(), r[1].to_string()))
        .collect();
    pairs.sort();
    pairs
}

fn flatten(prefix: &str, value: &toml::Value, rows: &mut Vec<Vec<Value>>) {
    match value {
        toml::Value::Table(table) => {
            for (k, v) in table {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, rows);
            }
        }
        toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
            for (i, item) in items.iter().enumerate() {
                // `server.main.host` reads better than `server.0.host`.
                let name = item
                    .get("name")
                    .and_then(toml::Value::as_str)
                    .map_or_else(|| i.to_string(), str::to_owned);
                flatten(&format!("{prefix}.{name}"), item, rows);
            }
        }
        other => {
            let shown = match other {
                toml::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            rows.push(vec![Value::text(prefix), Value::text(mask(prefix, &shown))]);
        }
    }
}

/// Hides passwords: values of keys that name one, and passwords inside connection strings.
fn mask(key: &str, value: &str) -> String {
    if key.contains("password") && !key.ends_with("_env") {
        return "********".to_owned();
    }
    if key.ends_with("url") {
        return mask_url(value);
    }
    value.to_owned()
}

/// A connection string (URL or key/value form) as SHOW CONFIG shows it: parsed, then written
/// back as key/value pairs from what was parsed, so no password can pass in any spelling
/// (`user:pw@`, `?password=`, `password = 'a b'`). One that does not parse is hidden whole.
fn mask_url(url: &str) -> String {
    use tokio_postgres::config::{Host, SslMode};
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "******** (not a valid connection string)".to_owned();
    };
    let mut parts = Vec::new();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    if !hosts.is_empty() {
        parts.push(format!("host={}", hosts.join(",")));
    }
    let port_list: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    if !port_list.is_empty() {
        parts.push(format!("port={}", port_list.join(",")));
    }
    if let Some(user) = config.get_user() {
        parts.push(format!("user={user}"));
    }
    if config.get_password().is_some() {
        parts.push("password=********".to_owned());
    }
    if let Some(dbname) = config.get_dbname() {
        parts.push(format!("dbname={dbname}"));
    }
    if let Some(name) = config.get_application_name() {
        parts.push(format!("application_name={name}"));
    }
    let sslmode = match config.get_ssl_mode() {
        SslMode::Disable => Some("disable"),
        SslMode::Require => Some("require"),
        // Prefer is the default; the enum is non-exhaustive.
        _ => None,
    };
    if let Some(mode) = sslmode {
        parts.push(format!("sslmode={mode}"));
    }
    parts.join(" ")
}

/// SHOW HELP's rows: (command, description).
const HELP: &[(&str, &str)] = &[
    ("SHOW HELP", "this list"),
    ("SHOW TENANTS | SHOW TENANT slug", "tenants in the registry"),
    (
        "SHOW POOLS [slug]",
        "this instance's live tenant pools: clients, active, waiting, backends",
    ),
    ("SHOW CLIENTS [slug]", "clients connected to this instance"),
    (
        "SHOW SERVERS",
        "backend servers: this instance's budget, used, idle, waiting",
    ),
    (
        "SHOW STATS [slug]",
        "this instance's per-tenant usage counters since start (tenant_usage sums every instance's)",
    ),
    ("SHOW CONFIG", "the running configuration (secrets masked)"),
    ("SHOW VERSION", "tenantgate's version"),
    ("SHOW ACTIVITY [slug]", "the activity log, newest first"),
    ("SHOW MIGRATIONS [slug]", "applied tenant migrations"),
    (
        "SHOW DOMAINS [slug]",
        "custom domains: a TLS server name that routes to a tenant",
    ),
    (
        "SHOW PLANS",
        "plans: the values a tenant on each gets before its own overrides, and its tenants",
    ),
    (
        "SHOW INSTANCES",
        "the tenantgate instances sharing the registry: address, heartbeat, clients, backends",
    ),
    (
        "SELECT ... FROM tenants|pools|clients|servers|stats|activity|migrations|config|domains|plans|instances",
        "read the same tables with WHERE, ORDER BY, LIMIT, count(*)",
    ),
    (
        "CREATE TENANT slug [WITH (name = '...', plan = '...', server = '...')]",
        "provision: role, database, migrations; retries a failed tenant",
    ),
    (
        "REGISTER TENANT slug DATABASE 'db' ROLE 'role' PASSWORD 'pw' [SERVER 'name']",
        "adopt an existing database",
    ),
    (
        "CREATE USER name FOR TENANT slug [PASSWORD 'pw' | 'SCRAM-SHA-256$...'] [AUTH scram|cert|cert+scram]",
        "add a tenant user (a SCRAM verifier, made here or given as is; AUTH cert: a client certificate with CN = name)",
    ),
    (
        "ALTER USER name FOR TENANT slug [PASSWORD 'pw'] [AUTH scram|cert|cert+scram]",
        "change a user's password or auth method",
    ),
    (
        "CREATE|ALTER ADMIN USER name [PASSWORD 'pw'] [AUTH scram|cert|cert+scram]",
        "add or change an admin user",
    ),
    (
        "ALTER TENANT slug SET PLAN 'name'",
        "move a tenant to another plan: its new clients get a pool built to it",
    ),
    (
        "ALTER TENANT slug SET (pool_size = 8, mode = 'transaction', ...) | RESET (key, ...) | RESET ALL",
        "set or drop the tenant's own values of single plan settings",
    ),
    (
        "ALTER TENANT slug ADD DOMAIN 'name' | DROP DOMAIN 'name'",
        "route TLS clients connecting to that server name to the tenant",
    ),
    ("DROP USER name FOR TENANT slug", "remove a tenant user"),
    (
        "SUSPEND TENANT slug [FORCE]",
        "refuse new connections (57P03); disconnect clients after the grace period, or at once (every instance)",
    ),
    ("RESUME TENANT slug", "accept connections again"),
    (
        "DROP TENANT slug [KEEP DATABASE]",
        "disconnect (on every instance), drop database and role (or keep them), mark deleted",
    ),
    ("MIGRATE TENANT slug", "apply pending tenant migrations"),
    (
        "MIGRATE ALL TENANTS [CONCURRENCY n]",
        "migrate every tenant, progress as NOTICEs, one row per tenant",
    ),
    (
        "KILL slug",
        "disconnect every client of a tenant now, on every instance",
    ),
    (
        "PAUSE [slug]",
        "hold new transactions (all tenants or one) on every instance; returns when running ones finished",
    ),
    ("RESUME [slug]", "undo PAUSE on every instance"),
    (
        "RELOAD",
        "every instance re-reads its config file, TLS files and master key file: [pool], plans, [provision], [tls] and some [proxy] keys apply now",
    ),
    (
        "ROTATE MASTER KEY",
        "new master key first in the key file, every stored secret re-encrypted under it",
    ),
    (
        "RETIRE OLD MASTER KEYS",
        "once every secret is under the current key: drop the old keys from the key file",
    ),
];

fn help() -> Vec<Vec<Value>> {
    HELP.iter()
        .map(|(command, description)| vec![Value::text(*command), Value::text(*description)])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            mask_url("postgres://tg:s3cret@localhost:5432/registry"),
            "host=localhost port=5432 user=tg password=******** dbname=registry"
        );
        assert_eq!(
            mask_url("host=x user=tg password=s3cret dbname=r"),
            "host=x user=tg password=******** dbname=r"
        );
        // Every spelling of a password is hidden (issue 13, item 10).
        for (url, secret) in [
            ("postgres://tg@localhost/registry?password=s3cret", "s3cret"),
            ("postgres://tg:p%40ss%3Aw0rd@localhost/registry", "w0rd"),
            ("host=x user=tg password = s3cret dbname=r", "s3cret"),
            (
                "host=x user=tg password='a s3cret phrase' dbname=r",
                "s3cret",
            ),
            ("host=x password=s3cret sslmode=require", "s3cret"),
            ("this is not a s3cret connection string", "s3cret"),
        ] {
            let shown = mask_url(url);
            assert!(!shown.contains(secret), "{url} shown as {shown}");
        }
        assert_eq!(
            mask_url("postgres://tg@localhost/registry?password=s3cret&sslmode=disable"),
            "host=localhost port=5432 user=tg password=******** dbname=registry sslmode=disable"
        );
        assert_eq!(mask("server.main.admin_password", "pw"), "********");
        assert_eq!(mask("server.main.admin_password_env", "PGPASS"), "PGPASS");
    }

    #[test]
    fn every_listed_table_has_columns() {
        const TABLES: [&str; 12] = [
            "domains",
            "plans",
            "tenants",
            "pools",
            "clients",
            "servers",
            "stats",
            "activity",
            "migrations",
            "config",
            "help",
            "version",
        ];
        for t in TABLES {
            assert!(columns(t).is_ok(), "{t}");
        }
    }
}
