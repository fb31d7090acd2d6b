//! Users moved over from an existing PostgreSQL server with their passwords: the SCRAM-SHA-256
//! verifiers of chosen roles, read from the server's `pg_authid` as the server's configured
//! admin role (`[[server]] admin_user`, which must be allowed to read it: in practice a
//! superuser), stored as users of the same names of a tenant. Nobody learns a password.
//!
//! All or nothing: every chosen role is checked first (it exists, has a password, and that
//! password is a valid SCRAM-SHA-256 verifier, not md5), and if any fails nothing is stored.
//! This module must not create or alter roles on the server, and must not log or return a
//! verifier.

use std::fmt;

use super::server::connect_admin;
use super::{ProvisionError, Setup, parse_slug, set_user_verifier};
use crate::auth::{ScramSecret, VerifierError};
use crate::registry::Registry;

/// What to import.
#[derive(Debug, Clone, Copy)]
pub struct ImportUsers<'a> {
    /// The tenant the users are added to (existing users get the copied verifier).
    pub slug: &'a str,
    /// The `[[server]]` to read `pg_authid` on; `None`: the tenant's own server.
    pub server: Option<&'a str>,
    /// The roles to copy; each becomes a user of the same name.
    pub roles: &'a [String],
}

/// Why one role cannot be imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportProblem {
    NoSuchRole,
    NoPassword,
    Md5,
    NotScram(VerifierError),
}

impl fmt::Display for ImportProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImportProblem::NoSuchRole => f.write_str("no such role"),
            ImportProblem::NoPassword => f.write_str("it has no password"),
            ImportProblem::Md5 => f.write_str(
                "its password is stored as md5: set it again under password_encryption = \
                 'scram-sha-256' first",
            ),
            ImportProblem::NotScram(e) => write!(f, "its stored password is not valid: {e}"),
        }
    }
}

/// The roles that could not be imported, one per line of the error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportProblems(pub Vec<(String, ImportProblem)>);

impl fmt::Display for ImportProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(role, problem)| format!("role {role:?}: {problem}"))
            .collect();
        f.write_str(&parts.join("; "))
    }
}

/// Copies the chosen roles' verifiers into the tenant's users; returns the server read from.
pub async fn import_users(
    setup: Setup<'_>,
    registry: &Registry,
    import: &ImportUsers<'_>,
) -> Result<String, ProvisionError> {
    let slug = parse_slug(import.slug)?;
    let tenant = registry
        .tenant(&slug)
        .await?
        .ok_or_else(|| ProvisionError::NoSuchTenant(slug.clone()))?;
    let name = import.server.unwrap_or(&tenant.server);
    let server = setup
        .server(name)
        .ok_or_else(|| ProvisionError::UnknownServer(name.to_owned()))?;
    let client = connect_admin(server, &server.admin_database, None).await?;
    let read = client
        .query(
            "SELECT rolname::text, rolpassword FROM pg_catalog.pg_authid \
             WHERE rolname = ANY($1::text[])",
            &[&import.roles],
        )
        .await;
    client.close().await;
    let rows = read.map_err(|source| {
        if source.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            ProvisionError::CannotReadAuthid {
                server: server.name.clone(),
                role: server.admin_user.clone(),
            }
        } else {
            ProvisionError::Backend {
                server: server.name.clone(),
                what: "reading pg_authid".to_owned(),
                source,
            }
        }
    })?;
    let mut found = Vec::with_capacity(rows.len());
    for row in &rows {
        let role: String = row.try_get(0).map_err(|source| ProvisionError::Backend {
            server: server.name.clone(),
            what: "reading pg_authid".to_owned(),
            source,
        })?;
        let password: Option<String> =
            row.try_get(1).map_err(|source| ProvisionError::Backend {
                server: server.name.clone(),
                what: "reading pg_authid".to_owned(),
                source,
            })?;
        found.push((role, password));
    }
    let verifiers = check_roles(import.roles, &found)?;
    for (role, verifier) in verifiers {
        set_user_verifier(registry, slug.as_str(), role, verifier).await?;
    }
    Ok(server.name.clone())
}

/// Each chosen role's verifier, or every problem found.
fn check_roles<'a>(
    roles: &'a [String],
    found: &'a [(String, Option<String>)],
) -> Result<Vec<(&'a str, &'a str)>, ProvisionError> {
    let mut verifiers = Vec::with_capacity(roles.len());
    let mut problems = Vec::new();
    for role in roles {
        let stored = found.iter().find(|(name, _)| name == role);
        let problem = match stored {
            None => Some(ImportProblem::NoSuchRole),
            Some((_, None)) => Some(ImportProblem::NoPassword),
            Some((_, Some(p))) if p.starts_with("md5") => Some(ImportProblem::Md5),
            Some((_, Some(p))) => match ScramSecret::from_verifier(p) {
                Ok(_) => {
                    verifiers.push((role.as_str(), p.as_str()));
                    None
                }
                Err(e) => Some(ImportProblem::NotScram(e)),
            },
        };
        if let Some(problem) = problem {
            problems.push((role.clone(), problem));
        }
    }
    if problems.is_empty() {
        Ok(verifiers)
    } else {
        Err(ProvisionError::NotImported(ImportProblems(problems)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bad_role_imports_nothing_and_each_is_named() {
        let good = postgres_protocol::password::scram_sha_256(b"pw");
        let found = vec![
            ("alice".to_owned(), Some(good.clone())),
            ("bob".to_owned(), None),
            ("carol".to_owned(), Some(format!("md5{}", "a".repeat(32)))),
            (
                "dave".to_owned(),
                Some("SCRAM-SHA-256$4096:x$y:z".to_owned()),
            ),
        ];
        let roles: Vec<String> = ["alice", "bob", "carol", "dave", "erin"]
            .iter()
            .map(|r| (*r).to_owned())
            .collect();
        let Err(ProvisionError::NotImported(problems)) = check_roles(&roles, &found) else {
            panic!("expected every problem");
        };
        let names: Vec<&str> = problems.0.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(names, ["bob", "carol", "dave", "erin"]);
        assert_eq!(problems.0[3].1, ImportProblem::NoSuchRole);
        let message = problems.to_string();
        assert!(
            message.contains("md5") && !message.contains(&good),
            "{message}"
        );

        let only_alice = vec!["alice".to_owned()];
        let ok = check_roles(&only_alice, &found).unwrap();
        assert_eq!(ok, [("alice", good.as_str())]);
    }
}
