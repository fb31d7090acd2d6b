//! `tenantgate user add|remove|import`: a tenant's users, through `provision` and the
//! registry. Only a SCRAM verifier is stored: `add` hashes the password it reads (or stores it
//! as it is when it is already a SCRAM-SHA-256 verifier, as PostgreSQL's CREATE ROLE does),
//! `import` copies verifiers from a server's `pg_authid`. This module must not keep, log or
//! print a password or a verifier.

use anyhow::Context as _;
use clap::Subcommand;
use tenantgate::auth::Password;
use tenantgate::config::Config;
use tenantgate::provision;
use tenantgate::registry::{AuthMethod, TenantSlug};

use super::open_registry;
use super::terminal::{read_password, say};

#[derive(Subcommand)]
pub(super) enum UserCommand {
    /// Add a user to a tenant or change its password. The password is read from a prompt, or
    /// from standard input when it is not a terminal. Only a SCRAM verifier is stored.
    Add {
        slug: String,
        user: String,
        /// How the user logs in: `scram` (password), `cert` (a client certificate whose CN is
        /// the user name, no password: none is asked for) or `cert+scram` (both). Default:
        /// unchanged for an existing user, `scram` for a new one.
        #[arg(long, value_parser = parse_auth_method)]
        auth: Option<AuthMethod>,
    },
    /// Copy users with their passwords from a PostgreSQL server: the SCRAM-SHA-256 verifiers
    /// of the chosen roles, read from the server's pg_authid as its configured admin_user
    /// (which must be allowed to read it: a superuser). Each role becomes a user of the same
    /// name. Nothing is imported if any role has no password, an md5 one, or does not exist.
    Import {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        /// The `[[server]]` (by name) to read pg_authid on; without a value, the tenant's own
        /// server.
        #[arg(
            long,
            value_name = "SERVER",
            num_args = 0..=1,
            default_missing_value = "",
            required = true
        )]
        from_server: Option<String>,
        /// A role to copy (repeat, or separate with commas).
        #[arg(
            long = "role",
            value_name = "ROLE",
            value_delimiter = ',',
            required = true
        )]
        roles: Vec<String>,
    },
    /// Remove a user from a tenant.
    Remove {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        user: String,
    },
}

fn parse_auth_method(text: &str) -> Result<AuthMethod, String> {
    AuthMethod::parse(text).ok_or_else(|| "expected scram, cert or cert+scram".to_owned())
}

pub(super) async fn run(config: &Config, cmd: UserCommand) -> anyhow::Result<()> {
    let registry = open_registry(config).await?;
    match cmd {
        UserCommand::Add { slug, user, auth } => {
            let password = if auth == Some(AuthMethod::Cert) {
                // Nobody will type it: the certificate is the credential.
                Password::Plain(tenantgate::crypto::generate_password(32))
            } else {
                let text = read_password(&format!("Password for {user} of {slug}: "))?;
                Password::classify(text.expose().to_owned())?
            };
            let verifier = password.into_verifier().await;
            provision::set_user_verifier(&registry, &slug, &user, &verifier).await?;
            if let Some(method) = auth {
                let tenant = TenantSlug::parse(&slug).context("invalid tenant slug")?;
                registry.set_user_auth(&tenant, &user, method).await?;
                return say(&format!(
                    "user {user} of tenant {slug} saved (auth {method})"
                ));
            }
            say(&format!("user {user} of tenant {slug} saved"))
        }
        UserCommand::Import {
            tenant,
            from_server,
            roles,
        } => {
            let import = provision::ImportUsers {
                slug: &tenant,
                server: from_server.as_deref().filter(|s| !s.is_empty()),
                roles: &roles,
            };
            let server = provision::import_users(config.provisioning(), &registry, &import).await?;
            say(&format!(
                "imported {} user(s) into tenant {tenant} from server {server}: {}",
                roles.len(),
                roles.join(", ")
            ))
        }
        UserCommand::Remove { tenant, user } => {
            provision::remove_user(&registry, &tenant, &user).await?;
            say(&format!("user {user} removed from tenant {tenant}"))
        }
    }
}
