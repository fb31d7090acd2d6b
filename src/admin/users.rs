//! Who may log in, and how: CREATE/ALTER/DROP USER for tenant users, CREATE/ALTER ADMIN USER,
//! auth methods (`AUTH scram|cert|cert+scram`), and a tenant's custom domains (ALTER TENANT
//! ... ADD/DROP DOMAIN). Passwords become SCRAM verifiers at once and never reach the activity
//! log; a PASSWORD that is already a SCRAM-SHA-256 verifier (`pg_authid.rolpassword` of
//! another server) is checked and stored as it is, as PostgreSQL's CREATE ROLE does
//! (`auth::Password`). This module does not speak the wire protocol.

use super::AdminContext;
use super::command::{Arg, Command};
use super::error::AdminError;
use super::exec::{Outcome, known_slug, log};
use crate::auth::Password;
use crate::crypto::{Secret, generate_password};
use crate::provision;
use crate::provision::ProvisionError;
use crate::registry::{AuthMethod, DomainError, TenantSlug};

/// The auth method a command names, if any.
fn method(auth: Option<&Arg>, params: &[Option<String>]) -> Result<Option<AuthMethod>, AdminError> {
    let Some(auth) = auth else {
        return Ok(None);
    };
    let text = auth.resolve(params)?;
    AuthMethod::parse(&text).map(Some).ok_or_else(|| {
        AdminError::BadValue(format!(
            "unknown auth method \"{text}\": use scram, cert or cert+scram"
        ))
    })
}

/// The password of a new user created without one: for a `cert` user, a random one nobody
/// knows (the column holds a verifier for every user); anyone else needs a password.
fn new_password(method: Option<AuthMethod>, what: &str) -> Result<Secret, AdminError> {
    match method {
        Some(AuthMethod::Cert) => Ok(generate_password(32)),
        _ => Err(AdminError::BadValue(format!(
            "{what} needs PASSWORD '...' (only AUTH cert users go without one)"
        ))),
    }
}

/// CREATE, ALTER and DROP USER; CREATE and ALTER ADMIN USER.
pub(super) async fn user_command(
    ctx: &AdminContext,
    actor: &str,
    command: &Command,
    params: &[Option<String>],
) -> Result<Outcome, AdminError> {
    let arg = |a: &Arg| a.resolve(params);
    let opt = |a: &Option<Arg>| a.as_ref().map(|a| a.resolve(params)).transpose();
    match command {
        Command::SetUser {
            user,
            tenant,
            password,
            auth,
            replace,
        } => {
            let (user, tenant) = (arg(user)?, arg(tenant)?);
            let slug = known_slug(ctx, &tenant).await?;
            let method = method(auth.as_ref(), params)?;
            let password = opt(password)?;
            let exists = ctx.registry.user_exists(&slug, &user).await?;
            match (exists, *replace) {
                (true, false) => {
                    return Err(AdminError::WrongState(format!(
                        "user \"{user}\" of tenant \"{slug}\" already exists; use ALTER USER"
                    )));
                }
                (false, true) => {
                    return Err(AdminError::WrongState(format!(
                        "user \"{user}\" of tenant \"{slug}\" does not exist; use CREATE USER"
                    )));
                }
                _ => {}
            }
            let password = match (password, *replace) {
                (Some(pw), _) => Some(Password::classify(pw)?),
                (None, true) => None,
                (None, false) => Some(Password::Plain(new_password(method, "CREATE USER")?)),
            };
            if let Some(password) = password {
                let verifier = password.into_verifier().await;
                provision::set_user_verifier(&ctx.registry, slug.as_str(), &user, &verifier)
                    .await?;
            }
            if let Some(method) = method {
                ctx.registry.set_user_auth(&slug, &user, method).await?;
                let detail = format!("{user} auth {method}");
                log(ctx, Some(&slug), actor, "user.auth", Some(&detail)).await;
            }
            // Do not wait for the NOTIFY: the next login must see the change.
            ctx.directory.invalidate(&slug).await;
            Ok(Outcome::Done(if *replace {
                "ALTER USER"
            } else {
                "CREATE USER"
            }))
        }
        Command::SetAdminUser {
            user,
            password,
            auth,
            replace,
        } => {
            set_admin_user(
                ctx,
                actor,
                &arg(user)?,
                opt(password)?,
                auth.as_ref(),
                *replace,
                params,
            )
            .await
        }
        Command::DropUser { user, tenant } => {
            let (user, tenant) = (arg(user)?, arg(tenant)?);
            let slug = known_slug(ctx, &tenant).await?;
            provision::remove_user(&ctx.registry, slug.as_str(), &user).await?;
            ctx.directory.invalidate(&slug).await;
            log(ctx, Some(&slug), actor, "user.drop", Some(&user)).await;
            Ok(Outcome::Done("DROP USER"))
        }
        _ => Err(AdminError::Unsupported("this command".to_owned())),
    }
}

/// CREATE and ALTER ADMIN USER.
async fn set_admin_user(
    ctx: &AdminContext,
    actor: &str,
    user: &str,
    password: Option<String>,
    auth: Option<&Arg>,
    replace: bool,
    params: &[Option<String>],
) -> Result<Outcome, AdminError> {
    let method = method(auth, params)?;
    if user.len() > crate::registry::MAX_NAME_BYTES {
        return Err(ProvisionError::UserNameTooLong(user.to_owned()).into());
    }
    let exists = ctx.registry.admin_login(user).await?.is_some();
    match (exists, replace) {
        (true, false) => {
            return Err(AdminError::WrongState(format!(
                "admin user \"{user}\" already exists; use ALTER ADMIN USER"
            )));
        }
        (false, true) => {
            return Err(AdminError::WrongState(format!(
                "admin user \"{user}\" does not exist; use CREATE ADMIN USER"
            )));
        }
        _ => {}
    }
    let password = match (password, replace) {
        (Some(pw), _) => Some(Password::classify(pw)?),
        (None, true) => None,
        (None, false) => Some(Password::Plain(new_password(method, "CREATE ADMIN USER")?)),
    };
    if let Some(password) = password {
        let verifier = password.into_verifier().await;
        ctx.registry.set_admin_user(user, &verifier, true).await?;
    }
    if let Some(method) = method {
        ctx.registry.set_admin_auth(user, method).await?;
    }
    let detail = method.map_or_else(|| user.to_owned(), |m| format!("{user} auth {m}"));
    log(ctx, None, actor, "admin_user.set", Some(&detail)).await;
    Ok(Outcome::Done(if replace {
        "ALTER ADMIN USER"
    } else {
        "CREATE ADMIN USER"
    }))
}

/// ALTER TENANT slug ADD DOMAIN 'name' / DROP DOMAIN 'name'.
pub(super) async fn domain_command(
    ctx: &AdminContext,
    actor: &str,
    tenant: &str,
    domain: &str,
    add: bool,
) -> Result<Outcome, AdminError> {
    let slug: TenantSlug = known_slug(ctx, tenant).await?;
    if add {
        ctx.registry
            .add_domain(&slug, domain)
            .await
            .map_err(|e| match e {
                DomainError::Invalid(_) => AdminError::BadValue(e.to_string()),
                DomainError::Taken { .. } => AdminError::Duplicate(e.to_string()),
                DomainError::NoSuchTenant => AdminError::NoSuchTenant(tenant.to_owned()),
                DomainError::Registry(r) => AdminError::Registry(r),
            })?;
    } else if !ctx.registry.drop_domain(&slug, domain).await? {
        return Err(AdminError::WrongState(format!(
            "tenant \"{slug}\" has no domain \"{domain}\""
        )));
    }
    // Do not wait for the NOTIFY: the next TLS login must see the change.
    ctx.directory.invalidate(&slug).await;
    let action = if add { "domain.add" } else { "domain.drop" };
    log(ctx, Some(&slug), actor, action, Some(domain)).await;
    Ok(Outcome::Done("ALTER TENANT"))
}
