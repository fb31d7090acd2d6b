//! `tenantgate tenant ...`: create, register, list, suspend, resume, migrate and drop tenants,
//! through `provision` and the registry, with one result line (or table) on standard output.
//! The lifecycle itself is `provision`'s; this module must not hold any of it, only turn
//! arguments into its calls and its results into text.

use std::fmt::Write as _;
use std::io::Write as _;

use clap::Subcommand;
use tenantgate::config::Config;
use tenantgate::crypto::MasterKey;
use tenantgate::provision::{self, CreateTenant, DatabaseOnDrop, RegisterTenant};
use tenantgate::registry::{Registry, TenantState};

use super::open_registry;
use super::terminal::{read_password, say};

#[derive(Subcommand)]
pub(super) enum TenantCommand {
    /// Provision a tenant: a role and a database on a backend server, then mark it active.
    Create {
        slug: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// Backend server (a [[server]] name; default: the first).
        #[arg(long)]
        server: Option<String>,
        /// Plan name.
        #[arg(long)]
        plan: Option<String>,
    },
    /// Register a tenant for a database that already exists. The role's password is read
    /// from a prompt, or from standard input when it is not a terminal.
    Register {
        slug: String,
        #[arg(long)]
        database: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        server: Option<String>,
    },
    /// List tenants.
    List,
    /// Refuse new connections to a tenant (57P03).
    Suspend { slug: String },
    /// Accept connections to a suspended tenant again.
    Resume { slug: String },
    /// Apply pending tenant migrations ([provision] migrations_dir) to one tenant, or with
    /// --all to every active and suspended tenant. Exit code 1 if any tenant failed.
    Migrate {
        /// The tenant to migrate.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        slug: Option<String>,
        /// Migrate every active and suspended tenant.
        #[arg(long)]
        all: bool,
        /// Tenants migrated at once with --all (default: [provision] migrate_concurrency).
        #[arg(long, requires = "all", value_parser = clap::value_parser!(u16).range(1..=256))]
        concurrency: Option<u16>,
    },
    /// Mark a tenant deleted (its clients are disconnected), then drop its database and
    /// backend role.
    Drop {
        slug: String,
        /// Keep the database and the role; only mark the tenant deleted (the default for a
        /// tenant adopted by `tenant register`).
        #[arg(long, conflicts_with = "drop_database")]
        keep_database: bool,
        /// Drop the database and the role even of a registered tenant (one whose database
        /// tenantgate did not create).
        #[arg(long)]
        drop_database: bool,
    },
}

pub(super) async fn run(config: &Config, cmd: TenantCommand) -> anyhow::Result<()> {
    let registry = open_registry(config).await?;
    let setup = config.provisioning();
    match cmd {
        TenantCommand::Create {
            slug,
            name,
            server,
            plan,
        } => {
            let options = CreateTenant {
                display_name: name,
                server,
                plan,
                budgets: None,
            };
            create(config, &registry, &slug, &options).await
        }
        TenantCommand::Register {
            slug,
            database,
            role,
            server,
        } => {
            let key = MasterKey::load(&config.secrets)?;
            let password = read_password(&format!("Password of role {role}: "))?;
            let existing = RegisterTenant {
                slug: &slug,
                server: server.as_deref(),
                database: &database,
                role: &role,
                password: &password,
            };
            let t = provision::register_tenant(setup, &registry, &key, &existing).await?;
            say(&format!(
                "tenant {} registered for database {}",
                t.slug, t.database
            ))
        }
        TenantCommand::List => {
            let mut out = String::from("slug\tstate\tplan\tserver\tdatabase\tname\n");
            for t in registry.tenants().await? {
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    t.slug,
                    t.state,
                    t.plan,
                    t.server,
                    t.database,
                    t.display_name.unwrap_or_default()
                )?;
            }
            say(out.trim_end())
        }
        TenantCommand::Suspend { slug } => {
            provision::set_state(&registry, &slug, TenantState::Suspended).await?;
            say(&format!("tenant {slug} suspended"))
        }
        TenantCommand::Resume { slug } => {
            provision::set_state(&registry, &slug, TenantState::Active).await?;
            say(&format!("tenant {slug} active"))
        }
        TenantCommand::Migrate {
            slug: Some(slug), ..
        } => {
            let key = MasterKey::load(&config.secrets)?;
            let outcome = provision::migrate_tenant(setup, &registry, &key, &slug, None).await?;
            say(&describe_outcome(&slug, &outcome)?)
        }
        TenantCommand::Migrate {
            slug: None,
            concurrency,
            ..
        } => {
            let key = MasterKey::load(&config.secrets)?;
            migrate_all(config, &registry, &key, concurrency.map(usize::from)).await
        }
        TenantCommand::Drop {
            slug,
            keep_database,
            drop_database,
        } => {
            let on_drop = match (keep_database, drop_database) {
                (true, _) => DatabaseOnDrop::Keep,
                (false, true) => DatabaseOnDrop::Drop,
                (false, false) => DatabaseOnDrop::ByOrigin,
            };
            let dropped = provision::drop_tenant(setup, &registry, &slug, on_drop, None).await?;
            if dropped {
                say(&format!("tenant {slug} deleted with its database and role"))
            } else {
                say(&format!(
                    "tenant {slug} deleted; its database and role were kept"
                ))
            }
        }
    }
}

async fn create(
    config: &Config,
    registry: &Registry,
    slug: &str,
    options: &CreateTenant,
) -> anyhow::Result<()> {
    let key = MasterKey::load(&config.secrets)?;
    let t = provision::create_tenant(config.provisioning(), registry, &key, slug, options).await?;
    let version = registry
        .schema_version(&t.slug)
        .await?
        .map_or_else(|| "none".to_owned(), |v| v.to_string());
    say(&format!(
        "tenant {} is {} (database {} on server {}, schema version {version}); add a user with: tenantgate user add {} USER",
        t.slug, t.state, t.database, t.server, t.slug
    ))
}

/// `tenant migrate --all`: progress on stderr about every 5%, one line per tenant that failed
/// and a summary on stdout.
async fn migrate_all(
    config: &Config,
    registry: &Registry,
    key: &MasterKey,
    concurrency: Option<usize>,
) -> anyhow::Result<()> {
    let options = provision::MigrateAll {
        concurrency,
        budgets: None,
    };
    let progress = |p: provision::MigrateProgress| {
        let step = (p.total / 20).max(1);
        if p.done % step == 0 || p.done == p.total {
            drop(writeln!(
                std::io::stderr().lock(),
                "migrated {}/{} tenants, {} failed",
                p.done,
                p.total,
                p.failed
            ));
        }
    };
    let results =
        provision::migrate_all(config.provisioning(), registry, key, options, progress).await?;
    let mut out = String::new();
    let mut failed = 0;
    let mut applied = 0;
    for r in &results {
        match &r.result {
            Ok(outcome) => applied += outcome.applied.len(),
            Err(message) => {
                failed += 1;
                writeln!(out, "{}: FAILED: {message}", r.slug)?;
            }
        }
    }
    write!(
        out,
        "{} tenants: {} migrated ({applied} files applied), {failed} failed",
        results.len(),
        results.len() - failed
    )?;
    say(&out)?;
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} tenants failed to migrate",
        results.len()
    );
    Ok(())
}

fn describe_outcome(
    slug: &str,
    outcome: &provision::MigrateOutcome,
) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    for file in &outcome.applied {
        writeln!(text, "applied {} ({} ms)", file.file, file.duration_ms)?;
    }
    let version = outcome
        .schema_version
        .map_or_else(|| "none".to_owned(), |v| v.to_string());
    write!(
        text,
        "tenant {slug}: {} applied, {} already applied, schema version {version}",
        outcome.applied.len(),
        outcome.already_applied
    )?;
    Ok(text)
}
